//! Logic tests of the orchestration: the fake sysfs, and VMM doubles built on
//! qmp-ext's real QMP server (so the helper's QMP client, fd passing and
//! event waits run for real). The kernel and QEMU side is proven in the lab
//! (`tests/lab_orch.rs`).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmp_ext::svff::{
    PausableDevices, SvffVfioInfo, SvffVfioPausedAccesses, SvffVfioTimings, SvffVfioUnpause,
};
use qmp_ext::{EventSink, Handler, QmpError, Server, ServerConfig, Session};
use serde_json::{json, Map, Value};
use svff_types::DeviceState;

use super::journal::{Journal, Mode, OpKind, Step};
use super::state::AssignState;
use super::vmm::QmpConnector;
use super::*;
use crate::fake::FakeSysfs;

const PF: &str = "0000:01:00.0";

fn pf() -> PciAddress {
    PciAddress::parse(PF).unwrap()
}

/// What a double does, per command.
#[derive(Debug, Default)]
struct Behaviour {
    /// Speaks the svff commands.
    svff: bool,
    /// device_del is accepted but DEVICE_DELETED never comes.
    never_delete: bool,
    /// svff-vfio-pause sleeps this long before answering.
    pause_delay: Option<Duration>,
    /// svff-vfio-unpause fails for these ids.
    unpause_fails: Vec<String>,
    /// A pause or unpause waits (at most [`MEET_WAIT`]) until this many
    /// of the same command are in flight.
    meet: usize,
}

/// How long a pause or unpause waits for the others of [`Behaviour::meet`]:
/// below the test VMs' 1 s QMP deadline.
const MEET_WAIT: Duration = Duration::from_millis(700);

/// Pauses or unpauses in flight at once: now, and the most seen.
#[derive(Debug, Default)]
struct InFlight {
    now: usize,
    most: usize,
}

#[derive(Debug, Clone, PartialEq)]
struct Dev {
    host: String,
    bus: Option<String>,
    state: DeviceState,
}

#[derive(Debug, Default)]
struct VmmState {
    behaviour: Mutex<Behaviour>,
    devices: Mutex<BTreeMap<String, Dev>>,
    /// Every command with its id argument, in order: `device_add svff-...`.
    log: Mutex<Vec<String>>,
    /// Whether the last unpause came with a group fd.
    got_fd: Mutex<Vec<bool>>,
    /// Pauses and unpauses in flight.
    pauses: (Mutex<InFlight>, std::sync::Condvar),
    unpauses: (Mutex<InFlight>, std::sync::Condvar),
}

impl VmmState {
    /// Runs `f` as one command of `which` in flight, first waiting (bounded)
    /// for `meet` of them.
    fn in_flight<R>(
        &self,
        which: &(Mutex<InFlight>, std::sync::Condvar),
        f: impl FnOnce() -> R,
    ) -> R {
        let meet = self.behaviour.lock().unwrap().meet;
        {
            let mut n = which.0.lock().unwrap();
            n.now += 1;
            n.most = n.most.max(n.now);
            which.1.notify_all();
            let _ = which
                .1
                .wait_timeout_while(n, MEET_WAIT, |n| n.now < meet)
                .unwrap();
        }
        let r = f();
        which.0.lock().unwrap().now -= 1;
        r
    }

    fn most_in_flight(&self) -> (usize, usize) {
        (
            self.pauses.0.lock().unwrap().most,
            self.unpauses.0.lock().unwrap().most,
        )
    }
}

struct Double {
    st: Arc<VmmState>,
    events: EventSink,
}

impl PausableDevices for Double {
    fn pause(&self, args: qmp_ext::svff::SvffVfioPause) -> Result<SvffVfioTimings, QmpError> {
        let st = Arc::clone(&self.st);
        st.in_flight(&st.pauses, || self.pause_now(args))
    }

    fn unpause(
        &self,
        args: SvffVfioUnpause,
        group_fd: Option<OwnedFd>,
    ) -> Result<SvffVfioTimings, QmpError> {
        let st = Arc::clone(&self.st);
        st.in_flight(&st.unpauses, || self.unpause_now(args, group_fd))
    }

    fn query(&self) -> Result<Vec<SvffVfioInfo>, QmpError> {
        self.query_now()
    }
}

impl Double {
    fn pause_now(&self, args: qmp_ext::svff::SvffVfioPause) -> Result<SvffVfioTimings, QmpError> {
        if let Some(d) = self.st.behaviour.lock().unwrap().pause_delay {
            std::thread::sleep(d);
        }
        let mut devs = self.st.devices.lock().unwrap();
        let dev = devs
            .get_mut(&args.id)
            .ok_or_else(|| QmpError::generic(format!("no device {}", args.id)))?;
        dev.state = DeviceState::Paused;
        // As a VMM reports it: the total and its phases.
        Ok(SvffVfioTimings {
            total_ns: 3_000_000,
            phases: vec![qmp_ext::svff::SvffVfioPhase {
                name: svff_types::Phase::Close,
                ns: 2_000_000,
            }],
        })
    }

    fn unpause_now(
        &self,
        args: SvffVfioUnpause,
        group_fd: Option<OwnedFd>,
    ) -> Result<SvffVfioTimings, QmpError> {
        self.st.got_fd.lock().unwrap().push(group_fd.is_some());
        if self
            .st
            .behaviour
            .lock()
            .unwrap()
            .unpause_fails
            .contains(&args.id)
        {
            return Err(QmpError::generic("identity mismatch: vendor 0x1234"));
        }
        let mut devs = self.st.devices.lock().unwrap();
        let dev = devs
            .get_mut(&args.id)
            .ok_or_else(|| QmpError::generic(format!("no device {}", args.id)))?;
        if let Some(h) = args.host {
            dev.host = h;
        }
        dev.state = DeviceState::Attached;
        Ok(SvffVfioTimings::default())
    }

    fn query_now(&self) -> Result<Vec<SvffVfioInfo>, QmpError> {
        Ok(self
            .st
            .devices
            .lock()
            .unwrap()
            .iter()
            .map(|(id, d)| SvffVfioInfo {
                id: id.clone(),
                state: d.state,
                host: d.host.clone(),
                guest: "0000:01:00.0".into(),
                policy: None,
                pause_count: 0,
                paused_accesses: SvffVfioPausedAccesses::default(),
                last_pause: None,
                last_unpause: None,
            })
            .collect())
    }
}

impl Handler for Double {
    fn execute(
        &self,
        session: &mut Session,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let id = args
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        self.st
            .log
            .lock()
            .unwrap()
            .push(format!("{command} {id}").trim().to_owned());
        if self.st.behaviour.lock().unwrap().svff {
            if let Some(r) = qmp_ext::svff::dispatch(self, session, command, args.clone()) {
                return r;
            }
        }
        match command {
            "qom-list" => Ok(Value::Array(
                self.st
                    .devices
                    .lock()
                    .unwrap()
                    .keys()
                    .map(|id| json!({ "name": id, "type": "child<vfio-pci>" }))
                    .chain([json!({ "name": "type", "type": "string" })])
                    .collect(),
            )),
            "device_add" => {
                let mut devs = self.st.devices.lock().unwrap();
                if devs.contains_key(&id) {
                    return Err(QmpError::generic(format!("Duplicate device ID '{id}'")));
                }
                let bus = args.get("bus").and_then(Value::as_str).map(str::to_owned);
                if bus.is_some() && devs.values().any(|d| d.bus == bus) {
                    return Err(QmpError::generic("bus is full"));
                }
                devs.insert(
                    id,
                    Dev {
                        host: args["host"].as_str().unwrap().into(),
                        bus,
                        state: DeviceState::Attached,
                    },
                );
                Ok(json!({}))
            }
            "device_del" => {
                if !self.st.devices.lock().unwrap().contains_key(&id) {
                    return Err(QmpError::generic(format!("Device '{id}' not found")));
                }
                if !self.st.behaviour.lock().unwrap().never_delete {
                    let st = Arc::clone(&self.st);
                    let events = self.events.clone();
                    // As QEMU: the event comes after the answer, once the guest let go.
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(20));
                        st.devices.lock().unwrap().remove(&id);
                        let mut data = Map::new();
                        data.insert("device".into(), json!(id));
                        events.emit("DEVICE_DELETED", Some(data));
                    });
                }
                Ok(json!({}))
            }
            "query-pci" => Ok(
                json!([{ "bus": 0, "devices": self.st.devices.lock().unwrap().keys().enumerate()
                .map(|(i, id)| json!({ "bus": 0, "slot": i + 3, "function": 0, "qdev_id": id }))
                .collect::<Vec<_>>() }]),
            ),
            _ => Err(QmpError::command_not_found(command)),
        }
    }
}

struct Vm {
    st: Arc<VmmState>,
    _server: Server,
}

impl Vm {
    fn ids(&self) -> Vec<String> {
        self.st.devices.lock().unwrap().keys().cloned().collect()
    }
    fn log(&self) -> Vec<String> {
        self.st.log.lock().unwrap().clone()
    }
    fn clear_log(&self) {
        self.st.log.lock().unwrap().clear();
    }
    fn state_of(&self, id: &str) -> Option<DeviceState> {
        self.st.devices.lock().unwrap().get(id).map(|d| d.state)
    }
}

struct Lab {
    dir: tempfile::TempDir,
    config: Config,
    mgr: SriovManager<FakeSysfs>,
    vms: BTreeMap<String, Vm>,
}

fn vm_double(path: &Path, behaviour: Behaviour) -> Vm {
    let st = Arc::new(VmmState::default());
    *st.behaviour.lock().unwrap() = behaviour;
    let events = EventSink::new();
    let server = Server::bind(
        path,
        ServerConfig {
            events: events.clone(),
            ..ServerConfig::default()
        },
        Double {
            st: Arc::clone(&st),
            events,
        },
    )
    .unwrap();
    Vm {
        st,
        _server: server,
    }
}

/// PF 0000:01:00.0 (igb, 4 VFs at init) with vm1 (2 VFs by count) and vm2
/// (VF 3 by index); `extra` is appended to vm2's table.
fn lab(b1: Behaviour, b2: Behaviour, extra: &str) -> Lab {
    lab_kind("qmp", b1, b2, extra)
}

/// [`lab`] with vm1 of kind `kind1`.
fn lab_kind(kind1: &str, b1: Behaviour, b2: Behaviour, extra: &str) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let text = format!(
        r#"allowed_uids = [0]
state_dir = "{}"
[[pf]]
bdf = "{PF}"
driver = "igb"
vfs = 4
[[vm]]
name = "vm1"
kind = "{kind1}"
qmp = "{}"
qmp_timeout_s = 1
detach_timeout_s = 1
hotplug_ports = ["rp0", "rp1", "rp2", "rp3"]
vfs = [{{ pf = "{PF}", count = 2 }}]
[[vm]]
name = "vm2"
kind = "qmp"
qmp = "{}"
qmp_timeout_s = 1
detach_timeout_s = 1
vfs = [{{ pf = "{PF}", index = [3] }}]
{extra}
"#,
        p("state").display(),
        p("vm1.sock").display(),
        p("vm2.sock").display()
    );
    let config = Config::parse(&text, Path::new("test.toml")).unwrap();
    let mut vms = BTreeMap::new();
    vms.insert("vm1".into(), vm_double(&p("vm1.sock"), b1));
    vms.insert("vm2".into(), vm_double(&p("vm2.sock"), b2));
    Lab {
        dir,
        config,
        mgr: FakeSysfs::with_igb().manager(),
        vms,
    }
}

fn svff() -> Behaviour {
    Behaviour {
        svff: true,
        ..Behaviour::default()
    }
}

impl Lab {
    fn orch(&self) -> Orchestrator<'_, FakeSysfs> {
        Orchestrator::new(&self.config, &self.mgr, &QmpConnector).unwrap()
    }
    fn vm(&self, n: &str) -> &Vm {
        &self.vms[n]
    }
    fn numvfs(&self) -> u16 {
        self.mgr.vf_counts(pf()).unwrap().1
    }
    fn table(&self) -> Vec<(u16, String, AssignState)> {
        self.orch()
            .table()
            .unwrap()
            .assignments
            .into_iter()
            .map(|a| (a.vf, a.vm, a.state))
            .collect()
    }
    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

fn id(vf: u16) -> String {
    device_id(pf(), vf)
}

fn ids(vfs: &[u16]) -> Vec<String> {
    let mut v: Vec<String> = vfs.iter().map(|&i| id(i)).collect();
    v.sort();
    v
}

#[test]
fn init_attaches_the_configured_vfs_and_a_second_init_changes_nothing() {
    let lab = lab(Behaviour::default(), Behaviour::default(), "");
    let r = lab.orch().init().unwrap();
    assert!(r.changed, "{r:?}");
    assert_eq!(lab.numvfs(), 4);
    assert_eq!(lab.vm("vm1").ids(), ids(&[0, 1]));
    assert_eq!(lab.vm("vm2").ids(), ids(&[3]));
    let st = lab.mgr.pf_status(pf()).unwrap();
    assert!(st
        .vfs
        .iter()
        .all(|v| v.driver.as_deref() == Some("vfio-pci")));
    let table = lab.orch().table().unwrap();
    let a0 = &table.assignments[0];
    assert_eq!((a0.vf, a0.vm.as_str(), a0.host), (0, "vm1", st.vfs[0].bdf));
    assert_eq!(a0.bus.as_deref(), Some("rp0"));
    assert_eq!(table.assignments[1].bus.as_deref(), Some("rp1"));
    assert!(a0.guest.is_some(), "query-pci gives the guest address");
    assert_eq!(table.assignments[2].vf, 3);
    assert!(lab
        .vm("vm1")
        .log()
        .contains(&format!("device_add {}", id(0))));

    lab.mgr.sysfs().clear_writes();
    lab.vm("vm1").clear_log();
    let r = lab.orch().init().unwrap();
    assert!(!r.changed, "{r:?}");
    assert!(r.changes[0].contains("nothing to do"), "{:?}", r.changes);
    assert!(
        lab.mgr.sysfs().writes().is_empty(),
        "{:?}",
        lab.mgr.sysfs().writes()
    );
    assert!(
        !lab.vm("vm1").log().iter().any(|l| l.starts_with("device_")),
        "{:?}",
        lab.vm("vm1").log()
    );
    assert!(journal::pending(lab.orch().state()).unwrap().is_none());
}

#[test]
fn detach_reconf_removes_every_vf_adds_back_the_survivors_and_assigns_new_ones() {
    let lab = lab(Behaviour::default(), Behaviour::default(), "");
    lab.orch().init().unwrap();
    lab.vm("vm1").clear_log();
    let r = lab.orch().reconf(pf(), 2, Mode::Detach, &[]).unwrap();
    assert_eq!(lab.numvfs(), 2);
    assert_eq!(lab.vm("vm1").ids(), ids(&[0, 1]));
    assert!(lab.vm("vm2").ids().is_empty(), "VF 3 is gone");
    assert_eq!(
        lab.vm("vm1")
            .log()
            .iter()
            .filter(|l| l.starts_with("device_"))
            .cloned()
            .collect::<Vec<_>>(),
        [
            format!("device_del {}", id(0)),
            format!("device_del {}", id(1)),
            format!("device_add {}", id(0)),
            format!("device_add {}", id(1)),
        ]
    );
    assert_eq!(
        lab.table(),
        [
            (0, "vm1".into(), AssignState::Attached),
            (1, "vm1".into(), AssignState::Attached)
        ]
    );
    let names: Vec<&str> = r.steps.iter().map(|s| s.name.as_str()).collect();
    for want in ["remove_vf", "change_numvfs", "bind_vfs", "add_vf", "table"] {
        assert!(names.contains(&want), "{names:?}");
    }
    // Back to 4, with VF 2 and 3 for vm2.
    let r = lab
        .orch()
        .reconf(
            pf(),
            4,
            Mode::Detach,
            &[AssignRequest {
                vm: "vm2".into(),
                count: 2,
            }],
        )
        .unwrap();
    assert_eq!(lab.vm("vm2").ids(), ids(&[2, 3]), "{r:?}");
    assert_eq!(lab.vm("vm1").ids(), ids(&[0, 1]));
}

#[test]
fn pause_reconf_pauses_survivors_and_removes_only_vfs_that_are_gone() {
    let lab = lab(svff(), svff(), "pass_group_fd = false");
    lab.orch().init().unwrap();
    lab.vm("vm1").clear_log();
    lab.vm("vm2").clear_log();
    let r = lab.orch().reconf(pf(), 2, Mode::Pause, &[]).unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let log1 = lab.vm("vm1").log();
    assert!(
        !log1.iter().any(|l| l.starts_with("device_del")),
        "no removal of a survivor: {log1:?}"
    );
    assert!(
        log1.contains(&format!("svff-vfio-pause {}", id(0))),
        "{log1:?}"
    );
    assert!(
        log1.contains(&format!("svff-vfio-unpause {}", id(1))),
        "{log1:?}"
    );
    assert_eq!(lab.vm("vm1").state_of(&id(0)), Some(DeviceState::Attached));
    let log2 = lab.vm("vm2").log();
    assert!(
        log2.contains(&format!("svff-vfio-pause {}", id(3))),
        "{log2:?}"
    );
    assert!(log2.contains(&format!("device_del {}", id(3))), "{log2:?}");
    assert!(lab.vm("vm2").ids().is_empty());
    let names: Vec<(&str, Option<&str>)> = r
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.vm.as_deref()))
        .collect();
    for want in [
        ("pause", Some("vm1")),
        ("pause", Some("vm2")),
        ("unpause", Some("vm1")),
        ("change_numvfs", None),
        ("connect", None),
        ("pause.qmp", Some("vm1")),
        ("pause.vmm", Some("vm1")),
        ("pause.close", Some("vm1")),
        ("unpause.vmm", Some("vm1")),
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    let close = r
        .steps
        .iter()
        .find(|s| s.name == "pause.close" && s.vm.as_deref() == Some("vm1"))
        .unwrap();
    assert_eq!(close.ms, 2.0, "the VMM's phase time, carried over");
    // 2 -> 4 with new VFs for vm2: nothing paused needs removing.
    lab.orch()
        .reconf(
            pf(),
            4,
            Mode::Pause,
            &[AssignRequest {
                vm: "vm2".into(),
                count: 1,
            }],
        )
        .unwrap();
    assert_eq!(lab.vm("vm2").ids(), ids(&[2]));
    assert_eq!(lab.vm("vm1").ids(), ids(&[0, 1]));
}

#[test]
fn the_devices_of_one_svff_vmm_are_paused_and_unpaused_at_once_those_of_a_qmp_vm_in_turn() {
    // vm1 holds VFs 0 and 1; a pause-mode reconf 4 -> 3 pauses and unpauses both.
    let meet = Behaviour { meet: 2, ..svff() };
    let lab = lab_kind("svff-vmm", meet, svff(), "");
    lab.orch().init().unwrap();
    let r = lab.orch().reconf(pf(), 3, Mode::Pause, &[]).unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(
        lab.vm("vm1").st.most_in_flight(),
        (2, 2),
        "svff-vmm: at once"
    );
    assert_eq!(lab.vm("vm1").state_of(&id(0)), Some(DeviceState::Attached));
    assert_eq!(lab.vm("vm1").state_of(&id(1)), Some(DeviceState::Attached));
    // Kind qmp (QEMU's monitor: one client, one command at a time): in turn.
    let qmp = lab_kind("qmp", svff(), svff(), "");
    qmp.orch().init().unwrap();
    let r = qmp.orch().reconf(pf(), 3, Mode::Pause, &[]).unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(qmp.vm("vm1").st.most_in_flight(), (1, 1), "qmp: in turn");
    assert_eq!(qmp.vm("vm1").state_of(&id(1)), Some(DeviceState::Attached));
}

#[test]
fn a_vmm_that_does_not_answer_its_pause_is_named_and_everything_rolls_back() {
    let slow = Behaviour {
        svff: true,
        pause_delay: Some(Duration::from_secs(3)),
        ..Behaviour::default()
    };
    let lab = lab(svff(), slow, "");
    lab.orch().init().unwrap();
    let e = lab.orch().reconf(pf(), 2, Mode::Pause, &[]).unwrap_err();
    let msg = e.chain();
    assert!(
        msg.contains("VM vm2: svff-vfio-pause of svff-0000-01-00.0-vf3"),
        "{msg}"
    );
    assert!(msg.contains("timed out"), "{msg}");
    // The pause may still happen (it does, 3 s late): the rollback asks to
    // unpause it too, which gets no answer either: the journal stays open.
    assert!(msg.contains("rolled back with failures"), "{msg}");
    assert!(msg.contains("it stays paused: run `svff recover`"), "{msg}");
    assert_eq!(lab.numvfs(), 4);
    for vf in [0, 1] {
        assert_eq!(
            lab.vm("vm1").state_of(&id(vf)),
            Some(DeviceState::Attached),
            "VF {vf}"
        );
    }
    assert!(journal::pending(lab.orch().state()).unwrap().is_some());
    // The late pause lands (the unpause went out on a connection given up):
    // once the VMM answers again, recover unpauses it.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while lab.vm("vm2").state_of(&id(3)) != Some(DeviceState::Paused) {
        assert!(
            std::time::Instant::now() < end,
            "the late pause never landed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = lab.orch().recover().unwrap();
    assert!(r.failures.is_empty(), "{r:?}");
    assert_eq!(lab.vm("vm2").state_of(&id(3)), Some(DeviceState::Attached));
    assert!(journal::pending(lab.orch().state()).unwrap().is_none());
    assert_eq!(lab.table().len(), 3);
}

#[test]
fn a_guest_that_never_releases_its_vf_in_detach_mode_is_named_and_rolled_back() {
    let stuck = Behaviour {
        never_delete: true,
        ..Behaviour::default()
    };
    let lab = lab(Behaviour::default(), stuck, "");
    lab.orch().init().unwrap();
    let e = lab.orch().reconf(pf(), 2, Mode::Detach, &[]).unwrap_err();
    let msg = e.chain();
    assert!(
        msg.contains("VM vm2: waiting 1 s for DEVICE_DELETED of svff-0000-01-00.0-vf3"),
        "{msg}"
    );
    assert!(msg.contains("rolled back"), "{msg}");
    assert_eq!(lab.numvfs(), 4);
    assert_eq!(
        lab.vm("vm1").ids(),
        ids(&[0, 1]),
        "vm1's VFs are added back"
    );
}

#[test]
fn an_unpause_that_fails_is_reported_and_the_device_removed_so_nothing_stays_paused() {
    let bad = Behaviour {
        svff: true,
        unpause_fails: vec![device_id(pf(), 1)],
        ..Behaviour::default()
    };
    let lab = lab(bad, svff(), "");
    lab.orch().init().unwrap();
    let r = lab.orch().reconf(pf(), 3, Mode::Pause, &[]).unwrap();
    assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
    assert!(
        r.failures[0].contains("VM vm1: svff-0000-01-00.0-vf1 could not be unpaused onto"),
        "{:?}",
        r.failures
    );
    assert!(
        r.failures[0].contains("identity mismatch"),
        "{:?}",
        r.failures
    );
    assert_eq!(lab.vm("vm1").ids(), ids(&[0]));
    assert_eq!(lab.table(), [(0, "vm1".into(), AssignState::Attached)]);
    assert_eq!(lab.numvfs(), 3);
}

#[test]
fn bad_requests_are_refused_before_anything_changes() {
    let lab = lab(Behaviour::default(), Behaviour::default(), "");
    lab.orch().init().unwrap();
    lab.mgr.sysfs().clear_writes();
    let o = lab.orch();
    let e = o
        .reconf(
            PciAddress::parse("0000:09:00.0").unwrap(),
            2,
            Mode::Detach,
            &[],
        )
        .unwrap_err();
    assert_eq!(e.kind(), "not_allowed", "{e}");
    let e = o.reconf(pf(), 9, Mode::Detach, &[]).unwrap_err();
    assert!(
        e.to_string()
            .contains("supports at most 7 VFs (9 requested)"),
        "{e}"
    );
    let e = o
        .reconf(
            pf(),
            4,
            Mode::Detach,
            &[AssignRequest {
                vm: "vm9".into(),
                count: 1,
            }],
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("unknown VM \"vm9\" (configured: vm1, vm2)"),
        "{e}"
    );
    let e = o
        .reconf(
            pf(),
            4,
            Mode::Detach,
            &[AssignRequest {
                vm: "vm2".into(),
                count: 2,
            }],
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("more VFs than the 4 requested have free"),
        "{e}"
    );
    assert!(lab.mgr.sysfs().writes().is_empty());
    assert!(journal::pending(o.state()).unwrap().is_none());
    assert_eq!(lab.numvfs(), 4);
}

#[test]
fn an_unreachable_vmm_stops_a_reconf_before_anything_changes() {
    let lab = lab(Behaviour::default(), Behaviour::default(), "");
    lab.orch().init().unwrap();
    lab.mgr.sysfs().clear_writes();
    std::fs::remove_file(&lab.config.vm("vm2").unwrap().qmp).unwrap();
    let e = lab.orch().reconf(pf(), 2, Mode::Detach, &[]).unwrap_err();
    assert_eq!(e.kind(), "vmm");
    assert!(
        e.to_string()
            .contains("VM vm2: connecting to its QMP socket"),
        "{e}"
    );
    assert!(lab.mgr.sysfs().writes().is_empty());
    assert_eq!(lab.vm("vm1").ids(), ids(&[0, 1]));
}

#[test]
fn a_second_operation_while_one_runs_is_refused() {
    let lab = lab(Behaviour::default(), Behaviour::default(), "");
    let o = lab.orch();
    let _held = o
        .state()
        .lock("reconf of PF 0000:01:00.0 to 2 VFs (pause mode)")
        .unwrap();
    let e = o.reconf(pf(), 2, Mode::Detach, &[]).unwrap_err();
    assert_eq!(e.kind(), "busy");
    assert!(
        e.to_string()
            .contains("reconf of PF 0000:01:00.0 to 2 VFs (pause mode)"),
        "{e}"
    );
    assert!(o.init().is_err());
}

/// One step of a hand-made journal: records it, then does it.
type JournalStep<'a> = Box<dyn FnOnce(&mut Journal) + 'a>;

/// Writes the journal of a detach reconf 4 -> 2 interrupted after `n` steps
/// as the helper would have (and does those steps), then recovers.
#[test]
fn recover_finishes_a_reconf_interrupted_at_any_journaled_step() {
    for stop in 0..6 {
        let lab = lab(Behaviour::default(), Behaviour::default(), "");
        lab.orch().init().unwrap();
        let table = lab.orch().table().unwrap();
        let before: Vec<Assignment> = table.assignments.clone();
        let target: Vec<Assignment> = before.iter().filter(|a| a.vf < 2).cloned().collect();
        let sd = StateDir::open(&lab.state_dir()).unwrap();
        let mut j = Journal::begin(
            &sd,
            Step::Begin {
                kind: OpKind::Reconf,
                pf: pf(),
                mode: Mode::Detach,
                from: 4,
                to: 2,
                before,
                target,
            },
        )
        .unwrap();
        // The steps of the real flow, each done after its record.
        let mut c1 = QmpConnector.connect(lab.config.vm("vm1").unwrap()).unwrap();
        let mut c2 = QmpConnector.connect(lab.config.vm("vm2").unwrap()).unwrap();
        let steps: Vec<JournalStep<'_>> = vec![
            Box::new(|j| {
                j.record(Step::Detach {
                    vm: "vm1".into(),
                    id: id(0),
                })
                .unwrap();
                c1.detach(&id(0)).unwrap();
            }),
            Box::new(|j| {
                j.record(Step::Detach {
                    vm: "vm2".into(),
                    id: id(3),
                })
                .unwrap();
                c2.detach(&id(3)).unwrap();
            }),
            Box::new(|j| {
                j.record(Step::SetCount {
                    pf: pf(),
                    from: 4,
                    to: 2,
                })
                .unwrap();
            }),
            Box::new(|j| j.record(Step::Bind { pf: pf() }).unwrap()),
            Box::new(|j| j.record(Step::Table).unwrap()),
        ];
        for (i, s) in steps.into_iter().enumerate() {
            if i >= stop {
                break;
            }
            s(&mut j);
        }
        drop(j);
        let e = lab.orch().reconf(pf(), 4, Mode::Detach, &[]).unwrap_err();
        assert_eq!(e.kind(), "recovery_needed", "stop {stop}: {e}");
        let r = lab.orch().recover().unwrap();
        assert!(r.failures.is_empty(), "stop {stop}: {:?}", r.failures);
        assert_eq!(lab.numvfs(), 2, "stop {stop}");
        assert_eq!(lab.vm("vm1").ids(), ids(&[0, 1]), "stop {stop}");
        assert!(lab.vm("vm2").ids().is_empty(), "stop {stop}");
        assert_eq!(lab.table().len(), 2, "stop {stop}");
        assert!(journal::pending(lab.orch().state()).unwrap().is_none());
        let again = lab.orch().recover().unwrap();
        assert!(!again.changed, "stop {stop}");
    }
}

#[test]
fn recover_unpauses_devices_left_paused_and_records_unreachable_vmms_as_gone() {
    let lab = lab(svff(), svff(), "");
    lab.orch().init().unwrap();
    let before = lab.orch().table().unwrap().assignments;
    let sd = StateDir::open(&lab.state_dir()).unwrap();
    let mut j = Journal::begin(
        &sd,
        Step::Begin {
            kind: OpKind::Reconf,
            pf: pf(),
            mode: Mode::Pause,
            from: 4,
            to: 4,
            before: before.clone(),
            target: before,
        },
    )
    .unwrap();
    let mut c1 = QmpConnector.connect(lab.config.vm("vm1").unwrap()).unwrap();
    j.record(Step::Pause {
        vm: "vm1".into(),
        id: id(0),
    })
    .unwrap();
    c1.pause(&id(0)).unwrap();
    drop(j);
    std::fs::remove_file(&lab.config.vm("vm2").unwrap().qmp).unwrap();
    let r = lab.orch().recover().unwrap();
    assert_eq!(lab.vm("vm1").state_of(&id(0)), Some(DeviceState::Attached));
    assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
    assert!(
        r.failures[0].contains("VM vm2: not reachable"),
        "{:?}",
        r.failures
    );
    let table = lab.table();
    assert!(
        table.contains(&(3, "vm2".into(), AssignState::Gone)),
        "{table:?}"
    );
    assert!(
        table.contains(&(0, "vm1".into(), AssignState::Attached)),
        "{table:?}"
    );
}

#[test]
fn assign_lists_parse_and_bad_ones_are_usage_errors() {
    assert_eq!(
        AssignRequest::parse_list("vm1=2,vm2=1").unwrap(),
        [
            AssignRequest {
                vm: "vm1".into(),
                count: 2
            },
            AssignRequest {
                vm: "vm2".into(),
                count: 1
            }
        ]
    );
    assert!(AssignRequest::parse_list("vm1").is_err());
    assert!(AssignRequest::parse_list("vm1=x").is_err());
}

#[test]
fn svff_vmm_kind_that_is_not_running_is_started_by_init_and_a_failed_start_names_the_vm() {
    // vm2 as an svff-vmm VM whose VMM svff never started, and whose
    // command exits at once: init tries to start it (journaled) and
    // reports the failure naming the VM and what its log said.
    let lab = lab(svff(), Behaviour::default(), "");
    let mut config = lab.config.clone();
    let vm2 = config.vms.iter_mut().find(|v| v.name == "vm2").unwrap();
    vm2.kind = crate::config::VmKind::SvffVmm;
    vm2.qmp = lab.dir.path().join("vm2-absent.sock");
    vm2.command = vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo no VMM here >&2; exit 3".into(),
    ];
    let orch = Orchestrator::new(&config, &lab.mgr, &QmpConnector).unwrap();
    let r = orch.init().unwrap();
    assert!(
        r.failures
            .iter()
            .any(|f| f.contains("VM vm2") && f.contains("no VMM here")),
        "{r:?}"
    );
    let journal = std::fs::read_to_string(config.state_dir.join("journal.jsonl")).unwrap();
    assert!(journal.contains("\"start_vmm\""), "{journal}");
    assert!(matches!(
        supervise::process(&config.state_dir, "vm2"),
        supervise::Process::Exited { .. }
    ));
    // vm1's VFs are in; vm2's are not in the table (its start failed).
    assert!(r.assignments.iter().all(|a| a.vm == "vm1"), "{r:?}");
    let s = orch.vm_status();
    let v2 = s.iter().find(|v| v.name == "vm2").unwrap();
    assert_eq!(v2.process.as_deref(), Some("exited"));
    assert!(v2.log.as_ref().unwrap().exists());
}

#[test]
fn reconf_records_the_vfs_of_an_svff_vmm_that_died_as_gone_and_goes_on() {
    let lab = lab(svff(), svff(), "");
    lab.orch().init().unwrap();
    // vm2 becomes an svff-vmm VM whose VMM (per its pid file) has ended.
    let mut config = lab.config.clone();
    let vm2 = config.vms.iter_mut().find(|v| v.name == "vm2").unwrap();
    vm2.kind = crate::config::VmKind::SvffVmm;
    vm2.qmp = lab.dir.path().join("vm2-dead.sock");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    std::fs::write(
        supervise::files(&config.state_dir, "vm2").pid,
        format!("{pid} 1\n"),
    )
    .unwrap();
    let orch = Orchestrator::new(&config, &lab.mgr, &QmpConnector).unwrap();
    let r = orch
        .reconf(
            pf(),
            4,
            Mode::Pause,
            &[AssignRequest {
                vm: "vm1".into(),
                count: 1,
            }],
        )
        .unwrap();
    assert!(
        r.failures
            .iter()
            .any(|f| f.contains("VM vm2") && f.contains("recorded as gone")),
        "{r:?}"
    );
    let table: Vec<(u16, String, AssignState)> = orch
        .table()
        .unwrap()
        .assignments
        .into_iter()
        .map(|a| (a.vf, a.vm, a.state))
        .collect();
    assert!(
        table.contains(&(3, "vm2".into(), AssignState::Gone)),
        "{table:?}"
    );
    assert!(
        table.contains(&(2, "vm1".into(), AssignState::Attached)),
        "{table:?}"
    );
    assert_eq!(lab.vm("vm1").ids(), ids(&[0, 1, 2]));
    let v2 = orch
        .vm_status()
        .into_iter()
        .find(|v| v.name == "vm2")
        .unwrap();
    assert_eq!(v2.process.as_deref(), Some("exited"));
}

#[test]
fn status_assignments_carry_the_vmm_pause_state_or_say_why_not() {
    let lab = lab(svff(), Behaviour::default(), "");
    lab.orch().init().unwrap();
    let mut c1 = QmpConnector.connect(lab.config.vm("vm1").unwrap()).unwrap();
    c1.pause(&id(1)).unwrap();
    let st = lab.orch().status_assignments(&[pf()]).unwrap();
    let by_vf: BTreeMap<u16, &crate::status::AssignmentStatus> =
        st.iter().map(|a| (a.entry.vf, a)).collect();
    assert_eq!(by_vf[&0].vmm_state, Some(DeviceState::Attached));
    assert_eq!(by_vf[&1].vmm_state, Some(DeviceState::Paused));
    assert_eq!(by_vf[&3].vmm_state, None);
    assert_eq!(
        by_vf[&3].vmm_note.as_deref(),
        Some("VMM does not speak the svff QMP commands")
    );
    std::fs::remove_file(&lab.config.vm("vm2").unwrap().qmp).unwrap();
    let st = lab.orch().status_assignments(&[pf()]).unwrap();
    let note = st
        .iter()
        .find(|a| a.entry.vf == 3)
        .unwrap()
        .vmm_note
        .clone()
        .unwrap();
    assert!(
        note.contains("VM vm2: connecting to its QMP socket"),
        "{note}"
    );
    let mut status = lab.mgr.status(Some(&[pf()])).unwrap();
    status.assignments = st;
    crate::status::fill_holders(&mut status);
    assert_eq!(status.pfs[0].vfs[3].holder.as_deref(), Some(id(3).as_str()));
    assert_eq!(status.pfs[0].vfs[2].holder, None);
}

#[test]
fn the_daemon_finishes_an_interrupted_operation_before_serving() {
    let lab = lab(Behaviour::default(), Behaviour::default(), "");
    lab.orch().init().unwrap();
    let before = lab.orch().table().unwrap().assignments;
    let target: Vec<Assignment> = before.iter().filter(|a| a.vf < 2).cloned().collect();
    let sd = StateDir::open(&lab.state_dir()).unwrap();
    drop(
        Journal::begin(
            &sd,
            Step::Begin {
                kind: OpKind::Reconf,
                pf: pf(),
                mode: Mode::Detach,
                from: 4,
                to: 2,
                before,
                target,
            },
        )
        .unwrap(),
    );
    let Lab {
        dir: _dir,
        config,
        mgr,
        vms,
    } = lab;
    let d = crate::daemon::Daemon::new(config, mgr);
    let r = d
        .recover_at_start()
        .unwrap()
        .expect("an operation to recover");
    assert_eq!(r.to, Some(2));
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(vms["vm1"].ids(), ids(&[0, 1]));
    assert!(vms["vm2"].ids().is_empty());
    assert!(
        d.recover_at_start().unwrap().is_none(),
        "nothing left to recover"
    );
}

#[path = "pool_tests.rs"]
mod pool_tests;
