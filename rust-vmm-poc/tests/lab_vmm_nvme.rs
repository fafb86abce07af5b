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

mod common;

use std::time::Instant;

use common::{in_parallel, Kind, Vmm};
use serde_json::{json, Value};
use svff_lab::guest;
use svff_pf_helper::{
    DriverName, NvmeResources, PciAddress, RealSysfs, SriovManager, VfsSetOptions,
};
use svff_vmm::GuestCounters;

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

impl common::Pf for NvmePf {
    fn vfs(&self, n: u16) -> Vec<String> {
        self.set(n).0
    }
}

/// Online nvme VFs: CAP (MQES) at BAR0+0 (neither 0 nor all-ones), VS 1.4 at BAR0+8.
const NVME: Kind = Kind {
    vendor: "1b36",
    self_irqs: false,
    live: |c: &GuestCounters, _| c.id != 0 && c.id != u32::MAX && c.st == 0x0001_0400,
};

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn two_vmms_keep_four_nvme_vfs_across_parallel_pauses_numvfs_4_0_6_and_unpauses_onto_new_vfs() {
    let pf = NvmePf::new();
    common::pause_across_numvfs_4_0_6(&pf, &NVME);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn two_vmms_see_device_del_and_device_add_across_numvfs_4_0_6_as_removal_and_addition() {
    let pf = NvmePf::new();
    common::del_add_across_numvfs_4_0_6(&pf, &NVME);
}

fn stats(v: &[f64]) -> String {
    let n = v.len() as f64;
    let avg = v.iter().sum::<f64>() / n;
    let sd = (v.iter().map(|x| (x - avg).powi(2)).sum::<f64>() / n).sqrt();
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(0.0, f64::max);
    format!("{avg:8.1} (sd {sd:6.1}, {min:8.1}..{max:8.1})")
}

/// Per phase or step name, its times (ms) over the runs.
type Samples = Vec<(String, Vec<f64>)>;

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
/// (slowest VF). `SVFF_VMM_BENCH_RUNS` runs per N (default 1, so `make test` stays short),
/// each in a fresh VMM;
/// `SVFF_VMM_BENCH_VFS` the counts (default `1,4,10`).
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_bench_guest_observed_pause_window_and_phases_for_1_4_10_vfs() {
    let runs: usize = std::env::var("SVFF_VMM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
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
        let (mut pause_ph, mut unpause_ph, mut count_steps): (Samples, Samples, Samples) =
            (vec![], vec![], vec![]);
        let add = |acc: &mut Samples, ph: Vec<(String, f64)>| {
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
            let mut vmm = Vmm::spawn("bench", &devs, 5, "read");
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
