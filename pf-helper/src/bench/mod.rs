//! `svff bench`: the paper's Table I and II reproduced in one command;
//! described in `README.md` beside this file (included in the crate docs).

mod guest;
mod plot;
mod qemu;
mod report;
mod run;

use std::path::PathBuf;

use crate::config::PfProfile;
use crate::error::Error;
use crate::pci::PciAddress;

pub use guest::{GuestRunView, L2RunView};
pub use plot::draw as draw_plot;
pub use qemu::QemuPaths;
pub use report::{
    finish, render_all, BenchReport, PaperPoint, Run, Series, Summary, TableIRow,
    BENCH_FORMAT_VERSION, PAPER_TABLE_I,
};
#[cfg(test)]
use report::{mean_sigma, paper_points, render_table_i, render_table_ii, summarize};
pub use run::run;

/// What one series measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BenchMode {
    /// The kernel's floor: no VMM, vfio-pause's VFIO code in this process.
    Floor,
    /// `svff reconf --mode pause`.
    Pause,
    /// `svff reconf --mode detach`.
    Detach,
    /// Pool mode: `Orchestrator::reconf_pool`, the assigned VFs' NVMe queue
    /// resources changed back and forth (VQ 2 <-> 4) without a count change.
    Pool,
}

impl BenchMode {
    /// Its name on the command line and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Floor => "floor",
            BenchMode::Pause => "pause",
            BenchMode::Detach => "detach",
            BenchMode::Pool => "pool",
        }
    }
}

/// Which VMM holds the VFs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum VmmKind {
    /// svff-vmm with its test guest.
    SvffVmm,
    /// svff's patched QEMU (qemu-fork).
    Qemu,
    /// Debian's unpatched QEMU (detach only).
    QemuStock,
    /// libvirt domains of a helper config (`--config` only: svff bench
    /// defines and starts no domain itself).
    Libvirt,
}

impl VmmKind {
    /// Its name on the command line and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            VmmKind::SvffVmm => "svff-vmm",
            VmmKind::Qemu => "qemu",
            VmmKind::QemuStock => "qemu-stock",
            VmmKind::Libvirt => "libvirt",
        }
    }
}

/// Parses `pause,detach,floor`.
pub fn parse_modes(text: &str) -> Result<Vec<BenchMode>, Error> {
    let mut out = Vec::new();
    for m in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let mode = match m {
            "floor" => BenchMode::Floor,
            "pause" => BenchMode::Pause,
            "detach" => BenchMode::Detach,
            "pool" => BenchMode::Pool,
            _ => {
                return Err(Error::Usage(format!(
                    "--mode {m:?}: unknown mode (known: pause, detach, floor, pool)"
                )))
            }
        };
        if !out.contains(&mode) {
            out.push(mode);
        }
    }
    if out.is_empty() {
        return Err(Error::Usage("--mode: no mode given".into()));
    }
    Ok(out)
}

/// Parses `svff-vmm,qemu,qemu-stock,libvirt`.
pub fn parse_vmms(text: &str) -> Result<Vec<VmmKind>, Error> {
    let mut out = Vec::new();
    for v in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let vmm = match v {
            "svff-vmm" => VmmKind::SvffVmm,
            "qemu" => VmmKind::Qemu,
            "qemu-stock" => VmmKind::QemuStock,
            "libvirt" => VmmKind::Libvirt,
            _ => {
                return Err(Error::Usage(format!(
                    "--vmm {v:?}: unknown VMM (known: svff-vmm, qemu, qemu-stock, libvirt)"
                )))
            }
        };
        if !out.contains(&vmm) {
            out.push(vmm);
        }
    }
    if out.is_empty() {
        return Err(Error::Usage("--vmm: no VMM given".into()));
    }
    Ok(out)
}

/// Parses `1,4,10` (each at least 1, ascending order kept as given, duplicates dropped).
pub fn parse_vf_counts(text: &str) -> Result<Vec<u16>, Error> {
    let mut out = Vec::new();
    for v in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let n: u16 = v.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
            Error::Usage(format!("--vfs {v:?}: expected a VF count of at least 1"))
        })?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    if out.is_empty() {
        return Err(Error::Usage("--vfs: no VF count given".into()));
    }
    Ok(out)
}

/// The options of `svff bench`.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    /// Assigned VF counts to measure.
    pub vfs: Vec<u16>,
    /// Counted runs per series.
    pub runs: usize,
    /// Uncounted warm-up runs per series.
    pub warmup: usize,
    /// Modes.
    pub modes: Vec<BenchMode>,
    /// VMMs.
    pub vmms: Vec<VmmKind>,
    /// The PF (default: the config's only PF).
    pub pf: Option<PciAddress>,
    /// Write the JSON document here.
    pub json: Option<PathBuf>,
    /// Draw the SVG plot here.
    pub plot: Option<PathBuf>,
    /// Use this helper config's VMs instead of starting svff-vmm test guests.
    pub config: Option<PathBuf>,
    /// PF profile of the self-managed set-up (`pci-pf-stub` or `nvme`).
    pub profile: PfProfile,
    /// Test guests' RAM and each floor container's DMA mapping, MiB.
    pub guest_memory_mib: u64,
    /// Test guest rounds between two counter lines.
    pub report_every: u32,
    /// The test guests' load.
    pub guests: GuestLoad,
    /// The svff-vmm binary (default: `$SVFF_VMM`, else beside this executable).
    pub svff_vmm: Option<PathBuf>,
    /// svff's patched QEMU (default: `$SVFF_QEMU`, else
    /// `target/svff-qemu/qemu-system-x86_64` of the workspace this executable
    /// was built in, where `make qemu` puts it).
    pub qemu: Option<PathBuf>,
    /// Debian's QEMU (default `/usr/bin/qemu-system-x86_64`).
    pub qemu_stock: Option<PathBuf>,
    /// The QEMU guests' kernel (default `/boot/vmlinuz-<running release>`).
    pub l2_kernel: Option<PathBuf>,
    /// Deadline for a QEMU guest to boot, seconds.
    pub l2_boot_deadline_s: u64,
    /// Keep each VM's QMP connection open across the runs of a set-up
    /// ([`crate::PersistentConnector`]); false: connect in every operation
    /// as `svff reconf` does.
    pub keep_qmp: bool,
}

impl BenchOptions {
    /// The paths of the QEMU guests' parts, defaults filled in.
    pub fn qemu_paths(&self) -> QemuPaths {
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(std::path::Path::to_path_buf));
        let patched = self
            .qemu
            .clone()
            .or_else(|| std::env::var_os("SVFF_QEMU").map(PathBuf::from))
            .or_else(|| {
                // target/debug/svff -> target/svff-qemu/qemu-system-x86_64
                exe_dir
                    .as_ref()
                    .and_then(|d| d.parent())
                    .map(|t| t.join("svff-qemu/qemu-system-x86_64"))
            })
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64-svff"));
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        QemuPaths {
            stock: self
                .qemu_stock
                .clone()
                .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64")),
            patched,
            kernel: self
                .l2_kernel
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("/boot/vmlinuz-{release}"))),
            busybox: PathBuf::from("/bin/busybox"),
            firmware: PathBuf::from("/usr/share/qemu/qboot.rom"),
        }
    }
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            vfs: vec![1, 4, 10],
            runs: 100,
            warmup: 1,
            modes: vec![BenchMode::Floor, BenchMode::Pause, BenchMode::Detach],
            vmms: vec![VmmKind::SvffVmm],
            pf: None,
            json: None,
            plot: None,
            config: None,
            profile: PfProfile::PciPfStub,
            guest_memory_mib: 32,
            report_every: 20,
            guests: GuestLoad::Idle,
            svff_vmm: None,
            qemu: None,
            qemu_stock: None,
            l2_kernel: None,
            l2_boot_deadline_s: 300,
            keep_qmp: true,
        }
    }
}

/// What the svff-vmm test guests do while the benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestLoad {
    /// They spin reading their BARs, their vCPU threads under `SCHED_IDLE` (the default).
    Idle,
    /// They spin at normal priority.
    Busy,
    /// Stopped with QMP `stop` once they reported: the VMMs' own cost
    /// without guest load (no guest view).
    Stopped,
}

/// One series to measure: a mode and (except for the floor) a VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// The mode.
    pub mode: BenchMode,
    /// The VMM (None: the floor).
    pub vmm: Option<VmmKind>,
}

/// The series `opts` asks for, or the reason it cannot run; checks only
/// the options themselves (the machine is checked by [`run`], also before
/// anything changes).
pub fn plan(opts: &BenchOptions) -> Result<Vec<Planned>, Error> {
    if opts.runs == 0 {
        return Err(Error::Usage("--runs must be at least 1".into()));
    }
    if opts.modes.contains(&BenchMode::Pool) {
        if let Some(path) = &opts.config {
            return Err(Error::Usage(format!(
                "--mode pool with --config {}: svff bench measures pool mode only on its own                  set-up (--profile nvme, no --config); a PF of a helper config is either in                  pool mode or changes its VF count, never both",
                path.display()
            )));
        }
        if opts.profile != PfProfile::Nvme {
            return Err(Error::Usage(
                "--mode pool changes NVMe VF resources (pool mode needs the PF on the kernel's                  nvme driver): add --profile nvme"
                    .into(),
            ));
        }
    }
    let wants_vms = opts
        .modes
        .iter()
        .any(|m| matches!(m, BenchMode::Pause | BenchMode::Detach | BenchMode::Pool));
    if wants_vms {
        if opts.config.is_none() && opts.vmms.contains(&VmmKind::Libvirt) {
            return Err(Error::Usage(
                "--vmm libvirt needs --config FILE: svff bench defines and starts no libvirt \
                 domain itself; it measures the running domains of a helper config (VMs of \
                 kind \"libvirt\")"
                    .into(),
            ));
        }
        if let Some(path) = &opts.config {
            if opts.vmms.len() != 1 {
                return Err(Error::Usage(format!(
                    "--config {}: its VMs are of one kind: give exactly one --vmm (the kind they are)",
                    path.display()
                )));
            }
        }
    }
    let mut out = Vec::new();
    if opts.modes.contains(&BenchMode::Floor) {
        out.push(Planned {
            mode: BenchMode::Floor,
            vmm: None,
        });
    }
    // Pool before detach: detach re-adds plain `vfio-pci` devices, which a
    // patched QEMU cannot pause.
    for mode in [BenchMode::Pause, BenchMode::Pool, BenchMode::Detach] {
        if !opts.modes.contains(&mode) {
            continue;
        }
        let mut any = false;
        for &vmm in &opts.vmms {
            if mode != BenchMode::Detach && vmm == VmmKind::QemuStock {
                continue;
            }
            any = true;
            out.push(Planned {
                mode,
                vmm: Some(vmm),
            });
        }
        if !any {
            return Err(Error::Usage(format!(
                "--mode {} --vmm qemu-stock: Debian's unpatched QEMU has no pause (it knows no \
                 svff-vfio-pause); use --vmm svff-vmm or qemu for {} mode",
                mode.name(),
                mode.name()
            )));
        }
    }
    Ok(out)
}

/// Whether the VMs of helper config `config` (at `path`) are of the one
/// kind `vmm` names: `libvirt` for VMs of kind `libvirt`, any other VMM for
/// VMs reached over QMP (which QEMU or svff-vmm is behind a socket is the
/// user's word).
pub fn check_config_vmm(
    vmm: VmmKind,
    config: &crate::config::Config,
    path: &std::path::Path,
) -> Result<(), Error> {
    use crate::config::VmKind;
    let want_libvirt = vmm == VmmKind::Libvirt;
    if let Some(vm) = config
        .vms
        .iter()
        .find(|vm| (vm.kind == VmKind::Libvirt) != want_libvirt)
    {
        let (is, use_) = if want_libvirt {
            (
                "reached over QMP",
                "the VMM behind its socket (svff-vmm, qemu or qemu-stock)",
            )
        } else {
            ("of kind \"libvirt\"", "libvirt")
        };
        return Err(Error::Usage(format!(
            "--vmm {} with --config {}: VM {:?} is {is}; give --vmm {use_}, and one config \
             per VMM kind",
            vmm.name(),
            path.display(),
            vm.name
        )));
    }
    Ok(())
}

/// Whether PF `pf`, offering `total` VFs, can hold every VF count of
/// `vfs`: the bench needs `max + 1` VFs (the assigned VFs and one
/// unassigned VF that comes and goes, so that every count-change run
/// changes the count: N -> 0 -> N+1, then N+1 -> 0 -> N).
pub fn check_vf_capacity(pf: PciAddress, total: u16, vfs: &[u16]) -> Result<(), Error> {
    let max = vfs.iter().max().copied().unwrap_or(1);
    let need = u32::from(max) + 1;
    if need > u32::from(total) {
        return Err(Error::Usage(format!(
            "--vfs {max}: PF {pf} supports at most {total} VFs, and svff bench needs {need}: the \
             {max} assigned VFs and one unassigned VF that comes and goes, so that every run \
             changes the count (N -> 0 -> N+1, then N+1 -> 0 -> N)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
