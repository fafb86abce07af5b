//! Two svff-vmm instances with nvme VFs of the lab's nvme PF (bound to the kernel's `nvme`
//! driver, every VF online with 2 VQ / 1 VI, so its BAR0 shows live NVMe registers: CAP at +0,
//! VS at +8): the acceptance scenario of issue 11 (parallel pauses of four VFs in two VMMs,
//! `sriov_numvfs` 4 -> 0 -> 6, unpause of each onto another new VF; the same change with
//! `device_del`/`device_add`), and the pause-window benchmark for 1, 4 and 10 VFs.
//!
//! MSI-X "from the VF" here is the kernel firing the VF's vector through VFIO
//! (`x-svff-trigger-irq`: `VFIO_DEVICE_SET_IRQS` trigger), so it travels VFIO -> eventfd ->
//! KVM irqfd -> guest LAPIC over the wiring the unpause re-made on the new VF; an nvme VF
//! raises MSI-X by itself only on a queue completion, which needs an NVMe driver in the guest.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use qmp_ext::Client;
use serde_json::{json, Value};
use svff_lab::guest;
use svff_pf_helper::{
    DriverName, NvmeResources, PciAddress, RealSysfs, SriovManager, VfsSetOptions,
};
use svff_vmm::{parse_counters, GuestCounters};

/// The nvme PF on the `nvme` driver; back to its driver from before, with 0 VFs, on drop.
/// Declare it before every [`Vmm`] so the VMMs (holding VFs) end first.
struct NvmePf {
    pf: String,
    driver: Option<String>,
    mgr: SriovManager<RealSysfs>,
}

impl NvmePf {
    fn new() -> NvmePf {
        guest::require_lab();
        guest::modprobe("kvm-amd");
        let pf = guest::nvme_pf();
        assert_eq!(
            guest::read_attr(guest::dev_path(&pf).join("sriov_numvfs")),
            "0",
            "VFs left behind on {pf}"
        );
        // Recorded before nvme is loaded: loading it binds an unbound PF.
        let driver = guest::driver_of(&pf);
        guest::modprobe("nvme");
        guest::modprobe("vfio-pci");
        NvmePf {
            pf,
            driver,
            mgr: SriovManager::new(RealSysfs::new()),
        }
    }

    fn addr(&self) -> PciAddress {
        PciAddress::parse(&self.pf).unwrap()
    }

    /// `n` online VFs (2 VQ, 1 VI each) on vfio-pci. Returns them and the steps' times (ms).
    fn set(&self, n: u16) -> (Vec<String>, Vec<(String, f64)>) {
        let opts = VfsSetOptions {
            pf_driver: Some(DriverName::parse("nvme").unwrap()),
            bind: Some(DriverName::parse("vfio-pci").unwrap()),
            qdma: None,
        };
        let report = self
            .mgr
            .set_vf_count_with(self.addr(), n, &opts, Some(&NvmeResources::uniform(2, 1)))
            .unwrap_or_else(|e| panic!("{} VFs on {}: {}", n, self.pf, e.chain()));
        let vfs = guest::vfs_of(&self.pf);
        assert_eq!(vfs.len(), usize::from(n));
        (
            vfs,
            report.steps.into_iter().map(|s| (s.name, s.ms)).collect(),
        )
    }
}

impl Drop for NvmePf {
    fn drop(&mut self) {
        if let Err(e) = self
            .mgr
            .set_vf_count(self.addr(), 0, &VfsSetOptions::default())
        {
            eprintln!("cleanup: removing the VFs of {}: {}", self.pf, e.chain());
        }
        let r = match &self.driver {
            Some(d) => self
                .mgr
                .ensure_pf_driver(self.addr(), &DriverName::parse(d).unwrap()),
            None => self.mgr.unbind(self.addr()),
        };
        if let Err(e) = r {
            eprintln!(
                "cleanup: restoring the driver of {}: {}",
                self.pf,
                e.chain()
            );
        }
    }
}

/// One svff-vmm with the test guest, its serial log and QMP socket; killed on drop.
struct Vmm {
    name: &'static str,
    child: Option<Child>,
    serial: PathBuf,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Vmm {
    /// `devs`: `(id, host BDF, policy)`, at guest 00:01.0, 00:02.0, ...
    fn spawn(name: &'static str, devs: &[(&str, &str, &str)], report_every: u32) -> Vmm {
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        let sock = dir.path().join("qmp.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_svff-vmm"));
        cmd.args(["--test-devices", "0"])
            .arg(format!("--guest-report-every={report_every}"))
            .arg(format!("--serial=file:{}", serial.display()))
            .arg("--qmp")
            .arg(&sock);
        for (id, host, policy) in devs {
            cmd.arg(format!("--vfio={host},id={id},policy={policy}"));
        }
        let vmm = Vmm {
            name,
            child: Some(cmd.spawn().unwrap()),
            serial,
            sock,
            _dir: dir,
        };
        vmm.wait("the QMP socket", &|| vmm.sock.exists());
        vmm
    }

    fn out(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// The last complete counter line of `dev`.
    fn last(&self, dev: &str) -> Option<GuestCounters> {
        let o = self.out();
        o[..o.rfind('\n').map_or(0, |i| i + 1)]
            .lines()
            .rev()
            .filter_map(parse_counters)
            .find(|c| c.dev == dev)
    }

    fn round(&self) -> u64 {
        let o = self.out();
        o[..o.rfind('\n').map_or(0, |i| i + 1)]
            .lines()
            .rev()
            .find_map(parse_counters)
            .map_or(0, |c| c.round)
    }

    fn wait(&self, what: &str, cond: &dyn Fn() -> bool) {
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
    fn reports(&self, reports: u64, every: u64) {
        let r = self.round();
        self.wait("more reports", &|| self.round() >= r + reports * every);
    }

    fn qmp(&self) -> Client {
        Client::connect(&self.sock, Duration::from_secs(30)).unwrap()
    }

    fn quit(&mut self) -> ExitStatus {
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
fn fire(vmm: &Vmm, qmp: &mut Client, id: &str, dev: &str, n: u64) {
    qmp.execute("x-svff-trigger-irq", Some(json!({"id": id, "vector": 0})))
        .unwrap_or_else(|e| panic!("{}: trigger {id}: {e}", vmm.name));
    vmm.wait(&format!("interrupt {n} of {dev}"), &|| {
        vmm.last(dev).is_some_and(|c| c.irqs >= n)
    });
}

/// Runs `command` for every `(vmm, args)` at once, each on its own QMP connection.
fn in_parallel(command: &str, calls: &[(&Vmm, Value)]) -> Vec<Value> {
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

const DEVS: [&str; 2] = ["00:01.0", "00:02.0"];
const EVERY: u32 = 20;

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn two_vmms_keep_four_nvme_vfs_across_parallel_pauses_numvfs_4_0_6_and_unpauses_onto_new_vfs() {
    let pf = NvmePf::new();
    let (vfs, _) = pf.set(4);
    // Guest A ignores paused accesses (all-ones), guest B's accesses wait for the unpause.
    let mut a = Vmm::spawn(
        "vmm-a",
        &[("vf0", &vfs[0], "ignore"), ("vf1", &vfs[1], "ignore")],
        EVERY,
    );
    let mut b = Vmm::spawn(
        "vmm-b",
        &[("vf2", &vfs[2], "stall"), ("vf3", &vfs[3], "stall")],
        EVERY,
    );
    let guests = [(&a, ["vf0", "vf1"]), (&b, ["vf2", "vf3"])];
    let mut before = Vec::new();
    for (vmm, ids) in guests {
        for dev in DEVS {
            assert!(
                vmm.out()
                    .contains(&format!("svff-guest: found {dev} vendor=1b36")),
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
            fire(vmm, &mut qmp, id, dev, 1);
        }
        for dev in DEVS {
            let c = vmm.last(dev).unwrap();
            assert!(c.ok > 0 && c.ones == 0, "{}: {c:?}", vmm.name);
            assert!(c.id != 0 && c.id != u32::MAX, "CAP of an online VF: {c:?}");
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
    let (new_vfs, steps) = pf.set(6);
    println!("sriov_numvfs 4 -> 0 -> 6 + nvme resources + bind: {steps:?}");
    // Each onto another new VF than it had: vf0 -> VF 5, vf1 -> 4, vf2 -> 3, vf3 -> 2.
    let unpauses = in_parallel(
        "svff-vfio-unpause",
        &[
            (&a, json!({"id": "vf0", "host": new_vfs[5]})),
            (&a, json!({"id": "vf1", "host": new_vfs[4]})),
            (&b, json!({"id": "vf2", "host": new_vfs[3]})),
            (&b, json!({"id": "vf3", "host": new_vfs[2]})),
        ],
    );
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
        for (id, dev) in ids.iter().zip(DEVS) {
            fire(vmm, &mut qmp, id, dev, 2);
        }
        // Two reports after the unpause, so every read of the pause window is counted.
        vmm.reports(2, EVERY.into());
    }
    let after: Vec<GuestCounters> = guests
        .iter()
        .flat_map(|(vmm, _)| DEVS.map(|d| vmm.last(d).unwrap()))
        .collect();
    let khz = a.qmp().execute("x-svff-query-tsc", None).unwrap()["tsc-khz"].clone();
    let (sa, sb) = (a.quit(), b.quit());
    let (out_a, out_b) = (a.out(), b.out());
    drop((a, b));
    drop(pf);
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
        assert_eq!(af.id, b4.id, "the same live CAP on the new VF: {af:?}");
        assert_eq!(af.irqs, 2, "one interrupt before, one after: {af:?}");
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

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn two_vmms_see_device_del_and_device_add_across_numvfs_4_0_6_as_removal_and_addition() {
    let pf = NvmePf::new();
    let (vfs, _) = pf.set(4);
    let mut a = Vmm::spawn(
        "vmm-a",
        &[("vf0", &vfs[0], "ignore"), ("vf1", &vfs[1], "ignore")],
        EVERY,
    );
    let mut b = Vmm::spawn(
        "vmm-b",
        &[("vf2", &vfs[2], "stall"), ("vf3", &vfs[3], "stall")],
        EVERY,
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
    let (new_vfs, _) = pf.set(6);
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
    drop(pf);
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
        assert_eq!(af.id, b4.id, "live CAP on the added VF: {af:?}");
    }
}

fn stats(v: &[f64]) -> String {
    let n = v.len() as f64;
    let avg = v.iter().sum::<f64>() / n;
    let sd = (v.iter().map(|x| (x - avg).powi(2)).sum::<f64>() / n).sqrt();
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(0.0, f64::max);
    format!("{avg:8.1} (sd {sd:6.1}, {min:8.1}..{max:8.1})")
}

/// Per phase name, the slowest VF's time (ms) in the replies `rs`.
fn phases(rs: &[Value]) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for r in rs {
        for p in r["phases"].as_array().unwrap() {
            let (name, ms) = (
                p["name"].as_str().unwrap().to_string(),
                p["ns"].as_u64().unwrap() as f64 / 1e6,
            );
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, m)) => *m = m.max(ms),
                None => out.push((name, ms)),
            }
        }
    }
    out
}

/// Lab benchmark (prints, asserts nothing on time): one svff-vmm with N nvme VFs (policy
/// `ignore`) and the test guest; all N paused in parallel over QMP, `sriov_numvfs` N -> 0 -> N
/// with nvme resources and vfio-pci binding, all unpaused in parallel. Per run: the guest-
/// observed pause window (first all-ones read to the next valid read, per VF, from the test
/// guest's TSC), host wall times of pause / count change / unpause, and vfio-pause's phases
/// (slowest VF). `SVFF_VMM_BENCH_RUNS` runs per N (default 3), each in a fresh VMM;
/// `SVFF_VMM_BENCH_VFS` the counts (default `1,4,10`).
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_bench_guest_observed_pause_window_and_phases_for_1_4_10_vfs() {
    let runs: usize = std::env::var("SVFF_VMM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let pf = NvmePf::new();
    let mut table = Vec::new();
    let sizes: Vec<u16> = std::env::var("SVFF_VMM_BENCH_VFS")
        .unwrap_or_else(|_| "1,4,10".into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("SVFF_VMM_BENCH_VFS: VF counts, e.g. 1,4,10")
        })
        .collect();
    for n in sizes {
        let (mut win_max, mut win_min, mut pause, mut count, mut unpause) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut pause_ph, mut unpause_ph, mut count_steps): (
            Vec<(String, Vec<f64>)>,
            Vec<(String, Vec<f64>)>,
            Vec<(String, Vec<f64>)>,
        ) = (vec![], vec![], vec![]);
        let add = |acc: &mut Vec<(String, Vec<f64>)>, ph: Vec<(String, f64)>| {
            for (name, ms) in ph {
                match acc.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, v)) => v.push(ms),
                    None => acc.push((name, vec![ms])),
                }
            }
        };
        for _ in 0..runs {
            let (vfs, _) = pf.set(n);
            let ids: Vec<String> = (0..n).map(|i| format!("vf{i}")).collect();
            let devs: Vec<(&str, &str, &str)> = ids
                .iter()
                .zip(&vfs)
                .map(|(id, vf)| (id.as_str(), vf.as_str(), "ignore"))
                .collect();
            let mut vmm = Vmm::spawn("bench", &devs, 5);
            let guest_devs: Vec<String> = (1..=n).map(|d| format!("00:{d:02x}.0")).collect();
            for dev in &guest_devs {
                vmm.wait("first reports", &|| vmm.last(dev).is_some());
            }
            let khz = vmm.qmp().execute("x-svff-query-tsc", None).unwrap()["tsc-khz"]
                .as_u64()
                .unwrap();
            assert!(khz > 0, "KVM tells the guest's TSC rate");
            let before: Vec<u64> = guest_devs
                .iter()
                .map(|d| vmm.last(d).unwrap().win_ktsc)
                .collect();
            let calls: Vec<(&Vmm, Value)> =
                ids.iter().map(|id| (&vmm, json!({"id": id}))).collect();
            let t0 = Instant::now();
            let p = in_parallel("svff-vfio-pause", &calls);
            let t1 = Instant::now();
            let off = pf
                .mgr
                .set_vf_count(pf.addr(), 0, &VfsSetOptions::default())
                .unwrap();
            let (new_vfs, on) = pf.set(n);
            let t2 = Instant::now();
            add(
                &mut count_steps,
                off.steps
                    .into_iter()
                    .map(|s| (s.name, s.ms))
                    .chain(on)
                    .filter(|(name, _)| name != "pf_driver")
                    .collect(),
            );
            let calls: Vec<(&Vmm, Value)> = ids
                .iter()
                .zip(&new_vfs)
                .map(|(id, vf)| (&vmm, json!({"id": id, "host": vf})))
                .collect();
            let u = in_parallel("svff-vfio-unpause", &calls);
            let t3 = Instant::now();
            vmm.reports(2, 5);
            let info = vmm.qmp().execute("query-svff-vfio", None).unwrap();
            let wins: Vec<f64> = guest_devs
                .iter()
                .zip(&before)
                .zip(info.as_array().unwrap())
                .map(|((d, b), i)| {
                    let c = vmm.last(d).unwrap();
                    assert_eq!(c.gone, 0, "{c:?}");
                    // Checked, not timed: every all-ones read was one vfio-pause ignored.
                    assert_eq!(
                        Some(c.ones),
                        i["paused-accesses"]["bar-reads"].as_u64(),
                        "{d}: {c:?} {i}"
                    );
                    if c.ones == 0 {
                        println!("{d}: no guest read in the pause window: {c:?}");
                    } else if c.win_ktsc <= *b {
                        println!("{d}: a read before the pause was slower than the window");
                    }
                    c.win_ktsc as f64 * 1024.0 / khz as f64
                })
                .collect();
            assert!(vmm.quit().success());
            drop(vmm);
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            win_max.push(wins.iter().cloned().fold(0.0, f64::max));
            win_min.push(wins.iter().cloned().fold(f64::INFINITY, f64::min));
            pause.push(ms(t0, t1));
            count.push(ms(t1, t2));
            unpause.push(ms(t2, t3));
            add(&mut pause_ph, phases(&p));
            add(&mut unpause_ph, phases(&u));
            pf.mgr
                .set_vf_count(pf.addr(), 0, &VfsSetOptions::default())
                .unwrap();
        }
        let mut lines = vec![
            format!("BENCH svff-vmm, {n} nvme VFs, {runs} runs (ms: avg (sd, min..max))"),
            format!("  guest window, longest VF   {}", stats(&win_max)),
            format!("  guest window, shortest VF  {}", stats(&win_min)),
            format!("  pause, parallel (QMP)      {}", stats(&pause)),
            format!("  numvfs {n:>2}->0->{n:<2} + res + bind {}", stats(&count)),
            format!("  unpause, parallel (QMP)    {}", stats(&unpause)),
        ];
        for (name, v) in &pause_ph {
            lines.push(format!("    pause   phase {name:<16} {}", stats(v)));
        }
        for (name, v) in &count_steps {
            lines.push(format!("    count   step  {name:<16} {}", stats(v)));
        }
        for (name, v) in &unpause_ph {
            lines.push(format!("    unpause phase {name:<16} {}", stats(v)));
        }
        let text = lines.join("\n");
        println!("{text}");
        table.push(text);
    }
    drop(pf);
    println!("\n{}", table.join("\n"));
}
