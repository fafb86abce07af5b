//! VMs of kind `libvirt`: a libvirt domain whose VFs svff attaches as
//! `<hostdev mode='subsystem' type='pci' managed='no'>` (svff owns the
//! vfio-pci binding) and pauses through libvirt's QEMU monitor passthrough.
//!
//! - **Device ids.** libvirt only accepts user aliases `ua-[A-Za-z0-9_-]+`,
//!   so svff's device id `svff-0000-02-00.0-vf0` is the hostdev alias (and
//!   QEMU device id) `ua-svff-0000-02-00_0-vf0` (svff's ids hold no `_`).
//! - **attach / detach** (init, detach mode): `virDomainAttachDeviceFlags` /
//!   `virDomainDetachDeviceFlags` with `VIR_DOMAIN_AFFECT_LIVE` (domain
//!   running and `live`) and/or `VIR_DOMAIN_AFFECT_CONFIG` (`persistent`).
//!   A live detach waits for libvirt's `DEVICE_REMOVED` event of the alias
//!   (registered before the detach; libvirt's own wait for QEMU's
//!   `DEVICE_DELETED` is 5 s, after which the call returns with the removal
//!   still pending), bounded by the VM's `detach_timeout_s`.
//! - **pause / unpause** (pause mode): the svff QMP commands sent with
//!   `virDomainQemuMonitorCommandWithFiles` (libvirt >= 8.2). QEMU under
//!   libvirt runs in its own mount namespace with a `/dev` that holds only
//!   the nodes libvirt put there, so it cannot open the `/dev/vfio/<group>`
//!   of a re-created VF: every unpause passes the VFIO *group* fd svff
//!   opened (`getfd` with the fd attached, then `svff-vfio-unpause` with
//!   `fdname`). Using the passthrough marks the domain tainted
//!   (`custom-monitor`, in the domain log and `virsh dominfo`'s security
//!   label: libvirt no longer vouches for QEMU's state).
//! - **The persistent config** follows the host address: after an unpause
//!   onto another VF the domain is re-defined with its inactive XML in which
//!   only that hostdev's source address changed ([`with_host`]), so a
//!   restarted domain gets the right VF and the hostdev keeps everything else. The live XML keeps the old
//!   source address (libvirt has no call to change a live hostdev).
//!
//! Only a device QEMU created as `svff-vfio-pci` can pause: libvirt creates
//! hostdevs as `vfio-pci`, except at domain start where a
//! `<qemu:override>` of the alias's `driver` applies (see the README). A
//! live hot-plug (init into a running domain, detach-mode re-attach) is a
//! plain `vfio-pci`: detach mode works on it, a pause is refused by QEMU
//! (the documented rollback) until the domain is restarted.

use std::collections::BTreeSet;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Once;
use std::time::{Duration, Instant};

use qmp_ext::svff::{QuerySvffVfio, SvffVfioInfo, SvffVfioPause, SvffVfioTimings, SvffVfioUnpause};
use qmp_ext::QmpCommand;
use serde_json::{json, Value};
use virt::connect::Connect;
use virt::domain::Domain;
use virt_sys as sys;

use super::vmm::Vmm;
use crate::config::{LibvirtTarget, VmConfig};
use crate::error::Error;
use crate::pci::PciAddress;

/// The hostdev alias (= QEMU device id) of svff device `id`.
pub fn alias_of(id: &str) -> String {
    format!("ua-{}", id.replace('.', "_"))
}

/// The svff device id of hostdev alias `alias`, if it is one of svff's.
pub fn id_of(alias: &str) -> Option<String> {
    let rest = alias.strip_prefix("ua-")?;
    rest.starts_with("svff-").then(|| rest.replace('_', "."))
}

/// The `<hostdev>` element for VF `host` under `alias`.
pub fn hostdev_xml(host: PciAddress, alias: &str) -> String {
    format!(
        "<hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x{:04x}' \
         bus='0x{:02x}' slot='0x{:02x}' function='0x{:x}'/></source><alias name='{alias}'/></hostdev>",
        host.domain(),
        host.bus(),
        host.device(),
        host.function()
    )
}

/// The svff hostdevs of a domain XML: (alias, host address) in document order.
pub fn hostdevs(xml: &str) -> Vec<(String, Option<PciAddress>)> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<hostdev ") {
        let after = &rest[start..];
        let end = after.find("</hostdev>").map_or(after.len(), |e| e + 10);
        let dev = &after[..end];
        rest = &after[end..];
        let Some(alias) = attr_after(dev, "<alias ", "name") else {
            continue;
        };
        if id_of(&alias).is_none() {
            continue;
        }
        let host = dev.find("<source").and_then(|s| {
            let src = &dev[s..];
            let num = |k: &str| {
                let v = attr_after(src, "<address ", k)?;
                u32::from_str_radix(v.trim_start_matches("0x"), 16).ok()
            };
            let text = format!(
                "{:04x}:{:02x}:{:02x}.{:x}",
                num("domain")?,
                num("bus")?,
                num("slot")?,
                num("function")?
            );
            text.parse().ok()
        });
        out.push((alias, host));
    }
    out
}

/// `xml` (a domain XML) with the `<source><address .../>` of svff hostdev
/// `alias` replaced by `host`'s, everything else byte for byte as it was;
/// `None` when no hostdev has that alias or it already names `host`.
pub fn with_host(xml: &str, alias: &str, host: PciAddress) -> Option<String> {
    let mut at = 0;
    while let Some(start) = xml[at..].find("<hostdev ").map(|s| s + at) {
        let end = xml[start..]
            .find("</hostdev>")
            .map_or(xml.len(), |e| start + e + 10);
        let dev = &xml[start..end];
        at = end;
        if attr_after(dev, "<alias ", "name").as_deref() != Some(alias) {
            continue;
        }
        let (_, old) = hostdevs(dev).into_iter().next()?;
        if old == Some(host) {
            return None;
        }
        let src = start + dev.find("<source")?;
        let src_end = src + xml[src..].find("</source>")?;
        let addr = src + xml[src..src_end].find("<address ")?;
        let addr_end = addr + xml[addr..src_end].find("/>")? + 2;
        let new = format!(
            "<address domain='0x{:04x}' bus='0x{:02x}' slot='0x{:02x}' function='0x{:x}'/>",
            host.domain(),
            host.bus(),
            host.device(),
            host.function()
        );
        return Some(format!("{}{new}{}", &xml[..addr], &xml[addr_end..]));
    }
    None
}

/// The value of attribute `name` of the first element starting with `elem` in `xml`.
fn attr_after(xml: &str, elem: &str, name: &str) -> Option<String> {
    let e = xml.find(elem)?;
    let tag = &xml[e..];
    let tag = &tag[..tag.find('>')?];
    for q in ['\'', '"'] {
        let pat = format!(" {name}={q}");
        if let Some(p) = tag.find(&pat) {
            let v = &tag[p + pat.len()..];
            return Some(v[..v.find(q)?].to_owned());
        }
    }
    None
}

/// Starts libvirt's default event loop in a thread, once per process: the
/// `DEVICE_REMOVED` callbacks run there. Must precede the first connection.
fn event_loop() -> Result<(), String> {
    static START: Once = Once::new();
    static FAILED: AtomicBool = AtomicBool::new(false);
    START.call_once(|| {
        // SAFETY: no connection is open yet (every connection is opened
        // after this Once); the call takes no arguments.
        if unsafe { sys::virEventRegisterDefaultImpl() } < 0 {
            FAILED.store(true, Ordering::SeqCst);
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                // SAFETY: the default implementation was registered above.
                if unsafe { sys::virEventRunDefaultImpl() } < 0 {
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        if spawned.is_err() {
            FAILED.store(true, Ordering::SeqCst);
        }
    });
    if FAILED.load(Ordering::SeqCst) {
        Err("libvirt's event loop could not be started".into())
    } else {
        Ok(())
    }
}

/// libvirt's last error as text with its code.
fn last_error() -> String {
    virt::error::Error::last_error().to_string()
}

/// A domain reached through libvirt.
#[derive(Debug)]
pub struct LibvirtVmm {
    vm: String,
    target: LibvirtTarget,
    conn: Connect,
    dom: Domain,
    detach_timeout: Duration,
    policy: svff_types::PausePolicy,
    stall_ms: Option<u64>,
    next_fd: u64,
}

impl Drop for LibvirtVmm {
    fn drop(&mut self) {
        let _ = self.dom.free();
        let _ = self.conn.close();
    }
}

impl LibvirtVmm {
    /// Connects to `vm`'s libvirt and looks its domain up.
    pub fn connect(vm: &VmConfig) -> Result<LibvirtVmm, Error> {
        let target = vm.libvirt.clone().ok_or_else(|| Error::VmmUnsupported {
            vm: vm.name.clone(),
            reason: "no libvirt = { domain = ... } in its config".into(),
        })?;
        let err = |action: String, detail: String| Error::Libvirt {
            vm: vm.name.clone(),
            action,
            detail,
        };
        // svff reports libvirt errors itself (Error::Libvirt), not on stderr.
        virt::error::clear_error_callback();
        event_loop().map_err(|d| err("starting libvirt's event loop".into(), d))?;
        let conn = Connect::open(Some(&target.uri)).map_err(|e| {
            err(
                format!(
                    "connecting to libvirt at {} (is libvirtd running?)",
                    target.uri
                ),
                e.to_string(),
            )
        })?;
        let dom = match Domain::lookup_by_name(&conn, &target.domain) {
            Ok(d) => d,
            Err(e) => {
                let mut conn = conn;
                let _ = conn.close();
                return Err(err(
                    format!("looking up domain {:?} at {}", target.domain, target.uri),
                    e.to_string(),
                ));
            }
        };
        Ok(LibvirtVmm {
            vm: vm.name.clone(),
            target,
            conn,
            dom,
            detach_timeout: Duration::from_secs(vm.detach_timeout_s),
            policy: vm.pause_policy,
            stall_ms: vm.stall_ms,
            next_fd: 0,
        })
    }

    fn err(&self, action: String, detail: String) -> Error {
        Error::Libvirt {
            vm: self.vm.clone(),
            action,
            detail,
        }
    }

    fn active(&self) -> Result<bool, Error> {
        self.dom.is_active().map_err(|e| {
            self.err(
                format!("asking whether domain {} runs", self.target.domain),
                e.to_string(),
            )
        })
    }

    /// Fails unless the domain runs (pause, unpause and QMP need QEMU).
    fn require_running(&self, what: &str) -> Result<(), Error> {
        if self.active()? {
            Ok(())
        } else {
            Err(self.err(
                what.into(),
                format!("domain {} is not running", self.target.domain),
            ))
        }
    }

    fn xml(&self, inactive: bool) -> Result<String, Error> {
        let flags = if inactive {
            sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        self.dom.get_xml_desc(flags).map_err(|e| {
            self.err(
                format!("reading the XML of domain {}", self.target.domain),
                e.to_string(),
            )
        })
    }

    /// `AFFECT_*` flags for a device change: live when the domain runs and
    /// `live` is set, config when `persistent` is set.
    fn affect(&self) -> Result<c_uint, Error> {
        let mut f = 0;
        if self.target.live && self.active()? {
            f |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        if self.target.persistent {
            f |= sys::VIR_DOMAIN_AFFECT_CONFIG;
        }
        if f == 0 {
            return Err(self.err(
                "changing a device".into(),
                format!(
                    "domain {} is not running and persistent = false: nothing to change",
                    self.target.domain
                ),
            ));
        }
        Ok(f)
    }

    /// Sends one QMP command through libvirt's monitor passthrough, with
    /// `fds` attached (`virDomainQemuMonitorCommandWithFiles`), and returns
    /// its `return` value.
    fn qmp(
        &self,
        execute: &str,
        args: Option<Value>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Value, Error> {
        let mut cmd = json!({ "execute": execute });
        if let Some(a) = args {
            cmd["arguments"] = a;
        }
        let text = cmd.to_string();
        let c =
            CString::new(text).map_err(|_| self.err(execute.into(), "NUL in command".into()))?;
        let mut infiles: Vec<c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut result: *mut c_char = std::ptr::null_mut();
        let mut nout: c_uint = 0;
        let mut outfiles: *mut c_int = std::ptr::null_mut();
        // SAFETY: `self.dom` is a live domain handle; `c` is NUL-terminated
        // and outlives the call; `infiles` holds `fds.len()` fds borrowed for
        // the call (libvirt sends them, it does not take ownership);
        // `result`, `nout`, `outfiles` are valid out-pointers; flags 0.
        let r = unsafe {
            sys::virDomainQemuMonitorCommandWithFiles(
                self.dom.as_ptr(),
                c.as_ptr(),
                infiles.len() as c_uint,
                if infiles.is_empty() {
                    std::ptr::null_mut()
                } else {
                    infiles.as_mut_ptr()
                },
                &mut nout,
                &mut outfiles,
                &mut result,
                0,
            )
        };
        if !outfiles.is_null() {
            for i in 0..nout as usize {
                // SAFETY: libvirt returned `nout` fds in `outfiles`, now ours.
                unsafe { libc::close(*outfiles.add(i)) };
            }
            // SAFETY: allocated by libvirt with malloc; freed once.
            unsafe { libc::free(outfiles.cast::<c_void>()) };
        }
        if r < 0 {
            return Err(self.err(
                format!("{execute} through libvirt's monitor passthrough"),
                last_error(),
            ));
        }
        let reply = if result.is_null() {
            String::new()
        } else {
            // SAFETY: libvirt returned a NUL-terminated string it allocated.
            let s = unsafe { CStr::from_ptr(result) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: allocated by libvirt with malloc; freed once.
            unsafe { libc::free(result.cast::<c_void>()) };
            s
        };
        let v: Value = serde_json::from_str(&reply)
            .map_err(|e| self.err(format!("{execute}: reply {reply:?}"), e.to_string()))?;
        if let Some(e) = v.get("error") {
            return Err(self.err(
                format!("{execute} (QEMU under libvirt)"),
                format!(
                    "{}: {}",
                    e.get("class").and_then(Value::as_str).unwrap_or("?"),
                    e.get("desc").and_then(Value::as_str).unwrap_or("?")
                ),
            ));
        }
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }

    fn call<C: QmpCommand>(&self, cmd: &C, fds: &[BorrowedFd<'_>]) -> Result<C::Returns, Error> {
        let args =
            serde_json::to_value(cmd).map_err(|e| self.err(C::NAME.into(), e.to_string()))?;
        let args = match args {
            Value::Object(m) if m.is_empty() => None,
            other => Some(other),
        };
        let ret = self.qmp(C::NAME, args, fds)?;
        serde_json::from_value(ret)
            .map_err(|e| self.err(format!("{}: its answer", C::NAME), e.to_string()))
    }

    /// Removes `alias` with `flags`; for a live removal waits for
    /// `DEVICE_REMOVED` of the alias (or its absence from the live XML).
    fn detach_alias(&mut self, alias: &str, host: PciAddress, flags: c_uint) -> Result<(), Error> {
        let xml = hostdev_xml(host, alias);
        let live = flags & sys::VIR_DOMAIN_AFFECT_LIVE != 0;
        let waiter = if live {
            Some(RemovedWaiter::register(self)?)
        } else {
            None
        };
        self.dom.detach_device_flags(&xml, flags).map_err(|e| {
            self.err(
                format!(
                    "detaching {alias} (host {host}) from domain {}",
                    self.target.domain
                ),
                e.to_string(),
            )
        })?;
        let Some(w) = waiter else { return Ok(()) };
        let end = Instant::now() + self.detach_timeout;
        let mut seen = BTreeSet::new();
        loop {
            if !hostdevs(&self.xml(false)?).iter().any(|(a, _)| a == alias) {
                return Ok(());
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.err(
                    format!(
                        "waiting {} s for DEVICE_REMOVED of {alias}",
                        self.detach_timeout.as_secs()
                    ),
                    "the guest did not release the device".into(),
                ));
            }
            match w.rx.recv_timeout(left) {
                Ok(a) if a == alias => return Ok(()),
                Ok(a) => {
                    seen.insert(a);
                }
                Err(_) => continue,
            }
        }
    }

    /// The host address of `alias` in the live or inactive XML.
    fn host_of(&self, alias: &str, inactive: bool) -> Result<Option<PciAddress>, Error> {
        Ok(hostdevs(&self.xml(inactive)?)
            .into_iter()
            .find(|(a, _)| a == alias)
            .and_then(|(_, h)| h))
    }
}

impl LibvirtVmm {
    /// Points the persistent hostdev `alias` at `host`: the inactive XML
    /// (with its secure parts, so a re-define loses nothing) redefined with
    /// only that hostdev's source address changed ([`with_host`]), in one
    /// `virDomainDefineXML`: the hostdev keeps its guest address, ROM and
    /// other settings, and is never missing from the config half-way. Does
    /// nothing when the config already names `host` or lacks the hostdev.
    fn persist_host(&self, alias: &str, host: PciAddress) -> Result<(), Error> {
        let flags = sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE;
        let xml = self.dom.get_xml_desc(flags).map_err(|e| {
            self.err(
                format!(
                    "reading the persistent XML of domain {}",
                    self.target.domain
                ),
                e.to_string(),
            )
        })?;
        let Some(new) = with_host(&xml, alias, host) else {
            return Ok(());
        };
        Domain::define_xml(&self.conn, &new).map(drop).map_err(|e| {
            self.err(
                format!(
                    "updating the persistent hostdev {alias} of domain {} to {host}",
                    self.target.domain
                ),
                e.to_string(),
            )
        })
    }
}

/// A `DEVICE_REMOVED` callback registration; deregistered on drop.
struct RemovedWaiter {
    conn: sys::virConnectPtr,
    id: c_int,
    rx: mpsc::Receiver<String>,
}

unsafe extern "C" fn removed_cb(
    _conn: sys::virConnectPtr,
    _dom: sys::virDomainPtr,
    alias: *const c_char,
    opaque: *mut c_void,
) {
    if alias.is_null() || opaque.is_null() {
        return;
    }
    // SAFETY: `opaque` is the Box<Sender> leaked in `register`, freed only
    // by `free_cb` after the callback is deregistered; `alias` is a
    // NUL-terminated string valid for this call.
    let (tx, a) = unsafe {
        (
            &*(opaque as *const mpsc::Sender<String>),
            CStr::from_ptr(alias).to_string_lossy().into_owned(),
        )
    };
    let _ = tx.send(a);
}

unsafe extern "C" fn free_cb(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: `opaque` came from Box::into_raw in `register`; libvirt
        // calls this once, after the last callback.
        drop(unsafe { Box::from_raw(opaque as *mut mpsc::Sender<String>) });
    }
}

impl RemovedWaiter {
    fn register(v: &LibvirtVmm) -> Result<RemovedWaiter, Error> {
        let (tx, rx) = mpsc::channel::<String>();
        let opaque = Box::into_raw(Box::new(tx)).cast::<c_void>();
        // SAFETY: the callback has the DEVICE_REMOVED signature libvirt
        // calls for this event id (libvirt's VIR_DOMAIN_EVENT_CALLBACK
        // cast); `opaque` stays valid until `free_cb`.
        let cb: sys::virConnectDomainEventGenericCallback = Some(unsafe {
            std::mem::transmute::<
                unsafe extern "C" fn(
                    sys::virConnectPtr,
                    sys::virDomainPtr,
                    *const c_char,
                    *mut c_void,
                ),
                unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
            >(removed_cb)
        });
        // SAFETY: the connection and domain handles are live; the callback,
        // opaque pointer and free function are valid as said above.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                v.conn.as_ptr(),
                v.dom.as_ptr(),
                sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED as c_int,
                cb,
                opaque,
                Some(free_cb),
            )
        };
        if id < 0 {
            // SAFETY: registration failed, so libvirt did not keep `opaque`.
            unsafe { free_cb(opaque) };
            return Err(v.err(
                format!(
                    "registering for DEVICE_REMOVED of domain {}",
                    v.target.domain
                ),
                last_error(),
            ));
        }
        Ok(RemovedWaiter {
            conn: v.conn.as_ptr(),
            id,
            rx,
        })
    }
}

impl Drop for RemovedWaiter {
    fn drop(&mut self) {
        // SAFETY: `conn` is the live connection the callback was registered
        // on (the LibvirtVmm that owns it outlives this waiter); `id` is the
        // registration's id.
        unsafe { sys::virConnectDomainEventDeregisterAny(self.conn, self.id) };
    }
}

impl Vmm for LibvirtVmm {
    fn devices(&mut self) -> Result<Vec<String>, Error> {
        let active = self.active()?;
        Ok(hostdevs(&self.xml(!active)?)
            .into_iter()
            .filter_map(|(a, _)| id_of(&a))
            .collect())
    }

    fn attach(
        &mut self,
        id: &str,
        host: PciAddress,
        _bus: Option<&str>,
        _group_fd: Option<BorrowedFd<'_>>,
    ) -> Result<Option<String>, Error> {
        // libvirt opens /dev/vfio/<group> itself for a hostdev and puts it
        // in QEMU's namespace: the group fd is not needed here.
        let alias = alias_of(id);
        let flags = self.affect()?;
        self.dom
            .attach_device_flags(&hostdev_xml(host, &alias), flags)
            .map_err(|e| {
                self.err(
                    format!(
                        "attaching {alias} (host {host}) to domain {}",
                        self.target.domain
                    ),
                    e.to_string(),
                )
            })?;
        if flags & sys::VIR_DOMAIN_AFFECT_LIVE == 0 {
            return Ok(None);
        }
        Ok(self
            .qmp("query-pci", None, &[])
            .ok()
            .and_then(|pci| super::vmm::find_qdev(&pci, &alias)))
    }

    fn detach(&mut self, id: &str) -> Result<(), Error> {
        let alias = alias_of(id);
        let flags = self.affect()?;
        let live = flags & sys::VIR_DOMAIN_AFFECT_LIVE != 0;
        let host = match self.host_of(&alias, !live)? {
            Some(h) => h,
            None => self.host_of(&alias, true)?.ok_or_else(|| {
                self.err(
                    format!("detaching {alias}"),
                    format!("domain {} has no hostdev {alias}", self.target.domain),
                )
            })?,
        };
        // The persistent config may lack it (attached live only): only what has it.
        let mut flags = flags;
        if flags & sys::VIR_DOMAIN_AFFECT_CONFIG != 0 && self.host_of(&alias, true)?.is_none() {
            flags &= !sys::VIR_DOMAIN_AFFECT_CONFIG;
        }
        if live && self.host_of(&alias, false)?.is_none() {
            flags &= !sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        if flags == 0 {
            return Ok(());
        }
        self.detach_alias(&alias, host, flags)
    }

    fn pause(&mut self, id: &str) -> Result<SvffVfioTimings, Error> {
        let alias = alias_of(id);
        self.require_running(&format!("svff-vfio-pause of {alias}"))?;
        let cmd = SvffVfioPause {
            id: alias,
            policy: Some(self.policy),
            stall_ms: self.stall_ms,
        };
        self.call(&cmd, &[])
    }

    fn unpause(
        &mut self,
        id: &str,
        host: PciAddress,
        group_fd: Option<BorrowedFd<'_>>,
    ) -> Result<SvffVfioTimings, Error> {
        let alias = alias_of(id);
        self.require_running(&format!("svff-vfio-unpause of {alias}"))?;
        let fdname = match group_fd {
            Some(fd) => {
                self.next_fd += 1;
                let name = format!("svff-group-{alias}-{}", self.next_fd);
                self.qmp("getfd", Some(json!({ "fdname": name })), &[fd])?;
                Some(name)
            }
            None => None,
        };
        let cmd = SvffVfioUnpause {
            id: alias.clone(),
            host: Some(host.to_string()),
            fdname,
        };
        let t = self.call(&cmd, &[])?;
        // The persistent config follows the host address.
        if self.target.persistent {
            self.persist_host(&alias, host)?;
        }
        Ok(t)
    }

    fn pause_states(&mut self) -> Result<Option<Vec<SvffVfioInfo>>, Error> {
        if !self.active()? {
            return Ok(None);
        }
        match self.call(&QuerySvffVfio {}, &[]) {
            Ok(list) => Ok(Some(
                list.into_iter()
                    .filter_map(|mut i: SvffVfioInfo| {
                        i.id = id_of(&i.id)?;
                        Some(i)
                    })
                    .collect(),
            )),
            Err(Error::Libvirt { detail, .. }) if detail.starts_with("CommandNotFound") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svff_ids_map_to_libvirt_user_aliases_and_back() {
        let id = "svff-0000-02-00.0-vf12";
        let a = alias_of(id);
        assert_eq!(a, "ua-svff-0000-02-00_0-vf12");
        assert!(a[3..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
        assert_eq!(id_of(&a).as_deref(), Some(id));
        assert_eq!(id_of("ua-mine"), None);
        assert_eq!(id_of("hostdev0"), None);
    }

    #[test]
    fn hostdevs_are_read_from_libvirt_xml_with_their_source_address() {
        let host: PciAddress = "0000:02:00.3".parse().unwrap();
        let xml = format!(
            "<domain><devices><hostdev mode='subsystem' type='pci' managed='yes'><source>\
             <address domain='0x0000' bus='0x05' slot='0x00' function='0x0'/></source>\
             <alias name='hostdev0'/></hostdev>{}\n<hostdev mode='subsystem' type='pci'>\
             <driver name='vfio'/><source><address domain='0x0000' bus='0x02' slot='0x00' \
             function='0x4'/></source><alias name='ua-svff-0000-02-00_0-vf1'/>\
             <address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/>\
             </hostdev></devices></domain>",
            hostdev_xml(host, "ua-svff-0000-02-00_0-vf0")
        );
        let found = hostdevs(&xml);
        assert_eq!(
            found,
            vec![
                ("ua-svff-0000-02-00_0-vf0".to_owned(), Some(host)),
                (
                    "ua-svff-0000-02-00_0-vf1".to_owned(),
                    Some("0000:02:00.4".parse().unwrap())
                ),
            ]
        );
    }
}

#[cfg(test)]
mod persist_tests {
    use super::*;

    /// A domain's inactive XML as libvirt 9.0 writes it: one svff hostdev
    /// with a guest address and a ROM setting, one foreign hostdev.
    fn inactive(host_fn: u8) -> String {
        format!(
            "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n  \
             <name>g</name>\n  <devices>\n    \
             <hostdev mode='subsystem' type='pci' managed='yes'>\n      <source>\n        \
             <address domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>\n      </source>\n      \
             <address type='pci' domain='0x0000' bus='0x06' slot='0x00' function='0x0'/>\n    \
             </hostdev>\n    \
             <hostdev mode='subsystem' type='pci' managed='no'>\n      <source>\n        \
             <address domain='0x0000' bus='0x01' slot='0x00' function='0x{host_fn:x}'/>\n      \
             </source>\n      <alias name='ua-svff-0000-01-00_0-vf0'/>\n      <rom bar='off'/>\n      \
             <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>\n    \
             </hostdev>\n  </devices>\n  <qemu:override>\n    \
             <qemu:device alias='ua-svff-0000-01-00_0-vf0'/>\n  </qemu:override>\n</domain>\n"
        )
    }

    #[test]
    fn persistent_xml_rewrite_changes_only_the_source_address_of_that_hostdev() {
        let alias = "ua-svff-0000-01-00_0-vf0";
        let new: PciAddress = "0000:01:00.5".parse().unwrap();
        let out = with_host(&inactive(2), alias, new).expect("a change");
        assert_eq!(out, inactive(5), "only the source function changed");
        assert_eq!(
            hostdevs(&out),
            vec![(alias.to_owned(), Some(new))],
            "the svff hostdev names the new VF"
        );
        assert!(out.contains("bus='0x02' slot='0x00' function='0x0'/>\n    </hostdev>"));
    }

    #[test]
    fn persistent_xml_rewrite_is_none_when_unchanged_or_the_alias_is_absent() {
        let host: PciAddress = "0000:01:00.2".parse().unwrap();
        assert_eq!(
            with_host(&inactive(2), "ua-svff-0000-01-00_0-vf0", host),
            None
        );
        assert_eq!(
            with_host(&inactive(2), "ua-svff-0000-01-00_0-vf9", host),
            None
        );
        // The foreign hostdev (no svff alias) is never touched.
        assert_eq!(with_host(&inactive(2), "hostdev0", host), None);
    }
}

#[cfg(test)]
mod connect_tests {
    use super::*;
    use crate::config::VmKind;

    fn vm(uri: &str) -> VmConfig {
        VmConfig {
            name: "vm1".into(),
            kind: VmKind::Libvirt,
            qmp: Default::default(),
            libvirt: Some(LibvirtTarget {
                domain: "guest1".into(),
                uri: uri.into(),
                live: true,
                persistent: true,
            }),
            hotplug_ports: vec![],
            device_props: Default::default(),
            pause_policy: svff_types::PausePolicy::Ignore,
            stall_ms: None,
            pass_group_fd: true,
            qmp_timeout_s: 10,
            detach_timeout_s: 30,
            command: vec![],
            run_as: None,
            vfs: vec![],
        }
    }

    #[test]
    fn a_libvirtd_that_is_not_running_is_an_error_naming_the_vm_and_uri() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!(
            "qemu+unix:///system?socket={}/libvirt-sock",
            dir.path().display()
        );
        let e = LibvirtVmm::connect(&vm(&uri)).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::Libvirt { .. }), "{text}");
        assert!(
            text.starts_with("VM vm1: connecting to libvirt at"),
            "{text}"
        );
        assert!(
            text.contains(&uri) && text.contains("is libvirtd running"),
            "{text}"
        );
        assert_eq!(e.kind(), "vmm");
    }
}
