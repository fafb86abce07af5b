//! Our client against our server: the svff command set, with fd passing.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use qmp_ext::svff::{
    self, PausableDevices, QuerySvffVfio, SvffVfioInfo, SvffVfioPause, SvffVfioPausePolicy,
    SvffVfioPausedAccesses, SvffVfioPhase, SvffVfioPhaseName, SvffVfioState, SvffVfioStateChanged,
    SvffVfioTimings, SvffVfioUnpause,
};
use qmp_ext::{Client, ErrorClass, EventSink, Handler, QmpError, Server, ServerConfig, Session};
use serde_json::{json, Map, Value};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Test double of a VMM's device list: one device, "vf0".
struct FakeDevices {
    events: EventSink,
    info: Mutex<SvffVfioInfo>,
}

impl FakeDevices {
    fn set_state(&self, info: &mut SvffVfioInfo, state: SvffVfioState) {
        info.state = state;
        self.events.emit_event(&SvffVfioStateChanged {
            id: info.id.clone(),
            state,
        });
    }

    fn device<'a>(
        &self,
        info: &'a mut SvffVfioInfo,
        id: &str,
    ) -> Result<&'a mut SvffVfioInfo, QmpError> {
        if info.id == id {
            Ok(info)
        } else {
            Err(QmpError::device_not_found(format!(
                "Device '{id}' not found"
            )))
        }
    }
}

fn phase(name: SvffVfioPhaseName, ns: u64) -> SvffVfioPhase {
    SvffVfioPhase { name, ns }
}

impl PausableDevices for FakeDevices {
    fn pause(&self, args: SvffVfioPause) -> Result<SvffVfioTimings, QmpError> {
        let mut guard = self.info.lock().expect("lock");
        let info = self.device(&mut guard, &args.id)?;
        if info.state == SvffVfioState::Paused {
            return Ok(SvffVfioTimings::default());
        }
        let mut info = info.clone();
        self.set_state(&mut info, SvffVfioState::Pausing);
        let t = SvffVfioTimings {
            total_ns: 30,
            phases: vec![
                phase(SvffVfioPhaseName::UnmapBars, 10),
                phase(SvffVfioPhaseName::Snapshot, 5),
                phase(SvffVfioPhaseName::Close, 15),
            ],
        };
        info.policy = Some(args.effective_policy());
        info.pause_count += 1;
        info.last_pause = Some(t.clone());
        self.set_state(&mut info, SvffVfioState::Paused);
        *guard = info;
        Ok(t)
    }

    fn unpause(
        &self,
        args: SvffVfioUnpause,
        group_fd: Option<OwnedFd>,
    ) -> Result<SvffVfioTimings, QmpError> {
        let mut guard = self.info.lock().expect("lock");
        let info = self.device(&mut guard, &args.id)?;
        let mut phases = Vec::new();
        if let Some(fd) = group_fd {
            // The "group fd" is a pipe; what it carries proves it is the
            // descriptor the client passed.
            let mut text = String::new();
            std::fs::File::from(fd)
                .read_to_string(&mut text)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            phases.push(phase(SvffVfioPhaseName::Reopen, 1));
            info.host = format!("fd:{text}");
        }
        if let Some(h) = args.host {
            info.host = h;
        }
        let t = SvffVfioTimings {
            total_ns: 1,
            phases,
        };
        info.policy = None;
        info.last_unpause = Some(t.clone());
        let mut info = info.clone();
        self.set_state(&mut info, SvffVfioState::Attached);
        *guard = info;
        Ok(t)
    }

    fn query(&self) -> Result<Vec<SvffVfioInfo>, QmpError> {
        Ok(vec![self.info.lock().expect("lock").clone()])
    }
}

struct Vmm {
    devices: FakeDevices,
}

impl Handler for Vmm {
    fn execute(
        &self,
        session: &mut Session,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        svff::dispatch(&self.devices, session, command, args)
            .unwrap_or_else(|| Err(QmpError::command_not_found(command)))
    }
}

fn vmm() -> (tempfile::TempDir, Server, Client) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vmm.qmp");
    let events = EventSink::new();
    let info = SvffVfioInfo {
        id: "vf0".into(),
        state: SvffVfioState::Attached,
        host: "0000:01:00.1".into(),
        guest: "0000:00:04.0".into(),
        policy: None,
        pause_count: 0,
        paused_accesses: SvffVfioPausedAccesses::default(),
        last_pause: None,
        last_unpause: None,
    };
    let handler = Vmm {
        devices: FakeDevices {
            events: events.clone(),
            info: Mutex::new(info),
        },
    };
    let server = Server::bind(
        &path,
        ServerConfig {
            events,
            ..ServerConfig::default()
        },
        handler,
    )
    .expect("bind");
    let client = Client::connect(&path, TIMEOUT).expect("connect");
    (dir, server, client)
}

#[test]
fn pause_query_unpause_round_trip_with_events() {
    let (_dir, _server, mut c) = vmm();
    let list = c.call(&QuerySvffVfio {}).expect("query");
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].state, list[0].pause_count),
        (SvffVfioState::Attached, 0)
    );

    let t = c
        .call(&SvffVfioPause {
            id: "vf0".into(),
            policy: Some(SvffVfioPausePolicy::Ignore),
            stall_ms: None,
        })
        .expect("pause");
    let names: Vec<&str> = t.phases.iter().map(|p| p.name.name()).collect();
    assert_eq!(names, ["unmap-bars", "snapshot", "close"]);
    for want in [SvffVfioState::Pausing, SvffVfioState::Paused] {
        let ev = c
            .wait_event("SVFF_VFIO_STATE_CHANGED", TIMEOUT)
            .expect("state event");
        assert_eq!(
            ev.decode::<SvffVfioStateChanged>().expect("decode"),
            SvffVfioStateChanged {
                id: "vf0".into(),
                state: want
            }
        );
    }

    let info = &c.call(&QuerySvffVfio {}).expect("query")[0];
    assert_eq!(info.state, SvffVfioState::Paused);
    assert_eq!(info.policy, Some(SvffVfioPausePolicy::Ignore));
    assert_eq!(info.pause_count, 1);
    assert_eq!(info.last_pause.as_ref(), Some(&t));

    let t = c
        .call(&SvffVfioUnpause {
            id: "vf0".into(),
            host: Some("0000:01:00.2".into()),
            fdname: None,
        })
        .expect("unpause");
    assert!(t.phases.is_empty());
    let ev = c
        .wait_event("SVFF_VFIO_STATE_CHANGED", TIMEOUT)
        .expect("state event");
    assert_eq!(
        ev.decode::<SvffVfioStateChanged>().expect("decode").state,
        SvffVfioState::Attached
    );
    let info = &c.call(&QuerySvffVfio {}).expect("query")[0];
    assert_eq!(
        (info.state, info.host.as_str(), info.policy),
        (SvffVfioState::Attached, "0000:01:00.2", None)
    );
}

#[test]
fn unpause_receives_the_group_fd_passed_with_getfd_once() {
    let (_dir, _server, mut c) = vmm();
    c.call(&SvffVfioPause {
        id: "vf0".into(),
        policy: None,
        stall_ms: None,
    })
    .expect("pause");
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let mut w = std::fs::File::from(w);
    w.write_all(b"group-42").expect("write");
    drop(w);
    c.send_fd("grp", r.as_fd()).expect("getfd");
    drop(r); // the server holds its own copy now

    let unpause = SvffVfioUnpause {
        id: "vf0".into(),
        host: None,
        fdname: Some("grp".into()),
    };
    let t = c.call(&unpause).expect("unpause with fd");
    assert_eq!(t.phases[0].name, SvffVfioPhaseName::Reopen);
    let info = &c.call(&QuerySvffVfio {}).expect("query")[0];
    assert_eq!(info.host, "fd:group-42", "the server got the client's pipe");

    // The descriptor was consumed by the first use.
    let err = c.call(&unpause).expect_err("fd used up");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::GenericError
    );
    let err = c
        .execute("closefd", Some(json!({"fdname": "grp"})))
        .expect_err("fd used up");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::GenericError
    );
}

#[test]
fn fds_are_per_session() {
    let (dir, _server, mut a) = vmm();
    let mut b = Client::connect(dir.path().join("vmm.qmp"), TIMEOUT).expect("second client");
    let (r, _w) = nix::unistd::pipe().expect("pipe");
    a.send_fd("mine", r.as_fd()).expect("getfd");
    let err = b
        .execute("closefd", Some(json!({"fdname": "mine"})))
        .expect_err("not b's fd");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::GenericError
    );
    a.execute("closefd", Some(json!({"fdname": "mine"})))
        .expect("a's fd");
}

#[test]
fn svff_errors_have_qemu_classes() {
    let (_dir, _server, mut c) = vmm();
    let err = c
        .call(&SvffVfioPause {
            id: "nope".into(),
            policy: None,
            stall_ms: None,
        })
        .expect_err("unknown device");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::DeviceNotFound
    );
    let err = c
        .execute(
            "svff-vfio-pause",
            Some(json!({"id": "vf0", "policy": "sometimes"})),
        )
        .expect_err("bad enum");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::GenericError
    );
    let err = c
        .execute("svff-vfio-pause", Some(json!({"id": "vf0", "extra": 1})))
        .expect_err("unknown member");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::GenericError
    );
    let err = c
        .execute("query-svff-vfio", Some(json!({"all": true})))
        .expect_err("no arguments taken");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::GenericError
    );
    let unpause = SvffVfioUnpause {
        id: "vf0".into(),
        host: None,
        fdname: Some("never-passed".into()),
    };
    let err = c.call(&unpause).expect_err("no such fd");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::GenericError
    );
    let err = c
        .execute("device_del", Some(json!({"id": "vf0"})))
        .expect_err("not an svff command");
    assert_eq!(
        err.qmp().expect("QMP error").class,
        ErrorClass::CommandNotFound
    );
}

#[test]
fn wait_event_where_picks_the_matching_event_and_keeps_the_others() {
    let (_dir, _server, mut c) = vmm();
    c.call(&SvffVfioPause {
        id: "vf0".into(),
        policy: None,
        stall_ms: None,
    })
    .expect("pause");
    // Two state events are queued now: pausing, then paused.
    let paused = c
        .wait_event_where(
            "SVFF_VFIO_STATE_CHANGED",
            |e| {
                e.decode::<SvffVfioStateChanged>()
                    .is_ok_and(|d| d.state == SvffVfioState::Paused)
            },
            TIMEOUT,
        )
        .expect("paused event");
    assert_eq!(
        paused.data.as_ref().and_then(|d| d.get("state")),
        Some(&json!("paused"))
    );
    let left = c.take_events();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        left[0]
            .decode::<SvffVfioStateChanged>()
            .expect("decode")
            .state,
        SvffVfioState::Pausing
    );
}
