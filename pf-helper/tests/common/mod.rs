//! Shared by pf-helper's lab tests that drive the real `svff` CLI in L1 (`lab_orch`,
//! `lab_orch_pause`, `lab_pool`, `lab_pf_helper`, `lab_libvirt`): running svff under a
//! deadline, the nvme PF released, the binaries copied into L1's RAM, the VMM processes svff
//! supervises, the svff-vmm test guests' serial consoles (their counter lines), and the wait
//! for a started `svff helper` daemon to listen.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use svff_lab::guest::{self, set_numvfs, unbind, vfs_of};
pub use svff_types::{parse_counters, GuestCounters as Counters};

/// The `svff` binary cargo built for the tests.
pub const SVFF: &str = env!("CARGO_BIN_EXE_svff");
/// Upper bound of one CLI call (seconds, for `timeout(1)`).
pub const CALL_TIMEOUT_S: &str = "300";
/// Bound of every wait for a test guest's report.
pub const GUEST_WAIT: Duration = Duration::from_secs(180);

/// Runs `svff` (the binary at `bin`) under `timeout(1)` with `env`, printing what it said
/// and how long it took.
pub fn svff_env(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg(CALL_TIMEOUT_S).arg(bin).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let out = cmd.output().expect("run timeout(1)");
    eprintln!(
        "$ svff {}   [{:.1} s]\n{}{}",
        args.join(" "),
        start.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The JSON an `svff ... --json` call printed; panics (with its stderr) if it failed.
pub fn json_of(args: &[&str], out: &Output) -> Value {
    assert!(
        out.status.success(),
        "svff {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("svff printed JSON")
}

/// Releases the lab's nvme PF (no VFs, nothing bound) and loads the modules the tests use;
/// returns the PF's address.
pub fn released_nvme_pf(modules: &[&str]) -> String {
    guest::require_lab();
    let pf = guest::nvme_pf();
    if guest::driver_of(&pf).is_some() {
        set_numvfs(&pf, 0);
    }
    for vf in vfs_of(&pf) {
        unbind(&vf);
    }
    unbind(&pf);
    for m in modules {
        guest::modprobe(m);
    }
    pf
}

/// The pid svff recorded for `vm` (`<state>/vm-<vm>.pid`).
pub fn pid_of(state: &Path, vm: &str) -> Option<u32> {
    fs::read_to_string(state.join(format!("vm-{vm}.pid")))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `R`, `S`, `T`, `Z`, ... of `pid`, `None` once it is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim().chars().next()
}

/// Waits (60 s at most) until `pid` is in one of the states `want`.
pub fn wait_proc_state(pid: u32, want: &[Option<char>], what: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    while !want.contains(&proc_state(pid)) {
        assert!(
            Instant::now() < end,
            "{what}: pid {pid} is {:?}",
            proc_state(pid)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `sig` (a name: `KILL`, `STOP`, ...) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// Kills the VMMs svff started for `vms` (continuing a stopped one first) and waits until
/// each is gone or a zombie: the cleanup of a test's setup.
pub fn kill_vmms(state: &Path, vms: &[&str]) {
    for vm in vms {
        if let Some(pid) = pid_of(state, vm) {
            if proc_state(pid).is_some_and(|s| s != 'Z') {
                let _ = Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                wait_proc_state(pid, &[None, Some('Z')], "VMM killed at cleanup");
            }
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let l: Vec<&str> = text.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

/// A VM's serial console, as svff's supervision writes it (`<state>/vm-<name>.serial`).
///
/// The test guests print a line per device every few rounds, so the file grows by megabytes
/// in a test: it is read incrementally (only what was appended since the last look, parsed
/// once), never whole on every poll.
pub struct Serial {
    path: PathBuf,
    seen: RefCell<Seen>,
}

/// What a [`Serial`] has read so far.
#[derive(Default)]
struct Seen {
    /// Bytes of the file consumed (complete lines only).
    offset: u64,
    /// The last counter report of each device.
    last: HashMap<String, Counters>,
    /// `(dev, event)` -> lines `svff-guest: dev=<dev> event=<event>`.
    events: HashMap<(String, String), usize>,
    /// `event` -> lines containing ` event=<event>` (any device).
    any_events: HashMap<String, usize>,
}

impl Serial {
    pub fn new(path: PathBuf) -> Serial {
        Serial {
            path,
            seen: RefCell::new(Seen::default()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every complete line written so far (the whole file: for small consoles and messages).
    pub fn text(&self) -> String {
        let t = fs::read_to_string(&self.path).unwrap_or_default();
        t[..t.rfind('\n').map_or(0, |i| i + 1)].to_string()
    }

    /// Reads the complete lines appended since the last call (from the start again if the
    /// file got shorter) and records their reports and events.
    fn update(&self) {
        let mut seen = self.seen.borrow_mut();
        let Ok(mut f) = fs::File::open(&self.path) else {
            return;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < seen.offset {
            *seen = Seen::default();
        }
        if f.seek(SeekFrom::Start(seen.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        seen.offset += end as u64 + 1;
        for line in String::from_utf8_lossy(&buf[..=end]).lines() {
            if let Some(c) = parse_counters(line) {
                seen.last.insert(c.dev.clone(), c);
                continue;
            }
            if let Some((_, ev)) = line.split_once(" event=") {
                let ev = ev.split_whitespace().next().unwrap_or("").to_owned();
                *seen.any_events.entry(ev.clone()).or_default() += 1;
                if let Some(dev) = line
                    .trim()
                    .strip_prefix("svff-guest: dev=")
                    .and_then(|r| r.strip_suffix(&format!(" event={ev}")))
                {
                    *seen.events.entry((dev.to_owned(), ev)).or_default() += 1;
                }
            }
        }
    }

    /// The last counter report of `dev` (`00:DD.F`).
    pub fn last(&self, dev: &str) -> Option<Counters> {
        self.update();
        self.seen.borrow().last.get(dev).cloned()
    }

    /// How often `dev` printed `event` (`gone`, `back`).
    pub fn events(&self, dev: &str, event: &str) -> usize {
        self.update();
        let seen = self.seen.borrow();
        seen.events
            .get(&(dev.to_owned(), event.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// How often any device printed `event`.
    pub fn all_events(&self, event: &str) -> usize {
        self.update();
        self.seen
            .borrow()
            .any_events
            .get(event)
            .copied()
            .unwrap_or(0)
    }

    /// The latest report of `dev` once its round is past `round` (bounded wait).
    pub fn report_after(&self, dev: &str, round: u64) -> Counters {
        let end = Instant::now() + GUEST_WAIT;
        loop {
            if let Some(c) = self.last(dev).filter(|c| c.round > round) {
                return c;
            }
            assert!(
                Instant::now() < end,
                "no report of {dev} after round {round} in {}:\n{}",
                self.path.display(),
                tail(&self.text(), 30)
            );
            // The guest gives no other sign than its next line.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `dev` printed `event` `n` times.
    pub fn wait_events(&self, dev: &str, event: &str, n: usize) {
        let end = Instant::now() + GUEST_WAIT;
        while self.events(dev, event) < n {
            assert!(
                Instant::now() < end,
                "{dev} never printed event={event} x{n} in {}:\n{}",
                self.path.display(),
                tail(&self.text(), 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// For every `(serial, dev, round)`: the latest report of `dev` past `round`. The rounds
/// are the caller's, all taken before this waits, so the guests' next reports are awaited
/// together (one report interval for all devices, not one per device).
pub fn reports_past(waits: &[(&Serial, &str, u64)]) -> Vec<Counters> {
    waits
        .iter()
        .map(|(s, dev, round)| s.report_after(dev, *round))
        .collect()
}

/// Sets the shell's autogroup nice to 19. The kernel refuses (`EAGAIN`) a caller without
/// CAP_SYS_ADMIN (an unprivileged VMM) within 100 ms of anyone's last change, as when two
/// VMMs start together: retried every 0.1 s, 5 s at most (without it the VMM only runs at
/// its autogroup's default priority).
const LOWER_AUTOGROUP: &str = "i=0; until { echo 19 > /proc/self/autogroup; } 2>/dev/null || [ $i -ge 50 ]; do i=$((i + 1)); sleep 0.1; done";

/// The TOML array of a `[[vm]]` `command` that runs `vmm` with `args` at the lowest CPU
/// priority, so that L1 still runs svff and the test while the test guests read in a busy
/// loop. `nice -n 19` alone does not do it: svff starts each VMM in a session of its own,
/// hence in a scheduler autogroup of its own, where a nice value only ranks the VMM against
/// its own threads, and every autogroup gets an equal share (with four busy guests svff got a
/// fifth of L1's CPU). The autogroup's nice is set to 19 too (`/proc/self/autogroup`; raising
/// it needs no privilege).
pub fn low_priority_vmm_command(vmm: &Path, args: &[&str]) -> String {
    let mut words = vec![
        r#""/bin/sh""#.to_owned(),
        r#""-c""#.to_owned(),
        format!("'{LOWER_AUTOGROUP}; exec /usr/bin/nice -n 19 \"$@\"'"),
        r#""svff-vmm""#.to_owned(),
        format!("\"{}\"", vmm.display()),
    ];
    words.extend(args.iter().map(|a| format!("\"{a}\"")));
    format!("[{}]", words.join(", "))
}

/// The directory of the test process's copies of the binaries in L1's RAM
/// (`/tmp/svff-lab-bin-<pid>`, mode 0755: other users run them too).
fn ram_bin_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(format!("/tmp/svff-lab-bin-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        dir
    })
}

/// Copies `from` into [`ram_bin_dir`] as `name` (mode 0755).
fn copy_to_ram(from: &Path, name: &str) -> PathBuf {
    assert!(
        from.exists(),
        "{} missing: cargo build --workspace",
        from.display()
    );
    let to = ram_bin_dir().join(name);
    fs::copy(from, &to).unwrap();
    fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).unwrap();
    to
}

/// `svff` copied once per test process into L1's RAM: run from the 9p host root, every call
/// would page the 60 MB debug binary in again (and every test copying it again costs
/// seconds).
pub fn svff_in_ram() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| copy_to_ram(Path::new(SVFF), "svff"))
}

/// `svff-vmm` (built beside `svff`) copied once per test process into L1's RAM.
pub fn svff_vmm_in_ram() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| copy_to_ram(&Path::new(SVFF).with_file_name("svff-vmm"), "svff-vmm"))
}

/// The `command` of an svff-vmm VM running the built-in test guest (32 MiB, no emulated test
/// devices, a counter report every `report_every` rounds) at the lowest priority.
pub fn test_guest_command(report_every: u64) -> String {
    let every = report_every.to_string();
    low_priority_vmm_command(
        svff_vmm_in_ram(),
        &[
            "--memory",
            "32M",
            "--test-devices",
            "0",
            "--guest-report-every",
            &every,
        ],
    )
}

/// Waits (at most 60 s) for a just-started `svff helper` daemon's first stdout line and asserts
/// it says the daemon listens. The line is read in a thread so the wait stays bounded.
pub fn await_helper_listening(stdout: std::process::ChildStdout) {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("svff helper did not report listening within 60 s");
    assert!(
        line.starts_with("svff helper listening on"),
        "helper said {line:?}"
    );
}
