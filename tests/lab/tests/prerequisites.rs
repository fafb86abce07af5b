//! A machine without the lab's packages gets a message naming the missing piece and the
//! command that installs it. (Own test binary: it changes this process's environment.)

use std::process::Command;

#[test]
fn missing_qemu_or_kernel_is_named_with_the_install_command() {
    let lab = env!("CARGO_BIN_EXE_svff-lab");
    let out = Command::new(lab)
        .args(["run", "--", "true"])
        .env("SVFF_LAB_QEMU", "/nonexistent/qemu-system-x86_64")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("QEMU") && err.contains("/nonexistent/qemu-system-x86_64"),
        "{err}"
    );
    assert!(
        err.contains("scripts/deps.sh"),
        "must say how to install: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let out = Command::new(lab)
        .args(["run", "--", "true"])
        .env("SVFF_LAB_KERNEL", "/nonexistent/vmlinuz-6.12.0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("L1 kernel") && err.contains("scripts/deps.sh"),
        "{err}"
    );
}

#[test]
fn missing_agent_binary_is_named_with_the_build_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_svff-lab"))
        .args(["run", "--", "true"])
        .env("SVFF_LAB_AGENT", "relative/agent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("relative/agent") && err.contains("absolute"),
        "{err}"
    );
}
