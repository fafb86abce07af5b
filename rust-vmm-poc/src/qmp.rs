//! The VMM's QMP commands, served by qmp-ext's [`Server`](qmp_ext::Server).
//!
//! The server itself answers `qmp_capabilities`, `query-version`, `getfd` and `closefd`
//! (descriptors passed with SCM_RIGHTS, kept per connection). This handler adds:
//!
//! | command | arguments | effect |
//! |---|---|---|
//! | `query-status` | none | `{"running": bool, "status": "running" \| "paused" \| "shutdown"}` |
//! | `stop` | none | pauses every vCPU (returns once they are all out of the guest); event `STOP` |
//! | `cont` | none | resumes; event `RESUME` |
//! | `quit` | none | ends the VM: the VMM joins its threads, closes its fds and exits 0 |
//! | `x-svff-set-present` | `{"device": "00:DD.F", "present": bool}` | hides/shows an emulated function in config space (tests of how guests notice a removal) |
//! | `x-svff-trigger-irq` | `{"id", "vector"}` | test only: the kernel fires MSI-X vector `vector` of an attached `--vfio` device (`VFIO_DEVICE_SET_IRQS` trigger), so it travels VFIO -> eventfd -> KVM irqfd -> guest; an error while paused or before the guest enabled MSI-X |
//! | `device_add` | `{"driver": "vfio-pci", "host", "id", "policy"?, "fdname"?, "mmap"?, "bus"? (ignored)}` | hot-plugs a VF at the first free device number of bus 0 (needs a VMM started with a `--vfio`); returns `{"guest": "00:DD.F"}` |
//! | `device_del` | `{"id"}` | hot-unplugs a VFIO device at once (surprise removal: no guest handshake): detached, off the bus; event `DEVICE_DELETED` `{"device", "path"}` |
//! | `x-svff-query-tsc` | none | test only: `{"tsc-khz"}`, the guest's TSC frequency (to turn the test guest's TSC counts into time; 0 if KVM cannot tell) |
//! | `x-svff-query-bar-slots` | none | test only: per `--vfio` device `{"id", "slots", "maps", "trapped"}`: KVM slots mapped now, slots added so far, BAR accesses that trapped to the VMM outside the MSI-X table/PBA |
//! | `svff-vfio-pause` | `{"id", "policy"?}` | pauses a `--vfio` device through vfio-pause: every host fd closed when it returns; timings returned; event `SVFF_VFIO_STATE_CHANGED` |
//! | `svff-vfio-unpause` | `{"id", "host"?, "fdname"?}` | reopens it on `host` (default: the previous one) or on a group fd passed with `getfd` |
//! | `query-svff-vfio` | none | every `--vfio` device: state, host, guest address, policy, pauses, paused accesses (BAR reads/writes answered all-ones/dropped or held until the unpause, since start), last timings |
//!
//! | `x-svff-start` | none | start-up handshake only (see [`StartGate`]) |
//!
//! A pause without `policy` uses the device's last one (at first `--vfio ...,policy=`,
//! default `ignore`); `stall` waits at most 10 s per access.
//!
//! When the VM ends the VMM emits `SHUTDOWN` with `guest` and `reason` (`host-qmp-quit`,
//! `guest-shutdown`, `guest-reset`, `guest-panic` for a debug exit, `vcpu-failed`).

use serde::Deserialize;
use serde_json::{json, Map, Value};

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use qmp_ext::svff::{
    self, PausableDevices, QuerySvffVfio, SvffVfioInfo, SvffVfioPause, SvffVfioPausedAccesses,
    SvffVfioPhase, SvffVfioState, SvffVfioStateChanged, SvffVfioTimings, SvffVfioUnpause,
};
use qmp_ext::{decode_arguments, EventSink, Handler, QmpCommand, QmpError, Session};
use vfio_pause::{DeviceState, PciAddress, Timings, VfSource};

use crate::devices::{lock, VfioEntry};
use crate::error::error_chain;
use crate::pci::DevFn;
use crate::vm::{ExitReason, RunState, VmHandle};

/// How long a stalled access waits under `policy=stall` (vfio-pause bounds it to 10 s).
pub const STALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

fn timings(t: &Timings) -> SvffVfioTimings {
    SvffVfioTimings {
        total_ns: t.total.as_nanos() as u64,
        phases: t
            .phases
            .iter()
            .map(|(p, d)| SvffVfioPhase {
                name: *p,
                ns: d.as_nanos() as u64,
            })
            .collect(),
    }
}

fn parse_host(s: &str) -> Result<PciAddress, QmpError> {
    let bdf = s
        .strip_prefix("/sys/bus/pci/devices/")
        .unwrap_or(s)
        .trim_end_matches('/');
    bdf.parse()
        .map_err(|_| QmpError::generic(format!("'{s}' is not a PCI address or its sysfs path")))
}

/// The svff-vmm QMP command handler.
#[derive(Debug)]
pub struct QmpHandler {
    vm: VmHandle,
    events: EventSink,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPresent {
    device: String,
    present: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceAdd {
    driver: String,
    host: String,
    id: String,
    #[serde(default)]
    policy: Option<vfio_pause::PausePolicy>,
    #[serde(default)]
    fdname: Option<String>,
    #[serde(default)]
    mmap: Option<bool>,
    /// Accepted for QEMU compatibility; the device goes on bus 0.
    #[serde(default)]
    #[allow(dead_code)]
    bus: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceDel {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerIrq {
    id: String,
    vector: u32,
}

/// Parses `00:DD.F` (bus 0 only).
pub fn parse_devfn(s: &str) -> Option<DevFn> {
    let rest = s.strip_prefix("00:")?;
    let (d, f) = rest.split_once('.')?;
    if d.len() != 2 || f.len() != 1 {
        return None;
    }
    DevFn::new(u8::from_str_radix(d, 16).ok()?, f.parse().ok()?)
}

impl QmpHandler {
    /// A handler steering `vm`, emitting events to `events` (the server's sink).
    pub fn new(vm: VmHandle, events: EventSink) -> Self {
        QmpHandler { vm, events }
    }

    /// Emits `SHUTDOWN` for `reason` (the VMM calls this as the VM ends).
    pub fn emit_shutdown(events: &EventSink, reason: &ExitReason) {
        let (guest, why) = match reason {
            ExitReason::Quit => (false, "host-qmp-quit"),
            ExitReason::GuestShutdown => (true, "guest-shutdown"),
            ExitReason::GuestReset => (true, "guest-reset"),
            ExitReason::DebugExit(_) => (true, "guest-panic"),
            ExitReason::VcpuFailed { .. } => (false, "vcpu-failed"),
        };
        let mut data = Map::new();
        data.insert("guest".into(), json!(guest));
        data.insert("reason".into(), json!(why));
        events.emit("SHUTDOWN", Some(data));
    }
}

impl Handler for QmpHandler {
    fn execute(
        &self,
        session: &mut Session,
        command: &str,
        arguments: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        if matches!(
            command,
            SvffVfioPause::NAME | SvffVfioUnpause::NAME | QuerySvffVfio::NAME
        ) {
            if let Some(r) = svff::dispatch(self, session, command, arguments) {
                return r;
            }
            return Err(QmpError::command_not_found(command));
        }
        let no_args = |a: Map<String, Value>| decode_arguments::<NoArgs>(command, a).map(|_| ());
        match command {
            "query-status" => {
                no_args(arguments)?;
                let (running, status) = match self.vm.state() {
                    RunState::Running => (true, "running"),
                    RunState::Paused => (false, "paused"),
                    RunState::Shutdown => (false, "shutdown"),
                };
                Ok(json!({"running": running, "status": status}))
            }
            "stop" => {
                no_args(arguments)?;
                let was = self.vm.state();
                self.vm
                    .pause()
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                if was == RunState::Running {
                    self.events.emit("STOP", None);
                }
                Ok(json!({}))
            }
            "cont" => {
                no_args(arguments)?;
                if self.vm.state() == RunState::Shutdown {
                    return Err(QmpError::generic("the VM is shutting down"));
                }
                let was = self.vm.state();
                self.vm.resume();
                if was == RunState::Paused {
                    self.events.emit("RESUME", None);
                }
                Ok(json!({}))
            }
            "quit" => {
                no_args(arguments)?;
                self.vm.request_exit(ExitReason::Quit);
                Ok(json!({}))
            }
            "x-svff-set-present" => {
                let a: SetPresent = decode_arguments(command, arguments)?;
                let df = parse_devfn(&a.device).ok_or_else(|| {
                    QmpError::generic(format!(
                        "device '{}' is not a bus-0 address 00:DD.F",
                        a.device
                    ))
                })?;
                self.vm
                    .set_device_present(df, a.present)
                    .map_err(|e| QmpError::device_not_found(e.to_string()))?;
                Ok(json!({}))
            }
            "device_del" => {
                let a: DeviceDel = decode_arguments(command, arguments)?;
                self.vm.vfio_del(&a.id).map_err(|_| {
                    QmpError::device_not_found(format!("Device '{}' not found", a.id))
                })?;
                let mut data = Map::new();
                data.insert("device".into(), json!(a.id));
                data.insert(
                    "path".into(),
                    json!(format!("/machine/peripheral/{}", a.id)),
                );
                self.events.emit("DEVICE_DELETED", Some(data));
                Ok(json!({}))
            }
            "device_add" => {
                let a: DeviceAdd = decode_arguments(command, arguments)?;
                if a.driver != "vfio-pci" {
                    return Err(QmpError::generic(format!(
                        "device_add: driver '{}' is not supported (only vfio-pci)",
                        a.driver
                    )));
                }
                let host = parse_host(&a.host)?;
                let source = match &a.fdname {
                    Some(n) => VfSource::GroupFd {
                        group: session.take_fd(n)?,
                        address: host,
                    },
                    None => VfSource::Sysfs(host),
                };
                let spec = crate::vm::VfioSpec {
                    host,
                    id: a.id.clone(),
                    policy: a.policy.unwrap_or(vfio_pause::PausePolicy::Ignore),
                    fd: None,
                    mmap: a.mmap.unwrap_or(true),
                };
                let df = self.vm.vfio_add(&spec, source).map_err(|e| {
                    QmpError::generic(format!("device_add of '{}': {}", a.id, error_chain(&e)))
                })?;
                Ok(json!({"guest": df.to_string()}))
            }
            "x-svff-query-bar-slots" => {
                no_args(arguments)?;
                Ok(Value::Array(
                    self.vm
                        .vfio()
                        .iter()
                        .map(|e| {
                            let (slots, maps) = e.slots.counts();
                            json!({
                                "id": e.id,
                                "slots": slots,
                                "maps": maps,
                                "trapped": e.trapped.trapped.load(Ordering::Relaxed),
                            })
                        })
                        .collect(),
                ))
            }
            "x-svff-query-tsc" => {
                no_args(arguments)?;
                Ok(json!({"tsc-khz": self.vm.tsc_khz()}))
            }
            "x-svff-trigger-irq" => {
                let a: TriggerIrq = decode_arguments(command, arguments)?;
                let e = self.entry(&a.id)?;
                e.dev
                    .trigger_irq(vfio_pause::irq::MSIX, a.vector)
                    .map_err(|err| {
                        QmpError::generic(format!(
                            "'{}': triggering MSI-X vector {}: {err}",
                            e.id, a.vector
                        ))
                    })?;
                Ok(json!({}))
            }
            _ => Err(QmpError::command_not_found(command)),
        }
    }
}

impl QmpHandler {
    fn entry(&self, id: &str) -> Result<Arc<VfioEntry>, QmpError> {
        self.vm
            .vfio()
            .into_iter()
            .find(|e| e.id == id)
            .ok_or_else(|| QmpError::device_not_found(format!("Device '{id}' not found")))
    }

    fn changed(&self, id: &str, state: SvffVfioState) {
        self.events.emit_event(&SvffVfioStateChanged {
            id: id.into(),
            state,
        });
    }
}

impl PausableDevices for QmpHandler {
    fn pause(&self, args: SvffVfioPause) -> Result<SvffVfioTimings, QmpError> {
        let e = self.entry(&args.id)?;
        let policy = args.policy.unwrap_or(*lock(&e.policy));
        let was = e.dev.state();
        let t = e.dev.pause_with(policy, STALL_DEADLINE).map_err(|err| {
            QmpError::generic(format!("pausing '{}': {}", e.id, error_chain(&err)))
        })?;
        if was == DeviceState::Attached {
            *lock(&e.policy) = policy;
            e.pauses.fetch_add(1, Ordering::Relaxed);
            self.changed(&e.id, SvffVfioState::Paused);
        }
        Ok(timings(&t))
    }

    fn unpause(
        &self,
        args: SvffVfioUnpause,
        group_fd: Option<OwnedFd>,
    ) -> Result<SvffVfioTimings, QmpError> {
        let e = self.entry(&args.id)?;
        let host = match &args.host {
            Some(h) => parse_host(h)?,
            None => e.dev.host(),
        };
        let source = match group_fd {
            Some(group) => VfSource::GroupFd {
                group,
                address: host,
            },
            None => VfSource::Sysfs(host),
        };
        let was = e.dev.state();
        let t = e.dev.unpause(source).map_err(|err| {
            QmpError::generic(format!("unpausing '{}': {}", e.id, error_chain(&err)))
        })?;
        if was == DeviceState::Paused {
            self.changed(&e.id, SvffVfioState::Attached);
        }
        Ok(timings(&t))
    }

    fn query(&self) -> Result<Vec<SvffVfioInfo>, QmpError> {
        Ok(self
            .vm
            .vfio()
            .iter()
            .map(|e| {
                let state = e.dev.state();
                let c = e.dev.access_counters();
                let (lp, lu) = e.dev.last_timings();
                SvffVfioInfo {
                    id: e.id.clone(),
                    state,
                    host: e.dev.host().to_string(),
                    guest: format!("0000:{}", e.guest),
                    policy: (state != SvffVfioState::Attached).then(|| *lock(&e.policy)),
                    pause_count: e.pauses.load(Ordering::Relaxed),
                    paused_accesses: SvffVfioPausedAccesses {
                        config_reads: c.shadow_reads,
                        config_writes: c.shadow_writes,
                        bar_reads: c.ignored_reads
                            + e.trapped.stalled_reads.load(Ordering::Relaxed),
                        bar_writes: c.ignored_writes
                            + e.trapped.stalled_writes.load(Ordering::Relaxed),
                    },
                    last_pause: lp.as_ref().map(timings),
                    last_unpause: lu.as_ref().map(timings),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_0_addresses_parse_and_others_do_not() {
        assert_eq!(parse_devfn("00:1f.7"), DevFn::new(0x1f, 7));
        assert_eq!(parse_devfn("00:02.0"), DevFn::new(2, 0));
        for bad in [
            "01:02.0",
            "00:20.0",
            "00:02.8",
            "00:2.0",
            "0000:00:02.0",
            "x",
        ] {
            assert_eq!(parse_devfn(bad), None, "{bad}");
        }
    }
}

/// How long the VMM waits for `x-svff-start`, and `x-svff-start` for the VM to be built.
pub const START_TIMEOUT: Duration = Duration::from_secs(300);

/// What the start-up handshake hands to the VMM's main thread.
#[derive(Debug)]
pub enum Start {
    /// `x-svff-start`: the group fds by name, and where to answer (the VM is built, or why
    /// not).
    Fds(HashMap<String, OwnedFd>, Sender<Result<(), String>>),
    /// `quit` before the VM was built.
    Quit,
}

#[derive(Debug)]
struct Gate {
    handler: OnceLock<QmpHandler>,
    names: Vec<String>,
    starts: Mutex<Option<Sender<Start>>>,
}

/// The QMP handler of svff-vmm with its start-up handshake.
///
/// Without `--vfio ...,fd=<name>` the VM is built first and the gate is open from the start.
/// With such devices the VMM serves QMP before it has a VM (for a VMM that may not open
/// `/dev/vfio/<group>` itself): the client negotiates capabilities, passes each named group
/// fd with `getfd <name>` (SCM_RIGHTS), then sends `x-svff-start` on the same connection.
/// That command takes the named fds out of the connection (one missing: an error naming
/// it; the ones taken before it are dropped, send them again), the VMM builds the VM with
/// them and answers `{}` once the VM runs, or the error that stopped it (the VMM then
/// exits 1). Before that only `query-status` (`"prelaunch"`) and `quit` (ends the VMM,
/// status 0) work; everything else is refused. Afterwards the connection is an ordinary
/// QMP session of the VM.
#[derive(Debug, Clone)]
pub struct StartGate(Arc<Gate>);

impl StartGate {
    /// A gate open from the start onto `handler`.
    pub fn started(handler: QmpHandler) -> Self {
        let g = StartGate(Arc::new(Gate {
            handler: OnceLock::new(),
            names: Vec::new(),
            starts: Mutex::new(None),
        }));
        g.start(handler);
        g
    }

    /// A gate waiting for `x-svff-start` with the group fds `names`; the receiver gets it.
    pub fn waiting(names: Vec<String>) -> (Self, Receiver<Start>) {
        let (tx, rx) = mpsc::channel();
        let g = StartGate(Arc::new(Gate {
            handler: OnceLock::new(),
            names,
            starts: Mutex::new(Some(tx)),
        }));
        (g, rx)
    }

    /// Opens the gate onto the VM's handler.
    pub fn start(&self, handler: QmpHandler) {
        let _ = self.0.handler.set(handler);
    }

    fn prelaunch(
        &self,
        session: &mut Session,
        command: &str,
        arguments: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        match command {
            "query-status" => {
                decode_arguments::<NoArgs>(command, arguments)?;
                Ok(json!({"running": false, "status": "prelaunch"}))
            }
            "quit" => {
                decode_arguments::<NoArgs>(command, arguments)?;
                if let Some(tx) = lock(&self.0.starts).take() {
                    let _ = tx.send(Start::Quit);
                }
                Ok(json!({}))
            }
            "x-svff-start" => {
                decode_arguments::<NoArgs>(command, arguments)?;
                let mut fds = HashMap::new();
                for name in &self.0.names {
                    let fd = session.take_fd(name).map_err(|_| {
                        QmpError::generic(format!(
                            "x-svff-start: no group fd named '{name}' on this connection \
                             (getfd each --vfio ...,fd=<name> first)"
                        ))
                    })?;
                    fds.insert(name.clone(), fd);
                }
                let tx = lock(&self.0.starts)
                    .take()
                    .ok_or_else(|| QmpError::generic("x-svff-start: already starting"))?;
                let (rtx, rrx) = mpsc::channel();
                tx.send(Start::Fds(fds, rtx))
                    .map_err(|_| QmpError::generic("x-svff-start: the VMM is ending"))?;
                match rrx.recv_timeout(START_TIMEOUT) {
                    Ok(Ok(())) => Ok(json!({})),
                    Ok(Err(e)) => Err(QmpError::generic(format!("building the VM: {e}"))),
                    Err(_) => Err(QmpError::generic("x-svff-start: the VM was not built")),
                }
            }
            _ => Err(QmpError::generic(format!(
                "'{command}': the VM is not built yet (start-up handshake: getfd each \
                 group fd, then x-svff-start)"
            ))),
        }
    }
}

impl Handler for StartGate {
    fn execute(
        &self,
        session: &mut Session,
        command: &str,
        arguments: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        match self.0.handler.get() {
            Some(h) => {
                if command == "x-svff-start" {
                    return Err(QmpError::generic("x-svff-start: the VM is already built"));
                }
                h.execute(session, command, arguments)
            }
            None => self.prelaunch(session, command, arguments),
        }
    }
}
