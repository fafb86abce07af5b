//! vfio-pause on real VFIO inside the lab (L1, Linux 6.12, emulated nvme and
//! igb PFs on pci-pf-stub, intel-iommu). Each test sets up the PF itself and
//! leaves its VFs destroyed.

mod common;

use std::fs;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use svff_lab::guest;
use vfio_pause::{
    irq, Container, DeviceOptions, DeviceState, Error, PausableDevice, Phase, Timings, TrapAllBars,
    VfSource,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const GUEST_RAM: usize = 16 << 20;

/// A PF on pci-pf-stub with `n` VFs, the ones at `bind` bound to vfio-pci.
/// Dropped, it destroys its VFs (`sriov_numvfs=0`): declare devices of its
/// VFs after it, so they are dropped (closed) first.
struct Pf {
    pf: String,
    vfs: Vec<String>,
}

impl Pf {
    fn new(pf: String, n: u32, bind: &[usize]) -> Pf {
        guest::modprobe("vfio-pci");
        guest::bind(&pf, "pci-pf-stub");
        guest::set_numvfs(&pf, 0);
        guest::set_numvfs(&pf, n);
        let vfs = guest::vfs_of(&pf);
        for &i in bind {
            guest::bind(&vfs[i], "vfio-pci");
        }
        Pf { pf, vfs }
    }

    fn nvme(n: u32, bind: &[usize]) -> Pf {
        Pf::new(guest::nvme_pf(), n, bind)
    }

    fn igb(n: u32, bind: &[usize]) -> Pf {
        Pf::new(guest::igb_pf(), n, bind)
    }
}

impl Drop for Pf {
    fn drop(&mut self) {
        guest::set_numvfs(&self.pf, 0);
    }
}

/// The usual setup: a [`Pf`], one VFIO container for the VM and 16 MiB of
/// guest RAM registered in it for DMA.
struct Lab {
    pf: Pf,
    container: Arc<Container>,
    _mem: GuestMemoryMmap,
}

impl Lab {
    fn new(pf: Pf) -> Lab {
        let container = Container::open_real().unwrap();
        let mem = guest_ram(&container);
        Lab {
            pf,
            container,
            _mem: mem,
        }
    }

    fn pf(&self) -> &str {
        &self.pf.pf
    }

    fn vf(&self, i: usize) -> &str {
        &self.pf.vfs[i]
    }

    /// Device "vf0" on VF `i`, opened by sysfs path.
    fn open(&self, i: usize, options: DeviceOptions) -> PausableDevice {
        open(&self.container, self.vf(i), options)
    }
}

/// `sriov_numvfs=0`, timed: returns only once the kernel destroyed every VF,
/// which blocks forever while any fd of a VF is still open.
fn numvfs_zero(pf: &str) -> Duration {
    let t = Instant::now();
    guest::write_attr(guest::dev_path(pf).join("sriov_numvfs"), "0");
    t.elapsed()
}

/// Bind a fresh (driverless) VF to the already loaded vfio-pci: just the two
/// sysfs writes, as the helper does (no modprobe process, slow under TCG).
fn bind_vfio(vf: &str) {
    guest::write_attr(guest::dev_path(vf).join("driver_override"), "vfio-pci");
    guest::write_attr("/sys/bus/pci/drivers_probe", vf);
    assert_eq!(
        guest::driver_of(vf).as_deref(),
        Some("vfio-pci"),
        "{vf} bound"
    );
}

/// Re-create `n` VFs and bind VF `which` to vfio-pci.
fn recreate(pf: &str, n: u32, which: usize) -> String {
    guest::write_attr(guest::dev_path(pf).join("sriov_numvfs"), &n.to_string());
    let vf = guest::vfs_of(pf)[which].clone();
    bind_vfio(&vf);
    vf
}

fn fd_links() -> Vec<String> {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.display().to_string())
        .collect()
}

fn fd_count() -> usize {
    fd_links().len()
}

fn vm_rss_kib() -> u64 {
    let s = fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// No fd and no mapping of any VFIO device or of `group` is held by this process.
fn assert_no_vf_resources(group: u32) {
    let group_dev = format!("/dev/vfio/{group}");
    for l in fd_links() {
        assert!(
            !l.contains("vfio-device") && l != group_dev,
            "fd still open after pause: {l}"
        );
    }
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    assert!(
        !maps.contains("vfio-device"),
        "a VFIO device mapping survived the pause:\n{maps}"
    );
}

fn guest_ram(container: &Container) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_RAM)]).unwrap();
    // SAFETY: `mem` is returned to the caller, who keeps it alive until the
    // container is dropped; the test never forms references into it.
    unsafe { container.register_guest_memory(&mem) }.unwrap();
    mem
}

fn open(container: &Arc<Container>, vf: &str, options: DeviceOptions) -> PausableDevice {
    PausableDevice::open(
        "vf0",
        container.clone(),
        VfSource::Sysfs(vf.parse().unwrap()),
        options,
        Arc::new(TrapAllBars),
    )
    .unwrap_or_else(|e| panic!("open {vf}: {}", chain(&e)))
}

fn chain(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        s += &format!(": {x}");
        src = x.source();
    }
    s
}

fn cfg32(dev: &PausableDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.config_read(off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn bar32(dev: &PausableDevice, bar: u32, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.bar_read(bar, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// Offset of capability `id` in config space, walking the list from 0x34.
fn find_cap(dev: &PausableDevice, id: u8) -> Option<u64> {
    let mut b = [0u8; 2];
    dev.config_read(0x34, &mut b[..1]).unwrap();
    let mut off = u64::from(b[0] & 0xfc);
    for _ in 0..48 {
        if off == 0 {
            return None;
        }
        dev.config_read(off, &mut b).unwrap();
        if b[0] == id {
            return Some(off);
        }
        off = u64::from(b[1] & 0xfc);
    }
    None
}

/// Kernel log lines that say a remover waited for a VFIO user.
fn vfio_request_lines() -> usize {
    let out = std::process::Command::new("dmesg").output().unwrap();
    assert!(out.status.success(), "dmesg failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("Relaying device request") || l.contains("still in use"))
        .count()
}

/// Non-blocking eventfds for `n` vectors.
fn eventfds(n: u32) -> Vec<EventFd> {
    (0..n)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect()
}

/// Fire each vector of `index` through VFIO (`SET_IRQS` DATA_BOOL|TRIGGER:
/// the kernel signals the eventfd wired to that vector) and check that its
/// eventfd, and only its, got exactly that interrupt.
fn assert_each_vector_arrives(dev: &PausableDevice, index: u32, fds: &[EventFd], when: &str) {
    for (v, _) in fds.iter().enumerate() {
        dev.trigger_irq(index, v as u32)
            .unwrap_or_else(|e| panic!("{when}: trigger vector {v}: {}", chain(&e)));
        for (w, fd) in fds.iter().enumerate() {
            let got = fd.read().ok();
            if w == v {
                assert_eq!(got, Some(1), "{when}: vector {v} reached its eventfd");
            } else {
                assert_eq!(got, None, "{when}: vector {v} also signalled vector {w}");
            }
        }
    }
}

fn sysfs(vf: &str) -> VfSource {
    VfSource::Sysfs(vf.parse().unwrap())
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn pause_releases_fds_so_numvfs_zero_does_not_block_20_cycles_without_leaks() {
    guest::require_lab();
    let lab = Lab::new(Pf::nvme(2, &[0]));
    let (pf, vf, container) = (lab.pf(), lab.vf(0), &lab.container);
    let dev = open(container, vf, DeviceOptions::default());
    let ids = cfg32(&dev, 0);
    assert_eq!(ids, 0x0010_1b36, "nvme VF ids through vfio config space");
    // NVMe VS register (BAR0 + 0x08). QEMU's nvme VF is offline until the PF
    // assigns it queues, and then answers MMIO reads with 0: what matters is
    // that the read reached the device (not the all-ones of a paused device).
    let vs = bar32(&dev, 0, 0x08);
    assert_ne!(vs, u32::MAX, "BAR0 read while attached reached the VF");
    let cap = bar32(&dev, 0, 0x00);
    let attached_fds = fd_count();
    let requests_before = vfio_request_lines();
    let mut rss_after_first = 0;
    for cycle in 0..20 {
        let p = dev
            .pause()
            .unwrap_or_else(|e| panic!("pause: {}", chain(&e)));
        assert_eq!(dev.state(), DeviceState::Paused);
        assert_no_vf_resources(guest::iommu_group(vf));
        // Paused: config from the shadow, BAR reads all-ones.
        assert_eq!(cfg32(&dev, 0), ids);
        assert_eq!(bar32(&dev, 0, 0x08), u32::MAX);
        let removal = numvfs_zero(pf);
        let vf2 = recreate(pf, 2, 0);
        assert_eq!(vf2, vf, "VF 0 comes back at the same BDF");
        let u = dev
            .unpause(sysfs(vf))
            .unwrap_or_else(|e| panic!("unpause: {}", chain(&e)));
        assert!(u.get(Phase::DmaRemap).is_some(), "container lost its DMA");
        assert_eq!(cfg32(&dev, 0), ids);
        assert_eq!(bar32(&dev, 0, 0x08), vs);
        assert_eq!(bar32(&dev, 0, 0x00), cap);
        assert_eq!(fd_count(), attached_fds, "fd count after cycle {cycle}");
        if cycle == 0 {
            rss_after_first = vm_rss_kib();
        }
        println!(
            "cycle {cycle}: sriov_numvfs=0 took {:.1} ms; pause [{p}]; unpause [{u}]",
            removal.as_secs_f64() * 1e3
        );
    }
    assert_eq!(
        vfio_request_lines(),
        requests_before,
        "the kernel had to ask for the VF back (a remover was blocked)"
    );
    let rss = vm_rss_kib();
    println!("VmRSS after cycle 1: {rss_after_first} KiB, after cycle 20: {rss} KiB");
    assert!(
        rss < rss_after_first + 4096,
        "VmRSS grew from {rss_after_first} KiB to {rss} KiB over 19 cycles"
    );
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn igb_vf_with_msix_and_bar_mmaps_survives_three_numvfs_cycles() {
    guest::require_lab();
    let lab = Lab::new(Pf::igb(2, &[0]));
    let (pf, vf, container) = (lab.pf(), lab.vf(0), &lab.container);
    let options = DeviceOptions::default().with_mmap_bars(true);
    let dev = open(container, vf, options);
    assert_eq!(cfg32(&dev, 0), 0x10ca_8086, "igb VF ids");
    let vectors = dev.irq_count(irq::MSIX).unwrap();
    println!(
        "igb VF: {vectors} MSI-X vectors, {} BAR mmaps",
        dev.bar_mmaps().len()
    );
    let fds = eventfds(vectors);
    let probes: Vec<EventFd> = fds.iter().map(|f| f.try_clone().unwrap()).collect();
    dev.set_irqs(irq::MSIX, fds).unwrap();
    assert_each_vector_arrives(&dev, irq::MSIX, &probes, "attached");
    // VTSTATUS (BAR0 + 0x08) of the VF.
    let status = bar32(&dev, 0, 0x08);
    assert_ne!(status, u32::MAX, "BAR0 read reached the VF");
    for cycle in 0..3 {
        let p = dev.pause().unwrap();
        assert_no_vf_resources(guest::iommu_group(vf));
        numvfs_zero(pf);
        recreate(pf, 2, 0);
        let u = dev
            .unpause(sysfs(vf))
            .unwrap_or_else(|e| panic!("unpause igb VF: {}", chain(&e)));
        assert_eq!(cfg32(&dev, 0), 0x10ca_8086);
        assert_ne!(bar32(&dev, 0, 0x08), u32::MAX);
        assert!(!dev.bar_mmaps().is_empty());
        assert_each_vector_arrives(&dev, irq::MSIX, &probes, &format!("after cycle {cycle}"));
        println!("igb cycle {cycle}: pause [{p}]; unpause [{u}]");
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn unpause_onto_other_identity_fails_naming_both_and_then_unpauses_onto_the_right_one() {
    guest::require_lab();
    let lab = Lab::new(Pf::nvme(1, &[0]));
    let igb = Pf::igb(1, &[0]);
    let (nvme_vf, igb_vf) = (lab.vf(0), igb.vfs[0].as_str());
    let dev = lab.open(0, DeviceOptions::default());
    dev.pause().unwrap();
    let fds_paused = fd_count();
    let e = dev.unpause(sysfs(igb_vf)).unwrap_err();
    let msg = e.to_string();
    println!("wrong identity: {msg}");
    assert!(matches!(e, Error::IdentityMismatch { .. }), "{msg}");
    assert!(
        msg.contains("1b36:0010") && msg.contains("8086:10ca"),
        "{msg}"
    );
    assert!(msg.contains(nvme_vf) && msg.contains(igb_vf), "{msg}");
    assert_eq!(dev.state(), DeviceState::Paused);
    assert_eq!(fd_count(), fds_paused, "the igb VF's fds were closed again");
    assert_no_vf_resources(guest::iommu_group(igb_vf));
    dev.unpause(sysfs(nvme_vf))
        .unwrap_or_else(|e| panic!("unpause onto the right VF: {}", chain(&e)));
    assert_eq!(cfg32(&dev, 0), 0x0010_1b36);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn unpause_when_the_vf_is_gone_fails_cleanly_and_stays_paused() {
    guest::require_lab();
    let lab = Lab::new(Pf::nvme(1, &[0]));
    let (pf, vf, container) = (lab.pf(), lab.vf(0), &lab.container);
    let dev = open(container, vf, DeviceOptions::default());
    dev.pause().unwrap();
    numvfs_zero(pf);
    let fds = fd_count();
    let e = dev.unpause(sysfs(vf)).unwrap_err();
    println!("gone: {}", chain(&e));
    assert!(matches!(e, Error::VfGone { .. }), "{}", chain(&e));
    assert_eq!(dev.state(), DeviceState::Paused);
    assert_eq!(fd_count(), fds);
    recreate(pf, 1, 0);
    dev.unpause(sysfs(vf)).unwrap();
    assert_eq!(cfg32(&dev, 0), 0x0010_1b36);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn pause_twice_and_unpause_twice_are_noops_on_real_vfio() {
    guest::require_lab();
    let lab = Lab::new(Pf::nvme(1, &[0]));
    let vf = lab.vf(0);
    let dev = lab.open(0, DeviceOptions::default());
    assert!(!dev.pause().unwrap().noop);
    let fds = fd_count();
    assert!(dev.pause().unwrap().noop);
    assert_eq!(fd_count(), fds);
    assert!(!dev.unpause(sysfs(vf)).unwrap().noop);
    let fds = fd_count();
    assert!(dev.unpause(sysfs(vf)).unwrap().noop);
    assert_eq!(fd_count(), fds);
    assert_eq!(dev.state(), DeviceState::Attached);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn unpause_through_a_passed_group_fd_and_bar_mmaps_released_at_pause() {
    guest::require_lab();
    let lab = Lab::new(Pf::nvme(1, &[0]));
    let (pf, vf, container) = (lab.pf(), lab.vf(0), &lab.container);
    let options = DeviceOptions::default().with_mmap_bars(true);
    let dev = open(container, vf, options);
    let maps = dev.bar_mmaps();
    assert!(!maps.is_empty(), "BAR0 of an nvme VF is mmap-able");
    // SAFETY: host_addr is a live MAP_SHARED mapping of BAR0 (>= 4 KiB); a
    // volatile 32-bit read of offset 8 (NVMe VS) is a valid MMIO access.
    let vs_mmio = unsafe { std::ptr::read_volatile((maps[0].host_addr + 8) as *const u32) };
    assert_eq!(vs_mmio, bar32(&dev, 0, 8), "mmap and read() agree");
    dev.pause().unwrap();
    assert!(dev.bar_mmaps().is_empty());
    assert_no_vf_resources(guest::iommu_group(vf));
    numvfs_zero(pf);
    let vf = recreate(pf, 1, 0);
    // What a privileged helper would hand over with SCM_RIGHTS.
    let group: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/vfio/{}", guest::iommu_group(&vf)))
        .unwrap()
        .into();
    let u = dev
        .unpause(VfSource::GroupFd {
            group,
            address: vf.parse().unwrap(),
        })
        .unwrap_or_else(|e| panic!("unpause via group fd: {}", chain(&e)));
    println!("unpause via passed group fd: {u}");
    assert_eq!(bar32(&dev, 0, 8), vs_mmio);
    let maps = dev.bar_mmaps();
    // SAFETY: as above, for the new mapping.
    let vs2 = unsafe { std::ptr::read_volatile((maps[0].host_addr + 8) as *const u32) };
    assert_eq!(vs2, vs_mmio);
    dev.pause().unwrap();
    assert_no_vf_resources(guest::iommu_group(&vf));
    // Back to an own open by sysfs path in the same container.
    dev.unpause(sysfs(&vf)).unwrap();
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn c_program_cycles_a_real_vf_through_the_c_abi() {
    guest::require_lab();
    let pf = Pf::nvme(2, &[0]);
    let (vf, pf) = (pf.vfs[0].clone(), pf);
    let exe = std::path::Path::new("/tmp/vfio-pause-cycle");
    common::build_c_cycle(exe, false);
    let out = std::process::Command::new(exe)
        .args(["real", &pf.pf, &vf, "2", "3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "cycle real failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("cycle: ok"));
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn msix_vectors_wired_before_pause_are_wired_again_after_unpause_onto_a_new_vf() {
    guest::require_lab();
    let lab = Lab::new(Pf::nvme(1, &[0]));
    let (pf, vf, container) = (lab.pf(), lab.vf(0), &lab.container);
    let dev = open(container, vf, DeviceOptions::default());
    let msix = find_cap(&dev, 0x11).expect("nvme VF has MSI-X");
    let ctrl = |dev: &PausableDevice| {
        let mut b = [0u8; 2];
        dev.config_read(msix + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    };
    assert_eq!(ctrl(&dev) & 0x8000, 0, "MSI-X off before wiring");
    let vectors = dev.irq_count(irq::MSIX).unwrap();
    println!("nvme VF offers {vectors} MSI-X vectors");
    assert!(vectors >= 1);
    let fds = eventfds(vectors.min(2));
    let probes: Vec<EventFd> = fds.iter().map(|f| f.try_clone().unwrap()).collect();
    dev.set_irqs(irq::MSIX, fds)
        .unwrap_or_else(|e| panic!("enable MSI-X: {}", chain(&e)));
    assert_each_vector_arrives(&dev, irq::MSIX, &probes, "wired");
    assert_ne!(
        ctrl(&dev) & 0x8000,
        0,
        "MSI-X enabled by VFIO_DEVICE_SET_IRQS"
    );
    dev.pause().unwrap();
    assert_ne!(ctrl(&dev) & 0x8000, 0, "the shadow keeps the guest's view");
    numvfs_zero(pf);
    recreate(pf, 1, 0);
    let u = dev.unpause(sysfs(vf)).unwrap();
    println!("unpause with MSI-X: {u}");
    assert_ne!(ctrl(&dev) & 0x8000, 0, "MSI-X enabled again on the new VF");
    assert_each_vector_arrives(&dev, irq::MSIX, &probes, "after unpause onto the new VF");
    dev.set_irqs(irq::MSIX, Vec::new()).unwrap();
    assert_eq!(ctrl(&dev) & 0x8000, 0, "MSI-X disabled");
}

/// The kernel's request IRQ tells the VMM that a remover waits; a VMM with
/// svff answers with a pause (not an unplug) and the remover goes on.
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn request_irq_from_a_blocked_remover_is_answered_by_pause_which_unblocks_it() {
    guest::require_lab();
    let lab = Lab::new(Pf::nvme(1, &[0]));
    let (pf, vf, container) = (lab.pf(), lab.vf(0), &lab.container);
    let dev = open(container, vf, DeviceOptions::default());
    let req = EventFd::new(0).unwrap();
    dev.set_request_irq(Some(req.try_clone().unwrap())).unwrap();
    let pf2 = pf.to_string();
    let remover = std::thread::spawn(move || numvfs_zero(&pf2));
    // Blocks until vfio-pci relays the remover's request to us.
    let n = req.read().unwrap();
    assert!(n >= 1);
    assert!(dev.request_is_unplug(), "attached: a request means unplug");
    dev.pause().unwrap();
    assert!(!dev.request_is_unplug(), "paused: requests are not unplugs");
    let took = remover.join().unwrap();
    println!(
        "remover finished {:.1} ms after it started",
        took.as_secs_f64() * 1e3
    );
    assert_eq!(dev.state(), DeviceState::Paused);
    assert!(guest::vfs_of(pf).is_empty(), "the VF was removed");
    recreate(pf, 1, 0);
    dev.unpause(sysfs(vf)).unwrap();
    assert!(dev.request_is_unplug());
}

/// The request-IRQ flow, repeated: the remover is blocked on the open VF, the
/// pause closes the device fd, and the remover deletes the VF (and its
/// `iommu_group` link) at once, possibly before the group leaves the
/// container. The pause must still succeed, without a panic, and leave no
/// group fd behind.
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn vf_removed_right_after_its_device_fd_closes_leaves_no_group_fd_and_no_panic() {
    guest::require_lab();
    let lab = Lab::new(Pf::nvme(1, &[0]));
    let (pf, vf, container) = (lab.pf(), lab.vf(0), &lab.container);
    let dev = open(container, vf, DeviceOptions::default());
    for round in 0..5 {
        let group = guest::iommu_group(vf);
        let req = EventFd::new(0).unwrap();
        dev.set_request_irq(Some(req.try_clone().unwrap())).unwrap();
        let pf2 = pf.to_string();
        let remover = std::thread::spawn(move || numvfs_zero(&pf2));
        assert!(req.read().unwrap() >= 1, "request IRQ relayed");
        dev.pause()
            .unwrap_or_else(|e| panic!("round {round}: pause: {}", chain(&e)));
        remover.join().unwrap();
        assert_no_vf_resources(group);
        assert!(!container.dma_mapped(), "round {round}: container empty");
        recreate(pf, 1, 0);
        dev.unpause(sysfs(vf))
            .unwrap_or_else(|e| panic!("round {round}: unpause: {}", chain(&e)));
        assert_eq!(cfg32(&dev, 0), 0x0010_1b36);
    }
}

/// `KVM_DEV_VFIO_FILE_ADD` of `group` to the KVM VFIO device `dev` (`add`),
/// or `_DEL`; the errno on failure.
fn kvm_vfio_file(dev: &kvm_ioctls::DeviceFd, group: &fs::File, add: bool) -> Result<(), i32> {
    use std::os::fd::AsRawFd;
    let fd = group.as_raw_fd();
    let attr = kvm_bindings::kvm_device_attr {
        flags: 0,
        group: kvm_bindings::KVM_DEV_VFIO_FILE,
        attr: u64::from(if add {
            kvm_bindings::KVM_DEV_VFIO_FILE_ADD
        } else {
            kvm_bindings::KVM_DEV_VFIO_FILE_DEL
        }),
        addr: &fd as *const i32 as u64,
    };
    dev.set_device_attr(&attr).map_err(|e| e.errno())
}

/// Groups from passed fds are registered with the VM's KVM VFIO device, as
/// groups the backend opens itself, and unregistered when the VF is paused.
/// Seen from a second fd of the same KVM device and a second fd of the same
/// group file: adding it again answers EEXIST while it is registered,
/// deleting it answers ENOENT once it is not.
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn passed_group_fds_are_registered_with_the_kvm_vfio_device() {
    use std::os::fd::{AsRawFd, FromRawFd};
    guest::require_lab();
    guest::modprobe("kvm-amd");
    let pf = Pf::nvme(1, &[0]);
    let vf = pf.vfs[0].as_str();
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm in L1");
    let vm = kvm.create_vm().unwrap();
    let mut cd = kvm_bindings::kvm_create_device {
        type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    let dev = vm.create_device(&mut cd).unwrap();
    // SAFETY: F_DUPFD_CLOEXEC of an open fd only creates a new fd.
    let dup = unsafe { libc::fcntl(dev.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    assert!(dup >= 0);
    // SAFETY: `dup` is a new fd of the KVM device that nothing else owns.
    let probe = unsafe { kvm_ioctls::DeviceFd::from_raw_fd(dup) };
    let container = Container::new(Box::new(
        vfio_pause::VfioIoctlsBackend::with_kvm_vfio_device(dev).unwrap(),
    ));
    let _mem = guest_ram(&container);
    let group = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/vfio/{}", guest::iommu_group(vf)))
        .unwrap();
    let same_file = group.try_clone().unwrap();
    let d = PausableDevice::open(
        "vf0",
        container.clone(),
        VfSource::GroupFd {
            group: group.into(),
            address: vf.parse().unwrap(),
        },
        DeviceOptions::default(),
        Arc::new(TrapAllBars),
    )
    .unwrap_or_else(|e| panic!("open from group fd: {}", chain(&e)));
    assert_eq!(
        kvm_vfio_file(&probe, &same_file, true),
        Err(libc::EEXIST),
        "passed group registered with the KVM VFIO device"
    );
    d.pause().unwrap();
    assert_eq!(
        kvm_vfio_file(&probe, &same_file, false),
        Err(libc::ENOENT),
        "group unregistered at pause"
    );
    drop(same_file);
    drop(d);
    drop(container);
    drop(pf);
}

/// The kernel's region capabilities are read (MSI-X mappable on the BAR with
/// the table) and the BAR areas handed to the VMM for guest mapping leave
/// out the MSI-X table and PBA pages, before and after a numvfs cycle.
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn bar_mmaps_leave_out_the_msix_table_and_pba_pages() {
    guest::require_lab();
    let lab = Lab::new(Pf::nvme(1, &[0]));
    let (pf, vf, container) = (lab.pf(), lab.vf(0), &lab.container);
    let dev = open(container, vf, DeviceOptions::default().with_mmap_bars(true));
    let msix = find_cap(&dev, 0x11).expect("nvme VF has MSI-X");
    let vectors = u64::from((cfg32(&dev, msix) >> 16) & 0x7ff) + 1;
    let table = cfg32(&dev, msix + 4);
    let pba = cfg32(&dev, msix + 8);
    let holes = [
        (table & 7, u64::from(table & !7), 16 * vectors),
        (pba & 7, u64::from(pba & !7), 8 * vectors.div_ceil(64)),
    ];
    println!("MSI-X: {vectors} vectors, table {table:#x}, PBA {pba:#x}");
    let info = dev.region_info(holes[0].0).unwrap();
    assert!(info.mmap, "BAR{} is mmap-able", holes[0].0);
    assert!(
        info.msix_mappable,
        "kernel reports MSI-X mappable: {info:?}"
    );
    for round in 0..2 {
        let maps = dev.bar_mmaps();
        println!("round {round}: areas {maps:?}");
        assert!(!maps.is_empty());
        for m in &maps {
            for &(bir, lo, len) in &holes {
                let (a, b) = (m.offset, m.offset + m.len as u64);
                assert!(
                    m.index != bir
                        || b <= lo / 4096 * 4096
                        || (lo + len).div_ceil(4096) * 4096 <= a,
                    "area {a:#x}..{b:#x} of BAR{} covers MSI-X {lo:#x}+{len:#x}",
                    m.index
                );
            }
        }
        let first = maps.iter().find(|m| m.offset == 0).expect("area at 0");
        // SAFETY: a live MAP_SHARED mapping of BAR0 from offset 0 (>= 4 KiB);
        // a volatile 32-bit read of offset 8 (NVMe VS) is a valid MMIO access.
        let vs = unsafe { std::ptr::read_volatile((first.host_addr + 8) as *const u32) };
        assert_eq!(vs, bar32(&dev, 0, 8), "mmap and read() agree");
        dev.pause().unwrap();
        numvfs_zero(pf);
        recreate(pf, 1, 0);
        dev.unpause(sysfs(vf)).unwrap();
    }
}

/// The passed fd is the one the device is opened from: while it is held, an
/// own open of `/dev/vfio/<group>` would fail (one open file per group), and
/// after the unpause the kernel reports that very file in the container.
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn unpause_through_a_passed_group_fd_opens_from_it() {
    use vfio_bindings::bindings::vfio::{vfio_group_status, VFIO_GROUP_FLAGS_CONTAINER_SET};
    guest::require_lab();
    let lab = Lab::new(Pf::nvme(1, &[0]));
    let (pf, vf) = (lab.pf(), lab.vf(0));
    let dev = lab.open(0, DeviceOptions::default());
    dev.pause().unwrap();
    numvfs_zero(pf);
    recreate(pf, 1, 0);
    let path = format!("/dev/vfio/{}", guest::iommu_group(vf));
    let group = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let same_file = group.try_clone().unwrap();
    let status = |f: &fs::File| {
        let mut st = vfio_group_status {
            argsz: std::mem::size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // VFIO_GROUP_GET_STATUS = _IO(';', 100 + 3)
        let req = (b';' as libc::c_ulong) << 8 | 103;
        // SAFETY: `f` is an open VFIO group file and `st` a correctly sized
        // vfio_group_status the kernel fills in.
        let ret = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(f), req, &mut st) };
        assert_eq!(
            ret,
            0,
            "VFIO_GROUP_GET_STATUS: {}",
            std::io::Error::last_os_error()
        );
        st.flags
    };
    assert_eq!(status(&same_file) & VFIO_GROUP_FLAGS_CONTAINER_SET, 0);
    dev.unpause(VfSource::GroupFd {
        group: group.into(),
        address: vf.parse().unwrap(),
    })
    .unwrap_or_else(|e| panic!("unpause via group fd: {}", chain(&e)));
    assert_ne!(
        status(&same_file) & VFIO_GROUP_FLAGS_CONTAINER_SET,
        0,
        "the passed group file is the one in the container"
    );
    let own = fs::OpenOptions::new().read(true).write(true).open(&path);
    assert_eq!(
        own.map(drop).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EBUSY)),
        "no second open of the group is possible, so none was made"
    );
    assert_eq!(cfg32(&dev, 0), 0x0010_1b36);
    dev.pause().unwrap();
    assert_eq!(
        status(&same_file) & VFIO_GROUP_FLAGS_CONTAINER_SET,
        0,
        "left the container at pause"
    );
}

/// The window that made vfio-ioctls' `VfioDevice` drop panic, made
/// deterministic with the backend's own steps: the device fd is closed, the
/// VF is removed (nothing blocks the remover now), and only then does the
/// group leave. The kernel has taken the group out of the container itself;
/// the leave succeeds and no fd of the group stays open.
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn group_leaves_cleanly_when_its_vf_was_removed_between_device_close_and_leave() {
    use vfio_pause::VfioBackend;
    guest::require_lab();
    let pf = Pf::nvme(1, &[0]);
    let vf = pf.vfs[0].clone();
    let group = guest::iommu_group(&vf);
    let backend = vfio_pause::VfioIoctlsBackend::new().unwrap();
    let joined = backend
        .join_group(sysfs(&vf))
        .unwrap_or_else(|e| panic!("join: {}", chain(&e)));
    assert!(joined.first, "an empty container: first group");
    let dev = backend.open_device(joined.group).unwrap();
    backend.close_device(dev).unwrap();
    numvfs_zero(&pf.pf);
    assert!(guest::vfs_of(&pf.pf).is_empty(), "the VF was removed");
    backend
        .leave_group(joined.group)
        .unwrap_or_else(|e| panic!("leave after removal: {}", chain(&e)));
    assert_no_vf_resources(group);
}

/// A VMM whose first VF came as a passed group fd, then opens another VF of
/// the same VM by sysfs path: both end up in one container with DMA mapped.
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn passed_group_fd_first_then_sysfs_open_share_one_container() {
    guest::require_lab();
    let lab = Lab::new(Pf::nvme(2, &[0, 1]));
    let (vf0, vf1, container) = (lab.vf(0), lab.vf(1), &lab.container);
    let group: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/vfio/{}", guest::iommu_group(vf0)))
        .unwrap()
        .into();
    let a = PausableDevice::open(
        "a",
        container.clone(),
        VfSource::GroupFd {
            group,
            address: vf0.parse().unwrap(),
        },
        DeviceOptions::default(),
        Arc::new(TrapAllBars),
    )
    .unwrap_or_else(|e| panic!("open from group fd: {}", chain(&e)));
    let b = open(container, vf1, DeviceOptions::default());
    assert_eq!(cfg32(&a, 0), 0x0010_1b36);
    assert_eq!(cfg32(&b, 0), 0x0010_1b36);
    a.pause().unwrap();
    assert!(container.dma_mapped(), "b keeps the container");
    a.unpause(sysfs(vf0))
        .unwrap_or_else(|e| panic!("unpause by sysfs: {}", chain(&e)));
    b.pause().unwrap();
    a.pause().unwrap();
    assert!(!container.dma_mapped());
    assert_no_vf_resources(guest::iommu_group(vf0));
    assert_no_vf_resources(guest::iommu_group(vf1));
}

fn summarize(name: &str, runs: &[Timings]) {
    let mut line = format!("{name} ({} runs):", runs.len());
    let total: Vec<f64> = runs.iter().map(|t| t.total.as_secs_f64() * 1e3).collect();
    line += &format!(" total {}", stats(&total));
    for p in Phase::ALL {
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|t| t.get(p))
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        if !v.is_empty() {
            line += &format!(", {} {}", p.name(), stats(&v));
        }
    }
    println!("{line}");
}

fn stats(v: &[f64]) -> String {
    let n = v.len() as f64;
    let avg = v.iter().sum::<f64>() / n;
    let sd = (v.iter().map(|x| (x - avg).powi(2)).sum::<f64>() / n).sqrt();
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    format!("avg {avg:.3} ms (sd {sd:.3}, min {min:.3})")
}

/// Lab benchmark: prints per-phase times of pause/unpause on a real VF (no
/// assertion on time), with and without a sriov_numvfs cycle in between.
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_bench_prints_per_phase_times_on_real_vfs() {
    guest::require_lab();
    let runs: usize = std::env::var("VFIO_PAUSE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let lab = Lab::new(Pf::nvme(1, &[0]));
    let (pf, vf, container) = (lab.pf(), lab.vf(0), &lab.container);
    let dev = open(container, vf, DeviceOptions::default());
    let (mut pauses, mut unpauses) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        pauses.push(dev.pause().unwrap());
        unpauses.push(dev.unpause(sysfs(vf)).unwrap());
    }
    println!("BENCH real nvme VF {vf}, 16 MiB guest RAM mapped, same VF:");
    summarize("  pause", &pauses);
    summarize("  unpause", &unpauses);
    let (mut pauses, mut unpauses, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        pauses.push(dev.pause().unwrap());
        let t = Instant::now();
        numvfs_zero(pf);
        recreate(pf, 1, 0);
        counts.push(t.elapsed().as_secs_f64() * 1e3);
        unpauses.push(dev.unpause(sysfs(vf)).unwrap());
    }
    println!("BENCH with sriov_numvfs 1 -> 0 -> 1 + bind between pause and unpause:");
    summarize("  pause", &pauses);
    println!("  numvfs cycle + bind: {}", stats(&counts));
    summarize("  unpause", &unpauses);
}

/// Lab benchmark of a whole reconf in pause mode for N VFs of one VM (one
/// shared container with 16 MiB of guest RAM): paused in parallel (parallel
/// FLRs), `sriov_numvfs` N -> 0 -> N, bind, unpaused in parallel. Prints the
/// breakdown; no assertion on time.
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_bench_parallel_pause_reconf_of_n_vfs() {
    guest::require_lab();
    let runs: usize = std::env::var("VFIO_PAUSE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let pf = guest::nvme_pf();
    for n in [1u32, 4, 10] {
        let all: Vec<usize> = (0..n as usize).collect();
        let lab = Lab::new(Pf::new(pf.clone(), n, &all));
        let vfs = lab.pf.vfs.clone();
        let devs: Vec<PausableDevice> = (0..vfs.len())
            .map(|i| lab.open(i, DeviceOptions::default()))
            .collect();
        let (mut pause_ms, mut count_ms, mut bind_ms, mut unpause_ms, mut total_ms) =
            (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let t0 = Instant::now();
            std::thread::scope(|s| {
                let hs: Vec<_> = devs.iter().map(|d| s.spawn(|| d.pause())).collect();
                for h in hs {
                    h.join().unwrap().unwrap();
                }
            });
            let t1 = Instant::now();
            numvfs_zero(&pf);
            guest::write_attr(guest::dev_path(&pf).join("sriov_numvfs"), &n.to_string());
            let t2 = Instant::now();
            for vf in guest::vfs_of(&pf) {
                bind_vfio(&vf);
            }
            let t3 = Instant::now();
            std::thread::scope(|s| {
                let hs: Vec<_> = devs
                    .iter()
                    .zip(&vfs)
                    .map(|(d, vf)| s.spawn(move || d.unpause(sysfs(vf))))
                    .collect();
                for h in hs {
                    h.join().unwrap().unwrap();
                }
            });
            let t4 = Instant::now();
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            pause_ms.push(ms(t0, t1));
            count_ms.push(ms(t1, t2));
            bind_ms.push(ms(t2, t3));
            unpause_ms.push(ms(t3, t4));
            total_ms.push(ms(t0, t4));
        }
        println!(
            "BENCH pause-mode reconf, {n} nvme VFs ({runs} runs): total {}; pause(parallel) {}; \
             sriov_numvfs {n}->0->{n} {}; bind {}; unpause(parallel) {}",
            stats(&total_ms),
            stats(&pause_ms),
            stats(&count_ms),
            stats(&bind_ms),
            stats(&unpause_ms)
        );
        drop(devs);
        drop(lab);
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn vfs_sharing_a_container_pause_and_unpause_in_parallel_and_dma_is_remapped_once() {
    guest::require_lab();
    let lab = Lab::new(Pf::nvme(2, &[0, 1]));
    let (pf, vf0, vf1, container) = (lab.pf(), lab.vf(0), lab.vf(1), &lab.container);
    let devs = [
        open(container, vf0, DeviceOptions::default()),
        open(container, vf1, DeviceOptions::default()),
    ];
    let vfs = [vf0, vf1];
    std::thread::scope(|s| {
        for d in &devs {
            s.spawn(move || d.pause().unwrap());
        }
    });
    assert!(!container.dma_mapped());
    assert_no_vf_resources(guest::iommu_group(vf0));
    assert_no_vf_resources(guest::iommu_group(vf1));
    numvfs_zero(pf);
    recreate(pf, 2, 0);
    bind_vfio(vf1);
    let timings: Vec<Timings> = std::thread::scope(|s| {
        let hs: Vec<_> = devs
            .iter()
            .zip(&vfs)
            .map(|(d, vf)| s.spawn(move || d.unpause(sysfs(vf)).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for t in &timings {
        println!("parallel unpause: {t}");
    }
    let remapped = timings
        .iter()
        .filter(|t| t.get(Phase::DmaRemap).is_some())
        .count();
    assert_eq!(
        remapped, 1,
        "the first VF back maps the RAM, the second finds it mapped"
    );
    for d in &devs {
        assert_eq!(cfg32(d, 0), 0x0010_1b36);
        assert_eq!(d.state(), DeviceState::Attached);
    }
}
