//! VFs of the lab's igb PF passed through to svff-vmm with vfio-pause: the test guest finds
//! them on its bus 0 with their real identity and reads their live BAR0 registers.

use std::process::Command;

mod common;

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

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn two_vfs_paused_over_a_numvfs_cycle_and_unpaused_never_leave_the_guests_config_space() {
    use qmp_ext::Client;
    use serde_json::json;
    use std::time::{Duration, Instant};

    guest::require_lab();
    guest::modprobe("kvm-amd");
    let (pf, vfs) = igb_vfs(2);
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let sock = dir.path().join("qmp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
        .args(["--test-devices", "0", "--guest-report-every", "20"])
        .arg(format!("--vfio={},id=vf0", vfs[0]))
        .arg(format!("--vfio={},id=vf1,policy=ignore", vfs[1]))
        .arg(format!("--serial=file:{}", serial.display()))
        .arg("--qmp")
        .arg(&sock)
        .spawn()
        .unwrap();
    let out = || std::fs::read_to_string(&serial).unwrap_or_default();
    // The last complete counter line of `dev`.
    let last = |dev: &str| {
        let o = out();
        let complete = o[..o.rfind('\n').map_or(0, |i| i + 1)].to_string();
        complete
            .lines()
            .rev()
            .filter_map(parse_counters)
            .find(|c| c.dev == dev)
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}:\n{}",
                out()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("the QMP socket listening", &|| {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let mut qmp = Client::connect(&sock, Duration::from_secs(30)).unwrap();
    wait("first reports", &|| last("00:02.0").is_some());
    let before: Vec<_> = ["00:01.0", "00:02.0"].map(|d| last(d).unwrap()).into();

    for id in ["vf0", "vf1"] {
        let t = qmp
            .execute(
                "svff-vfio-pause",
                Some(json!({"id": id, "policy": "ignore"})),
            )
            .unwrap();
        println!("pause {id}: {t}");
        assert!(t["total-ns"].as_u64().unwrap() > 0);
    }
    // Every fd of both VFs is closed: the count change does not block.
    set_numvfs(&pf, 0);
    set_numvfs(&pf, 2);
    let new_vfs = vfs_of(&pf);
    for vf in &new_vfs {
        bind(vf, "vfio-pci");
    }
    for (id, vf) in ["vf0", "vf1"].iter().zip(&new_vfs) {
        let t = qmp
            .execute("svff-vfio-unpause", Some(json!({"id": id, "host": vf})))
            .unwrap();
        println!("unpause {id}: {t}");
    }
    let info = qmp.execute("query-svff-vfio", None).unwrap();
    println!("{info:#}");
    let paused_bar_reads: u64 = info
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["state"], "attached");
            assert_eq!(d["pause-count"], 1);
            d["paused-accesses"]["bar-reads"].as_u64().unwrap()
        })
        .sum();
    // Two reports after the unpause, so every read of the pause window is counted.
    let round_now = last("00:02.0").unwrap().round;
    wait("reports after the unpause", &|| {
        last("00:02.0").is_some_and(|c| c.round >= round_now + 40)
    });
    let after: Vec<_> = ["00:01.0", "00:02.0"].map(|d| last(d).unwrap()).into();
    qmp.execute("quit", None).unwrap();
    let status = child.wait().unwrap();
    cleanup(&pf, &vfs);
    println!("{}", out());
    assert!(status.success());
    let mut guest_ones = 0;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            a.gone, 0,
            "the guest never saw {} leave config space",
            a.dev
        );
        assert!(
            a.ok > b.ok,
            "valid reads again after the unpause: {b:?} -> {a:?}"
        );
        assert_ne!(a.id, u32::MAX, "{a:?}");
        guest_ones += a.ones;
    }
    // All-ones only inside the pause window: exactly the BAR reads vfio-pause ignored.
    assert_eq!(guest_ones, paused_bar_reads);
}

fn fds_and_rss_kib(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    (fds, rss)
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn fifty_pause_unpause_cycles_leave_the_vmm_with_the_same_fds() {
    use qmp_ext::Client;
    use serde_json::json;
    use std::time::{Duration, Instant};

    guest::require_lab();
    guest::modprobe("kvm-amd");
    let (pf, vfs) = igb_vfs(1);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
        .args(["--test-devices", "0", "--serial", "none"])
        .arg(format!("--vfio={},id=vf0", vfs[0]))
        .arg("--qmp")
        .arg(&sock)
        .spawn()
        .unwrap();
    let pid = child.id();
    let end = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < end, "no QMP socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut qmp = Client::connect(&sock, Duration::from_secs(30)).unwrap();
    let cycle = |qmp: &mut Client| {
        qmp.execute("svff-vfio-pause", Some(json!({"id": "vf0"})))
            .unwrap();
        qmp.execute("svff-vfio-unpause", Some(json!({"id": "vf0"})))
            .unwrap();
    };
    cycle(&mut qmp); // first-use allocations
    let (fds0, rss0) = fds_and_rss_kib(pid);
    let start = Instant::now();
    for _ in 0..50 {
        cycle(&mut qmp);
    }
    let per_cycle = start.elapsed() / 50;
    let (fds1, rss1) = fds_and_rss_kib(pid);
    println!(
        "50 pause/unpause cycles: {per_cycle:?} per cycle; fds {fds0} -> {fds1}; RSS {rss0} -> {rss1} KiB"
    );
    let info = qmp.execute("query-svff-vfio", None).unwrap();
    qmp.execute("quit", None).unwrap();
    let status = child.wait().unwrap();
    cleanup(&pf, &vfs);
    assert!(status.success());
    assert_eq!(info[0]["pause-count"], 51);
    assert_eq!(fds1, fds0, "no fd leaked over 50 cycles");
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn msix_interrupts_of_an_igb_vf_reach_the_guest_before_a_pause_and_after_the_unpause_onto_a_new_vf()
{
    use qmp_ext::Client;
    use serde_json::json;
    use std::time::{Duration, Instant};

    guest::require_lab();
    guest::modprobe("kvm-amd");
    let (pf, vfs) = igb_vfs(1);
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let sock = dir.path().join("qmp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
        .args(["--test-devices", "0", "--guest-report-every", "20"])
        .arg(format!("--vfio={},id=vf0", vfs[0]))
        .arg(format!("--serial=file:{}", serial.display()))
        .arg("--qmp")
        .arg(&sock)
        .spawn()
        .unwrap();
    let out = || std::fs::read_to_string(&serial).unwrap_or_default();
    let irqs = || {
        let o = out();
        let complete = o[..o.rfind('\n').map_or(0, |i| i + 1)].to_string();
        complete
            .lines()
            .rev()
            .filter_map(parse_counters)
            .find(|c| c.dev == "00:01.0")
            .map(|c| c.irqs)
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}:\n{}",
                out()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("the QMP socket listening", &|| {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let mut qmp = Client::connect(&sock, Duration::from_secs(30)).unwrap();
    wait("MSI-X enabled by the guest", &|| {
        out().contains("svff-guest: dev=00:01.0 msix vector=64")
    });
    wait("first reports", &|| irqs().is_some());
    assert_eq!(irqs(), Some(0), "no interrupt before one is triggered");
    let fire = |qmp: &mut Client, n: u64| {
        qmp.execute(
            "x-svff-trigger-irq",
            Some(json!({"id": "vf0", "vector": 0})),
        )
        .unwrap();
        wait(&format!("interrupt {n} in the guest"), &|| {
            irqs().is_some_and(|i| i >= n)
        });
    };
    fire(&mut qmp, 1);
    fire(&mut qmp, 2);

    qmp.execute("svff-vfio-pause", Some(json!({"id": "vf0"})))
        .unwrap();
    let paused = qmp.execute(
        "x-svff-trigger-irq",
        Some(json!({"id": "vf0", "vector": 0})),
    );
    assert!(paused.is_err(), "a paused VF has no vectors: {paused:?}");
    set_numvfs(&pf, 0);
    set_numvfs(&pf, 1);
    let new_vfs = vfs_of(&pf);
    bind(&new_vfs[0], "vfio-pci");
    qmp.execute(
        "svff-vfio-unpause",
        Some(json!({"id": "vf0", "host": new_vfs[0]})),
    )
    .unwrap();
    fire(&mut qmp, 3);
    fire(&mut qmp, 4);
    let round = || {
        let o = out();
        o.lines()
            .rev()
            .filter_map(parse_counters)
            .next()
            .map_or(0, |c| c.round)
    };
    let r = round();
    wait("two more reports", &|| round() >= r + 40);
    let last = irqs();
    qmp.execute("quit", None).unwrap();
    let status = child.wait().unwrap();
    cleanup(&pf, &vfs);
    println!("{}", out());
    assert!(status.success());
    assert_eq!(
        last,
        Some(4),
        "each triggered vector reached the guest once, none other"
    );
}

/// The uid and gid the unprivileged VMM runs as (`nobody`).
const NOBODY: u32 = 65534;

fn open_group(vf: &str) -> std::fs::File {
    let path = format!("/dev/vfio/{}", guest::iommu_group(vf));
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn an_unprivileged_vmm_gets_group_fds_over_qmp_and_pauses_and_unpauses_across_a_numvfs_cycle() {
    use qmp_ext::Client;
    use serde_json::json;
    use std::os::fd::AsFd;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::{Duration, Instant};

    guest::require_lab();
    guest::modprobe("kvm-amd");
    let (pf, vfs) = igb_vfs(1);
    let group_node = format!("/dev/vfio/{}", guest::iommu_group(&vfs[0]));
    let meta = std::fs::metadata(&group_node).unwrap();
    assert!(
        meta.uid() == 0 && meta.mode() & 0o077 == 0,
        "{group_node} is root's only, so the VMM cannot open it itself"
    );
    let kvm_mode = std::fs::metadata("/dev/kvm").unwrap().permissions().mode();
    std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(0o666)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let serial = dir.path().join("serial.log");
    let sock = dir.path().join("qmp.sock");
    // type1 pins guest RAM against RLIMIT_MEMLOCK of an unprivileged process.
    let mut child = Command::new("prlimit")
        .args(["--memlock=unlimited", "setpriv"])
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .args(["--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_svff-vmm"))
        .args(["--test-devices", "0", "--guest-report-every", "20"])
        .arg(format!("--vfio={},id=vf0,fd=g0", vfs[0]))
        .arg(format!("--serial=file:{}", serial.display()))
        .arg("--qmp")
        .arg(&sock)
        .spawn()
        .unwrap();
    let out = || std::fs::read_to_string(&serial).unwrap_or_default();
    let last = || {
        let o = out();
        let complete = o[..o.rfind('\n').map_or(0, |i| i + 1)].to_string();
        complete
            .lines()
            .rev()
            .filter_map(parse_counters)
            .find(|c| c.dev == "00:01.0")
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}:\n{}",
                out()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("the QMP socket listening", &|| {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid_line.split_whitespace().nth(1),
        Some("65534"),
        "{uid_line}"
    );
    let mut qmp = Client::connect(&sock, Duration::from_secs(30)).unwrap();
    let pre = qmp.execute("query-status", None).unwrap();
    assert_eq!(pre["status"], "prelaunch");
    let refused = qmp.execute("x-svff-start", None);
    assert!(refused.is_err(), "no fd passed yet: {refused:?}");
    // The refused start took nothing: the handshake goes on.
    let g0 = open_group(&vfs[0]);
    qmp.send_fd("g0", g0.as_fd()).unwrap();
    drop(g0);
    qmp.execute("x-svff-start", None).unwrap();
    wait("first reports", &|| last().is_some());
    qmp.execute(
        "x-svff-trigger-irq",
        Some(json!({"id": "vf0", "vector": 0})),
    )
    .unwrap();
    wait("an interrupt before the pause", &|| {
        last().is_some_and(|c| c.irqs >= 1)
    });
    let before = last().unwrap();

    qmp.execute("svff-vfio-pause", Some(json!({"id": "vf0"})))
        .unwrap();
    set_numvfs(&pf, 0);
    set_numvfs(&pf, 1);
    let new_vfs = vfs_of(&pf);
    bind(&new_vfs[0], "vfio-pci");
    let g1 = open_group(&new_vfs[0]);
    qmp.send_fd("g1", g1.as_fd()).unwrap();
    drop(g1);
    qmp.execute(
        "svff-vfio-unpause",
        Some(json!({"id": "vf0", "host": new_vfs[0], "fdname": "g1"})),
    )
    .unwrap();
    let info = qmp.execute("query-svff-vfio", None).unwrap();
    println!("{info:#}");
    assert_eq!(info[0]["state"], "attached");
    assert_eq!(info[0]["host"], new_vfs[0].as_str());
    let paused_reads = info[0]["paused-accesses"]["bar-reads"].as_u64().unwrap();
    qmp.execute(
        "x-svff-trigger-irq",
        Some(json!({"id": "vf0", "vector": 0})),
    )
    .unwrap();
    let r = last().unwrap().round;
    wait("an interrupt and two reports after the unpause", &|| {
        last().is_some_and(|c| c.irqs > before.irqs && c.round >= r + 40)
    });
    let after = last().unwrap();
    qmp.execute("quit", None).unwrap();
    let status = child.wait().unwrap();
    std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(kvm_mode)).unwrap();
    cleanup(&pf, &vfs);
    println!("{}", out());
    assert!(status.success());
    assert_eq!(after.gone, 0, "the guest never saw the VF leave");
    assert!(after.ok > before.ok, "{before:?} -> {after:?}");
    assert_eq!(
        after.ones, paused_reads,
        "all-ones only in the pause window"
    );
    assert_ne!(after.id, u32::MAX);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn bars_of_an_attached_vf_are_kvm_slots_that_go_at_pause_and_come_back_at_unpause() {
    use qmp_ext::Client;
    use serde_json::{json, Value};
    use std::time::{Duration, Instant};

    guest::require_lab();
    guest::modprobe("kvm-amd");
    let (pf, vfs) = igb_vfs(1);
    let dir = tempfile::tempdir().unwrap();

    // The same guest with every BAR access trapped, for the access times printed below.
    let trap_serial = dir.path().join("trapped.log");
    let st = Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
        .args(["--test-devices", "0", "--guest-rounds", "40"])
        .args(["--guest-report-every", "40"])
        .arg(format!("--vfio={},id=vf0,mmap=off", vfs[0]))
        .arg(format!("--serial=file:{}", trap_serial.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let trapped_run = std::fs::read_to_string(&trap_serial)
        .unwrap()
        .lines()
        .filter_map(parse_counters)
        .next_back()
        .expect("counters of the mmap=off run");

    let serial = dir.path().join("serial.log");
    let sock = dir.path().join("qmp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
        .args(["--test-devices", "0", "--guest-report-every", "20"])
        .arg(format!("--vfio={},id=vf0", vfs[0]))
        .arg(format!("--serial=file:{}", serial.display()))
        .arg("--qmp")
        .arg(&sock)
        .spawn()
        .unwrap();
    let out = || std::fs::read_to_string(&serial).unwrap_or_default();
    let last = || {
        let o = out();
        let complete = o[..o.rfind('\n').map_or(0, |i| i + 1)].to_string();
        complete
            .lines()
            .rev()
            .filter_map(parse_counters)
            .find(|c| c.dev == "00:01.0")
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}:\n{}",
                out()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let two_reports = |what: &str| {
        let r = last().map_or(0, |c| c.round);
        wait(what, &|| last().is_some_and(|c| c.round >= r + 40));
    };
    wait("the QMP socket listening", &|| {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let mut qmp = Client::connect(&sock, Duration::from_secs(30)).unwrap();
    let mut slots = || -> Value {
        let v = qmp.execute("x-svff-query-bar-slots", None).unwrap();
        v[0].clone()
    };
    wait("first reports", &|| last().is_some());
    two_reports("reports while attached");
    let s0 = slots();
    let mapped_first = last().unwrap();
    two_reports("more reports while attached");
    let s1 = slots();
    println!("attached: {s0} -> {s1}");
    assert!(s0["slots"].as_u64().unwrap() >= 1, "BARs mapped: {s0}");
    assert_eq!(
        s0["trapped"], s1["trapped"],
        "no BAR read of the guest reached the VMM while mapped"
    );

    let mut qmp2 = Client::connect(&sock, Duration::from_secs(30)).unwrap();
    qmp2.execute("svff-vfio-pause", Some(json!({"id": "vf0"})))
        .unwrap();
    let sp = slots();
    assert_eq!(sp["slots"], 0, "no slot while paused: {sp}");
    two_reports("reports while paused");
    let sp2 = slots();
    assert!(
        sp2["trapped"].as_u64() > sp["trapped"].as_u64(),
        "paused reads trap: {sp} -> {sp2}"
    );
    set_numvfs(&pf, 0);
    set_numvfs(&pf, 1);
    let new_vfs = vfs_of(&pf);
    bind(&new_vfs[0], "vfio-pci");
    qmp2.execute(
        "svff-vfio-unpause",
        Some(json!({"id": "vf0", "host": new_vfs[0]})),
    )
    .unwrap();
    let info = qmp2.execute("query-svff-vfio", None).unwrap();
    let paused_reads = info[0]["paused-accesses"]["bar-reads"].as_u64().unwrap();
    let su = slots();
    assert_eq!(su["slots"], s0["slots"], "the same slots again: {su}");
    two_reports("reports after the unpause");
    let su2 = slots();
    assert_eq!(su["trapped"], su2["trapped"], "mapped again: {su} -> {su2}");
    let after = last().unwrap();
    qmp2.execute("quit", None).unwrap();
    let status = child.wait().unwrap();
    cleanup(&pf, &vfs);
    println!("{}", out());
    assert!(status.success());
    assert_eq!(after.gone, 0);
    assert!(after.ok > mapped_first.ok);
    assert_eq!(
        after.ones, paused_reads,
        "all-ones only in the pause window"
    );
    println!(
        "guest-observed longest BAR read (TSC ticks): trapped (mmap=off) {}, mapped (first {} reads) {}, whole run incl. the pause window {}",
        trapped_run.max_tsc, mapped_first.reads, mapped_first.max_tsc, after.max_tsc
    );
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn device_del_and_device_add_of_a_vf_are_seen_by_the_guest_as_a_removal_and_an_addition() {
    use qmp_ext::Client;
    use serde_json::json;
    use std::time::{Duration, Instant};

    guest::require_lab();
    guest::modprobe("kvm-amd");
    let (pf, vfs) = igb_vfs(1);
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let sock = dir.path().join("qmp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
        .args(["--test-devices", "0", "--guest-report-every", "20"])
        .arg(format!("--vfio={},id=vf0", vfs[0]))
        .arg(format!("--serial=file:{}", serial.display()))
        .arg("--qmp")
        .arg(&sock)
        .spawn()
        .unwrap();
    let out = || std::fs::read_to_string(&serial).unwrap_or_default();
    let last = || {
        let o = out();
        let complete = o[..o.rfind('\n').map_or(0, |i| i + 1)].to_string();
        complete
            .lines()
            .rev()
            .filter_map(parse_counters)
            .find(|c| c.dev == "00:01.0")
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}:\n{}",
                out()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("the QMP socket listening", &|| {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let mut qmp = Client::connect(&sock, Duration::from_secs(30)).unwrap();
    wait("first reports", &|| last().is_some());
    let before = last().unwrap();
    assert_eq!((before.gone, before.back), (0, 0));

    qmp.execute("device_del", Some(json!({"id": "vf0"})))
        .unwrap();
    let ev = qmp
        .wait_event("DEVICE_DELETED", Duration::from_secs(30))
        .unwrap();
    assert_eq!(ev.data.as_ref().unwrap()["device"], "vf0");
    wait("the guest to see the VF gone", &|| {
        out().contains("svff-guest: dev=00:01.0 event=gone")
    });
    assert!(qmp.execute("query-svff-vfio", None).unwrap()[0].is_null());
    // Every fd of the VF is closed: the count change does not block.
    set_numvfs(&pf, 0);
    set_numvfs(&pf, 1);
    let new_vfs = vfs_of(&pf);
    bind(&new_vfs[0], "vfio-pci");
    let r = qmp
        .execute(
            "device_add",
            Some(json!({"driver": "vfio-pci", "host": new_vfs[0], "id": "vf0"})),
        )
        .unwrap();
    assert_eq!(r["guest"], "00:01.0");
    wait("the guest to see the VF back", &|| {
        out().contains("svff-guest: dev=00:01.0 event=back")
    });
    let rd = last().unwrap().round;
    wait("two reports after the addition", &|| {
        last().is_some_and(|c| c.round >= rd + 40)
    });
    let after = last().unwrap();
    let info = qmp.execute("query-svff-vfio", None).unwrap();
    assert_eq!(info[0]["host"], new_vfs[0].as_str());
    qmp.execute("quit", None).unwrap();
    let status = child.wait().unwrap();
    cleanup(&pf, &vfs);
    println!("{}", out());
    assert!(status.success());
    assert_eq!((after.gone, after.back), (1, 1), "{after:?}");
    assert!(after.ok > before.ok, "valid reads on the added VF");
    assert_ne!(after.id, u32::MAX);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn a_bar0_the_guest_moves_is_mapped_at_its_new_address_and_again_after_a_pause_onto_a_new_vf() {
    use qmp_ext::Client;
    use serde_json::{json, Value};
    use std::time::{Duration, Instant};

    guest::require_lab();
    guest::modprobe("kvm-amd");
    let (pf, vfs) = igb_vfs(1);
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let sock = dir.path().join("qmp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
        .args(["--test-devices", "0", "--guest-report-every", "20"])
        .args(["--guest-mode", "move-bar"])
        .arg(format!("--vfio={},id=vf0", vfs[0]))
        .arg(format!("--serial=file:{}", serial.display()))
        .arg("--qmp")
        .arg(&sock)
        .spawn()
        .unwrap();
    let out = || std::fs::read_to_string(&serial).unwrap_or_default();
    let last = || {
        let o = out();
        let complete = o[..o.rfind('\n').map_or(0, |i| i + 1)].to_string();
        complete
            .lines()
            .rev()
            .filter_map(parse_counters)
            .find(|c| c.dev == "00:01.0")
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}:\n{}",
                out()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let two_reports = |what: &str| {
        let r = last().map_or(0, |c| c.round);
        wait(what, &|| last().is_some_and(|c| c.round >= r + 40));
    };
    // STATUS of an igb VF: IOV mode and 1 VF.
    let live = |st: u32| st & (1 << 18) != 0 && (st >> 14) & 0xf == 1;
    wait("the QMP socket listening", &|| {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let mut qmp = Client::connect(&sock, Duration::from_secs(30)).unwrap();
    let mut slots = || -> Value { qmp.execute("x-svff-query-bar-slots", None).unwrap()[0].clone() };
    wait("the guest to move BAR0", &|| {
        out().contains("svff-guest: dev=00:01.0 moved bar0=e0000000")
    });
    two_reports("reports at the new address");
    let s0 = slots();
    let moved = last().unwrap();
    two_reports("more reports at the new address");
    let s1 = slots();
    let at_new = last().unwrap();
    println!("after the move: {s0} -> {s1}; {moved:?} -> {at_new:?}");
    assert!(
        s0["slots"].as_u64().unwrap() >= 1,
        "BAR0 mapped again: {s0}"
    );
    assert!(
        s0["maps"].as_u64() > Some(s0["slots"].as_u64().unwrap()),
        "re-added at the move: {s0}"
    );
    assert_eq!(
        s0["trapped"], s1["trapped"],
        "no read trapped at the new address"
    );
    assert!(
        live(at_new.st) && at_new.ones == 0 && at_new.ok > moved.ok,
        "{at_new:?}"
    );

    let mut qmp2 = Client::connect(&sock, Duration::from_secs(30)).unwrap();
    qmp2.execute("svff-vfio-pause", Some(json!({"id": "vf0"})))
        .unwrap();
    two_reports("reports while paused");
    set_numvfs(&pf, 0);
    set_numvfs(&pf, 1);
    let new_vfs = vfs_of(&pf);
    bind(&new_vfs[0], "vfio-pci");
    qmp2.execute(
        "svff-vfio-unpause",
        Some(json!({"id": "vf0", "host": new_vfs[0]})),
    )
    .unwrap();
    let info = qmp2.execute("query-svff-vfio", None).unwrap();
    let paused_reads = info[0]["paused-accesses"]["bar-reads"].as_u64().unwrap();
    let su = slots();
    two_reports("reports after the unpause");
    let su2 = slots();
    let after = last().unwrap();
    qmp2.execute("quit", None).unwrap();
    let status = child.wait().unwrap();
    cleanup(&pf, &vfs);
    println!("{}", out());
    assert!(status.success());
    assert_eq!(su["slots"], s0["slots"], "the moved BAR mapped again: {su}");
    assert_eq!(
        su["trapped"], su2["trapped"],
        "at the moved address: {su} -> {su2}"
    );
    assert_eq!(after.gone, 0);
    assert!(
        after.ones >= 1 && after.ones == paused_reads,
        "{after:?} {paused_reads}"
    );
    assert!(
        live(after.st) && after.ok > at_new.ok,
        "live registers of the new VF: {after:?}"
    );
}

/// The last counter line of `dev` printed after `round` (by a report that is complete).
fn report_after(vmm: &common::Vmm, dev: &str, round: u64) -> svff_vmm::GuestCounters {
    vmm.wait(&format!("a report of {dev} after round {round}"), &|| {
        vmm.last(dev).is_some_and(|c| c.round > round)
    });
    vmm.last(dev).unwrap()
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn msi_of_an_msi_only_function_reaches_the_guest_by_irqfd_stops_while_paused_and_resumes_after_unpause(
) {
    use serde_json::json;

    guest::require_lab();
    guest::modprobe("kvm-amd");
    // QEMU's edu in L1: MSI (one vector, 64-bit), no MSI-X; it raises its MSI on a write of
    // BAR0+0x60, which the test guest does every round once it enabled MSI.
    let edu = guest::edu();
    bind(&edu, "vfio-pci");
    let mut vmm = common::Vmm::spawn("vmm", &[("edu0", &edu, "ignore")], 20, "read");
    let dev = "00:01.0";
    vmm.wait("edu found by the guest", &|| {
        vmm.out()
            .contains("svff-guest: found 00:01.0 vendor=1234 device=11e8")
    });
    vmm.wait("MSI enabled by the guest", &|| {
        vmm.out().contains("svff-guest: dev=00:01.0 msi vector=64")
    });
    assert!(
        !vmm.out().contains("dev=00:01.0 msix"),
        "edu has no MSI-X: {}",
        vmm.out()
    );
    let s1 = report_after(&vmm, dev, 0);
    let s2 = report_after(&vmm, dev, s1.round);
    println!("attached: {s1:?}\n          {s2:?}");
    assert_eq!(s2.id, 0x0100_00ed, "edu's identity register: {s2:?}");
    assert!(s1.irqs >= 1, "the device's MSI reached the guest: {s1:?}");
    assert!(s2.irqs > s1.irqs, "and keeps coming: {s1:?} -> {s2:?}");

    let mut qmp = vmm.qmp();
    let p = qmp
        .execute("svff-vfio-pause", Some(json!({"id": "edu0"})))
        .unwrap();
    println!("pause: {p}");
    // A report begun after the pause returned, then two more: no MSI meanwhile (the device's
    // fds are closed, and the guest's writes to BAR0+0x60 are dropped by policy ignore).
    let r = vmm.round();
    let p1 = report_after(&vmm, dev, r + 20);
    let p2 = report_after(&vmm, dev, p1.round + 20);
    println!("paused:   {p1:?}\n          {p2:?}");
    assert_eq!(p1.irqs, p2.irqs, "no MSI while paused: {p1:?} -> {p2:?}");
    assert!(
        p2.ones > p1.ones,
        "paused reads are all-ones: {p1:?} -> {p2:?}"
    );

    // edu is no VF: the unpause reopens the same function (its identity check passes).
    let u = qmp
        .execute("svff-vfio-unpause", Some(json!({"id": "edu0"})))
        .unwrap();
    println!("unpause: {u}");
    let info = qmp.execute("query-svff-vfio", None).unwrap();
    println!("{info:#}");
    assert_eq!(info[0]["state"], "attached");
    assert_eq!(info[0]["host"], edu.as_str());
    let paused_reads = info[0]["paused-accesses"]["bar-reads"].as_u64().unwrap();
    let r = vmm.round();
    let a1 = report_after(&vmm, dev, r + 20);
    let a2 = report_after(&vmm, dev, a1.round);
    println!("unpaused: {a1:?}\n          {a2:?}");
    let status = vmm.quit();
    drop(vmm);
    unbind(&edu);
    assert!(status.success(), "{status}");
    assert!(
        a2.irqs > p2.irqs,
        "MSI again after the unpause: {p2:?} -> {a2:?}"
    );
    assert!(a2.irqs > a1.irqs, "and it keeps coming: {a1:?} -> {a2:?}");
    assert_eq!((a2.gone, a2.back), (0, 0), "never left config space");
    assert_eq!(a2.id, 0x0100_00ed, "{a2:?}");
    assert_eq!(a2.ones, paused_reads, "all-ones only in the pause window");
}
