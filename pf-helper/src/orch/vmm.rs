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

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
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
                return match self.pause_states()? {
                    Some(list) => Ok(list.into_iter().map(|i| i.id).collect()),
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
        let mut args = json!({ "driver": "vfio-pci", "host": host.to_string(), "id": id });
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
        let e = QmpConnector.connect(&cfg.vms[0]).err().unwrap();
        assert_eq!(e.kind(), "not_supported");
        assert!(e.to_string().contains("--features libvirt"), "{e}");
    }
}
