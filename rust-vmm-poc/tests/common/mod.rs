//! Shared by the two-VMM lab tests (`lab_vmm_nvme`, `lab_vmm_igb`): an svff-vmm process with
//! the test guest (run as root, or unprivileged with its VFIO group fds passed over QMP), and
//! the acceptance scenarios of issue 11 run against a PF's VFs.

#![allow(dead_code)]

use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use qmp_ext::Client;
use serde_json::{json, Value};
use svff_vmm::{parse_counters, GuestCounters};

/// A PF whose VF count the scenarios change.
pub trait Pf {
    /// Sets `n` VFs (through 0 if VFs exist), all on vfio-pci (nothing else holding them);
    /// returns them in `virtfn` order.
    fn vfs(&self, n: u16) -> Vec<String>;
}

/// What the scenarios expect of the PF's VFs.
pub struct Kind {
    /// Vendor ID the test guest must find (hex, lower case).
    pub vendor: &'static str,
    /// The VF raises MSI-X itself (test guest `--guest-mode ring-vf`); otherwise the kernel
    /// fires its vector through VFIO (`x-svff-trigger-irq`).
    pub self_irqs: bool,
    /// Whether a counter line shows live registers of a VF of a PF with this many VFs.
    pub live: fn(&GuestCounters, u16) -> bool,
}

/// The uid and gid an unprivileged VMM runs as (`nobody`).
pub const NOBODY: u32 = 65534;

/// `/dev/kvm` opened to everyone (an unprivileged VMM needs it; `/dev/vfio/<group>` stays
/// root's); its mode put back on drop.
struct KvmForAll(u32);

impl KvmForAll {
    fn new() -> KvmForAll {
        let mode = std::fs::metadata("/dev/kvm").unwrap().permissions().mode();
        std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(0o666)).unwrap();
        KvmForAll(mode)
    }
}

impl Drop for KvmForAll {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(self.0));
    }
}

/// Opens the VFIO group of `host` (as root), to hand to an unprivileged VMM.
pub fn open_group(host: &str) -> std::fs::File {
    let path = format!("/dev/vfio/{}", svff_lab::guest::iommu_group(host));
    let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(
        meta.uid() == 0 && meta.mode() & 0o077 == 0,
        "{path} is root's only, so an unprivileged VMM cannot open it itself"
    );
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One svff-vmm with the test guest, its serial log and QMP socket; killed on drop.
pub struct Vmm {
    pub name: &'static str,
    /// Runs as [`NOBODY`] and gets its group fds over QMP (at start and at unpause).
    pub unprivileged: bool,
    child: Option<Child>,
    serial: PathBuf,
    sock: PathBuf,
    _kvm: Option<KvmForAll>,
    _dir: tempfile::TempDir,
}

impl Vmm {
    /// `devs`: `(id, host BDF, policy)`, at guest 00:01.0, 00:02.0, ...
    pub fn spawn(
        name: &'static str,
        devs: &[(&str, &str, &str)],
        report_every: u32,
        mode: &str,
    ) -> Vmm {
        Self::spawn_as(name, devs, report_every, mode, false)
    }

    /// As [`Vmm::spawn`]; `unprivileged`: run as [`NOBODY`] (`setpriv`, locked-memory limit
    /// raised for type1's pins) with no access to `/dev/vfio/<group>`, every device given as
    /// `fd=<id>`, its group fd passed with `getfd <id>` before `x-svff-start`.
    pub fn spawn_as(
        name: &'static str,
        devs: &[(&str, &str, &str)],
        report_every: u32,
        mode: &str,
        unprivileged: bool,
    ) -> Vmm {
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        let sock = dir.path().join("qmp.sock");
        let (mut cmd, kvm) = if unprivileged {
            std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
            let mut c = Command::new("prlimit");
            c.args(["--memlock=unlimited", "setpriv"])
                .arg(format!("--reuid={NOBODY}"))
                .arg(format!("--regid={NOBODY}"))
                .args(["--clear-groups", "--"])
                .arg(env!("CARGO_BIN_EXE_svff-vmm"));
            (c, Some(KvmForAll::new()))
        } else {
            (Command::new(env!("CARGO_BIN_EXE_svff-vmm")), None)
        };
        cmd.args(["--test-devices", "0", "--guest-mode", mode])
            .arg(format!("--guest-report-every={report_every}"))
            .arg(format!("--serial=file:{}", serial.display()))
            .arg("--qmp")
            .arg(&sock);
        for (id, host, policy) in devs {
            let fd = if unprivileged {
                format!(",fd={id}")
            } else {
                String::new()
            };
            cmd.arg(format!("--vfio={host},id={id},policy={policy}{fd}"));
        }
        let vmm = Vmm {
            name,
            unprivileged,
            child: Some(cmd.spawn().unwrap()),
            serial,
            sock,
            _kvm: kvm,
            _dir: dir,
        };
        vmm.wait("the QMP socket listening", &|| {
            std::os::unix::net::UnixStream::connect(&vmm.sock).is_ok()
        });
        if unprivileged {
            assert_eq!(vmm.uid(), NOBODY, "{name} runs as nobody");
            let mut qmp = vmm.qmp();
            assert_eq!(
                qmp.execute("query-status", None).unwrap()["status"],
                "prelaunch",
                "{name} waits for its group fds"
            );
            for (id, host, _) in devs {
                let g = open_group(host);
                qmp.send_fd(id, g.as_fd()).unwrap();
            }
            qmp.execute("x-svff-start", None)
                .unwrap_or_else(|e| panic!("{name}: x-svff-start: {e}"));
        }
        vmm
    }

    /// The real uid of the VMM process.
    pub fn uid(&self) -> u32 {
        let pid = self.child.as_ref().unwrap().id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
            .unwrap()
    }

    /// `svff-vfio-unpause` of `id` onto `host` on its own QMP connection; an unprivileged VMM
    /// first gets the group fd of `host` (`getfd`, then `fdname`).
    pub fn unpause(&self, id: &str, host: &str) -> Value {
        let mut qmp = self.qmp();
        let mut args = json!({"id": id, "host": host});
        if self.unprivileged {
            let fdname = format!("{id}-unpause");
            qmp.send_fd(&fdname, open_group(host).as_fd()).unwrap();
            args["fdname"] = json!(fdname);
        }
        qmp.execute("svff-vfio-unpause", Some(args.clone()))
            .unwrap_or_else(|e| panic!("{}: svff-vfio-unpause {args}: {e}", self.name))
    }

    pub fn out(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// The last complete counter line of `dev`.
    pub fn last(&self, dev: &str) -> Option<GuestCounters> {
        let o = self.out();
        o[..o.rfind('\n').map_or(0, |i| i + 1)]
            .lines()
            .rev()
            .filter_map(parse_counters)
            .find(|c| c.dev == dev)
    }

    pub fn round(&self) -> u64 {
        let o = self.out();
        o[..o.rfind('\n').map_or(0, |i| i + 1)]
            .lines()
            .rev()
            .find_map(parse_counters)
            .map_or(0, |c| c.round)
    }

    pub fn wait(&self, what: &str, cond: &dyn Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(90);
        while !cond() {
            assert!(
                Instant::now() < end,
                "{}: timed out waiting for {what}:\n{}",
                self.name,
                self.out()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the guest printed `reports` more reports than now.
    pub fn reports(&self, reports: u64, every: u64) {
        let r = self.round();
        self.wait("more reports", &|| self.round() >= r + reports * every);
    }

    pub fn qmp(&self) -> Client {
        Client::connect(&self.sock, Duration::from_secs(30)).unwrap()
    }

    pub fn quit(&mut self) -> ExitStatus {
        self.qmp().execute("quit", None).unwrap();
        self.child.take().unwrap().wait().unwrap()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Fires MSI-X vector 0 of `id` and waits until the guest counted `n` interrupts on `dev`.
pub fn fire(vmm: &Vmm, qmp: &mut Client, id: &str, dev: &str, n: u64) {
    qmp.execute("x-svff-trigger-irq", Some(json!({"id": id, "vector": 0})))
        .unwrap_or_else(|e| panic!("{}: trigger {id}: {e}", vmm.name));
    vmm.wait(&format!("interrupt {n} of {dev}"), &|| {
        vmm.last(dev).is_some_and(|c| c.irqs >= n)
    });
}

/// Runs `command` for every `(vmm, args)` at once, each on its own QMP connection.
pub fn in_parallel(command: &str, calls: &[(&Vmm, Value)]) -> Vec<Value> {
    std::thread::scope(|s| {
        let hs: Vec<_> = calls
            .iter()
            .map(|(vmm, args)| {
                let mut qmp = vmm.qmp();
                let args = args.clone();
                s.spawn(move || {
                    qmp.execute(command, Some(args.clone()))
                        .unwrap_or_else(|e| panic!("{command} {args}: {e}"))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

pub const DEVS: [&str; 2] = ["00:01.0", "00:02.0"];
pub const EVERY: u32 = 20;

/// Two svff-vmm instances, each with 2 VFs of `pf` (A: policy ignore, as root; B: policy
/// stall, unprivileged, its group fds passed over QMP at start and at unpause), the test guest
/// reading them: all four paused in parallel, `sriov_numvfs` 4 -> 0 -> 6 with vfio-pci binding,
/// each unpaused in parallel onto another new VF (vf0 -> VF 5, vf1 -> 4, vf2 -> 3, vf3 -> 2).
/// Asserts what issue 11's acceptance asks, from the guests' counters.
pub fn pause_across_numvfs_4_0_6(pf: &dyn Pf, kind: &Kind) {
    let vfs = pf.vfs(4);
    let mode = if kind.self_irqs { "ring-vf" } else { "read" };
    // Guest A ignores paused accesses (all-ones), guest B's accesses wait for the unpause.
    let mut a = Vmm::spawn(
        "vmm-a",
        &[("vf0", &vfs[0], "ignore"), ("vf1", &vfs[1], "ignore")],
        EVERY,
        mode,
    );
    let mut b = Vmm::spawn_as(
        "vmm-b",
        &[("vf2", &vfs[2], "stall"), ("vf3", &vfs[3], "stall")],
        EVERY,
        mode,
        true,
    );
    assert_eq!((a.uid(), b.uid()), (0, NOBODY));
    let guests = [(&a, ["vf0", "vf1"]), (&b, ["vf2", "vf3"])];
    let mut before = Vec::new();
    for (vmm, ids) in guests {
        for dev in DEVS {
            // B starts its guest only after the fd handshake: wait for the
            // guest to reach `dev` in its enumeration before checking it.
            vmm.wait(&format!("enumeration of {dev}"), &|| {
                vmm.out().contains(&format!("svff-guest: found {dev} "))
            });
            assert!(
                vmm.out()
                    .contains(&format!("svff-guest: found {dev} vendor={}", kind.vendor)),
                "{}: {dev} is an nvme VF:\n{}",
                vmm.name,
                vmm.out()
            );
            vmm.wait(&format!("MSI-X of {dev}"), &|| {
                vmm.out().contains(&format!("svff-guest: dev={dev} msix"))
            });
            vmm.wait(&format!("reports of {dev}"), &|| vmm.last(dev).is_some());
        }
        let mut qmp = vmm.qmp();
        for (id, dev) in ids.iter().zip(DEVS) {
            if kind.self_irqs {
                vmm.wait(&format!("an interrupt raised by {dev}"), &|| {
                    vmm.last(dev).is_some_and(|c| c.irqs >= 1)
                });
            } else {
                fire(vmm, &mut qmp, id, dev, 1);
            }
        }
        for dev in DEVS {
            let c = vmm.last(dev).unwrap();
            assert!(c.ok > 0 && c.ones == 0, "{}: {c:?}", vmm.name);
            assert!((kind.live)(&c, 4), "live registers of the VF: {c:?}");
            before.push(c);
        }
    }

    let pauses = in_parallel(
        "svff-vfio-pause",
        &[
            (&a, json!({"id": "vf0"})),
            (&a, json!({"id": "vf1"})),
            (&b, json!({"id": "vf2"})),
            (&b, json!({"id": "vf3"})),
        ],
    );
    for p in &pauses {
        println!("pause: {p}");
    }
    // Every fd of all four VFs is closed: the count change does not block.
    let t = Instant::now();
    let new_vfs = pf.vfs(6);
    println!("sriov_numvfs 4 -> 0 -> 6 + bind: {:?}", t.elapsed());
    // B cannot open the new VF's group itself: an unpause without a passed fd is refused and
    // leaves the device paused.
    let refused = b.qmp().execute(
        "svff-vfio-unpause",
        Some(json!({"id": "vf2", "host": new_vfs[3]})),
    );
    println!("vmm-b, unpause without a group fd: {refused:?}");
    assert!(refused.is_err(), "{refused:?}");
    let st = b.qmp().execute("query-svff-vfio", None).unwrap();
    assert_eq!(st[0]["state"], "paused", "{st}");
    // Each onto another new VF than it had: vf0 -> VF 5, vf1 -> 4, vf2 -> 3, vf3 -> 2; B's
    // with the new VFs' group fds.
    let unpauses: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = [
            (&a, "vf0", 5),
            (&a, "vf1", 4),
            (&b, "vf2", 3),
            (&b, "vf3", 2),
        ]
        .into_iter()
        .map(|(vmm, id, h)| {
            let host = &new_vfs[h];
            s.spawn(move || vmm.unpause(id, host))
        })
        .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for u in &unpauses {
        println!("unpause: {u}");
    }
    let mut paused_reads = Vec::new();
    for (vmm, ids) in guests {
        let info = vmm.qmp().execute("query-svff-vfio", None).unwrap();
        println!("{}: {info:#}", vmm.name);
        for (d, id) in info.as_array().unwrap().iter().zip(ids) {
            assert_eq!(d["id"], id);
            assert_eq!(d["state"], "attached", "{d}");
            assert_eq!(d["pause-count"], 1, "{d}");
            paused_reads.push(d["paused-accesses"]["bar-reads"].as_u64().unwrap());
        }
        assert_eq!(
            info[0]["host"],
            new_vfs[if ids[0] == "vf0" { 5 } else { 3 }]
        );
        assert_eq!(
            info[1]["host"],
            new_vfs[if ids[0] == "vf0" { 4 } else { 2 }]
        );
        let mut qmp = vmm.qmp();
        // Two reports after the unpause, so every read of the pause window is counted.
        vmm.reports(2, EVERY.into());
        for (id, dev) in ids.iter().zip(DEVS) {
            if kind.self_irqs {
                let i = vmm.last(dev).unwrap().irqs;
                vmm.wait(
                    &format!("interrupts raised by the new VF at {dev}"),
                    &|| vmm.last(dev).is_some_and(|c| c.irqs > i),
                );
            } else {
                fire(vmm, &mut qmp, id, dev, 2);
            }
        }
    }
    let after: Vec<GuestCounters> = guests
        .iter()
        .flat_map(|(vmm, _)| DEVS.map(|d| vmm.last(d).unwrap()))
        .collect();
    let khz = a.qmp().execute("x-svff-query-tsc", None).unwrap()["tsc-khz"].clone();
    let (sa, sb) = (a.quit(), b.quit());
    let (out_a, out_b) = (a.out(), b.out());
    drop((a, b));
    println!("vmm-a:\n{out_a}\nvmm-b:\n{out_b}");
    println!("guest TSC: {khz} kHz");
    for (b4, af) in before.iter().zip(&after) {
        println!("before {b4:?}\nafter  {af:?}");
    }
    assert!(sa.success() && sb.success(), "{sa} {sb}");
    assert!(!out_a.contains("event=") && !out_b.contains("event="));
    for (i, ((b4, af), paused)) in before.iter().zip(&after).zip(&paused_reads).enumerate() {
        let stall = i >= 2;
        assert_eq!(
            (af.gone, af.back),
            (0, 0),
            "the guest never saw {} leave config space",
            af.dev
        );
        assert!(af.ok > b4.ok, "valid reads again: {b4:?} -> {af:?}");
        assert!((kind.live)(af, 6), "live registers of the new VF: {af:?}");
        if kind.self_irqs {
            assert!(
                af.irqs > b4.irqs,
                "interrupts from the VF again: {b4:?} -> {af:?}"
            );
        } else {
            assert_eq!(af.irqs, 2, "one interrupt before, one after: {af:?}");
        }
        if stall {
            // Reads that reached a paused VF were held until the unpause, never all-ones.
            assert_eq!(
                af.ones, 0,
                "stall: accesses delayed, never all-ones: {af:?}"
            );
        } else {
            // All-ones only inside the pause window: exactly the BAR reads vfio-pause ignored.
            assert!(*paused >= 1, "the guest read the paused VF: {af:?}");
            assert_eq!(af.ones, *paused, "ignore: {af:?}");
        }
    }
    // Guest B's one vCPU waits in the first read of a paused VF until its unpause (so its
    // other VF may see no read of the window at all).
    assert!(
        paused_reads[2] + paused_reads[3] >= 1,
        "stall: guest B's reads were held: {paused_reads:?}"
    );
    println!(
        "longest guest-observed windows (1024 TSC ticks; stall: one held read): {:?}",
        after.iter().map(|c| c.win_ktsc).collect::<Vec<_>>()
    );
}

/// The same change with `device_del` / `device_add`: each guest sees its VFs gone, then back
/// (at the same guest addresses) on new VFs with live registers.
pub fn del_add_across_numvfs_4_0_6(pf: &dyn Pf, kind: &Kind) {
    let vfs = pf.vfs(4);
    let mut a = Vmm::spawn(
        "vmm-a",
        &[("vf0", &vfs[0], "ignore"), ("vf1", &vfs[1], "ignore")],
        EVERY,
        "read",
    );
    let mut b = Vmm::spawn(
        "vmm-b",
        &[("vf2", &vfs[2], "stall"), ("vf3", &vfs[3], "stall")],
        EVERY,
        "read",
    );
    let guests = [(&a, ["vf0", "vf1"]), (&b, ["vf2", "vf3"])];
    let mut before = Vec::new();
    for (vmm, _) in guests {
        for dev in DEVS {
            vmm.wait(&format!("reports of {dev}"), &|| vmm.last(dev).is_some());
            before.push(vmm.last(dev).unwrap());
        }
    }
    for (vmm, ids) in guests {
        let mut qmp = vmm.qmp();
        for (id, dev) in ids.iter().zip(DEVS) {
            qmp.execute("device_del", Some(json!({"id": id}))).unwrap();
            let ev = qmp
                .wait_event("DEVICE_DELETED", Duration::from_secs(30))
                .unwrap();
            assert_eq!(ev.data.as_ref().unwrap()["device"], *id);
            vmm.wait(&format!("{dev} gone"), &|| {
                vmm.out()
                    .contains(&format!("svff-guest: dev={dev} event=gone"))
            });
        }
    }
    // Every fd of all four VFs is closed: the count change does not block.
    let new_vfs = pf.vfs(6);
    for ((vmm, ids), hosts) in guests.iter().zip([[5, 4], [3, 2]]) {
        let mut qmp = vmm.qmp();
        for ((id, dev), h) in ids.iter().zip(DEVS).zip(hosts) {
            let r = qmp
                .execute(
                    "device_add",
                    Some(json!({"driver": "vfio-pci", "host": new_vfs[h], "id": id})),
                )
                .unwrap();
            assert_eq!(r["guest"], dev, "{}: the freed slot again", vmm.name);
            vmm.wait(&format!("{dev} back"), &|| {
                vmm.out()
                    .contains(&format!("svff-guest: dev={dev} event=back"))
            });
        }
        vmm.reports(2, EVERY.into());
    }
    let after: Vec<GuestCounters> = guests
        .iter()
        .flat_map(|(vmm, _)| DEVS.map(|d| vmm.last(d).unwrap()))
        .collect();
    let (sa, sb) = (a.quit(), b.quit());
    let (out_a, out_b) = (a.out(), b.out());
    drop((a, b));
    println!("vmm-a:\n{out_a}\nvmm-b:\n{out_b}");
    assert!(sa.success() && sb.success(), "{sa} {sb}");
    for (b4, af) in before.iter().zip(&after) {
        assert_eq!(
            (af.gone, af.back),
            (1, 1),
            "a removal and an addition: {af:?}"
        );
        assert!(
            af.ok > b4.ok,
            "valid reads on the added VF: {b4:?} -> {af:?}"
        );
        assert!((kind.live)(af, 6), "live registers of the added VF: {af:?}");
    }
}
