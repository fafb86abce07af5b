//! Lab test of the BAR register reader on the real kernel in L1 (see the
//! svff-lab crate): the emulated nvme PF and its VFs are read through their
//! sysfs `resource0` files with the crate's generic reader, and the values
//! checked against the NVMe specification's controller registers. Leaves the
//! PF on pci-pf-stub with 0 VFs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use svff_pf_helper::{
    DriverName, Error, PciAddress, RealSysfs, SriovManager, VfsSetOptions, SVFF_REGS_BAR,
};

/// NVMe controller registers (NVMe base specification, "Controller Registers"):
/// CAP (64 bits) at 0x0, VS at 0x8.
const NVME_CAP: u64 = 0x0;
const NVME_VS: u64 = 0x8;
/// VS of QEMU's emulated controller: NVMe 1.4 (major 31:16, minor 15:8, tertiary 7:0).
const QEMU_NVME_VS: u32 = 0x0001_0400;

fn lab_env(name: &str) -> String {
    assert_eq!(
        std::env::var("SVFF_LAB").as_deref(),
        Ok("1"),
        "lab test: run it inside L1 with `cargo run -p svff-lab -- test`"
    );
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set in the lab"))
}

fn dev(bdf: PciAddress) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(bdf.to_string())
}

fn modprobe(module: &str) {
    let status = Command::new("modprobe")
        .arg(module)
        .status()
        .expect("run modprobe");
    assert!(status.success(), "modprobe {module} failed");
}

/// Whether the function decodes memory accesses (PCI_COMMAND bit 1), read from
/// its sysfs `config` file.
fn memory_decoding(bdf: PciAddress) -> bool {
    let config = fs::read(dev(bdf).join("config")).expect("read config space");
    u16::from_le_bytes([config[4], config[5]]) & 0x2 != 0
}

/// BAR `bar`'s size from the kernel's `resource` table (end - start + 1).
fn resource_size(bdf: PciAddress, bar: usize) -> u64 {
    let table = fs::read_to_string(dev(bdf).join("resource")).unwrap();
    let f: Vec<u64> = table
        .lines()
        .nth(bar)
        .unwrap()
        .split_whitespace()
        .map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).unwrap())
        .collect();
    f[1] - f[0] + 1
}

/// Removes the VFs when the test ends, even when it fails.
struct ZeroVfs<'a>(&'a SriovManager<RealSysfs>, PciAddress);

impl Drop for ZeroVfs<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.set_vf_count(self.1, 0, &VfsSetOptions::default()) {
            eprintln!(
                "cleanup: removing the VFs of {} failed: {}",
                self.1,
                e.chain()
            );
        }
    }
}

/// The NVMe registers every controller (PF or VF) must show.
fn assert_nvme_registers(mgr: &SriovManager<RealSysfs>, bdf: PciAddress) {
    let bar = mgr.open_bar(bdf, 0).expect("open BAR0");
    assert_eq!(bar.size(), resource_size(bdf, 0), "BAR0 size of {bdf}");
    assert!(
        bar.size() >= 0x1000,
        "an NVMe BAR0 holds at least the registers and doorbells"
    );
    let vs = bar.read_u32(NVME_VS).unwrap();
    eprintln!("{bdf}: NVMe VS {vs:#010x}");
    assert_eq!(vs, QEMU_NVME_VS, "VS of {bdf}");
    let cap_lo = bar.read_u32(NVME_CAP).unwrap();
    let cap_hi = bar.read_u32(NVME_CAP + 4).unwrap();
    let cap = u64::from(cap_hi) << 32 | u64::from(cap_lo);
    eprintln!("{bdf}: NVMe CAP {cap:#018x}");
    assert_ne!(cap_lo, u32::MAX, "{bdf} answers (not all ones)");
    // CAP.MQES (15:0) is 0-based and must allow at least 2 entries; CAP.CSS
    // (44:37) bit 0 is the NVM command set, which every NVMe controller has.
    assert!(cap & 0xffff >= 1, "CAP.MQES of {bdf}");
    assert_eq!(cap >> 37 & 1, 1, "CAP.CSS NVM bit of {bdf}");
    // Reading twice gives the same (read-only) value.
    assert_eq!(bar.read_u32(NVME_VS).unwrap(), vs);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn bar_reader_maps_nvme_registers_of_the_pf_and_its_vfs() {
    modprobe("pci-pf-stub");
    let pf = PciAddress::parse(&lab_env("SVFF_LAB_NVME_PF")).unwrap();
    let mgr = SriovManager::new(RealSysfs::new());
    // pci-pf-stub claims no BAR, so the sysfs mmap is allowed even with
    // CONFIG_IO_STRICT_DEVMEM; VFs stay unbound (autoprobe off).
    let opts = VfsSetOptions {
        pf_driver: Some(DriverName::parse("pci-pf-stub").unwrap()),
        ..Default::default()
    };
    mgr.set_vf_count(pf, 0, &opts).unwrap();
    let _cleanup = ZeroVfs(&mgr, pf);
    mgr.set_vf_count(pf, 2, &opts).unwrap();
    assert!(
        memory_decoding(pf),
        "precondition: {pf} has memory decoding off (PCI_COMMAND)"
    );
    assert_nvme_registers(&mgr, pf);
    let vfs = mgr.vfs(pf).unwrap();
    assert_eq!(vfs.len(), 2);
    for (_, vf) in vfs {
        assert_eq!(mgr.driver_of(vf).unwrap(), None, "{vf} stays unbound");
        // A new VF is an NVMe secondary controller in the Offline state until
        // the PF assigns it resources (Virtualization Management); QEMU then
        // answers every register but CSTS with 0 (not all ones: the access
        // reached the VF's BAR).
        let bar = mgr.open_bar(vf, 0).expect("open the VF's BAR0");
        assert_eq!(bar.size(), resource_size(vf, 0), "BAR0 size of {vf}");
        assert_eq!(bar.read_u32(NVME_VS).unwrap(), 0, "VS of offline {vf}");
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn bar_reader_refuses_missing_bars_and_offsets_outside_them_on_the_real_kernel() {
    modprobe("pci-pf-stub");
    let pf = PciAddress::parse(&lab_env("SVFF_LAB_NVME_PF")).unwrap();
    let mgr = SriovManager::new(RealSysfs::new());
    mgr.ensure_pf_driver(pf, &DriverName::parse("pci-pf-stub").unwrap())
        .unwrap();
    let bar = mgr.open_bar(pf, 0).unwrap();
    let last = bar.size() - 4;
    bar.read_u32(last).expect("the last register of BAR0 reads");
    let err = bar.read_u32(bar.size()).unwrap_err();
    assert!(matches!(err, Error::Bar { bar: 0, .. }), "{err}");
    assert!(err.to_string().contains(&format!("BAR 0 of {pf}")), "{err}");
    // BAR0 is 64-bit: BAR1 is its upper half and has no resource.
    let err = mgr.open_bar(pf, 1).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("BAR 1 of {pf}: not implemented")),
        "{err}"
    );
    assert!(!dev(pf).join("resource1").exists());
    // The svff path on a device without the svff window fails cleanly, naming the function.
    let err = mgr.read_svff_identity(pf).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("BAR {SVFF_REGS_BAR} of {pf}")),
        "{err}"
    );
    // And `status` reports no fpga entry for it.
    assert_eq!(mgr.pf_status(pf).unwrap().fpga, None);
}

/// Puts the PF back on pci-pf-stub when the test ends, even when it fails.
struct BackToStub<'a>(&'a SriovManager<RealSysfs>, PciAddress);

impl Drop for BackToStub<'_> {
    fn drop(&mut self) {
        let stub = DriverName::parse("pci-pf-stub").unwrap();
        if let Err(e) = self.0.ensure_pf_driver(self.1, &stub) {
            eprintln!(
                "cleanup: rebinding {} to pci-pf-stub failed: {}",
                self.1,
                e.chain()
            );
        }
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn bar_claimed_by_a_driver_gives_a_clear_error_not_a_crash() {
    modprobe("pci-pf-stub");
    modprobe("nvme");
    let pf = PciAddress::parse(&lab_env("SVFF_LAB_NVME_PF")).unwrap();
    let mgr = SriovManager::new(RealSysfs::new());
    let _restore = BackToStub(&mgr, pf);
    // The nvme driver requests BAR0 (pci_request_mem_regions) in its probe.
    mgr.ensure_pf_driver(pf, &DriverName::parse("nvme").unwrap())
        .unwrap();
    let bar = mgr
        .open_bar(pf, 0)
        .expect("opening the resource file still works");
    let err = bar.read_u32(NVME_VS).unwrap_err();
    let text = err.chain();
    eprintln!("{text}");
    match &err {
        Error::BarAccess { op, source, .. } => {
            assert_eq!(*op, "map");
            assert_eq!(source.raw_os_error(), Some(libc::EINVAL), "{text}");
        }
        other => panic!("expected a map error, got {other:?}"),
    }
    assert!(
        text.starts_with(&format!("cannot map BAR 0 of {pf}")),
        "{text}"
    );
    assert!(text.contains("a driver has claimed the BAR"), "{text}");
}

/// Offset of the SR-IOV control register (extended capability 0x0010, + 8)
/// in `pf`'s config space.
fn sriov_control_offset(pf: PciAddress) -> u64 {
    let cfg = fs::read(dev(pf).join("config")).unwrap();
    let mut at = 0x100usize;
    loop {
        let h = u32::from_le_bytes(cfg[at..at + 4].try_into().unwrap());
        assert!(h != 0 && at >= 0x100, "{pf} has no SR-IOV capability");
        if h & 0xffff == 0x0010 {
            return at as u64 + 8;
        }
        at = (h >> 20) as usize & 0xffc;
    }
}

fn read_config16(bdf: PciAddress, at: u64) -> u16 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 2];
    fs::File::open(dev(bdf).join("config"))
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u16::from_le_bytes(b)
}

fn write_config16(bdf: PciAddress, at: u64, value: u16) {
    use std::os::unix::fs::FileExt;
    fs::OpenOptions::new()
        .write(true)
        .open(dev(bdf).join("config"))
        .unwrap()
        .write_all_at(&value.to_le_bytes(), at)
        .unwrap();
}

/// Writes a config register back to its value when dropped.
struct RestoreConfig(PciAddress, u64, u16);

impl Drop for RestoreConfig {
    fn drop(&mut self) {
        write_config16(self.0, self.1, self.2);
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn bars_of_functions_with_memory_decoding_off_are_not_read() {
    modprobe("pci-pf-stub");
    let pf = PciAddress::parse(&lab_env("SVFF_LAB_NVME_PF")).unwrap();
    let mgr = SriovManager::new(RealSysfs::new());
    let opts = VfsSetOptions {
        pf_driver: Some(DriverName::parse("pci-pf-stub").unwrap()),
        ..Default::default()
    };
    mgr.set_vf_count(pf, 0, &opts).unwrap();
    let _cleanup = ZeroVfs(&mgr, pf);
    mgr.set_vf_count(pf, 1, &opts).unwrap();
    let (_, vf) = mgr.vfs(pf).unwrap()[0];

    // The PF: PCI_COMMAND's memory space bit cleared through sysfs `config`.
    let command = read_config16(pf, 4);
    assert_ne!(command & 0x2, 0, "precondition: {pf} decodes memory");
    let restore = RestoreConfig(pf, 4, command);
    write_config16(pf, 4, command & !0x2);
    assert!(!memory_decoding(pf));
    let bar = mgr.open_bar(pf, 0).unwrap();
    let err = bar.read_u32(NVME_VS).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("BAR 0 of {pf}: not read: memory decoding off")),
        "{err}"
    );
    drop(restore);
    assert_eq!(bar.read_u32(NVME_VS).unwrap(), QEMU_NVME_VS);

    // The VF: the VF memory space enable bit of the PF's SR-IOV control.
    let ctrl_at = sriov_control_offset(pf);
    let ctrl = read_config16(pf, ctrl_at);
    assert_eq!(ctrl & 0x9, 0x9, "precondition: VF Enable and VF MSE set");
    let restore = RestoreConfig(pf, ctrl_at, ctrl);
    write_config16(pf, ctrl_at, ctrl & !0x8);
    let bar = mgr.open_bar(vf, 0).unwrap();
    let err = bar.read_u32(NVME_VS).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "BAR 0 of {vf}: not read: memory decoding off (VF memory space enable"
        )),
        "{err}"
    );
    drop(restore);
    assert_eq!(bar.read_u32(NVME_VS).unwrap(), 0, "VS of the offline {vf}");
}
