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
//!
//! When the VM ends the VMM emits `SHUTDOWN` with `guest` and `reason` (`host-qmp-quit`,
//! `guest-shutdown`, `guest-reset`, `guest-panic` for a debug exit, `vcpu-failed`).

use serde::Deserialize;
use serde_json::{json, Map, Value};

use qmp_ext::{decode_arguments, EventSink, Handler, QmpError, Session};

use crate::pci::DevFn;
use crate::vm::{ExitReason, RunState, VmHandle};

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
        _session: &mut Session,
        command: &str,
        arguments: Map<String, Value>,
    ) -> Result<Value, QmpError> {
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
            _ => Err(QmpError::command_not_found(command)),
        }
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
