//! Pool mode: a PF (`pool = true`, nvme profile) whose `vfs` VFs are created
//! once by `init`; `svff reconf --resources` then changes the NVMe resources
//! of some of them without writing `sriov_numvfs`:
//!
//! 1. the request is checked against the controller before anything is
//!    written (unknown VF, beyond the per-VF maxima or the flexible totals:
//!    errors naming the PF and VF); the VFs whose secondary controller
//!    already is as asked are left out; a VI change of a VF a VM holds is
//!    refused (the VI count is the VF's MSI-X table size, which the guest,
//!    keeping its config space through the pause, cannot follow: the
//!    VMM's identity check would refuse the unpause);
//! 2. `begin` (kind `pool`) and `pool_plan` (those VFs' resources before and
//!    after) are journaled;
//! 3. *pause*: only the VMMs holding a changing VF are contacted, one thread
//!    per VM (and, for svff-vmm, one connection per VF: its VFs pause at
//!    once), and pause only those VFs (the other guests see nothing);
//! 4. a VF that left vfio-pci is bound again (`bind`); *resources*
//!    (`resources` record): offline, assign VQ, assign VI, online for each
//!    changing VF ([`crate::nvme::apply_plan_each`]);
//! 5. *unpause* of the paused VFs (same VF, same host address), `device_add`
//!    of free pool VFs given to VMs with `--assign`: each as soon as its own
//!    secondary controller is online, while the next VFs are changed;
//! 6. the assignment table: the other entries are kept as they are.
//!
//! Failure rules as for a count change: a failed pause rolls back (every
//! VF already paused is unpaused, the resources are not touched); a failure
//! after that (resources refused, an unpause failing) finishes the
//! operation and reports it. `svff recover` of an interrupted pool
//! operation applies the planned resources that are not yet applied
//! (pausing first the VFs still attached that they concern), then
//! unpauses; of one that had turned back, it only unpauses.

use super::*;
use crate::nvme::{NvmeResources, PlannedVf, SecondaryController, VfResources};
use journal::Pending;

/// The refusal of a VF-count reconf of a pool-mode PF.
pub(super) fn not_a_count_change(pf: PciAddress) -> Error {
    Error::Plan(format!(
        "PF {pf} is in pool mode: its VF count is fixed; change VF resources with `svff reconf --pf {pf} --resources VF=vq:N,vi:N,...`"
    ))
}

/// What a pool reconf or its recovery works on.
struct PoolJob<'p> {
    pf: PciAddress,
    /// The changes still to apply (`None`: none, as in a rollback).
    plan: Option<&'p [PlannedVf]>,
    /// The affected entries as they are to be (changing VFs held by VMs,
    /// VFs newly given to VMs).
    goal: &'p [Assignment],
    /// Whether attached VFs whose resources still differ are paused first.
    release: bool,
    /// The controller and its secondary controller list as just read by
    /// the caller (a reconf right after its plan): not asked again.
    known: Option<(&'p dyn crate::nvme::NvmeAdmin, &'p [SecondaryController])>,
}

impl<S: Sysfs> Orchestrator<'_, S> {
    /// `svff reconf --pf PF --resources SPEC [--assign VM=N,...]` on a PF in
    /// pool mode (see the module docs): the library entry point (the daemon,
    /// the CLI's `--direct` and `svff bench --mode pool` call it). The
    /// result's steps are `plan` (the request checked against the
    /// controller), `connect`, `pause` and `unpause` per VM, `resources`,
    /// `bind_vfs` (only if a VF had left vfio-pci), `add_vf`, `table`.
    pub fn reconf_pool(
        &self,
        pf: PciAddress,
        resources: &NvmeResources,
        assign: &[AssignRequest],
    ) -> Result<OpReport, Error> {
        let pfc = self.pf_config(pf)?;
        let what = format!("pool reconf of PF {pf}");
        let _lock = self.state.lock(&what)?;
        self.refuse_if_pending()?;
        if !pfc.pool {
            return Err(Error::Plan(format!(
                "PF {pf} is not in pool mode (`pool = true` in its config): change its VF count with --vfs"
            )));
        }
        let plan_start = Instant::now();
        let size = pfc.vfs.unwrap_or(0);
        let (_, n) = self.mgr.vf_counts(pf)?;
        if n != size {
            return Err(Error::Plan(format!(
                "PF {pf}: its pool of {size} VFs is not there ({n} VFs): run `svff init`"
            )));
        }
        self.require_nvme_pf(pf)?;
        let ctrl = self.mgr.nvme_opener().open(pf)?;
        let caps = crate::nvme::primary_caps(&*ctrl)?;
        let secs = crate::nvme::secondary_controllers(&*ctrl)?;
        let plan = crate::nvme::check_plan(pf, &caps, &secs, n, resources)?;
        let changed: BTreeSet<u16> = crate::nvme::changed_vfs(&plan, &secs).into_iter().collect();
        let plan: Vec<PlannedVf> = plan
            .into_iter()
            .filter(|p| changed.contains(&p.index))
            .collect();
        let held = |scid: u16| {
            secs.iter()
                .find(|s| s.scid == scid)
                .map_or(VfResources::default(), |s| VfResources {
                    vq: s.nvq,
                    vi: s.nvi,
                })
        };
        let before_res = NvmeResources {
            default: None,
            vfs: plan.iter().map(|p| (p.index, held(p.scid))).collect(),
        };
        let target_res = NvmeResources {
            default: None,
            vfs: plan.iter().map(|p| (p.index, p.want)).collect(),
        };

        let table = self.state.load_table()?;
        let all: Vec<Assignment> = table.of_pf(pf).cloned().collect();
        // The VI count is the VF's MSI-X table size (QEMU's nvme sets the
        // MSI-X capability's table size to it when the secondary goes
        // online): a guest holding the VF through a pause keeps its config
        // space and cannot follow, and the VMM refuses the unpause.
        for p in &plan {
            let was = held(p.scid);
            if let Some(a) = all.iter().find(|a| a.vf == p.index) {
                if p.want.vi != was.vi {
                    return Err(Error::NvmeResources {
                        pf,
                        reason: format!(
                            "VF {} is held by VM {} ({}): changing its VI resources ({} -> {}) changes its MSI-X table size, which its guest cannot follow through a pause; change only vq, or give it VI resources while no VM holds it",
                            p.index, a.vm, a.id, was.vi, p.want.vi
                        ),
                    });
                }
            }
        }
        let before: Vec<Assignment> = all
            .iter()
            .filter(|a| a.state != AssignState::Gone)
            .cloned()
            .collect();
        let mut target = before.clone();
        let mut new_ids: BTreeSet<String> = BTreeSet::new();
        for req in assign {
            let vm = self.vm_config(&req.vm)?;
            for _ in 0..req.count {
                let used: BTreeSet<u16> = all.iter().chain(&target).map(|a| a.vf).collect();
                let free = (0..n).find(|i| !used.contains(i)).ok_or_else(|| {
                    Error::Plan(format!(
                        "PF {pf}: --assign asks for more VFs than its pool of {n} has free"
                    ))
                })?;
                let used_buses: BTreeSet<String> = table
                    .assignments
                    .iter()
                    .chain(&target)
                    .filter(|a| a.vm == vm.name)
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
                let id = device_id(pf, free);
                new_ids.insert(id.clone());
                target.push(Assignment {
                    pf,
                    vf: free,
                    host: PciAddress::zero(),
                    vm: vm.name.clone(),
                    id,
                    bus,
                    guest: None,
                    state: AssignState::Attached,
                });
            }
        }
        target.sort_by_key(|a| a.vf);
        if plan.is_empty() && new_ids.is_empty() {
            let mut r = OpReport::new("reconf", Mode::Pause);
            r.pf = Some(pf);
            r.from = Some(n);
            r.to = Some(n);
            r.changes
                .push("nothing to do: every VF named already has its resources".into());
            r.assignments = all;
            return Ok(r);
        }
        let affected = |a: &&Assignment| changed.contains(&a.vf) || new_ids.contains(&a.id);
        let aff_before: Vec<Assignment> = before.iter().filter(affected).cloned().collect();
        let aff_target: Vec<Assignment> = target.iter().filter(affected).cloned().collect();
        // The request checked against the controller (Identify), and the
        // connections to the affected VMs, as the report's first steps.
        let mut first_steps = vec![TimedStep {
            name: "plan".into(),
            vm: None,
            ms: crate::sriov::elapsed_ms(plan_start),
        }];
        let connect_start = Instant::now();
        let mut sides = self.connect_sides(pf, &aff_before, &aff_target, false, false)?;
        first_steps.push(TimedStep {
            name: "connect".into(),
            vm: None,
            ms: crate::sriov::elapsed_ms(connect_start),
        });
        restrict(&mut sides, &aff_target);
        let gone = gone_entries(&aff_target, &sides);

        let mut journal = Journal::begin(
            &self.state,
            Step::Begin {
                kind: OpKind::Pool,
                pf,
                mode: Mode::Pause,
                from: n,
                to: n,
                before: before.clone(),
                target: target.clone(),
            },
        )?;
        journal.record(Step::PoolPlan {
            pf,
            before: before_res,
            target: target_res,
        })?;
        let journal = Mutex::new(journal);
        let job = PoolJob {
            pf,
            plan: Some(&plan),
            goal: &aff_target,
            release: true,
            known: Some((&*ctrl, &secs)),
        };
        match self.pool_converge(&job, &mut sides, &journal, "reconf") {
            Ok(mut r) => {
                r.steps.splice(0..0, first_steps);
                self.record_gone(pf, &gone, &mut r)?;
                end_journal(journal, &r)?;
                Ok(r)
            }
            Err(ReleaseFailure { error }) => {
                warn!(error = %error.chain(), "pool reconf failed: rolling back");
                journal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(Step::Rollback {
                        reason: error.chain(),
                    })?;
                let back = PoolJob {
                    pf,
                    plan: None,
                    goal: &aff_before,
                    release: false,
                    known: None,
                };
                let r = self.pool_converge(&back, &mut sides, &journal, "rollback");
                let outcome = rollback_outcome(journal, r, || {
                    format!(
                        "rolled back: no resource of PF {pf} changed, every VMM has its VFs again"
                    )
                })?;
                Err(Error::OperationFailed {
                    operation: what,
                    outcome,
                    source: Box::new(error),
                })
            }
        }
    }

    fn require_nvme_pf(&self, pf: PciAddress) -> Result<(), Error> {
        let driver = self.mgr.driver_of(pf)?;
        if driver.as_deref() != Some(crate::nvme::NVME_PF_DRIVER) {
            return Err(Error::NvmeResources {
                pf,
                reason: format!(
                    "pool mode changes NVMe VF resources: the PF is on {}, not the nvme driver",
                    driver.as_deref().unwrap_or("no driver")
                ),
            });
        }
        Ok(())
    }

    /// `svff recover` of an interrupted pool operation (the lock is held).
    pub(super) fn recover_pool(&self, p: &Pending) -> Result<OpReport, Error> {
        let Step::Begin {
            pf, before, target, ..
        } = &p.begin
        else {
            unreachable!("pending() checks the first record");
        };
        let pf = *pf;
        let rolled_back = p.rolled_back();
        let planned = p.steps.iter().find_map(|s| match s {
            Step::PoolPlan { target, .. } => Some(target.clone()),
            _ => None,
        });
        info!(op = p.op, %pf, rolled_back, planned = planned.is_some(), "recovering a pool reconf");
        let journal = Mutex::new(Journal::resume(&self.state, p)?);
        let changing: BTreeSet<u16> = planned
            .as_ref()
            .map(|r| r.vfs.keys().copied().collect())
            .unwrap_or_default();
        let old_ids: BTreeSet<&str> = before.iter().map(|a| a.id.as_str()).collect();
        let new_ids: BTreeSet<&str> = target
            .iter()
            .map(|a| a.id.as_str())
            .filter(|id| !old_ids.contains(id))
            .collect();
        let affected =
            |a: &&Assignment| changing.contains(&a.vf) || new_ids.contains(a.id.as_str());
        let aff_before: Vec<Assignment> = before.iter().filter(affected).cloned().collect();
        let aff_target: Vec<Assignment> = target.iter().filter(affected).cloned().collect();
        let goal = if rolled_back {
            &aff_before
        } else {
            &aff_target
        };
        let plan = match (&planned, rolled_back) {
            (Some(req), false) if !req.vfs.is_empty() => {
                self.require_nvme_pf(pf)?;
                let (_, n) = self.mgr.vf_counts(pf)?;
                let ctrl = self.mgr.nvme_opener().open(pf)?;
                let caps = crate::nvme::primary_caps(&*ctrl)?;
                let secs = crate::nvme::secondary_controllers(&*ctrl)?;
                Some(crate::nvme::check_plan(pf, &caps, &secs, n, req)?)
            }
            _ => None,
        };
        let mut sides = self.connect_sides(pf, &aff_before, goal, true, false)?;
        restrict(&mut sides, goal);
        let gone = gone_entries(goal, &sides);
        let job = PoolJob {
            pf,
            plan: plan.as_deref(),
            goal,
            release: !rolled_back,
            known: None,
        };
        let r = self
            .pool_converge(&job, &mut sides, &journal, "recover")
            .map_err(|f| f.error)?;
        self.finish_recovery(pf, &gone, r, &p.begin, journal)
    }

    /// Pause (only VFs whose resources still differ), resources, bind,
    /// unpause/add, table. An error before the resources are touched comes
    /// back as a [`ReleaseFailure`]; later failures are in the report.
    fn pool_converge(
        &self,
        job: &PoolJob<'_>,
        sides: &mut BTreeMap<String, VmSide>,
        journal: &Mutex<Journal>,
        operation: &str,
    ) -> Result<OpReport, ReleaseFailure> {
        let fail = |error| ReleaseFailure { error };
        let pf = job.pf;
        let shared = Shared {
            journal,
            report: Mutex::new(OpReport::new(operation, Mode::Pause)),
        };
        let (_, n) = self.mgr.vf_counts(pf).map_err(fail)?;
        {
            let mut r = shared.report();
            r.pf = Some(pf);
            r.from = Some(n);
            r.to = Some(n);
        }
        // What is still to change, from the controller's own view (as the
        // caller just read it, or read now).
        let mut todo: Vec<PlannedVf> = Vec::new();
        let mut opened: Option<Box<dyn crate::nvme::NvmeAdmin>> = None;
        let mut ctrl: Option<&dyn crate::nvme::NvmeAdmin> = None;
        if let Some(plan) = job.plan.filter(|p| !p.is_empty()) {
            let read;
            let (c, secs): (&dyn crate::nvme::NvmeAdmin, &[SecondaryController]) = match job.known {
                Some(k) => k,
                None => {
                    let c: &dyn crate::nvme::NvmeAdmin =
                        &**opened.insert(self.mgr.nvme_opener().open(pf).map_err(fail)?);
                    read = crate::nvme::secondary_controllers(c).map_err(fail)?;
                    (c, &read)
                }
            };
            let left: BTreeSet<u16> = crate::nvme::changed_vfs(plan, secs).into_iter().collect();
            todo = plan
                .iter()
                .filter(|p| left.contains(&p.index))
                .copied()
                .collect();
            ctrl = Some(c);
        }
        let todo_idx: BTreeSet<u16> = todo.iter().map(|p| p.index).collect();

        // 1. pause the VFs still attached whose resources change
        if job.release && !todo.is_empty() {
            let no_target = BTreeMap::new();
            let results: Vec<Result<(), Error>> = std::thread::scope(|scope| {
                let handles: Vec<_> = sides
                    .values_mut()
                    .filter(|s| s.conn.is_some())
                    .map(|side| {
                        let shared = &shared;
                        let no_target = &no_target;
                        let ids: BTreeSet<String> = job
                            .goal
                            .iter()
                            .filter(|a| a.vm == side.cfg.name && todo_idx.contains(&a.vf))
                            .map(|a| a.id.clone())
                            .collect();
                        let vmms = self.vmms;
                        scope.spawn(move || {
                            let all = std::mem::take(&mut side.present);
                            side.present = all.intersection(&ids).cloned().collect();
                            let r = release_vm(side, Mode::Pause, no_target, shared, vmms);
                            side.present = all;
                            r
                        })
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

        // 2. bind and resources, 3. unpause and add: from here on finish
        // and report.
        let hosts: BTreeMap<u16, PciAddress> =
            self.mgr.vfs(pf).map_err(fail)?.into_iter().collect();
        // A VF that left vfio-pci (not expected: the function stays) goes
        // back. Only the affected VFs' driver and IOMMU group links are read
        // (not the whole PF status: its controller queries and its scan of
        // every process's fds are not needed here).
        let goal_idx: BTreeSet<u16> = job.goal.iter().map(|a| a.vf).collect();
        let mut unbound: Vec<PciAddress> = Vec::new();
        let mut groups: BTreeMap<PciAddress, Option<u32>> = BTreeMap::new();
        for (&index, &bdf) in &hosts {
            if todo_idx.contains(&index)
                && self.mgr.driver_of(bdf).map_err(fail)?.as_deref() != Some("vfio-pci")
            {
                unbound.push(bdf);
            }
            if goal_idx.contains(&index) {
                groups.insert(bdf, self.mgr.iommu_group_of(bdf).map_err(fail)?);
            }
        }
        if !unbound.is_empty() {
            let r = shared.record(Step::Bind { pf }).and_then(|()| {
                shared.timed("bind_vfs", None, || {
                    self.mgr.bind_all(&unbound, &DriverName::vfio_pci())
                })
            });
            match r {
                Ok(()) => shared.change(format!(
                    "PF {pf}: {} VFs bound to vfio-pci again",
                    unbound.len()
                )),
                Err(e) => shared
                    .report()
                    .failures
                    .push(format!("PF {pf}: binding to vfio-pci: {}", e.chain())),
            }
        }

        // The restore threads start now; each VF whose resources change is
        // unpaused (or added) as soon as its secondary controller is back
        // online, while the next ones are changed on this thread.
        let gate = ResourceGate::new(if ctrl.is_some() {
            todo_idx.clone()
        } else {
            BTreeSet::new()
        });
        let outcomes: Vec<Vec<Assignment>> = std::thread::scope(|scope| {
            let handles: Vec<_> = sides
                .values_mut()
                .map(|side| {
                    let shared = &shared;
                    let hosts = &hosts;
                    let groups = &groups;
                    let gate = &gate;
                    let starter = Starter {
                        vmms: self.vmms,
                        state_dir: self.state.path(),
                    };
                    let goal = job.goal;
                    scope.spawn(move || {
                        restore_vm(pf, side, goal, hosts, groups, shared, starter, Some(gate))
                    })
                })
                .collect();
            {
                // However the resource step ends, every VF goes through.
                let _open = OpenAllOnDrop(&gate);
                if let (Some(c), false) = (ctrl, todo.is_empty()) {
                    self.pool_resources(pf, c, &todo, &hosts, &shared, &gate);
                }
            }
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });

        // 4. table: the other entries as they are
        let aff: BTreeSet<&str> = job.goal.iter().map(|a| a.id.as_str()).collect();
        let mut entries: Vec<Assignment> = self
            .state
            .load_table()
            .map_err(fail)?
            .of_pf(pf)
            .filter(|a| !aff.contains(a.id.as_str()))
            .cloned()
            .collect();
        entries.extend(outcomes.into_iter().flatten());
        entries.sort_by_key(|a| a.vf);
        let mut report = shared
            .report
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        self.finish_table(pf, &entries, journal, &mut report)
            .map_err(fail)?;
        Ok(report)
    }
}

impl<S: Sysfs> Orchestrator<'_, S> {
    /// The resource step: journaled, then each changing VF offline, its
    /// resources, online ([`crate::nvme::apply_plan_each`]), `gate` opened
    /// for each VF as soon as it is done; a failure is reported.
    fn pool_resources(
        &self,
        pf: PciAddress,
        c: &dyn crate::nvme::NvmeAdmin,
        todo: &[PlannedVf],
        hosts: &BTreeMap<u16, PciAddress>,
        shared: &Shared<'_>,
        gate: &ResourceGate,
    ) {
        let vfs: Vec<u16> = todo.iter().map(|p| p.index).collect();
        let r = shared.record(Step::Resources { pf, vfs }).and_then(|()| {
            shared.timed("resources", None, || {
                let bdf = |i: u16| hosts.get(&i).copied();
                // `todo` holds only VFs the controller shows not as
                // planned: forced, without asking it again first.
                crate::nvme::apply_plan_each(pf, c, todo, true, &bdf, &|i| gate.open(i))
            })
        });
        match r {
            Ok(_) => {
                // apply_plan checked the controller afterwards: each VF is
                // as planned (online unless given no resources).
                for p in todo {
                    shared.change(format!(
                        "PF {pf}: VF {} (secondary controller {}) {}{}",
                        p.index,
                        p.scid,
                        p.want,
                        if p.want.vq == 0 && p.want.vi == 0 {
                            " offline"
                        } else {
                            " online"
                        }
                    ));
                }
            }
            Err(e) => {
                let line = format!(
                    "PF {pf}: the VF resources could not all be changed: {}",
                    e.chain()
                );
                warn!("{line}");
                shared.report().failures.push(line);
            }
        }
    }
}

/// The VFs of a pool reconf whose resources are still being changed: the
/// restore step waits here before it unpauses (or adds) one of them, so each
/// VF comes back as soon as its own secondary controller is online.
pub(super) struct ResourceGate {
    pending: Mutex<BTreeSet<u16>>,
    opened: std::sync::Condvar,
}

/// The longest a restore thread waits for the resource step (whose admin
/// commands are bounded themselves; the step opens the gate however it ends).
const GATE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

impl ResourceGate {
    fn new(pending: BTreeSet<u16>) -> Self {
        ResourceGate {
            pending: Mutex::new(pending),
            opened: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u16>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// VF `vf` is done: let it through.
    fn open(&self, vf: u16) {
        self.lock().remove(&vf);
        self.opened.notify_all();
    }

    /// Waits until VF `vf` may be unpaused: at once for a VF whose resources
    /// do not change.
    pub(super) fn wait(&self, vf: u16) {
        let end = Instant::now() + GATE_WAIT;
        let mut g = self.lock();
        while g.contains(&vf) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(
                    vf,
                    "the resource step did not end in time: unpausing anyway"
                );
                return;
            }
            g = self
                .opened
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Opens the whole gate when dropped.
struct OpenAllOnDrop<'g>(&'g ResourceGate);

impl Drop for OpenAllOnDrop<'_> {
    fn drop(&mut self) {
        self.0.lock().clear();
        self.0.opened.notify_all();
    }
}

/// Each side sees only the affected devices: nothing else of its VMM is
/// paused, removed or added.
fn restrict(sides: &mut BTreeMap<String, VmSide>, goal: &[Assignment]) {
    for side in sides.values_mut() {
        let mine: BTreeSet<&str> = goal
            .iter()
            .filter(|a| a.vm == side.cfg.name)
            .map(|a| a.id.as_str())
            .collect();
        side.present.retain(|id| mine.contains(id.as_str()));
        side.paused.retain(|id| mine.contains(id.as_str()));
    }
}
