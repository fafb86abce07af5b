//! QMP server for a VMM: std threads, one per client, over a unix socket.

use std::collections::{HashMap, VecDeque};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::Error;
use crate::fdpass::{recv_with_fds, send_with_fds};
use crate::json::JsonStream;
use crate::wire::{
    decode_arguments, to_ascii_line, ErrorClass, Event, QmpError, QmpEvent, Timestamp, VersionInfo,
};

/// Descriptors kept per session that arrived with SCM_RIGHTS but were not
/// yet claimed by `getfd`; older ones are closed beyond this.
const MAX_PENDING_FDS: usize = 16;
/// A client that does not read its responses for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Executes the commands of a QMP server.
///
/// The server itself answers `qmp_capabilities`, `getfd`, `closefd` and
/// `query-version`; every other command reaches [`Handler::execute`], from
/// several client threads at once. Unknown commands should be answered with
/// [`QmpError::command_not_found`].
pub trait Handler: Send + Sync + 'static {
    /// Runs `command` with its `arguments` (an empty map if none were given)
    /// and returns the value of the `return` member.
    fn execute(
        &self,
        session: &mut Session,
        command: &str,
        arguments: Map<String, Value>,
    ) -> Result<Value, QmpError>;
}

/// Per-connection state a [`Handler`] can use: the descriptors the client
/// handed over with `getfd`.
#[derive(Debug)]
pub struct Session {
    id: u64,
    named_fds: HashMap<String, OwnedFd>,
    pending_fds: VecDeque<OwnedFd>,
}

impl Session {
    /// A number identifying this connection within the server.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Takes the descriptor the client named `fdname` with `getfd`. As in
    /// QEMU, a descriptor is used once: it is removed from the session.
    pub fn take_fd(&mut self, fdname: &str) -> Result<OwnedFd, QmpError> {
        self.named_fds.remove(fdname).ok_or_else(|| {
            QmpError::generic(format!(
                "File descriptor named '{fdname}' has not been found"
            ))
        })
    }
}

struct Conn {
    stream: UnixStream,
    write_lock: Mutex<()>,
    negotiated: AtomicBool,
}

impl Conn {
    fn send(&self, msg: &Value) -> bool {
        let line = to_ascii_line(msg);
        let _guard = lock(&self.write_lock);
        if send_with_fds(self.stream.as_fd(), &line, &[]).is_err() {
            // A peer that cannot take output is gone for us; its reader
            // thread sees the shutdown and ends the session.
            let _ = self.stream.shutdown(Shutdown::Both);
            return false;
        }
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends asynchronous events to every client of a server that completed
/// capabilities negotiation. Cheap to clone; create it before the handler so
/// the handler can emit events too, and pass it in [`ServerConfig`].
#[derive(Clone, Default)]
pub struct EventSink {
    conns: Arc<Mutex<Vec<Weak<Conn>>>>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("clients", &lock(&self.conns).len())
            .finish()
    }
}

impl EventSink {
    /// A sink with no clients yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Emits event `name` with optional `data`, timestamped now.
    pub fn emit(&self, name: &str, data: Option<Map<String, Value>>) {
        let event = Event {
            name: name.to_string(),
            data,
            timestamp: Timestamp::now(),
        };
        let Ok(msg) = serde_json::to_value(&event) else {
            return;
        };
        let conns: Vec<Arc<Conn>> = {
            let mut list = lock(&self.conns);
            list.retain(|w| w.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        for c in conns
            .iter()
            .filter(|c| c.negotiated.load(Ordering::Acquire))
        {
            c.send(&msg);
        }
    }

    /// Emits a typed event.
    pub fn emit_event<E: QmpEvent>(&self, event: &E) {
        let data = match serde_json::to_value(event) {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        };
        self.emit(E::NAME, data);
    }

    fn register(&self, conn: &Arc<Conn>) {
        lock(&self.conns).push(Arc::downgrade(conn));
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Version announced in the greeting and returned by `query-version`.
    pub version: VersionInfo,
    /// Where events emitted for this server's clients come from.
    pub events: EventSink,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            version: VersionInfo::svff("svff"),
            events: EventSink::new(),
        }
    }
}

struct Shared {
    handler: Arc<dyn Handler>,
    config: ServerConfig,
    stop: AtomicBool,
    next_session: AtomicU64,
    clients: Mutex<Vec<(Arc<Conn>, JoinHandle<()>)>>,
}

/// A running QMP server. Dropping it stops accepting, disconnects every
/// client and waits for their threads (a command still executing in the
/// handler is waited for).
pub struct Server {
    shared: Arc<Shared>,
    listener: Arc<UnixListener>,
    accept_thread: Option<JoinHandle<()>>,
    socket_path: Option<PathBuf>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("socket_path", &self.socket_path)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Listens on a new unix socket at `path` (removed again on drop).
    pub fn bind(
        path: impl AsRef<Path>,
        config: ServerConfig,
        handler: impl Handler,
    ) -> Result<Server, Error> {
        let path = path.as_ref();
        let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let mut server = Self::from_listener(listener, config, handler)?;
        server.socket_path = Some(path.to_path_buf());
        Ok(server)
    }

    /// Serves clients of an already bound listener.
    pub fn from_listener(
        listener: UnixListener,
        config: ServerConfig,
        handler: impl Handler,
    ) -> Result<Server, Error> {
        let shared = Arc::new(Shared {
            handler: Arc::new(handler),
            config,
            stop: AtomicBool::new(false),
            next_session: AtomicU64::new(1),
            clients: Mutex::new(Vec::new()),
        });
        let listener = Arc::new(listener);
        let (s, l) = (shared.clone(), listener.clone());
        let accept_thread = std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || accept_loop(&s, &l))
            .map_err(|source| Error::Io {
                peer: "server".into(),
                what: "spawning the accept thread",
                source,
            })?;
        Ok(Server {
            shared,
            listener,
            accept_thread: Some(accept_thread),
            socket_path: None,
        })
    }

    /// The sink emitting events to this server's clients.
    pub fn events(&self) -> EventSink {
        self.shared.config.events.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // shutdown() on a listening unix socket wakes a blocked accept()
        // with EINVAL, so the accept thread sees `stop`.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let clients = std::mem::take(&mut *lock(&self.shared.clients));
        for (conn, thread) in clients {
            let _ = conn.stream.shutdown(Shutdown::Both);
            let _ = thread.join();
        }
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // Out of descriptors or similar: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
            continue;
        }
        let conn = Arc::new(Conn {
            stream,
            write_lock: Mutex::new(()),
            negotiated: AtomicBool::new(false),
        });
        let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
        let (s, c) = (shared.clone(), conn.clone());
        let thread = std::thread::Builder::new()
            .name(format!("qmp-client-{id}"))
            .spawn(move || serve(&s, &c, id));
        let mut clients = lock(&shared.clients);
        clients.retain(|(_, t)| !t.is_finished());
        match thread {
            Ok(t) => clients.push((conn, t)),
            Err(_) => {
                let _ = conn.stream.shutdown(Shutdown::Both);
            }
        }
    }
}

fn serve(shared: &Shared, conn: &Arc<Conn>, id: u64) {
    let greeting = json!({"QMP": {"version": shared.config.version, "capabilities": []}});
    if !conn.send(&greeting) {
        return;
    }
    shared.config.events.register(conn);
    let mut session = Session {
        id,
        named_fds: HashMap::new(),
        pending_fds: VecDeque::new(),
    };
    let mut parser = JsonStream::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let mut fds = Vec::new();
        let n = match recv_with_fds(conn.stream.as_fd(), &mut buf, &mut fds) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        session.pending_fds.extend(fds);
        while session.pending_fds.len() > MAX_PENDING_FDS {
            session.pending_fds.pop_front();
        }
        for msg in parser.feed(&buf[..n]) {
            let response = respond(shared, conn, &mut session, msg);
            if !conn.send(&response) {
                return;
            }
        }
    }
    let _ = conn.stream.shutdown(Shutdown::Both);
}

/// Builds the response to one parsed (or unparsable) input message.
fn respond(
    shared: &Shared,
    conn: &Conn,
    session: &mut Session,
    msg: Result<Value, String>,
) -> Value {
    let (id, result) = match msg {
        Err(desc) => (None, Err(QmpError::generic(desc))),
        Ok(Value::Object(mut req)) => {
            let id = req.remove("id");
            (id, execute(shared, conn, session, req))
        }
        Ok(_) => (
            None,
            Err(QmpError::generic("QMP input must be a JSON object")),
        ),
    };
    let mut rsp = Map::new();
    match result {
        Ok(v) => rsp.insert("return".into(), v),
        Err(e) => rsp.insert(
            "error".into(),
            json!({"class": e.class.as_str(), "desc": e.desc}),
        ),
    };
    if let Some(id) = id {
        rsp.insert("id".into(), id);
    }
    Value::Object(rsp)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesArgs {
    #[serde(default)]
    enable: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FdArgs {
    fdname: String,
}

fn execute(
    shared: &Shared,
    conn: &Conn,
    session: &mut Session,
    req: Map<String, Value>,
) -> Result<Value, QmpError> {
    let mut command = None;
    let mut args = Map::new();
    for (key, value) in req {
        match (key.as_str(), value) {
            ("execute", Value::String(s)) => command = Some(s),
            ("execute", _) => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
            ("arguments", Value::Object(m)) => args = m,
            ("arguments", _) => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
            _ => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{key}' is unexpected"
                )))
            }
        }
    }
    let command = command.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
    let not_found = |desc: &str| QmpError {
        class: ErrorClass::CommandNotFound,
        desc: desc.to_string(),
    };

    if !conn.negotiated.load(Ordering::Acquire) {
        if command != "qmp_capabilities" {
            return Err(not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        let caps: CapabilitiesArgs = decode_arguments(&command, args)?;
        if let Some(c) = caps.enable.first() {
            return Err(QmpError::generic(format!("Capability '{c}' not available")));
        }
        conn.negotiated.store(true, Ordering::Release);
        return Ok(json!({}));
    }

    match command.as_str() {
        "qmp_capabilities" => Err(not_found(
            "Capabilities negotiation is already complete, command ignored",
        )),
        "query-version" => {
            if !args.is_empty() {
                return Err(QmpError::generic(
                    "Parameter 'arguments' is unexpected for query-version",
                ));
            }
            Ok(json!(shared.config.version))
        }
        "getfd" => {
            let FdArgs { fdname } = decode_arguments(&command, args)?;
            if fdname.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(QmpError::generic(
                    "File descriptor name must not begin with a digit",
                ));
            }
            let fd = session
                .pending_fds
                .pop_front()
                .ok_or_else(|| QmpError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
            session.named_fds.insert(fdname, fd);
            Ok(json!({}))
        }
        "closefd" => {
            let FdArgs { fdname } = decode_arguments(&command, args)?;
            match session.named_fds.remove(&fdname) {
                Some(_) => Ok(json!({})),
                None => Err(QmpError::generic(format!(
                    "File descriptor named '{fdname}' not found"
                ))),
            }
        }
        _ => {
            let handler = &shared.handler;
            catch_unwind(AssertUnwindSafe(|| {
                handler.execute(session, &command, args)
            }))
            .unwrap_or_else(|_| {
                Err(QmpError::generic(format!(
                    "command {command} failed: internal error"
                )))
            })
        }
    }
}
