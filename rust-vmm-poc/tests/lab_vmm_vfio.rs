//! VFs of the lab's igb PF passed through to svff-vmm with vfio-pause: the test guest finds
//! them on its bus 0 with their real identity and reads their live BAR0 registers.

use std::process::Command;

use svff_lab::guest::{self, bind, set_numvfs, unbind, vfs_of};
use svff_vmm::parse_counters;

/// The igb PF on pci-pf-stub with `n` VFs, all bound to vfio-pci. Returns the VFs.
fn igb_vfs(n: u32) -> (String, Vec<String>) {
    let pf = guest::igb_pf();
    if guest::driver_of(&pf).is_some() {
        set_numvfs(&pf, 0);
    }
    bind(&pf, "pci-pf-stub");
    set_numvfs(&pf, n);
    let vfs = vfs_of(&pf);
    for vf in &vfs {
        bind(vf, "vfio-pci");
    }
    (pf, vfs)
}

fn cleanup(pf: &str, vfs: &[String]) {
    for vf in vfs {
        unbind(vf);
    }
    set_numvfs(pf, 0);
    unbind(pf);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn test_guest_reads_live_registers_of_two_passed_through_igb_vfs() {
    guest::require_lab();
    guest::modprobe("kvm-amd");
    let (pf, vfs) = igb_vfs(2);
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let out = Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
        .args([
            "--test-devices",
            "0",
            "--guest-rounds",
            "40",
            "--guest-report-every",
            "20",
        ])
        .arg(format!("--vfio={},id=vf0", vfs[0]))
        .arg(format!("--vfio=/sys/bus/pci/devices/{},id=vf1", vfs[1]))
        .arg(format!("--serial=file:{}", serial.display()))
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    println!("{text}");
    cleanup(&pf, &vfs);
    assert!(
        out.status.success(),
        "svff-vmm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for dev in ["00:01.0", "00:02.0"] {
        assert!(
            text.contains(&format!(
                "svff-guest: found {dev} vendor=8086 device=10ca class=020000"
            )),
            "{dev} is an igb VF in the guest"
        );
        let c = text
            .lines()
            .rev()
            .filter_map(parse_counters)
            .find(|c| c.dev == dev)
            .unwrap_or_else(|| panic!("no counters for {dev}"));
        assert_eq!(c.round, 40);
        assert_eq!((c.reads, c.ok, c.ones, c.gone), (80, 80, 0, 0), "{c:?}");
        assert_ne!(c.id, u32::MAX, "CTRL of a live VF");
    }
    assert!(text.contains("svff-guest: enumerated 3 functions, 2 targets"));
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn vfs_that_do_not_exist_or_are_not_on_vfio_pci_are_refused_naming_them() {
    guest::require_lab();
    guest::modprobe("kvm-amd");
    let run = |spec: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
            .args(["--serial", "none", "--vfio", spec])
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run("0000:09:1f.7");
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--vfio 0000:09:1f.7: no such PCI function"),
        "{err}"
    );

    let (pf, vfs) = igb_vfs(1);
    unbind(&vfs[0]);
    let (code, err) = run(&vfs[0]);
    cleanup(&pf, &vfs);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!(
            "--vfio {}: bound to no driver, not vfio-pci",
            vfs[0]
        )),
        "{err}"
    );
}
