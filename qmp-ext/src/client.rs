//! Synchronous QMP client over a unix socket.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::error::Error;
use crate::fdpass::send_with_fds;
use crate::wire::{Event, Greeting, QmpCommand, QmpError};

/// Largest single message accepted from a server.
const MAX_LINE: usize = 64 << 20;
/// Events kept for [`Client::take_events`]; the oldest are dropped beyond.
const MAX_QUEUED_EVENTS: usize = 4096;

/// A QMP client connection in command mode.
///
/// Every read is bounded by the client's timeout (see
/// [`Client::set_timeout`]): a silent server yields [`Error::Timeout`], never
/// a hang. Events that arrive while waiting for a response are kept and can
/// be read with [`Client::take_events`] or [`Client::wait_event`] (the
/// newest 4096 are kept).
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    peer: String,
    buf: Vec<u8>,
    greeting: Greeting,
    events: VecDeque<Event>,
    next_id: u64,
    timeout: Duration,
}

impl Client {
    /// Connects to the server at `path`, reads its greeting and negotiates
    /// capabilities (enabling none). `timeout` bounds every later wait.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Client, Error> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_stream(stream, path.display().to_string(), timeout)
    }

    /// Like [`Client::connect`], on an already connected stream; `peer` names
    /// the server in errors.
    pub fn from_stream(
        stream: UnixStream,
        peer: String,
        timeout: Duration,
    ) -> Result<Client, Error> {
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|source| Error::Io {
                peer: peer.clone(),
                what: "setting the write timeout",
                source,
            })?;
        let mut client = Client {
            stream,
            peer,
            buf: Vec::new(),
            greeting: Greeting {
                qmp: crate::wire::GreetingBody {
                    version: crate::VersionInfo::svff(""),
                    capabilities: Vec::new(),
                },
            },
            events: VecDeque::new(),
            next_id: 1,
            timeout,
        };
        let deadline = Instant::now() + timeout;
        let first = loop {
            if let Some(m) = client.read_message(deadline, "the greeting")? {
                break m;
            }
        };
        client.greeting = serde_json::from_value(first).map_err(|e| Error::Protocol {
            peer: client.peer.clone(),
            detail: format!("bad greeting: {e}"),
        })?;
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    /// The server's greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Sets how long any single wait (sending, a response, an event) may take.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), Error> {
        self.timeout = timeout;
        self.stream
            .set_write_timeout(Some(timeout))
            .map_err(|source| Error::Io {
                peer: self.peer.clone(),
                what: "setting the write timeout",
                source,
            })
    }

    /// Runs `command` with optional `arguments` (a JSON object) and returns
    /// the `return` value. An error response becomes [`Error::Command`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, Error> {
        self.execute_with_fds(command, arguments, &[])
    }

    /// Like [`Client::execute`], passing `fds` with SCM_RIGHTS together with
    /// the command's bytes (what `getfd` and `add-fd` expect).
    pub fn execute_with_fds(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Value, Error> {
        let id = format!("qmp-ext-{}", self.next_id);
        self.next_id += 1;
        let mut req = Map::new();
        req.insert("execute".into(), json!(command));
        if let Some(a) = arguments {
            req.insert("arguments".into(), a);
        }
        req.insert("id".into(), json!(id));
        let mut line = Value::Object(req).to_string().into_bytes();
        line.push(b'\n');
        send_with_fds(self.stream.as_fd(), &line, fds).map_err(|source| {
            if matches!(
                source.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                Error::Timeout {
                    peer: self.peer.clone(),
                    what: format!("sending {command}"),
                }
            } else if hung_up(&source) {
                Error::Closed {
                    peer: self.peer.clone(),
                    what: format!("the response to {command}"),
                }
            } else {
                Error::Io {
                    peer: self.peer.clone(),
                    what: "sending a command",
                    source,
                }
            }
        })?;

        let deadline = Instant::now() + self.timeout;
        let what = format!("the response to {command}");
        loop {
            let Some(mut msg) = self.read_message(deadline, &what)? else {
                continue;
            };
            let Some(obj) = msg.as_object_mut() else {
                return Err(self.protocol(format!("non-object message {msg}")));
            };
            if obj.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                // Responses with an unknown id (or none) are not ours: drop them.
                continue;
            }
            if let Some(v) = obj.remove("return") {
                return Ok(v);
            }
            if let Some(e) = obj.remove("error") {
                let error: QmpError = serde_json::from_value(e)
                    .map_err(|e| self.protocol(format!("bad error: {e}")))?;
                return Err(Error::Command {
                    peer: self.peer.clone(),
                    command: command.to_string(),
                    error,
                });
            }
            return Err(self.protocol(format!("response without return or error: {msg}")));
        }
    }

    /// Runs a typed command.
    pub fn call<C: QmpCommand>(&mut self, command: &C) -> Result<C::Returns, Error> {
        let args = serde_json::to_value(command)
            .map_err(|e| self.protocol(format!("encoding {}: {e}", C::NAME)))?;
        let args = match args {
            Value::Object(m) if m.is_empty() => None,
            Value::Null => None,
            v => Some(v),
        };
        let ret = self.execute(C::NAME, args)?;
        serde_json::from_value(ret)
            .map_err(|e| self.protocol(format!("decoding the return of {}: {e}", C::NAME)))
    }

    /// Hands `fd` to the server under `fdname` (`getfd` with SCM_RIGHTS).
    pub fn send_fd(&mut self, fdname: &str, fd: BorrowedFd<'_>) -> Result<(), Error> {
        self.execute_with_fds("getfd", Some(json!({ "fdname": fdname })), &[fd])
            .map(drop)
    }

    /// Returns and forgets the events received so far.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Waits until an event called `name` arrives (or was already received
    /// and not taken), for at most `timeout`. Other events stay queued.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, Error> {
        self.wait_event_where(name, |_| true, timeout)
    }

    /// Like [`Client::wait_event`], for the first event called `name` that
    /// `matches` accepts, e.g. `DEVICE_DELETED` of one device among several.
    pub fn wait_event_where(
        &mut self,
        name: &str,
        mut matches: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event, Error> {
        let deadline = Instant::now() + timeout;
        let what = format!("event {name}");
        loop {
            if let Some(pos) = self
                .events
                .iter()
                .position(|e| e.name == name && matches(e))
            {
                return Ok(self.events.remove(pos).expect("position is in range"));
            }
            // read_message queues events itself; anything else is a stray
            // response, dropped as the spec asks.
            let _ = self.read_message(deadline, &what)?;
        }
    }

    fn protocol(&self, detail: String) -> Error {
        Error::Protocol {
            peer: self.peer.clone(),
            detail,
        }
    }

    /// Reads the next message: `Some` for a non-event message, `None` right
    /// after queueing an event.
    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Option<Value>, Error> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text = line.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_slice(text)
                    .map_err(|e| self.protocol(format!("invalid JSON from server: {e}")))?;
                if v.get("event").is_some() {
                    let ev: Event = serde_json::from_value(v)
                        .map_err(|e| self.protocol(format!("bad event: {e}")))?;
                    if self.events.len() == MAX_QUEUED_EVENTS {
                        self.events.pop_front();
                    }
                    self.events.push_back(ev);
                    return Ok(None);
                }
                return Ok(Some(v));
            }
            if self.buf.len() > MAX_LINE {
                return Err(self.protocol("message too long".into()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    peer: self.peer.clone(),
                    what: what.to_string(),
                });
            }
            let io_err = |source| Error::Io {
                peer: self.peer.clone(),
                what: "reading",
                source,
            };
            self.stream
                .set_read_timeout(Some(deadline - now))
                .map_err(io_err)?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(Error::Closed {
                        peer: self.peer.clone(),
                        what: what.to_string(),
                    })
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Error::Timeout {
                        peer: self.peer.clone(),
                        what: what.to_string(),
                    })
                }
                Err(e) if hung_up(&e) => {
                    return Err(Error::Closed {
                        peer: self.peer.clone(),
                        what: what.to_string(),
                    })
                }
                Err(e) => {
                    return Err(Error::Io {
                        peer: self.peer.clone(),
                        what: "reading",
                        source: e,
                    });
                }
            }
        }
    }
}

/// Whether an I/O error means the peer closed the connection.
fn hung_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}
