//! L2 guests in the lab, run inside L1 by `svff-lab test`: stock QEMU with nested KVM boots
//! Linux with VFs passed through, and the guest itself sees them, binds them and takes their
//! interrupts.

use std::time::Duration;

use svff_lab::guest::{self, bind, dev_path, set_numvfs, unbind, vfs_of};
use svff_lab::l2::{Image, Qemu, L2};

/// Deadline for an L2 boot (`SVFF_LAB_L2_BOOT_DEADLINE` seconds, default 180).
fn boot_deadline() -> Duration {
    Duration::from_secs(
        std::env::var("SVFF_LAB_L2_BOOT_DEADLINE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(180),
    )
}

const CMD: Duration = Duration::from_secs(60);

fn boot(qemu: &Qemu, image: &Image) -> L2 {
    guest::modprobe("kvm-amd");
    let initrd = image.build().expect("build the L2 image");
    let vm = L2::boot(qemu, &initrd, boot_deadline()).unwrap_or_else(|e| panic!("{e}"));
    println!("L2 boot: {:.1} s", vm.boot_time.as_secs_f64());
    vm
}

/// `(bdf, vendor, device)` of every PCI function the guest sees.
fn guest_pci(vm: &mut L2) -> Vec<(String, String, String)> {
    let out = vm
        .sh_ok(
            "for d in /sys/bus/pci/devices/*; do echo \"${d##*/} $(cat $d/vendor) $(cat $d/device)\"; done",
            CMD,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.into(), w.next()?.into(), w.next()?.into()))
        })
        .collect()
}

/// Sum of the counts on the guest's /proc/interrupts lines that mention `name`.
fn interrupts_of(vm: &mut L2, name: &str) -> (u64, String) {
    let text = vm
        .sh_ok("cat /proc/interrupts", CMD)
        .unwrap_or_else(|e| panic!("{e}"));
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(name)).collect();
    let sum = lines
        .iter()
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    (sum, lines.join("\n"))
}

fn release(pf: &str) {
    for vf in vfs_of(pf) {
        unbind(&vf);
    }
    set_numvfs(pf, 0);
    unbind(pf);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn l2_guest_boots_under_stock_qemu_and_runs_commands_with_output_and_status() {
    guest::require_lab();
    let image = Image::new()
        .file("etc/svff-test", 0o644, "from the image\n")
        .setup("echo setup-ran > /run/setup-mark");
    let mut vm = boot(&Qemu::stock(), &image);
    assert_eq!(vm.kernel(), guest_kernel(), "L2 runs L1's kernel");
    let out = vm
        .sh(
            "cat /etc/svff-test /run/setup-mark; echo to-err >&2; exit 3",
            CMD,
        )
        .unwrap();
    assert_eq!(out.code, Some(3), "{out:?}");
    assert_eq!(out.stdout, "from the image\nsetup-ran\n");
    assert_eq!(out.stderr, "to-err\n");
    // Output that is not text and longer than one base64 line comes back byte for byte.
    let out = vm
        .sh(
            "i=0; while [ $i -lt 300 ]; do printf '%03d\\t' $i; i=$((i+1)); done",
            CMD,
        )
        .unwrap();
    let want: String = (0..300).map(|i| format!("{i:03}\t")).collect();
    assert_eq!(out.stdout, want);
    let dmesg = vm.dmesg().unwrap();
    assert!(dmesg.contains("Linux version"), "{dmesg}");
    let (pid, dir) = (vm.vmm_pid(), vm.session_dir().to_owned());
    drop(vm);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} must be gone after drop"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn l2_guest_that_fails_its_setup_is_reported_with_its_console() {
    guest::require_lab();
    guest::modprobe("kvm-amd");
    let initrd = Image::new()
        .setup("echo svff-setup-going-down; exit 4")
        .build()
        .unwrap();
    let err = L2::boot(&Qemu::stock(), &initrd, boot_deadline()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("setup script exited with 4"), "{msg}");
    assert!(msg.contains("svff-setup-going-down"), "console tail: {msg}");
}

fn guest_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn igb_vf_passed_through_by_stock_qemu_binds_igbvf_in_l2_and_its_msix_interrupts_count_up() {
    guest::require_lab();
    let pf = guest::igb_pf();
    if guest::driver_of(&pf).is_some() {
        set_numvfs(&pf, 0);
    }
    bind(&pf, "igb");
    // The VF's link follows the PF's: bring the PF's interface up.
    let ifaces: Vec<String> = std::fs::read_dir(dev_path(&pf).join("net"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for i in &ifaces {
        let st = std::process::Command::new("ip")
            .args(["link", "set", i, "up"])
            .status()
            .unwrap();
        assert!(st.success(), "ip link set {i} up in L1");
    }
    set_numvfs(&pf, 1);
    let vf = vfs_of(&pf)[0].clone();
    bind(&vf, "vfio-pci");
    let qemu = Qemu::stock().device(&format!("vfio-pci,host={vf}"));
    let mut vm = boot(&qemu, &Image::new().module("igbvf"));

    let seen: Vec<_> = guest_pci(&mut vm)
        .into_iter()
        .filter(|(_, v, d)| v == "0x8086" && d == "0x10ca")
        .collect();
    assert_eq!(seen.len(), 1, "the guest sees one igb VF: {seen:?}");
    let gbdf = seen[0].0.clone();
    let out = vm.sh("modprobe igbvf", CMD).unwrap();
    assert!(out.success(), "modprobe igbvf in L2: {out:?}");
    let drv = vm
        .sh_ok(
            &format!("basename $(readlink /sys/bus/pci/devices/{gbdf}/driver)"),
            CMD,
        )
        .unwrap();
    assert_eq!(drv.trim(), "igbvf", "driver of {gbdf} in L2");
    let eth = vm
        .sh_ok(&format!("ls /sys/bus/pci/devices/{gbdf}/net"), CMD)
        .unwrap()
        .trim()
        .to_owned();
    assert!(!eth.is_empty(), "igbvf made no net device for {gbdf}");
    // igbvf requests its MSI-X vectors when the link goes up: they must show in the guest's
    // /proc/interrupts, on the VF's guest BDF.
    let out = vm.sh(&format!("ip link set {eth} up"), CMD).unwrap();
    assert!(out.success(), "ip link set {eth} up in L2: {out:?}");
    let (count, lines) = interrupts_of(&mut vm, &eth);
    println!("L2 {eth} interrupts after link up ({count}):\n{lines}");
    let vectors = lines
        .lines()
        .filter(|l| l.contains(&format!("PCI-MSIX-{gbdf}")))
        .count();
    assert_eq!(
        vectors, 3,
        "igbvf's 3 MSI-X vectors (tx, rx, mailbox) of {gbdf} in L2:\n{lines}"
    );
    // The VF's registers are live (the lab keeps its BARs below 4 GiB, see
    // `svff_lab::L1_MEMORY_MIB`): the PF's igb driver in L1 answers igbvf's mailbox, and the
    // interrupts come. igbvf's watchdog raises its rx vector every 2 s (a write to EICS) once the
    // interface is up, so the counts must grow.
    let dmesg = vm.dmesg().unwrap();
    let igbvf_log: Vec<&str> = dmesg.lines().filter(|l| l.contains("igbvf")).collect();
    println!("L2 igbvf messages:\n{}", igbvf_log.join("\n"));
    assert!(
        !dmesg.contains("PF still in reset state"),
        "igbvf in L2 got no answer from the PF:\n{}",
        igbvf_log.join("\n")
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let grown = loop {
        let (now, now_lines) = interrupts_of(&mut vm, &eth);
        if now > count {
            break Some((now, now_lines));
        }
        if std::time::Instant::now() >= deadline {
            break None;
        }
        // Pacing between polls of /proc/interrupts, not synchronisation: the deadline bounds it.
        std::thread::sleep(Duration::from_millis(500));
    };
    let (now, now_lines) = grown.unwrap_or_else(|| {
        panic!("igbvf's interrupt counts in L2 stayed at {count} for 60 s after link up:\n{lines}")
    });
    println!("L2 {eth} interrupts later ({now}):\n{now_lines}");
    drop(vm);
    release(&pf);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn ten_nvme_vfs_passed_through_by_stock_qemu_are_all_seen_by_l2() {
    guest::require_lab();
    let pf = guest::nvme_pf();
    if guest::driver_of(&pf).is_some() {
        set_numvfs(&pf, 0);
    }
    bind(&pf, "pci-pf-stub");
    set_numvfs(&pf, 10);
    let vfs = vfs_of(&pf);
    assert_eq!(vfs.len(), 10);
    let mut qemu = Qemu::stock();
    for vf in &vfs {
        bind(vf, "vfio-pci");
        qemu = qemu.device(&format!("vfio-pci,host={vf}"));
    }
    let mut vm = boot(&qemu, &Image::new());
    let seen: Vec<_> = guest_pci(&mut vm)
        .into_iter()
        .filter(|(_, v, d)| v == "0x1b36" && d == "0x0010")
        .collect();
    assert_eq!(seen.len(), 10, "the guest sees 10 nvme VFs: {seen:?}");
    drop(vm);
    release(&pf);
}
