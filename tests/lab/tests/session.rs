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

#[test]
fn commands_run_as_root_in_l1_with_separate_streams_and_exit_status() {
    let mut lab = Lab::boot(&config()).expect("boot L1");
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

    let (pid, dir) = (lab.qemu_pid(), lab.session_dir().to_owned());
    assert!(process_exists(pid) && dir.exists());
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
