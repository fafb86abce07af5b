//! Helpers for lab tests of svff's patched QEMU (`qemu-fork/`): find the
//! binary `make qemu` built, start it with a QMP monitor on a socket that
//! exists before QEMU does (no waiting for it to appear), and look at its
//! file descriptors in `/proc`.

use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use qmp_ext::Client;
use serde_json::Value;

/// Errors of the QEMU helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The patched QEMU is missing or was built from other inputs.
    #[error("svff's QEMU {path}: {reason} (run `make qemu` on the host first)")]
    Binary {
        /// Where it was looked for.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Starting QEMU failed.
    #[error("starting {path}: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A socket or temp dir for the monitor could not be made.
    #[error("QMP socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not answer on QMP (it exited or hung); its stderr is attached.
    #[error("QEMU (pid {pid}) on QMP: {source}; stderr: {stderr}")]
    Qmp {
        /// QEMU's pid.
        pid: u32,
        /// The client error.
        #[source]
        source: qmp_ext::Error,
        /// What QEMU printed.
        stderr: String,
    },
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The patched `qemu-system-x86_64` that `qemu-fork/build.sh` published in
/// `target/svff-qemu/`, checked against the current inputs (`build.sh --key`),
/// so a test never runs a QEMU built from other patches or another library.
pub fn qemu_binary() -> Result<PathBuf, Error> {
    let ws = workspace();
    let dir = ws.join("target/svff-qemu");
    let bin = dir.join("qemu-system-x86_64");
    let fail = |reason: String| Error::Binary {
        path: bin.clone(),
        reason,
    };
    let built =
        fs::read_to_string(dir.join("key")).map_err(|e| fail(format!("no build key: {e}")))?;
    let out = Command::new("bash")
        .arg(ws.join("qemu-fork/build.sh"))
        .arg("--key")
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| fail(format!("build.sh --key: {e}")))?;
    let want = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(fail(format!(
            "build.sh --key failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    if want.trim() != built.trim() {
        return Err(fail(format!(
            "built from inputs {} but the inputs are now {}",
            built.trim(),
            want.trim()
        )));
    }
    if !bin.is_file() {
        return Err(fail("missing".into()));
    }
    Ok(bin)
}

/// A running QEMU with a QMP client; killed when dropped.
#[derive(Debug)]
pub struct Qemu {
    child: Option<Child>,
    pid: u32,
    qmp: Client,
    dir: tempfile::TempDir,
}

const MONITOR_FD: RawFd = 3;

impl Qemu {
    /// Start `bin` with `args` plus a QMP monitor. The monitor's listening
    /// socket is created here and handed to QEMU as fd 3, so the client
    /// connects at once; the greeting is awaited for at most `timeout`.
    pub fn start(bin: &Path, args: &[String], timeout: Duration) -> Result<Qemu, Error> {
        let dir = tempfile::tempdir().map_err(|source| Error::Socket {
            path: std::env::temp_dir(),
            source,
        })?;
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).map_err(|source| Error::Socket {
            path: sock.clone(),
            source,
        })?;
        let lfd = listener.as_raw_fd();
        let stderr =
            fs::File::create(dir.path().join("stderr")).map_err(|source| Error::Socket {
                path: dir.path().join("stderr"),
                source,
            })?;
        let mut cmd = Command::new(bin);
        cmd.args([
            "-nodefaults",
            "-display",
            "none",
            "-chardev",
            &format!("socket,id=qmp,fd={MONITOR_FD},server=on,wait=off"),
            "-mon",
            "chardev=qmp,mode=control",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setrlimit, fcntl and dup2, which are async-signal-safe; `lfd`
        // is open in the parent (the listener lives until after spawn returns).
        unsafe {
            cmd.pre_exec(move || {
                // A QEMU that drops root (`-run-with user=`) loses CAP_IPC_LOCK
                // and pins guest RAM for VFIO again at every unpause: no
                // locked-memory limit (set while still root, kept across setuid).
                let unlimited = libc::rlimit {
                    rlim_cur: libc::RLIM_INFINITY,
                    rlim_max: libc::RLIM_INFINITY,
                };
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = if lfd == MONITOR_FD {
                    libc::fcntl(lfd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(lfd, MONITOR_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            path: bin.to_path_buf(),
            source,
        })?;
        drop(listener);
        let pid = child.id();
        let read_stderr = |dir: &Path| fs::read_to_string(dir.join("stderr")).unwrap_or_default();
        let qmp = match Client::connect(&sock, timeout) {
            Ok(c) => c,
            Err(source) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Qmp {
                    pid,
                    source,
                    stderr: read_stderr(dir.path()),
                });
            }
        };
        // Client::connect negotiated the capabilities already.
        Ok(Qemu {
            child: Some(child),
            pid,
            qmp,
            dir,
        })
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What QEMU wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Run a QMP command; a QMP error response is `Err` (see [`Qemu::try_execute`]).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, Error> {
        let pid = self.pid();
        self.qmp
            .execute(command, arguments)
            .map_err(|source| Error::Qmp {
                pid,
                source,
                stderr: self.stderr(),
            })
    }

    /// Run a QMP command and return its error response as `Err((class, desc))`;
    /// a transport failure panics with QEMU's stderr.
    pub fn try_execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, (String, String)> {
        match self.qmp.execute(command, arguments) {
            Ok(v) => Ok(v),
            Err(e) => match e.qmp() {
                Some(q) => Err((format!("{:?}", q.class), q.desc.clone())),
                None => panic!(
                    "{command} on QEMU {}: {e}; stderr: {}",
                    self.pid(),
                    self.stderr()
                ),
            },
        }
    }

    /// Hand `fd` to QEMU under `fdname` (`getfd` with SCM_RIGHTS).
    pub fn send_fd(&mut self, fdname: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), Error> {
        let pid = self.pid();
        self.qmp.send_fd(fdname, fd).map_err(|source| Error::Qmp {
            pid,
            source,
            stderr: self.stderr(),
        })
    }

    /// QMP events received so far (and not yet taken).
    pub fn take_events(&mut self) -> Vec<qmp_ext::Event> {
        self.qmp.take_events()
    }

    /// Targets of QEMU's open fds (`/proc/<pid>/fd/*` links).
    pub fn fd_links(&self) -> Vec<String> {
        fd_links(self.pid())
    }

    /// The fds that belong to VFIO devices or groups: `/dev/vfio/<n>` and
    /// `anon_inode:[vfio-device]` (the container `/dev/vfio/vfio` is not one).
    pub fn vf_fds(&self) -> Vec<String> {
        self.fd_links()
            .into_iter()
            .filter(|l| {
                l.contains("vfio-device")
                    || l.strip_prefix("/dev/vfio/")
                        .is_some_and(|g| g.chars().all(|c| c.is_ascii_digit()))
            })
            .collect()
    }

    /// Quit QEMU and wait (bounded) for it to exit; returns its exit status.
    /// `None` (and QEMU killed) when it did not exit in time.
    pub fn quit(mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = self.qmp.execute("quit", None);
        let mut child = self.child.take()?;
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let r = child.wait();
            let _ = tx.send(r);
            child
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(status)) => Some(status),
            _ => {
                // SAFETY: kill(2) on the pid of our own child, which the
                // waiter thread has not reaped (no status was received).
                unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
                let _ = waiter.join();
                None
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Targets of the fd links of process `pid`.
pub fn fd_links(pid: u32) -> Vec<String> {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    rd.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.display().to_string())
        .collect()
}
