//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qmp_ext::{EventSink, Handler, QmpError, Server, ServerConfig, Session};
use serde_json::{json, Map, Value};

/// Bound for every socket read of the tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A handler with a few commands for protocol tests.
pub struct TestHandler {
    pub events: EventSink,
}

impl Handler for TestHandler {
    fn execute(
        &self,
        session: &mut Session,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        match command {
            "query-name" => Ok(json!({})),
            "echo" => Ok(Value::Object(args)),
            "fail" => Err(QmpError::generic("fail always fails")),
            "emit" => {
                self.events.emit("TEST_EVENT", Some(args));
                Ok(json!({}))
            }
            "read-fd" => {
                // Reads what is left in the pipe behind the named descriptor.
                let name = args
                    .get("fdname")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let fd = session.take_fd(name)?;
                let mut text = String::new();
                std::fs::File::from(fd)
                    .read_to_string(&mut text)
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                Ok(json!({ "text": text }))
            }
            _ => Err(QmpError::command_not_found(command)),
        }
    }
}

/// A server with [`TestHandler`] in a fresh temporary directory.
pub struct TestServer {
    pub server: Server,
    pub path: PathBuf,
    pub dir: tempfile::TempDir,
}

pub fn test_server() -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qmp.sock");
    let events = EventSink::new();
    let config = ServerConfig {
        events: events.clone(),
        ..ServerConfig::default()
    };
    let server = Server::bind(&path, config, TestHandler { events }).expect("bind");
    TestServer { server, path, dir }
}

/// A raw connection that reads one line at a time, each read bounded.
pub struct Raw {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    pub fn recv(&mut self) -> Value {
        let line = self.recv_line();
        serde_json::from_slice(&line).unwrap_or_else(|e| {
            panic!(
                "server sent invalid JSON ({e}): {:?}",
                String::from_utf8_lossy(&line)
            )
        })
    }

    /// The next line as sent, CRLF included.
    pub fn recv_line(&mut self) -> Vec<u8> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                assert!(
                    line.ends_with(b"\r\n"),
                    "server lines end with CRLF: {line:?}"
                );
                return line;
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .expect("read within the timeout");
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn cmd(&mut self, text: &str) -> Value {
        self.send(text.as_bytes());
        self.send(b"\n");
        self.recv()
    }

    /// Connects, reads the greeting and negotiates.
    pub fn negotiated(path: &Path) -> Raw {
        let mut raw = Raw::connect(path);
        raw.recv();
        assert_eq!(
            raw.cmd("{'execute': 'qmp_capabilities'}"),
            json!({"return": {}})
        );
        raw
    }
}

pub fn error_class(rsp: &Value) -> &str {
    rsp["error"]["class"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error response: {rsp}"))
}

pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";
pub const QEMU_TIMEOUT: Duration = Duration::from_secs(20);

/// A daemonized QEMU with a QMP socket in a temporary directory, killed on drop.
pub struct Qemu {
    dir: tempfile::TempDir,
    pid: Option<i32>,
}

impl Qemu {
    pub fn start() -> Qemu {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("qmp.sock");
        let pidfile = dir.path().join("qemu.pid");
        // -daemonize: the command returns once QEMU is initialised, so the
        // socket is listening when it does; no polling needed.
        let out = Command::new(QEMU)
            .args([
                "-M",
                "none",
                "-display",
                "none",
                "-nodefaults",
                "-daemonize",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .arg("-pidfile")
            .arg(&pidfile)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {QEMU} (install qemu-system-x86): {e}"));
        assert!(
            out.status.success(),
            "QEMU failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = std::fs::read_to_string(&pidfile)
            .expect("pidfile")
            .trim()
            .parse()
            .expect("pid");
        Qemu {
            dir,
            pid: Some(pid),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    pub fn connect(&self) -> qmp_ext::Client {
        qmp_ext::Client::connect(self.socket(), QEMU_TIMEOUT).expect("connect to QEMU")
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
