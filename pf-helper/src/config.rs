//! The helper daemon's TOML configuration.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use svff_types::PausePolicy;
use toml::Spanned;

use crate::bitstream::BitstreamConfig;
use crate::error::Error;
use crate::pci::{DriverName, PciAddress};
use crate::qdma::QdmaProfile;

/// Default config path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/svff/helper.toml";
/// Default socket path.
pub const DEFAULT_SOCKET_PATH: &str = "/run/svff/helper.sock";

/// Default state directory (assignment table and journal).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/svff";

/// The daemon's configuration (`/etc/svff/helper.toml`): the daemon's own
/// settings, the PFs it manages and the VMs their VFs go to. Unknown keys are
/// errors; every error names the file, the line and column, and the key
/// (`pf[1].vfs`, `vm[0].vfs[0].index`), see [`Error::ConfigAt`].
///
/// ```toml
/// socket = "/run/svff/helper.sock"   # default
/// socket_group = "svff"              # group owning the socket (name or number); optional
/// allowed_uids = [0]                 # peers allowed by uid (SO_PEERCRED)
/// allowed_gids = [990]               # peers allowed by primary or supplementary gid
/// vf_drivers = ["vfio-pci"]          # drivers VFs may be bound to (default)
/// watchdog_s = 60                    # a change running longer is reported stuck (default)
/// state_dir = "/var/lib/svff"        # assignment table and journal (default)
///
/// [[pf]]
/// bdf = "0000:01:00.0"
/// profile = "generic"                # generic (own driver) | pci-pf-stub | qdma | nvme
/// driver = "igb"                     # generic: PF driver to bind first; optional
/// vfs = 4                            # VF count `svff init` creates; optional
///
/// [[pf]]
/// bdf = "0000:81:00.0"
/// profile = "qdma"                   # PF driver qdma-pf
/// vfs = 8
/// qdma = { pf = { qmax = 512 }, vf = { qmax = 64 } }   # per-function settings
/// bitstream = { fpga_manager = "fpga0", firmware = "svff_user.bin" }
///
/// [[pf]]
/// bdf = "0000:02:00.0"
/// profile = "nvme"                   # PF driver nvme: VFs are NVMe secondary controllers
/// nvme = { vq = 2, vi = 1, vf = { 3 = { vq = 4, vi = 2 } } }   # every VF, VF 3 apart
/// vfs = 12
/// pool = true                        # the 12 VFs are a pool: reconf --resources, never a count change
///
/// [[vm]]
/// name = "vm1"
/// kind = "qmp"                       # an existing QEMU / svff-vmm, reached over QMP
/// qmp = "/run/vm1/qmp.sock"
/// hotplug_ports = ["rp0", "rp1"]     # buses for device_add (q35 root ports)
/// # properties added to every device_add (svff's patched QEMU: its pausable device,
/// # with the guest-driver recovery of qemu-fork/README.md); default: driver vfio-pci
/// device_props = { driver = "svff-vfio-pci", recover = "aer-nonfatal" }
/// pause_policy = "ignore"            # ignore | stall (default ignore)
/// vfs = [{ pf = "0000:01:00.0", count = 2 }, { pf = "0000:81:00.0", index = [0, 3] }]
///
/// [[vm]]
/// name = "vm2"
/// kind = "svff-vmm"                  # started and supervised by svff (init), see orch/README.md
/// qmp = "/run/svff/vm2.qmp"          # svff adds `--qmp` with this path
/// # the VMM's command line without --qmp/--vfio (svff adds one `--vfio` per VF);
/// # default: ["<dir of the svff binary>/svff-vmm"]
/// command = ["/usr/lib/svff/svff-vmm", "--memory", "512M", "--kernel", "/boot/vmlinuz"]
/// run_as = { uid = 1000, gid = 1000, groups = [108] }  # unprivileged VMM (implies
///                                    # pass_group_fd: svff opens /dev/vfio/N and passes it)
/// pass_group_fd = false              # hand the VMM open VFIO group fds (default false)
/// vfs = [{ pf = "0000:02:00.0", count = 2 }]
///
/// [[vm]]
/// name = "vm3"
/// kind = "libvirt"                   # a libvirt domain (svff built with feature `libvirt`)
/// libvirt = { domain = "guest1", uri = "qemu:///system", live = true, persistent = true }
/// vfs = [{ pf = "0000:02:00.0", count = 1 }]
/// ```
///
/// The file must be owned by root and not writable by group or others.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Unix socket path (ignored under systemd socket activation).
    pub socket: PathBuf,
    /// Group that owns the socket (mode 0660); name or decimal gid.
    pub socket_group: Option<String>,
    /// Peer uids allowed to talk to the daemon.
    pub allowed_uids: Vec<u32>,
    /// Gids allowed to talk to the daemon: a peer whose primary gid or one of
    /// whose supplementary groups (`SO_PEERGROUPS`) is listed is let in.
    pub allowed_gids: Vec<u32>,
    /// Drivers VFs may be bound to.
    pub vf_drivers: Vec<DriverName>,
    /// Seconds a change (vfs_set; program adds its `timeout_s`) may take
    /// before the daemon answers that it is stuck in the kernel (default 60).
    pub watchdog_s: u64,
    /// Where the assignment table and the journal live.
    pub state_dir: PathBuf,
    /// The PFs the daemon may manage: its allow-list.
    pub pfs: Vec<PfConfig>,
    /// The VMs VFs are assigned to.
    pub vms: Vec<VmConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_socket")]
    socket: PathBuf,
    #[serde(default)]
    socket_group: Option<String>,
    #[serde(default)]
    allowed_uids: Vec<u32>,
    #[serde(default)]
    allowed_gids: Vec<u32>,
    #[serde(default = "default_vf_drivers")]
    vf_drivers: Vec<DriverName>,
    #[serde(default = "default_watchdog")]
    watchdog_s: u64,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default, rename = "pf")]
    pfs: Vec<Spanned<PfConfig>>,
    #[serde(default, rename = "vm")]
    vms: Vec<Spanned<RawVm>>,
}

/// How a PF is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PfProfile {
    /// The PF's own driver (`driver`, or whatever is bound).
    Generic,
    /// `pci-pf-stub`: SR-IOV on any PF with a standard capability.
    PciPfStub,
    /// Xilinx/AMD QDMA: `qdma-pf`, with `qdma` per-function settings.
    Qdma,
    /// The kernel's `nvme` driver: VFs are NVMe secondary controllers with
    /// `nvme` flexible VQ/VI resources.
    Nvme,
}

/// One allowed PF.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PfConfig {
    /// The PF's address.
    pub bdf: PciAddress,
    /// How the PF is driven (default: from `driver`; `generic` without one).
    #[serde(default)]
    pub profile: Option<PfProfile>,
    /// The PF driver to bind before changing the VF count (own driver,
    /// `pci-pf-stub`, `qdma-pf`); implied by `profile` `pci-pf-stub` and `qdma`.
    #[serde(default)]
    pub driver: Option<DriverName>,
    /// The VF count `svff init` creates (none: init leaves the count alone).
    #[serde(default)]
    pub vfs: Option<u16>,
    /// QDMA settings applied after VF creation.
    #[serde(default)]
    pub qdma: Option<QdmaProfile>,
    /// How to program the FPGA behind this PF.
    #[serde(default)]
    pub bitstream: Option<BitstreamConfig>,
    /// NVMe VF resources (nvme profile, PF on the `nvme` driver), applied
    /// after VF creation: `nvme = { vq = 2, vi = 1, vf = { 3 = { vq = 4, vi = 2 } } }`.
    #[serde(default)]
    pub nvme: Option<crate::nvme::NvmeProfile>,
    /// Pool mode (nvme profile): `init` creates the PF's `vfs` VFs once (the
    /// pool); `svff reconf --resources` then changes VF resources, pausing
    /// only the VFs concerned, and `sriov_numvfs` is never written again.
    #[serde(default)]
    pub pool: bool,
}

/// How svff reaches a VM's VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmKind {
    /// svff's own VMM, started and supervised by svff.
    SvffVmm,
    /// An existing QEMU or svff-vmm, reached through its QMP socket.
    Qmp,
    /// A libvirt domain (`libvirt = { domain, uri, live, persistent }`),
    /// reached through the libvirt API (see `orch/libvirt.rs`).
    Libvirt,
}

/// Where a VM of kind `libvirt` lives and how its VFs are attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtTarget {
    /// The domain's name.
    pub domain: String,
    /// The connection URI (default `qemu:///system`).
    #[serde(default = "default_libvirt_uri")]
    pub uri: String,
    /// Attach and detach in the running domain (default true).
    #[serde(default = "default_true")]
    pub live: bool,
    /// Attach and detach in the domain's persistent config too (default true).
    #[serde(default = "default_true")]
    pub persistent: bool,
}

fn default_libvirt_uri() -> String {
    "qemu:///system".into()
}

fn default_true() -> bool {
    true
}

/// Which VFs of a PF a VM gets: `count` VFs (the lowest free indices) or
/// exactly the VFs `index`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VfSelect {
    /// The PF.
    pub pf: PciAddress,
    /// How many VFs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u16>,
    /// Which VFs (`virtfnN` indices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Vec<u16>>,
}

/// One VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Its name (`[A-Za-z][A-Za-z0-9_-]*`, at most 32 bytes), used by `--assign`.
    pub name: String,
    /// How svff reaches it.
    pub kind: VmKind,
    /// Its QMP socket (empty for kind `libvirt`).
    pub qmp: PathBuf,
    /// For kind `libvirt`: the domain.
    pub libvirt: Option<LibvirtTarget>,
    /// Buses `device_add` may put a VF on (QEMU ids of q35 root ports), used
    /// in order; empty: `device_add` without `bus`.
    pub hotplug_ports: Vec<String>,
    /// Kind `qmp`: properties of every `device_add` (e.g. `driver =
    /// "svff-vfio-pci"`, `recover = "aer-nonfatal"` for svff's QEMU); the
    /// driver defaults to `vfio-pci`. `host`, `id`, `bus` and `fdname` are svff's.
    pub device_props: BTreeMap<String, String>,
    /// Guest BAR access policy while a VF is paused.
    pub pause_policy: PausePolicy,
    /// Deadline of a stalled access in milliseconds (policy `stall`).
    pub stall_ms: Option<u64>,
    /// Hand the VMM an open VFIO group fd at unpause (for VMMs that cannot
    /// open `/dev/vfio` themselves).
    pub pass_group_fd: bool,
    /// Deadline of every QMP command, seconds (default 10).
    pub qmp_timeout_s: u64,
    /// Deadline for `DEVICE_DELETED` after `device_del`, seconds (default 30).
    pub detach_timeout_s: u64,
    /// For `svff-vmm`: its command line without `--qmp` and `--vfio` (svff
    /// adds them); empty: the `svff-vmm` beside the running `svff` binary.
    pub command: Vec<String>,
    /// For `svff-vmm`: run the VMM as this user (unprivileged, no
    /// `/dev/vfio` access: svff passes every VFIO group fd, and
    /// `pass_group_fd` is on).
    pub run_as: Option<RunAs>,
    /// The VFs it gets at init.
    pub vfs: Vec<VfSelect>,
}

/// The credentials an svff-started VMM runs with (`run_as = { uid, gid, groups }`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunAs {
    /// User id (not 0).
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (e.g. the group owning `/dev/kvm`); default none.
    #[serde(default)]
    pub groups: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    kind: VmKind,
    #[serde(default)]
    qmp: Option<PathBuf>,
    #[serde(default)]
    libvirt: Option<LibvirtTarget>,
    #[serde(default)]
    hotplug_ports: Vec<String>,
    #[serde(default)]
    device_props: BTreeMap<String, String>,
    #[serde(default)]
    pause_policy: PausePolicy,
    #[serde(default)]
    stall_ms: Option<u64>,
    #[serde(default)]
    pass_group_fd: bool,
    #[serde(default = "default_qmp_timeout")]
    qmp_timeout_s: u64,
    #[serde(default = "default_detach_timeout")]
    detach_timeout_s: u64,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    run_as: Option<RunAs>,
    #[serde(default)]
    vfs: Vec<VfSelect>,
}

/// What is wrong with the `libvirt`/`qmp` keys of `vm` for its kind: (key, reason).
fn libvirt_problem(vm: &RawVm) -> Option<(&'static str, String)> {
    match (vm.kind, &vm.libvirt) {
        (VmKind::Libvirt, None) => Some((
            "kind",
            "kind \"libvirt\" needs libvirt = { domain = \"...\" }".into(),
        )),
        (VmKind::Libvirt, Some(l)) => {
            if vm.qmp.is_some() {
                return Some((
                    "qmp",
                    "qmp is not for kind \"libvirt\" (libvirt owns the monitor)".into(),
                ));
            }
            if !vm.hotplug_ports.is_empty() {
                return Some((
                    "hotplug_ports",
                    "hotplug_ports is not for kind \"libvirt\" (libvirt picks a free root port)"
                        .into(),
                ));
            }
            if !vm.device_props.is_empty() {
                return Some((
                    "device_props",
                    "device_props is not for kind \"libvirt\" (libvirt builds the device: use <qemu:override>)".into(),
                ));
            }
            if !vm.command.is_empty() || vm.run_as.is_some() {
                return Some((
                    "kind",
                    "command and run_as are for kind \"svff-vmm\" only".into(),
                ));
            }
            if l.domain.is_empty()
                || l.domain.len() > 200
                || l.domain.chars().any(|c| c.is_control() || c == '/')
            {
                return Some((
                    "libvirt",
                    format!("invalid libvirt domain name {:?}", l.domain),
                ));
            }
            if !l.uri.contains(":///") && !l.uri.contains("://") {
                return Some(("libvirt", format!("invalid libvirt URI {:?}", l.uri)));
            }
            if !l.live && !l.persistent {
                return Some((
                    "libvirt",
                    "libvirt: live and persistent are both false".into(),
                ));
            }
            None
        }
        (_, Some(_)) => Some(("libvirt", "libvirt is for kind \"libvirt\" only".into())),
        (_, None) => None,
    }
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET_PATH)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

fn default_watchdog() -> u64 {
    60
}

fn default_qmp_timeout() -> u64 {
    10
}

fn default_detach_timeout() -> u64 {
    30
}

fn default_vf_drivers() -> Vec<DriverName> {
    vec![DriverName::vfio_pci()]
}

/// Line and column (1-based) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

/// The key path at byte `span.start`: the enclosing `[table]` / `[[array]]`
/// header (arrays counted: `pf[1]`) and the key of the line, or the text
/// under the span when the line has no `=` (an unknown key the span covers).
fn key_at(text: &str, span: &std::ops::Range<usize>) -> String {
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut table = String::new();
    let mut header_line = false;
    for l in text[..line_end].lines() {
        let t = l.trim();
        header_line = true;
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_owned();
            let n = counts
                .entry(name.clone())
                .and_modify(|n| *n += 1)
                .or_insert(0);
            table = format!("{name}[{n}]");
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_owned();
        } else {
            header_line = false;
        }
    }
    let line = &text[line_start..line_end];
    let key = if header_line {
        String::new()
    } else {
        match line.split_once('=') {
            Some((k, _)) => k.trim().to_owned(),
            None => text.get(span.clone()).unwrap_or("").trim().to_owned(),
        }
    };
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

/// The span of `key = ...` in the table whose header (or first key) `table`
/// points at: searched up to the next table header; else `table` itself.
fn key_span(text: &str, table: &std::ops::Range<usize>, key: &str) -> std::ops::Range<usize> {
    let start = table.start.min(text.len());
    let mut pos = text[..start].rfind('\n').map_or(0, |i| i + 1);
    for (n, l) in text[pos..].split_inclusive('\n').enumerate() {
        let t = l.trim_start();
        if n > 0 && t.starts_with('[') {
            break;
        }
        if let Some((k, _)) = l.split_once('=') {
            if k.trim() == key {
                let lead = l.len() - t.len();
                return pos + lead..pos + lead + key.len();
            }
        }
        pos += l.len();
    }
    table.clone()
}

/// What is wrong with an svff-vmm `command`, if anything: the program
/// must be an absolute path, and `--qmp`/`--vfio` are svff's to add.
fn command_problem(command: &[String]) -> Option<String> {
    let program = command.first()?;
    if !Path::new(program).is_absolute() {
        return Some(format!("command[0] {program:?} must be an absolute path"));
    }
    command.iter().find_map(|a| {
        ["--qmp", "--vfio"]
            .iter()
            .find(|o| a == *o || a.starts_with(&format!("{o}=")))
            .map(|o| format!("command must not contain {o}: svff adds it"))
    })
}

fn valid_vm_name(name: &str) -> bool {
    name.len() <= 32
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A QEMU id (`[A-Za-z][A-Za-z0-9._-]*`), as a bus name for `device_add`.
pub(crate) fn valid_qemu_id(id: &str) -> bool {
    id.len() <= 64
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

impl PfConfig {
    /// The profile in force: `profile`, else implied by `driver`.
    pub fn effective_profile(&self) -> PfProfile {
        match (self.profile, self.driver.as_ref().map(DriverName::as_str)) {
            (Some(p), _) => p,
            (None, Some("pci-pf-stub")) => PfProfile::PciPfStub,
            (None, Some(crate::qdma::QDMA_PF_DRIVER)) => PfProfile::Qdma,
            (None, Some(crate::nvme::NVME_PF_DRIVER)) => PfProfile::Nvme,
            (None, _) => PfProfile::Generic,
        }
    }

    /// The PF driver to bind before changing VFs.
    pub fn pf_driver(&self) -> Option<DriverName> {
        match self.effective_profile() {
            PfProfile::Generic => self.driver.clone(),
            PfProfile::PciPfStub => DriverName::parse("pci-pf-stub").ok(),
            PfProfile::Qdma => DriverName::parse(crate::qdma::QDMA_PF_DRIVER).ok(),
            PfProfile::Nvme => DriverName::parse(crate::nvme::NVME_PF_DRIVER).ok(),
        }
    }
}

impl Config {
    /// Parses and checks config text; `path` names the file in errors, which
    /// carry the line, column and key they are about ([`Error::ConfigAt`]).
    pub fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        let at = |span: std::ops::Range<usize>, reason: String| {
            let (line, column) = line_col(text, span.start);
            Error::ConfigAt {
                path: path.to_owned(),
                line,
                column,
                key: key_at(text, &span),
                reason,
            }
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => at(span, e.message().trim_end().to_owned()),
            None => Error::Config {
                path: path.to_owned(),
                reason: e.message().trim_end().to_owned(),
            },
        })?;
        let mut seen = std::collections::BTreeSet::new();
        let mut pfs = Vec::new();
        for spanned in &raw.pfs {
            let pf = spanned.get_ref();
            let span = spanned.span();
            let key = |k: &str| key_span(text, &span, k);
            if !seen.insert(pf.bdf) {
                return Err(at(key("bdf"), format!("PF {} listed twice", pf.bdf)));
            }
            if let Some(q) = &pf.qdma {
                q.validate().map_err(|r| at(key("qdma"), r))?;
                if pf.effective_profile() != PfProfile::Qdma {
                    return Err(at(
                        key("qdma"),
                        format!("PF {}: qdma settings need profile \"qdma\"", pf.bdf),
                    ));
                }
            }
            if let Some(n) = &pf.nvme {
                n.resources()
                    .map_err(|r| at(key("nvme"), format!("PF {}: {r}", pf.bdf)))?;
                if pf.effective_profile() != PfProfile::Nvme {
                    return Err(at(
                        key("nvme"),
                        format!("PF {}: nvme resources need profile \"nvme\"", pf.bdf),
                    ));
                }
            }
            if pf.pool {
                if pf.effective_profile() != PfProfile::Nvme {
                    return Err(at(
                        key("pool"),
                        format!("PF {}: pool mode needs profile \"nvme\"", pf.bdf),
                    ));
                }
                if pf.vfs.is_none_or(|n| n == 0) {
                    return Err(at(
                        key("pool"),
                        format!("PF {}: pool mode needs the pool size as vfs = N", pf.bdf),
                    ));
                }
            }
            if let Some(b) = &pf.bitstream {
                b.validate()
                    .map_err(|r| at(key("bitstream"), format!("PF {}: {r}", pf.bdf)))?;
            }
            if let (Some(p), Some(d)) = (pf.profile, &pf.driver) {
                let implied = match p {
                    PfProfile::Generic => None,
                    PfProfile::PciPfStub => Some("pci-pf-stub"),
                    PfProfile::Qdma => Some(crate::qdma::QDMA_PF_DRIVER),
                    PfProfile::Nvme => Some(crate::nvme::NVME_PF_DRIVER),
                };
                if implied.is_some_and(|i| i != d.as_str()) {
                    return Err(at(
                        key("driver"),
                        format!(
                            "PF {}: profile {} uses driver {}, not {d}",
                            pf.bdf,
                            serde_json::to_string(&p).unwrap_or_default(),
                            implied.unwrap_or_default()
                        ),
                    ));
                }
            }
            pfs.push(pf.clone());
        }
        let mut vms: Vec<VmConfig> = Vec::new();
        // Indices taken per PF, to refuse double assignments.
        let mut taken: BTreeMap<(PciAddress, u16), String> = BTreeMap::new();
        let mut counted: BTreeMap<PciAddress, u32> = BTreeMap::new();
        for spanned in &raw.vms {
            let vm = spanned.get_ref();
            let span = spanned.span();
            let key = |k: &str| key_span(text, &span, k);
            if !valid_vm_name(&vm.name) {
                return Err(at(
                    key("name"),
                    format!(
                        "invalid VM name {:?} (allowed: a letter, then letters, digits, _ and -; at most 32)",
                        vm.name
                    ),
                ));
            }
            if vms.iter().any(|v| v.name == vm.name) {
                return Err(at(key("name"), format!("VM {} listed twice", vm.name)));
            }
            if let Some(reason) = libvirt_problem(vm) {
                return Err(at(key(reason.0), format!("VM {}: {}", vm.name, reason.1)));
            }
            let qmp = vm.qmp.clone().unwrap_or_default();
            if vm.kind != VmKind::Libvirt && !qmp.is_absolute() {
                return Err(at(
                    key("qmp"),
                    format!("VM {}: qmp must be an absolute socket path", vm.name),
                ));
            }
            if let Some(p) = vm.hotplug_ports.iter().find(|p| !valid_qemu_id(p)) {
                return Err(at(
                    key("hotplug_ports"),
                    format!("VM {}: invalid bus id {p:?}", vm.name),
                ));
            }
            if let Some((k, v)) = vm.device_props.iter().find(|(k, v)| {
                !valid_qemu_id(k)
                    || ["host", "id", "bus", "fdname"].contains(&k.as_str())
                    || v.is_empty()
                    || v.len() > 256
                    || !v.bytes().all(|b| b.is_ascii_graphic())
            }) {
                return Err(at(
                    key("device_props"),
                    format!(
                        "VM {}: device property {k:?} = {v:?} not allowed (host, id, bus and fdname are svff's; values are printable ASCII without spaces)",
                        vm.name
                    ),
                ));
            }
            if vm.kind != VmKind::Qmp && !vm.device_props.is_empty() {
                return Err(at(
                    key("device_props"),
                    format!("VM {}: device_props is for kind \"qmp\" only", vm.name),
                ));
            }
            if vm.qmp_timeout_s == 0 || vm.detach_timeout_s == 0 {
                return Err(at(
                    key(if vm.qmp_timeout_s == 0 {
                        "qmp_timeout_s"
                    } else {
                        "detach_timeout_s"
                    }),
                    format!("VM {}: deadlines must be at least 1 s", vm.name),
                ));
            }
            if vm.kind == VmKind::Qmp && !vm.command.is_empty() {
                return Err(at(
                    key("command"),
                    format!("VM {}: command is for kind \"svff-vmm\" only", vm.name),
                ));
            }
            if vm.kind == VmKind::Qmp && vm.run_as.is_some() {
                return Err(at(
                    key("run_as"),
                    format!("VM {}: run_as is for kind \"svff-vmm\" only", vm.name),
                ));
            }
            if let Some(reason) = command_problem(&vm.command) {
                return Err(at(key("command"), format!("VM {}: {reason}", vm.name)));
            }
            if vm.run_as.as_ref().is_some_and(|r| r.uid == 0) {
                return Err(at(
                    key("run_as"),
                    format!(
                        "VM {}: run_as.uid 0 is root; leave run_as out to run the VMM as root",
                        vm.name
                    ),
                ));
            }
            for sel in &vm.vfs {
                let k = key("vfs");
                let Some(pfc) = pfs.iter().find(|p| p.bdf == sel.pf) else {
                    return Err(at(
                        k,
                        format!("VM {}: PF {} is not configured ([[pf]])", vm.name, sel.pf),
                    ));
                };
                let total = pfc.vfs.unwrap_or(0);
                match (sel.count, &sel.index) {
                    (Some(_), Some(_)) | (None, None) => {
                        return Err(at(
                            k,
                            format!(
                                "VM {}: give either count or index for PF {}",
                                vm.name, sel.pf
                            ),
                        ))
                    }
                    (Some(n), None) => *counted.entry(sel.pf).or_default() += u32::from(n),
                    (None, Some(list)) => {
                        for &i in list {
                            if i >= total {
                                return Err(at(
                                    k,
                                    format!(
                                        "VM {}: VF index {i} of PF {} does not exist (the PF gets {total} VFs)",
                                        vm.name, sel.pf
                                    ),
                                ));
                            }
                            if let Some(other) = taken.insert((sel.pf, i), vm.name.clone()) {
                                return Err(at(
                                    k,
                                    format!(
                                        "VM {}: VF {i} of PF {} is already assigned to VM {other}",
                                        vm.name, sel.pf
                                    ),
                                ));
                            }
                        }
                    }
                }
                let explicit = taken.keys().filter(|(p, _)| *p == sel.pf).count() as u32;
                let want = explicit + counted.get(&sel.pf).copied().unwrap_or(0);
                if want > u32::from(total) {
                    return Err(at(
                        k,
                        format!(
                            "VM {}: the VMs ask for {want} VFs of PF {}, which gets {total} (pf.vfs)",
                            vm.name, sel.pf
                        ),
                    ));
                }
            }
            vms.push(VmConfig {
                name: vm.name.clone(),
                kind: vm.kind,
                qmp,
                libvirt: vm.libvirt.clone(),
                hotplug_ports: vm.hotplug_ports.clone(),
                device_props: vm.device_props.clone(),
                pause_policy: vm.pause_policy,
                stall_ms: vm.stall_ms,
                // libvirt's QEMU cannot open new /dev/vfio nodes: every unpause passes the group.
                pass_group_fd: vm.pass_group_fd
                    || vm.run_as.is_some()
                    || vm.kind == VmKind::Libvirt,
                qmp_timeout_s: vm.qmp_timeout_s,
                detach_timeout_s: vm.detach_timeout_s,
                command: vm.command.clone(),
                run_as: vm.run_as.clone(),
                vfs: vm.vfs.clone(),
            });
        }
        if raw.allowed_uids.is_empty() && raw.allowed_gids.is_empty() {
            return Err(Error::Config {
                path: path.to_owned(),
                reason: "allowed_uids and allowed_gids are both empty: nobody could connect".into(),
            });
        }
        if !raw.state_dir.is_absolute() {
            return Err(Error::Config {
                path: path.to_owned(),
                reason: "state_dir must be an absolute path".into(),
            });
        }
        Ok(Config {
            socket: raw.socket,
            socket_group: raw.socket_group,
            allowed_uids: raw.allowed_uids,
            allowed_gids: raw.allowed_gids,
            vf_drivers: raw.vf_drivers,
            watchdog_s: raw.watchdog_s,
            state_dir: raw.state_dir,
            pfs,
            vms,
        })
    }

    /// Reads the file, refusing one that is not owned by root or is writable
    /// by group or others, then parses it.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let bad = |reason: String| Error::Config {
            path: path.to_owned(),
            reason,
        };
        let meta = fs::metadata(path).map_err(|e| bad(format!("cannot stat: {e}")))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.uid() != 0 {
            return Err(bad(format!(
                "owned by uid {}, must be owned by root",
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(bad(format!(
                "mode {:o} is writable by group or others",
                meta.mode() & 0o7777
            )));
        }
        let text = fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        Self::parse(&text, path)
    }

    /// The watchdog of a change.
    pub fn watchdog(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.watchdog_s.max(1))
    }

    /// The allow-list entry of `pf`.
    pub fn pf(&self, pf: PciAddress) -> Option<&PfConfig> {
        self.pfs.iter().find(|p| p.bdf == pf)
    }

    /// The VM called `name`.
    pub fn vm(&self, name: &str) -> Option<&VmConfig> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// Whether a peer with these credentials (uid, primary gid, supplementary
    /// groups) may use the daemon.
    pub fn peer_allowed(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        self.allowed_uids.contains(&uid)
            || self.allowed_gids.contains(&gid)
            || groups.iter().any(|g| self.allowed_gids.contains(g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, Path::new("/etc/svff/helper.toml"))
    }

    #[test]
    fn full_config_parses_with_defaults() {
        let c = parse(
            r#"
            allowed_uids = [0]
            allowed_gids = [990]
            [[pf]]
            bdf = "0000:01:00.0"
            driver = "igb"
            [[pf]]
            bdf = "0000:81:00.0"
            driver = "qdma-pf"
            qdma = { pf = { qmax = 512 }, vf = { qmax = 64 } }
            bitstream = { fpga_manager = "fpga0", firmware = "user.bin" }
            "#,
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(c.vf_drivers, vec![DriverName::vfio_pci()]);
        assert_eq!(c.pfs.len(), 2);
        assert_eq!(c.pfs[1].qdma.as_ref().unwrap().pf["qmax"], 512);
        assert!(c.peer_allowed(0, 5, &[]) && c.peer_allowed(1000, 990, &[]));
        assert!(!c.peer_allowed(1000, 1000, &[1000, 4]));
        assert!(
            c.peer_allowed(1000, 1000, &[4, 990]),
            "a supplementary group lets the peer in"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = parse("allowed_uids = [0]\nallow_everyone = true\n").unwrap_err();
        assert!(err.to_string().contains("allow_everyone"), "{err}");
        let err =
            parse("allowed_uids = [0]\n[[pf]]\nbdf = \"0000:01:00.0\"\nnumvfs = 3\n").unwrap_err();
        assert!(err.to_string().contains("numvfs"), "{err}");
    }

    #[test]
    fn bad_pf_addresses_and_duplicates_are_rejected() {
        assert!(parse("allowed_uids = [0]\n[[pf]]\nbdf = \"0000:01:00.0/../..\"\n").is_err());
        assert!(parse("allowed_uids = [0]\n[[pf]]\nbdf = \"0000:0A:00.0\"\n").is_err());
        let err = parse(
            "allowed_uids = [0]\n[[pf]]\nbdf = \"0000:01:00.0\"\n[[pf]]\nbdf = \"0000:01:00.0\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("twice"));
    }

    const SYSTEM: &str = r#"allowed_uids = [0]
state_dir = "/var/lib/svff-test"

[[pf]]
bdf = "0000:01:00.0"
profile = "pci-pf-stub"
vfs = 4

[[pf]]
bdf = "0000:02:00.0"
driver = "igb"
vfs = 2

[[vm]]
name = "vm1"
kind = "qmp"
qmp = "/run/vm1.sock"
hotplug_ports = ["rp0", "rp1"]
vfs = [{ pf = "0000:01:00.0", count = 2 }, { pf = "0000:02:00.0", index = [1] }]

[[vm]]
name = "vm2"
kind = "svff-vmm"
qmp = "/run/vm2.sock"
pause_policy = "stall"
stall_ms = 200
pass_group_fd = true
command = ["/usr/bin/svff-vmm", "--kernel", "/boot/k"]
vfs = [{ pf = "0000:01:00.0", index = [3] }]
"#;

    /// The error of `text`, which must be a located config error.
    fn located(text: &str) -> (usize, usize, String, String) {
        match parse(text).unwrap_err() {
            Error::ConfigAt {
                line,
                column,
                key,
                reason,
                path,
            } => {
                assert_eq!(path, Path::new("/etc/svff/helper.toml"));
                (line, column, key, reason)
            }
            e => panic!("not a located error: {e}"),
        }
    }

    /// `SYSTEM` with `from` replaced by `to` (which must occur).
    fn system_with(from: &str, to: &str) -> String {
        assert!(SYSTEM.contains(from), "{from}");
        SYSTEM.replacen(from, to, 1)
    }

    #[test]
    fn system_config_with_pfs_and_vms_parses() {
        let c = parse(SYSTEM).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/svff-test"));
        assert_eq!(c.pfs[0].effective_profile(), PfProfile::PciPfStub);
        assert_eq!(c.pfs[0].pf_driver().unwrap().as_str(), "pci-pf-stub");
        assert_eq!(c.pfs[0].vfs, Some(4));
        assert_eq!(c.pfs[1].effective_profile(), PfProfile::Generic);
        assert_eq!(c.pfs[1].pf_driver().unwrap().as_str(), "igb");
        let vm1 = c.vm("vm1").unwrap();
        assert_eq!(vm1.kind, VmKind::Qmp);
        assert_eq!(vm1.hotplug_ports, ["rp0", "rp1"]);
        assert_eq!(vm1.pause_policy, PausePolicy::Ignore);
        assert_eq!((vm1.qmp_timeout_s, vm1.detach_timeout_s), (10, 30));
        assert_eq!(vm1.vfs[0].count, Some(2));
        assert_eq!(vm1.vfs[1].index, Some(vec![1]));
        let vm2 = c.vm("vm2").unwrap();
        assert_eq!(vm2.kind, VmKind::SvffVmm);
        assert_eq!(vm2.pause_policy, PausePolicy::Stall);
        assert!(vm2.pass_group_fd);
        assert_eq!(vm2.stall_ms, Some(200));
    }

    #[test]
    fn libvirt_vm_parses_with_defaults_and_passes_group_fds() {
        let text = system_with(
            "kind = \"qmp\"\nqmp = \"/run/vm1.sock\"\nhotplug_ports = [\"rp0\", \"rp1\"]\n",
            "kind = \"libvirt\"\nlibvirt = { domain = \"guest1\" }\n",
        );
        let c = parse(&text).unwrap();
        let vm1 = c.vm("vm1").unwrap();
        assert_eq!(vm1.kind, VmKind::Libvirt);
        let l = vm1.libvirt.as_ref().unwrap();
        assert_eq!(
            (l.domain.as_str(), l.uri.as_str()),
            ("guest1", "qemu:///system")
        );
        assert!(l.live && l.persistent);
        assert!(
            vm1.pass_group_fd,
            "libvirt's QEMU cannot open new /dev/vfio nodes"
        );
        assert_eq!(c.vm("vm2").unwrap().libvirt, None);
    }

    #[test]
    fn libvirt_vm_config_mistakes_name_the_key() {
        let base = "kind = \"qmp\"\nqmp = \"/run/vm1.sock\"\nhotplug_ports = [\"rp0\", \"rp1\"]\n";
        for (to, key, says) in [
            ("kind = \"libvirt\"\n", "vm[0].kind", "needs libvirt"),
            (
                "kind = \"libvirt\"\nqmp = \"/run/x\"\nlibvirt = { domain = \"g\" }\n",
                "vm[0].qmp",
                "libvirt owns the monitor",
            ),
            (
                "kind = \"libvirt\"\nhotplug_ports = [\"rp0\"]\nlibvirt = { domain = \"g\" }\n",
                "vm[0].hotplug_ports",
                "free root port",
            ),
            (
                "kind = \"libvirt\"\nlibvirt = { domain = \"g\", live = false, persistent = false }\n",
                "vm[0].libvirt",
                "both false",
            ),
            (
                "kind = \"libvirt\"\nlibvirt = { domain = \"a/b\" }\n",
                "vm[0].libvirt",
                "invalid libvirt domain",
            ),
            (
                "kind = \"qmp\"\nqmp = \"/run/vm1.sock\"\nlibvirt = { domain = \"g\" }\n",
                "vm[0].libvirt",
                "for kind \"libvirt\" only",
            ),
        ] {
            let (_, _, k, reason) = located(&system_with(base, to));
            assert_eq!(k, key, "{to}: {reason}");
            assert!(reason.contains(says), "{to}: {reason}");
        }
    }

    #[test]
    fn commented_example_file_parses() {
        let text = include_str!("../systemd/helper.toml.example");
        let c = parse(text).unwrap();
        assert!(!c.pfs.is_empty());
    }

    #[test]
    fn unknown_key_error_names_line_and_key() {
        let (line, col, key, reason) = located(&system_with("vfs = 2\n", "vfs = 2\nnumvfs = 3\n"));
        assert_eq!((line, col), (13, 1), "{key} {reason}");
        assert_eq!(key, "pf[1].numvfs");
        assert!(reason.contains("unknown field `numvfs`"), "{reason}");
        let (line, _, key, _) = located(&system_with(
            "kind = \"qmp\"\n",
            "kind = \"qmp\"\nqmp_path = \"/x\"\n",
        ));
        assert_eq!((line, key.as_str()), (17, "vm[0].qmp_path"));
    }

    #[test]
    fn wrong_types_and_values_name_line_and_key() {
        let (line, _, key, reason) = located(&system_with("vfs = 4", "vfs = \"four\""));
        assert_eq!((line, key.as_str()), (7, "pf[0].vfs"), "{reason}");
        let (line, _, key, reason) = located(&system_with("kind = \"qmp\"", "kind = \"libvird\""));
        assert_eq!((line, key.as_str()), (16, "vm[0].kind"));
        assert!(reason.contains("libvird"), "{reason}");
        let (line, _, key, _) = located(&system_with(
            "profile = \"pci-pf-stub\"",
            "profile = \"fancy\"",
        ));
        assert_eq!((line, key.as_str()), (6, "pf[0].profile"));
        let (line, _, key, _) = located(&system_with(
            "bdf = \"0000:02:00.0\"",
            "bdf = \"0000:02:00\"",
        ));
        assert_eq!((line, key.as_str()), (10, "pf[1].bdf"));
        let (line, _, key, _) = located(&system_with(
            "pause_policy = \"stall\"",
            "pause_policy = \"wait\"",
        ));
        assert_eq!((line, key.as_str()), (25, "vm[1].pause_policy"));
    }

    #[test]
    fn qmp_device_props_parse_and_svffs_own_keys_or_other_kinds_are_refused() {
        let c = parse(&system_with(
            "hotplug_ports = [\"rp0\", \"rp1\"]\n",
            "hotplug_ports = [\"rp0\", \"rp1\"]\ndevice_props = { driver = \"svff-vfio-pci\", recover = \"aer-nonfatal\" }\n",
        ))
        .unwrap();
        let vm1 = c.vm("vm1").unwrap();
        assert_eq!(vm1.device_props["driver"], "svff-vfio-pci");
        assert_eq!(vm1.device_props["recover"], "aer-nonfatal");
        assert!(c.vm("vm2").unwrap().device_props.is_empty());
        for (props, why) in [
            ("{ host = \"0000:01:10.0\" }", "not allowed"),
            ("{ bus = \"rp9\" }", "not allowed"),
            ("{ recover = \"a b\" }", "not allowed"),
            ("{ \"9x\" = \"1\" }", "not allowed"),
        ] {
            let (_, _, key, reason) = located(&system_with(
                "hotplug_ports = [\"rp0\", \"rp1\"]\n",
                &format!("hotplug_ports = [\"rp0\", \"rp1\"]\ndevice_props = {props}\n"),
            ));
            assert_eq!(key, "vm[0].device_props", "{props}");
            assert!(reason.contains(why), "{props}: {reason}");
        }
        let (_, _, key, reason) = located(&system_with(
            "pass_group_fd = true\n",
            "pass_group_fd = true\ndevice_props = { driver = \"x\" }\n",
        ));
        assert_eq!(key, "vm[1].device_props");
        assert!(reason.contains("kind \"qmp\" only"), "{reason}");
    }

    #[test]
    fn svff_vmm_run_as_parses_implies_pass_group_fd_and_bad_commands_are_refused() {
        let c = parse(&system_with(
            "pass_group_fd = true\n",
            "run_as = { uid = 1000, gid = 1000, groups = [108] }\n",
        ))
        .unwrap();
        let vm2 = c.vm("vm2").unwrap();
        assert_eq!(
            vm2.run_as,
            Some(RunAs {
                uid: 1000,
                gid: 1000,
                groups: vec![108]
            })
        );
        assert!(vm2.pass_group_fd, "run_as implies pass_group_fd");
        let cases = [
            (
                "pass_group_fd = true\n",
                "run_as = { uid = 0, gid = 0 }\n",
                "vm[1].run_as",
                "uid 0 is root",
            ),
            (
                "pass_group_fd = true\n",
                "run_as = { uid = 5, gid = 5, shell = 1 }\n",
                "vm[1].run_as",
                "shell",
            ),
            (
                "command = [\"/usr/bin/svff-vmm\", \"--kernel\", \"/boot/k\"]",
                "command = [\"/usr/bin/svff-vmm\", \"--qmp\", \"/x\"]",
                "vm[1].command",
                "must not contain --qmp",
            ),
            (
                "command = [\"/usr/bin/svff-vmm\", \"--kernel\", \"/boot/k\"]",
                "command = [\"svff-vmm\"]",
                "vm[1].command",
                "absolute path",
            ),
            (
                "hotplug_ports = [\"rp0\", \"rp1\"]",
                "run_as = { uid = 5, gid = 5 }",
                "vm[0].run_as",
                "for kind \"svff-vmm\" only",
            ),
        ];
        for (from, to, want_key, want_reason) in cases {
            let (_, _, key, reason) = located(&system_with(from, to));
            assert_eq!(key, want_key, "{to}: {reason}");
            assert!(reason.contains(want_reason), "{to}: {reason}");
        }
    }

    #[test]
    fn vm_errors_name_the_vm_line_and_key() {
        let cases: [(&str, &str, usize, &str, &str); 9] = [
            (
                "name = \"vm2\"",
                "name = \"vm1\"",
                22,
                "vm[1].name",
                "VM vm1 listed twice",
            ),
            (
                "name = \"vm2\"",
                "name = \"2vm\"",
                22,
                "vm[1].name",
                "invalid VM name",
            ),
            (
                "qmp = \"/run/vm1.sock\"",
                "qmp = \"vm1.sock\"",
                17,
                "vm[0].qmp",
                "absolute",
            ),
            (
                "[\"rp0\", \"rp1\"]",
                "[\"rp0\", \"r p\"]",
                18,
                "vm[0].hotplug_ports",
                "invalid bus id",
            ),
            (
                "index = [3]",
                "index = [4]",
                29,
                "vm[1].vfs",
                "VF index 4 of PF 0000:01:00.0 does not exist (the PF gets 4 VFs)",
            ),
            (
                "index = [3]",
                "index = [0, 0]",
                29,
                "vm[1].vfs",
                "already assigned to VM vm2",
            ),
            (
                "index = [3]",
                "count = 3",
                29,
                "vm[1].vfs",
                "ask for 5 VFs of PF 0000:01:00.0, which gets 4",
            ),
            (
                "pf = \"0000:01:00.0\", index = [3]",
                "pf = \"0000:03:00.0\", index = [3]",
                29,
                "vm[1].vfs",
                "PF 0000:03:00.0 is not configured",
            ),
            (
                "index = [3]",
                "index = [3], count = 1",
                29,
                "vm[1].vfs",
                "either count or index",
            ),
        ];
        for (from, to, want_line, want_key, want_reason) in cases {
            let (line, _, key, reason) = located(&system_with(from, to));
            assert_eq!(
                (line, key.as_str()),
                (want_line, want_key),
                "{to}: {reason}"
            );
            assert!(reason.contains(want_reason), "{to}: {reason}");
        }
    }

    #[test]
    fn pf_profile_conflicts_are_located() {
        let (line, _, key, reason) = located(&system_with(
            "profile = \"pci-pf-stub\"",
            "profile = \"pci-pf-stub\"\ndriver = \"igb\"",
        ));
        assert_eq!((line, key.as_str()), (7, "pf[0].driver"));
        assert!(
            reason.contains("uses driver pci-pf-stub, not igb"),
            "{reason}"
        );
        let (line, _, key, reason) = located(&system_with(
            "driver = \"igb\"",
            "driver = \"igb\"\nqdma = { vf = { qmax = 8 } }",
        ));
        assert_eq!((line, key.as_str()), (12, "pf[1].qdma"));
        assert!(reason.contains("need profile \"qdma\""), "{reason}");
        let (line, _, key, _) = located(&system_with(
            "bdf = \"0000:02:00.0\"",
            "bdf = \"0000:01:00.0\"",
        ));
        assert_eq!((line, key.as_str()), (10, "pf[1].bdf"));
    }

    #[test]
    fn located_errors_print_file_line_and_key() {
        let err = parse(&system_with("vfs = 4", "vfs = -4")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("config /etc/svff/helper.toml:7:7: pf[0].vfs: "),
            "{text}"
        );
        assert_eq!(err.kind(), "config");
    }

    #[test]
    fn nvme_profile_parses_and_bad_tables_are_refused() {
        let c = parse(
            "allowed_uids = [0]\n[[pf]]\nbdf = \"0000:02:00.0\"\ndriver = \"nvme\"\nnvme = { vq = 2, vi = 1, vf = { 3 = { vq = 4, vi = 2 } } }\n",
        )
        .unwrap();
        assert_eq!(c.pfs[0].effective_profile(), PfProfile::Nvme);
        assert_eq!(c.pfs[0].pf_driver().unwrap().as_str(), "nvme");
        let r = c.pfs[0].nvme.as_ref().unwrap().resources().unwrap();
        assert_eq!(r.for_vf(0), Some(crate::nvme::VfResources { vq: 2, vi: 1 }));
        assert_eq!(r.for_vf(3), Some(crate::nvme::VfResources { vq: 4, vi: 2 }));
        for bad in [
            "nvme = { vq = 2 }",
            "nvme = { vf = { x = { vq = 2, vi = 1 } } }",
            "nvme = { vq = 2, vi = 1, qmax = 4 }",
            "profile = \"pci-pf-stub\"\nnvme = { vq = 2, vi = 1 }",
        ] {
            let text = format!(
                "allowed_uids = [0]\n[[pf]]\nbdf = \"0000:02:00.0\"\nprofile = \"nvme\"\n{bad}\n"
            )
            .replace("profile = \"nvme\"\nprofile", "profile");
            assert!(parse(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_peer_lists_are_rejected() {
        assert!(parse("[[pf]]\nbdf = \"0000:01:00.0\"\n").is_err());
    }

    #[test]
    fn config_writable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("helper.toml");
        fs::write(&path, "allowed_uids = [0]\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        let err = Config::load(&path).unwrap_err();
        let owner_is_root = fs::metadata(&path).unwrap().uid() == 0;
        if owner_is_root {
            assert!(
                err.to_string().contains("writable by group or others"),
                "{err}"
            );
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(Config::load(&path).is_ok());
        } else {
            assert!(err.to_string().contains("must be owned by root"), "{err}");
        }
    }
}
