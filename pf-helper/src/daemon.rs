//! The helper daemon: a unix socket speaking the JSON-line protocol, peers
//! checked with `SO_PEERCRED`, PFs limited to the config's allow-list.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use tracing::{error, info, info_span, warn};

use crate::config::Config;
use crate::error::Error;
use crate::pci::PciAddress;
use crate::protocol::{Request, Response, MAX_LINE};
use crate::sriov::{SriovManager, VfsSetOptions};
use crate::sysfs::Sysfs;

/// Most connections served at once; more are refused.
const MAX_CONNECTIONS: usize = 32;
/// A client that sends nothing for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's state: its config and the sysfs it manages.
#[derive(Debug)]
pub struct Daemon<S: Sysfs> {
    config: Config,
    mgr: SriovManager<S>,
    /// Serializes operations: one PF change at a time.
    busy: Mutex<()>,
    connections: AtomicUsize,
}

fn to_value<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_value(v) {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err("internal", format!("cannot encode the result: {e}")),
    }
}

impl<S: Sysfs + 'static> Daemon<S> {
    /// A daemon doing `mgr`'s operations under `config`.
    pub fn new(config: Config, mgr: SriovManager<S>) -> Self {
        Daemon {
            config,
            mgr,
            busy: Mutex::new(()),
            connections: AtomicUsize::new(0),
        }
    }

    fn allowed_pf(&self, pf: PciAddress) -> Result<&crate::config::PfConfig, Error> {
        self.config.pf(pf).ok_or(Error::PfNotAllowed { pf })
    }

    /// Carries out one request from an already authenticated peer.
    pub fn handle(&self, req: &Request) -> Response {
        let _guard = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let result = match req {
            Request::Ping => {
                return Response::ok(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }))
            }
            Request::Status { pf } => {
                let list: Result<Vec<PciAddress>, Error> = match pf {
                    Some(pf) => self.allowed_pf(*pf).map(|_| vec![*pf]),
                    None => Ok(self.config.pfs.iter().map(|p| p.bdf).collect()),
                };
                list.and_then(|l| self.mgr.status(Some(&l)))
                    .map(|s| to_value(&s))
            }
            Request::VfsSet { pf, count, bind } => self.allowed_pf(*pf).and_then(|pfc| {
                if let Some(driver) = bind {
                    if !self.config.vf_drivers.contains(driver) {
                        return Err(Error::DriverNotAllowed {
                            driver: driver.clone(),
                        });
                    }
                }
                let opts = VfsSetOptions {
                    pf_driver: pfc.driver.clone(),
                    bind: bind.clone(),
                    qdma: pfc.qdma.clone(),
                };
                self.mgr
                    .set_vf_count(*pf, *count, &opts)
                    .map(|r| to_value(&r))
            }),
            Request::Program { pf } => self.allowed_pf(*pf).and_then(|pfc| {
                let cfg = pfc.bitstream.as_ref().ok_or_else(|| Error::Config {
                    path: "helper config".into(),
                    reason: format!("PF {pf} has no bitstream configured"),
                })?;
                self.mgr
                    .program_bitstream(*pf, cfg)
                    .map(|steps| to_value(&serde_json::json!({ "steps": steps })))
            }),
        };
        result.unwrap_or_else(|e| Response::from_error(&e))
    }

    /// Serves one connection: checks the peer, then answers request lines until EOF.
    pub(crate) fn serve_connection(&self, stream: UnixStream) {
        let creds = match getsockopt(&stream, PeerCredentials) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "SO_PEERCRED failed; dropping connection");
                return;
            }
        };
        let (pid, uid, gid) = (creds.pid(), creds.uid(), creds.gid());
        let span = info_span!("client", pid, uid, gid);
        let _enter = span.enter();
        let mut writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => {
                error!(error = %e, "cannot clone the client socket");
                return;
            }
        };
        let send = |w: &mut UnixStream, r: &Response| -> io::Result<()> {
            let mut line = serde_json::to_vec(r).map_err(io::Error::other)?;
            line.push(b'\n');
            w.write_all(&line)
        };
        if !self.config.peer_allowed(uid, gid) {
            warn!("peer refused: uid/gid not in allowed_uids/allowed_gids");
            let r = Response::err(
                "permission_denied",
                format!(
                    "permission denied: uid {uid} gid {gid} is not allowed to use the svff helper"
                ),
            );
            let _ = send(&mut writer, &r);
            finish(&stream);
            return;
        }
        if let Err(e) = stream
            .set_read_timeout(Some(IDLE_TIMEOUT))
            .and(writer.set_write_timeout(Some(IDLE_TIMEOUT)))
        {
            error!(error = %e, "cannot set socket timeouts");
            return;
        }
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = String::new();
            match (&mut reader).take(MAX_LINE).read_line(&mut line) {
                Ok(0) => return,
                Ok(_) if !line.ends_with('\n') => {
                    let _ = send(
                        &mut writer,
                        &Response::err(
                            "protocol",
                            "request line too long or not terminated".into(),
                        ),
                    );
                    finish(reader.get_ref());
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    info!(error = %e, "client read ended");
                    return;
                }
            }
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

    /// Accepts connections forever, each on its own thread.
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
            if self.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.connections.fetch_sub(1, Ordering::SeqCst);
                warn!("too many connections; refusing one");
                continue;
            }
            let daemon = Arc::clone(&self);
            let spawned = std::thread::Builder::new()
                .name("svff-client".into())
                .spawn(move || {
                    // A bug in one request must not leak the connection slot.
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        daemon.serve_connection(stream)
                    }));
                    if served.is_err() {
                        error!("a client thread panicked");
                    }
                    daemon.connections.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                self.connections.fetch_sub(1, Ordering::SeqCst);
                error!(error = %e, "cannot spawn a client thread");
            }
        }
        Ok(())
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
/// for this pid), if any.
pub fn listener_from_systemd() -> Option<UnixListener> {
    let pid_matches = std::env::var("LISTEN_PID").ok()?.parse::<u32>().ok()? == std::process::id();
    let fds = std::env::var("LISTEN_FDS").ok()?;
    if !pid_matches || fds != "1" {
        return None;
    }
    // SAFETY: systemd's socket activation protocol hands this process (LISTEN_PID
    // is our pid, LISTEN_FDS is 1) exactly one open listening socket at fd 3
    // (SD_LISTEN_FDS_START); nothing else in this process owns fd 3, so taking
    // ownership of it here is sound.
    let listener = unsafe { UnixListener::from_raw_fd(3) };
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    Some(listener)
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
    // Create the socket with no permissions for others from the start; the
    // umask is process-wide, so this runs before any thread is spawned.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(|e| sock_err("bind", e))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| sock_err("chown", e))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))
        .map_err(|e| sock_err("chmod 0660", e))?;
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
        let t = std::thread::spawn(move || d2.serve_connection(server));
        for l in lines {
            client.write_all(l.as_bytes()).unwrap();
            client.write_all(b"\n").unwrap();
        }
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).unwrap();
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
    fn serve_answers_clients_over_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("helper.sock");
        let listener = bind_socket(&path, None).unwrap();
        let d = daemon(&[me()]);
        std::thread::spawn(move || d.serve(listener));
        let v = crate::client::request(&path, &Request::Ping).unwrap();
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        let err = crate::client::request(
            &path,
            &Request::VfsSet {
                pf: PciAddress::parse("0000:01:00.0").unwrap(),
                count: 9,
                bind: None,
            },
        )
        .unwrap_err();
        assert_eq!(err.kind(), "too_many_vfs");
        assert!(err.to_string().contains("supports at most 7 VFs"));
    }
}
