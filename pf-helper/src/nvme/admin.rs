//! NVMe admin commands through the kernel's passthrough ioctl
//! (`NVME_IOCTL_ADMIN_CMD` on the controller's character device `/dev/nvmeN`,
//! `include/uapi/linux/nvme_ioctl.h`), and the data structures the
//! Virtualization Enhancements of the NVMe base specification define:
//! Identify CNS 14h (Primary Controller Capabilities), CNS 15h (Secondary
//! Controller List) and the Virtualization Management command (opcode 1Ch).

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::pci::PciAddress;

/// Admin opcode of Identify.
pub const OPC_IDENTIFY: u8 = 0x06;
/// Admin opcode of Virtualization Management.
pub const OPC_VIRT_MGMT: u8 = 0x1c;
/// Identify CNS: Primary Controller Capabilities data structure.
pub const CNS_PRIMARY_CTRL_CAPS: u8 = 0x14;
/// Identify CNS: Secondary Controller List.
pub const CNS_SECONDARY_CTRL_LIST: u8 = 0x15;
/// Size of every Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;
/// Entries a Secondary Controller List holds at most.
pub const MAX_LIST_ENTRIES: usize = 127;
/// How long the kernel may wait for one admin command (`timeout_ms`).
pub const ADMIN_TIMEOUT_MS: u32 = 10_000;
/// How long the helper waits for a controller to become `live`.
pub const LIVE_TIMEOUT: Duration = Duration::from_secs(15);

/// `_IOWR('N', 0x41, struct nvme_passthru_cmd)`: dir 3 (read|write) in bits
/// 31:30, size 72 in 29:16, type `'N'` in 15:8, number 0x41 in 7:0.
pub const NVME_IOCTL_ADMIN_CMD: u64 =
    (3 << 30) | ((std::mem::size_of::<PassthruCmd>() as u64) << 16) | ((b'N' as u64) << 8) | 0x41;

/// The kernel's `struct nvme_passthru_cmd` (72 bytes, no padding).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassthruCmd {
    /// Command opcode.
    pub opcode: u8,
    /// Command flags (PSDT/FUSE; 0).
    pub flags: u8,
    /// Reserved.
    pub rsvd1: u16,
    /// Namespace id.
    pub nsid: u32,
    /// Command dword 2.
    pub cdw2: u32,
    /// Command dword 3.
    pub cdw3: u32,
    /// Metadata buffer (unused).
    pub metadata: u64,
    /// User address of the data buffer.
    pub addr: u64,
    /// Metadata length (unused).
    pub metadata_len: u32,
    /// Data buffer length.
    pub data_len: u32,
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
    /// Kernel timeout for this command, ms (0: the driver's default).
    pub timeout_ms: u32,
    /// Dword 0 of the completion, filled in by the kernel.
    pub result: u32,
}

const _: () = assert!(std::mem::size_of::<PassthruCmd>() == 72);

/// Resource types of Virtualization Management (CDW10 bits 10:8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceType {
    /// Virtual Queue resources (a submission/completion queue pair each).
    Vq = 0,
    /// Virtual Interrupt resources (an MSI-X vector each).
    Vi = 1,
}

impl ResourceType {
    /// `VQ` / `VI`.
    pub fn name(self) -> &'static str {
        match self {
            ResourceType::Vq => "VQ",
            ResourceType::Vi => "VI",
        }
    }
}

/// Actions of Virtualization Management (CDW10 bits 3:0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtAction {
    /// Secondary Controller Offline (7h): the controller stops and its
    /// flexible resources return to the pool.
    Offline = 7,
    /// Secondary Controller Assign (8h): set the number of resources of one
    /// type (the controller must be offline).
    Assign = 8,
    /// Secondary Controller Online (9h).
    Online = 9,
}

/// One admin command, before it becomes a [`PassthruCmd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminCommand {
    /// Opcode.
    pub opcode: u8,
    /// CDW10.
    pub cdw10: u32,
    /// CDW11.
    pub cdw11: u32,
    /// Bytes transferred from the controller (Identify: 4096; else 0).
    pub data_len: u32,
}

impl AdminCommand {
    /// Identify with `cns`; `cntid` in CDW10 bits 31:16 (for the Secondary
    /// Controller List: the lowest secondary controller id to return).
    pub fn identify(cns: u8, cntid: u16) -> Self {
        AdminCommand {
            opcode: OPC_IDENTIFY,
            cdw10: u32::from(cns) | u32::from(cntid) << 16,
            cdw11: 0,
            data_len: IDENTIFY_LEN as u32,
        }
    }

    /// Virtualization Management: `action` on controller `cntlid`; `nr`
    /// resources of type `rt` for [`VirtAction::Assign`] (ignored otherwise).
    pub fn virt_mgmt(action: VirtAction, rt: ResourceType, cntlid: u16, nr: u16) -> Self {
        AdminCommand {
            opcode: OPC_VIRT_MGMT,
            cdw10: action as u32 | (rt as u32) << 8 | u32::from(cntlid) << 16,
            cdw11: u32::from(nr),
            data_len: 0,
        }
    }

    /// The kernel's structure for this command, with `addr` the data buffer.
    pub fn to_passthru(self, addr: u64) -> PassthruCmd {
        PassthruCmd {
            opcode: self.opcode,
            addr,
            data_len: self.data_len,
            cdw10: self.cdw10,
            cdw11: self.cdw11,
            timeout_ms: ADMIN_TIMEOUT_MS,
            ..Default::default()
        }
    }
}

/// Why an admin command failed.
#[derive(Debug)]
pub enum AdminError {
    /// The controller completed it with this status (the kernel's return
    /// value: SC in bits 7:0, SCT in 10:8, DNR in bit 14).
    Status(u16),
    /// The ioctl itself failed (errno).
    Os(io::Error),
}

/// Text of an NVMe status, e.g. `status 0x4121 (Invalid Number of Controller Resources)`.
pub fn status_text(status: u16) -> String {
    let sct = (status >> 8) & 0x7;
    let sc = status & 0xff;
    let name = match (sct, sc) {
        (0, 0x01) => "Invalid Command Opcode",
        (0, 0x02) => "Invalid Field in Command",
        (0, 0x06) => "Internal Error",
        (0, 0x0b) => "Invalid Namespace or Format",
        (1, 0x1f) => "Invalid Controller Identifier",
        (1, 0x20) => "Invalid Secondary Controller State",
        (1, 0x21) => "Invalid Number of Controller Resources",
        (1, 0x22) => "Invalid Resource Identifier",
        _ => "unknown status",
    };
    format!("NVMe status {status:#06x} ({name})")
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::Status(s) => f.write_str(&status_text(*s)),
            AdminError::Os(e) => write!(f, "ioctl NVME_IOCTL_ADMIN_CMD failed: {e}"),
        }
    }
}

/// Something that executes NVMe admin commands on one (primary) controller.
/// The real one is [`NvmeDevice`]; unit tests use a model of QEMU's controller.
pub trait NvmeAdmin: fmt::Debug + Send + Sync {
    /// What names the controller in messages, e.g. `/dev/nvme0 (PF 0000:02:00.0)`.
    fn name(&self) -> String;

    /// Executes `cmd`; `data` (exactly `cmd.data_len` bytes) receives the
    /// controller-to-host transfer. Returns completion dword 0.
    fn admin(&self, cmd: &AdminCommand, data: Option<&mut [u8]>) -> Result<u32, AdminError>;
}

/// The Primary Controller Capabilities data structure (Identify CNS 14h);
/// byte offsets per the NVMe base specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrimaryCaps {
    /// CNTLID (0..2): the primary controller's id.
    pub cntlid: u16,
    /// CRT (4): bit 0 VQ resources supported, bit 1 VI resources supported.
    pub crt: u8,
    /// VQFRT (32..36): VQ flexible resources total.
    pub vqfrt: u32,
    /// VQRFA (36..40): VQ flexible resources assigned to secondary controllers.
    pub vqrfa: u32,
    /// VQRFAP (40..42): VQ flexible resources allocated to the primary.
    pub vqrfap: u16,
    /// VQPRT (42..44): VQ private resources of the primary.
    pub vqprt: u16,
    /// VQFRSM (44..46): most VQ flexible resources one secondary can have.
    pub vqfrsm: u16,
    /// VQGRAN (46..48): preferred VQ granularity.
    pub vqgran: u16,
    /// VIFRT (64..68).
    pub vifrt: u32,
    /// VIRFA (68..72).
    pub virfa: u32,
    /// VIRFAP (72..74).
    pub virfap: u16,
    /// VIPRT (74..76).
    pub viprt: u16,
    /// VIFRSM (76..78).
    pub vifrsm: u16,
    /// VIGRAN (78..80).
    pub vigran: u16,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl PrimaryCaps {
    /// Decodes the 4096-byte structure.
    pub fn parse(b: &[u8; IDENTIFY_LEN]) -> Self {
        PrimaryCaps {
            cntlid: le16(b, 0),
            crt: b[4],
            vqfrt: le32(b, 32),
            vqrfa: le32(b, 36),
            vqrfap: le16(b, 40),
            vqprt: le16(b, 42),
            vqfrsm: le16(b, 44),
            vqgran: le16(b, 46),
            vifrt: le32(b, 64),
            virfa: le32(b, 68),
            virfap: le16(b, 72),
            viprt: le16(b, 74),
            vifrsm: le16(b, 76),
            vigran: le16(b, 78),
        }
    }

    /// Flexible total, allocated to the primary, per-secondary maximum and
    /// granularity of one resource type.
    pub fn of(&self, rt: ResourceType) -> (u32, u32, u16, u16) {
        match rt {
            ResourceType::Vq => (self.vqfrt, u32::from(self.vqrfap), self.vqfrsm, self.vqgran),
            ResourceType::Vi => (self.vifrt, u32::from(self.virfap), self.vifrsm, self.vigran),
        }
    }

    /// Whether the controller supports flexible resources of type `rt` (CRT).
    pub fn supports(&self, rt: ResourceType) -> bool {
        self.crt & (1 << rt as u8) != 0
    }
}

/// One Secondary Controller Entry (32 bytes) of the Secondary Controller List.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecondaryController {
    /// SCID (0..2): its controller id.
    pub scid: u16,
    /// PCID (2..4): its primary controller's id.
    pub pcid: u16,
    /// SCS bit 0 (4): online.
    pub online: bool,
    /// VFN (8..10): the VF number it belongs to (1-based; 0: none).
    pub vfn: u16,
    /// NVQ (10..12): VQ resources assigned.
    pub nvq: u16,
    /// NVI (12..14): VI resources assigned.
    pub nvi: u16,
}

/// Decodes a Secondary Controller List: NUMID (byte 0, at most 127) entries
/// of 32 bytes from byte 32.
pub fn parse_secondary_list(b: &[u8; IDENTIFY_LEN]) -> Vec<SecondaryController> {
    let n = usize::from(b[0]).min(MAX_LIST_ENTRIES);
    (0..n)
        .map(|i| {
            let e = &b[32 + 32 * i..64 + 32 * i];
            SecondaryController {
                scid: le16(e, 0),
                pcid: le16(e, 2),
                online: e[4] & 1 != 0,
                vfn: le16(e, 8),
                nvq: le16(e, 10),
                nvi: le16(e, 12),
            }
        })
        .collect()
}

/// The real controller: the character device `/dev/nvmeN` of a PF bound to
/// the kernel's `nvme` driver.
#[derive(Debug)]
pub struct NvmeDevice {
    file: File,
    path: PathBuf,
    pf: PciAddress,
}

impl NvmeDevice {
    /// Opens the NVMe controller of `pf`: the one `nvmeN` entry of
    /// `<sysfs>/bus/pci/devices/<pf>/nvme/`, waited for (at most
    /// 15 s) until its `state` is `live`, then `/dev/nvmeN`,
    /// checked to be the character device whose number the controller's
    /// sysfs `dev` attribute gives.
    pub fn open(sysfs_root: &Path, pf: PciAddress) -> Result<Self, Error> {
        let fail = |reason: String, source: Option<io::Error>| Error::NvmeController {
            pf,
            reason,
            source,
        };
        let dir = sysfs_root.join(pf.sysfs_rel()).join("nvme");
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            fail(
                format!(
                    "no NVMe controller ({} cannot be read): is the PF bound to the nvme driver?",
                    dir.display()
                ),
                Some(e),
            )
        })?;
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| {
                n.strip_prefix("nvme").is_some_and(|d| {
                    !d.is_empty() && d.len() <= 5 && d.bytes().all(|b| b.is_ascii_digit())
                })
            })
            .collect();
        names.sort();
        let name = match names.as_slice() {
            [one] => one.clone(),
            [] => return Err(fail(format!("no nvmeN entry in {}", dir.display()), None)),
            many => {
                return Err(fail(
                    format!("several controllers in {}: {many:?}", dir.display()),
                    None,
                ))
            }
        };
        let ctrl = dir.join(&name);
        let deadline = Instant::now() + LIVE_TIMEOUT;
        loop {
            let state = std::fs::read_to_string(ctrl.join("state"))
                .map_err(|e| fail(format!("cannot read {}/state", ctrl.display()), Some(e)))?;
            if state.trim() == "live" {
                break;
            }
            if Instant::now() >= deadline {
                return Err(fail(
                    format!(
                        "controller {name} is {:?}, not live, after {} s",
                        state.trim(),
                        LIVE_TIMEOUT.as_secs()
                    ),
                    None,
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let dev = std::fs::read_to_string(ctrl.join("dev"))
            .map_err(|e| fail(format!("cannot read {}/dev", ctrl.display()), Some(e)))?;
        let (major, minor) = dev
            .trim()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
            .ok_or_else(|| fail(format!("unexpected {}/dev: {dev:?}", ctrl.display()), None))?;
        let path = Path::new("/dev").join(&name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| fail(format!("cannot open {}", path.display()), Some(e)))?;
        let meta = file
            .metadata()
            .map_err(|e| fail(format!("cannot stat {}", path.display()), Some(e)))?;
        if !meta.file_type().is_char_device() || meta.rdev() != libc::makedev(major, minor) {
            return Err(fail(
                format!(
                    "{} is not the character device {major}:{minor} of controller {name}",
                    path.display()
                ),
                None,
            ));
        }
        Ok(NvmeDevice { file, path, pf })
    }
}

impl NvmeAdmin for NvmeDevice {
    fn name(&self) -> String {
        format!("{} (PF {})", self.path.display(), self.pf)
    }

    fn admin(&self, cmd: &AdminCommand, data: Option<&mut [u8]>) -> Result<u32, AdminError> {
        let (addr, len) = match data {
            Some(buf) => (buf.as_mut_ptr() as u64, buf.len()),
            None => (0, 0),
        };
        if len != cmd.data_len as usize {
            return Err(AdminError::Os(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "data buffer of {len} bytes for a {}-byte transfer",
                    cmd.data_len
                ),
            )));
        }
        let mut pt = cmd.to_passthru(addr);
        // SAFETY: `self.file` is an open NVMe controller character device
        // (checked in `open`); `pt` is a live, exclusively borrowed
        // `struct nvme_passthru_cmd` (repr(C), 72 bytes, size asserted) that
        // the ioctl reads and updates in place; `pt.addr`/`pt.data_len` name
        // a buffer exclusively borrowed for this call whose length equals
        // `data_len` (checked above), so the kernel writes only inside it.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                NVME_IOCTL_ADMIN_CMD as libc::c_ulong,
                &mut pt as *mut PassthruCmd,
            )
        };
        match rc {
            0 => Ok(pt.result),
            r if r < 0 => Err(AdminError::Os(io::Error::last_os_error())),
            status => Err(AdminError::Status(status as u16)),
        }
    }
}
