//! Host-side test: `svff-lab run` stopped by a signal cleans up after itself (boots L1 once).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The session directories of `svff-lab` process `pid`.
fn session_dirs(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("svff-lab.{pid}.");
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// The pids of `parent`'s children whose name starts with `qemu`.
fn qemu_children(parent: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent && comm.starts_with("qemu")).then_some(pid)
        })
        .collect()
}

#[test]
fn sigterm_to_svff_lab_run_kills_qemu_and_removes_its_session_dir() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_svff-lab"))
        .args(["run", "--", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start svff-lab run");
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("svff-lab: {line}");
            if line.contains("L1 up in") {
                let _ = tx.send(());
            }
        }
    });
    // Hang guard of the boot, not a timing requirement.
    let up = rx.recv_timeout(Duration::from_secs(300));
    let dirs = session_dirs(pid);
    let qemus = qemu_children(pid);
    // SAFETY: kill(2) on our own child (not yet waited for); no memory is involved.
    let rc = unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    up.expect("L1 did not come up within 300 s");
    assert_eq!(rc, 0);
    assert_eq!(
        dirs.len(),
        1,
        "one session directory while L1 runs: {dirs:?}"
    );
    assert_eq!(qemus.len(), 1, "one QEMU while L1 runs: {qemus:?}");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    assert!(!dirs[0].exists(), "{} left behind", dirs[0].display());
    assert!(
        !Path::new(&format!("/proc/{}", qemus[0])).exists(),
        "QEMU {} still running after svff-lab exited",
        qemus[0]
    );
}
