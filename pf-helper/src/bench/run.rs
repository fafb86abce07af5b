//! Running the benchmark on the machine: the PF set up, the VMs (svff-vmm
//! test guests started here, or the config's), the series measured through
//! the orchestration library in this process, and the floor through
//! vfio-pause's VFIO code.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vfio_pause::{Container, DeviceOptions, PausableDevice, TrapAllBars, VfSource};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::guest::{l2_view_of_run, view_of_run, GuestRunView, Sample, Tailer};
use super::qemu;
use super::report::{self, BenchReport, Run, Series};
use super::{plan, BenchMode, BenchOptions, GuestLoad, Planned, VmmKind};
use crate::config::{Config, PfProfile};
use crate::error::Error;
use crate::nvme::{NvmeResources, VfResources};
use crate::orch::journal::Mode;
use crate::orch::state::AssignState;
use crate::orch::vmm::{Connector, PersistentConnector, QmpConnector};
use crate::orch::{device_id, AssignRequest, OpReport, Orchestrator};
use crate::pci::{DriverName, PciAddress};
use crate::sriov::{SriovManager, VfsSetOptions};
use crate::sysfs::RealSysfs;

/// Deadline for a test guest to print its first counters.
const GUEST_START: Duration = Duration::from_secs(90);
/// Pool mode's VQ resources per VF: the set-up's 2 (as `nvme = { vq = 2 }`
/// creates them) and the value each other run changes them to.
const POOL_VQ: [u16; 2] = [2, 4];
/// Deadline for a guest's first sample after a run.
const GUEST_SAMPLE: Duration = Duration::from_secs(10);
/// Deadline for a QEMU L2 guest to have every VF back after a run (bound
/// and live with a driver): the next run starts only then, or after it.
const L2_BACK: Duration = Duration::from_secs(60);

fn bench_err(what: String) -> Error {
    Error::Bench { what, source: None }
}

fn io_err(what: String, e: std::io::Error) -> Error {
    Error::Bench {
        what,
        source: Some(Box::new(e)),
    }
}

/// Runs the benchmark `opts` asks for and returns its report (also written
/// to `--json` and drawn to `--plot`). Bad input and what this machine
/// cannot run are refused before anything changes.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, Error> {
    let planned = plan(opts)?;
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::Usage(
            "svff bench needs root (it changes the PF's VFs and opens them through VFIO)".into(),
        ));
    }
    let mgr = SriovManager::new(RealSysfs::new());
    let user_config = opts.config.as_deref().map(Config::load).transpose()?;
    let pf = match (opts.pf, &user_config) {
        (Some(pf), _) => pf,
        (None, Some(c)) if c.pfs.len() == 1 => c.pfs[0].bdf,
        (None, Some(c)) => {
            return Err(Error::Usage(format!(
                "--pf: the config names {} PFs; say which one to measure",
                c.pfs.len()
            )))
        }
        (None, None) => return Err(Error::Usage("--pf BDF is required without --config".into())),
    };
    let profile = match &user_config {
        Some(c) => c
            .pf(pf)
            .ok_or(Error::PfNotAllowed { pf })?
            .profile
            .unwrap_or(PfProfile::Generic),
        None => opts.profile,
    };
    if let (Some(config), Some(path)) = (&user_config, &opts.config) {
        if planned.iter().any(|p| p.vmm.is_some()) {
            super::check_config_vmm(opts.vmms[0], config, path)?;
        }
    }
    let (total, _) = mgr.vf_counts(pf)?;
    super::check_vf_capacity(pf, total, &opts.vfs)?;
    check_machine(opts, &planned, user_config.is_some())?;
    let svff_vmm = svff_vmm_path(opts);

    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut rep = BenchReport {
        format_version: report::BENCH_FORMAT_VERSION,
        started_unix_s,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        pf: pf.to_string(),
        profile: profile_name(profile).into(),
        vf_counts: opts.vfs.clone(),
        runs: opts.runs,
        warmup: opts.warmup,
        guest_memory_mib: opts.guest_memory_mib,
        vms: match &opts.config {
            Some(p) if opts.vmms == [VmmKind::Libvirt] => {
                format!("the libvirt domains of {}", p.display())
            }
            Some(p) => format!("the VMs of {}", p.display()),
            None => own_vms_text(&planned, qemu::guest_driver(profile == PfProfile::Nvme)),
        },
        reference: None,
        series: Vec::new(),
        table_i: Vec::new(),
        paper_table_i: report::paper_points(),
    };
    let dir = tempfile::Builder::new()
        .prefix("svff-bench-")
        .tempdir()
        .map_err(|e| io_err("creating a temporary state directory".into(), e))?;
    let ctx = Ctx {
        opts,
        mgr: &mgr,
        pf,
        profile,
        dir: dir.path().to_owned(),
        svff_vmm,
    };
    let result = (|| -> Result<(), Error> {
        for &n in &opts.vfs {
            if planned.iter().any(|p| p.mode == BenchMode::Floor) {
                if let Some(config) = &user_config {
                    // The configured VMs let go of the PF's VFs first: the floor has no VMM.
                    let orch = Orchestrator::new(config, &mgr, &QmpConnector)?;
                    let r = orch.reconf(pf, 0, Mode::Detach, &[])?;
                    ok_report(&r, "releasing the configured VMs' VFs for the floor")?;
                }
                ctx.fresh_vfs(n + 1)?;
                rep.series.push(ctx.floor(n)?);
            }
            let vm_series: Vec<Planned> = planned
                .iter()
                .copied()
                .filter(|p| p.vmm.is_some())
                .collect();
            if vm_series.is_empty() {
                continue;
            }
            match &user_config {
                None => {
                    // One set-up per VMM kind (in --vmm order): fresh VFs,
                    // that kind's VMs, a helper config and state directory of
                    // its own, `init`, then its series.
                    for &kind in &opts.vmms {
                        let mine: Vec<Planned> = vm_series
                            .iter()
                            .copied()
                            .filter(|p| p.vmm == Some(kind))
                            .collect();
                        if mine.is_empty() {
                            continue;
                        }
                        ctx.fresh_vfs(n + 1)?;
                        let setup = Setup {
                            kind,
                            state: ctx.dir.join(format!("state-{}-{n}", kind.name())),
                            kept: opts.keep_qmp.then(PersistentConnector::new),
                        };
                        let (vms, qemu_vm) = match kind {
                            VmmKind::SvffVmm => (ctx.start_vms(n)?, None),
                            VmmKind::Qemu | VmmKind::QemuStock => {
                                (Vec::new(), Some(ctx.start_qemu(kind, n)?))
                            }
                            // Refused by `plan` without --config.
                            VmmKind::Libvirt => {
                                return Err(Error::Usage(
                                    "--vmm libvirt needs --config FILE".into(),
                                ))
                            }
                        };
                        let config = ctx.own_config(n, &setup)?;
                        let orch = Orchestrator::new(&config, &mgr, setup.connector())?;
                        let r = orch.init()?;
                        ok_report(&r, &format!("init of the {} guests", kind.name()))?;
                        for p in &mine {
                            let s = if p.mode == BenchMode::Pool {
                                ctx.pool_series(n, *p, &vms, qemu_vm.as_ref(), &setup)?
                            } else {
                                ctx.count_series(&orch, n, *p, &vms, qemu_vm.as_ref())?
                            };
                            rep.series.push(s);
                        }
                    }
                }
                Some(config) => {
                    let orch = Orchestrator::new(config, &mgr, &QmpConnector)?;
                    ctx.assign_configured(&orch, config, n)?;
                    for p in &vm_series {
                        rep.series.push(ctx.count_series(&orch, n, *p, &[], None)?);
                    }
                }
            }
        }
        Ok(())
    })();
    if user_config.is_none() {
        // The self-managed set-up leaves the PF without VFs, whatever happened.
        let cleanup = mgr.set_vf_count(pf, 0, &VfsSetOptions::default());
        if let (Ok(()), Err(e)) = (&result, cleanup) {
            return Err(e);
        }
    }
    result?;
    report::finish(&mut rep);
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&rep)
            .map_err(|e| bench_err(format!("encoding the JSON: {e}")))?;
        fs::write(path, text + "\n")
            .map_err(|e| io_err(format!("writing {}", path.display()), e))?;
    }
    if let Some(path) = &opts.plot {
        super::plot::draw(&rep, path)?;
    }
    Ok(rep)
}

/// What the self-managed set-up runs, for the report's `vms`; `driver`:
/// the QEMU L2 guests' driver for the VFs.
fn own_vms_text(planned: &[Planned], driver: Option<&str>) -> String {
    let mut parts = Vec::new();
    let has = |k| planned.iter().any(|p| p.vmm == Some(k));
    if has(VmmKind::SvffVmm) {
        parts.push("svff-vmm test guests, one per VF".to_owned());
    }
    for (k, what) in [
        (VmmKind::QemuStock, "Debian's QEMU"),
        (
            VmmKind::Qemu,
            if driver.is_some() {
                "svff's patched QEMU (svff-vfio-pci, recover=aer)"
            } else {
                "svff's patched QEMU (svff-vfio-pci)"
            },
        ),
    ] {
        if has(k) {
            parts.push(match driver {
                Some(d) => format!(
                    "{what}: one L2 Linux (busybox init, the guest's {d} driver bound to the VFs) \
                     holding every VF"
                ),
                None => format!(
                    "{what}: one L2 Linux (busybox init, no driver bound to the VFs) holding every VF"
                ),
            });
        }
    }
    if parts.is_empty() {
        return "none (floor only)".into();
    }
    format!("{}; started by svff bench", parts.join("; "))
}

fn profile_name(p: PfProfile) -> &'static str {
    match p {
        PfProfile::Generic => "generic",
        PfProfile::PciPfStub => "pci-pf-stub",
        PfProfile::Qdma => "qdma",
        PfProfile::Nvme => "nvme",
    }
}

fn svff_vmm_path(opts: &BenchOptions) -> PathBuf {
    if let Some(p) = &opts.svff_vmm {
        return p.clone();
    }
    if let Some(p) = std::env::var_os("SVFF_VMM") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("svff-vmm")))
        .unwrap_or_else(|| PathBuf::from("svff-vmm"))
}

/// What the machine must offer for `planned`: checked before anything changes.
fn check_machine(opts: &BenchOptions, planned: &[Planned], configured: bool) -> Result<(), Error> {
    let iommu = fs::read_dir("/sys/kernel/iommu_groups")
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if !iommu {
        return Err(Error::Usage(
            "svff bench: this machine has no IOMMU groups (/sys/kernel/iommu_groups is empty): \
             VFIO, and so every mode, needs an IOMMU (intel_iommu=on / amd_iommu=on)"
                .into(),
        ));
    }
    if !configured {
        let paths = opts.qemu_paths();
        for kind in [VmmKind::Qemu, VmmKind::QemuStock] {
            if planned.iter().any(|p| p.vmm == Some(kind)) {
                qemu::check(kind, &paths, &opts.vfs, Path::exists)?;
            }
        }
    }
    let own_vms = !configured && planned.iter().any(|p| p.vmm == Some(VmmKind::SvffVmm));
    if own_vms {
        let vmm = svff_vmm_path(opts);
        if !vmm.is_file() {
            return Err(Error::Usage(format!(
                "--vmm svff-vmm: {} does not exist (build it with `cargo build -p rust-vmm-poc`, \
                 or give --svff-vmm PATH / SVFF_VMM)",
                vmm.display()
            )));
        }
        if !Path::new("/dev/kvm").exists() {
            return Err(Error::Usage(
                "--vmm svff-vmm: /dev/kvm does not exist on this machine (load kvm-intel or kvm-amd)"
                    .into(),
            ));
        }
    }
    Ok(())
}

fn ok_report(r: &OpReport, what: &str) -> Result<(), Error> {
    if r.failures.is_empty() {
        Ok(())
    } else {
        Err(bench_err(format!("{what}: {}", r.failures.join("; "))))
    }
}

/// Per-step times of one orchestration report: per-VM steps summed per VM,
/// then the slowest VM (they run in parallel); steps without a VM summed.
fn step_times(r: &OpReport) -> BTreeMap<String, f64> {
    let mut per: BTreeMap<(String, Option<String>), f64> = BTreeMap::new();
    for s in &r.steps {
        *per.entry((s.name.clone(), s.vm.clone())).or_default() += s.ms;
    }
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for ((name, _), ms) in per {
        let e = out.entry(name).or_default();
        *e = e.max(ms);
    }
    out
}

/// The helper-config name of the QEMU guest of the self-managed set-up.
const QEMU_VM: &str = "qemu0";

/// One self-managed set-up: the VMM kind, its state directory and, with
/// `keep_qmp`, the connector keeping its VMs' QMP connections open.
struct Setup {
    kind: VmmKind,
    state: PathBuf,
    kept: Option<PersistentConnector>,
}

impl Setup {
    fn connector(&self) -> &dyn Connector {
        match &self.kept {
            Some(k) => k,
            None => &QmpConnector,
        }
    }
}

struct Ctx<'a> {
    opts: &'a BenchOptions,
    mgr: &'a SriovManager<RealSysfs>,
    pf: PciAddress,
    profile: PfProfile,
    dir: PathBuf,
    svff_vmm: PathBuf,
}

/// One svff-vmm test guest holding one VF; killed when dropped.
struct TestVm {
    name: String,
    child: Child,
    tailer: Tailer,
    devs: Vec<String>,
    /// The guest's TSC frequency (`x-svff-query-tsc`), None if unknown.
    tsc_khz: Option<u32>,
}

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One floor VF: its device, its own container and guest memory (dropped in that order).
struct FloorVf {
    dev: PausableDevice,
    _container: Arc<Container>,
    _mem: GuestMemoryMmap,
}

impl Ctx<'_> {
    fn set_opts(&self, bind: bool) -> VfsSetOptions {
        VfsSetOptions {
            pf_driver: match self.profile {
                PfProfile::PciPfStub => DriverName::parse("pci-pf-stub").ok(),
                PfProfile::Nvme => DriverName::parse("nvme").ok(),
                _ => None,
            },
            bind: bind.then(DriverName::vfio_pci),
            qdma: None,
        }
    }

    fn nvme(&self) -> Option<NvmeResources> {
        (self.profile == PfProfile::Nvme).then(|| NvmeResources {
            default: Some(VfResources { vq: 2, vi: 1 }),
            ..Default::default()
        })
    }

    /// The QEMU L2 guests' driver for the VFs ([`qemu::guest_driver`]).
    fn l2_driver(&self) -> Option<&'static str> {
        qemu::guest_driver(self.profile == PfProfile::Nvme)
    }

    /// The PF with exactly `count` fresh VFs on vfio-pci.
    fn fresh_vfs(&self, count: u16) -> Result<(), Error> {
        self.mgr.set_vf_count(self.pf, 0, &self.set_opts(false))?;
        self.mgr
            .set_vf_count_with(self.pf, count, &self.set_opts(true), self.nvme().as_ref())?;
        Ok(())
    }

    fn progress(&self, label: &str, n: u16, i: usize, ms: f64) {
        let w = self.opts.warmup;
        if i < w {
            eprintln!(
                "bench: {label} {n} VF: warm-up run {}/{w}: {ms:.1} ms",
                i + 1
            );
        } else {
            eprintln!(
                "bench: {label} {n} VF: run {}/{}: {ms:.1} ms",
                i - w + 1,
                self.opts.runs
            );
        }
    }

    /// The floor: no VMM; each of the first `n` VFs opened through
    /// vfio-pause in its own type1 container with guest-sized DMA mapped;
    /// per run: every device fd closed in parallel (pause), `sriov_numvfs`
    /// N -> 0 -> M, bind, every VF opened again in parallel (unpause, DMA
    /// mapped again). The PF has `n + 1` VFs on entry.
    fn floor(&self, n: u16) -> Result<Series, Error> {
        let vfs: Vec<PciAddress> = self.mgr.vfs(self.pf)?.into_iter().map(|(_, b)| b).collect();
        let size = usize::try_from(self.opts.guest_memory_mib << 20)
            .map_err(|_| Error::Usage("--guest-memory too large".into()))?;
        let mut devs = Vec::new();
        for (i, vf) in vfs.iter().take(n.into()).enumerate() {
            let vfio = |what: &str, e: vfio_pause::Error| Error::Bench {
                what: format!("floor: VF {i} ({vf}): {what}"),
                source: Some(Box::new(e)),
            };
            let container = Container::open_real().map_err(|e| vfio("opening a container", e))?;
            let mem =
                GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).map_err(|e| {
                    bench_err(format!(
                        "floor: {size} bytes of guest memory for VF {i}: {e}"
                    ))
                })?;
            // SAFETY: `mem` goes into the same `FloorVf` as the container and
            // the device holding it, declared after them, so the mappings
            // are gone (device and container dropped) before `mem` is unmapped.
            unsafe { container.register_guest_memory(&mem) }
                .map_err(|e| vfio("registering guest memory for DMA", e))?;
            let dev = PausableDevice::open(
                format!("floor{i}"),
                container.clone(),
                VfSource::Sysfs(*vf),
                DeviceOptions::default(),
                Arc::new(TrapAllBars),
            )
            .map_err(|e| vfio("opening it", e))?;
            devs.push(FloorVf {
                dev,
                _container: container,
                _mem: mem,
            });
        }
        let mut current = n + 1;
        let mut runs = Vec::new();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        for i in 0..self.opts.warmup + self.opts.runs {
            let to = if current == n { n + 1 } else { n };
            let t0 = Instant::now();
            std::thread::scope(|s| {
                let hs: Vec<_> = devs.iter().map(|d| s.spawn(|| d.dev.pause())).collect();
                hs.into_iter().enumerate().try_for_each(|(i, h)| {
                    h.join()
                        .map_err(|_| bench_err("floor: a pause thread panicked".into()))?
                        .map(drop)
                        .map_err(|e| Error::Bench {
                            what: format!("floor: closing VF {i}"),
                            source: Some(Box::new(e)),
                        })
                })
            })?;
            let t1 = Instant::now();
            self.mgr
                .set_vf_count_with(self.pf, to, &self.set_opts(false), self.nvme().as_ref())?;
            let t2 = Instant::now();
            let now: Vec<PciAddress> = self.mgr.vfs(self.pf)?.into_iter().map(|(_, b)| b).collect();
            self.mgr.bind_all(&now, &DriverName::vfio_pci())?;
            let t3 = Instant::now();
            std::thread::scope(|s| {
                let hs: Vec<_> = devs
                    .iter()
                    .zip(&now)
                    .map(|(d, vf)| s.spawn(move || d.dev.unpause(VfSource::Sysfs(*vf))))
                    .collect();
                hs.into_iter().enumerate().try_for_each(|(i, h)| {
                    h.join()
                        .map_err(|_| bench_err("floor: an unpause thread panicked".into()))?
                        .map(drop)
                        .map_err(|e| Error::Bench {
                            what: format!("floor: opening VF {i} again"),
                            source: Some(Box::new(e)),
                        })
                })
            })?;
            let t4 = Instant::now();
            current = to;
            let total = ms(t0, t4);
            self.progress("floor", n, i, total);
            if i >= self.opts.warmup {
                runs.push(Run {
                    from: if to == n { n + 1 } else { n },
                    to,
                    total_ms: total,
                    steps: BTreeMap::from([
                        ("pause".to_owned(), ms(t0, t1)),
                        ("change_numvfs".to_owned(), ms(t1, t2)),
                        ("bind_vfs".to_owned(), ms(t2, t3)),
                        ("unpause".to_owned(), ms(t3, t4)),
                    ]),
                    guest: Vec::new(),
                    l2: None,
                });
            }
        }
        drop(devs);
        Ok(series("floor", "none", n, runs))
    }

    /// One QEMU L2 guest of `kind` ([`QEMU_VM`]) holding VFs `0..n`, each on
    /// its root port; returns once its guest sees all of them.
    fn start_qemu(&self, kind: VmmKind, n: u16) -> Result<qemu::QemuVm, Error> {
        let paths = self.opts.qemu_paths();
        let bin = paths
            .binary(kind)
            .ok_or_else(|| bench_err(format!("{} is not a QEMU", kind.name())))?
            .to_owned();
        let vfs: Vec<(u16, PciAddress)> =
            self.mgr.vfs(self.pf)?.into_iter().take(n.into()).collect();
        let first = vfs
            .first()
            .ok_or_else(|| bench_err(format!("PF {} has no VF for the QEMU guest", self.pf)))?
            .1;
        let attr = |a: &str| {
            fs::read_to_string(format!("/sys/bus/pci/devices/{first}/{a}"))
                .map(|s| s.trim().to_owned())
                .map_err(|e| io_err(format!("reading {a} of VF {first}"), e))
        };
        let vf_id = format!("{}{}", attr("vendor")?, attr("device")?);
        let driver = self.l2_driver();
        let modules = PathBuf::from("/lib/modules").join(
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
        );
        let initrd = qemu::write_initramfs(&self.dir, &paths.busybox, &vf_id, driver, &modules)?;
        let qmp = self.dir.join(format!("{QEMU_VM}.qmp"));
        let serial = self
            .dir
            .join(format!("{QEMU_VM}-{}-{n}.serial", kind.name()));
        let log = self.dir.join(format!("{QEMU_VM}-{}-{n}.log", kind.name()));
        let files = qemu::GuestFiles { qmp, serial, log };
        let args = qemu::command_args(
            kind,
            &paths,
            &initrd,
            &files,
            self.pf,
            &vfs,
            driver.is_some(),
        );
        eprintln!(
            "bench: starting {} with {n} VF for {} (L2 Linux, guest driver {}, up to {} s) ...",
            bin.display(),
            kind.name(),
            driver.unwrap_or("none"),
            self.opts.l2_boot_deadline_s
        );
        let t0 = Instant::now();
        let vm = qemu::start(
            QEMU_VM,
            &bin,
            &args,
            &files,
            n,
            Duration::from_secs(self.opts.l2_boot_deadline_s),
        )?;
        eprintln!(
            "bench: {} guest up with {n} VF in {:.1} s",
            kind.name(),
            t0.elapsed().as_secs_f64()
        );
        Ok(vm)
    }

    /// `n` svff-vmm test guests `vm0..`, `vmI` holding VF I under its svff
    /// device id, each printing counters; returns once every guest did.
    fn start_vms(&self, n: u16) -> Result<Vec<TestVm>, Error> {
        let vfs = self.mgr.vfs(self.pf)?;
        let mut vms: Vec<TestVm> = Vec::new();
        for (i, vf) in vfs.iter().take(n.into()) {
            let name = format!("vm{i}");
            let qmp = self.dir.join(format!("{name}.qmp"));
            let serial = self.dir.join(format!("{name}.serial"));
            let log = self.dir.join(format!("{name}.log"));
            let _ = fs::remove_file(&qmp);
            let _ = fs::remove_file(&serial);
            let logf = fs::File::create(&log)
                .map_err(|e| io_err(format!("creating {}", log.display()), e))?;
            let logf2 = logf
                .try_clone()
                .map_err(|e| io_err(format!("duplicating {}", log.display()), e))?;
            let child = Command::new(&self.svff_vmm)
                .arg("--memory")
                .arg(format!("{}M", self.opts.guest_memory_mib))
                .arg("--qmp")
                .arg(&qmp)
                .arg("--serial")
                .arg(format!("file:{}", serial.display()))
                .args(["--test-devices", "0", "--guest-report-every"])
                .arg(self.opts.report_every.to_string())
                .arg("--vfio")
                .arg(format!("{vf},id={}", device_id(self.pf, *i)))
                .stdin(Stdio::null())
                .stdout(logf)
                .stderr(logf2)
                .spawn()
                .map_err(|e| {
                    io_err(
                        format!("starting {} for {name}", self.svff_vmm.display()),
                        e,
                    )
                })?;
            vms.push(TestVm {
                name,
                child,
                tailer: Tailer::start(serial),
                devs: Vec::new(),
                tsc_khz: None,
            });
        }
        let end = Instant::now() + GUEST_START;
        for vm in &mut vms {
            while vm.tailer.is_empty() {
                if let Ok(Some(st)) = vm.child.try_wait() {
                    let log = fs::read_to_string(self.dir.join(format!("{}.log", vm.name)))
                        .unwrap_or_default();
                    return Err(bench_err(format!(
                        "VM {}: svff-vmm exited ({st}) before its guest reported: {}",
                        vm.name,
                        log.trim()
                    )));
                }
                if Instant::now() >= end {
                    return Err(bench_err(format!(
                        "VM {}: its test guest printed no counters within {} s",
                        vm.name,
                        GUEST_START.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            vm.devs = vm.tailer.devices();
            vm.tsc_khz = query_tsc_khz(&self.dir.join(format!("{}.qmp", vm.name)));
            match self.opts.guests {
                GuestLoad::Idle => idle_vcpus(vm.child.id()),
                GuestLoad::Busy => {}
                GuestLoad::Stopped => {
                    let qmp = self.dir.join(format!("{}.qmp", vm.name));
                    qmp_ext::Client::connect(&qmp, Duration::from_secs(30))
                        .and_then(|mut c| c.execute("stop", None))
                        .map_err(|e| Error::Bench {
                            what: format!("VM {}: QMP stop", vm.name),
                            source: Some(Box::new(e)),
                        })?;
                }
            }
        }
        Ok(vms)
    }

    /// The helper config of the self-managed set-up: the PF with `n + 1`
    /// VFs, VM `vmI` (its QMP socket in the temporary directory) holding VF I.
    fn own_config(&self, n: u16, setup: &Setup) -> Result<Config, Error> {
        self.own_config_with(n, None, setup)
    }

    /// [`Self::own_config`], with `pool = Some(size)`: the PF in pool mode
    /// with a pool of `size` VFs (the VFs there are now).
    fn own_config_with(&self, n: u16, pool: Option<u16>, setup: &Setup) -> Result<Config, Error> {
        let mut text = format!(
            "allowed_uids = [0]\nstate_dir = \"{}\"\n[[pf]]\nbdf = \"{}\"\nprofile = \"{}\"\nvfs = {}\n",
            setup.state.display(),
            self.pf,
            profile_name(self.profile),
            pool.unwrap_or(n + 1)
        );
        if pool.is_some() {
            text.push_str("pool = true\n");
        }
        if self.profile == PfProfile::Nvme {
            text.push_str("nvme = { vq = 2, vi = 1 }\n");
        }
        if setup.kind == VmmKind::SvffVmm {
            for i in 0..n {
                let _ = write!(
                    text,
                    "[[vm]]\nname = \"vm{i}\"\nkind = \"qmp\"\nqmp = \"{}\"\npause_policy = \"ignore\"\n\
                     qmp_timeout_s = 30\ndetach_timeout_s = 30\nvfs = [{{ pf = \"{}\", index = [{i}] }}]\n",
                    self.dir.join(format!("vm{i}.qmp")).display(),
                    self.pf
                );
            }
        } else {
            let ports: Vec<String> = (0..usize::from(n))
                .map(|k| format!("\"{}\"", qemu::port_name(k)))
                .collect();
            let index: Vec<String> = (0..n).map(|i| i.to_string()).collect();
            let _ = write!(
                text,
                "[[vm]]\nname = \"{QEMU_VM}\"\nkind = \"qmp\"\nqmp = \"{}\"\npause_policy = \"ignore\"\n\
                 qmp_timeout_s = 30\ndetach_timeout_s = 30\nhotplug_ports = [{}]\n\
                 vfs = [{{ pf = \"{}\", index = [{}] }}]\n",
                self.dir.join(format!("{QEMU_VM}.qmp")).display(),
                ports.join(", "),
                self.pf,
                index.join(", ")
            );
            if setup.kind == VmmKind::Qemu {
                // device_add (detach mode's re-add) gives it the device it
                // pauses, recovering as the started ones do.
                if self.l2_driver().is_some() {
                    let _ = writeln!(
                        text,
                        "device_props = {{ driver = \"svff-vfio-pci\", recover = \"{}\" }}",
                        qemu::RECOVER
                    );
                } else {
                    text.push_str("device_props = { driver = \"svff-vfio-pci\" }\n");
                }
            }
        }
        let path = self.dir.join(format!(
            "helper-{}-{n}{}.toml",
            setup.kind.name(),
            if pool.is_some() { "-pool" } else { "" }
        ));
        fs::write(&path, &text).map_err(|e| io_err(format!("writing {}", path.display()), e))?;
        Config::parse(&text, &path)
    }

    /// A configured set-up brought to exactly VFs `0..n` assigned (the
    /// config's VMs in order, each up to its hotplug ports), in detach mode.
    fn assign_configured(
        &self,
        orch: &Orchestrator<'_, RealSysfs>,
        config: &Config,
        n: u16,
    ) -> Result<(), Error> {
        let kept = orch
            .state()
            .load_table()?
            .of_pf(self.pf)
            .filter(|a| a.vf < n && a.state != AssignState::Gone)
            .count() as u16;
        let mut need = n - kept.min(n);
        let mut assign = Vec::new();
        for vm in &config.vms {
            if need == 0 {
                break;
            }
            let cap = if vm.hotplug_ports.is_empty() {
                need
            } else {
                (vm.hotplug_ports.len() as u16).min(need)
            };
            assign.push(AssignRequest {
                vm: vm.name.clone(),
                count: cap,
            });
            need -= cap;
        }
        if need > 0 {
            return Err(bench_err(format!(
                "the config's VMs have hotplug ports for fewer than {n} VFs of PF {}",
                self.pf
            )));
        }
        if assign.is_empty() && self.mgr.vf_counts(self.pf)?.1 == n {
            // Already set up: no reconf (a detach-mode one would re-add
            // the VFs, and a libvirt domain gets hot-added VFs as plain
            // vfio-pci, which cannot pause).
            return Ok(());
        }
        let r = orch.reconf(self.pf, n, Mode::Detach, &assign)?;
        ok_report(&r, &format!("setting up {n} assigned VFs"))?;
        Ok(())
    }

    /// `pause` or `detach` through the orchestration: `n` assigned VFs, each
    /// run a reconf N -> N+1 or back (both N -> 0 -> M in the kernel).
    fn count_series(
        &self,
        orch: &Orchestrator<'_, RealSysfs>,
        n: u16,
        p: Planned,
        vms: &[TestVm],
        l2: Option<&qemu::QemuVm>,
    ) -> Result<Series, Error> {
        let mode = match p.mode {
            BenchMode::Pause => Mode::Pause,
            _ => Mode::Detach,
        };
        let (_, mut current) = self.mgr.vf_counts(self.pf)?;
        self.vm_series(n, p, vms, l2, |_| {
            let to = if current == n { n + 1 } else { n };
            let r = orch.reconf(self.pf, to, mode, &[])?;
            let from = std::mem::replace(&mut current, to);
            Ok((r, from, to))
        })
    }

    /// `pool` through `Orchestrator::reconf_pool`: the PF's VFs as they are
    /// now become a pool (the same state directory and VMs, the PF in pool
    /// mode); each run changes the VQ resources of all `n` assigned VFs
    /// between [`POOL_VQ`]'s two values (VI unchanged: a held VF's VI count
    /// is its MSI-X table size), guests running; `from` and `to` of a run
    /// are the VF count, which never changes.
    fn pool_series(
        &self,
        n: u16,
        p: Planned,
        vms: &[TestVm],
        l2: Option<&qemu::QemuVm>,
        setup: &Setup,
    ) -> Result<Series, Error> {
        let (_, count) = self.mgr.vf_counts(self.pf)?;
        let config = self.own_config_with(n, Some(count), setup)?;
        let orch = Orchestrator::new(&config, self.mgr, setup.connector())?;
        let mut k = 0usize;
        self.vm_series(n, p, vms, l2, |_| {
            let vq = POOL_VQ[(k + 1) % 2];
            k += 1;
            let res = NvmeResources {
                default: None,
                vfs: (0..n).map(|i| (i, VfResources { vq, vi: 1 })).collect(),
            };
            let r = orch.reconf_pool(self.pf, &res, &[])?;
            if r.steps.iter().all(|s| s.name != "resources") {
                return Err(bench_err(format!(
                    "pool: the reconf to vq {vq} changed no resources: {}",
                    r.changes.join("; ")
                )));
            }
            Ok((r, count, count))
        })
    }

    /// One series through the orchestration: `op(i)` does run `i` and
    /// returns its report and the VF counts before and after; the guests'
    /// view of each run is taken from their counters.
    fn vm_series(
        &self,
        n: u16,
        p: Planned,
        vms: &[TestVm],
        l2: Option<&qemu::QemuVm>,
        mut op: impl FnMut(usize) -> Result<(OpReport, u16, u16), Error>,
    ) -> Result<Series, Error> {
        let vmm = p.vmm.map_or("none", VmmKind::name);
        let label = report::label(p.mode.name(), vmm);
        let mut runs = Vec::new();
        for i in 0..self.opts.warmup + self.opts.runs {
            let t0 = Instant::now();
            let (r, from, to) = op(i)?;
            let t1 = Instant::now();
            ok_report(&r, &format!("{label}: run {} ({from} -> {to} VFs)", i + 1))?;
            let total = (t1 - t0).as_secs_f64() * 1e3;
            self.progress(&label, n, i, total);
            let mut guest: Vec<GuestRunView> = Vec::new();
            for vm in vms
                .iter()
                .filter(|_| self.opts.guests != GuestLoad::Stopped)
            {
                if !vm.tailer.wait_sample_after(t1, &vm.devs, GUEST_SAMPLE) {
                    return Err(bench_err(format!(
                        "VM {}: its test guest printed no counters within {} s after the run",
                        vm.name,
                        GUEST_SAMPLE.as_secs()
                    )));
                }
                let samples = cut(vm.tailer.around(t0), t1);
                guest.extend(
                    vm.devs
                        .iter()
                        .map(|d| view_of_run(&vm.name, d, &samples, vm.tsc_khz)),
                );
            }
            let l2_view = l2.map(|vm| self.l2_view(vm, n, p, t0, t1, &label));
            if i >= self.opts.warmup {
                runs.push(Run {
                    from,
                    to,
                    total_ms: total,
                    steps: step_times(&r),
                    guest,
                    l2: l2_view,
                });
            }
        }
        Ok(series(p.mode.name(), vmm, n, runs))
    }
}

impl Ctx<'_> {
    /// The L2 view of the run from `t0` to `t1` of series `p` ([`QEMU_VM`]
    /// holding `n` VFs), once the guest has every VF back (bound and live
    /// with a driver, and after a pause of the patched QEMU the `n` AER
    /// recoveries of `recover=aer` done), or after [`L2_BACK`]: the next run
    /// starts on a guest that has recovered, or says that it did not.
    fn l2_view(
        &self,
        vm: &qemu::QemuVm,
        n: u16,
        p: Planned,
        t0: Instant,
        t1: Instant,
        label: &str,
    ) -> super::guest::L2RunView {
        let driver = self.l2_driver();
        let want_aer = match (p.vmm, p.mode, driver) {
            (Some(VmmKind::Qemu), BenchMode::Pause | BenchMode::Pool, Some(_)) => u32::from(n),
            _ => 0,
        };
        let view = |lines: &[(Instant, qemu::L2Line)]| {
            l2_view_of_run(QEMU_VM, driver, n, want_aer, lines, t0, t1)
        };
        let back = vm.wait_lines(L2_BACK, |lines| {
            lines.iter().filter(|(at, _)| *at > t1).count() >= 2 && view(lines).back_ms.is_some()
        });
        let v = view(&vm.lines());
        if !back {
            eprintln!(
                "bench: {label} {n} VF: the L2 guest did not have its {n} VFs back within {} s \
                 (driver {}; fewest VFs {}, bound {:?}, live {:?}, AER recoveries {:?} of {want_aer})",
                L2_BACK.as_secs(),
                driver.unwrap_or("none"),
                v.vfs_min,
                v.bound_min,
                v.live_min,
                v.aer_recoveries
            );
        }
        v
    }
}

/// The guest's TSC frequency from svff-vmm (`x-svff-query-tsc`); None when
/// it cannot tell (0) or does not answer (the guest view then has no TSC window).
fn query_tsc_khz(qmp: &Path) -> Option<u32> {
    let mut c = qmp_ext::Client::connect(qmp, Duration::from_secs(30)).ok()?;
    let v = c.execute("x-svff-query-tsc", None).ok()?;
    v["tsc-khz"]
        .as_u64()
        .and_then(|k| u32::try_from(k).ok())
        .filter(|k| *k > 0)
}

/// The samples up to `end` and, per device, the first one after it.
fn cut(samples: Vec<Sample>, end: Instant) -> Vec<Sample> {
    let mut after: Vec<String> = Vec::new();
    samples
        .into_iter()
        .filter(|s| {
            if s.at <= end {
                true
            } else if !after.contains(&s.counters.dev) {
                after.push(s.counters.dev.clone());
                true
            } else {
                false
            }
        })
        .collect()
}

fn series(mode: &str, vmm: &str, n: u16, runs: Vec<Run>) -> Series {
    Series {
        mode: mode.into(),
        vmm: vmm.into(),
        vfs: n,
        summary: report::summarize(&runs),
        runs,
    }
}

/// Puts the vCPU threads (`svff-vcpuN`) of process `pid` under SCHED_IDLE:
/// the test guests spin, and on a machine with fewer cores than guests they
/// would otherwise starve the VMMs' QMP threads and the kernel work being
/// measured. Best effort: a thread that cannot be changed keeps its policy.
fn idle_vcpus(pid: u32) {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("svff-vcpu") {
            continue;
        }
        let Some(tid) = t
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param that outlives the call; the
        // kernel only reads it, and `tid` names a thread (a stale tid fails with ESRCH).
        let rc = unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) };
        if rc != 0 {
            tracing::warn!(tid, "SCHED_IDLE for a test guest vCPU failed");
        }
    }
}
