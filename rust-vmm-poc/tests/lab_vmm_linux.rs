//! Linux direct boot in svff-vmm inside L1: the lab's Debian kernel with a busybox initramfs
//! reaches its init, sees both vCPUs and the PCI functions over conf1, and its reboot ends the
//! VMM. In its own binary (filter `lab_vmm_linux`).
//!
//! Two vCPUs, so the MP table's second processor is brought up by Linux (INIT/SIPI through the
//! in-kernel LAPIC). With the lab's earlier 2-vCPU TCG L1, L2 Linux stalled after SMP
//! bring-up (an RCU stall, a LAPIC timer interrupt taken with IF=0); with the 1-vCPU L1 it
//! boots in about 45 s.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use svff_lab::guest;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
echo "svff-l2: init up, cpus=$(/bin/busybox grep -c ^processor /proc/cpuinfo)"
for d in /sys/bus/pci/devices/*; do
  echo "svff-l2: pci $(/bin/busybox basename $d) $(/bin/busybox cat $d/vendor):$(/bin/busybox cat $d/device) class=$(/bin/busybox cat $d/class)"
done
echo "svff-l2: done"
/bin/busybox reboot -f
"#;

/// A newc initramfs with the host's static busybox and `INIT`.
fn initramfs(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy the static busybox");
    let init = root.join("init");
    std::fs::write(&init, INIT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("initrd.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet > {}",
            root.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(st.success(), "cpio failed");
    out
}

fn debian_kernel() -> PathBuf {
    std::fs::read_dir("/boot")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .expect("a /boot/vmlinuz-* kernel")
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn debian_kernel_boots_to_its_init_with_both_vcpus_sees_the_pci_functions_and_its_reboot_ends_the_vmm(
) {
    guest::require_lab();
    guest::modprobe("kvm-amd");
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs(dir.path());
    let serial = dir.path().join("serial.log");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
        .arg("--kernel")
        .arg(debian_kernel())
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory", "512M", "--cpus", "2", "--test-devices", "1"])
        .arg(format!("--serial=file:{}", serial.display()))
        .spawn()
        .unwrap();
    let deadline = started + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "Linux did not reboot within 180 s; serial:\n{}",
                std::fs::read_to_string(&serial).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&serial).unwrap();
    println!(
        "boot to reboot: {:.1} s\n{out}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(status.code(), Some(0), "reboot=k ends the VMM with 0");
    for want in [
        "svff-l2: init up, cpus=2",
        "svff-l2: pci 0000:00:00.0 0x1b36:0x0008 class=0x060000",
        "svff-l2: pci 0000:00:01.0 0x1234:0x5ff0 class=0xff0000",
        "svff-l2: done",
    ] {
        assert!(out.contains(want), "guest did not print {want:?}");
    }
}
