//! The crate's one error type.

use std::io;
use std::path::PathBuf;

use crate::pci::{DriverName, PciAddress};

/// Everything that can go wrong in the helper. Messages name the device and the
/// sysfs path; the kernel's errno is kept as the `source`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PCI address that is not in strict canonical form.
    #[error("invalid PCI address \"{input}\": {reason}")]
    InvalidPciAddress {
        /// The rejected text, escaped.
        input: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A driver name that is not a plain kernel module name.
    #[error("invalid driver name \"{input}\": {reason}")]
    InvalidDriverName {
        /// The rejected text, escaped.
        input: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// No such PCI device in sysfs.
    #[error("PCI device {bdf} not found ({path} does not exist)")]
    NoSuchDevice {
        /// The device.
        bdf: PciAddress,
        /// The sysfs path looked at.
        path: PathBuf,
        /// The lookup error.
        #[source]
        source: io::Error,
    },
    /// The device's sysfs link leads outside `<root>/devices`.
    #[error("sysfs path of {bdf} resolves to {path}, outside the sysfs devices tree")]
    OutsideDevices {
        /// The device.
        bdf: PciAddress,
        /// Where its link resolved to.
        path: PathBuf,
    },
    /// The device has no SR-IOV capability.
    #[error("PCI device {bdf} is not an SR-IOV PF (no {path})")]
    NotSriov {
        /// The device.
        bdf: PciAddress,
        /// The missing `sriov_totalvfs` path.
        path: PathBuf,
    },
    /// Asked for more VFs than the PF offers (the kernel's `ERANGE`).
    #[error("PF {pf} supports at most {max} VFs ({requested} requested)")]
    TooManyVfs {
        /// The PF.
        pf: PciAddress,
        /// Its `sriov_totalvfs`.
        max: u16,
        /// The count asked for.
        requested: u16,
        /// The kernel's answer, when it got that far.
        #[source]
        source: Option<io::Error>,
    },
    /// The kernel refused the change as busy (`EBUSY`).
    #[error("PF {pf} is busy: writing {path} was refused (VFs still enabled, or a VF or the PF is in use)")]
    Busy {
        /// The PF.
        pf: PciAddress,
        /// The attribute written.
        path: PathBuf,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The PF's driver has no `sriov_configure` or no driver is bound (`ENOENT`).
    #[error("PF {pf}: PF driver cannot configure SR-IOV (bound driver: {})", driver.as_deref().unwrap_or("none"))]
    NoSriovConfigure {
        /// The PF.
        pf: PciAddress,
        /// The PF's current driver, if any.
        driver: Option<String>,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Another change is running on the helper (or is stuck in the kernel).
    #[error("PF {pf}: {what} started {secs:.1} s ago {}", if *stuck { "is stuck in the kernel (a sysfs write has not returned); the helper refuses changes until it does" } else { "is still running; try again" })]
    ChangeRunning {
        /// The PF being changed.
        pf: PciAddress,
        /// The running request, e.g. `vfs_set 0000:01:00.0 to 0`.
        what: String,
        /// Seconds since it started.
        secs: f64,
        /// Its watchdog fired.
        stuck: bool,
    },
    /// The request's watchdog fired: a sysfs write is blocked in the kernel.
    #[error("PF {pf}: {what} has not finished after {secs} s: a sysfs write is blocked in the kernel (a process may hold a VF in a way no check can see, e.g. a VFIO fd in flight in a unix socket); it goes on in the background, and other changes are refused until it returns")]
    Stuck {
        /// The PF being changed.
        pf: PciAddress,
        /// The request.
        what: String,
        /// The watchdog, seconds.
        secs: u64,
    },
    /// The daemon failed internally (a bug), e.g. a panic in a request.
    #[error("internal error: {0}")]
    Internal(String),
    /// Loading the module of a driver this operation needs failed.
    #[error("driver {driver} is not loaded and loading its module failed")]
    ModuleLoad {
        /// The driver.
        driver: DriverName,
        /// modprobe's failure.
        #[source]
        source: io::Error,
    },
    /// A driver this operation needs is not registered with the PCI bus, even
    /// after its module was loaded.
    #[error("driver {driver} is not loaded ({path} does not exist after loading its module)")]
    DriverNotLoaded {
        /// The driver.
        driver: DriverName,
        /// The missing driver directory.
        path: PathBuf,
    },
    /// A process holds a VF's VFIO file open; removing or unbinding the VF
    /// would block in the kernel until it is closed.
    #[error("PF {pf}: VF {vf} is in use: pid {pid} holds {} open; pause or close it before changing VFs", file.display())]
    VfInUse {
        /// The PF.
        pf: PciAddress,
        /// The VF (or device) in use.
        vf: PciAddress,
        /// A process holding it.
        pid: u32,
        /// The VFIO file it holds.
        file: PathBuf,
    },
    /// A VF's VFIO group is held (the kernel refuses to open it again) by an
    /// fd no process's fd table shows, e.g. one in flight in a unix socket.
    #[error("PF {pf}: VF {vf} is in use: {} is held through an fd no process shows (e.g. a VFIO device fd in flight in a unix socket); release it before changing VFs", group.display())]
    VfHeldUnseen {
        /// The PF.
        pf: PciAddress,
        /// The VF.
        vf: PciAddress,
        /// Its group node.
        group: PathBuf,
    },
    /// A bind did not leave the device on the wanted driver.
    #[error("binding {bdf} to {driver} failed: the device is bound to {}", actual.as_deref().unwrap_or("no driver"))]
    BindFailed {
        /// The device.
        bdf: PciAddress,
        /// The driver asked for.
        driver: DriverName,
        /// The driver bound afterwards, if any.
        actual: Option<String>,
    },
    /// After a count change the PF shows a different number of VFs.
    #[error("PF {pf}: expected {expected} VFs after the change, sysfs shows {actual}")]
    VfCountMismatch {
        /// The PF.
        pf: PciAddress,
        /// The count written.
        expected: u16,
        /// The count read back.
        actual: u16,
    },
    /// A sysfs read or write failed for another reason.
    #[error("cannot {op} {path}")]
    Sysfs {
        /// `read` or `write`.
        op: &'static str,
        /// The attribute.
        path: PathBuf,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A sysfs attribute had unexpected content.
    #[error("unexpected content in {path}: {content:?}")]
    Parse {
        /// The attribute.
        path: PathBuf,
        /// What it held.
        content: String,
    },
    /// A BAR that cannot be read as asked: no such BAR, not a memory BAR, or
    /// an offset outside it.
    #[error("BAR {bar} of {bdf}: {reason}")]
    Bar {
        /// The function.
        bdf: PciAddress,
        /// The BAR index.
        bar: u8,
        /// What is wrong.
        reason: String,
    },
    /// Opening or mapping a BAR's `resource<N>` file failed.
    #[error("cannot {op} BAR {bar} of {bdf} ({path}){hint}")]
    BarAccess {
        /// The function.
        bdf: PciAddress,
        /// The BAR index.
        bar: u8,
        /// What was being done, e.g. `open`, `map`.
        op: &'static str,
        /// The resource file.
        path: PathBuf,
        /// The likely cause for the errno, `""` when none is known.
        hint: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The function's ID register does not hold the svff magic.
    #[error(
        "{bdf} is not an svff function: its ID register (BAR {bar}, offset 0x0) reads {id:#010x}, expected {expected:#010x}{}",
        if *id == u32::MAX { " (all ones: memory decoding off, function in reset, or device gone)" } else { "" }
    )]
    NotSvffFunction {
        /// The function.
        bdf: PciAddress,
        /// The BAR read.
        bar: u8,
        /// What the ID register holds.
        id: u32,
        /// The svff magic.
        expected: u32,
    },
    /// A QDMA setting could not be applied.
    #[error("QDMA setting {setting}={value} on {bdf} failed ({path})")]
    Qdma {
        /// The function.
        bdf: PciAddress,
        /// Setting name, e.g. `qmax`.
        setting: String,
        /// The value written.
        value: String,
        /// The attribute.
        path: PathBuf,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Programming the FPGA failed.
    #[error("programming the bitstream for PF {pf} failed: {reason}")]
    Bitstream {
        /// The PF.
        pf: PciAddress,
        /// What went wrong.
        reason: String,
        /// The underlying error, if any.
        #[source]
        source: Option<io::Error>,
    },
    /// The configuration file is unusable.
    #[error("config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The configuration file has an error at a known place.
    #[error("config {}:{line}:{column}: {key}: {reason}", path.display())]
    ConfigAt {
        /// The file.
        path: PathBuf,
        /// Line, 1-based.
        line: usize,
        /// Column, 1-based.
        column: usize,
        /// The key the error is about, e.g. `pf[1].vfs`.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A file of the state directory could not be used.
    #[error("state {}: {op} failed", path.display())]
    State {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file of the state directory has content this svff cannot read.
    #[error("state {}: {reason}", path.display())]
    StateCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another orchestration operation holds the state directory's lock.
    #[error("another svff operation is running ({holder}); try again when it has finished")]
    OperationRunning {
        /// The lock file's content: pid and operation.
        holder: String,
    },
    /// The journal shows an operation that did not finish.
    #[error("an interrupted operation ({what}) is in the journal {}: run `svff recover` first", path.display())]
    RecoveryNeeded {
        /// The operation's begin record, summarised.
        what: String,
        /// The journal.
        path: PathBuf,
    },
    /// A VMM did not do what was asked, or did not answer in time.
    #[error("VM {vm}: {action}")]
    Vmm {
        /// The VM's name.
        vm: String,
        /// What was asked, naming the device.
        action: String,
        /// The QMP error (timeout, closed, command error).
        #[source]
        source: Box<qmp_ext::Error>,
    },
    /// A libvirt call for a VM of kind `libvirt` failed (connection, domain
    /// lookup, device change, monitor passthrough); `detail` is libvirt's
    /// message and error code.
    #[error("VM {vm}: {action}: {detail}")]
    Libvirt {
        /// The VM's name.
        vm: String,
        /// What was asked, naming the domain and device.
        action: String,
        /// libvirt's error message (with its code).
        detail: String,
    },
    /// Starting or watching an svff-started VMM process failed (spawn, its
    /// pid, log or socket files).
    #[error("VM {vm}: {action}")]
    VmmProcess {
        /// The VM's name.
        vm: String,
        /// What was being done, naming the path or program.
        action: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Something a VM's kind cannot do (yet).
    #[error("VM {vm}: {reason}")]
    VmmUnsupported {
        /// The VM's name.
        vm: String,
        /// Why.
        reason: String,
    },
    /// A VM name that is not in the config.
    #[error("unknown VM {name:?} (configured: {known})")]
    UnknownVm {
        /// The name asked for.
        name: String,
        /// The configured names, comma-separated.
        known: String,
    },
    /// A request the current state cannot satisfy (e.g. more VFs assigned than exist).
    #[error("{0}")]
    Plan(String),
    /// An operation failed part-way; what was done about it.
    #[error("{operation} failed: {outcome}")]
    OperationFailed {
        /// The operation, e.g. `reconf of PF 0000:01:00.0 to 2 VFs (pause mode)`.
        operation: String,
        /// What the helper did: `rolled back: ...` or `finished, but ...`.
        outcome: String,
        /// The first failure.
        #[source]
        source: Box<Error>,
    },
    /// The PF is not on the daemon's allow-list.
    #[error("PF {pf} is not on the helper's allow-list")]
    PfNotAllowed {
        /// The PF.
        pf: PciAddress,
    },
    /// The driver is not on the daemon's list of VF drivers.
    #[error("binding VFs to {driver} is not allowed by the helper's config")]
    DriverNotAllowed {
        /// The driver.
        driver: DriverName,
    },
    /// A socket operation on the daemon's socket failed.
    #[error("helper socket {path}: {op} failed")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The command line asks for something this mode cannot do.
    #[error("{0}")]
    Usage(String),
    /// The daemon spoke something that is not the protocol.
    #[error("helper protocol error: {0}")]
    Protocol(String),
    /// The NVMe controller of a PF cannot be found or opened.
    #[error("PF {pf}: NVMe controller: {reason}")]
    NvmeController {
        /// The PF.
        pf: PciAddress,
        /// What is wrong.
        reason: String,
        /// The OS error, if any.
        #[source]
        source: Option<io::Error>,
    },
    /// An NVMe admin command failed.
    #[error("{controller}: {command} failed{}", status.map(|s| format!(": {}", crate::nvme::status_text(s))).unwrap_or_default())]
    NvmeAdmin {
        /// The controller, e.g. `/dev/nvme0 (PF 0000:02:00.0)`.
        controller: String,
        /// The command, naming the secondary controller and VF.
        command: String,
        /// The NVMe completion status, when the controller answered.
        status: Option<u16>,
        /// The ioctl's error, when it did not get that far.
        #[source]
        source: Option<io::Error>,
    },
    /// Requested NVMe VF resources were refused (before anything was written)
    /// or did not come out as requested.
    #[error("PF {pf}: NVMe VF resources: {reason}")]
    NvmeResources {
        /// The PF.
        pf: PciAddress,
        /// Which VF and resource, and why.
        reason: String,
    },
    /// The daemon refused or failed the request; the text is the daemon's message.
    #[error("helper: {message}")]
    Remote {
        /// Stable error kind, see the protocol docs.
        kind: String,
        /// The daemon's message.
        message: String,
    },
    /// `svff bench`: a benchmark step failed (set-up, a VM, a file); the text names it.
    #[error("bench: {what}")]
    Bench {
        /// What failed, naming the PF, VF, VM or path.
        what: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// Whether this is a VMM that did not answer a command in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Vmm { source, .. } if matches!(**source, qmp_ext::Error::Timeout { .. }))
    }

    /// A short stable name for the error, used as `kind` in the daemon protocol.
    pub fn kind(&self) -> &str {
        match self {
            Error::InvalidPciAddress { .. } | Error::InvalidDriverName { .. } | Error::Usage(_) => {
                "invalid_argument"
            }
            Error::NoSuchDevice { .. } | Error::OutsideDevices { .. } | Error::NotSriov { .. } => {
                "no_device"
            }
            Error::TooManyVfs { .. } => "too_many_vfs",
            Error::Busy { .. } | Error::ChangeRunning { .. } => "busy",
            Error::Stuck { .. } => "stuck",
            Error::Internal(_) => "internal",
            Error::VfInUse { .. } | Error::VfHeldUnseen { .. } => "vf_in_use",
            Error::NoSriovConfigure { .. } => "no_sriov_configure",
            Error::DriverNotLoaded { .. } | Error::ModuleLoad { .. } => "driver_not_loaded",
            Error::BindFailed { .. } => "bind_failed",
            Error::VfCountMismatch { .. } => "count_mismatch",
            Error::Sysfs { .. } | Error::Parse { .. } => "sysfs",
            Error::Bar { .. } | Error::BarAccess { .. } => "bar",
            Error::NotSvffFunction { .. } => "not_svff",
            Error::Qdma { .. } => "qdma",
            Error::Bitstream { .. } => "bitstream",
            Error::Config { .. } | Error::ConfigAt { .. } => "config",
            Error::State { .. } | Error::StateCorrupt { .. } => "state",
            Error::OperationRunning { .. } => "busy",
            Error::RecoveryNeeded { .. } => "recovery_needed",
            Error::Vmm { .. } | Error::VmmProcess { .. } | Error::Libvirt { .. } => "vmm",
            Error::VmmUnsupported { .. } => "not_supported",
            Error::UnknownVm { .. } | Error::Plan(_) => "invalid_argument",
            Error::OperationFailed { source, .. } => source.kind(),
            Error::PfNotAllowed { .. } | Error::DriverNotAllowed { .. } => "not_allowed",
            Error::Socket { .. } => "socket",
            Error::Protocol(_) => "protocol",
            Error::Remote { kind, .. } => kind,
            Error::NvmeController { .. } | Error::NvmeAdmin { .. } => "nvme",
            Error::NvmeResources { .. } => "nvme_resources",
            Error::Bench { .. } => "bench",
        }
    }

    /// The message with every `source` appended, `: `-separated.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
}
