//! The VMM side of the orchestration: a trait per connection, and its QMP
//! implementation for QEMU and svff-vmm.
//!
//! Detach mode uses QEMU's standard commands (`device_add` of `vfio-pci`,
//! `device_del` waiting for `DEVICE_DELETED`, `qom-list` of
//! `/machine/peripheral`, `query-pci`); pause mode uses the svff commands of
//! `qmp-ext/qapi/svff.json` (`svff-vfio-pause`, `svff-vfio-unpause` with an
//! optional group fd passed by `getfd`, `query-svff-vfio`). A VMM that does
//! not know them answers `CommandNotFound`, which becomes a clear error
//! ([`Error::Vmm`]) and the documented rollback.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmp_ext::svff::{QuerySvffVfio, SvffVfioInfo, SvffVfioPause, SvffVfioTimings, SvffVfioUnpause};
use qmp_ext::{Client, ErrorClass};
use serde_json::{json, Value};

use super::supervise::StartVf;
use crate::config::{VmConfig, VmKind};
use crate::error::Error;
use crate::pci::PciAddress;

/// One connection to a VMM.
pub trait Vmm: Send {
    /// The ids of the VMM's user-created devices (`/machine/peripheral`).
    fn devices(&mut self) -> Result<Vec<String>, Error>;
    /// Hot-plugs `vfio-pci` for `host` as `id` (on `bus` when given),
    /// handing `group_fd` over with `getfd` when given; returns the guest
    /// address when the VMM reports one.
    fn attach(
        &mut self,
        id: &str,
        host: PciAddress,
        bus: Option<&str>,
        group_fd: Option<BorrowedFd<'_>>,
    ) -> Result<Option<String>, Error>;
    /// Hot-unplugs `id`, waiting for `DEVICE_DELETED` within the VM's deadline.
    fn detach(&mut self, id: &str) -> Result<(), Error>;
    /// Pauses `id`: returns once the VMM closed every host fd of it.
    fn pause(&mut self, id: &str) -> Result<SvffVfioTimings, Error>;
    /// Unpauses `id` onto `host`, handing `group_fd` over with `getfd` when given.
    fn unpause(
        &mut self,
        id: &str,
        host: PciAddress,
        group_fd: Option<BorrowedFd<'_>>,
    ) -> Result<SvffVfioTimings, Error>;
    /// The VMM's pausable devices, `None` when it does not speak the svff commands.
    fn pause_states(&mut self) -> Result<Option<Vec<SvffVfioInfo>>, Error>;
}

/// Makes VMM connections from the config.
pub trait Connector: Send + Sync + std::fmt::Debug {
    /// Connects to `vm`.
    fn connect(&self, vm: &VmConfig) -> Result<Box<dyn Vmm>, Error>;

    /// Starts `vm`'s VMM (kind `svff-vmm`) with `vfs` (see
    /// the orchestration README, "VMs of kind svff-vmm") and connects to it; returns the
    /// connection and the VMM's pid. The default refuses.
    fn start(
        &self,
        vm: &VmConfig,
        state_dir: &Path,
        vfs: &[StartVf],
    ) -> Result<(Box<dyn Vmm>, u32), Error> {
        let _ = (state_dir, vfs);
        Err(Error::VmmUnsupported {
            vm: vm.name.clone(),
            reason: "this connector cannot start VMMs".into(),
        })
    }
}

/// The real connector: QMP over each VM's socket; svff-vmm VMs started as
/// the orchestration README says.
#[derive(Debug, Default, Clone, Copy)]
pub struct QmpConnector;

impl Connector for QmpConnector {
    fn connect(&self, vm: &VmConfig) -> Result<Box<dyn Vmm>, Error> {
        if vm.kind == VmKind::Libvirt {
            return super::connect_libvirt(vm);
        }
        QmpVmm::connect(vm).map(|v| Box::new(v) as Box<dyn Vmm>)
    }

    fn start(
        &self,
        vm: &VmConfig,
        state_dir: &Path,
        vfs: &[StartVf],
    ) -> Result<(Box<dyn Vmm>, u32), Error> {
        if vm.kind != VmKind::SvffVmm {
            return Err(Error::VmmUnsupported {
                vm: vm.name.clone(),
                reason: "only VMs of kind \"svff-vmm\" are started by svff".into(),
            });
        }
        // Group fds are opened (as root) before the VMM starts: a VF
        // without its node is an error before anything runs.
        let fds = if super::supervise::passes_fds(vm) {
            vfs.iter()
                .map(|v| {
                    let g = v.group.ok_or_else(|| Error::VmmUnsupported {
                        vm: vm.name.clone(),
                        reason: format!("{} ({}) has no IOMMU group to pass", v.id, v.host),
                    })?;
                    open_group(&vm.name, &v.id, g).map(|f| (v.id.clone(), f))
                })
                .collect::<Result<Vec<_>, Error>>()?
        } else {
            Vec::new()
        };
        let started = super::supervise::spawn(vm, state_dir, vfs)?;
        let mut conn = QmpVmm::connect(vm)?;
        if !fds.is_empty() {
            conn.start_handshake(&fds)?;
        }
        Ok((Box::new(conn), started.pid))
    }
}

/// A connector that keeps each VM's QMP connection open across
/// operations: a connection handed out by [`Connector::connect`] goes back
/// to the connector when the operation drops it (unless it failed on the
/// transport), and the next operation on that VM reuses it, saving the
/// connect, the greeting and `qmp_capabilities` (and, for svff-vmm, the
/// `qom-list` it does not know). A kept connection found dead at its first
/// (read-only) command, as after a VMM restart, is replaced by a new one
/// and the command asked again. For a process running many operations in
/// a row (`svff bench`, a daemon).
#[derive(Debug, Default)]
pub struct PersistentConnector {
    idle: Arc<Mutex<BTreeMap<String, QmpVmm>>>,
}

impl PersistentConnector {
    /// A connector with no connection yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many connections are kept (idle) right now.
    pub fn kept(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Connector for PersistentConnector {
    fn connect(&self, vm: &VmConfig) -> Result<Box<dyn Vmm>, Error> {
        // A libvirt connection is not kept (one per operation).
        if vm.kind == VmKind::Libvirt {
            return QmpConnector.connect(vm);
        }
        let kept = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vm.name);
        let reused = kept.is_some();
        let conn = match kept {
            Some(c) => c,
            None => QmpVmm::connect(vm)?,
        };
        Ok(Box::new(Kept {
            conn: Some(conn),
            cfg: vm.clone(),
            idle: Arc::clone(&self.idle),
            reused,
            healthy: true,
        }))
    }

    fn start(
        &self,
        vm: &VmConfig,
        state_dir: &Path,
        vfs: &[StartVf],
    ) -> Result<(Box<dyn Vmm>, u32), Error> {
        // A new VMM: an idle connection to its predecessor is dead.
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vm.name);
        QmpConnector.start(vm, state_dir, vfs)
    }
}

/// A connection of a [`PersistentConnector`], back to it when dropped.
struct Kept {
    conn: Option<QmpVmm>,
    cfg: VmConfig,
    idle: Arc<Mutex<BTreeMap<String, QmpVmm>>>,
    /// Taken from the idle set and not used since.
    reused: bool,
    /// No transport failure so far.
    healthy: bool,
}

/// Whether `e` is a failure of the QMP transport (closed, timed out,
/// unparsable), not an error answer of the VMM.
fn transport_failure(e: &Error) -> bool {
    matches!(e, Error::Vmm { source, .. } if source.qmp().is_none())
}

impl Kept {
    fn conn(&mut self) -> &mut QmpVmm {
        self.conn
            .as_mut()
            .expect("a Kept holds its connection until dropped")
    }

    /// Runs `f`; a read-only `f` that fails on the transport of a
    /// connection just reused is asked again on a new connection.
    fn run<T>(
        &mut self,
        read_only: bool,
        mut f: impl FnMut(&mut QmpVmm) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let was_reused = std::mem::replace(&mut self.reused, false);
        let r = f(self.conn());
        let r = match r {
            Err(e) if was_reused && read_only && transport_failure(&e) => {
                tracing::info!(vm = %self.cfg.name, error = %e.chain(), "kept QMP connection is dead: connecting again");
                self.conn = Some(QmpVmm::connect(&self.cfg)?);
                f(self.conn())
            }
            r => r,
        };
        if let Err(e) = &r {
            if transport_failure(e) {
                self.healthy = false;
            }
        }
        r
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        if let Some(mut c) = self.conn.take().filter(|_| self.healthy) {
            // An answer of this operation is no answer for the next one.
            c.fresh_states = None;
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(self.cfg.name.clone(), c);
        }
    }
}

impl Vmm for Kept {
    fn devices(&mut self) -> Result<Vec<String>, Error> {
        self.run(true, QmpVmm::devices)
    }

    fn attach(
        &mut self,
        id: &str,
        host: PciAddress,
        bus: Option<&str>,
        group_fd: Option<BorrowedFd<'_>>,
    ) -> Result<Option<String>, Error> {
        self.run(false, |c| c.attach(id, host, bus, group_fd))
    }

    fn detach(&mut self, id: &str) -> Result<(), Error> {
        self.run(false, |c| c.detach(id))
    }

    fn pause(&mut self, id: &str) -> Result<SvffVfioTimings, Error> {
        self.run(false, |c| c.pause(id))
    }

    fn unpause(
        &mut self,
        id: &str,
        host: PciAddress,
        group_fd: Option<BorrowedFd<'_>>,
    ) -> Result<SvffVfioTimings, Error> {
        self.run(false, |c| c.unpause(id, host, group_fd))
    }

    fn pause_states(&mut self) -> Result<Option<Vec<SvffVfioInfo>>, Error> {
        self.run(true, QmpVmm::pause_states)
    }
}

/// Opens `/dev/vfio/<group>` for passing to VM `vm`'s device `id`.
pub fn open_group(vm: &str, id: &str, group: u32) -> Result<std::fs::File, Error> {
    let path = format!("/dev/vfio/{group}");
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| Error::VmmProcess {
            vm: vm.into(),
            action: format!("opening {path} for {id}"),
            source,
        })
}

/// A VMM reached over QMP.
#[derive(Debug)]
pub struct QmpVmm {
    vm: String,
    client: Client,
    detach_timeout: Duration,
    policy: svff_types::PausePolicy,
    stall_ms: Option<u64>,
    next_fd: u64,
    client_timeout: Duration,
    /// The VMM answered `qom-list` with `CommandNotFound` (svff-vmm): not asked again.
    no_qom: bool,
    /// The `query-svff-vfio` answer [`Vmm::devices`] just got on this
    /// connection (svff-vmm), handed to the next [`Vmm::pause_states`] if no
    /// other command came in between: one round trip less per operation.
    fresh_states: Option<Vec<SvffVfioInfo>>,
    device_props: std::collections::BTreeMap<String, String>,
}

impl QmpVmm {
    /// Connects to `vm`'s QMP socket, with its command deadline.
    pub fn connect(vm: &VmConfig) -> Result<QmpVmm, Error> {
        let client =
            Client::connect(&vm.qmp, Duration::from_secs(vm.qmp_timeout_s)).map_err(|source| {
                Error::Vmm {
                    vm: vm.name.clone(),
                    action: format!("connecting to its QMP socket {}", vm.qmp.display()),
                    source: Box::new(source),
                }
            })?;
        Ok(QmpVmm {
            vm: vm.name.clone(),
            client,
            detach_timeout: Duration::from_secs(vm.detach_timeout_s),
            policy: vm.pause_policy,
            stall_ms: vm.stall_ms,
            next_fd: 0,
            client_timeout: Duration::from_secs(vm.qmp_timeout_s),
            no_qom: false,
            fresh_states: None,
            device_props: vm.device_props.clone(),
        })
    }

    fn err(&self, action: String) -> impl FnOnce(qmp_ext::Error) -> Error + '_ {
        move |source| Error::Vmm {
            vm: self.vm.clone(),
            action,
            source: Box::new(source),
        }
    }

    fn guest_address(&mut self, id: &str) -> Option<String> {
        if let Ok(pci) = self.client.execute("query-pci", None) {
            return find_qdev(&pci, id);
        }
        // svff-vmm has no query-pci; query-svff-vfio names the guest address.
        self.pause_states()
            .ok()
            .flatten()?
            .into_iter()
            .find(|i| i.id == id)
            .map(|i| i.guest)
    }

    /// The start-up handshake of a VMM started with `--vfio ...,fd=<name>`:
    /// every group fd passed with `getfd <name>`, then `x-svff-start`, which
    /// answers once the VM is built (bounded by the start deadline).
    pub fn start_handshake(&mut self, fds: &[(String, std::fs::File)]) -> Result<(), Error> {
        for (name, f) in fds {
            self.client
                .send_fd(name, f.as_fd())
                .map_err(self.err(format!("passing the VFIO group fd of {name} (getfd)")))?;
        }
        let normal = self.client_timeout;
        let _ = self.client.set_timeout(super::supervise::START_TIMEOUT);
        let r = self
            .client
            .execute("x-svff-start", None)
            .map(drop)
            .map_err(self.err("x-svff-start (building the VM on the passed group fds)".into()));
        let _ = self.client.set_timeout(normal);
        r
    }
}

/// `device_add`'s arguments for VF `host` as device `id`: the VM's
/// `device_props` (validated by the config: never host, id, bus or fdname)
/// over the default driver `vfio-pci`.
fn device_add_args(
    props: &std::collections::BTreeMap<String, String>,
    id: &str,
    host: PciAddress,
) -> Value {
    let mut args = json!({ "driver": "vfio-pci" });
    for (k, v) in props {
        args[k.as_str()] = json!(v);
    }
    args["host"] = json!(host.to_string());
    args["id"] = json!(id);
    args
}

/// Finds device `id` in a `query-pci` answer: `0000:BB:SS.F` as the guest numbers it.
pub(super) fn find_qdev(v: &Value, id: &str) -> Option<String> {
    let buses = v.as_array()?;
    fn walk(devices: &[Value], id: &str) -> Option<String> {
        for d in devices {
            if d.get("qdev_id").and_then(Value::as_str) == Some(id) {
                return Some(format!(
                    "0000:{:02x}:{:02x}.{}",
                    d.get("bus")?.as_u64()?,
                    d.get("slot")?.as_u64()?,
                    d.get("function")?.as_u64()?
                ));
            }
            if let Some(sub) = d
                .get("pci_bridge")
                .and_then(|b| b.get("devices"))
                .and_then(Value::as_array)
            {
                if let Some(found) = walk(sub, id) {
                    return Some(found);
                }
            }
        }
        None
    }
    buses
        .iter()
        .find_map(|b| walk(b.get("devices")?.as_array()?, id))
}

impl Vmm for QmpVmm {
    fn devices(&mut self) -> Result<Vec<String>, Error> {
        self.fresh_states = None;
        if self.no_qom {
            if let Some(list) = self.pause_states()? {
                let ids = list.iter().map(|i| i.id.clone()).collect();
                self.fresh_states = Some(list);
                return Ok(ids);
            }
            self.no_qom = false;
        }
        let list = match self
            .client
            .execute("qom-list", Some(json!({ "path": "/machine/peripheral" })))
        {
            Ok(l) => l,
            // svff-vmm has no QOM: its VFIO devices are all it has.
            Err(e)
                if e.qmp()
                    .is_some_and(|q| q.class == ErrorClass::CommandNotFound) =>
            {
                self.no_qom = true;
                return match self.pause_states()? {
                    Some(list) => {
                        let ids = list.iter().map(|i| i.id.clone()).collect();
                        self.fresh_states = Some(list);
                        Ok(ids)
                    }
                    None => Err(self.err(
                        "listing its devices (neither qom-list nor query-svff-vfio)".into(),
                    )(e)),
                };
            }
            Err(e) => {
                return Err(self
                    .err("listing its devices (qom-list /machine/peripheral)".into())(
                    e,
                ))
            }
        };
        Ok(list
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| {
                        p.get("type")
                            .and_then(Value::as_str)
                            .is_some_and(|t| t.starts_with("child<"))
                    })
                    .filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn attach(
        &mut self,
        id: &str,
        host: PciAddress,
        bus: Option<&str>,
        group_fd: Option<BorrowedFd<'_>>,
    ) -> Result<Option<String>, Error> {
        self.fresh_states = None;
        let mut args = device_add_args(&self.device_props, id, host);
        if let Some(bus) = bus {
            args["bus"] = json!(bus);
        }
        if let Some(fd) = group_fd {
            self.next_fd += 1;
            let name = format!("svff-group-{}-{}", id, self.next_fd);
            self.client
                .send_fd(&name, fd)
                .map_err(self.err(format!("passing the VFIO group fd of {id} (getfd)")))?;
            args["fdname"] = json!(name);
        }
        let r = self
            .client
            .execute("device_add", Some(args))
            .map_err(self.err(format!("device_add of {id} (host {host})")))?;
        // svff-vmm answers with the guest address (bus 0).
        if let Some(g) = r.get("guest").and_then(Value::as_str) {
            return Ok(Some(format!("0000:{g}")));
        }
        Ok(self.guest_address(id))
    }

    fn detach(&mut self, id: &str) -> Result<(), Error> {
        self.fresh_states = None;
        // Events of earlier operations must not satisfy this wait.
        drop(self.client.take_events());
        self.client
            .execute("device_del", Some(json!({ "id": id })))
            .map_err(self.err(format!("device_del of {id}")))?;
        let deadline = self.detach_timeout;
        self.client
            .wait_event_where(
                "DEVICE_DELETED",
                |e| {
                    e.data
                        .as_ref()
                        .and_then(|d| d.get("device"))
                        .and_then(Value::as_str)
                        == Some(id)
                },
                deadline,
            )
            .map(drop)
            .map_err(self.err(format!(
                "waiting {} s for DEVICE_DELETED of {id} (the guest did not release it)",
                deadline.as_secs()
            )))
    }

    fn pause(&mut self, id: &str) -> Result<SvffVfioTimings, Error> {
        self.fresh_states = None;
        let cmd = SvffVfioPause {
            id: id.into(),
            policy: Some(self.policy),
            stall_ms: self.stall_ms,
        };
        self.client
            .call(&cmd)
            .map_err(self.err(format!("svff-vfio-pause of {id}")))
    }

    fn unpause(
        &mut self,
        id: &str,
        host: PciAddress,
        group_fd: Option<BorrowedFd<'_>>,
    ) -> Result<SvffVfioTimings, Error> {
        self.fresh_states = None;
        let fdname = match group_fd {
            Some(fd) => {
                self.next_fd += 1;
                let name = format!("svff-group-{}-{}", id, self.next_fd);
                self.client
                    .send_fd(&name, fd)
                    .map_err(self.err(format!("passing the VFIO group fd of {id} (getfd)")))?;
                Some(name)
            }
            None => None,
        };
        let cmd = SvffVfioUnpause {
            id: id.into(),
            host: Some(host.to_string()),
            fdname,
        };
        self.client
            .call(&cmd)
            .map_err(self.err(format!("svff-vfio-unpause of {id} onto {host}")))
    }

    fn pause_states(&mut self) -> Result<Option<Vec<SvffVfioInfo>>, Error> {
        if let Some(list) = self.fresh_states.take() {
            return Ok(Some(list));
        }
        match self.client.call(&QuerySvffVfio {}) {
            Ok(list) => Ok(Some(list)),
            Err(e)
                if e.qmp()
                    .is_some_and(|q| q.class == ErrorClass::CommandNotFound) =>
            {
                Ok(None)
            }
            Err(e) => Err(self.err("query-svff-vfio".into())(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qmp_ext::{QmpError, Server, ServerConfig, Session};
    use serde_json::Map;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An svff-vmm-like VMM: no `qom-list`; `query-svff-vfio` lists nothing;
    /// records which connection (session id) asked what.
    #[derive(Default)]
    struct Asked(Mutex<Vec<(u64, String)>>, AtomicUsize);

    struct NoQom(Arc<Asked>);

    impl qmp_ext::Handler for NoQom {
        fn execute(
            &self,
            session: &mut Session,
            command: &str,
            _args: Map<String, Value>,
        ) -> Result<Value, QmpError> {
            self.0 .1.fetch_add(1, Ordering::SeqCst);
            self.0
                 .0
                .lock()
                .unwrap()
                .push((session.id(), command.to_owned()));
            match command {
                "query-svff-vfio" => Ok(json!([])),
                _ => Err(QmpError::command_not_found(command)),
            }
        }
    }

    fn vm_config(sock: &Path) -> VmConfig {
        let text = format!(
            "allowed_uids = [0]\nstate_dir = \"/nonexistent\"\n[[vm]]\nname = \"vm0\"\nkind = \"qmp\"\nqmp = \"{}\"\nqmp_timeout_s = 5\n",
            sock.display()
        );
        crate::config::Config::parse(&text, Path::new("t.toml"))
            .unwrap()
            .vms
            .remove(0)
    }

    fn serve(sock: &Path, asked: &Arc<Asked>) -> Server {
        Server::bind(sock, ServerConfig::default(), NoQom(Arc::clone(asked))).unwrap()
    }

    #[test]
    fn persistent_connector_reuses_one_connection_and_asks_qom_list_once() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vm0.qmp");
        let asked = Arc::new(Asked::default());
        let _server = serve(&sock, &asked);
        let cfg = vm_config(&sock);
        let conns = PersistentConnector::new();
        for _ in 0..3 {
            let mut c = conns.connect(&cfg).unwrap();
            assert_eq!(c.devices().unwrap(), Vec::<String>::new());
            assert_eq!(conns.kept(), 0, "handed out, not idle");
            drop(c);
            assert_eq!(conns.kept(), 1, "back when dropped");
        }
        let log = asked.0.lock().unwrap().clone();
        let sessions: std::collections::BTreeSet<u64> = log.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            sessions.len(),
            1,
            "one connection for three operations: {log:?}"
        );
        let qom = log.iter().filter(|(_, c)| c == "qom-list").count();
        assert_eq!(qom, 1, "qom-list is not asked again once unknown: {log:?}");
    }

    #[test]
    fn pause_states_right_after_devices_reuses_its_answer_but_not_after_another_command() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vm0.qmp");
        let asked = Arc::new(Asked::default());
        let _server = serve(&sock, &asked);
        let mut c = QmpVmm::connect(&vm_config(&sock)).unwrap();
        let queries = || {
            asked
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, c)| c == "query-svff-vfio")
                .count()
        };
        c.devices().unwrap();
        assert_eq!(queries(), 1);
        assert_eq!(c.pause_states().unwrap(), Some(Vec::new()));
        assert_eq!(queries(), 1, "the answer devices() just got");
        c.pause_states().unwrap();
        assert_eq!(queries(), 2, "only once: then asked again");
        c.devices().unwrap();
        let _ = c.pause("svff-x");
        c.pause_states().unwrap();
        assert_eq!(queries(), 4, "a command in between: asked again");
    }

    #[test]
    fn persistent_connector_replaces_a_kept_connection_whose_vmm_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vm0.qmp");
        let asked = Arc::new(Asked::default());
        let server = serve(&sock, &asked);
        let cfg = vm_config(&sock);
        let conns = PersistentConnector::new();
        conns.connect(&cfg).unwrap().devices().unwrap();
        assert_eq!(conns.kept(), 1);
        drop(server);
        let again = Arc::new(Asked::default());
        let _server = serve(&sock, &again);
        let mut c = conns.connect(&cfg).unwrap();
        assert_eq!(
            c.devices().unwrap(),
            Vec::<String>::new(),
            "the dead connection is replaced and the read asked again"
        );
        assert!(again.1.load(Ordering::SeqCst) >= 1, "the new VMM answered");
        drop(c);
        assert_eq!(conns.kept(), 1, "the new connection is kept");
    }

    #[test]
    fn persistent_connector_drops_a_connection_that_failed_on_the_transport() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vm0.qmp");
        let asked = Arc::new(Asked::default());
        let server = serve(&sock, &asked);
        let cfg = vm_config(&sock);
        let conns = PersistentConnector::new();
        let mut c = conns.connect(&cfg).unwrap();
        drop(server);
        assert!(
            c.pause("svff-x").is_err(),
            "a pause on a dead VMM fails, never retried"
        );
        drop(c);
        assert_eq!(conns.kept(), 0, "a broken connection is not kept");
    }

    #[test]
    fn device_add_takes_the_vms_device_props_over_the_vfio_pci_default() {
        let host = PciAddress::parse("0000:01:10.2").unwrap();
        let plain = device_add_args(&Default::default(), "svff-x", host);
        assert_eq!(
            plain,
            json!({ "driver": "vfio-pci", "host": "0000:01:10.2", "id": "svff-x" })
        );
        let props = [("driver", "svff-vfio-pci"), ("recover", "aer-nonfatal")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            device_add_args(&props, "svff-x", host),
            json!({ "driver": "svff-vfio-pci", "recover": "aer-nonfatal",
                    "host": "0000:01:10.2", "id": "svff-x" })
        );
    }

    #[test]
    fn guest_addresses_are_found_behind_bridges() {
        let pci = json!([{ "bus": 0, "devices": [
            { "bus": 0, "slot": 1, "function": 0, "qdev_id": "" },
            { "bus": 0, "slot": 2, "function": 0, "qdev_id": "rp0",
              "pci_bridge": { "bus": { "number": 1 }, "devices": [
                { "bus": 1, "slot": 0, "function": 0, "qdev_id": "svff-x" } ] } } ] }]);
        assert_eq!(find_qdev(&pci, "svff-x").as_deref(), Some("0000:01:00.0"));
        assert_eq!(find_qdev(&pci, "rp0").as_deref(), Some("0000:00:02.0"));
        assert_eq!(find_qdev(&pci, "nope"), None);
    }
}

#[cfg(all(test, not(feature = "libvirt")))]
mod no_libvirt_tests {
    use super::*;

    #[test]
    fn a_libvirt_vm_without_the_feature_is_refused_before_anything_is_contacted() {
        let text = "socket = \"/run/x.sock\"\nallowed_uids = [0]\nstate_dir = \"/var/lib/x\"\n\
                    [[vm]]\nname = \"vm1\"\nkind = \"libvirt\"\nlibvirt = { domain = \"g\" }\n";
        let cfg = crate::config::Config::parse(text, Path::new("/etc/svff/helper.toml")).unwrap();
        for e in [
            QmpConnector.connect(&cfg.vms[0]).err().unwrap(),
            PersistentConnector::new()
                .connect(&cfg.vms[0])
                .err()
                .unwrap(),
        ] {
            assert_eq!(e.kind(), "not_supported");
            assert!(e.to_string().contains("--features libvirt"), "{e}");
        }
    }
}
