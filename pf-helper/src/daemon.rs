//! The helper daemon: a unix socket speaking the JSON-line protocol, peers
//! checked with `SO_PEERCRED`, PFs limited to the config's allow-list.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tracing::{error, info, info_span, warn};

use crate::config::Config;
use crate::error::Error;
use crate::orch::vmm::{Connector, QmpConnector};
use crate::orch::Orchestrator;
use crate::pci::PciAddress;
use crate::protocol::{Request, Response, MAX_LINE};
use crate::sriov::{SriovManager, VfsSetOptions};
use crate::sysfs::Sysfs;

/// Most connections served at once. When all are taken, the one that has
/// waited longest for a request line is closed to make room.
const MAX_CONNECTIONS: usize = 32;
/// A client that sends nothing for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `status` waits for a change that is stuck on one of its PFs to
/// return before answering `busy` (the PF's attributes would block a reader).
const STUCK_STATUS_WAIT: Duration = Duration::from_secs(2);
/// Once its first byte arrived, a whole request line must arrive within this.
const LINE_DEADLINE: Duration = Duration::from_secs(10);

/// The daemon's state: its config and the sysfs it manages.
#[derive(Debug)]
pub struct Daemon<S: Sysfs> {
    config: Config,
    mgr: SriovManager<S>,
    /// How VMMs are reached (QMP; a double in tests).
    vmms: Box<dyn Connector>,
    /// The change being carried out (at most one at a time), if any.
    running: Mutex<Option<Running>>,
    /// Signalled when `running` ends or is declared stuck.
    running_changed: Condvar,
    next_change: AtomicU64,
    /// The connections being served, by slot id.
    slots: Mutex<BTreeMap<u64, Slot>>,
    next_slot: AtomicU64,
}

/// A change (vfs_set, program) being carried out by a worker thread.
#[derive(Debug, Clone)]
struct Running {
    id: u64,
    pf: PciAddress,
    what: String,
    since: Instant,
    /// Its watchdog fired: a kernel call is blocked.
    stuck: bool,
}

impl Running {
    fn busy(&self) -> Error {
        Error::ChangeRunning {
            pf: self.pf,
            what: self.what.clone(),
            secs: self.since.elapsed().as_secs_f64(),
            stuck: self.stuck,
        }
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, Error> {
    serde_json::to_value(v).map_err(|e| Error::Internal(format!("cannot encode the result: {e}")))
}

impl<S: Sysfs + 'static> Daemon<S> {
    /// A daemon doing `mgr`'s operations under `config`.
    pub fn new(config: Config, mgr: SriovManager<S>) -> Self {
        Daemon {
            config,
            mgr,
            vmms: Box::new(QmpConnector),
            running: Mutex::new(None),
            running_changed: Condvar::new(),
            next_change: AtomicU64::new(0),
            slots: Mutex::new(BTreeMap::new()),
            next_slot: AtomicU64::new(0),
        }
    }

    /// Reaches VMMs through `vmms` instead of QMP sockets (tests).
    pub fn with_connector(mut self, vmms: Box<dyn Connector>) -> Self {
        self.vmms = vmms;
        self
    }

    fn orchestrator(&self) -> Result<Orchestrator<'_, S>, Error> {
        Orchestrator::new(&self.config, &self.mgr, self.vmms.as_ref())
    }

    /// The watchdog of an orchestration change: the daemon's plus every
    /// VM's deadlines (a detach and a command per VF it may hold).
    fn orch_watchdog(&self) -> Duration {
        let per_vm: u64 = self
            .config
            .vms
            .iter()
            .map(|v| (v.detach_timeout_s + 2 * v.qmp_timeout_s) * 8)
            .sum();
        self.config.watchdog() * 2 + Duration::from_secs(per_vm)
    }

    /// Finishes an operation the journal shows as interrupted (run at
    /// start-up, before serving); `Ok(None)` when there is none.
    pub fn recover_at_start(&self) -> Result<Option<crate::orch::OpReport>, Error> {
        let orch = self.orchestrator()?;
        if crate::orch::journal::pending(orch.state())?.is_none() {
            return Ok(None);
        }
        orch.recover().map(Some)
    }

    fn allowed_pf(&self, pf: PciAddress) -> Result<&crate::config::PfConfig, Error> {
        self.config.pf(pf).ok_or(Error::PfNotAllowed { pf })
    }

    /// Carries out one request from an already authenticated peer. `ping`
    /// needs no lock; `status` waits for a change running on one of its PFs
    /// (whose attributes the kernel locks meanwhile) until it ends or is
    /// declared stuck, then answers `busy`; changes run one at a time on a
    /// worker thread under a watchdog (`watchdog_s` of the config).
    pub fn handle(self: &Arc<Self>, req: &Request) -> Response {
        let result = match req {
            Request::Ping {} => Ok(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") })),
            Request::Status { pf } => {
                let list: Result<Vec<PciAddress>, Error> = match pf {
                    Some(pf) => self.allowed_pf(*pf).map(|_| vec![*pf]),
                    None => Ok(self.config.pfs.iter().map(|p| p.bdf).collect()),
                };
                list.and_then(|l| {
                    self.wait_for_changes_on(&l)?;
                    let mut status = self.mgr.status(Some(&l))?;
                    if !self.config.vms.is_empty() {
                        let orch = self.orchestrator()?;
                        status.assignments = orch.status_assignments(&l)?;
                        status.vms = orch.vm_status();
                        crate::status::fill_holders(&mut status);
                    }
                    Ok(status)
                })
                .and_then(|s| to_value(&s))
            }
            Request::VfsSet {
                pf,
                count,
                bind,
                resources,
            } => self.allowed_pf(*pf).and_then(|pfc| {
                if let Some(driver) = bind {
                    if !self.config.vf_drivers.contains(driver) {
                        return Err(Error::DriverNotAllowed {
                            driver: driver.clone(),
                        });
                    }
                }
                let opts = VfsSetOptions {
                    pf_driver: pfc.pf_driver(),
                    bind: bind.clone(),
                    qdma: pfc.qdma.clone(),
                };
                let nvme = match resources {
                    Some(r) => Some(r.clone()),
                    None => pfc
                        .nvme
                        .as_ref()
                        .map(|p| {
                            p.resources().map_err(|reason| Error::Config {
                                path: "helper config".into(),
                                reason,
                            })
                        })
                        .transpose()?,
                };
                let (pf, count) = (*pf, *count);
                self.change(
                    pf,
                    format!("vfs_set to {count}"),
                    self.config.watchdog(),
                    move |d| {
                        d.mgr
                            .set_vf_count_with(pf, count, &opts, nvme.as_ref())
                            .and_then(|r| to_value(&r))
                    },
                )
            }),
            Request::Init {} => match self.config.pfs.first() {
                None => Err(Error::Plan("no PF is configured".into())),
                Some(first) => self.change(first.bdf, "init".into(), self.orch_watchdog(), |d| {
                    d.orchestrator()?.init().and_then(|r| to_value(&r))
                }),
            },
            Request::Reconf {
                pf,
                vfs,
                mode,
                assign,
            } => self.allowed_pf(*pf).and_then(|_| {
                let (pf, vfs, mode, assign) = (*pf, *vfs, *mode, assign.clone());
                self.change(
                    pf,
                    format!("reconf to {vfs}"),
                    self.orch_watchdog(),
                    move |d| {
                        d.orchestrator()?
                            .reconf(pf, vfs, mode, &assign)
                            .and_then(|r| to_value(&r))
                    },
                )
            }),
            Request::PoolReconf {
                pf,
                resources,
                assign,
            } => self.allowed_pf(*pf).and_then(|_| {
                let (pf, resources, assign) = (*pf, resources.clone(), assign.clone());
                self.change(pf, "pool reconf".into(), self.orch_watchdog(), move |d| {
                    d.orchestrator()?
                        .reconf_pool(pf, &resources, &assign)
                        .and_then(|r| to_value(&r))
                })
            }),
            Request::Recover {} => match self.config.pfs.first() {
                None => Err(Error::Plan("no PF is configured".into())),
                Some(first) => {
                    self.change(first.bdf, "recover".into(), self.orch_watchdog(), |d| {
                        d.orchestrator()?.recover().and_then(|r| to_value(&r))
                    })
                }
            },
            Request::Program { pf } => self.allowed_pf(*pf).and_then(|pfc| {
                let cfg = pfc.bitstream.clone().ok_or_else(|| Error::Config {
                    path: "helper config".into(),
                    reason: format!("PF {pf} has no bitstream configured"),
                })?;
                let pf = *pf;
                let watchdog = self.config.watchdog() + Duration::from_secs(cfg.timeout_s);
                self.change(pf, "program".into(), watchdog, move |d| {
                    d.mgr
                        .program_bitstream(pf, &cfg)
                        .and_then(|steps| to_value(&serde_json::json!({ "steps": steps })))
                })
            }),
        };
        match result {
            Ok(v) => Response::ok(v),
            Err(e) => Response::from_error(&e),
        }
    }

    /// Waits while a change runs on one of `pfs`: until it ends or is declared
    /// stuck, then (stuck) at most [`STUCK_STATUS_WAIT`] more for it to
    /// return, and answers `busy` if it has not.
    fn wait_for_changes_on(&self, pfs: &[PciAddress]) -> Result<(), Error> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut stuck_deadline: Option<Instant> = None;
        loop {
            match &*running {
                Some(r) if pfs.contains(&r.pf) => {
                    if r.stuck {
                        let deadline = *stuck_deadline
                            .get_or_insert_with(|| Instant::now() + STUCK_STATUS_WAIT);
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(r.busy());
                        }
                        running = self
                            .running_changed
                            .wait_timeout(running, left)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    } else {
                        running = self
                            .running_changed
                            .wait(running)
                            .unwrap_or_else(|p| p.into_inner());
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    /// Runs `job` (a change of `pf`) on a worker thread, one change at a time:
    /// waits for a running change to end (`busy` when it is stuck or does not
    /// end within `watchdog`), then waits up to `watchdog` for `job`. When that
    /// fires, a sysfs write is blocked in the kernel: the answer is
    /// [`Error::Stuck`], the worker goes on waiting for the kernel, and until
    /// it returns other changes get `busy` and status of `pf` too; ping and
    /// other PFs' status keep being served.
    fn change(
        self: &Arc<Self>,
        pf: PciAddress,
        what: String,
        watchdog: Duration,
        job: impl FnOnce(&Self) -> Result<serde_json::Value, Error> + Send + 'static,
    ) -> Result<serde_json::Value, Error> {
        let id = self.next_change.fetch_add(1, Ordering::Relaxed);
        {
            let deadline = Instant::now() + watchdog;
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            while let Some(r) = &*running {
                let left = deadline.saturating_duration_since(Instant::now());
                if r.stuck || left.is_zero() {
                    return Err(r.busy());
                }
                running = self
                    .running_changed
                    .wait_timeout(running, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            *running = Some(Running {
                id,
                pf,
                what: what.clone(),
                since: Instant::now(),
                stuck: false,
            });
        }
        let (tx, rx) = mpsc::channel();
        let daemon = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("svff-change".into())
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&daemon)))
                    .unwrap_or_else(|_| Err(Error::Internal("the change panicked".into())));
                let mut running = daemon.running.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(r) = running.take_if(|r| r.id == id) {
                    if r.stuck {
                        warn!(what = %r.what, secs = r.since.elapsed().as_secs_f64(), ok = result.is_ok(), "a stuck change returned at last");
                    }
                }
                daemon.running_changed.notify_all();
                drop(running);
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running.take_if(|r| r.id == id);
            self.running_changed.notify_all();
            return Err(Error::Internal(format!(
                "cannot start a worker thread: {e}"
            )));
        }
        match rx.recv_timeout(watchdog) {
            Ok(result) => result,
            Err(_) => {
                let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
                match running.as_mut() {
                    Some(r) if r.id == id => {
                        r.stuck = true;
                        error!(what = %r.what, secs = watchdog.as_secs(), "watchdog: a change is stuck in the kernel");
                        self.running_changed.notify_all();
                        Err(Error::Stuck {
                            pf,
                            what,
                            secs: watchdog.as_secs(),
                        })
                    }
                    // It ended just now.
                    _ => {
                        drop(running);
                        rx.recv()
                            .unwrap_or_else(|_| Err(Error::Internal("the worker vanished".into())))
                    }
                }
            }
        }
    }

    /// The credentials of a peer and whether the config lets it in: its uid,
    /// its primary gid (`SO_PEERCRED`) or one of its supplementary groups
    /// (`SO_PEERGROUPS`) must be on the lists.
    fn admit(&self, stream: &UnixStream) -> Result<Peer, Option<Response>> {
        let creds = getsockopt(stream, PeerCredentials).map_err(|e| {
            error!(error = %e, "SO_PEERCRED failed; dropping connection");
            None
        })?;
        let (pid, uid, gid) = (creds.pid(), creds.uid(), creds.gid());
        let groups = match peer_groups(stream) {
            Ok(g) => g,
            Err(e) => {
                // Without the list only uid and primary gid can let the peer in.
                warn!(pid, uid, error = %e, "SO_PEERGROUPS failed");
                Vec::new()
            }
        };
        if self.config.peer_allowed(uid, gid, &groups) {
            return Ok(Peer { pid, uid, gid });
        }
        warn!(
            pid,
            uid,
            gid,
            ?groups,
            "peer refused: uid/gids not in allowed_uids/allowed_gids"
        );
        Err(Some(Response::err(
            "permission_denied",
            format!("permission denied: uid {uid} gid {gid} is not allowed to use the svff helper"),
        )))
    }

    /// Serves one admitted connection: answers request lines until EOF, an
    /// idle timeout, a line deadline, or an eviction (the slot's socket is shut down).
    pub(crate) fn serve_connection(
        self: &Arc<Self>,
        stream: UnixStream,
        peer: Peer,
        slot: Option<u64>,
    ) {
        let span = info_span!("client", pid = peer.pid, uid = peer.uid, gid = peer.gid);
        let _enter = span.enter();
        let mut writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => {
                error!(error = %e, "cannot clone the client socket");
                return;
            }
        };
        if let Err(e) = writer.set_write_timeout(Some(IDLE_TIMEOUT)) {
            error!(error = %e, "cannot set socket timeouts");
            return;
        }
        let mut reader = BufReader::new(stream);
        loop {
            self.slot_state(slot, true);
            let line = match read_request_line(&mut reader) {
                Ok(Some(line)) => line,
                Ok(None) => return,
                Err(LineError::Io(e)) => {
                    info!(error = %e, "client read ended");
                    return;
                }
                Err(e) => {
                    info!(error = %e, "dropping the client");
                    let _ = send(&mut writer, &Response::err("protocol", e.to_string()));
                    finish(reader.get_ref());
                    return;
                }
            };
            self.slot_state(slot, false);
            let start = Instant::now();
            let response = match serde_json::from_str::<Request>(line.trim_end()) {
                Ok(req) => {
                    info!(request = ?req, "request");
                    let r = self.handle(&req);
                    let ms = crate::sriov::elapsed_ms(start);
                    match &r.error {
                        None => info!(ms, "request done"),
                        Some(e) => {
                            warn!(ms, kind = %e.kind, message = %e.message, "request failed")
                        }
                    }
                    r
                }
                Err(e) => Response::err("protocol", format!("invalid request: {e}")),
            };
            if let Err(e) = send(&mut writer, &response) {
                info!(error = %e, "cannot answer the client");
                return;
            }
        }
    }

    /// Marks a connection slot as waiting for a request line (evictable) or
    /// carrying one out.
    fn slot_state(&self, slot: Option<u64>, waiting: bool) {
        let Some(id) = slot else { return };
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get_mut(&id) {
            s.waiting_since = waiting.then(Instant::now);
        }
    }

    /// Takes a connection slot for an admitted peer. When all are taken, the
    /// connection that has waited longest for a request line is shut down to
    /// make room (a slow or stalled client never locks others out); when every
    /// slot is carrying out a request, `None`.
    fn take_slot(&self, stream: &UnixStream) -> Option<u64> {
        let handle = stream.try_clone().ok()?;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() >= MAX_CONNECTIONS {
            let oldest = slots
                .iter()
                .filter_map(|(id, s)| s.waiting_since.map(|t| (t, *id)))
                .min()
                .map(|(_, id)| id)?;
            if let Some(evicted) = slots.remove(&oldest) {
                info!("all connection slots taken: closing the one idle longest");
                let _ = evicted.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        let id = self.next_slot.fetch_add(1, Ordering::Relaxed);
        slots.insert(
            id,
            Slot {
                stream: handle,
                waiting_since: Some(Instant::now()),
            },
        );
        Some(id)
    }

    fn release_slot(&self, id: u64) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Accepts connections forever: checks each peer at once (a refused peer
    /// gets its answer and is closed without taking a slot), then serves it on
    /// its own thread.
    pub fn serve(self: Arc<Self>, listener: UnixListener) -> Result<(), Error> {
        info!(pfs = self.config.pfs.len(), "svff helper serving");
        for stream in listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    error!(error = %e, "accept failed");
                    continue;
                }
            };
            let peer = match self.admit(&stream) {
                Ok(p) => p,
                Err(answer) => {
                    refuse(stream, answer.as_ref());
                    continue;
                }
            };
            let Some(slot) = self.take_slot(&stream) else {
                warn!("every connection slot is carrying out a request; refusing one");
                let r = Response::err(
                    "busy",
                    format!("the helper is serving {MAX_CONNECTIONS} requests; try again"),
                );
                refuse(stream, Some(&r));
                continue;
            };
            let daemon = Arc::clone(&self);
            let spawned = std::thread::Builder::new()
                .name("svff-client".into())
                .spawn(move || {
                    // A bug in one request must not leak the connection slot.
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        daemon.serve_connection(stream, peer, Some(slot))
                    }));
                    if served.is_err() {
                        error!("a client thread panicked");
                    }
                    daemon.release_slot(slot);
                });
            if let Err(e) = spawned {
                self.release_slot(slot);
                error!(error = %e, "cannot spawn a client thread");
            }
        }
        Ok(())
    }
}

/// An admitted peer, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    pid: i32,
    uid: u32,
    gid: u32,
}

/// A connection being served.
#[derive(Debug)]
struct Slot {
    /// A handle on its socket, to shut it down when it is evicted.
    stream: UnixStream,
    /// Since when it waits for a request line; `None` while carrying one out.
    waiting_since: Option<Instant>,
}

fn send(w: &mut UnixStream, r: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

/// The supplementary groups of the peer (`SO_PEERGROUPS`, Linux >= 4.13).
pub(crate) fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    const GID_SIZE: usize = std::mem::size_of::<libc::gid_t>();
    // NGROUPS_MAX on Linux.
    const MAX_GROUPS: usize = 65536;
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * GID_SIZE)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: `groups` is a live, writable buffer of exactly `len` bytes
        // of gid_t, and `len` points to a socklen_t on the stack; the kernel
        // writes at most `len` bytes and stores the size it needs in `len`.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / GID_SIZE;
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= MAX_GROUPS {
            groups.resize(needed, 0);
            continue;
        }
        return Err(e);
    }
}

/// Why a request line could not be read.
#[derive(Debug, thiserror::Error)]
enum LineError {
    #[error("request line too long or not terminated")]
    TooLong,
    #[error("request line not completed within {} s", LINE_DEADLINE.as_secs())]
    Deadline,
    #[error("idle for {} s", IDLE_TIMEOUT.as_secs())]
    Idle,
    #[error(transparent)]
    Io(io::Error),
}

/// Reads one request line: the first byte may take up to [`IDLE_TIMEOUT`],
/// the whole line then must arrive within [`LINE_DEADLINE`] (a total bound,
/// however slowly the bytes trickle in). `None` at a clean EOF.
fn read_request_line(reader: &mut BufReader<UnixStream>) -> Result<Option<String>, LineError> {
    let idle_deadline = Instant::now() + IDLE_TIMEOUT;
    let mut line_deadline: Option<Instant> = None;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let deadline = line_deadline.unwrap_or(idle_deadline);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let expired = || {
            if line_deadline.is_some() {
                LineError::Deadline
            } else {
                LineError::Idle
            }
        };
        if remaining.is_zero() {
            return Err(expired());
        }
        reader
            .get_ref()
            .set_read_timeout(Some(remaining))
            .map_err(LineError::Io)?;
        let avail = match reader.fill_buf() {
            Ok(b) => b,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(expired())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineError::Io(e)),
        };
        if avail.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(LineError::TooLong)
            };
        }
        line_deadline.get_or_insert_with(|| Instant::now() + LINE_DEADLINE);
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        buf.extend_from_slice(&avail[..take]);
        reader.consume(take);
        if buf.len() as u64 > MAX_LINE {
            return Err(LineError::TooLong);
        }
        if done {
            return String::from_utf8(buf).map(Some).map_err(|_| {
                LineError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request line is not UTF-8",
                ))
            });
        }
    }
}

/// Answers a peer that is not served (if there is an answer) and closes the
/// connection at once, without waiting for it. What it already sent is
/// discarded first, so that the close does not reset the connection before
/// the peer reads the answer.
fn refuse(stream: UnixStream, answer: Option<&Response>) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    if let Some(r) = answer {
        let mut w = &stream;
        let mut line = serde_json::to_vec(r).unwrap_or_default();
        line.push(b'\n');
        // A fresh socket's buffer takes one short line; never wait for it.
        let _ = w.write_all(&line);
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut scratch = [0u8; 4096];
    let mut discarded = 0u64;
    while discarded < 4 * MAX_LINE {
        match Read::read(&mut &stream, &mut scratch) {
            Ok(0) | Err(_) => break,
            Ok(n) => discarded += n as u64,
        }
    }
}

/// Ends a connection the daemon gives up on: stops writing and discards what
/// the client already sent (bounded in bytes and time), so that closing with
/// unread data does not reset the connection before the client read the answer.
fn finish(stream: &UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    if stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .is_ok()
    {
        let _ = io::copy(&mut Read::take(stream, 4 * MAX_LINE), &mut io::sink());
    }
}

/// The listening socket passed by systemd socket activation (`LISTEN_FDS=1`
/// for this pid), if any, made close-on-exec.
pub fn listener_from_systemd() -> Result<Option<UnixListener>, Error> {
    let Some(pid) = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return Ok(None);
    };
    if pid != std::process::id() || std::env::var("LISTEN_FDS").ok().as_deref() != Some("1") {
        return Ok(None);
    }
    // SAFETY: systemd's socket activation protocol hands this process (LISTEN_PID
    // is our pid, LISTEN_FDS is 1) exactly one open listening socket at fd 3
    // (SD_LISTEN_FDS_START); nothing else in this process owns fd 3, so taking
    // ownership of it here is sound.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    adopt_listener(fd)
        .map(Some)
        .map_err(|source| Error::Socket {
            path: "fd 3 passed by systemd".into(),
            op: "setting FD_CLOEXEC",
            source,
        })
}

/// Takes an inherited listening socket, marking it close-on-exec so that no
/// program the helper starts (a bitstream tool) inherits it.
fn adopt_listener(fd: OwnedFd) -> io::Result<UnixListener> {
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    Ok(UnixListener::from(fd))
}

fn group_id(spec: &str) -> Result<u32, String> {
    if let Ok(gid) = spec.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(spec) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("group {spec} does not exist")),
        Err(e) => Err(format!("cannot look up group {spec}: {e}")),
    }
}

/// Creates the socket at `path` with mode 0660 (owner root, group `group` when
/// given), replacing a stale socket but never another kind of file.
pub fn bind_socket(path: &Path, group: Option<&str>) -> Result<UnixListener, Error> {
    let sock_err = |op: &'static str, source: io::Error| Error::Socket {
        path: path.to_owned(),
        op,
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| sock_err("creating its directory", e))?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            fs::remove_file(path).map_err(|e| sock_err("removing the stale socket", e))?
        }
        Ok(_) => {
            return Err(sock_err(
                "bind",
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "path exists and is not a socket",
                ),
            ))
        }
        Err(_) => {}
    }
    let gid = group.map(group_id).transpose().map_err(|m| {
        sock_err(
            "resolving socket_group",
            io::Error::new(io::ErrorKind::NotFound, m),
        )
    })?;
    // Create the socket with mode 0660 from the start, so that no chmod by path
    // is needed; the umask is process-wide, so this runs before any thread
    // is spawned.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o117));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(|e| sock_err("bind", e))?;
    if let Some(gid) = gid {
        // lchown: if the path was replaced by a symlink since the bind, the
        // link itself changes owner, never the file it points to.
        std::os::unix::fs::lchown(path, None, Some(gid)).map_err(|e| sock_err("chown", e))?;
    }
    let meta = fs::symlink_metadata(path).map_err(|e| sock_err("lstat", e))?;
    if !meta.file_type().is_socket()
        || meta.mode() & 0o7777 != 0o660
        || gid.is_some_and(|g| meta.gid() != g)
    {
        return Err(sock_err(
            "checking the created socket",
            io::Error::other(format!(
                "{} is not the socket just created with mode 0660 (mode {:o}, gid {})",
                path.display(),
                meta.mode() & 0o7777,
                meta.gid()
            )),
        ));
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeSysfs;
    use crate::protocol::PROTOCOL_VERSION;
    use std::os::unix::fs::MetadataExt;

    fn config(uids: &[u32]) -> Config {
        let uids: Vec<String> = uids.iter().map(|u| u.to_string()).collect();
        let text = format!(
            "allowed_uids = [{}]\n[[pf]]\nbdf = \"0000:01:00.0\"\ndriver = \"igb\"\n",
            uids.join(",")
        );
        Config::parse(&text, Path::new("test.toml")).unwrap()
    }

    fn daemon(uids: &[u32]) -> Arc<Daemon<FakeSysfs>> {
        Arc::new(Daemon::new(config(uids), FakeSysfs::with_igb().manager()))
    }

    fn me() -> u32 {
        nix::unistd::getuid().as_raw()
    }

    /// Sends lines over a socketpair to `serve_connection` and returns the answers.
    fn converse(d: &Arc<Daemon<FakeSysfs>>, lines: &[&str]) -> Vec<Response> {
        let (mut client, server) = UnixStream::pair().unwrap();
        let d2 = Arc::clone(d);
        let t = std::thread::spawn(move || match d2.admit(&server) {
            Ok(peer) => d2.serve_connection(server, peer, None),
            Err(answer) => refuse(server, answer.as_ref()),
        });
        // A refused peer is closed at once: later writes may fail (EPIPE).
        for l in lines {
            let _ = client.write_all(format!("{l}\n").as_bytes());
        }
        let _ = client.shutdown(std::net::Shutdown::Write);
        // A refused peer may see a reset after the answer: keep what was read.
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = client.read(&mut chunk) {
            out.extend_from_slice(&chunk[..n]);
        }
        let out = String::from_utf8(out).unwrap();
        t.join().unwrap();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn allowed_peer_sets_vfs_and_reads_status() {
        let d = daemon(&[me()]);
        let r = converse(
            &d,
            &[
                r#"{"op":"ping"}"#,
                r#"{"op":"vfs_set","pf":"0000:01:00.0","count":3,"bind":"vfio-pci"}"#,
                r#"{"op":"status"}"#,
            ],
        );
        assert_eq!(r.len(), 3);
        assert!(
            r.iter().all(|x| x.ok && x.protocol == PROTOCOL_VERSION),
            "{r:?}"
        );
        let status: crate::Status = serde_json::from_value(r[2].result.clone().unwrap()).unwrap();
        assert_eq!(status.pfs.len(), 1);
        assert_eq!(status.pfs[0].driver.as_deref(), Some("igb"));
        assert_eq!(status.pfs[0].numvfs, 3);
        assert!(status.pfs[0]
            .vfs
            .iter()
            .all(|v| v.driver.as_deref() == Some("vfio-pci")));
    }

    #[test]
    fn peer_not_on_the_list_is_refused_before_any_request() {
        let d = daemon(&[me().wrapping_add(4242)]);
        let r = converse(&d, &[r#"{"op":"vfs_set","pf":"0000:01:00.0","count":3}"#]);
        assert_eq!(r.len(), 1);
        assert!(!r[0].ok);
        let e = r[0].error.as_ref().unwrap();
        assert_eq!(e.kind, "permission_denied");
        assert!(
            e.message.contains(&format!("uid {}", me())),
            "{}",
            e.message
        );
        assert!(d.mgr.sysfs().writes().is_empty());
    }

    #[test]
    fn pf_outside_the_allow_list_and_unlisted_drivers_are_refused() {
        let d = daemon(&[me()]);
        d.mgr
            .sysfs()
            .add_pf("0000:02:00.0", "0x1b36", "0x0010", 64, "0x0010");
        let r = converse(
            &d,
            &[
                r#"{"op":"vfs_set","pf":"0000:02:00.0","count":1}"#,
                r#"{"op":"vfs_set","pf":"0000:01:00.0","count":1,"bind":"igbvf"}"#,
                r#"{"op":"status","pf":"0000:02:00.0"}"#,
            ],
        );
        let kinds: Vec<&str> = r
            .iter()
            .map(|x| x.error.as_ref().unwrap().kind.as_str())
            .collect();
        assert_eq!(kinds, ["not_allowed", "not_allowed", "not_allowed"]);
        assert!(r[0]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("0000:02:00.0 is not on the helper's allow-list"));
        assert!(d.mgr.sysfs().writes().is_empty());
    }

    #[test]
    fn kernel_errors_reach_the_client_with_their_kind() {
        let d = daemon(&[me()]);
        let r = converse(&d, &[r#"{"op":"vfs_set","pf":"0000:01:00.0","count":8}"#]);
        let e = r[0].error.as_ref().unwrap();
        assert_eq!(e.kind, "too_many_vfs");
        assert!(
            e.message.contains("PF 0000:01:00.0 supports at most 7 VFs"),
            "{}",
            e.message
        );
    }

    #[test]
    fn garbage_and_overlong_lines_get_protocol_errors() {
        let d = daemon(&[me()]);
        let r = converse(
            &d,
            &["not json", r#"{"op":"vfs_set","pf":"../../etc","count":1}"#],
        );
        assert!(r
            .iter()
            .all(|x| x.error.as_ref().unwrap().kind == "protocol"));
        let long = "x".repeat(MAX_LINE as usize + 10);
        let r = converse(&d, &[&long]);
        assert_eq!(r.len(), 1);
        assert!(r[0].error.as_ref().unwrap().message.contains("too long"));
    }

    #[test]
    fn concurrent_clients_are_serialized_so_none_sees_ebusy() {
        let d = daemon(&[me()]);
        let handles: Vec<_> = (1..=6u16)
            .map(|n| {
                let d = Arc::clone(&d);
                std::thread::spawn(move || {
                    let line = format!(
                        r#"{{"op":"vfs_set","pf":"0000:01:00.0","count":{n},"bind":"vfio-pci"}}"#
                    );
                    converse(&d, &[&line])
                })
            })
            .collect();
        for h in handles {
            let r = h.join().unwrap();
            assert!(r[0].ok, "{:?}", r[0].error);
        }
        let n = d
            .mgr
            .vf_counts(PciAddress::parse("0000:01:00.0").unwrap())
            .unwrap()
            .1;
        assert!((1..=6).contains(&n));
    }

    #[test]
    fn a_change_stuck_in_the_kernel_leaves_ping_and_other_requests_answered() {
        let text = format!(
            "allowed_uids = [{}]\nwatchdog_s = 1\n[[pf]]\nbdf = \"0000:01:00.0\"\ndriver = \"igb\"\n[[pf]]\nbdf = \"0000:02:00.0\"\n",
            me()
        );
        let config = Config::parse(&text, Path::new("test.toml")).unwrap();
        let fake = FakeSysfs::with_igb();
        fake.add_pf("0000:02:00.0", "0x1b36", "0x0010", 64, "0x0010");
        fake.preset_driver("0000:02:00.0", "pci-pf-stub");
        let d = Arc::new(Daemon::new(config, fake.manager()));
        let set = |n: u16| format!(r#"{{"op":"vfs_set","pf":"0000:01:00.0","count":{n}}}"#);
        assert!(converse(&d, &[&set(2)])[0].ok);
        let release = d.mgr.sysfs().block_next_write("0000:01:00.0/sriov_numvfs");
        let r = converse(&d, &[&set(0)]);
        let e = r[0].error.as_ref().unwrap();
        assert_eq!(e.kind, "stuck", "{}", e.message);
        assert!(
            e.message.contains("has not finished after 1 s"),
            "{}",
            e.message
        );
        let r = converse(
            &d,
            &[
                r#"{"op":"ping"}"#,
                r#"{"op":"status","pf":"0000:01:00.0"}"#,
                r#"{"op":"status","pf":"0000:02:00.0"}"#,
                &set(1),
            ],
        );
        assert!(r[0].ok, "{:?}", r[0].error);
        assert_eq!(r[1].error.as_ref().unwrap().kind, "busy");
        assert!(
            r[1].error
                .as_ref()
                .unwrap()
                .message
                .contains("is stuck in the kernel"),
            "{:?}",
            r[1].error
        );
        assert!(r[2].ok, "{:?}", r[2].error);
        assert_eq!(r[3].error.as_ref().unwrap().kind, "busy");
        drop(release);
        // The worker finishes its change; then status waits for nothing.
        let (tx, rx) = std::sync::mpsc::channel();
        let d2 = Arc::clone(&d);
        std::thread::spawn(move || {
            let mut running = d2.running.lock().unwrap();
            while running.is_some() {
                running = d2.running_changed.wait(running).unwrap();
            }
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the released change did not end");
        let r = converse(&d, &[r#"{"op":"status","pf":"0000:01:00.0"}"#, &set(3)]);
        assert!(r.iter().all(|x| x.ok), "{r:?}");
    }

    #[test]
    fn socket_is_created_with_mode_0660_and_stale_sockets_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/helper.sock");
        let l1 = bind_socket(&path, None).unwrap();
        drop(l1);
        let _l2 = bind_socket(&path, Some(&nix::unistd::getgid().as_raw().to_string())).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o660);
        assert_eq!(meta.gid(), nix::unistd::getgid().as_raw());
        let file = dir.path().join("not-a-socket");
        fs::write(&file, "keep me").unwrap();
        assert!(bind_socket(&file, None).is_err());
        assert_eq!(fs::read_to_string(&file).unwrap(), "keep me");
    }

    #[test]
    fn forty_half_open_connections_do_not_stop_the_next_ping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("helper.sock");
        let listener = bind_socket(&path, None).unwrap();
        let d = daemon(&[me()]);
        std::thread::spawn(move || d.serve(listener));
        // Each sends the start of a request and then nothing.
        let stalled: Vec<UnixStream> = (0..40)
            .map(|_| {
                let mut s = UnixStream::connect(&path).unwrap();
                s.write_all(br#"{"op":"#).unwrap();
                s
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(crate::client::request(&p, &Request::Ping {}).map_err(|e| e.chain()));
        });
        // A hang guard, not a timing requirement: the ping must be answered at all.
        let answer = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the ping got no answer within 60 s");
        let v = answer.expect("the ping failed");
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        drop(stalled);
    }

    #[test]
    fn a_request_line_that_never_ends_is_answered_and_dropped_after_the_line_deadline() {
        let d = daemon(&[me()]);
        let (mut client, server) = UnixStream::pair().unwrap();
        let d2 = Arc::clone(&d);
        std::thread::spawn(move || {
            let peer = d2.admit(&server).unwrap();
            d2.serve_connection(server, peer, None)
        });
        client.write_all(br#"{"op":"#).unwrap();
        // Hang guard only: the daemon must answer by itself, long before this.
        client
            .set_read_timeout(Some(LINE_DEADLINE + IDLE_TIMEOUT))
            .unwrap();
        let mut answer = String::new();
        BufReader::new(&client).read_line(&mut answer).unwrap();
        let r: Response = serde_json::from_str(&answer).unwrap();
        let e = r.error.unwrap();
        assert_eq!(e.kind, "protocol");
        assert!(e.message.contains("not completed within"), "{}", e.message);
    }

    #[test]
    fn adopted_listener_fd_is_close_on_exec() {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
        let cloexec = |fd: std::os::fd::BorrowedFd<'_>| {
            FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap())
                .contains(FdFlag::FD_CLOEXEC)
        };
        // As systemd passes it: inherited across exec, so not close-on-exec.
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        assert!(!cloexec(std::os::fd::AsFd::as_fd(&fd)), "precondition");
        let listener = adopt_listener(fd).unwrap();
        assert!(cloexec(std::os::fd::AsFd::as_fd(&listener)));
    }

    #[test]
    fn serve_answers_clients_over_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("helper.sock");
        let listener = bind_socket(&path, None).unwrap();
        let d = daemon(&[me()]);
        std::thread::spawn(move || d.serve(listener));
        let v = crate::client::request(&path, &Request::Ping {}).unwrap();
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        let err = crate::client::request(
            &path,
            &Request::VfsSet {
                pf: PciAddress::parse("0000:01:00.0").unwrap(),
                count: 9,
                bind: None,
                resources: None,
            },
        )
        .unwrap_err();
        assert_eq!(err.kind(), "too_many_vfs");
        assert!(err.to_string().contains("supports at most 7 VFs"));
    }
}
