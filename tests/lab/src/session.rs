//! A booted L1: QEMU running the lab machine, and the agent connection to run commands in it.
//! Dropping a [`Lab`] kills QEMU and removes the session's temporary directory; QEMU also dies
//! with the process that started it (parent-death signal), so nothing is left behind.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::initramfs::ensure_initramfs;
use crate::proto::{Reply, Request, Stream};
use crate::{LabConfig, LabError};

/// Session directories are `<tmp>/svff-lab.<pid>.<nanos>`.
pub(crate) const TMP_PREFIX: &str = "svff-lab.";

/// The result of a command run in L1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Output {
    /// True when the command exited with status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// How the machine is wired; shared by [`Lab::boot`] and [`shell`].
///
/// `no_timer_check`: under a loaded host, TCG can miss the few PIT ticks the kernel waits for
/// while it checks the IO-APIC timer path, and the kernel then panics ("timer doesn't work
/// through Interrupt-remapped IO-APIC"; 3 of 20 boots in the 2026-12-01 campaign, at load average 10).
///
/// The nvme PF's subsystem holds one shared namespace (NSID 1) backed by `ns_image`, a sparse
/// [`NS_IMAGE_BYTES`] file in the session directory ([`make_ns_image`]): QEMU attaches a shared
/// namespace to every controller of the subsystem when that controller is enabled, so the PF
/// and every online secondary controller (VF) see it, and an L2 guest with a VF can do I/O.
fn machine_args(cfg: &LabConfig, initrd: &Path, ns_image: &Path, mode: &str) -> Vec<String> {
    let mut append = format!(
        "console=ttyS0 intel_iommu=on iommu=pt quiet loglevel=4 panic=-1 no_timer_check rdinit=/init svff.mode={mode} svff.agent={}",
        cfg.agent.display()
    );
    for k in &cfg.keep {
        append.push_str(&format!(" svff.keep={}", k.display()));
    }
    if !cfg.extra_append.is_empty() {
        append.push(' ');
        append.push_str(&cfg.extra_append);
    }
    let args = [
        "-machine", "q35,kernel-irqchip=split",
        "-cpu", "max",
        "-nodefaults", "-no-reboot", "-display", "none",
        "-device", "intel-iommu,intremap=on,caching-mode=on",
        "-device", "pcie-root-port,id=rp0,slot=1,chassis=1",
        "-device", "igb,bus=rp0,netdev=n0",
        "-netdev", "user,id=n0,restrict=on",
        "-device", "pcie-root-port,id=rp1,slot=2,chassis=2",
        "-device", "nvme-subsys,id=sub0",
        "-device", "nvme,id=nvme0,bus=rp1,serial=d1,subsys=sub0,sriov_max_vfs=64,sriov_vq_flexible=128,sriov_vi_flexible=64,sriov_max_vq_per_vf=16,sriov_max_vi_per_vf=8,max_ioqpairs=130,msix_qsize=80",
        "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on",
        "-device", "virtio-serial-pci,id=vser",
        "-device", "virtserialport,bus=vser.0,chardev=ctl,name=svff.ctl",
        // An MSI-only function behind the IOMMU for plain-MSI passthrough tests (see
        // `guest::edu`); at a fixed slot after everything else, so no other BDF moves.
        "-device", "edu,addr=10.0",
    ];
    let mut v: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    v.extend([
        "-drive".into(),
        format!("if=none,id=nvm0,format=raw,file={}", ns_image.display()),
        "-device".into(),
        "nvme-ns,drive=nvm0,bus=nvme0,nsid=1,shared=on".into(),
    ]);
    // Single-threaded TCG by default (see `TcgThread`): with thread=multi, QEMU 10.0.2 now and
    // then loses a vCPU's LAPIC timer interrupt and that CPU idles forever.
    v.extend([
        "-accel".into(),
        format!("tcg,thread={}", cfg.tcg_thread.as_str()),
    ]);
    v.extend(cfg.extra_qemu_args.iter().cloned());
    v.extend([
        "-smp".into(),
        cfg.cpus.to_string(),
        "-m".into(),
        cfg.memory_mib.to_string(),
        "-kernel".into(),
        cfg.kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        append,
    ]);
    v
}

/// Size of the lab's shared nvme namespace (512-byte blocks: 32768).
pub const NS_IMAGE_BYTES: u64 = 16 << 20;

/// Creates the namespace's backing file `dir/nvme-ns1.img` (sparse, zeros) and returns its path.
/// One per session: QEMU locks its image, so two labs must never share one.
fn make_ns_image(dir: &Path) -> Result<PathBuf, LabError> {
    let p = dir.join("nvme-ns1.img");
    let f = fs::File::create(&p).map_err(|e| LabError::io(&p, e))?;
    f.set_len(NS_IMAGE_BYTES).map_err(|e| LabError::io(&p, e))?;
    Ok(p)
}

/// Removes session directories left by processes that no longer exist (e.g. killed by SIGKILL).
fn sweep_stale_dirs(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(TMP_PREFIX)
            .and_then(|r| r.split('.').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether `pid` exists; it sends nothing.
        let gone = unsafe { libc::kill(pid, 0) } == -1
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

pub(crate) fn make_session_dir() -> Result<PathBuf, LabError> {
    let tmp = std::env::temp_dir();
    sweep_stale_dirs(&tmp);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = tmp.join(format!("{TMP_PREFIX}{}.{nanos:x}", std::process::id()));
    fs::create_dir(&dir).map_err(|e| LabError::io(&dir, e))?;
    Ok(dir)
}

/// Spawns QEMU from a thread that lives exactly as long as QEMU: the parent-death signal is tied
/// to the spawning thread, so QEMU is killed if this process dies. Returns the pid and a channel
/// that yields QEMU's exit status once it has ended.
pub(crate) fn spawn_qemu(mut cmd: Command) -> Result<(i32, mpsc::Receiver<ExitStatus>), LabError> {
    let (pid_tx, pid_rx) = mpsc::channel();
    let (exit_tx, exit_rx) = mpsc::channel();
    thread::Builder::new()
        .name("svff-lab-qemu".into())
        .spawn(move || {
            // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
            // which is async-signal-safe; it touches no memory shared with the parent.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            match cmd.spawn() {
                Ok(mut child) => {
                    let _ = pid_tx.send(Ok(child.id() as i32));
                    if let Ok(st) = child.wait() {
                        let _ = exit_tx.send(st);
                    }
                }
                Err(e) => {
                    let _ = pid_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| LabError::Vm(format!("cannot start the QEMU thread: {e}")))?;
    let pid = pid_rx
        .recv()
        .map_err(|_| LabError::Vm("QEMU thread ended early".into()))?
        .map_err(|e| LabError::Vm(format!("cannot run QEMU: {e}")))?;
    Ok((pid, exit_rx))
}

/// A booted L1 with its agent connected.
#[derive(Debug)]
pub struct Lab {
    pid: i32,
    exited: mpsc::Receiver<ExitStatus>,
    dir: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    dead: bool,
    kernel: String,
    up: bool,
    stall_timeout: Duration,
    /// Last heartbeat seen from each of L1's CPUs.
    beats: std::collections::BTreeMap<u32, Instant>,
    /// Time from QEMU start to the agent's hello.
    pub boot_time: Duration,
}

impl Lab {
    /// Boots L1 and waits for its agent. Fails with a clear message (and kills QEMU) when
    /// something is missing or L1 does not come up within `cfg.boot_timeout`.
    pub fn boot(cfg: &LabConfig) -> Result<Lab, LabError> {
        let initrd = ensure_initramfs(&cfg.kernel_version, &cfg.cache_dir)?;
        let dir = make_session_dir()?;
        let result = Self::boot_in(cfg, &initrd, dir.clone());
        if result.is_err() {
            let _ = fs::remove_dir_all(&dir);
        }
        result
    }

    fn boot_in(cfg: &LabConfig, initrd: &Path, dir: PathBuf) -> Result<Lab, LabError> {
        let sock = dir.join("ctl.sock");
        let listener = UnixListener::bind(&sock).map_err(|e| LabError::io(&sock, e))?;
        let console = dir.join("console.log");
        let qemu_err = fs::File::create(dir.join("qemu.stderr"))
            .map_err(|e| LabError::io(dir.join("qemu.stderr"), e))?;
        let ns_image = make_ns_image(&dir)?;
        let mut cmd = Command::new(&cfg.qemu);
        cmd.args(machine_args(cfg, initrd, &ns_image, "run"))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-chardev")
            .arg(format!("socket,id=ctl,path={}", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(qemu_err);
        let start = Instant::now();
        let (pid, exited) = spawn_qemu(cmd)?;
        // From here on, a Lab value owns QEMU and the directory: any error drops it, which kills
        // QEMU and removes the directory.
        let pending = PendingLab {
            pid,
            dir: Some(dir),
            exited: Some(exited),
        };
        let deadline = start + cfg.boot_timeout;
        let stream = pending.accept(&listener, deadline)?;
        let writer = stream.try_clone().map_err(|e| LabError::io(&sock, e))?;
        let (pid, dir, exited) = pending.into_parts();
        let mut lab = Lab {
            pid,
            exited,
            dir,
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            dead: false,
            kernel: String::new(),
            up: false,
            beats: Default::default(),
            stall_timeout: cfg.stall_timeout,
            boot_time: Duration::ZERO,
        };
        match lab.next_reply(start, deadline, "booting (waiting for the agent in L1)")? {
            Reply::Ready { kernel } => {
                lab.kernel = kernel;
                lab.up = true;
            }
            other => {
                return Err(LabError::Vm(format!(
                    "unexpected first message from the agent: {other:?}"
                )))
            }
        }
        lab.boot_time = start.elapsed();
        Ok(lab)
    }

    /// The pid of the L0 QEMU process running L1.
    pub fn qemu_pid(&self) -> i32 {
        self.pid
    }

    /// This session's temporary directory (control socket, console log); removed on drop.
    pub fn session_dir(&self) -> &Path {
        &self.dir
    }

    /// L1's kernel release.
    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    /// The last `lines` lines of L1's console.
    pub fn console_tail(&self, lines: usize) -> String {
        console_tail_of(&self.dir, lines)
    }

    /// Reads one reply, failing (and killing L1) if it does not come before `deadline`.
    fn next_reply(
        &mut self,
        started: Instant,
        deadline: Instant,
        what: &str,
    ) -> Result<Reply, LabError> {
        let mut line = String::new();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timeout(what, started));
        }
        // Before the agent is up there are no heartbeats: only the deadline counts.
        let wait = if self.up {
            left.min(self.stall_timeout)
        } else {
            left
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(wait))
            .map_err(|e| LabError::io(&self.dir, e))?;
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(self.died(what)),
            Ok(_) => serde_json::from_str(&line).map_err(|e| {
                LabError::Vm(format!(
                    "garbled message from the agent ({e}): {}",
                    line.trim()
                ))
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= deadline {
                    Err(self.timeout(what, started))
                } else {
                    self.kill();
                    Err(LabError::Stalled {
                        what: what.to_owned(),
                        silent: wait,
                        console: self.console_tail(30),
                    })
                }
            }
            Err(e) => Err(LabError::Vm(format!("reading from the agent: {e}"))),
        }
    }

    fn timeout(&mut self, what: &str, started: Instant) -> LabError {
        let after = started.elapsed();
        self.kill();
        LabError::Timeout {
            what: what.to_owned(),
            after,
            console: self.console_tail(30),
        }
    }

    fn died(&mut self, what: &str) -> LabError {
        self.kill();
        let status = self
            .exited
            .try_recv()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "unknown status".into());
        let qemu_err = fs::read_to_string(self.dir.join("qemu.stderr")).unwrap_or_default();
        LabError::Vm(format!(
            "QEMU exited ({status}) while {what}.\nQEMU said: {}\nLast console lines:\n{}",
            qemu_err.trim(),
            self.console_tail(30)
        ))
    }

    /// Runs `argv` in L1 as root, streaming output to `sink` as it comes. On timeout L1 is
    /// killed and every later call fails.
    pub fn run_streaming(
        &mut self,
        argv: &[&str],
        env: &[(&str, &str)],
        timeout: Duration,
        mut sink: impl FnMut(Stream, &str),
    ) -> Result<(Option<i32>, Option<i32>), LabError> {
        if self.dead {
            return Err(LabError::Vm(
                "is no longer running (an earlier command timed out or QEMU died)".into(),
            ));
        }
        let id = self.next_id;
        self.next_id += 1;
        let cwd = std::env::current_dir()
            .ok()
            .map(|p| p.display().to_string());
        let req = Request {
            id,
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            cwd,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        let mut line = serde_json::to_vec(&req).map_err(|e| LabError::Invalid(e.to_string()))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| LabError::Vm(format!("sending to the agent: {e}")))?;
        let started = Instant::now();
        let deadline = started + timeout;
        // Beats may have waited in the socket while we were not reading: give every CPU a
        // fresh grace period rather than blaming it for our own absence.
        for t in self.beats.values_mut() {
            *t = started;
        }
        let what = format!("running `{}`", argv.join(" "));
        loop {
            match self.next_reply(started, deadline, &what)? {
                Reply::Heartbeat { cpu } => {
                    self.beats.insert(cpu, Instant::now());
                    // A CPU whose beat stopped while others go on: its timers are dead.
                    if let Some((&dead, _)) = self
                        .beats
                        .iter()
                        .find(|(_, t)| t.elapsed() > self.stall_timeout)
                    {
                        let silent = self.stall_timeout;
                        self.kill();
                        return Err(LabError::Stalled {
                            what: format!("{what} (CPU {dead} of L1 went silent)"),
                            silent,
                            console: self.console_tail(30),
                        });
                    }
                }
                Reply::Output {
                    id: rid,
                    stream,
                    data,
                } if rid == id => sink(stream, &data),
                Reply::Exit {
                    id: rid,
                    code,
                    signal,
                } if rid == id => return Ok((code, signal)),
                Reply::Error { id: rid, message } if rid == id => {
                    return Err(LabError::Agent(message))
                }
                other => {
                    return Err(LabError::Vm(format!(
                        "unexpected message from the agent: {other:?}"
                    )))
                }
            }
        }
    }

    /// Runs `argv` in L1 as root and collects its output.
    pub fn run(&mut self, argv: &[&str], timeout: Duration) -> Result<Output, LabError> {
        let (mut stdout, mut stderr) = (String::new(), String::new());
        let (code, signal) = self.run_streaming(argv, &[], timeout, |s, d| match s {
            Stream::Stdout => stdout.push_str(d),
            Stream::Stderr => stderr.push_str(d),
        })?;
        Ok(Output {
            code,
            signal,
            stdout,
            stderr,
        })
    }

    /// Runs a shell script in L1 (`bash -c`).
    pub fn sh(&mut self, script: &str, timeout: Duration) -> Result<Output, LabError> {
        self.run(&["bash", "-euo", "pipefail", "-c", script], timeout)
    }

    fn kill(&mut self) {
        if !self.dead {
            self.dead = true;
            kill_and_reap(self.pid, &self.exited);
        }
    }
}

pub(crate) fn kill_and_reap(pid: i32, exited: &mpsc::Receiver<ExitStatus>) {
    // SAFETY: `pid` is our QEMU child, not yet reaped: the thread that waits for it reports on
    // `exited`, and we only receive from that after the kill, so the pid cannot be reused yet.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = exited.recv_timeout(Duration::from_secs(30));
}

pub(crate) fn console_tail_of(dir: &Path, lines: usize) -> String {
    let text = fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What [`accept_before`] saw first.
pub(crate) enum Accepted {
    /// The VMM connected.
    Stream(UnixStream),
    /// The VMM exited first.
    Exited(ExitStatus),
    /// Neither happened before the deadline.
    TimedOut,
}

/// Waits, until `deadline`, for a VMM to connect to `listener`, or to exit (`exited`).
pub(crate) fn accept_before(
    listener: &UnixListener,
    deadline: Instant,
    exited: &mpsc::Receiver<ExitStatus>,
) -> Result<Accepted, LabError> {
    loop {
        if let Ok(st) = exited.try_recv() {
            return Ok(Accepted::Exited(st));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Accepted::TimedOut);
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let slice = left.min(Duration::from_millis(250)).as_millis() as libc::c_int;
        // SAFETY: `pfd` is a valid pollfd for the listener's open fd and we pass a count of 1.
        let n = unsafe { libc::poll(&mut pfd, 1, slice) };
        if n > 0 {
            return listener
                .accept()
                .map(|(s, _)| Accepted::Stream(s))
                .map_err(|e| LabError::Vm(format!("accepting the VMM's connection: {e}")));
        }
    }
}

/// QEMU started but the agent not connected yet; kills QEMU and removes the directory on drop.
struct PendingLab {
    pid: i32,
    dir: Option<PathBuf>,
    exited: Option<mpsc::Receiver<ExitStatus>>,
}

impl PendingLab {
    fn accept(&self, listener: &UnixListener, deadline: Instant) -> Result<UnixStream, LabError> {
        let exited = self.exited.as_ref().expect("present until into_parts");
        let dir = self.dir.as_deref().expect("present until into_parts");
        match accept_before(listener, deadline, exited)? {
            Accepted::Stream(s) => Ok(s),
            Accepted::Exited(st) => {
                let qemu_err = fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default();
                Err(LabError::Vm(format!(
                    "QEMU exited ({st}) at start: {}",
                    qemu_err.trim()
                )))
            }
            Accepted::TimedOut => Err(LabError::Timeout {
                what: "waiting for QEMU to open the control socket".into(),
                after: Duration::ZERO,
                console: console_tail_of(dir, 30),
            }),
        }
    }

    fn into_parts(mut self) -> (i32, PathBuf, mpsc::Receiver<ExitStatus>) {
        let exited = self.exited.take().expect("present until into_parts");
        let dir = self.dir.take().expect("present until into_parts");
        (self.pid, dir, exited)
    }
}

impl Drop for PendingLab {
    fn drop(&mut self) {
        if let Some(exited) = &self.exited {
            kill_and_reap(self.pid, exited);
        }
        if let Some(dir) = &self.dir {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Boots L1 with its console on this terminal and a root shell in it; returns when the shell
/// exits (L1 powers off) or QEMU is quit (Ctrl-A X).
pub fn shell(cfg: &LabConfig) -> Result<ExitStatus, LabError> {
    let initrd = ensure_initramfs(&cfg.kernel_version, &cfg.cache_dir)?;
    let dir = make_session_dir()?;
    let result = (|| {
        let ns_image = make_ns_image(&dir)?;
        let mut cmd = Command::new(&cfg.qemu);
        cmd.args(machine_args(cfg, &initrd, &ns_image, "shell"))
            .args(["-serial", "mon:stdio", "-chardev", "null,id=ctl"]);
        let (_pid, exited) = spawn_qemu(cmd)?;
        exited
            .recv()
            .map_err(|_| LabError::Vm("QEMU thread ended without a status".into()))
    })();
    let _ = fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_dirs_of_dead_processes_only() {
        let root = std::env::temp_dir().join(format!("svff-lab-sweep-test.{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        // A pid that surely is dead: a child we ran and reaped.
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = root.join(format!("{TMP_PREFIX}{dead}.1"));
        let live = root.join(format!("{TMP_PREFIX}{}.2", std::process::id()));
        let other = root.join("unrelated.123");
        for d in [&stale, &live, &other] {
            fs::create_dir_all(d.join("sub")).unwrap();
        }
        sweep_stale_dirs(&root);
        assert!(!stale.exists(), "dir of dead pid {dead} must be removed");
        assert!(live.exists(), "dir of a live process must stay");
        assert!(other.exists(), "unrelated dirs must stay");
        fs::remove_dir_all(&root).unwrap();
    }
}
