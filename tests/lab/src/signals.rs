//! Cleanup on SIGINT, SIGTERM and SIGHUP: `svff-lab run` / `test` stopped by a signal (Ctrl-C,
//! `kill`, a CI timeout) must not leave its session directory or a QEMU behind.
//!
//! [`exit_cleanly_on_signals`] blocks those signals in the calling thread (and so in every thread
//! it spawns later) and hands them to a thread of their own that waits for them with
//! `sigwait(2)`: ordinary code, not a signal handler, so it may take locks and touch files. On a
//! signal it removes this process's session directories, kills its QEMU children with SIGKILL
//! and waits until they are gone, passes the signal on to the other children (e.g. cargo) and
//! exits with 128 + the signal number, as a shell reports a killed command.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::session::TMP_PREFIX;

/// The signals that end `svff-lab` with a cleanup.
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Held by the cleanup from its start until the process exits.
static CLEANUP: Mutex<()> = Mutex::new(());
/// Set (under [`CLEANUP`]) when a cleanup has started.
static CLEANING: AtomicBool = AtomicBool::new(false);

/// Call before `main` returns: once a signal's cleanup has started (killing QEMU makes the
/// command in progress fail), this waits for it to end the process with its own status
/// instead of racing it with another.
pub fn await_signal_cleanup() {
    if CLEANING.load(Ordering::SeqCst) {
        let _never = CLEANUP.lock();
        // The cleanup holds the lock until it exits the process.
        loop {
            std::thread::park();
        }
    }
}

/// How long the cleanup waits for a killed QEMU to be reaped (it dies at once; this is a bound).
const REAP_WAIT: Duration = Duration::from_secs(10);

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set it is given; sigaddset adds valid signal
    // numbers to that initialised set. Both only write to `set`, which lives on this stack.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Installs the cleanup. Call it first in `main`, before any thread is spawned (threads inherit
/// the signal mask; std's `Command` resets the mask in the programs it starts).
pub fn exit_cleanly_on_signals() -> std::io::Result<()> {
    let set = signal_set();
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("svff-lab-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised sigset_t holding signals blocked in every thread;
            // `sig` is a valid place for the signal number.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                cleanup(sig);
            }
        })?;
    Ok(())
}

/// Pids and names (`comm`) of this process's children, from /proc.
fn children() -> Vec<(i32, String)> {
    let me = std::process::id().to_string();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1.to_owned();
            let ppid = rest.split_whitespace().nth(1)?;
            (ppid == me).then_some((pid, comm))
        })
        .collect()
}

/// This process's session directories under `tmp`.
fn session_dirs(tmp: &Path) -> Vec<PathBuf> {
    let mine = format!("{TMP_PREFIX}{}.", std::process::id());
    fs::read_dir(tmp)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&mine))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn cleanup(sig: libc::c_int) -> ! {
    let _held = CLEANUP.lock().unwrap_or_else(|p| p.into_inner());
    CLEANING.store(true, Ordering::SeqCst);
    eprintln!("\nsvff-lab: signal {sig}: stopping L1 and removing the session directory");
    // First the directories (QEMU's open files in them do not matter), so that they are gone
    // whatever happens next.
    for dir in session_dirs(&std::env::temp_dir()) {
        if let Err(e) = fs::remove_dir_all(&dir) {
            eprintln!("svff-lab: cannot remove {}: {e}", dir.display());
        }
    }
    let kids = children();
    let qemus: Vec<i32> = kids
        .iter()
        .filter(|(_, comm)| comm.starts_with("qemu"))
        .map(|(pid, _)| *pid)
        .collect();
    for (pid, comm) in &kids {
        let s = if comm.starts_with("qemu") {
            libc::SIGKILL
        } else {
            sig
        };
        // SAFETY: kill(2) on a child of this process (not yet reaped: it is listed in /proc
        // with us as parent, so the pid cannot be another process's); no memory is involved.
        unsafe { libc::kill(*pid, s) };
    }
    // The threads that started QEMU reap it; wait (bounded) until they have.
    let deadline = Instant::now() + REAP_WAIT;
    while Instant::now() < deadline
        && qemus
            .iter()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::process::exit(128 + sig);
}
