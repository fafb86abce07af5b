//! Logic tests of pool mode (`pool.rs`): fake sysfs, the NVMe controller
//! model, and the QMP VMM doubles of the orchestration tests.

use super::*;
use crate::nvme::fake::FakeNvme;
use crate::nvme::{NvmeResources, VfResources};

const NPF: &str = "0000:02:00.0";

fn npf() -> PciAddress {
    PciAddress::parse(NPF).unwrap()
}

fn nid(vf: u16) -> String {
    device_id(npf(), vf)
}

struct Pool {
    dir: tempfile::TempDir,
    config: Config,
    mgr: SriovManager<FakeSysfs>,
    nvme: FakeNvme,
    vms: BTreeMap<String, Vm>,
}

/// The nvme PF 0000:02:00.0, pool of 6 VFs (vq:2,vi:1 each at init), 16 VQ
/// and 8 VI flexible, at most 8 VQ / 4 VI per VF; vm1 VFs 0,1, vm2 VFs 2,3,
/// vm3 VF 4, VF 5 free.
fn pool(pool: bool, b2: Behaviour) -> Pool {
    pool_with(pool, b2, |n| Arc::new(n))
}

/// [`pool`], the controller reached through `opener(model)`.
fn pool_with(
    pool: bool,
    b2: Behaviour,
    opener: impl FnOnce(FakeNvme) -> Arc<dyn crate::nvme::NvmeOpener>,
) -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let vm = |name: &str, idx: &str| {
        format!(
            "[[vm]]\nname = \"{name}\"\nkind = \"qmp\"\nqmp = \"{}\"\nqmp_timeout_s = 1\nvfs = [{{ pf = \"{NPF}\", index = [{idx}] }}]\n",
            p(&format!("{name}.sock")).display()
        )
    };
    let text = format!(
        "allowed_uids = [0]\nstate_dir = \"{}\"\n[[pf]]\nbdf = \"{NPF}\"\nprofile = \"nvme\"\nvfs = 6\npool = {pool}\nnvme = {{ vq = 2, vi = 1 }}\n{}{}{}",
        p("state").display(),
        vm("vm1", "0, 1"),
        vm("vm2", "2, 3"),
        vm("vm3", "4"),
    );
    let config = Config::parse(&text, Path::new("test.toml")).unwrap();
    let sys = FakeSysfs::new();
    sys.add_driver(
        "nvme",
        crate::fake::DriverModel {
            sriov_configure: true,
            max_vfs: None,
            ids: vec![("0x1b36".into(), "0x0010".into())],
            qdma: false,
            probe_fails: false,
        },
    );
    sys.add_pf(NPF, "0x1b36", "0x0010", 64, "0x0010");
    sys.preset_driver(NPF, "nvme");
    let nvme = FakeNvme::new(64, 16, 8, 8, 4);
    let mgr = sys.manager().with_nvme_opener(opener(nvme.clone()));
    let mut vms = BTreeMap::new();
    vms.insert("vm1".into(), vm_double(&p("vm1.sock"), svff()));
    vms.insert("vm2".into(), vm_double(&p("vm2.sock"), b2));
    vms.insert("vm3".into(), vm_double(&p("vm3.sock"), svff()));
    let pool = Pool {
        dir,
        config,
        mgr,
        nvme,
        vms,
    };
    pool.orch().init().unwrap();
    for v in pool.vms.values() {
        v.clear_log();
    }
    pool.mgr.sysfs().clear_writes();
    pool
}

impl Pool {
    fn orch(&self) -> Orchestrator<'_, FakeSysfs> {
        Orchestrator::new(&self.config, &self.mgr, &QmpConnector).unwrap()
    }
    fn res(&self, vf: u16) -> (bool, u16, u16) {
        let s = self.nvme.sec(vf + 1);
        (s.online, s.nvq, s.nvi)
    }
    fn numvfs_written(&self) -> bool {
        self.mgr
            .sysfs()
            .writes()
            .iter()
            .any(|(p, _)| p.ends_with("sriov_numvfs"))
    }
    fn pending(&self) -> bool {
        journal::pending(self.orch().state()).unwrap().is_some()
    }
    fn everything_attached(&self, what: &str) {
        for (name, v) in &self.vms {
            for id in v.ids() {
                assert_eq!(
                    v.state_of(&id),
                    Some(DeviceState::Attached),
                    "{what}: {name} {id}"
                );
            }
        }
        let t = self.orch().table().unwrap();
        assert!(
            t.assignments
                .iter()
                .all(|a| a.state == AssignState::Attached),
            "{what}: {:?}",
            t.assignments
        );
    }
}

fn spec(s: &str) -> NvmeResources {
    NvmeResources::parse_spec(s).unwrap()
}

#[test]
fn pool_reconf_pauses_only_the_vfs_whose_resources_change_and_never_writes_numvfs() {
    let p = pool(true, svff());
    assert_eq!(p.res(0), (true, 2, 1));
    // VF 1 already has vq:2,vi:1: it is not touched.
    let r = p
        .orch()
        .reconf_pool(npf(), &spec("0=vq:4,vi:1,1=vq:2,vi:1,2=vq:4,vi:1"), &[])
        .unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert!(!p.numvfs_written(), "{:?}", p.mgr.sysfs().writes());
    assert_eq!(p.res(0), (true, 4, 1));
    assert_eq!(p.res(1), (true, 2, 1));
    assert_eq!(p.res(2), (true, 4, 1));
    let pauses = |vm: &str| -> Vec<String> {
        p.vms[vm]
            .log()
            .into_iter()
            .filter(|l| l.starts_with("svff-vfio-"))
            .collect()
    };
    assert_eq!(
        pauses("vm1"),
        [
            format!("svff-vfio-pause {}", nid(0)),
            format!("svff-vfio-unpause {}", nid(0))
        ]
    );
    assert_eq!(
        pauses("vm2"),
        [
            format!("svff-vfio-pause {}", nid(2)),
            format!("svff-vfio-unpause {}", nid(2))
        ]
    );
    assert!(
        p.vms["vm3"].log().is_empty(),
        "vm3 was contacted: {:?}",
        p.vms["vm3"].log()
    );
    let names: Vec<(&str, Option<&str>)> = r
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.vm.as_deref()))
        .collect();
    assert_eq!(&names[..2], &[("plan", None), ("connect", None)]);
    for want in [
        ("pause", Some("vm1")),
        ("pause", Some("vm2")),
        ("resources", None),
        ("unpause", Some("vm1")),
        ("unpause", Some("vm2")),
        ("table", None),
    ] {
        assert!(names.contains(&want), "{want:?} in {names:?}");
    }
    assert!(!names.iter().any(|(n, _)| *n == "change_numvfs"));
    assert_eq!((r.from, r.to), (Some(6), Some(6)));
    assert_eq!(r.assignments.len(), 5);
    p.everything_attached("after");
    assert!(!p.pending());
    let text = std::fs::read_to_string(p.dir.path().join("state/journal.jsonl")).unwrap();
    assert!(text.contains("\"pool_plan\"") && text.contains("\"resources\""));
    assert!(!text.contains("set_count"), "{text}");
    // The same request again changes nothing and contacts nobody.
    for v in p.vms.values() {
        v.clear_log();
    }
    let again = p
        .orch()
        .reconf_pool(npf(), &spec("0=vq:4,vi:1,2=vq:4,vi:1"), &[])
        .unwrap();
    assert!(!again.changed);
    assert!(p.vms.values().all(|v| v.log().is_empty()));
}

#[test]
fn pool_reconf_refuses_unknown_vfs_totals_and_non_pool_pfs_before_anything_changes() {
    let p = pool(true, svff());
    let log_before = p.nvme.log().len();
    let cases = [
        ("9=vq:2,vi:1", "VF 9 given resources, but the PF has 6 VFs"),
        ("0=vq:8,vi:1,1=vq:8,vi:1", "flexible VQ resources are free"),
        ("0=vq:16,vi:1", "at most 8 per secondary controller"),
        ("1=vq:2,vi:2", "VF 1 is held by VM vm1"),
    ];
    for (s, want) in cases {
        let e = p.orch().reconf_pool(npf(), &spec(s), &[]).unwrap_err();
        assert_eq!(e.kind(), "nvme_resources", "{s}: {e}");
        assert!(e.to_string().contains(want), "{s}: {e}");
    }
    // Only Identify commands were sent (opcode 0x06), nobody paused.
    assert!(p.nvme.log()[log_before..].iter().all(|c| c.0 == 0x06));
    assert!(p.vms.values().all(|v| v.log().is_empty()));
    assert!(!p.pending());
    let e = p.orch().reconf(npf(), 4, Mode::Pause, &[]).unwrap_err();
    assert!(e.to_string().contains("is in pool mode"), "{e}");
    assert!(!p.numvfs_written());

    let q = pool(false, svff());
    let e = q
        .orch()
        .reconf_pool(npf(), &spec("0=vq:4,vi:2"), &[])
        .unwrap_err();
    assert!(e.to_string().contains("is not in pool mode"), "{e}");
    assert_eq!(q.res(0), (true, 2, 1));
}

#[test]
fn a_pause_without_answer_rolls_back_and_leaves_the_resources_unchanged() {
    let p = pool(
        true,
        Behaviour {
            svff: true,
            pause_delay: Some(Duration::from_millis(2500)),
            ..Behaviour::default()
        },
    );
    let e = p
        .orch()
        .reconf_pool(npf(), &spec("0=vq:4,vi:1,2=vq:4,vi:1"), &[])
        .unwrap_err();
    assert_eq!(e.kind(), "vmm", "{e}");
    assert!(e.to_string().contains("rolled back"), "{e}");
    assert_eq!(p.res(0), (true, 2, 1));
    assert_eq!(p.res(2), (true, 2, 1));
    // vm1's paused VF is back.
    assert_eq!(p.vms["vm1"].state_of(&nid(0)), Some(DeviceState::Attached));
    // vm2's late pause: once it lands, recover (or the rollback's unpause) settles it.
    std::thread::sleep(Duration::from_millis(2600));
    if p.pending() {
        p.orch().recover().unwrap();
    }
    p.everything_attached("after the rollback");
    assert!(!p.numvfs_written());
}

#[test]
fn free_pool_vfs_are_given_to_vms_with_their_new_resources() {
    let p = pool(true, svff());
    let r = p
        .orch()
        .reconf_pool(
            npf(),
            &spec("5=vq:4,vi:2"),
            &[AssignRequest {
                vm: "vm3".into(),
                count: 1,
            }],
        )
        .unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(p.res(5), (true, 4, 2));
    assert_eq!(p.vms["vm3"].ids(), vec![nid(4), nid(5)]);
    assert!(p.vms["vm3"]
        .log()
        .contains(&format!("device_add {}", nid(5))));
    assert!(p.vms["vm1"].log().is_empty() && p.vms["vm2"].log().is_empty());
    assert_eq!(r.assignments.len(), 6);
    let e = p
        .orch()
        .reconf_pool(
            npf(),
            &spec("5=vq:4,vi:2"),
            &[AssignRequest {
                vm: "vm1".into(),
                count: 1,
            }],
        )
        .unwrap_err();
    assert!(e.to_string().contains("free"), "{e}");
}

type PoolStep<'a> = Box<dyn FnOnce(&mut Journal) + 'a>;

#[test]
fn recover_finishes_a_pool_reconf_interrupted_after_any_record() {
    let want = VfResources { vq: 4, vi: 1 };
    for stop in 0..=7 {
        let p = pool(true, svff());
        let table = p.orch().table().unwrap();
        let before: Vec<Assignment> = table.assignments.clone();
        let sd = StateDir::open(&p.dir.path().join("state")).unwrap();
        let mut j = Journal::begin(
            &sd,
            Step::Begin {
                kind: OpKind::Pool,
                pf: npf(),
                mode: Mode::Pause,
                from: 6,
                to: 6,
                before: before.clone(),
                target: before,
            },
        )
        .unwrap();
        let target = NvmeResources {
            default: None,
            vfs: [(0, want), (2, want)].into_iter().collect(),
        };
        let mut c1 = QmpConnector.connect(p.config.vm("vm1").unwrap()).unwrap();
        let mut c2 = QmpConnector.connect(p.config.vm("vm2").unwrap()).unwrap();
        let hosts: BTreeMap<u16, PciAddress> = p.mgr.vfs(npf()).unwrap().into_iter().collect();
        let nvme = p.nvme.clone();
        let t2 = target.clone();
        let steps: Vec<PoolStep<'_>> = vec![
            Box::new(|j| {
                j.record(Step::PoolPlan {
                    pf: npf(),
                    before: NvmeResources::default(),
                    target: t2,
                })
                .unwrap()
            }),
            Box::new(|j| {
                j.record(Step::Pause {
                    vm: "vm1".into(),
                    id: nid(0),
                })
                .unwrap();
                c1.pause(&nid(0)).unwrap();
            }),
            Box::new(|j| {
                j.record(Step::Pause {
                    vm: "vm2".into(),
                    id: nid(2),
                })
                .unwrap();
                c2.pause(&nid(2)).unwrap();
            }),
            Box::new(move |j| {
                j.record(Step::Resources {
                    pf: npf(),
                    vfs: vec![0, 2],
                })
                .unwrap();
                // Half done: VF 0 only.
                let caps = crate::nvme::primary_caps(&nvme).unwrap();
                let secs = crate::nvme::secondary_controllers(&nvme).unwrap();
                let half = NvmeResources {
                    default: None,
                    vfs: [(0, want)].into_iter().collect(),
                };
                let plan = crate::nvme::check_plan(npf(), &caps, &secs, 6, &half).unwrap();
                crate::nvme::apply_plan(npf(), &nvme, &plan, false, &|_| None).unwrap();
            }),
            Box::new(|j| {
                j.record(Step::Unpause {
                    vm: "vm1".into(),
                    id: nid(0),
                    host: hosts[&0],
                })
                .unwrap();
            }),
            Box::new(|j| j.record(Step::Table).unwrap()),
            Box::new(|j| {
                j.record(Step::Rollback {
                    reason: "test".into(),
                })
                .unwrap()
            }),
        ];
        let rollback_only = stop == 7;
        for (i, s) in steps.into_iter().enumerate() {
            if rollback_only {
                // Pauses, then a rollback before any resource changed.
                if matches!(i, 0..=2 | 6) {
                    s(&mut j);
                }
                continue;
            }
            if i >= stop {
                break;
            }
            s(&mut j);
        }
        drop(j);
        let e = p
            .orch()
            .reconf_pool(npf(), &spec("1=vq:4,vi:2"), &[])
            .unwrap_err();
        assert_eq!(e.kind(), "recovery_needed", "stop {stop}: {e}");
        let r = p.orch().recover().unwrap();
        assert!(r.failures.is_empty(), "stop {stop}: {:?}", r.failures);
        assert!(!p.pending(), "stop {stop}");
        p.everything_attached(&format!("stop {stop}"));
        assert_eq!(p.orch().table().unwrap().assignments.len(), 5);
        assert!(!p.numvfs_written(), "stop {stop}");
        let expect = if stop == 0 || rollback_only {
            (true, 2, 1)
        } else {
            (true, 4, 1)
        };
        assert_eq!(p.res(2), expect, "stop {stop}");
        if stop >= 1 && !rollback_only {
            assert_eq!(p.res(0), (true, 4, 1), "stop {stop}");
        }
        assert_eq!(p.res(4), (true, 2, 1), "stop {stop}");
    }
}

#[test]
fn pool_reconf_asks_the_controller_for_its_secondary_list_once_to_plan_and_once_to_check() {
    let p = pool(true, svff());
    let before = p.nvme.log().len();
    let r = p
        .orch()
        .reconf_pool(npf(), &spec("0=vq:4,vi:1,2=vq:4,vi:1"), &[])
        .unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!((p.res(0), p.res(2)), ((true, 4, 1), (true, 4, 1)));
    // Identify (opcode 0x06) with CNS 0x15: the secondary controller list.
    let lists = p.nvme.log()[before..]
        .iter()
        .filter(|(op, cdw10, _)| *op == 0x06 && cdw10 & 0xff == 0x15)
        .count();
    assert_eq!(lists, 2, "{:?}", &p.nvme.log()[before..]);
    // The report still says each changed VF is online with its resources.
    for vf in [0, 2] {
        assert!(
            r.changes
                .iter()
                .any(|c| c.contains(&format!("VF {vf} ")) && c.ends_with(" online")),
            "{:?}",
            r.changes
        );
    }
}

/// The fake controller, except that the first command assigning resources
/// to secondary controller `scid` first waits (at most 10 s) for `vm`'s
/// log to show `line`, and records whether it did.
#[derive(Clone)]
struct WaitsForVmm {
    nvme: FakeNvme,
    scid: u16,
    line: String,
    vm: Arc<Mutex<Option<Arc<VmmState>>>>,
    saw: Arc<Mutex<Option<bool>>>,
}

impl std::fmt::Debug for WaitsForVmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitsForVmm")
            .field("scid", &self.scid)
            .finish()
    }
}

impl crate::nvme::NvmeOpener for WaitsForVmm {
    fn open(&self, _pf: PciAddress) -> Result<Box<dyn crate::nvme::NvmeAdmin>, Error> {
        Ok(Box::new(self.clone()))
    }
}

impl crate::nvme::NvmeAdmin for WaitsForVmm {
    fn name(&self) -> String {
        self.nvme.name()
    }

    fn admin(
        &self,
        cmd: &crate::nvme::AdminCommand,
        data: Option<&mut [u8]>,
    ) -> Result<u32, crate::nvme::AdminError> {
        let pt = cmd.to_passthru(0);
        // Virtualization Management (0x1c), action 8 (assign), to `scid`.
        let assign =
            pt.opcode == 0x1c && pt.cdw10 & 0xf == 8 && pt.cdw10 >> 16 == u32::from(self.scid);
        let vm = self.vm.lock().unwrap().clone();
        if let (true, Some(vm)) = (assign, vm) {
            if self.saw.lock().unwrap().is_none() {
                let end = Instant::now() + std::time::Duration::from_secs(10);
                let seen = loop {
                    if vm.log.lock().unwrap().contains(&self.line) {
                        break true;
                    }
                    if Instant::now() > end {
                        break false;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                };
                *self.saw.lock().unwrap() = Some(seen);
            }
        }
        self.nvme.admin(cmd, data)
    }
}

#[test]
fn pool_reconf_unpauses_each_vf_as_soon_as_its_resources_are_changed_while_the_next_ones_are_changed(
) {
    let vm = Arc::new(Mutex::new(None));
    let saw = Arc::new(Mutex::new(None));
    let line = format!("svff-vfio-unpause {}", nid(0));
    let (v2, s2, l2) = (vm.clone(), saw.clone(), line.clone());
    let p = pool_with(true, svff(), move |nvme| {
        Arc::new(WaitsForVmm {
            nvme,
            // VF 2's secondary controller: changed after VF 0's.
            scid: 3,
            line: l2,
            vm: v2,
            saw: s2,
        })
    });
    *vm.lock().unwrap() = Some(p.vms["vm1"].st.clone());
    let r = p
        .orch()
        .reconf_pool(npf(), &spec("0=vq:4,vi:1,2=vq:4,vi:1"), &[])
        .unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(
        *saw.lock().unwrap(),
        Some(true),
        "VF 0 was not unpaused before VF 2's resources were assigned: {:?}",
        p.vms["vm1"].log()
    );
    assert_eq!((p.res(0), p.res(2)), ((true, 4, 1), (true, 4, 1)));
    p.everything_attached("after");
    assert!(!p.pending());
    // Each unpause is still journaled after the resource step began, and
    // before it is sent.
    let text = std::fs::read_to_string(p.dir.path().join("state/journal.jsonl")).unwrap();
    let at = |what: &str| {
        text.find(what)
            .unwrap_or_else(|| panic!("{what} in {text}"))
    };
    assert!(
        at("\"step\":\"resources\"") < at("\"step\":\"unpause\""),
        "{text}"
    );
}
