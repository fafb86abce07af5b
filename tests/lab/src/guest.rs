//! Helpers for lab tests: code that runs *inside* L1 (as root, on the real kernel).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// True when running inside the lab's L1.
pub fn in_lab() -> bool {
    std::env::var_os("SVFF_LAB").is_some_and(|v| v == "1")
}

/// Panics with a clear message unless running inside the lab. Lab tests call this first.
pub fn require_lab() {
    assert!(
        in_lab(),
        "this test needs the svff lab: run it with `cargo run -p svff-lab -- test` (or `make test`), not directly"
    );
}

fn pf(var: &str) -> String {
    require_lab();
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set: the lab did not find that PF in L1"))
}

/// BDF of the emulated igb PF (8086:10c9).
pub fn igb_pf() -> String {
    pf("SVFF_LAB_IGB_PF")
}

/// BDF of the emulated nvme PF (1b36:0010).
pub fn nvme_pf() -> String {
    pf("SVFF_LAB_NVME_PF")
}

/// BDF of QEMU's `edu` device (1234:11e8) in L1, found by its IDs: a plain PCI function at
/// slot 0x10 of L1's root bus, behind the IOMMU in its own group, with one BAR (1 MiB) and an
/// MSI capability (one vector, 64-bit) and no MSI-X. With MSI enabled (and Bus Master set) a
/// write to BAR0+0x60 raises its MSI; BAR0+0x00 reads 0x010000ed; BAR0+0x04 returns the
/// complement of what was written there. No L1 driver claims it.
pub fn edu() -> String {
    require_lab();
    let mut devs: Vec<PathBuf> = fs::read_dir("/sys/bus/pci/devices")
        .expect("read /sys/bus/pci/devices")
        .flatten()
        .map(|e| e.path())
        .collect();
    devs.sort();
    devs.iter()
        .find(|d| {
            fs::read_to_string(d.join("vendor")).is_ok_and(|v| v.trim() == "0x1234")
                && fs::read_to_string(d.join("device")).is_ok_and(|v| v.trim() == "0x11e8")
        })
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .expect("no edu device (1234:11e8) in L1: L0 QEMU without `-device edu`?")
}

/// `/sys/bus/pci/devices/<bdf>`.
pub fn dev_path(bdf: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(bdf)
}

/// Loads a kernel module with L0's modprobe; panics with modprobe's message on failure.
pub fn modprobe(module: &str) {
    let out = Command::new("modprobe")
        .arg(module)
        .output()
        .expect("run modprobe");
    assert!(
        out.status.success(),
        "modprobe {module}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a sysfs attribute, panicking with the path and errno on failure.
pub fn write_attr(path: impl AsRef<Path>, value: &str) {
    let p = path.as_ref();
    fs::write(p, value).unwrap_or_else(|e| panic!("write {value:?} to {}: {e}", p.display()));
}

/// Reads a sysfs attribute, trimmed.
pub fn read_attr(path: impl AsRef<Path>) -> String {
    let p = path.as_ref();
    fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_owned()
}

/// The driver bound to `bdf`, if any.
pub fn driver_of(bdf: &str) -> Option<String> {
    fs::read_link(dev_path(bdf).join("driver"))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Binds `bdf` to `driver` (loading it first) through `driver_override`, unbinding any other.
pub fn bind(bdf: &str, driver: &str) {
    if driver_of(bdf).as_deref() == Some(driver) {
        return;
    }
    unbind(bdf);
    modprobe(driver);
    write_attr(dev_path(bdf).join("driver_override"), driver);
    write_attr("/sys/bus/pci/drivers_probe", bdf);
    assert_eq!(
        driver_of(bdf).as_deref(),
        Some(driver),
        "{bdf} did not bind to {driver}"
    );
}

/// Unbinds `bdf` from its driver, if it has one, and clears `driver_override`.
pub fn unbind(bdf: &str) {
    if driver_of(bdf).is_some() {
        write_attr(dev_path(bdf).join("driver/unbind"), bdf);
    }
    write_attr(dev_path(bdf).join("driver_override"), "\n");
}

/// Sets `sriov_numvfs` of `pf` to `n` (through 0 when both are non-zero), with autoprobe off.
pub fn set_numvfs(pf: &str, n: u32) {
    let dir = dev_path(pf);
    let cur: u32 = read_attr(dir.join("sriov_numvfs"))
        .parse()
        .expect("numeric sriov_numvfs");
    if cur == n {
        return;
    }
    write_attr(dir.join("sriov_drivers_autoprobe"), "0");
    if cur != 0 {
        write_attr(dir.join("sriov_numvfs"), "0");
    }
    if n != 0 {
        write_attr(dir.join("sriov_numvfs"), &n.to_string());
    }
}

/// BDFs of `pf`'s VFs, in `virtfnN` order.
pub fn vfs_of(pf: &str) -> Vec<String> {
    let dir = dev_path(pf);
    let mut out = Vec::new();
    for i in 0.. {
        match fs::read_link(dir.join(format!("virtfn{i}"))) {
            Ok(l) => out.push(
                l.file_name()
                    .expect("virtfn target")
                    .to_string_lossy()
                    .into_owned(),
            ),
            Err(_) => break,
        }
    }
    out
}

/// The IOMMU group number of `bdf`.
pub fn iommu_group(bdf: &str) -> u32 {
    let l = fs::read_link(dev_path(bdf).join("iommu_group"))
        .unwrap_or_else(|e| panic!("{bdf} has no iommu_group: {e}"));
    l.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .expect("numeric iommu group")
}

/// `PCI_COMMAND` bit: the function decodes its memory BARs.
pub const PCI_COMMAND_MEMORY: u16 = 0x2;
/// `PCI_COMMAND` bit: the function may master the bus (DMA, MSI/MSI-X writes).
pub const PCI_COMMAND_MASTER: u16 = 0x4;

fn config_file(bdf: &str, write: bool) -> (fs::File, PathBuf) {
    let p = dev_path(bdf).join("config");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(&p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    (f, p)
}

/// Reads the 16-bit word at `offset` of `bdf`'s configuration space.
pub fn config_read16(bdf: &str, offset: u64) -> u16 {
    use std::os::unix::fs::FileExt;
    let (f, p) = config_file(bdf, false);
    let mut b = [0u8; 2];
    f.read_exact_at(&mut b, offset)
        .unwrap_or_else(|e| panic!("read {} at {offset:#x}: {e}", p.display()));
    u16::from_le_bytes(b)
}

/// Writes the 16-bit word at `offset` of `bdf`'s configuration space.
pub fn config_write16(bdf: &str, offset: u64, value: u16) {
    use std::os::unix::fs::FileExt;
    let (f, p) = config_file(bdf, true);
    f.write_all_at(&value.to_le_bytes(), offset)
        .unwrap_or_else(|e| panic!("write {value:#x} to {} at {offset:#x}: {e}", p.display()));
}

/// Sets `bits` in `bdf`'s `PCI_COMMAND` register and returns its previous value (to restore
/// with [`config_write16`] at offset 4).
pub fn set_command_bits(bdf: &str, bits: u16) -> u16 {
    let old = config_read16(bdf, 4);
    config_write16(bdf, 4, old | bits);
    old
}

/// A memory BAR of a PCI function mapped through sysfs (`resource<N>`), for reading and writing
/// its 32-bit registers from a lab test. The function must decode memory
/// ([`PCI_COMMAND_MEMORY`], see [`set_command_bits`]) for the accesses to reach it.
#[derive(Debug)]
pub struct BarMap {
    ptr: *mut u32,
    len: usize,
    path: PathBuf,
}

impl BarMap {
    /// Maps BAR `bar` of `bdf` whole; panics with the path and errno on failure.
    pub fn open(bdf: &str, bar: u32) -> BarMap {
        let path = dev_path(bdf).join(format!("resource{bar}"));
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let len = f
            .metadata()
            .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
            .len() as usize;
        assert!(
            len >= 4,
            "{} is empty: BAR {bar} not assigned",
            path.display()
        );
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of `len` bytes of an open sysfs resource file; the
        // kernel checks that the range lies within the BAR. The fd may close afterwards.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert!(
            ptr != libc::MAP_FAILED,
            "mmap {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        BarMap {
            ptr: ptr.cast(),
            len,
            path,
        }
    }

    fn word(&self, offset: usize) -> *mut u32 {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.len,
            "offset {offset:#x} is not an aligned register of {} ({} bytes)",
            self.path.display(),
            self.len
        );
        // SAFETY: offset + 4 <= len, so the result stays within the mapping.
        unsafe { self.ptr.add(offset / 4) }
    }

    /// Reads the 32-bit register at `offset`.
    pub fn read32(&self, offset: usize) -> u32 {
        let p = self.word(offset);
        // SAFETY: `p` is an aligned address within our live mapping of the BAR.
        unsafe { std::ptr::read_volatile(p) }
    }

    /// Writes the 32-bit register at `offset`.
    pub fn write32(&self, offset: usize, value: u32) {
        let p = self.word(offset);
        // SAFETY: `p` is an aligned address within our live mapping of the BAR.
        unsafe { std::ptr::write_volatile(p, value) }
    }
}

impl Drop for BarMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `open`, unmapped only here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Registers of an igb VF (8086:10ca) in its BAR0, as QEMU's `igbvf` emulates them, and the
/// values the lab tests rely on (QEMU 10.0's hw/net/igbvf.c maps each to the PF's per-VF copy).
pub mod igbvf {
    /// Device status; reads the PF's STATUS.
    pub const STATUS: usize = 0x0008;
    /// STATUS: SR-IOV is on (set whenever VFs are enabled).
    pub const STATUS_IOV_MODE: u32 = 1 << 18;
    /// STATUS: the number of enabled VFs, at bits 14..=17.
    pub const STATUS_NUM_VFS_SHIFT: u32 = 14;
    /// Extended interrupt cause set: writing bit `v` raises MSI-X vector `v` (0..=2).
    pub const EICS: usize = 0x1520;
    /// Extended interrupt mask set: bit `v` enables MSI-X vector `v`.
    pub const EIMS: usize = 0x1524;
    /// Extended interrupt mask clear.
    pub const EIMC: usize = 0x1528;
    /// Extended interrupt auto-clear: a vector set here has its cause cleared when it fires
    /// (without it the cause stays set and the next EICS write of that vector raises nothing).
    pub const EIAC: usize = 0x152c;
    /// Extended interrupt cause (read to clear).
    pub const EICR: usize = 0x1580;
    /// VF-to-PF mailbox control.
    pub const V2PMAILBOX: usize = 0x0c40;
    /// MSI-X vectors of an igb VF (rx, tx, mailbox).
    pub const MSIX_VECTORS: u32 = 3;
    /// BAR holding the MSI-X table (at offset 0; vector control of entry `n` at `16 n + 12`).
    pub const MSIX_BAR: u32 = 3;
    /// The PF's GPIE register (in the PF's BAR0): VF interrupts reach MSI-X only with
    /// [`PF_GPIE_MSIX_MODE`] set there, which the PF's `igb` driver does and `pci-pf-stub` does not.
    pub const PF_GPIE: usize = 0x1514;
    /// GPIE: multiple-MSI-X mode.
    pub const PF_GPIE_MSIX_MODE: u32 = 0x10;
}
