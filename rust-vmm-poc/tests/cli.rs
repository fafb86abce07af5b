//! The svff-vmm command line on the host (no KVM needed): help, and clear errors naming the
//! value, path or device at fault.

use std::process::{Command, Output};

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
        .args(args)
        .output()
        .expect("run svff-vmm")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_documents_every_option() {
    let o = vmm(&["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--memory",
        "--cpus",
        "--serial",
        "--qmp",
        "--guest",
        "--guest-rounds",
        "--guest-report-every",
        "--test-devices",
        "--kernel",
        "--initrd",
        "--cmdline",
        "--vfio",
        "--kvm-device",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}:\n{help}");
    }
    assert!(help.contains("Exit status"), "{help}");
}

#[test]
fn a_missing_kvm_device_is_an_error_naming_the_node() {
    let o = vmm(&["--kvm-device", "/nonexistent/kvm", "--serial", "none"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("cannot open the KVM device /nonexistent/kvm") && e.contains("os error 2"),
        "{e}"
    );
}

#[test]
fn bad_option_values_are_refused_naming_the_option() {
    for (args, needle) in [
        (&["--memory", "12Q"][..], "--memory"),
        (&["--cpus", "0"][..], "--cpus"),
        (&["--cpus", "33"][..], "--cpus"),
        (&["--serial", "tcp:1"][..], "--serial"),
        (&["--guest", "linux"][..], "--guest"),
        (&["--guest-report-every", "0"][..], "--guest-report-every"),
        (&["--initrd", "/x"][..], "--kernel"),
    ] {
        let o = vmm(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn a_ram_size_out_of_range_is_an_error_before_kvm_is_opened() {
    let o = vmm(&["--memory", "1M", "--kvm-device", "/nonexistent/kvm"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("outside"), "{}", stderr(&o));
}

#[test]
fn a_kernel_larger_than_the_guest_ram_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("bzImage");
    std::fs::write(&k, vec![0u8; 3 << 20]).unwrap();
    let o = vmm(&[
        "--memory",
        "2M",
        "--kernel",
        k.to_str().unwrap(),
        "--kvm-device",
        "/nonexistent/kvm",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "kernel {} ({} bytes) does not fit",
            k.display(),
            3 << 20
        )),
        "{e}"
    );
}

#[test]
fn a_missing_kernel_file_is_an_error_naming_it() {
    let o = vmm(&["--kernel", "/nonexistent/bzImage"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("kernel /nonexistent/bzImage"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_malformed_vfio_address_is_refused_naming_it() {
    let o = vmm(&["--vfio", "01:10.0", "--kvm-device", "/nonexistent/kvm"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--vfio 01:10.0: '01:10.0' is not a PCI address"),
        "{}",
        stderr(&o)
    );
}
