//! Linux direct boot in svff-vmm inside L1: the lab's Debian kernel with a busybox initramfs
//! reaches its init, sees both vCPUs and the PCI functions over conf1, and its reboot ends the
//! VMM; with an igb VF, `igbvf` binds, takes MSI-X interrupts and keeps its VF across a pause,
//! a numvfs cycle and an unpause. In its own binary (filter `lab_vmm_linux`).
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

/// The guest side of the igbvf test, run as the L2 image's setup script (it never returns:
/// it ends with a reboot). Prints the VF's driver and interface, then every second the
/// interface's /proc/interrupts lines, until the host hides the `svff-test` function at
/// 00:01.0 (its vendor ID reads 0xffff): the signal to print dmesg and reboot.
const IGBVF_SCRIPT: &str = r#"
say() { echo "svff-l2: $*"; }
modprobe igbvf || say "modprobe igbvf failed"
g=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x8086 ] && [ "$(cat $d/device)" = 0x10ca ] && g=${d##*/}
done
say "vf $g driver $(basename "$(readlink /sys/bus/pci/devices/$g/driver)")"
eth=$(ls /sys/bus/pci/devices/$g/net 2>/dev/null)
ip link set "$eth" up
say "eth $eth"
n=0
while :; do
    n=$((n + 1))
    grep "$eth" /proc/interrupts | sed "s/^/svff-l2: irq $n /"
    say "tick $n $(cat /sys/class/net/$eth/operstate 2>/dev/null) $(basename "$(readlink /sys/bus/pci/devices/$g/driver)")"
    v=$(od -An -tx2 -N2 /sys/bus/pci/devices/0000:00:01.0/config | tr -d ' ')
    [ "$v" = ffff ] && break
    sleep 1
done
dmesg | sed 's/^/svff-l2: dmesg /'
ls /sys/bus/pci/devices | sed 's/^/svff-l2: pci /'
say done
reboot -f
"#;

/// Sum of the counts of the last `svff-l2: irq N ...` iteration, and N.
/// igbvf's interrupt count per guest sample (`svff-l2: irq N NN: counts...`), summed over its
/// vectors: sample number -> count.
fn irq_sums(out: &str) -> std::collections::BTreeMap<u64, u64> {
    let mut sums = std::collections::BTreeMap::new();
    for l in out.lines() {
        let Some(rest) = l.trim().strip_prefix("svff-l2: irq ") else {
            continue;
        };
        let mut w = rest.split_whitespace();
        let Some(n) = w.next().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        w.next(); // "NN:" the IRQ number
        let s: u64 = w.map_while(|x| x.parse::<u64>().ok()).sum();
        *sums.entry(n).or_insert(0) += s;
    }
    sums
}

fn last_irq_sum(out: &str) -> Option<(u64, u64)> {
    let mut last: Option<(u64, u64)> = None;
    for l in out.lines() {
        let Some(rest) = l.trim().strip_prefix("svff-l2: irq ") else {
            continue;
        };
        let mut w = rest.split_whitespace();
        let Some(n) = w.next().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        w.next(); // "NN:" the IRQ number
        let s: u64 = w.map_while(|x| x.parse::<u64>().ok()).sum();
        last = match last {
            Some((m, acc)) if m == n => Some((n, acc + s)),
            _ => Some((n, s)),
        };
    }
    last.map(|(n, s)| (s, n))
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn igbvf_binds_in_linux_under_svff_vmm_takes_msix_and_keeps_its_vf_across_pause_numvfs_cycle_unpause(
) {
    use qmp_ext::Client;
    use serde_json::json;
    use svff_lab::guest::{bind, dev_path, set_numvfs, unbind, vfs_of};

    guest::require_lab();
    guest::modprobe("kvm-amd");
    let pf = guest::igb_pf();
    if guest::driver_of(&pf).is_some() {
        set_numvfs(&pf, 0);
    }
    // The PF's igb driver answers igbvf's mailbox; the VF's link follows the PF's.
    bind(&pf, "igb");
    for i in std::fs::read_dir(dev_path(&pf).join("net"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
    {
        let st = Command::new("ip")
            .args(["link", "set", &i, "up"])
            .status()
            .unwrap();
        assert!(st.success(), "ip link set {i} up in L1");
    }
    set_numvfs(&pf, 1);
    let vf = vfs_of(&pf)[0].clone();
    bind(&vf, "vfio-pci");
    let initrd = svff_lab::l2::Image::new()
        .module("igbvf")
        .setup(IGBVF_SCRIPT)
        .build()
        .expect("build the L2 image");
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let sock = dir.path().join("qmp.sock");
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
        .arg("--kernel")
        .arg(svff_lab::l2::default_kernel().unwrap())
        .arg("--initrd")
        .arg(&initrd)
        .arg("--cmdline")
        .arg(format!("{} svff.ctl=ttyS0", svff_vmm::DEFAULT_CMDLINE))
        .args(["--memory", "512M", "--test-devices", "1"])
        .arg(format!("--vfio={vf},id=vf0"))
        .arg(format!("--serial=file:{}", serial.display()))
        .arg("--qmp")
        .arg(&sock)
        .spawn()
        .unwrap();
    let out = || std::fs::read_to_string(&serial).unwrap_or_default();
    let wait = |what: &str, secs: u64, cond: &dyn Fn(&str) -> bool| {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let o = out();
            if cond(&o) {
                return;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}:\n{o}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait("igbvf up in the guest", 240, &|o| {
        o.contains("svff-l2: eth ")
    });
    println!("boot to igbvf up: {:.1} s", started.elapsed().as_secs_f64());
    wait("two interrupt samples", 60, &|o| {
        last_irq_sum(o).is_some_and(|(_, n)| n >= 2)
    });
    let (s0, _) = last_irq_sum(&out()).unwrap();
    wait("igbvf's interrupts to count up", 60, &|o| {
        last_irq_sum(o).is_some_and(|(s, _)| s > s0)
    });
    let (s1, n1) = last_irq_sum(&out()).unwrap();
    println!("igbvf interrupts before the pause: {s0} -> {s1}");

    let mut qmp = Client::connect(&sock, Duration::from_secs(30)).unwrap();
    qmp.execute("svff-vfio-pause", Some(json!({"id": "vf0"})))
        .unwrap();
    set_numvfs(&pf, 0);
    set_numvfs(&pf, 1);
    let new_vf = vfs_of(&pf)[0].clone();
    bind(&new_vf, "vfio-pci");
    qmp.execute(
        "svff-vfio-unpause",
        Some(json!({"id": "vf0", "host": new_vf})),
    )
    .unwrap();
    let (s2, n2) = last_irq_sum(&out()).unwrap();
    // Ten more samples (about 10 s: igbvf's watchdog runs every 2 s), then the guest reports.
    wait("ten samples after the unpause", 120, &|o| {
        last_irq_sum(o).is_some_and(|(_, n)| n >= n2 + 10)
    });
    let (s3, n3) = last_irq_sum(&out()).unwrap();
    qmp.execute(
        "x-svff-set-present",
        Some(json!({"device": "00:01.0", "present": false})),
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the guest did not reboot:\n{}", out());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let o = out();
    unbind(&new_vf);
    set_numvfs(&pf, 0);
    unbind(&pf);
    let dmesg: Vec<&str> = o
        .lines()
        .filter_map(|l| l.strip_prefix("svff-l2: dmesg "))
        .collect();
    let igbvf_log: Vec<&&str> = dmesg
        .iter()
        .filter(|l| l.contains("igbvf") || l.contains("0000:00:02.0"))
        .collect();
    println!(
        "igbvf interrupts: before the pause {s0} -> {s1} (sample {n1}); at the unpause {s2} \
         (sample {n2}); 10 samples later {s3} (sample {n3})\nguest dmesg of the VF:\n{}",
        igbvf_log
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let ticks: Vec<&str> = o
        .lines()
        .filter(|l| l.starts_with("svff-l2: tick"))
        .collect();
    println!("last ticks: {:?}", &ticks[ticks.len().saturating_sub(3)..]);
    assert_eq!(status.code(), Some(0), "the guest's reboot ends the VMM");
    assert!(o.contains("svff-l2: vf 0000:00:02.0 driver igbvf"), "{o}");
    assert!(
        o.contains("svff-l2: pci 0000:00:02.0"),
        "the VF is still in the guest"
    );
    assert!(
        !dmesg
            .iter()
            .any(|l| l.contains("0000:00:02.0") && l.to_lowercase().contains("remov")),
        "no removal of the VF in the guest's dmesg"
    );
    assert!(
        ticks.last().is_some_and(|t| t.ends_with(" igbvf")),
        "igbvf still bound at the end: {ticks:?}"
    );
    // After the unpause the count must grow from one sample to the next at least once. Not
    // s3 > s2: when igbvf resets the function it frees and requests its vectors again, and
    // /proc/interrupts starts those counts from 0 (seen: 27 at the unpause, 15 ten samples on).
    let sums = irq_sums(&o);
    let after: Vec<(u64, u64)> = sums.range(n2..=n3).map(|(n, s)| (*n, *s)).collect();
    println!("igbvf interrupts per sample from the unpause on: {after:?}");
    assert!(
        s1 > s0,
        "igbvf's MSI-X interrupts count up before the pause"
    );
    assert!(
        after.windows(2).any(|w| w[1].1 > w[0].1),
        "igbvf's MSI-X interrupts count up after the unpause: {after:?}"
    );
}
