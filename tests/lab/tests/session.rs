//! Host-side tests of the lab API: they boot L1 (twice) under QEMU.

use std::path::PathBuf;
use std::time::Duration;

use svff_lab::{Lab, LabConfig, LabError};

fn config() -> LabConfig {
    let mut cfg = LabConfig::detect().expect("lab prerequisites (run `make deps`)");
    cfg.agent = PathBuf::from(env!("CARGO_BIN_EXE_svff-lab"));
    cfg
}

fn process_exists(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the directory on drop.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn commands_run_as_root_in_l1_with_separate_streams_and_exit_status() {
    // The agent lives under /tmp here, as it does for a workspace cloned into /tmp: L1 covers
    // /tmp with a fresh tmpfs, and `keep` must show the host's directory through it.
    let dir =
        TempDir(std::env::temp_dir().join(format!("svff-lab-agent-test.{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let agent = dir.0.join("svff-lab");
    std::fs::copy(env!("CARGO_BIN_EXE_svff-lab"), &agent).unwrap();
    let mut cfg = config();
    cfg.agent = agent;
    cfg.keep.push(dir.0.clone());
    cfg.stall_timeout = Duration::from_secs(15);
    let mut lab = Lab::boot(&cfg).expect("boot L1 with the agent under /tmp");
    let out = lab
        .sh(
            &format!("test -x {}/svff-lab && echo seen", dir.0.display()),
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(out.stdout, "seen\n", "{out:?}");
    assert_eq!(lab.kernel(), config().kernel_version);

    let out = lab
        .sh("id -u; echo to-err >&2; exit 7", Duration::from_secs(60))
        .unwrap();
    assert_eq!(out.code, Some(7));
    assert_eq!(out.stdout, "0\n");
    assert_eq!(out.stderr, "to-err\n");

    // The PFs are found by id and exported; L1 has its own /sys with SR-IOV capable PFs.
    let out = lab
        .sh(
            "cat /sys/bus/pci/devices/$SVFF_LAB_NVME_PF/sriov_totalvfs",
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout.trim(), "64");

    // The L0 root is there read-only; /tmp is writable.
    let out = lab
        .sh("touch /etc/svff-should-fail", Duration::from_secs(60))
        .unwrap();
    assert!(!out.success(), "L0 root must be read-only in L1");
    assert!(lab
        .sh("echo x > /tmp/ok && cat /tmp/ok", Duration::from_secs(60))
        .unwrap()
        .success());

    // A signal-terminated command reports the signal.
    let out = lab.sh("kill -9 $$", Duration::from_secs(60)).unwrap();
    assert_eq!((out.code, out.signal), (None, Some(9)));

    // A program that does not exist is an error, and the session stays usable.
    let err = lab
        .run(&["/nonexistent/prog"], Duration::from_secs(60))
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/prog"), "{err}");
    assert!(lab
        .run(&["true"], Duration::from_secs(60))
        .unwrap()
        .success());

    // A command that is silent for longer than the stall timeout is fine: heartbeats flow.
    let out = lab
        .sh("sleep 25; echo woke", Duration::from_secs(120))
        .unwrap();
    assert_eq!(out.stdout, "woke\n", "{out:?}");

    // A frozen L1 (here: QEMU stopped) is detected by its missing heartbeat and killed.
    let (pid, dir) = (lab.qemu_pid(), lab.session_dir().to_owned());
    assert!(process_exists(pid) && dir.exists());
    // SAFETY: kill(2) with our own QEMU child's pid and SIGSTOP; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let err = lab.run(&["true"], Duration::from_secs(300)).unwrap_err();
    assert!(matches!(err, LabError::Stalled { .. }), "{err}");
    assert!(err.to_string().contains("no heartbeat"), "{err}");
    assert!(!process_exists(pid), "stalled QEMU {pid} must be killed");
    drop(lab);
    assert!(!process_exists(pid), "QEMU {pid} still running after drop");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn a_command_past_its_timeout_kills_l1_and_leaves_nothing_behind() {
    let mut lab = Lab::boot(&config()).expect("boot L1");
    let (pid, dir) = (lab.qemu_pid(), lab.session_dir().to_owned());
    let err = lab
        .run(&["sleep", "600"], Duration::from_secs(2))
        .unwrap_err();
    assert!(matches!(err, LabError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("sleep 600"), "{err}");
    assert!(!process_exists(pid), "QEMU {pid} must be killed on timeout");
    let again = lab.run(&["true"], Duration::from_secs(10)).unwrap_err();
    assert!(again.to_string().contains("no longer running"), "{again}");
    drop(lab);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// State letter of a process from /proc/<pid>/stat, `None` once it is gone.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn children_of(ppid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn killing_the_lab_process_takes_its_qemu_down() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut lab = Command::new(env!("CARGO_BIN_EXE_svff-lab"))
        .args(["run", "--", "sleep", "600"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(lab.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "svff-lab ended before L1 came up"
        );
        if line.contains("L1 up") {
            break;
        }
    }
    let qemu = children_of(lab.id());
    assert_eq!(
        qemu.len(),
        1,
        "svff-lab should have exactly one QEMU child: {qemu:?}"
    );
    // A pidfd becomes readable when the process exits: wait on it, bounded, instead of polling.
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, qemu[0], 0) } as i32;
    assert!(
        pidfd >= 0,
        "pidfd_open({}): {}",
        qemu[0],
        std::io::Error::last_os_error()
    );
    lab.kill().unwrap(); // SIGKILL: no destructor runs, only the parent-death signal helps
    lab.wait().unwrap();
    let mut pfd = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the open pidfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 30_000) };
    // SAFETY: closing the pidfd we opened above, once.
    unsafe { libc::close(pidfd) };
    assert_eq!(
        n,
        1,
        "QEMU {} survived its svff-lab (state {:?})",
        qemu[0],
        proc_state(qemu[0])
    );
}
