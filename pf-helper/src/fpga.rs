//! Memory BARs read through sysfs, and the svff FPGA register window.
//!
//! [`BarReader`] maps one page of a function's `resource<N>` file (memory BARs
//! of that file support only `mmap(2)`, not `read(2)`) and reads 32-bit
//! registers with volatile loads. The svff user logic (`fpga-rtl/`) answers on
//! BAR [`SVFF_REGS_BAR`] of every PF and VF of the svff QDMA design; its
//! register offsets and magic come from `fpga-rtl/generated/svff_regs.rs`,
//! generated from `fpga-rtl/REGISTERS.md`.

use std::ffi::c_void;
use std::fs::File;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use tracing::{debug, warn};

use crate::error::Error;
use crate::pci::PciAddress;
use crate::sriov::SriovManager;
use crate::status::FpgaStatus;
use crate::sysfs::Sysfs;

#[allow(
    dead_code,
    reason = "the whole generated map is included; status reads a few registers of it"
)]
#[path = "../../fpga-rtl/generated/svff_regs.rs"]
mod svff_regs;

/// The BAR of every svff PF and VF that holds the svff register window (the
/// QDMA "PCIe to AXI-Lite Master" BAR, see `fpga-rtl/vivado/svff_qdma.tcl`).
pub const SVFF_REGS_BAR: u8 = 2;

/// PCI vendor id of the svff QDMA design (Xilinx/AMD).
const SVFF_VENDOR: u16 = 0x10ee;

/// Device ids of the svff QDMA design (`fpga-rtl/vivado/svff_qdma.tcl`):
/// PF0..PF3 `0x903f`..`0x933f`, their VFs `0xa03f`..`0xa33f`. Other QDMA
/// designs use the same ids, so a match is confirmed by the ID register.
const SVFF_DEVICES: [u16; 8] = [
    0x903f, 0x913f, 0x923f, 0x933f, 0xa03f, 0xa13f, 0xa23f, 0xa33f,
];

/// Why mapping a BAR fails with `EINVAL` on a stock kernel.
const CLAIMED_HINT: &str =
    ": a driver has claimed the BAR and the kernel (CONFIG_IO_STRICT_DEVMEM) refuses to map it";

/// Highest standard BAR index.
const MAX_BAR: u8 = 5;

/// `IORESOURCE_MEM` in the flags column of a device's sysfs `resource` file.
const IORESOURCE_MEM: u64 = 0x200;

/// Whether sysfs `vendor`/`device` texts (e.g. `0x10ee`, `0xa03f`) name a
/// function of the svff QDMA design.
fn is_svff_device(vendor: &str, device: &str) -> bool {
    let id = |text: &str| {
        text.strip_prefix("0x")
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    id(vendor) == Some(SVFF_VENDOR) && id(device).is_some_and(|d| SVFF_DEVICES.contains(&d))
}

/// The system's page size.
fn page_size() -> Result<u64, Errno> {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)? {
        Some(n) if n > 0 => Ok(n as u64),
        _ => Err(Errno::EINVAL),
    }
}

/// One memory BAR of a PCI function, read through
/// `/sys/bus/pci/devices/<bdf>/resource<N>`. Opened with
/// [`SriovManager::open_bar`].
///
/// Each [`BarReader::read_u32`] maps the page holding the register
/// (`MAP_SHARED`, `PROT_READ`), does one volatile 32-bit load and unmaps it.
/// Reading device registers this way needs root and, on kernels with
/// `CONFIG_IO_STRICT_DEVMEM`, a BAR no driver has claimed (the `mmap` then
/// fails with `EINVAL`). Before every read the function's config space is
/// checked: with memory decoding off (PCI_COMMAND, or for a VF the VF MSE bit
/// of its PF), outside D0, or not answering, the read is refused with a
/// "not read: ..." [`Error::Bar`] instead of being made (an Unsupported
/// Request, fatal on firmware-first servers).
#[derive(Debug)]
pub struct BarReader {
    bdf: PciAddress,
    bar: u8,
    path: PathBuf,
    file: File,
    size: u64,
    /// The function's sysfs `config`, read before every access.
    config: File,
    /// For a VF, its PF's `config` (the VF MSE bit is in the PF's SR-IOV capability).
    pf_config: Option<File>,
    /// The function's sysfs `power_state` (Linux >= 5.17), if present.
    power_state: Option<File>,
}

/// PCI_COMMAND_MEMORY.
const COMMAND_MEMORY: u16 = 0x2;
/// PCI_STATUS_CAP_LIST.
const STATUS_CAP_LIST: u16 = 0x10;
/// PCI_CAP_ID_PM.
const CAP_ID_PM: u8 = 0x01;
/// PCI_EXT_CAP_ID_SRIOV.
const EXT_CAP_ID_SRIOV: u16 = 0x0010;
/// PCI_SRIOV_CTRL_MSE, in the SR-IOV control register (capability + 8).
const SRIOV_CTRL_MSE: u16 = 0x8;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The power state (0..=3 for D0..D3hot) from the PM capability of a config
/// space image, if it has one.
fn pm_state(cfg: &[u8]) -> Option<u16> {
    if cfg.len() < 256 || le16(cfg, 6) & STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut at = usize::from(cfg[0x34] & 0xfc);
    // At most 48 capabilities fit in the 192 bytes after the header.
    for _ in 0..48 {
        if at < 0x40 || at + 8 > 256 {
            return None;
        }
        if cfg[at] == CAP_ID_PM {
            return Some(le16(cfg, at + 4) & 0x3);
        }
        at = usize::from(cfg[at + 1] & 0xfc);
    }
    None
}

/// The SR-IOV control register of a PF's extended config space image.
fn sriov_control(cfg: &[u8]) -> Option<u16> {
    let mut at = 0x100usize;
    // At most (4096 - 256) / 4 extended capabilities.
    for _ in 0..960 {
        if at < 0x100 || at + 12 > cfg.len() {
            return None;
        }
        let header = u32::from_le_bytes([cfg[at], cfg[at + 1], cfg[at + 2], cfg[at + 3]]);
        if header == 0 || header == u32::MAX {
            return None;
        }
        if header & 0xffff == u32::from(EXT_CAP_ID_SRIOV) {
            return Some(le16(cfg, at + 8));
        }
        at = (header >> 20) as usize & 0xffc;
    }
    None
}

impl BarReader {
    /// The function.
    pub fn bdf(&self) -> PciAddress {
        self.bdf
    }

    /// The BAR index (0..=5).
    pub fn bar(&self) -> u8 {
        self.bar
    }

    /// The BAR's size in bytes (the size of its `resource<N>` file).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads the little-endian 32-bit register at byte `offset`, which must be
    /// 4-byte aligned and inside the BAR.
    pub fn read_u32(&self, offset: u64) -> Result<u32, Error> {
        let bad = |reason: String| Error::Bar {
            bdf: self.bdf,
            bar: self.bar,
            reason,
        };
        if offset % 4 != 0 {
            return Err(bad(format!("offset {offset:#x} is not 4-byte aligned")));
        }
        if offset.checked_add(4).is_none_or(|end| end > self.size) {
            return Err(bad(format!(
                "offset {offset:#x} is outside the BAR ({:#x} bytes)",
                self.size
            )));
        }
        let access = |op: &'static str, errno: Errno| Error::BarAccess {
            bdf: self.bdf,
            bar: self.bar,
            op,
            path: self.path.clone(),
            hint: if op == "map" && errno == Errno::EINVAL {
                CLAIMED_HINT
            } else {
                ""
            },
            source: errno.into(),
        };
        self.check_decoding()?;
        let page = page_size().map_err(|e| access("get the page size to map", e))?;
        let page_start = offset - offset % page;
        let map = PageMap::new(&self.file, page_start, page).map_err(|e| access("map", e))?;
        // `offset - page_start < page`, and `page` fit in a usize when it was mapped.
        let value = u32::from_le(map.read_u32((offset - page_start) as usize));
        debug!(bdf = %self.bdf, bar = self.bar, offset, value, "BAR read");
        Ok(value)
    }
}

impl BarReader {
    /// Refuses a read that would reach a function that does not decode
    /// memory: its memory space bit is off (for a VF, the VF MSE bit of its
    /// PF's SR-IOV capability), it is not in D0, or its config space reads all
    /// ones. Such a read is an Unsupported Request, fatal on firmware-first
    /// servers; so it is never made.
    fn check_decoding(&self) -> Result<(), Error> {
        let not_read = |why: String| Error::Bar {
            bdf: self.bdf,
            bar: self.bar,
            reason: format!("not read: {why}"),
        };
        let config_err = |source: std::io::Error| Error::BarAccess {
            bdf: self.bdf,
            bar: self.bar,
            op: "read the config space to check",
            path: self.path.with_file_name("config"),
            hint: "",
            source,
        };
        let mut cfg = vec![0u8; 256];
        let n = read_full_at(&self.config, &mut cfg).map_err(config_err)?;
        cfg.truncate(n);
        if n < 64 {
            return Err(not_read(format!("config space too short ({n} bytes)")));
        }
        // A VF's vendor and device ids always read all ones; a function that
        // does not answer reads all ones in its command and status too.
        if cfg[..8].iter().all(|b| *b == 0xff) {
            return Err(not_read(
                "the function does not answer (config space reads all ones)".into(),
            ));
        }
        match &self.pf_config {
            None => {
                if le16(&cfg, 4) & COMMAND_MEMORY == 0 {
                    return Err(not_read(
                        "memory decoding off (memory space enable clear in PCI_COMMAND)".into(),
                    ));
                }
            }
            Some(pf) => {
                let mut pf_cfg = vec![0u8; 4096];
                let n = read_full_at(pf, &mut pf_cfg).map_err(config_err)?;
                pf_cfg.truncate(n);
                match sriov_control(&pf_cfg) {
                    Some(ctrl) if ctrl & SRIOV_CTRL_MSE != 0 => {}
                    Some(_) => {
                        return Err(not_read(
                            "memory decoding off (VF memory space enable clear in the PF's SR-IOV control)"
                                .into(),
                        ))
                    }
                    None => {
                        return Err(not_read(
                            "the PF's SR-IOV capability cannot be read to check VF memory decoding"
                                .into(),
                        ))
                    }
                }
            }
        }
        // The kernel's view first (it says "unknown" for functions it does not
        // power-manage, e.g. unbound ones), then the PM capability itself.
        let kernel_state = match &self.power_state {
            Some(f) => {
                let mut buf = [0u8; 32];
                let n = read_full_at(f, &mut buf).map_err(config_err)?;
                let text = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
                ["D1", "D2", "D3hot", "D3cold"]
                    .contains(&text.as_str())
                    .then_some(text)
            }
            None => None,
        };
        let state =
            kernel_state.or_else(|| pm_state(&cfg).filter(|s| *s != 0).map(|s| format!("D{s}")));
        if let Some(state) = state {
            return Err(not_read(format!("the function is in {state}, not D0")));
        }
        Ok(())
    }
}

/// Reads from offset 0 until `buf` is full or EOF; the byte count.
fn read_full_at(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A read-only shared mapping of `len` bytes of a file, unmapped on drop.
#[derive(Debug)]
struct PageMap {
    ptr: NonNull<c_void>,
    len: usize,
}

impl PageMap {
    /// Maps `len` bytes of `file` from `offset` (a multiple of the page size).
    fn new(file: &File, offset: u64, len: u64) -> Result<Self, Errno> {
        let off = libc::off_t::try_from(offset).map_err(|_| Errno::EOVERFLOW)?;
        let len = usize::try_from(len).map_err(|_| Errno::EOVERFLOW)?;
        let length = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        // SAFETY: no address is given and MAP_FIXED is not set, so the kernel
        // picks fresh addresses and no existing Rust object is overlaid; the
        // mapping is read only through `read_u32` and unmapped once, in `drop`.
        let ptr = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                file,
                off,
            )
        }?;
        Ok(PageMap { ptr, len })
    }

    /// One volatile 32-bit load at byte `at`, which must be 4-byte aligned and inside the mapping.
    fn read_u32(&self, at: usize) -> u32 {
        assert!(
            at % 4 == 0 && at.checked_add(4).is_some_and(|end| end <= self.len),
            "register offset {at:#x} outside the {}-byte mapping",
            self.len
        );
        // SAFETY: the mapping of `len` bytes made in `new` is live until
        // `drop`, and `at + 4 <= len` (asserted) keeps the load inside it; the
        // mapping is page aligned and `at` a multiple of 4, so the u32 is
        // aligned. The caller checked `at` against the file's size, so the page
        // is backed (no SIGBUS). Volatile: a device register must be loaded
        // exactly once, never merged or elided.
        unsafe { self.ptr.cast::<u8>().add(at).cast::<u32>().read_volatile() }
    }
}

impl Drop for PageMap {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are exactly the mapping created in `new`,
        // unmapped only here; `read_u32` copies values out, so no reference
        // into the mapping outlives it.
        if let Err(e) = unsafe { munmap(self.ptr, self.len) } {
            warn!(error = %e, "munmap of a BAR page failed");
        }
    }
}

/// What the svff register window of a function says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvffIdentity {
    /// The ID register (the svff magic, ASCII "SVFF").
    pub id: u32,
    /// The VERSION register: major in bits 31:16, minor in bits 15:0.
    pub version: u32,
    /// The FUNC_INFO register (function number, PF and management bits).
    pub func_info: u32,
}

impl SvffIdentity {
    /// The function number QDMA gives this function (0..=3: PF0..PF3, then the VFs).
    pub fn function(&self) -> u32 {
        (self.func_info & svff_regs::FUNC_INFO_FN_MASK) >> svff_regs::FUNC_INFO_FN_SHIFT
    }

    /// Whether the function is one of the PFs.
    pub fn is_pf(&self) -> bool {
        self.func_info & svff_regs::FUNC_INFO_IS_PF_MASK != 0
    }

    /// Whether the function reaches the management window (PF0).
    pub fn is_mgmt(&self) -> bool {
        self.func_info & svff_regs::FUNC_INFO_IS_MGMT_MASK != 0
    }

    /// `major.minor` of the register map, e.g. `1.0`.
    pub fn version_text(&self) -> String {
        format!("{}.{}", self.version >> 16, self.version & 0xffff)
    }
}

impl<S: Sysfs> SriovManager<S> {
    /// Opens memory BAR `bar` (0..=5) of `bdf` for register reads. Fails with
    /// an error naming the function and the BAR when the BAR does not exist,
    /// is an I/O port BAR, or its `resource<N>` file cannot be opened.
    pub fn open_bar(&self, bdf: PciAddress, bar: u8) -> Result<BarReader, Error> {
        let bad = |reason: String| Error::Bar { bdf, bar, reason };
        if bar > MAX_BAR {
            return Err(bad(format!(
                "no such BAR (standard BARs are 0 to {MAX_BAR})"
            )));
        }
        let dir = self.device_dir(bdf)?;
        let resource_rel = dir.join("resource");
        let resource_path = self.sysfs().root().join(&resource_rel);
        let table = self
            .sysfs()
            .read(&resource_rel)
            .map_err(|source| Error::Sysfs {
                op: "read",
                path: resource_path.clone(),
                source,
            })?;
        let line = table.lines().nth(usize::from(bar)).unwrap_or("");
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(|f| {
                f.strip_prefix("0x")
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
            })
            .collect::<Option<_>>()
            .filter(|f: &Vec<u64>| f.len() == 3)
            .ok_or_else(|| Error::Parse {
                path: resource_path,
                content: line.to_owned(),
            })?;
        let (start, end, flags) = (fields[0], fields[1], fields[2]);
        if flags == 0 || end <= start {
            return Err(bad(
                "not implemented (no resource; the upper half of a 64-bit BAR has none)".into(),
            ));
        }
        if flags & IORESOURCE_MEM == 0 {
            return Err(bad(format!(
                "not a memory BAR (resource flags {flags:#x}); only memory BARs can be mapped"
            )));
        }
        let rel = dir.join(format!("resource{bar}"));
        let path = self.sysfs().root().join(&rel);
        let access = |op: &'static str, source: std::io::Error| Error::BarAccess {
            bdf,
            bar,
            op,
            path: path.clone(),
            hint: match source.kind() {
                std::io::ErrorKind::PermissionDenied => ": reading device registers needs root",
                _ => "",
            },
            source,
        };
        let file = self.sysfs().open(&rel).map_err(|e| access("open", e))?;
        // sysfs gives a resource file the BAR's length as its size.
        let size = file.metadata().map_err(|e| access("stat", e))?.len();
        if size == 0 {
            return Err(bad("not implemented (empty resource file)".into()));
        }
        let open_attr = |rel: PathBuf| {
            self.sysfs().open(&rel).map_err(|source| Error::BarAccess {
                bdf,
                bar,
                op: "open",
                path: self.sysfs().root().join(&rel),
                hint: "",
                source,
            })
        };
        let config = open_attr(dir.join("config"))?;
        let pf_config = if self.sysfs().exists(&dir.join("physfn")) {
            Some(open_attr(dir.join("physfn/config"))?)
        } else {
            None
        };
        let power_state = self.sysfs().open(&dir.join("power_state")).ok();
        Ok(BarReader {
            bdf,
            bar,
            path,
            file,
            size,
            config,
            pf_config,
            power_state,
        })
    }

    /// Reads the ID, VERSION and FUNC_INFO registers of `bdf` through BAR
    /// [`SVFF_REGS_BAR`]; [`Error::NotSvffFunction`] when ID is not the svff magic.
    pub fn read_svff_identity(&self, bdf: PciAddress) -> Result<SvffIdentity, Error> {
        let bar = self.open_bar(bdf, SVFF_REGS_BAR)?;
        identity_from(&bar)
    }

    /// The `fpga` entry of a function's status: `None` unless its ids are those
    /// of the svff QDMA design; otherwise what its register window says, or why
    /// it could not be read. Never fails: a BAR that cannot be read is reported
    /// for this function only.
    pub(crate) fn fpga_status(
        &self,
        bdf: PciAddress,
        vendor: &str,
        device: &str,
    ) -> Option<FpgaStatus> {
        if !is_svff_device(vendor, device) {
            return None;
        }
        let mut st = FpgaStatus {
            bar: SVFF_REGS_BAR,
            id: None,
            version: None,
            function: None,
            is_pf: None,
            error: None,
        };
        let result = self
            .open_bar(bdf, SVFF_REGS_BAR)
            .and_then(|bar| identity_from(&bar));
        match result {
            Ok(ident) => {
                st.id = Some(format!("{:#010x}", ident.id));
                st.version = Some(format!("{:#010x}", ident.version));
                st.function = Some(ident.function());
                st.is_pf = Some(ident.is_pf());
            }
            Err(e) => {
                debug!(%bdf, error = %e.chain(), "svff register window not readable");
                if let Error::NotSvffFunction { id, .. } = e {
                    st.id = Some(format!("{id:#010x}"));
                }
                st.error = Some(e.chain());
            }
        }
        Some(st)
    }
}

/// ID (checked against the magic), VERSION and FUNC_INFO from an open window.
fn identity_from(bar: &BarReader) -> Result<SvffIdentity, Error> {
    let id = bar.read_u32(svff_regs::REG_ID)?;
    if id != svff_regs::ID_MAGIC {
        return Err(Error::NotSvffFunction {
            bdf: bar.bdf(),
            bar: bar.bar(),
            id,
            expected: svff_regs::ID_MAGIC,
        });
    }
    Ok(SvffIdentity {
        id,
        version: bar.read_u32(svff_regs::REG_VERSION)?,
        func_info: bar.read_u32(svff_regs::REG_FUNC_INFO)?,
    })
}

#[cfg(test)]
mod tests {
    use super::svff_regs::*;
    use super::*;
    use crate::fake::FakeSysfs;
    use crate::sriov::VfsSetOptions;

    const FPGA_PF: &str = "0000:81:00.0";

    fn addr(text: &str) -> PciAddress {
        PciAddress::parse(text).unwrap()
    }

    /// A register window as the svff user logic shows it to function `func`,
    /// built from the generated map.
    fn svff_window(id: u32, func: u32) -> Vec<u8> {
        let mut image = vec![0u8; BAR_SIZE as usize];
        let mut put = |offset: u64, value: u32| {
            let at = offset as usize;
            image[at..at + 4].copy_from_slice(&value.to_le_bytes());
        };
        let pf = if func < NUM_PFS {
            FUNC_INFO_IS_PF_MASK
        } else {
            0
        };
        let mgmt = if func == 0 { FUNC_INFO_IS_MGMT_MASK } else { 0 };
        put(REG_ID, id);
        put(REG_VERSION, VERSION);
        put(REG_FUNC_INFO, (func << FUNC_INFO_FN_SHIFT) | pf | mgmt);
        put(REG_SCRATCH, 0xdead_beef);
        image
    }

    /// The svff PF0 (qdma-pf, BAR0 DMA registers, BAR2 the svff window) with
    /// `vfs` VFs, each but the last given its BAR2 window.
    fn svff_pf0(vfs: u16) -> SriovManager<FakeSysfs> {
        let fake = FakeSysfs::with_igb();
        fake.add_pf(FPGA_PF, "0x10ee", "0x903f", 64, "0xa03f");
        fake.preset_driver(FPGA_PF, "qdma-pf");
        fake.set_bar(FPGA_PF, 0, &vec![0u8; 0x4_0000]);
        fake.set_bar(FPGA_PF, 2, &svff_window(ID_MAGIC, 0));
        let mgr = fake.manager();
        mgr.set_vf_count(addr(FPGA_PF), vfs, &VfsSetOptions::default())
            .unwrap();
        let list = mgr.vfs(addr(FPGA_PF)).unwrap();
        for (i, vf) in list.iter().take(list.len().saturating_sub(1)) {
            mgr.sysfs().set_bar(
                &vf.to_string(),
                2,
                &svff_window(ID_MAGIC, 4 + u32::from(*i)),
            );
        }
        mgr
    }

    #[test]
    fn status_does_not_read_bar2_of_functions_with_memory_decoding_off_or_outside_d0() {
        let mgr = svff_pf0(2);
        let pf_status = |mgr: &SriovManager<FakeSysfs>| {
            mgr.status(Some(&[addr(FPGA_PF)])).unwrap().pfs.remove(0)
        };
        mgr.sysfs().set_decoding(FPGA_PF, false);
        let pf = pf_status(&mgr);
        let fpga = pf.fpga.as_ref().unwrap();
        let e = fpga.error.as_deref().unwrap();
        assert!(
            e.contains("BAR 2 of 0000:81:00.0: not read: memory decoding off"),
            "{e}"
        );
        assert_eq!(fpga.id, None, "nothing was read");
        // The PF's VF memory space enable is off too: no VF BAR is read.
        let e = pf.vfs[0].fpga.as_ref().unwrap().error.as_deref().unwrap();
        assert!(
            e.contains(
                "BAR 2 of 0000:81:10.0: not read: memory decoding off (VF memory space enable"
            ),
            "{e}"
        );
        mgr.sysfs().set_decoding(FPGA_PF, true);
        let pf = pf_status(&mgr);
        assert_eq!(pf.fpga.as_ref().unwrap().id.as_deref(), Some("0x53564646"));
        assert_eq!(pf.vfs[0].fpga.as_ref().unwrap().error, None);
        mgr.sysfs().set_power_state(FPGA_PF, 3);
        let e = pf_status(&mgr).fpga.unwrap().error.unwrap();
        assert!(
            e.contains("not read: the function is in D3hot, not D0"),
            "{e}"
        );
        // The kernel says "unknown" for functions it does not power-manage:
        // the PM capability decides.
        let power_state = mgr
            .sysfs()
            .root()
            .join("devices/pci0000:00/0000:81:00.0/power_state");
        std::fs::write(&power_state, "unknown\n").unwrap();
        let e = pf_status(&mgr).fpga.unwrap().error.unwrap();
        assert!(e.contains("not read: the function is in D3, not D0"), "{e}");
        mgr.sysfs().set_power_state(FPGA_PF, 0);
        std::fs::write(&power_state, "unknown\n").unwrap();
        assert_eq!(pf_status(&mgr).fpga.unwrap().error, None);
    }

    #[test]
    fn power_state_and_sriov_control_are_found_in_config_space_images() {
        let mut cfg = vec![0u8; 4096];
        cfg[6] = 0x10;
        cfg[0x34] = 0x50;
        // A vendor capability at 0x50 leading to PM at 0x60 in D3hot.
        cfg[0x50] = 0x09;
        cfg[0x51] = 0x60;
        cfg[0x60] = 0x01;
        cfg[0x64] = 0x03;
        assert_eq!(pm_state(&cfg), Some(3));
        cfg[0x60] = 0x05;
        assert_eq!(pm_state(&cfg), None);
        // AER at 0x100, then SR-IOV at 0x140 with VF Enable + VF MSE.
        cfg[0x100..0x104].copy_from_slice(&(0x0001u32 | 1 << 16 | 0x140 << 20).to_le_bytes());
        cfg[0x140..0x144].copy_from_slice(&(0x0010u32 | 1 << 16).to_le_bytes());
        cfg[0x148] = 0x09;
        assert_eq!(sriov_control(&cfg), Some(0x9));
        cfg[0x100..0x104].copy_from_slice(&0x0001u32.to_le_bytes());
        assert_eq!(sriov_control(&cfg), None);
    }

    #[test]
    fn reader_finds_the_svff_window_of_a_pf_through_bar2() {
        let mgr = svff_pf0(0);
        let ident = mgr.read_svff_identity(addr(FPGA_PF)).unwrap();
        assert_eq!(ident.id, ID_MAGIC);
        assert_eq!(ident.version, VERSION);
        assert_eq!(ident.version_text(), "1.0");
        assert_eq!(ident.function(), 0);
        assert!(ident.is_pf() && ident.is_mgmt());
        let bar = mgr.open_bar(addr(FPGA_PF), SVFF_REGS_BAR).unwrap();
        assert_eq!(bar.size(), u64::from(BAR_SIZE));
        assert_eq!(bar.read_u32(REG_SCRATCH).unwrap(), 0xdead_beef);
    }

    #[test]
    fn status_shows_the_window_of_each_svff_function_and_reports_failures_per_function() {
        let mgr = svff_pf0(3);
        let status = mgr.status(None).unwrap();
        let igb = &status.pfs[0];
        assert_eq!(igb.bdf.to_string(), "0000:01:00.0");
        assert_eq!(igb.fpga, None, "not an svff device: no BAR is touched");
        let pf = &status.pfs[1];
        let fpga = pf.fpga.as_ref().expect("svff PF has an fpga entry");
        assert_eq!(fpga.bar, 2);
        assert_eq!(fpga.id.as_deref(), Some("0x53564646"));
        assert_eq!(fpga.version.as_deref(), Some("0x00010000"));
        assert_eq!((fpga.function, fpga.is_pf), (Some(0), Some(true)));
        assert_eq!(fpga.error, None);
        for vf in &pf.vfs[..2] {
            let f = vf.fpga.as_ref().unwrap();
            assert_eq!(f.function, Some(4 + u32::from(vf.index)), "{vf:?}");
            assert_eq!((f.is_pf, f.error.as_deref()), (Some(false), None));
        }
        // The last VF has no BAR2: reported for that VF only.
        let last = pf.vfs[2].fpga.as_ref().unwrap();
        assert_eq!((last.id.as_deref(), last.function), (None, None));
        let err = last.error.as_deref().unwrap();
        assert!(
            err.contains(&format!("BAR 2 of {}", pf.vfs[2].bdf)),
            "{err}"
        );
        assert!(err.contains("not implemented"), "{err}");
        // JSON: an object for svff functions, null for others.
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["pfs"][0]["fpga"], serde_json::Value::Null);
        assert_eq!(json["pfs"][0]["vfs"], serde_json::json!([]));
        assert_eq!(
            json["pfs"][1]["vfs"][1]["fpga"],
            serde_json::json!({"bar": 2, "id": "0x53564646", "version": "0x00010000",
                               "function": 5, "is_pf": false, "error": null})
        );
    }

    #[test]
    fn status_without_the_fpga_field_still_decodes() {
        let old = r#"{"format_version":1,"pfs":[{"bdf":"0000:01:00.0","vendor":"0x8086",
            "device":"0x10c9","driver":null,"totalvfs":7,"numvfs":0,
            "drivers_autoprobe":true,"vfs":[]}]}"#;
        let st: crate::Status = serde_json::from_str(old).unwrap();
        assert_eq!(st.pfs[0].fpga, None);
    }

    #[test]
    fn wrong_magic_is_not_an_svff_function() {
        let mgr = svff_pf0(0);
        mgr.sysfs()
            .set_bar(FPGA_PF, 2, &svff_window(0x1234_5678, 0));
        let err = mgr.read_svff_identity(addr(FPGA_PF)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotSvffFunction {
                    id: 0x1234_5678,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.kind(), "not_svff");
        let text = err.to_string();
        assert!(
            text.starts_with("0000:81:00.0 is not an svff function"),
            "{text}"
        );
        assert!(
            text.contains("0x12345678") && text.contains("0x53564646"),
            "{text}"
        );
        let fpga = mgr.pf_status(addr(FPGA_PF)).unwrap().fpga.unwrap();
        assert_eq!(fpga.id.as_deref(), Some("0x12345678"));
        assert_eq!((fpga.version, fpga.function), (None, None));
        assert!(fpga.error.unwrap().contains("not an svff function"));
    }

    #[test]
    fn all_ones_id_says_the_function_does_not_answer() {
        let mgr = svff_pf0(0);
        mgr.sysfs().set_bar(FPGA_PF, 2, &[0xff; 0x1000]);
        let err = mgr.read_svff_identity(addr(FPGA_PF)).unwrap_err();
        assert!(err.to_string().contains("all ones"), "{err}");
    }

    #[test]
    fn offsets_outside_the_bar_or_misaligned_are_refused() {
        let mgr = svff_pf0(0);
        let bar = mgr.open_bar(addr(FPGA_PF), 2).unwrap();
        assert_eq!(bar.read_u32(u64::from(BAR_SIZE) - 4).unwrap(), 0);
        for offset in [u64::from(BAR_SIZE), u64::from(BAR_SIZE) + 4, u64::MAX - 3] {
            let err = bar.read_u32(offset).unwrap_err();
            assert!(matches!(err, Error::Bar { bar: 2, .. }), "{err}");
            let text = err.to_string();
            assert!(text.starts_with("BAR 2 of 0000:81:00.0: offset"), "{text}");
            assert!(text.contains("outside the BAR (0x1000 bytes)"), "{text}");
            assert_eq!(err.kind(), "bar");
        }
        let err = bar.read_u32(REG_ID + 2).unwrap_err();
        assert!(err.to_string().contains("not 4-byte aligned"), "{err}");
    }

    #[test]
    fn registers_beyond_the_first_page_are_read_from_their_page() {
        let mgr = svff_pf0(0);
        let mut image = vec![0u8; 0x4_0000];
        for (i, word) in image.chunks_exact_mut(4).enumerate() {
            word.copy_from_slice(&(i as u32 * 4).to_le_bytes());
        }
        mgr.sysfs().set_bar(FPGA_PF, 0, &image);
        let bar = mgr.open_bar(addr(FPGA_PF), 0).unwrap();
        assert_eq!(bar.size(), 0x4_0000);
        for offset in [0, 0xffc, 0x1000, 0x2_3454, 0x3_fffc] {
            assert_eq!(bar.read_u32(offset).unwrap(), offset as u32);
        }
    }

    #[test]
    fn missing_io_and_out_of_range_bars_are_refused_naming_the_function() {
        let mgr = svff_pf0(0);
        let pf = addr(FPGA_PF);
        let err = mgr.open_bar(pf, 6).unwrap_err();
        assert_eq!(
            err.to_string(),
            "BAR 6 of 0000:81:00.0: no such BAR (standard BARs are 0 to 5)"
        );
        let err = mgr.open_bar(pf, 1).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("BAR 1 of 0000:81:00.0: not implemented"));
        // An I/O port BAR (IORESOURCE_IO) has no mappable resource file.
        let resource = mgr.sysfs().root().join(pf.sysfs_rel()).join("resource");
        let text = std::fs::read_to_string(&resource).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines[4] = "0x000000000000c000 0x000000000000c01f 0x0000000000040101".into();
        std::fs::write(&resource, lines.join("\n") + "\n").unwrap();
        let err = mgr.open_bar(pf, 4).unwrap_err();
        assert!(err.to_string().contains("not a memory BAR"), "{err}");
        // A line that is not three hex numbers is a parse error naming the file.
        lines[3] = "garbage".into();
        std::fs::write(&resource, lines.join("\n") + "\n").unwrap();
        let err = mgr.open_bar(pf, 3).unwrap_err();
        assert!(
            matches!(err, Error::Parse { ref path, .. } if *path == resource),
            "{err}"
        );
        // A resource line without its file (e.g. removed underneath us).
        std::fs::remove_file(mgr.sysfs().root().join(pf.sysfs_rel()).join("resource2")).unwrap();
        let err = mgr.open_bar(pf, 2).unwrap_err();
        assert!(matches!(err, Error::BarAccess { op: "open", .. }), "{err}");
        assert!(
            err.to_string()
                .contains("cannot open BAR 2 of 0000:81:00.0"),
            "{err}"
        );
        let err = mgr.open_bar(addr("0000:82:00.0"), 2).unwrap_err();
        assert!(matches!(err, Error::NoSuchDevice { .. }), "{err}");
    }

    #[test]
    fn only_xilinx_functions_with_svff_device_ids_are_probed() {
        assert!(is_svff_device("0x10ee", "0x903f"));
        assert!(is_svff_device("0x10ee", "0xa33f"));
        assert!(!is_svff_device("0x10ee", "0x9038"));
        assert!(!is_svff_device("0x8086", "0x903f"));
        assert!(!is_svff_device("10ee", "903f"));
        // A Xilinx function with another device id: no fpga entry, BAR untouched.
        let fake = FakeSysfs::new();
        fake.add_pf("0000:83:00.0", "0x10ee", "0x9038", 4, "0xa038");
        fake.set_bar("0000:83:00.0", 2, &svff_window(ID_MAGIC, 0));
        let mgr = fake.manager();
        assert_eq!(mgr.pf_status(addr("0000:83:00.0")).unwrap().fpga, None);
    }

    #[test]
    fn device_ids_and_bar_agree_with_the_vivado_script() {
        let tcl = include_str!("../../fpga-rtl/vivado/svff_qdma.tcl");
        let words: Vec<Vec<&str>> = tcl
            .lines()
            .map(|l| l.split_whitespace().collect())
            .filter(|w: &Vec<&str>| w.first() == Some(&"svff_set"))
            .collect();
        let setting = |name: &str| -> Vec<&str> {
            words
                .iter()
                .filter(|w| w.get(2) == Some(&name))
                .map(|w| w[3])
                .collect()
        };
        for pf in 0..4u16 {
            let id = setting(&format!("pf{pf}_device_id"));
            assert_eq!(id.len(), 1, "pf{pf}_device_id in the script");
            let id = u16::from_str_radix(id[0], 16).unwrap();
            assert_eq!(id, SVFF_DEVICES[usize::from(pf)]);
            // VF ids: [format "A%d3F" $pf].
            assert_eq!(SVFF_DEVICES[4 + usize::from(pf)], 0xa03f | (pf << 8));
        }
        assert_eq!(setting("PF${pf}_SRIOV_VF_DEVICE_ID"), ["[format"]);
        assert!(tcl.contains(r#"[format "A%d3F" $pf]"#));
        let bar = SVFF_REGS_BAR;
        assert_eq!(
            setting(&format!("pf${{pf}}_bar{bar}_type_qdma")),
            ["AXI_Lite_Master"]
        );
        assert_eq!(
            setting(&format!("pf${{pf}}_vf_bar{bar}_type_qdma")),
            ["AXI_Lite_Master"]
        );
        assert_eq!(
            setting(&format!("pf${{pf}}_bar{bar}_size_qdma")),
            [&(BAR_SIZE / 1024).to_string()]
        );
    }
}
