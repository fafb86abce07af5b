//! Orchestration across running VMs; described in `README.md` beside this
//! file (included in the crate docs).

pub mod journal;
#[cfg(feature = "libvirt")]
pub mod libvirt;
mod pool;
pub mod state;
pub mod supervise;
pub mod vmm;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::{Config, PfConfig, VmConfig};
use crate::error::Error;
use crate::pci::{DriverName, PciAddress};
use crate::sriov::{SriovManager, VfsSetOptions};
use crate::sysfs::Sysfs;
use journal::{Journal, Mode, OpKind, Step};
use state::{AssignState, Assignment, AssignmentTable, StateDir};
use vmm::{Connector, Vmm};

/// Connects to a VM of kind `libvirt` (feature `libvirt`).
#[cfg(feature = "libvirt")]
fn connect_libvirt(vm: &VmConfig) -> Result<Box<dyn Vmm>, Error> {
    libvirt::LibvirtVmm::connect(vm).map(|v| Box::new(v) as Box<dyn Vmm>)
}

/// Without feature `libvirt`: a clear error, nothing contacted.
#[cfg(not(feature = "libvirt"))]
fn connect_libvirt(vm: &VmConfig) -> Result<Box<dyn Vmm>, Error> {
    Err(Error::VmmUnsupported {
        vm: vm.name.clone(),
        reason: "kind \"libvirt\" needs svff built with `--features libvirt` (libvirt-dev)".into(),
    })
}

/// Version of the `--json` result of init, reconf and recover.
pub const RESULT_FORMAT_VERSION: u32 = 1;

/// One timed step of an operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimedStep {
    /// `remove_vf`, `pause`, `change_numvfs`, `bind_vfs`, `unpause`, `add_vf`, ...
    pub name: String,
    /// The VM, for per-VM steps.
    pub vm: Option<String>,
    /// Wall time, milliseconds.
    pub ms: f64,
}

/// The result of init, reconf or recover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpReport {
    /// [`RESULT_FORMAT_VERSION`].
    pub format_version: u32,
    /// `init`, `reconf` or `recover`.
    pub operation: String,
    /// The PF (the last one handled, for init and recover).
    pub pf: Option<PciAddress>,
    /// The mode of the VMM side.
    pub mode: Mode,
    /// VF count before.
    pub from: Option<u16>,
    /// VF count after.
    pub to: Option<u16>,
    /// Whether anything changed.
    pub changed: bool,
    /// What changed, one line each.
    pub changes: Vec<String>,
    /// Devices that could not be restored, one line each (the CLI exits 1).
    pub failures: Vec<String>,
    /// Timed steps, in order of completion.
    pub steps: Vec<TimedStep>,
    /// The resulting assignments of the PFs handled.
    pub assignments: Vec<Assignment>,
}

impl OpReport {
    fn new(operation: &str, mode: Mode) -> Self {
        OpReport {
            format_version: RESULT_FORMAT_VERSION,
            operation: operation.into(),
            pf: None,
            mode,
            from: None,
            to: None,
            changed: false,
            changes: Vec::new(),
            failures: Vec::new(),
            steps: Vec::new(),
            assignments: Vec::new(),
        }
    }
}

/// `--assign VM=COUNT`: VM gets COUNT more VFs of the PF (the lowest free indices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignRequest {
    /// The VM.
    pub vm: String,
    /// How many new VFs.
    pub count: u16,
}

impl AssignRequest {
    /// Parses `VM=COUNT,VM=COUNT`.
    pub fn parse_list(text: &str) -> Result<Vec<AssignRequest>, Error> {
        text.split(',')
            .filter(|s| !s.is_empty())
            .map(|item| {
                let (vm, n) = item
                    .split_once('=')
                    .ok_or_else(|| Error::Usage(format!("--assign {item:?}: expected VM=COUNT")))?;
                let count = n.parse().map_err(|_| {
                    Error::Usage(format!("--assign {item:?}: {n:?} is not a VF count"))
                })?;
                Ok(AssignRequest {
                    vm: vm.to_owned(),
                    count,
                })
            })
            .collect()
    }
}

/// The device id svff gives VF `vf` of `pf` in a VMM: `svff-0000-01-00.0-vf3`.
pub fn device_id(pf: PciAddress, vf: u16) -> String {
    format!("{}{vf}", id_prefix(pf))
}

fn id_prefix(pf: PciAddress) -> String {
    format!("svff-{}-vf", pf.to_string().replace(':', "-"))
}

/// The VF index of an svff device id of `pf`.
fn id_index(pf: PciAddress, id: &str) -> Option<u16> {
    id.strip_prefix(&id_prefix(pf))?.parse().ok()
}

/// What one VM's connection found of one PF's devices.
struct VmSide {
    cfg: VmConfig,
    conn: Option<Box<dyn Vmm>>,
    /// svff devices of the PF present in the VMM, by id.
    present: BTreeSet<String>,
    /// Of those, the ones the VMM reports paused.
    paused: BTreeSet<String>,
    /// An svff-vmm VM whose VMM is not running: started in the restore step
    /// with its target VFs (init, and recovery of an init).
    start: bool,
}

/// The orchestration of one helper (daemon or `--direct` CLI).
#[derive(Debug)]
pub struct Orchestrator<'a, S: Sysfs> {
    config: &'a Config,
    mgr: &'a SriovManager<S>,
    vmms: &'a dyn Connector,
    state: StateDir,
}

/// Shared bookkeeping of the threads of one convergence.
struct Shared<'j> {
    journal: &'j Mutex<Journal>,
    report: Mutex<OpReport>,
}

impl Shared<'_> {
    fn record(&self, step: Step) -> Result<(), Error> {
        self.journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(step)
    }

    fn timed<T>(
        &self,
        name: &str,
        vm: Option<&str>,
        f: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        let start = Instant::now();
        let r = f();
        let ms = crate::sriov::elapsed_ms(start);
        info!(step = name, vm, ms, ok = r.is_ok(), "step done");
        self.report().steps.push(TimedStep {
            name: name.into(),
            vm: vm.map(str::to_owned),
            ms,
        });
        r
    }

    fn report(&self) -> std::sync::MutexGuard<'_, OpReport> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn change(&self, line: String) {
        info!("{line}");
        let mut r = self.report();
        r.changed = true;
        r.changes.push(line);
    }
}

/// What the release step left behind, for a rollback.
#[derive(Debug)]
struct ReleaseFailure {
    error: Error,
}

impl<'a, S: Sysfs> Orchestrator<'a, S> {
    /// An orchestrator over `config`'s PFs and VMs, its state directory opened (created).
    pub fn new(
        config: &'a Config,
        mgr: &'a SriovManager<S>,
        vmms: &'a dyn Connector,
    ) -> Result<Self, Error> {
        Ok(Orchestrator {
            config,
            mgr,
            vmms,
            state: StateDir::open(&config.state_dir)?,
        })
    }

    /// The state directory.
    pub fn state(&self) -> &StateDir {
        &self.state
    }

    fn pf_config(&self, pf: PciAddress) -> Result<&'a PfConfig, Error> {
        self.config.pf(pf).ok_or(Error::PfNotAllowed { pf })
    }

    fn vm_config(&self, name: &str) -> Result<&'a VmConfig, Error> {
        self.config.vm(name).ok_or_else(|| Error::UnknownVm {
            name: name.into(),
            known: self
                .config
                .vms
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    fn refuse_if_pending(&self) -> Result<(), Error> {
        if let Some(p) = journal::pending(&self.state)? {
            return Err(Error::RecoveryNeeded {
                what: summary(&p.begin),
                path: self.state.path().join("journal.jsonl"),
            });
        }
        Ok(())
    }

    /// The assignments `init` gives `pf`: each VM's `vfs` of it, explicit
    /// indices first, then counts from the lowest free index, VMs in config order.
    fn init_target(&self, pf: &PfConfig) -> Result<Vec<Assignment>, Error> {
        let mut taken: BTreeMap<u16, &VmConfig> = BTreeMap::new();
        for vm in &self.config.vms {
            for sel in vm.vfs.iter().filter(|s| s.pf == pf.bdf) {
                for &i in sel.index.iter().flatten() {
                    taken.insert(i, vm);
                }
            }
        }
        let total = pf.vfs.unwrap_or(0);
        for vm in &self.config.vms {
            for sel in vm.vfs.iter().filter(|s| s.pf == pf.bdf) {
                for _ in 0..sel.count.unwrap_or(0) {
                    let free = (0..total).find(|i| !taken.contains_key(i)).ok_or_else(|| {
                        Error::Plan(format!(
                            "PF {}: the VMs ask for more than its {total} VFs",
                            pf.bdf
                        ))
                    })?;
                    taken.insert(free, vm);
                }
            }
        }
        let mut per_vm_ports: BTreeMap<&str, usize> = BTreeMap::new();
        Ok(taken
            .into_iter()
            .map(|(vf, vm)| {
                let n = per_vm_ports.entry(vm.name.as_str()).or_insert(0);
                let bus = vm.hotplug_ports.get(*n).cloned();
                *n += 1;
                Assignment {
                    pf: pf.bdf,
                    vf,
                    host: PciAddress::zero(),
                    vm: vm.name.clone(),
                    id: device_id(pf.bdf, vf),
                    bus,
                    guest: None,
                    state: AssignState::Attached,
                }
            })
            .collect())
    }

    /// `svff init`: every configured PF with a `vfs` count brought to it, its
    /// VFs on vfio-pci and in their VMs as configured. A second run on a
    /// system in that state changes nothing (`changed: false`).
    pub fn init(&self) -> Result<OpReport, Error> {
        let _lock = self.state.lock("init")?;
        self.refuse_if_pending()?;
        let mut report = OpReport::new("init", Mode::Detach);
        for pfc in self.config.pfs.iter().filter(|p| p.vfs.is_some()) {
            let count = pfc.vfs.unwrap_or(0);
            let (total, from) = self.mgr.vf_counts(pfc.bdf)?;
            if count > total {
                return Err(Error::TooManyVfs {
                    pf: pfc.bdf,
                    max: total,
                    requested: count,
                    source: None,
                });
            }
            let target = self.init_target(pfc)?;
            let table = self.state.load_table()?;
            let before: Vec<Assignment> = table.of_pf(pfc.bdf).cloned().collect();
            let mut sides = self.connect_sides(pfc.bdf, &before, &target, false, true)?;
            let r = if self.pf_settled(pfc.bdf, count, &target, &before, &sides)? {
                info!(pf = %pfc.bdf, count, "PF already as configured");
                let mut r = OpReport::new("init", Mode::Detach);
                r.assignments = before;
                r
            } else {
                if from == 0 && count > 0 && pfc.bitstream.is_some() {
                    // Programmed before the journal: it is repeatable, and
                    // a PF without VFs has nothing to recover.
                    let cfg = pfc.bitstream.clone().expect("checked");
                    let start = Instant::now();
                    self.mgr.program_bitstream(pfc.bdf, &cfg)?;
                    report.steps.push(TimedStep {
                        name: "program".into(),
                        vm: None,
                        ms: crate::sriov::elapsed_ms(start),
                    });
                    report
                        .changes
                        .push(format!("PF {}: bitstream programmed", pfc.bdf));
                }
                let journal = Journal::begin(
                    &self.state,
                    Step::Begin {
                        kind: OpKind::Init,
                        pf: pfc.bdf,
                        mode: Mode::Detach,
                        from,
                        to: count,
                        before: before.clone(),
                        target: target.clone(),
                    },
                )?;
                let journal = Mutex::new(journal);
                let r = self
                    .converge(
                        pfc.bdf,
                        count,
                        &target,
                        Mode::Detach,
                        &mut sides,
                        &journal,
                        "init",
                    )
                    .map_err(|f| f.error)?;
                end_journal(journal, &r)?;
                r
            };
            report.pf = Some(pfc.bdf);
            report.from = Some(from);
            report.to = Some(count);
            report.changed |= r.changed;
            report.changes.extend(r.changes);
            report.failures.extend(r.failures);
            report.steps.extend(r.steps);
            report.assignments.extend(r.assignments);
        }
        if !report.changed {
            report
                .changes
                .push("nothing to do: every PF and VM is already as configured".into());
        }
        Ok(report)
    }

    /// Whether `pf` already has `count` VFs on vfio-pci, each target VF in
    /// its VMM (attached, not paused), no other svff device of the PF in a
    /// VMM, and the table says exactly so.
    fn pf_settled(
        &self,
        pf: PciAddress,
        count: u16,
        target: &[Assignment],
        before: &[Assignment],
        sides: &BTreeMap<String, VmSide>,
    ) -> Result<bool, Error> {
        let status = self.mgr.pf_status(pf)?;
        if status.numvfs != count
            || status
                .vfs
                .iter()
                .any(|v| v.driver.as_deref() != Some("vfio-pci"))
        {
            return Ok(false);
        }
        let key = |a: &Assignment| (a.vf, a.vm.clone(), a.id.clone(), a.state);
        let want: BTreeSet<_> = target.iter().map(key).collect();
        let have: BTreeSet<_> = before.iter().map(key).collect();
        if want != have {
            return Ok(false);
        }
        for side in sides.values() {
            let wanted: BTreeSet<String> = target
                .iter()
                .filter(|a| a.vm == side.cfg.name)
                .map(|a| a.id.clone())
                .collect();
            if side.present != wanted || !side.paused.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Connects to every configured VM that holds or gets a VF of `pf`, and
    /// lists its svff devices of `pf`. A VM that cannot be reached is an
    /// error, unless `tolerate` (recovery): then it is recorded as gone.
    ///
    /// An svff-vmm VM whose VMM process is not running (never started, or
    /// exited) is to be started when `start_dead` (init), and otherwise
    /// recorded as gone (its side has no connection).
    fn connect_sides(
        &self,
        pf: PciAddress,
        before: &[Assignment],
        target: &[Assignment],
        tolerate: bool,
        start_dead: bool,
    ) -> Result<BTreeMap<String, VmSide>, Error> {
        let names: BTreeSet<&str> = before.iter().chain(target).map(|a| a.vm.as_str()).collect();
        let mut sides = BTreeMap::new();
        // Connect to every VM at once (each connect, capabilities and query
        // is a QMP round trip or more): one thread per VM, bounded by each
        // VM's own QMP timeout.
        let start = Instant::now();
        let cfgs: Vec<(&str, Result<VmConfig, Error>)> = names
            .into_iter()
            .map(|n| (n, self.vm_config(n).cloned()))
            .collect();
        let vmms = self.vmms;
        let probes: Vec<Option<Result<Probed, Error>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = cfgs
                .iter()
                .map(|(_, c)| {
                    c.as_ref()
                        .ok()
                        .map(|cfg| scope.spawn(move || probe_vm(vmms, pf, cfg)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))))
                .collect()
        });
        info!(ms = crate::sriov::elapsed_ms(start), "VMs connected");
        for ((name, cfg), probe) in cfgs.into_iter().zip(probes) {
            let cfg = match cfg {
                Ok(c) => c,
                Err(e) if tolerate => {
                    warn!(vm = name, error = %e.chain(), "VM no longer configured: its VFs are recorded as gone");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let conn = match probe.expect("probed every configured VM") {
                Ok((c, present, paused)) => {
                    sides.insert(
                        name.to_owned(),
                        VmSide {
                            cfg,
                            conn: Some(c),
                            present,
                            paused,
                            start: false,
                        },
                    );
                    continue;
                }
                Err(e) => Err::<(), Error>(e),
            };
            let vmm_dead = cfg.kind == crate::config::VmKind::SvffVmm
                && !matches!(
                    supervise::process(self.state.path(), name),
                    supervise::Process::Running { .. }
                );
            match conn {
                Err(e) if vmm_dead => {
                    if start_dead {
                        info!(vm = name, "svff-vmm not running: started with its VFs");
                    } else {
                        warn!(vm = name, error = %e.chain(), "svff-vmm not running: its VFs are recorded as gone");
                    }
                    sides.insert(
                        name.to_owned(),
                        VmSide {
                            cfg,
                            conn: None,
                            present: BTreeSet::new(),
                            paused: BTreeSet::new(),
                            start: start_dead,
                        },
                    );
                }
                Err(e) if tolerate => {
                    warn!(vm = name, error = %e.chain(), "VMM not reachable: its VFs are recorded as gone");
                    sides.insert(
                        name.to_owned(),
                        VmSide {
                            cfg,
                            conn: None,
                            present: BTreeSet::new(),
                            paused: BTreeSet::new(),
                            start: false,
                        },
                    );
                }
                Err(e) => return Err(e),
                Ok(()) => unreachable!(),
            }
        }
        Ok(sides)
    }

    /// Brings `pf` to `count` VFs and `target` (see the module docs). An
    /// error in the release step comes back as a [`ReleaseFailure`] before
    /// anything else changed; later failures are collected in the report.
    #[allow(clippy::too_many_arguments)]
    fn converge(
        &self,
        pf: PciAddress,
        count: u16,
        target: &[Assignment],
        mode: Mode,
        sides: &mut BTreeMap<String, VmSide>,
        journal: &Mutex<Journal>,
        operation: &str,
    ) -> Result<OpReport, ReleaseFailure> {
        let fail = |error| ReleaseFailure { error };
        let pfc = self.pf_config(pf).map_err(fail)?;
        let shared = Shared {
            journal,
            report: Mutex::new(OpReport::new(operation, mode)),
        };
        let (_, from) = self.mgr.vf_counts(pf).map_err(fail)?;
        {
            let mut r = shared.report();
            r.pf = Some(pf);
            r.from = Some(from);
            r.to = Some(count);
        }
        let target_ids: BTreeMap<&str, &Assignment> =
            target.iter().map(|a| (a.id.as_str(), a)).collect();

        // 1. release
        if from != count {
            let results: Vec<Result<(), Error>> = std::thread::scope(|scope| {
                let handles: Vec<_> = sides
                    .values_mut()
                    .filter(|s| s.conn.is_some())
                    .map(|side| {
                        let shared = &shared;
                        let target_ids = &target_ids;
                        let vmms = self.vmms;
                        scope.spawn(move || release_vm(side, mode, target_ids, shared, vmms))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(Error::Internal("a VMM thread panicked".into()))
                        })
                    })
                    .collect()
            });
            if let Some(e) = results.into_iter().find_map(Result::err) {
                return Err(fail(e));
            }
        }

        // 2. count and binding
        let bind_needed = |mgr: &SriovManager<S>| -> Result<bool, Error> {
            Ok(mgr
                .pf_status(pf)?
                .vfs
                .iter()
                .any(|v| v.driver.as_deref() != Some("vfio-pci")))
        };
        let after_release = (|| -> Result<(), Error> {
            if from != count {
                shared.record(Step::SetCount {
                    pf,
                    from,
                    to: count,
                })?;
                let opts = VfsSetOptions {
                    pf_driver: pfc.pf_driver(),
                    bind: None,
                    qdma: pfc.qdma.clone(),
                };
                // nvme profile: the VFs' VQ/VI resources (validated with the
                // config) are applied by the count change, before any bind.
                let nvme = pfc.nvme.as_ref().and_then(|p| p.resources().ok());
                shared.timed("change_numvfs", None, || {
                    self.mgr
                        .set_vf_count_with(pf, count, &opts, nvme.as_ref())
                        .map(drop)
                })?;
                shared.change(format!("PF {pf}: VFs {from} -> {count}"));
            }
            if count > 0 && bind_needed(self.mgr)? {
                shared.record(Step::Bind { pf })?;
                let vfs: Vec<PciAddress> = self.mgr.vfs(pf)?.into_iter().map(|(_, b)| b).collect();
                shared.timed("bind_vfs", None, || {
                    self.mgr.bind_all(&vfs, &DriverName::vfio_pci())
                })?;
                shared.change(format!("PF {pf}: {} VFs bound to vfio-pci", vfs.len()));
            }
            Ok(())
        })();
        // A failure here leaves the journal open: the caller rolls back,
        // or `svff recover` finishes.
        after_release.map_err(fail)?;

        // 3. restore
        let hosts: BTreeMap<u16, PciAddress> =
            self.mgr.vfs(pf).map_err(fail)?.into_iter().collect();
        let groups: BTreeMap<PciAddress, Option<u32>> = self
            .mgr
            .pf_status(pf)
            .map_err(fail)?
            .vfs
            .into_iter()
            .map(|v| (v.bdf, v.iommu_group))
            .collect();
        let mut result: Vec<Assignment> = Vec::new();
        let outcomes: Vec<Vec<Assignment>> = std::thread::scope(|scope| {
            let handles: Vec<_> = sides
                .values_mut()
                .map(|side| {
                    let shared = &shared;
                    let hosts = &hosts;
                    let groups = &groups;
                    let starter = Starter {
                        vmms: self.vmms,
                        state_dir: self.state.path(),
                    };
                    scope.spawn(move || {
                        restore_vm(pf, side, target, hosts, groups, shared, starter, None)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for o in outcomes {
            result.extend(o);
        }
        let mut report = shared
            .report
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        self.finish_table(pf, &result, journal, &mut report)
            .map_err(fail)?;
        Ok(report)
    }

    fn finish_table(
        &self,
        pf: PciAddress,
        entries: &[Assignment],
        journal: &Mutex<Journal>,
        report: &mut OpReport,
    ) -> Result<(), Error> {
        journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(Step::Table)?;
        let start = Instant::now();
        let mut table = self.state.load_table()?;
        table.replace_pf(pf, entries);
        self.state.store_table(&table)?;
        report.steps.push(TimedStep {
            name: "table".into(),
            vm: None,
            ms: crate::sriov::elapsed_ms(start),
        });
        let mut mine: Vec<Assignment> = table.of_pf(pf).cloned().collect();
        mine.sort_by_key(|a| a.vf);
        report.assignments = mine;
        Ok(())
    }

    /// `svff reconf`: `pf` to `vfs` VFs; VFs that survive stay with their VMs
    /// (paused and unpaused in pause mode, detached and attached again in
    /// detach mode), `assign` gives VMs new ones.
    pub fn reconf(
        &self,
        pf: PciAddress,
        vfs: u16,
        mode: Mode,
        assign: &[AssignRequest],
    ) -> Result<OpReport, Error> {
        let pfc = self.pf_config(pf)?;
        let what = format!("reconf of PF {pf} to {vfs} VFs ({} mode)", mode_name(mode));
        let _lock = self.state.lock(&what)?;
        self.refuse_if_pending()?;
        let (total, from) = self.mgr.vf_counts(pf)?;
        if vfs > total {
            return Err(Error::TooManyVfs {
                pf,
                max: total,
                requested: vfs,
                source: None,
            });
        }
        if pfc.pool {
            return Err(pool::not_a_count_change(pf));
        }
        let table = self.state.load_table()?;
        let before: Vec<Assignment> = table
            .of_pf(pf)
            .filter(|a| a.state != AssignState::Gone)
            .cloned()
            .collect();
        let mut target: Vec<Assignment> = before.iter().filter(|a| a.vf < vfs).cloned().collect();
        for req in assign {
            let vm = self.vm_config(&req.vm)?;
            for _ in 0..req.count {
                let used: BTreeSet<u16> = target.iter().map(|a| a.vf).collect();
                let free = (0..vfs).find(|i| !used.contains(i)).ok_or_else(|| {
                    Error::Plan(format!(
                        "PF {pf}: --assign asks for more VFs than the {vfs} requested have free ({} kept by their VMs)",
                        before.iter().filter(|a| a.vf < vfs).count()
                    ))
                })?;
                let used_buses: BTreeSet<String> = table
                    .assignments
                    .iter()
                    .chain(&target)
                    .filter(|a| a.vm == vm.name && !(a.pf == pf && a.vf >= vfs))
                    .filter_map(|a| a.bus.clone())
                    .collect();
                let bus = vm
                    .hotplug_ports
                    .iter()
                    .find(|p| !used_buses.contains(*p))
                    .cloned();
                if bus.is_none() && !vm.hotplug_ports.is_empty() {
                    return Err(Error::Plan(format!(
                        "VM {}: all its hotplug_ports are taken",
                        vm.name
                    )));
                }
                target.push(Assignment {
                    pf,
                    vf: free,
                    host: PciAddress::zero(),
                    vm: vm.name.clone(),
                    id: device_id(pf, free),
                    bus,
                    guest: None,
                    state: AssignState::Attached,
                });
            }
        }
        target.sort_by_key(|a| a.vf);
        let connect_start = Instant::now();
        let mut sides = self.connect_sides(pf, &before, &target, false, false)?;
        let connect = TimedStep {
            name: "connect".into(),
            vm: None,
            ms: crate::sriov::elapsed_ms(connect_start),
        };
        let gone = gone_entries(&target, &sides);
        let journal = Journal::begin(
            &self.state,
            Step::Begin {
                kind: OpKind::Reconf,
                pf,
                mode,
                from,
                to: vfs,
                before: before.clone(),
                target: target.clone(),
            },
        )?;
        let journal = Mutex::new(journal);
        match self.converge(pf, vfs, &target, mode, &mut sides, &journal, "reconf") {
            Ok(mut r) => {
                r.steps.insert(0, connect);
                self.record_gone(pf, &gone, &mut r)?;
                end_journal(journal, &r)?;
                Ok(r)
            }
            Err(ReleaseFailure { error }) => {
                warn!(error = %error.chain(), "reconf failed: rolling back");
                let reason = error.chain();
                journal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(Step::Rollback { reason })?;
                let (_, now) = self.mgr.vf_counts(pf)?;
                let outcome = if now != from {
                    // The count changed before the failure: roll forward is all we can do.
                    "the VF count had already changed; run `svff recover`".to_string()
                } else {
                    let r =
                        self.converge(pf, from, &before, mode, &mut sides, &journal, "rollback");
                    rollback_outcome(journal, r, || {
                        format!("rolled back: PF {pf} kept {from} VFs, every VMM has its VFs again")
                    })?
                };
                Err(Error::OperationFailed {
                    operation: what,
                    outcome,
                    source: Box::new(error),
                })
            }
        }
    }

    /// `svff recover`: finishes the operation the journal shows as
    /// interrupted (or the target of its rollback, if it had turned back).
    /// Nothing to do when the journal is complete.
    pub fn recover(&self) -> Result<OpReport, Error> {
        let _lock = self.state.lock("recover")?;
        let Some(p) = journal::pending(&self.state)? else {
            let mut r = OpReport::new("recover", Mode::Detach);
            r.changes
                .push("nothing to do: the journal shows no interrupted operation".into());
            return Ok(r);
        };
        if matches!(
            p.begin,
            Step::Begin {
                kind: OpKind::Pool,
                ..
            }
        ) {
            return self.recover_pool(&p);
        }
        let Step::Begin {
            pf,
            mode,
            from,
            to,
            before,
            target,
            ..
        } = &p.begin
        else {
            unreachable!("pending() checks the first record");
        };
        let (count, goal) = if p.rolled_back() {
            (*from, before.clone())
        } else {
            (*to, target.clone())
        };
        info!(op = p.op, what = %summary(&p.begin), rolled_back = p.rolled_back(), "recovering");
        let journal = Mutex::new(Journal::resume(&self.state, &p)?);
        // An interrupted init starts the svff-vmm VMs it had not started yet.
        let start_dead = matches!(
            p.begin,
            Step::Begin {
                kind: OpKind::Init,
                ..
            }
        );
        let mut sides = self.connect_sides(*pf, before, &goal, true, start_dead)?;
        // Entries of VMs that are gone stay recorded as gone.
        let gone = gone_entries(&goal, &sides);
        let r = self
            .converge(*pf, count, &goal, *mode, &mut sides, &journal, "recover")
            .map_err(|f| f.error)?;
        self.finish_recovery(*pf, &gone, r, &p.begin, journal)
    }

    /// The end of a recovery (count change or pool): `gone` recorded, the
    /// report names the interrupted operation, the journal ends.
    fn finish_recovery(
        &self,
        pf: PciAddress,
        gone: &[Assignment],
        mut r: OpReport,
        begin: &Step,
        journal: Mutex<Journal>,
    ) -> Result<OpReport, Error> {
        self.record_gone(pf, gone, &mut r)?;
        r.changes
            .insert(0, format!("recovered the interrupted {}", summary(begin)));
        r.changed = true;
        end_journal(journal, &r)?;
        Ok(r)
    }

    /// Adds `gone` to `pf`'s table as gone, and names them in `r`.
    fn record_gone(
        &self,
        pf: PciAddress,
        gone: &[Assignment],
        r: &mut OpReport,
    ) -> Result<(), Error> {
        if gone.is_empty() {
            return Ok(());
        }
        let mut table = self.state.load_table()?;
        let mut entries: Vec<Assignment> = table.of_pf(pf).cloned().collect();
        entries.extend(gone.iter().cloned());
        table.replace_pf(pf, &entries);
        self.state.store_table(&table)?;
        for g in gone {
            r.failures.push(format!(
                "VM {}: not reachable; {} (VF {}) recorded as gone",
                g.vm, g.id, g.vf
            ));
        }
        r.assignments = table.of_pf(pf).cloned().collect();
        Ok(())
    }

    /// Every configured VM with, for kind `svff-vmm`, its VMM process as
    /// svff's pid file says, for `svff status`.
    pub fn vm_status(&self) -> Vec<crate::status::VmStatus> {
        self.config
            .vms
            .iter()
            .map(|vm| {
                let (process, pid) = match vm.kind {
                    crate::config::VmKind::Qmp | crate::config::VmKind::Libvirt => (None, None),
                    crate::config::VmKind::SvffVmm => {
                        match supervise::process(self.state.path(), &vm.name) {
                            supervise::Process::NotStarted => (Some("not started".into()), None),
                            supervise::Process::Running { pid } => {
                                (Some("running".into()), Some(pid))
                            }
                            supervise::Process::Exited { pid } => {
                                (Some("exited".into()), Some(pid))
                            }
                        }
                    }
                };
                let files = supervise::files(self.state.path(), &vm.name);
                let svff_vmm = vm.kind == crate::config::VmKind::SvffVmm;
                crate::status::VmStatus {
                    name: vm.name.clone(),
                    kind: vm.kind,
                    qmp: vm.qmp.clone(),
                    process,
                    pid,
                    log: svff_vmm.then_some(files.log),
                    serial: svff_vmm.then_some(files.serial),
                }
            })
            .collect()
    }

    /// The assignment table.
    pub fn table(&self) -> Result<AssignmentTable, Error> {
        self.state.load_table()
    }

    /// The table's entries of `pfs`, each with the pause state its VMM
    /// reports (`query-svff-vfio`), for `svff status`.
    pub fn status_assignments(
        &self,
        pfs: &[PciAddress],
    ) -> Result<Vec<crate::status::AssignmentStatus>, Error> {
        let table = self.state.load_table()?;
        let entries: Vec<&Assignment> = table
            .assignments
            .iter()
            .filter(|a| pfs.contains(&a.pf))
            .collect();
        let mut answers: BTreeMap<
            String,
            Result<Option<Vec<qmp_ext::svff::SvffVfioInfo>>, String>,
        > = BTreeMap::new();
        for a in &entries {
            if answers.contains_key(&a.vm) {
                continue;
            }
            let answer = self
                .vm_config(&a.vm)
                .and_then(|cfg| self.vmms.connect(cfg))
                .and_then(|mut c| c.pause_states())
                .map_err(|e| e.chain());
            answers.insert(a.vm.clone(), answer);
        }
        Ok(entries
            .into_iter()
            .map(|a| {
                let (vmm_state, vmm_note) = match answers.get(&a.vm) {
                    Some(Ok(Some(list))) => match list.iter().find(|i| i.id == a.id) {
                        Some(i) => (Some(i.state), None),
                        None => (None, Some(format!("the VMM does not list {}", a.id))),
                    },
                    Some(Ok(None)) => (
                        None,
                        Some("VMM does not speak the svff QMP commands".to_owned()),
                    ),
                    Some(Err(e)) => (None, Some(e.clone())),
                    None => (None, None),
                };
                crate::status::AssignmentStatus {
                    entry: a.clone(),
                    vmm_state,
                    vmm_note,
                }
            })
            .collect())
    }
}

/// Sub-steps of one VM's `pause`/`unpause` of one device (summed per VM
/// when it holds several): `<step>.qmp`, the command's round trip seen from
/// here since `sent`; `<step>.vmm`, the VMM's own time; `<step>.<phase>`,
/// each phase the VMM timed (`SvffVfioTimings`).
fn vmm_substeps(
    shared: &Shared<'_>,
    step: &str,
    vm: &str,
    sent: Instant,
    t: &qmp_ext::svff::SvffVfioTimings,
) {
    let qmp = crate::sriov::elapsed_ms(sent);
    let ns_ms = |ns: u64| ns as f64 / 1e6;
    let mut r = shared.report();
    let mut push = |name: String, ms: f64| {
        r.steps.push(TimedStep {
            name,
            vm: Some(vm.to_owned()),
            ms,
        })
    };
    push(format!("{step}.qmp"), qmp);
    push(format!("{step}.vmm"), ns_ms(t.total_ns));
    for p in &t.phases {
        push(format!("{step}.{}", p.name.name()), ns_ms(p.ns));
    }
}

/// A connected VM: its connection, the svff devices of the PF it holds and
/// which of them are paused.
type Probed = (Box<dyn Vmm>, BTreeSet<String>, BTreeSet<String>);

/// Connects to `cfg`'s VMM and reads its devices of `pf` and their states.
fn probe_vm(vmms: &dyn Connector, pf: PciAddress, cfg: &VmConfig) -> Result<Probed, Error> {
    let mut c = vmms.connect(cfg)?;
    let present: BTreeSet<String> = c
        .devices()?
        .into_iter()
        .filter(|id| id_index(pf, id).is_some())
        .collect();
    let paused = match settled_states(c.as_mut(), cfg.qmp_timeout_s) {
        Ok(Some(states)) => states
            .into_iter()
            .filter(|s| present.contains(&s.id) && s.state != svff_types::DeviceState::Attached)
            .map(|s| s.id)
            .collect(),
        _ => BTreeSet::new(),
    };
    Ok((c, present, paused))
}

/// The VMM's pause states once none is in transition (`pausing`,
/// `unpausing`: a command of a helper that died may still be running),
/// waiting at most `timeout_s`.
fn settled_states(
    c: &mut dyn Vmm,
    timeout_s: u64,
) -> Result<Option<Vec<qmp_ext::svff::SvffVfioInfo>>, Error> {
    use svff_types::DeviceState as D;
    let end = Instant::now() + std::time::Duration::from_secs(timeout_s);
    loop {
        let states = c.pause_states()?;
        let moving = states
            .iter()
            .flatten()
            .any(|s| matches!(s.state, D::Pausing | D::Unpausing));
        if !moving || Instant::now() > end {
            return Ok(states);
        }
        // The VMM announces the end of a transition only to the connection
        // that asked for it: polled.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The entries of `goal` whose VM has no connection and is not to be
/// started: recorded as gone after the convergence.
fn gone_entries(goal: &[Assignment], sides: &BTreeMap<String, VmSide>) -> Vec<Assignment> {
    goal.iter()
        .filter(|a| {
            sides
                .get(&a.vm)
                .is_none_or(|s| s.conn.is_none() && !s.start)
        })
        .map(|a| Assignment {
            state: AssignState::Gone,
            ..a.clone()
        })
        .collect()
}

/// The outcome of a rollback, for [`Error::OperationFailed`]: on a clean
/// rollback the journal is ended as `rolled_back` and `ok` names what was
/// kept; otherwise the journal stays open and the outcome asks for `svff recover`.
fn rollback_outcome(
    journal: Mutex<Journal>,
    result: Result<OpReport, ReleaseFailure>,
    ok: impl FnOnce() -> String,
) -> Result<String, Error> {
    Ok(match result {
        Ok(r) if r.failures.is_empty() => {
            journal
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .end("rolled_back")?;
            ok()
        }
        Ok(r) => format!(
            "rolled back with failures: {}; run `svff recover`",
            r.failures.join("; ")
        ),
        Err(e) => format!(
            "the rollback failed too ({}); run `svff recover`",
            e.error.chain()
        ),
    })
}

fn end_journal(journal: Mutex<Journal>, r: &OpReport) -> Result<(), Error> {
    journal
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .end(if r.failures.is_empty() {
            "done"
        } else {
            "failed"
        })
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Pause => "pause",
        Mode::Detach => "detach",
    }
}

fn summary(begin: &Step) -> String {
    match begin {
        Step::Begin {
            kind,
            pf,
            mode,
            from,
            to,
            ..
        } => format!(
            "{} of PF {pf} from {from} to {to} VFs ({} mode)",
            match kind {
                OpKind::Init => "init",
                OpKind::Reconf => "reconf",
                OpKind::Pool => "pool reconf",
            },
            mode_name(*mode)
        ),
        other => format!("{other:?}"),
    }
}

/// A maker of further QMP connections to `vm`'s VMM, for one command per
/// device at once: svff-vmm serves every connection on a thread of its own
/// and pauses and unpauses its devices independently (FLRs in parallel).
/// `None` for kind `qmp` (QEMU's monitor serves one client at a time and runs
/// its commands in its main loop): one device after another on one connection.
fn extra_connections<'a>(
    vm: &'a VmConfig,
    vmms: &'a dyn Connector,
) -> Option<impl Fn() -> Result<Box<dyn Vmm>, Error> + Sync + 'a> {
    (vm.kind == crate::config::VmKind::SvffVmm).then_some(move || vmms.connect(vm))
}

/// What [`per_device`] runs per item: given a connection (or why there is
/// none) and the item.
type PerDevice<'a, T, R> = dyn Fn(Result<&mut dyn Vmm, Error>, &T) -> R + Sync + 'a;

/// Runs `f` once per item and returns the results in the items' order. With
/// `more` and several items, the first item runs on `conn` and every other on
/// a connection of its own, all at once (a connection that cannot be made is
/// handed to `f` as its error); otherwise they run on `conn` one after
/// another, stopping after the first result `stop` picks.
fn per_device<T: Sync, R: Send>(
    conn: &mut dyn Vmm,
    more: Option<&(impl Fn() -> Result<Box<dyn Vmm>, Error> + Sync)>,
    items: &[T],
    f: &PerDevice<'_, T, R>,
    stop: fn(&R) -> bool,
) -> Vec<R> {
    match (more, items.split_first()) {
        (Some(connect), Some((first, rest))) if !rest.is_empty() => std::thread::scope(|scope| {
            let handles: Vec<_> = rest
                .iter()
                .map(|item| {
                    scope.spawn(move || match connect() {
                        Ok(mut c) => f(Ok(&mut *c), item),
                        Err(e) => f(Err(e), item),
                    })
                })
                .collect();
            let mut out = vec![f(Ok(conn), first)];
            for (h, item) in handles.into_iter().zip(rest) {
                out.push(h.join().unwrap_or_else(|_| {
                    f(
                        Err(Error::Internal("a VMM connection thread panicked".into())),
                        item,
                    )
                }));
            }
            out
        }),
        _ => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                let r = f(Ok(&mut *conn), item);
                let done = stop(&r);
                out.push(r);
                if done {
                    break;
                }
            }
            out
        }
    }
}

/// Release step of one VM: every svff device of the PF it holds attached is
/// paused (pause mode) or detached (detach mode, or not in the target).
fn release_vm(
    side: &mut VmSide,
    mode: Mode,
    target: &BTreeMap<&str, &Assignment>,
    shared: &Shared<'_>,
    vmms: &dyn Connector,
) -> Result<(), Error> {
    let name = side.cfg.name.clone();
    let more = extra_connections(&side.cfg, vmms);
    let conn = side.conn.as_mut().expect("filtered");
    let ids: Vec<String> = side
        .present
        .iter()
        .filter(|id| !side.paused.contains(*id))
        .cloned()
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    match mode {
        Mode::Pause => shared.timed("pause", Some(&name), || {
            // Each pause is journaled just before it is sent; with several
            // connections (svff-vmm) the devices are paused at once.
            let pause = |c: Result<&mut dyn Vmm, Error>, id: &String| {
                shared.record(Step::Pause {
                    vm: name.clone(),
                    id: id.clone(),
                })?;
                let t = Instant::now();
                c?.pause(id).map(|timings| (t, timings))
            };
            let results = per_device(&mut **conn, more.as_ref(), &ids, &pause, Result::is_err);
            let mut first_error = None;
            for (id, r) in ids.iter().zip(results) {
                match r {
                    Ok((t, timings)) => {
                        vmm_substeps(shared, "pause", &name, t, &timings);
                        side.paused.insert(id.clone());
                        shared.change(format!("VM {name}: paused {id}"));
                    }
                    Err(e) => {
                        // A pause that got no answer may still happen: the
                        // rollback unpauses it too (and fails while the VMM
                        // does not answer, leaving it to `svff recover`).
                        if e.is_timeout() {
                            side.paused.insert(id.clone());
                        }
                        first_error.get_or_insert(e);
                    }
                }
            }
            first_error.map_or(Ok(()), Err)
        }),
        Mode::Detach => shared.timed("remove_vf", Some(&name), || {
            for id in &ids {
                shared.record(Step::Detach {
                    vm: name.clone(),
                    id: id.clone(),
                })?;
                conn.detach(id)?;
                side.present.remove(id);
                let kept = target.get(id.as_str()).is_some_and(|a| a.vm == name);
                shared.change(format!(
                    "VM {name}: removed {id}{}",
                    if kept { " (to be added back)" } else { "" }
                ));
            }
            Ok(())
        }),
    }
}

/// What the restore step needs to start an svff-vmm VM.
#[derive(Clone, Copy)]
struct Starter<'a> {
    vmms: &'a dyn Connector,
    state_dir: &'a std::path::Path,
}

/// Starts `side`'s VMM with its target VFs (`mine`); `false` if it could not.
fn start_vm(
    pf: PciAddress,
    side: &mut VmSide,
    mine: &[&Assignment],
    hosts: &BTreeMap<u16, PciAddress>,
    groups: &BTreeMap<PciAddress, Option<u32>>,
    shared: &Shared<'_>,
    starter: Starter<'_>,
) -> bool {
    let name = side.cfg.name.clone();
    let mut vfs = Vec::new();
    for a in mine {
        match hosts.get(&a.vf) {
            Some(&host) => vfs.push(supervise::StartVf {
                id: a.id.clone(),
                host,
                group: groups.get(&host).copied().flatten(),
            }),
            None => {
                let line = format!("VM {name}: {}: VF {} of PF {pf} does not exist", a.id, a.vf);
                warn!("{line}");
                shared.report().failures.push(line);
            }
        }
    }
    if vfs.is_empty() {
        info!(vm = %name, "svff-vmm not started: no VF to start it with");
        return false;
    }
    let ids: Vec<String> = vfs.iter().map(|v| v.id.clone()).collect();
    if let Err(e) = shared.record(Step::StartVmm {
        vm: name.clone(),
        ids: ids.clone(),
    }) {
        shared
            .report()
            .failures
            .push(format!("VM {name}: not started: {}", e.chain()));
        return false;
    }
    let r = shared.timed("start_vmm", Some(&name), || {
        starter.vmms.start(&side.cfg, starter.state_dir, &vfs)
    });
    match r {
        Ok((conn, pid)) => {
            side.conn = Some(conn);
            side.present = ids.iter().cloned().collect();
            side.start = false;
            shared.change(format!(
                "VM {name}: started svff-vmm (pid {pid}) with {}",
                ids.join(", ")
            ));
            true
        }
        Err(e) => {
            let line = format!("VM {name}: its VMM could not be started: {}", e.chain());
            warn!("{line}");
            shared.report().failures.push(line);
            false
        }
    }
}

/// What became of one unpause of the restore step.
enum Unpaused {
    /// Not sent (journal or group fd failed): the failure line.
    NotSent(String),
    /// Sent at this time, with the VMM's answer.
    Sent(Instant, Result<qmp_ext::svff::SvffVfioTimings, Error>),
}

/// Restore step of one VM; returns its resulting assignments. With `gate`
/// (pool mode) each unpause and add first waits until that VF's resources
/// are changed.
#[allow(clippy::too_many_arguments)]
fn restore_vm(
    pf: PciAddress,
    side: &mut VmSide,
    target: &[Assignment],
    hosts: &BTreeMap<u16, PciAddress>,
    groups: &BTreeMap<PciAddress, Option<u32>>,
    shared: &Shared<'_>,
    starter: Starter<'_>,
    gate: Option<&pool::ResourceGate>,
) -> Vec<Assignment> {
    let name = side.cfg.name.clone();
    let mine: Vec<&Assignment> = target.iter().filter(|a| a.vm == name).collect();
    let mut started_at: BTreeMap<String, String> = BTreeMap::new();
    if side.start {
        if !start_vm(pf, side, &mine, hosts, groups, shared, starter) {
            return Vec::new();
        }
        if let Some(Ok(Some(list))) = side.conn.as_mut().map(|c| c.pause_states()) {
            started_at = list.into_iter().map(|i| (i.id, i.guest)).collect();
        }
    }
    let Some(conn) = side.conn.as_mut() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // Devices that could not be unpaused: removed, not added again.
    let mut failed: BTreeSet<String> = BTreeSet::new();
    let fail = |shared: &Shared<'_>, line: String| {
        warn!("{line}");
        shared.report().failures.push(line);
    };
    // Unpause the paused survivors.
    let to_unpause: Vec<&&Assignment> = mine
        .iter()
        .filter(|a| side.paused.contains(&a.id))
        .collect();
    if !to_unpause.is_empty() {
        let cfg = side.cfg.clone();
        let more = extra_connections(&cfg, starter.vmms);
        let _ = shared.timed("unpause", Some(&name), || {
            // A VF that no longer exists is reported, not unpaused.
            let jobs: Vec<(&Assignment, PciAddress)> = to_unpause
                .iter()
                .filter_map(|a| match hosts.get(&a.vf) {
                    Some(&host) => Some((**a, host)),
                    None => {
                        fail(shared, format!("VM {name}: {}: VF {} of PF {pf} does not exist", a.id, a.vf));
                        None
                    }
                })
                .collect();
            // Journaled just before it is sent; with several connections
            // (svff-vmm) the devices are unpaused at once.
            let unpause = |c: Result<&mut dyn Vmm, Error>, (a, host): &(&Assignment, PciAddress)| {
                let host = *host;
                if let Some(g) = gate {
                    g.wait(a.vf);
                }
                if let Err(e) = shared.record(Step::Unpause {
                    vm: name.clone(),
                    id: a.id.clone(),
                    host,
                }) {
                    return Unpaused::NotSent(format!("VM {name}: {}: {}", a.id, e.chain()));
                }
                let group = if cfg.pass_group_fd {
                    match groups.get(&host).copied().flatten() {
                        Some(g) => match OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(format!("/dev/vfio/{g}"))
                        {
                            Ok(f) => Some(f),
                            Err(e) => {
                                return Unpaused::NotSent(format!("VM {name}: {}: cannot open /dev/vfio/{g} of {host}: {e}", a.id));
                            }
                        },
                        None => None,
                    }
                } else {
                    None
                };
                let t = Instant::now();
                Unpaused::Sent(
                    t,
                    c.and_then(|c| c.unpause(&a.id, host, group.as_ref().map(|f| f.as_fd()))),
                )
            };
            let results = per_device(&mut **conn, more.as_ref(), &jobs, &unpause, |_| false);
            for ((a, host), r) in jobs.iter().zip(results) {
                let host = *host;
                match r {
                    Unpaused::NotSent(line) => fail(shared, line),
                    Unpaused::Sent(t, Ok(timings)) => {
                        vmm_substeps(shared, "unpause", &name, t, &timings);
                        side.paused.remove(&a.id);
                        shared.change(format!("VM {name}: unpaused {} onto {host}", a.id));
                        out.push(Assignment {
                            host,
                            state: AssignState::Attached,
                            ..(*a).clone()
                        });
                    }
                    Unpaused::Sent(_, Err(e)) if e.is_timeout() => {
                        // A VMM that does not answer is not told to remove
                        // the device: it stays paused until `svff recover`
                        // (the journal stays open) finds the VMM answering.
                        failed.insert(a.id.clone());
                        fail(shared, format!("VM {name}: {} could not be unpaused onto {host}: {}; it stays paused: run `svff recover` once the VMM answers", a.id, e.chain()));
                        out.push(Assignment {
                            host,
                            state: AssignState::Paused,
                            ..(*a).clone()
                        });
                    }
                    Unpaused::Sent(_, Err(e)) => {
                        failed.insert(a.id.clone());
                        fail(shared, format!("VM {name}: {} could not be unpaused onto {host}: {}; removing it from the guest", a.id, e.chain()));
                        let _ = shared.record(Step::Detach {
                            vm: name.clone(),
                            id: a.id.clone(),
                        });
                        if let Err(e) = conn.detach(&a.id) {
                            fail(shared, format!("VM {name}: device_del of {} failed too: {}", a.id, e.chain()));
                        } else {
                            side.present.remove(&a.id);
                            side.paused.remove(&a.id);
                        }
                    }
                }
            }
            Ok(())
        });
    }
    // Remove what is not in the target.
    let extra: Vec<String> = side
        .present
        .iter()
        .filter(|id| !mine.iter().any(|a| &a.id == *id))
        .cloned()
        .collect();
    if !extra.is_empty() {
        let _ = shared.timed("remove_vf", Some(&name), || {
            for id in &extra {
                if let Err(e) = shared
                    .record(Step::Detach {
                        vm: name.clone(),
                        id: id.clone(),
                    })
                    .and_then(|()| conn.detach(id))
                {
                    fail(
                        shared,
                        format!("VM {name}: {id} could not be removed: {}", e.chain()),
                    );
                } else {
                    side.present.remove(id);
                    side.paused.remove(id);
                    shared.change(format!("VM {name}: removed {id}"));
                }
            }
            Ok(())
        });
    }
    // Attached survivors stay; absent ones are added.
    let to_add: Vec<&&Assignment> = mine
        .iter()
        .filter(|a| !side.present.contains(&a.id) && !failed.contains(&a.id))
        .collect();
    for a in mine
        .iter()
        .filter(|a| side.present.contains(&a.id) && !side.paused.contains(&a.id))
    {
        if let Some(&host) = hosts.get(&a.vf) {
            if !out.iter().any(|o: &Assignment| o.id == a.id) {
                out.push(Assignment {
                    host,
                    guest: a.guest.clone().or_else(|| started_at.get(&a.id).cloned()),
                    state: AssignState::Attached,
                    ..(**a).clone()
                });
            }
        }
    }
    if !to_add.is_empty() {
        let _ = shared.timed("add_vf", Some(&name), || {
            for a in &to_add {
                let Some(&host) = hosts.get(&a.vf) else {
                    fail(
                        shared,
                        format!("VM {name}: {}: VF {} of PF {pf} does not exist", a.id, a.vf),
                    );
                    continue;
                };
                // libvirt opens the group of a hostdev itself; a group fd
                // svff held open meanwhile would make that open fail (EBUSY:
                // a VFIO group is opened once).
                let group =
                    if side.cfg.pass_group_fd && side.cfg.kind != crate::config::VmKind::Libvirt {
                        match groups.get(&host).copied().flatten() {
                            Some(g) => match vmm::open_group(&name, &a.id, g) {
                                Ok(f) => Some(f),
                                Err(e) => {
                                    fail(
                                        shared,
                                        format!(
                                            "VM {name}: {} could not be added: {}",
                                            a.id,
                                            e.chain()
                                        ),
                                    );
                                    continue;
                                }
                            },
                            None => None,
                        }
                    } else {
                        None
                    };
                if let Some(g) = gate {
                    g.wait(a.vf);
                }
                let r = shared
                    .record(Step::Attach {
                        vm: name.clone(),
                        id: a.id.clone(),
                        host,
                    })
                    .and_then(|()| {
                        conn.attach(
                            &a.id,
                            host,
                            a.bus.as_deref(),
                            group.as_ref().map(|f| f.as_fd()),
                        )
                    });
                match r {
                    Ok(guest) => {
                        side.present.insert(a.id.clone());
                        shared.change(format!(
                            "VM {name}: added {} (VF {} {host}){}",
                            a.id,
                            a.vf,
                            guest
                                .as_deref()
                                .map(|g| format!(" at guest {g}"))
                                .unwrap_or_default()
                        ));
                        out.push(Assignment {
                            host,
                            guest,
                            state: AssignState::Attached,
                            ..(**a).clone()
                        });
                    }
                    Err(e) => fail(
                        shared,
                        format!("VM {name}: {} could not be added: {}", a.id, e.chain()),
                    ),
                }
            }
            Ok(())
        });
    }
    out
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
