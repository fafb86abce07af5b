//! Unit tests of the state machine against the fake backend.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::*;

#[derive(Default)]
struct Hooks {
    fail_unmap: AtomicUsize,
    fail_map: AtomicUsize,
    log: Mutex<Vec<String>>,
}

impl Hooks {
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn take_fail(c: &AtomicUsize) -> bool {
    c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

impl VmmHooks for Hooks {
    fn unmap_bars(&self, device: &str) -> std::result::Result<(), String> {
        self.log.lock().unwrap().push(format!("unmap {device}"));
        if take_fail(&self.fail_unmap) {
            return Err("vmm refused".into());
        }
        Ok(())
    }
    fn map_bars(&self, device: &str, areas: &[MmapArea]) -> std::result::Result<(), String> {
        self.log
            .lock()
            .unwrap()
            .push(format!("map {device} {}", areas.len()));
        if take_fail(&self.fail_map) {
            return Err("vmm refused".into());
        }
        Ok(())
    }
}

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

const VF1: &str = "0000:02:00.1";
const VF2: &str = "0000:02:00.2";
const IGB: &str = "0000:01:10.0";

struct Fx {
    fake: FakeBackend,
    hooks: Arc<Hooks>,
    container: Arc<Container>,
    dev: PausableDevice,
}

fn fixture(options: DeviceOptions) -> Fx {
    let fake = FakeBackend::new();
    fake.add_vf(&addr(VF1), FakeVf::nvme());
    let hooks = Arc::new(Hooks::default());
    let container = Container::new(Box::new(fake.clone()));
    let mut guest = vec![0u8; 4096];
    // SAFETY: the fake backend never touches the memory; `guest` outlives the
    // test because it is leaked below.
    unsafe { container.register_dma(0, 4096, guest.as_mut_ptr()) }.unwrap();
    std::mem::forget(guest);
    let dev = PausableDevice::open(
        "nvme0",
        container.clone(),
        VfSource::Sysfs(addr(VF1)),
        options,
        hooks.clone(),
    )
    .unwrap();
    Fx {
        fake,
        hooks,
        container,
        dev,
    }
}

fn fx() -> Fx {
    fixture(DeviceOptions::default())
}

/// Simulate `sriov_numvfs=0` then `=N`: the VF is destroyed and re-created
/// with fresh config space.
fn recreate(fake: &FakeBackend, a: &str, vf: FakeVf) {
    fake.remove_vf(&addr(a)).unwrap();
    fake.add_vf(&addr(a), vf);
}

fn sysfs(a: &str) -> VfSource {
    VfSource::Sysfs(addr(a))
}

fn cfg_read32(dev: &PausableDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.config_read(off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn open_reads_identity_and_maps_registered_dma() {
    let f = fx();
    assert_eq!(f.dev.state(), DeviceState::Attached);
    assert_eq!(f.dev.identity().vendor, 0x1b36);
    assert_eq!(f.dev.identity().class, 0x010802);
    assert_eq!(f.fake.dma_mappings().get(&0), Some(&4096));
    assert_eq!(f.fake.open_handles(), 1);
    assert_eq!(f.hooks.log(), vec!["map nvme0 0"]);
}

#[test]
fn pause_releases_every_handle_so_the_vf_can_be_removed() {
    let f = fx();
    let t = f.dev.pause().unwrap();
    assert!(!t.noop);
    assert_eq!(f.dev.state(), DeviceState::Paused);
    assert_eq!(f.fake.open_handles(), 0);
    f.fake.remove_vf(&addr(VF1)).unwrap();
    assert!(t.get(Phase::Close).is_some());
    assert!(t.get(Phase::IrqTeardown).is_some());
    assert_eq!(f.dev.last_timings().0, Some(t));
}

#[test]
fn pause_twice_is_a_noop() {
    let f = fx();
    f.dev.pause().unwrap();
    f.fake.clear_calls();
    let t = f.dev.pause().unwrap();
    assert!(t.noop);
    assert!(f.fake.calls().is_empty());
    assert_eq!(f.dev.state(), DeviceState::Paused);
}

#[test]
fn unpause_twice_is_a_noop() {
    let f = fx();
    f.dev.pause().unwrap();
    assert!(!f.dev.unpause(sysfs(VF1)).unwrap().noop);
    f.fake.clear_calls();
    let t = f.dev.unpause(sysfs(VF1)).unwrap();
    assert!(t.noop);
    assert!(f.fake.calls().is_empty());
    assert_eq!(f.dev.state(), DeviceState::Attached);
    assert_eq!(f.fake.open_handles(), 1);
}

#[test]
fn unpause_onto_recreated_vf_restores_bars_and_command_as_guest_programmed() {
    let f = fx();
    f.dev
        .config_write(0x10, &0xfe00_0004u32.to_le_bytes())
        .unwrap();
    f.dev
        .config_write(0x14, &0x0000_0001u32.to_le_bytes())
        .unwrap();
    f.dev.config_write(0x04, &0x0006u16.to_le_bytes()).unwrap();
    f.dev.pause().unwrap();
    recreate(&f.fake, VF1, FakeVf::nvme());
    assert_eq!(f.fake.config_of(&addr(VF1)).unwrap()[0x10], 0);
    f.dev.unpause(sysfs(VF1)).unwrap();
    let c = f.fake.config_of(&addr(VF1)).unwrap();
    assert_eq!(&c[0x10..0x18], &[4, 0, 0, 0xfe, 1, 0, 0, 0]);
    assert_eq!(&c[0x04..0x06], &[6, 0]);
    // The command register is written after the BARs (decoding enabled last).
    let writes: Vec<u64> = f
        .fake
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            FakeCall::Write { offset, index, .. } if index == region::CONFIG => Some(offset),
            _ => None,
        })
        .collect();
    assert_eq!(writes.last(), Some(&0x04));
}

#[test]
fn config_reads_while_paused_come_from_the_shadow_without_touching_the_backend() {
    let f = fx();
    f.dev
        .config_write(0x10, &0xfe00_0000u32.to_le_bytes())
        .unwrap();
    f.dev.pause().unwrap();
    f.fake.clear_calls();
    assert_eq!(cfg_read32(&f.dev, 0x00), 0x0010_1b36);
    assert_eq!(cfg_read32(&f.dev, 0x10), 0xfe00_0000);
    assert!(f.fake.calls().is_empty());
    assert_eq!(f.dev.access_counters().shadow_reads, 2);
}

#[test]
fn config_writes_while_paused_go_to_the_shadow_and_are_applied_at_unpause() {
    let f = fx();
    f.dev.pause().unwrap();
    f.dev.config_write(0x3c, &[0x0b]).unwrap();
    assert_eq!(cfg_read32(&f.dev, 0x3c) & 0xff, 0x0b);
    assert_eq!(f.fake.config_of(&addr(VF1)).unwrap()[0x3c], 0);
    f.dev.unpause(sysfs(VF1)).unwrap();
    assert_eq!(f.fake.config_of(&addr(VF1)).unwrap()[0x3c], 0x0b);
    assert_eq!(f.dev.access_counters().shadow_writes, 1);
}

#[test]
fn unpause_onto_other_identity_fails_naming_both_and_stays_paused() {
    let f = fx();
    f.fake.add_vf(&addr(IGB), FakeVf::igbvf());
    f.dev.pause().unwrap();
    let e = f.dev.unpause(sysfs(IGB)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::IdentityMismatch { .. }), "{msg}");
    assert!(
        msg.contains("1b36:0010") && msg.contains("8086:10ca"),
        "{msg}"
    );
    assert!(msg.contains(VF1) && msg.contains(IGB), "{msg}");
    assert_eq!(f.dev.state(), DeviceState::Paused);
    assert_eq!(f.fake.open_handles(), 0);
    // ... and can then be unpaused onto a right one.
    f.dev.unpause(sysfs(VF1)).unwrap();
    assert_eq!(f.dev.state(), DeviceState::Attached);
}

#[test]
fn unpause_when_the_vf_is_gone_fails_cleanly_and_stays_paused() {
    let f = fx();
    f.dev.pause().unwrap();
    f.fake.remove_vf(&addr(VF1)).unwrap();
    let e = f.dev.unpause(sysfs(VF1)).unwrap_err();
    assert!(matches!(e, Error::VfGone { .. }), "{e}");
    assert!(e.to_string().contains(VF1));
    assert_eq!(f.dev.state(), DeviceState::Paused);
    assert_eq!(f.fake.open_handles(), 0);
    f.fake.add_vf(&addr(VF1), FakeVf::nvme());
    f.dev.unpause(sysfs(VF1)).unwrap();
}

#[test]
fn unpause_onto_another_bdf_with_same_identity_moves_the_device() {
    let f = fx();
    f.fake.add_vf(&addr(VF2), FakeVf::nvme());
    f.dev.pause().unwrap();
    f.dev.unpause(sysfs(VF2)).unwrap();
    assert_eq!(f.dev.host(), addr(VF2));
    assert_eq!(f.fake.irqs_enabled(&addr(VF2)).len(), 0);
    f.fake.remove_vf(&addr(VF1)).unwrap();
}

/// What the fake can show of a passed fd: the device hands it to the
/// backend as a group-fd source, which owns and closes it (a pipe's write
/// end: the read end sees EOF). That the real backend opens the VF from the
/// very fd is the lab test of the same name.
#[test]
fn unpause_with_a_passed_fd_hands_it_to_the_backend_which_closes_it() {
    let f = fx();
    f.dev.pause().unwrap();
    let mut ends = [0 as libc::c_int; 2];
    // SAFETY: `ends` has room for the two fds pipe2 writes.
    let rc = unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0);
    // SAFETY: pipe2 just created these fds and nothing else owns them.
    let (read_end, write_end) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(ends[0]),
            OwnedFd::from_raw_fd(ends[1]),
        )
    };
    f.dev
        .unpause(VfSource::GroupFd {
            group: write_end,
            address: addr(VF1),
        })
        .unwrap();
    assert!(f.fake.calls().contains(&FakeCall::Open {
        address: addr(VF1),
        group_fd: true
    }));
    let mut b = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut &read_end, &mut b).unwrap(), 0);
}

#[test]
fn unpause_remaps_dma_after_the_container_lost_it() {
    let f = fx();
    f.dev.pause().unwrap();
    assert!(f.fake.dma_mappings().is_empty());
    assert!(!f.container.dma_mapped());
    let t = f.dev.unpause(sysfs(VF1)).unwrap();
    assert_eq!(f.fake.dma_mappings().get(&0), Some(&4096));
    assert!(t.get(Phase::DmaRemap).is_some());
}

#[test]
fn unpause_finds_dma_kept_while_another_device_holds_the_container() {
    let f = fx();
    f.fake.add_vf(&addr(VF2), FakeVf::nvme());
    let other = PausableDevice::open(
        "nvme1",
        f.container.clone(),
        sysfs(VF2),
        DeviceOptions::default(),
        Arc::new(TrapAllBars),
    )
    .unwrap();
    f.dev.pause().unwrap();
    assert_eq!(f.fake.dma_mappings().len(), 1, "nvme1 keeps the container");
    let t = f.dev.unpause(sysfs(VF1)).unwrap();
    assert!(t.get(Phase::DmaRemap).is_none(), "nothing had to be mapped");
    assert_eq!(f.fake.dma_mappings().len(), 1);
    drop(other);
}

#[test]
fn devices_sharing_a_container_pause_and_unpause_in_parallel() {
    let f = fx();
    f.fake.add_vf(&addr(VF2), FakeVf::nvme());
    let other = PausableDevice::open(
        "nvme1",
        f.container.clone(),
        sysfs(VF2),
        DeviceOptions::default(),
        Arc::new(TrapAllBars),
    )
    .unwrap();
    thread::scope(|s| {
        for (dev, a) in [(&f.dev, VF1), (&other, VF2)] {
            s.spawn(move || {
                for _ in 0..200 {
                    dev.pause().unwrap();
                    dev.unpause(sysfs(a)).unwrap();
                }
            });
        }
    });
    assert_eq!(f.fake.open_handles(), 2);
    assert_eq!(f.fake.dma_mappings().get(&0), Some(&4096));
    f.dev.pause().unwrap();
    other.pause().unwrap();
    assert!(f.fake.dma_mappings().is_empty());
    f.dev.unpause(sysfs(VF1)).unwrap();
    assert_eq!(f.fake.dma_mappings().get(&0), Some(&4096));
}

#[test]
fn irqs_are_disabled_at_pause_and_rewired_at_unpause() {
    let f = fx();
    let fds: Vec<EventFd> = (0..4).map(|_| EventFd::new(0).unwrap()).collect();
    f.dev.set_irqs(irq::MSIX, fds).unwrap();
    f.dev
        .set_request_irq(Some(EventFd::new(0).unwrap()))
        .unwrap();
    assert!(f.dev.request_is_unplug());
    let en = f.fake.irqs_enabled(&addr(VF1));
    assert_eq!(en.get(&irq::MSIX), Some(&4));
    f.fake.clear_calls();
    f.dev.pause().unwrap();
    assert!(!f.dev.request_is_unplug());
    let disabled: Vec<u32> = f
        .fake
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            FakeCall::SetIrqs {
                index, count: 0, ..
            } => Some(index),
            _ => None,
        })
        .collect();
    assert_eq!(disabled, vec![irq::REQ, irq::MSIX]);
    recreate(&f.fake, VF1, FakeVf::nvme());
    f.dev.unpause(sysfs(VF1)).unwrap();
    let en = f.fake.irqs_enabled(&addr(VF1));
    assert_eq!(en.get(&irq::MSIX), Some(&4));
    assert_eq!(en.get(&irq::REQ), Some(&1));
    assert!(f.dev.request_is_unplug());
}

#[test]
fn irq_changes_while_paused_are_applied_at_unpause() {
    let f = fx();
    f.dev.pause().unwrap();
    f.dev
        .set_irqs(irq::MSIX, vec![EventFd::new(0).unwrap()])
        .unwrap();
    f.dev.unpause(sysfs(VF1)).unwrap();
    assert_eq!(f.fake.irqs_enabled(&addr(VF1)).get(&irq::MSIX), Some(&1));
}

#[test]
fn paused_bar_reads_return_all_ones_and_writes_are_dropped_and_counted() {
    let f = fx();
    let mut b = [0u8; 4];
    f.dev.bar_read(0, 0, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x0040_0fff);
    f.dev.pause().unwrap();
    f.dev.bar_read(0, 0, &mut b).unwrap();
    assert_eq!(b, [0xff; 4]);
    f.dev.bar_write(0, 0x14, &[1, 0, 0, 0]).unwrap();
    let c = f.dev.access_counters();
    assert_eq!((c.ignored_reads, c.ignored_writes, c.stalled), (1, 1, 0));
}

#[test]
fn stall_policy_holds_the_access_until_unpause_then_performs_it() {
    let f = Arc::new(fixture(DeviceOptions::stall(Duration::from_secs(60))));
    f.dev.pause().unwrap();
    let f2 = f.clone();
    let reader = thread::spawn(move || {
        let mut b = [0u8; 4];
        f2.dev.bar_read(0, 0, &mut b).unwrap();
        u32::from_le_bytes(b)
    });
    // Wait until the reader is parked in the stall (counted before waiting).
    while f.dev.access_counters().stalled == 0 {
        thread::yield_now();
    }
    f.dev.unpause(sysfs(VF1)).unwrap();
    assert_eq!(reader.join().unwrap(), 0x0040_0fff);
    assert_eq!(f.dev.access_counters().ignored_reads, 0);
}

#[test]
fn stall_policy_falls_back_to_ignore_after_the_deadline() {
    let f = fixture(DeviceOptions::stall(Duration::from_millis(1)));
    f.dev.pause().unwrap();
    let mut b = [0u8; 4];
    f.dev.bar_read(0, 0, &mut b).unwrap();
    assert_eq!(b, [0xff; 4]);
    let c = f.dev.access_counters();
    assert_eq!((c.stalled, c.ignored_reads), (1, 1));
}

#[test]
fn bar_mmaps_are_released_at_pause_and_made_again_at_unpause() {
    let f = fixture(DeviceOptions::default().with_mmap_bars(true));
    assert_eq!(f.dev.bar_mmaps().len(), 1);
    assert_eq!(f.fake.open_handles(), 2);
    f.dev.pause().unwrap();
    assert!(f.dev.bar_mmaps().is_empty());
    assert_eq!(f.fake.open_handles(), 0);
    f.dev.unpause(sysfs(VF1)).unwrap();
    assert_eq!(f.dev.bar_mmaps().len(), 1);
    assert_eq!(
        f.hooks.log(),
        vec!["map nvme0 1", "unmap nvme0", "map nvme0 1"]
    );
}

#[test]
fn failed_unmap_hook_leaves_the_device_attached_and_working() {
    let f = fx();
    f.hooks.fail_unmap.store(1, Ordering::SeqCst);
    let e = f.dev.pause().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Hook {
                hook: "unmap_bars",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(f.dev.state(), DeviceState::Attached);
    assert_eq!(cfg_read32(&f.dev, 0), 0x0010_1b36);
    f.dev.pause().unwrap();
}

#[test]
fn failed_snapshot_rolls_back_to_attached() {
    let f = fx();
    f.fake.fail(FakeOp::RegionRead, 0);
    let e = f.dev.pause().unwrap_err();
    assert!(e.to_string().contains("injected"), "{e}");
    assert_eq!(f.dev.state(), DeviceState::Attached);
    assert_eq!(f.fake.open_handles(), 1);
    assert_eq!(f.hooks.log().last().unwrap(), "map nvme0 0");
}

#[test]
fn failed_snapshot_and_failed_remap_hook_report_rollback_failure_but_stay_attached() {
    let f = fx();
    f.fake.fail(FakeOp::RegionRead, 0);
    f.hooks.fail_map.store(1, Ordering::SeqCst);
    let e = f.dev.pause().unwrap_err();
    assert!(
        matches!(
            e,
            Error::RollbackFailed {
                state: DeviceState::Attached,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(f.dev.state(), DeviceState::Attached);
}

#[test]
fn failed_irq_teardown_re_enables_disabled_irqs_and_stays_attached() {
    let f = fx();
    f.dev
        .set_irqs(irq::MSIX, vec![EventFd::new(0).unwrap()])
        .unwrap();
    f.dev
        .set_request_irq(Some(EventFd::new(0).unwrap()))
        .unwrap();
    // REQ disables fine, MSIX fails.
    f.fake.fail(FakeOp::SetIrqs, 1);
    let e = f.dev.pause().unwrap_err();
    assert!(e.to_string().contains("set irqs"), "{e}");
    assert_eq!(f.dev.state(), DeviceState::Attached);
    let en = f.fake.irqs_enabled(&addr(VF1));
    assert_eq!(en.get(&irq::REQ), Some(&1));
    assert_eq!(en.get(&irq::MSIX), Some(&1));
    assert!(f.dev.request_is_unplug());
}

#[test]
fn failed_irq_teardown_with_failed_rollback_completes_the_pause() {
    let f = fx();
    f.dev
        .set_irqs(irq::MSIX, vec![EventFd::new(0).unwrap()])
        .unwrap();
    f.dev
        .set_request_irq(Some(EventFd::new(0).unwrap()))
        .unwrap();
    f.fake.fail(FakeOp::SetIrqs, 1); // MSIX disable fails
    f.fake.fail(FakeOp::SetIrqs, 0); // ... and the REQ re-enable too
    let e = f.dev.pause().unwrap_err();
    assert!(
        matches!(
            e,
            Error::RollbackFailed {
                state: DeviceState::Paused,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(f.dev.state(), DeviceState::Paused);
    assert_eq!(f.fake.open_handles(), 0);
    f.dev.unpause(sysfs(VF1)).unwrap();
}

#[test]
fn failed_close_still_releases_every_fd_and_leaves_the_device_paused() {
    let f = fixture(DeviceOptions::default().with_mmap_bars(true));
    f.fake.fail(FakeOp::Close, 0);
    let e = f.dev.pause().unwrap_err();
    assert!(e.to_string().contains("close"), "{e}");
    assert_eq!(f.dev.state(), DeviceState::Paused);
    assert_eq!(f.fake.open_handles(), 0);
    f.fake.remove_vf(&addr(VF1)).unwrap();
}

#[test]
fn failed_munmap_still_closes_and_leaves_the_device_paused() {
    let f = fixture(DeviceOptions::default().with_mmap_bars(true));
    f.fake.fail(FakeOp::Munmap, 0);
    assert!(f.dev.pause().is_err());
    assert_eq!(f.dev.state(), DeviceState::Paused);
    assert_eq!(f.fake.open_handles(), 0);
}

/// Each unpause step failing leaves the device paused with nothing open, and
/// a later unpause succeeds.
fn unpause_failure_stays_paused(op: FakeOp, skip: usize, options: DeviceOptions) {
    let f = fixture(options);
    f.dev
        .set_irqs(irq::MSIX, vec![EventFd::new(0).unwrap()])
        .unwrap();
    f.dev.pause().unwrap();
    f.fake.fail(op, skip);
    let e = f.dev.unpause(sysfs(VF1)).unwrap_err();
    assert!(e.to_string().contains("injected"), "{op:?}: {e}");
    assert_eq!(f.dev.state(), DeviceState::Paused, "{op:?}");
    assert_eq!(f.fake.open_handles(), 0, "{op:?}");
    f.dev.unpause(sysfs(VF1)).unwrap();
    assert_eq!(f.dev.state(), DeviceState::Attached);
    assert_eq!(f.fake.dma_mappings().len(), 1);
}

#[test]
fn failed_reopen_stays_paused() {
    unpause_failure_stays_paused(FakeOp::Open, 0, DeviceOptions::default());
}

#[test]
fn failed_dma_remap_stays_paused() {
    unpause_failure_stays_paused(FakeOp::DmaMap, 0, DeviceOptions::default());
}

#[test]
fn failed_identity_read_stays_paused() {
    unpause_failure_stays_paused(FakeOp::RegionRead, 0, DeviceOptions::default());
}

#[test]
fn failed_config_restore_stays_paused() {
    unpause_failure_stays_paused(FakeOp::RegionWrite, 0, DeviceOptions::default());
}

#[test]
fn failed_irq_setup_stays_paused() {
    unpause_failure_stays_paused(FakeOp::SetIrqs, 0, DeviceOptions::default());
}

#[test]
fn failed_bar_mmap_stays_paused() {
    let options = DeviceOptions::default().with_mmap_bars(true);
    unpause_failure_stays_paused(FakeOp::Mmap, 0, options);
}

#[test]
fn failed_map_hook_at_unpause_stays_paused_with_mmaps_released() {
    let f = fixture(DeviceOptions::default().with_mmap_bars(true));
    f.dev.pause().unwrap();
    f.hooks.fail_map.store(1, Ordering::SeqCst);
    let e = f.dev.unpause(sysfs(VF1)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Hook {
                hook: "map_bars",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(f.dev.state(), DeviceState::Paused);
    assert_eq!(f.fake.open_handles(), 0);
}

#[test]
fn failed_open_of_a_new_device_leaves_nothing_open() {
    let fake = FakeBackend::new();
    fake.add_vf(&addr(VF1), FakeVf::nvme());
    let container = Container::new(Box::new(fake.clone()));
    fake.fail(FakeOp::RegionRead, 0);
    let e = PausableDevice::open(
        "x",
        container,
        sysfs(VF1),
        DeviceOptions::default(),
        Arc::new(TrapAllBars),
    )
    .unwrap_err();
    assert!(e.to_string().contains("injected"));
    assert_eq!(fake.open_handles(), 0);
}

#[test]
fn detach_releases_everything_and_later_operations_fail() {
    let f = fx();
    f.dev.detach().unwrap();
    assert_eq!(f.dev.state(), DeviceState::Detached);
    assert_eq!(f.fake.open_handles(), 0);
    assert!(matches!(
        f.dev.pause(),
        Err(Error::InvalidState { op: "pause", .. })
    ));
    assert!(f.dev.unpause(sysfs(VF1)).is_err());
    assert!(f.dev.config_read(0, &mut [0u8; 4]).is_err());
    assert!(f.dev.detach().is_err());
}

#[test]
fn detach_from_paused_is_allowed() {
    let f = fx();
    f.dev.pause().unwrap();
    f.dev.detach().unwrap();
    assert_eq!(f.dev.state(), DeviceState::Detached);
}

#[test]
fn dropping_an_attached_device_closes_the_vf() {
    let f = fx();
    let Fx { fake, dev, .. } = f;
    drop(dev);
    assert_eq!(fake.open_handles(), 0);
}

#[test]
fn fifty_cycles_close_every_handle_at_pause_and_open_one_vf_at_unpause() {
    let f = fx();
    for i in 0..50 {
        f.dev.pause().unwrap();
        assert_eq!(f.fake.open_handles(), 0, "cycle {i}");
        recreate(&f.fake, VF1, FakeVf::nvme());
        f.dev.unpause(sysfs(VF1)).unwrap();
        assert_eq!(f.fake.open_handles(), 1, "cycle {i}");
    }
    let (p, u) = f.dev.last_timings();
    assert!(!p.unwrap().noop && !u.unwrap().noop);
}

#[test]
fn bar_sizing_while_paused_reads_back_the_real_size_from_the_shadow() {
    let f = fx();
    f.dev.pause().unwrap();
    f.dev.config_write(0x10, &u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(cfg_read32(&f.dev, 0x10), 0xffff_c000, "16 KiB BAR0");
    f.dev.config_write(0x14, &u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(cfg_read32(&f.dev, 0x14), 0, "BAR1 not implemented");
    f.dev
        .config_write(0x10, &0xfe00_0000u32.to_le_bytes())
        .unwrap();
    assert_eq!(cfg_read32(&f.dev, 0x10), 0xfe00_0000);
    recreate(&f.fake, VF1, FakeVf::nvme());
    f.dev.unpause(sysfs(VF1)).unwrap();
    let c = f.fake.config_of(&addr(VF1)).unwrap();
    assert_eq!(&c[0x10..0x14], &0xfe00_0000u32.to_le_bytes());
}

#[test]
fn pci_addresses_with_a_32_bit_domain_parse_as_everywhere_in_svff() {
    let a: PciAddress = "10000:00:00.0".parse().unwrap();
    assert_eq!(a.to_string(), "10000:00:00.0");
    assert!("0000:0a:00.0/..".parse::<PciAddress>().is_err());
}

/// Type1 answers EEXIST for any overlap, whatever the host address: a second
/// registration of a mapped range (here with other memory behind it) must
/// fail, not be taken as "still mapped".
#[test]
fn registering_a_range_that_overlaps_a_mapped_one_is_an_error() {
    let f = fx();
    let mut other = vec![0u8; 4096];
    // SAFETY: the fake backend never touches the memory; it is leaked below.
    let r = unsafe { f.container.register_dma(0, 4096, other.as_mut_ptr()) };
    std::mem::forget(other);
    assert!(r.is_err(), "overlapping registration accepted");
    // The original registration still works: pause and unpause remap it.
    f.dev.pause().unwrap();
    f.dev.unpause(sysfs(VF1)).unwrap();
    assert_eq!(f.fake.dma_mappings().get(&0), Some(&4096));
}

/// A pause of one VF (its close still in the kernel), an unregister and an
/// unpause of another VF meanwhile: the unregistered range must not stay
/// mapped (pinned to memory the VMM may free).
#[test]
fn unregister_while_one_vf_closes_and_another_opens_leaves_no_stale_mapping() {
    let f = fx();
    f.fake.add_vf(&addr(VF2), FakeVf::nvme());
    let mut extra = vec![0u8; 4096];
    // SAFETY: the fake backend never touches the memory; it is leaked below.
    unsafe {
        f.container
            .register_dma(0x10_0000, 4096, extra.as_mut_ptr())
    }
    .unwrap();
    std::mem::forget(extra);
    let other = PausableDevice::open(
        "nvme1",
        f.container.clone(),
        sysfs(VF2),
        DeviceOptions::default(),
        Arc::new(TrapAllBars),
    )
    .unwrap();
    f.dev.pause().unwrap();
    assert!(f.fake.dma_mappings().contains_key(&0x10_0000));
    let gate = f.fake.gate(FakeOp::Close);
    thread::scope(|s| {
        let pausing = s.spawn(|| other.pause());
        gate.wait_entered();
        f.container.unregister_dma(0x10_0000, 4096).unwrap();
        f.dev.unpause(sysfs(VF1)).unwrap();
        gate.release();
        pausing.join().unwrap().unwrap();
    });
    assert_eq!(
        f.fake.dma_mappings().get(&0x10_0000),
        None,
        "unregistered range still mapped: {:?}",
        f.fake.dma_mappings()
    );
    assert_eq!(f.fake.dma_mappings().get(&0), Some(&4096));
}

/// Runs `transition` on one thread and, while the backend is held inside its
/// slow step (`gated`, a function reset), a config read and a BAR read on
/// another: both must be answered before the transition ends, with the
/// paused view. Returns what the accessor saw.
fn access_during(gated: FakeOp, pause_first: bool) -> (DeviceState, u32, [u8; 4]) {
    use std::sync::mpsc;
    let f = fx();
    if pause_first {
        f.dev.pause().unwrap();
    }
    let gate = f.fake.gate(gated);
    let (tx, rx) = mpsc::channel::<&str>();
    let mut seen = None;
    thread::scope(|s| {
        let tx1 = tx.clone();
        let dev = &f.dev;
        s.spawn(move || {
            if pause_first {
                dev.unpause(sysfs(VF1)).unwrap();
            } else {
                dev.pause().unwrap();
            }
            tx1.send("transition").unwrap();
        });
        gate.wait_entered();
        let (stx, srx) = mpsc::channel();
        s.spawn(move || {
            let id = cfg_read32(dev, 0);
            let mut b = [0u8; 4];
            dev.bar_read(0, 0, &mut b).unwrap();
            let state = dev.state();
            stx.send((state, id, b)).unwrap();
            tx.send("access").unwrap();
        });
        // Only a guard against a deadlock (the accessor blocked behind the
        // transition, which waits for the gate): the order is the assertion.
        let first = rx.recv_timeout(Duration::from_secs(30));
        gate.release();
        assert_eq!(first, Ok("access"), "the access waited for the transition");
        assert_eq!(rx.recv().unwrap(), "transition");
        seen = Some(srx.recv().unwrap());
    });
    seen.unwrap()
}

#[test]
fn guest_accesses_during_an_unpause_are_answered_before_it_ends() {
    let (state, id, bar) = access_during(FakeOp::Open, true);
    assert_eq!(state, DeviceState::Unpausing);
    assert_eq!(id, 0x0010_1b36, "config from the shadow");
    assert_eq!(bar, [0xff; 4], "ignore policy while unpausing");
}

#[test]
fn guest_accesses_during_a_pause_are_answered_before_it_ends() {
    let (state, id, bar) = access_during(FakeOp::Close, false);
    assert_eq!(state, DeviceState::Pausing);
    assert_eq!(id, 0x0010_1b36, "config from the shadow");
    assert_eq!(bar, [0xff; 4], "ignore policy while pausing");
}

#[test]
fn a_huge_stall_deadline_does_not_panic_and_the_access_completes_at_unpause() {
    let f = Arc::new(fixture(DeviceOptions::stall(Duration::MAX)));
    f.dev.pause().unwrap();
    let f2 = f.clone();
    let reader = thread::spawn(move || {
        let mut b = [0u8; 4];
        f2.dev.bar_read(0, 0, &mut b).unwrap();
        u32::from_le_bytes(b)
    });
    while f.dev.access_counters().stalled == 0 {
        thread::yield_now();
    }
    f.dev.unpause(sysfs(VF1)).unwrap();
    assert_eq!(reader.join().expect("no panic"), 0x0040_0fff);
}

/// QEMU runs MMIO handlers and QMP commands under one lock (the BQL). A
/// stalled vCPU access must not hold it: with `try_bar_read` the vCPU drops
/// its lock on `Retry`, so the unpause (run under the same lock) proceeds,
/// and the retried access is performed on the unpaused VF.
#[test]
fn a_stalled_access_holds_no_lock_the_unpause_needs() {
    let f = fixture(DeviceOptions::stall(Duration::from_secs(60)));
    f.dev.pause().unwrap();
    let bql = Mutex::new(());
    let (tx, rx) = std::sync::mpsc::channel();
    let value = thread::scope(|s| {
        let vcpu = s.spawn(|| {
            let mut stall = Stall::default();
            let mut b = [0u8; 4];
            let mut retries = 0;
            loop {
                let locked = bql.lock().unwrap();
                match f.dev.try_bar_read(0, 0, &mut b, &mut stall).unwrap() {
                    Access::Done => break,
                    Access::Retry => {
                        drop(locked);
                        if retries == 0 {
                            tx.send(()).unwrap();
                        }
                        retries += 1;
                        f.dev.wait_unpaused(&stall);
                    }
                }
            }
            u32::from_le_bytes(b)
        });
        rx.recv().unwrap();
        {
            let _locked = bql.lock().unwrap();
            f.dev.unpause(sysfs(VF1)).unwrap();
        }
        vcpu.join().unwrap()
    });
    assert_eq!(value, 0x0040_0fff, "the retried read reached the VF");
    let c = f.dev.access_counters();
    assert_eq!((c.stalled, c.ignored_reads), (1, 0));
}

#[test]
fn the_policy_is_chosen_per_pause_and_ignore_is_the_default() {
    let f = fx();
    f.dev
        .pause_with(PausePolicy::Stall, Duration::from_millis(1))
        .unwrap();
    let mut b = [0u8; 4];
    f.dev.bar_read(0, 0, &mut b).unwrap();
    assert_eq!(f.dev.access_counters().stalled, 1);
    f.dev.unpause(sysfs(VF1)).unwrap();
    f.dev.pause().unwrap();
    let mut stall = Stall::default();
    assert_eq!(
        f.dev.try_bar_read(0, 0, &mut b, &mut stall).unwrap(),
        Access::Done,
        "default policy ignores"
    );
    assert_eq!(b, [0xff; 4]);
    assert_eq!(DeviceOptions::default().policy, PausePolicy::Ignore);
}

/// Unpause onto a re-created VF that differs from the paused one in `how`:
/// refused with an identity mismatch naming the difference, before anything
/// is written to the new function, and the device stays paused.
fn refused_before_any_write(new: FakeVf, names: &str) {
    let f = fx();
    f.dev.pause().unwrap();
    recreate(&f.fake, VF1, new);
    f.fake.clear_calls();
    let e = f.dev.unpause(sysfs(VF1)).unwrap_err();
    assert!(matches!(e, Error::IdentityMismatch { .. }), "{names}: {e}");
    assert!(e.to_string().contains(names), "{names}: {e}");
    let writes: Vec<FakeCall> = f
        .fake
        .calls()
        .into_iter()
        .filter(|c| matches!(c, FakeCall::Write { .. } | FakeCall::SetIrqs { .. }))
        .collect();
    assert!(
        writes.is_empty(),
        "{names}: written before refusing: {writes:?}"
    );
    assert_eq!(f.dev.state(), DeviceState::Paused);
    assert_eq!(f.fake.open_handles(), 0);
    recreate(&f.fake, VF1, FakeVf::nvme());
    f.dev.unpause(sysfs(VF1)).unwrap();
}

#[test]
fn unpause_onto_another_revision_is_refused_before_anything_is_written() {
    refused_before_any_write(FakeVf::nvme().with_revision(2), "revision");
}

#[test]
fn unpause_onto_other_bar_sizes_is_refused_before_anything_is_written() {
    refused_before_any_write(FakeVf::nvme().with_bar0_size(0x2000), "BAR0");
}

#[test]
fn unpause_onto_another_msix_table_size_is_refused_before_anything_is_written() {
    refused_before_any_write(FakeVf::nvme().with_msix_vectors(4), "MSI-X");
}

#[test]
fn unpause_onto_another_capability_layout_is_refused_before_anything_is_written() {
    refused_before_any_write(FakeVf::nvme().with_capability(0x10, 0x60), "capabilit");
}

#[test]
fn wired_irq_vectors_must_fit_the_new_vf() {
    let f = fx();
    f.dev.pause().unwrap();
    // 9 MSI-X vectors wired while paused; the VF offers 8.
    let fds: Vec<EventFd> = (0..9).map(|_| EventFd::new(0).unwrap()).collect();
    f.dev.set_irqs(irq::MSIX, fds).unwrap();
    f.fake.clear_calls();
    let e = f.dev.unpause(sysfs(VF1)).unwrap_err();
    assert!(
        e.to_string().contains("9") && e.to_string().contains("8"),
        "{e}"
    );
    assert!(
        !f.fake
            .calls()
            .iter()
            .any(|c| matches!(c, FakeCall::Write { .. } | FakeCall::SetIrqs { .. })),
        "written before refusing"
    );
    assert_eq!(f.dev.state(), DeviceState::Paused);
    f.dev
        .set_irqs(irq::MSIX, vec![EventFd::new(0).unwrap()])
        .unwrap();
    f.dev.unpause(sysfs(VF1)).unwrap();
}

#[test]
fn bar_index_7_does_not_reach_config_space_and_bad_ranges_are_errors() {
    let f = fx();
    f.fake.clear_calls();
    let mut b = [0u8; 4];
    for bar in [6u32, 7, u32::MAX] {
        assert!(f.dev.bar_read(bar, 0, &mut b).is_err(), "BAR {bar} read");
        assert!(f.dev.bar_write(bar, 0, &b).is_err(), "BAR {bar} write");
    }
    assert!(
        f.fake.calls().is_empty(),
        "an out-of-range BAR reached the backend: {:?}",
        f.fake.calls()
    );
    assert!(f.dev.bar_read(0, u64::MAX - 1, &mut b).is_err());
    assert!(
        f.dev.bar_read(0, 0x4000 - 2, &mut b).is_err(),
        "past BAR0's end"
    );
    f.dev.pause().unwrap();
    assert!(f.dev.config_read(u64::MAX - 1, &mut b).is_err());
    assert!(f.dev.config_write(u64::MAX - 1, &b).is_err());
    assert!(f.dev.bar_read(7, 0, &mut b).is_err(), "paused BAR 7");
}

/// Paused config writes are kept as the shadow plus a dirty mask: many
/// writes to one register cost one write at unpause, not a replay of each.
#[test]
fn paused_config_writes_are_a_dirty_mask_not_a_log() {
    let f = fx();
    f.dev.pause().unwrap();
    for i in 0..10_000u32 {
        f.dev.config_write(0x3c, &[(i % 251) as u8]).unwrap();
    }
    f.fake.clear_calls();
    f.dev.unpause(sysfs(VF1)).unwrap();
    let writes: Vec<(u64, Vec<u8>)> = f
        .fake
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            FakeCall::Write {
                index,
                offset,
                data,
                ..
            } if index == region::CONFIG && (0x3c..0x40).contains(&offset) => Some((offset, data)),
            _ => None,
        })
        .collect();
    assert_eq!(writes, vec![(0x3c, vec![(9_999 % 251) as u8])]);
}

/// The areas handed to the VMM for guest mapping leave out the pages of
/// the MSI-X table and PBA: the VMM must trap those accesses to emulate them.
#[test]
fn mappable_areas_handed_to_the_vmm_leave_out_the_msix_table_and_pba() {
    let f = fixture(DeviceOptions::default().with_mmap_bars(true));
    let areas = f.dev.bar_mmaps();
    assert!(!areas.is_empty());
    for a in &areas {
        assert_eq!(a.index, 0);
        let (lo, hi) = (a.offset, a.offset + a.len as u64);
        for msix in [0x2000u64, 0x3000] {
            assert!(
                !(lo <= msix && msix < hi),
                "area {lo:#x}..{hi:#x} covers the MSI-X structure at {msix:#x}"
            );
        }
    }
    assert!(
        areas.iter().any(|a| a.offset == 0),
        "the registers before the table stay mappable"
    );
}

#[test]
fn failed_map_hook_at_unpause_removes_guest_mappings_before_munmap() {
    let f = fixture(DeviceOptions::default().with_mmap_bars(true));
    f.dev.pause().unwrap();
    f.hooks.fail_map.store(1, Ordering::SeqCst);
    assert!(f.dev.unpause(sysfs(VF1)).is_err());
    let log = f.hooks.log();
    assert_eq!(
        &log[log.len() - 2..],
        ["map nvme0 1", "unmap nvme0"],
        "a map_bars that failed half-way is undone: {log:?}"
    );
    assert_eq!(f.fake.open_handles(), 0);
}

/// The request-IRQ flow in the fake: a VF's device fd is closed, the remover
/// deletes the VF at once, and the kernel takes its group out of the
/// container (dropping every mapping, it was the only group) before our
/// leave runs. Another VF joining in that window must be told it is first
/// and map the guest RAM again, although our count still has the old group.
#[test]
fn a_group_the_kernel_detached_before_our_leave_does_not_hide_lost_mappings() {
    let f = fx();
    f.fake.add_vf(&addr(VF2), FakeVf::nvme());
    let other = PausableDevice::open(
        "nvme1",
        f.container.clone(),
        sysfs(VF2),
        DeviceOptions::default(),
        Arc::new(TrapAllBars),
    )
    .unwrap();
    other.pause().unwrap();
    let gate = f.fake.gate(FakeOp::Close);
    thread::scope(|s| {
        let pausing = s.spawn(|| f.dev.pause());
        gate.wait_entered();
        // VF1's device fd is closed, its group not yet left: remove VF1.
        f.fake.remove_vf(&addr(VF1)).unwrap();
        assert!(
            f.fake.dma_mappings().is_empty(),
            "type1 dropped the mappings"
        );
        other.unpause(sysfs(VF2)).unwrap();
        gate.release();
        pausing.join().unwrap().unwrap();
    });
    assert_eq!(
        f.fake.dma_mappings().get(&0),
        Some(&4096),
        "the VF that joined after the kernel's detach mapped the RAM again"
    );
}
