//! Lab test of pool mode (`pool = true`, nvme profile) through the real
//! `svff` CLI on the real kernel in L1: a pool of 12 nvme VFs held by four
//! svff-vmm test guests (3 VFs each); pool-mode reconfs of 1, 4 and 10 VFs
//! change only the named VFs' NVMe resources, pause only them, and never
//! write `sriov_numvfs`; requests beyond the controller's limits are refused;
//! a helper killed after each journal record of a pool reconf is recovered.
//! What a guest saw comes from its serial console's counter lines; what the
//! VMM did from `query-svff-vfio` (`pause_count`). The test leaves the PF
//! with 0 VFs, unbound, and no VMM running.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use svff_lab::guest::{self, dev_path, set_numvfs, unbind, vfs_of};

const SVFF: &str = env!("CARGO_BIN_EXE_svff");
const CALL_TIMEOUT_S: &str = "300";
const REPORT_EVERY: u64 = 20;
const GUEST_WAIT: Duration = Duration::from_secs(180);
const POOL: usize = 12;
const VMS: [&str; 4] = ["vm1", "vm2", "vm3", "vm4"];

use svff_types::{parse_counters, GuestCounters as Counters};

struct Serial(PathBuf);

impl Serial {
    fn text(&self) -> String {
        let t = fs::read_to_string(&self.0).unwrap_or_default();
        t[..t.rfind('\n').map_or(0, |i| i + 1)].to_string()
    }

    fn last(&self, dev: &str) -> Option<Counters> {
        self.text()
            .lines()
            .rev()
            .filter_map(parse_counters)
            .find(|c| c.dev == dev)
    }

    fn events(&self, event: &str) -> usize {
        self.text()
            .lines()
            .filter(|l| l.contains(&format!(" event={event}")))
            .count()
    }

    /// The first report of `dev` whose round is past `round` (bounded wait).
    fn report_after(&self, dev: &str, round: u64) -> Counters {
        let end = Instant::now() + GUEST_WAIT;
        loop {
            if let Some(c) = self.last(dev).filter(|c| c.round > round) {
                return c;
            }
            assert!(
                Instant::now() < end,
                "no report of {dev} after round {round} in {}",
                self.0.display()
            );
            // The guest gives no other sign than its next line.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn pid_of(state: &Path, vm: &str) -> Option<u32> {
    fs::read_to_string(state.join(format!("vm-{vm}.pid")))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

struct Setup {
    pf: String,
    dir: tempfile::TempDir,
    config: String,
}

impl Setup {
    fn new() -> Setup {
        guest::require_lab();
        let pf = guest::nvme_pf();
        if guest::driver_of(&pf).is_some() {
            set_numvfs(&pf, 0);
        }
        for vf in vfs_of(&pf) {
            unbind(&vf);
        }
        unbind(&pf);
        guest::modprobe("vfio-pci");
        guest::modprobe("kvm-amd");
        guest::modprobe("nvme");
        let vmm = Path::new(SVFF).with_file_name("svff-vmm");
        assert!(
            vmm.exists(),
            "{} missing: cargo build --workspace",
            vmm.display()
        );
        let dir = tempfile::tempdir().unwrap();
        // Both binaries copied into L1's RAM once (from the 9p host root,
        // every call would page the debug binary in again).
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        fs::copy(SVFF, bin.join("svff")).unwrap();
        fs::copy(&vmm, bin.join("svff-vmm")).unwrap();
        let vmm = bin.join("svff-vmm");
        let config = dir.path().join("helper.toml");
        // The test guests read in a busy loop: niced, so that L1 still runs svff.
        let command = format!(
            r#"["/usr/bin/nice", "-n", "19", "{}", "--memory", "32M", "--test-devices", "0", "--guest-report-every", "{REPORT_EVERY}"]"#,
            vmm.display()
        );
        let mut text = format!(
            "allowed_uids = [0]\nstate_dir = \"{}\"\n[[pf]]\nbdf = \"{pf}\"\nprofile = \"nvme\"\nvfs = {POOL}\npool = true\nnvme = {{ vq = 2, vi = 1 }}\n",
            dir.path().join("state").display()
        );
        for (i, vm) in VMS.iter().enumerate() {
            let idx: Vec<String> = (i * 3..i * 3 + 3).map(|v| v.to_string()).collect();
            text.push_str(&format!(
                "[[vm]]\nname = \"{vm}\"\nkind = \"svff-vmm\"\nqmp = \"{}/{vm}.qmp\"\nqmp_timeout_s = 30\ncommand = {command}\nvfs = [{{ pf = \"{pf}\", index = [{}] }}]\n",
                dir.path().display(),
                idx.join(", ")
            ));
        }
        fs::write(&config, text).unwrap();
        Setup {
            pf,
            config: config.display().to_string(),
            dir,
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn serial(&self, vm: &str) -> Serial {
        Serial(self.state().join(format!("vm-{vm}.serial")))
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new("timeout");
        cmd.arg(CALL_TIMEOUT_S)
            .arg(self.dir.path().join("bin/svff"))
            .args(["--direct", "--config", &self.config])
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run timeout(1)");
        eprintln!(
            "$ svff {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn ok_json(&self, args: &[&str]) -> Value {
        let out = self.run(args, &[]);
        assert!(
            out.status.success(),
            "svff {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("svff printed JSON")
    }

    fn refused(&self, args: &[&str], want: &str) {
        let out = self.run(args, &[]);
        assert!(!out.status.success(), "svff {args:?} was not refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "svff {args:?}: {err}");
    }

    /// `vf index -> (online, vq, vi)` as `svff status` reads the controller.
    fn resources(&self) -> BTreeMap<u64, (bool, u64, u64)> {
        let s = self.ok_json(&["status", "--json", "--pf", &self.pf]);
        s["pfs"][0]["vfs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                let n = &v["nvme"];
                (
                    v["index"].as_u64().unwrap(),
                    (
                        n["online"].as_bool().unwrap(),
                        n["vq"].as_u64().unwrap(),
                        n["vi"].as_u64().unwrap(),
                    ),
                )
            })
            .collect()
    }

    /// `vm -> [(vf, guest dev "00:DD.F")]` from the table.
    fn devs(&self) -> BTreeMap<String, Vec<(u64, String)>> {
        let s = self.ok_json(&["status", "--json", "--pf", &self.pf]);
        let mut m: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
        for a in s["assignments"].as_array().unwrap() {
            assert_eq!(a["state"], "attached", "{a}");
            m.entry(a["vm"].as_str().unwrap().to_owned())
                .or_default()
                .push((
                    a["vf"].as_u64().unwrap(),
                    a["guest"]
                        .as_str()
                        .expect("guest address")
                        .trim_start_matches("0000:")
                        .to_owned(),
                ));
        }
        m
    }

    /// `id -> (state, pause_count)` of every VMM's devices.
    fn vmm_devices(&self) -> BTreeMap<String, (String, u64)> {
        let mut m = BTreeMap::new();
        for vm in VMS {
            let sock = self.dir.path().join(format!("{vm}.qmp"));
            let mut c = qmp_ext::Client::connect(&sock, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("QMP of {vm}: {e}"));
            for d in c
                .execute("query-svff-vfio", None)
                .unwrap()
                .as_array()
                .unwrap()
            {
                m.insert(
                    d["id"].as_str().unwrap().to_owned(),
                    (
                        d["state"].as_str().unwrap().to_owned(),
                        d["pause-count"].as_u64().unwrap(),
                    ),
                );
            }
        }
        m
    }

    /// What proves `sriov_numvfs` was not written: the VF count, the VFs'
    /// addresses and their IOMMU group numbers (a re-created VF gets a new group).
    fn vf_identity(&self) -> (String, Vec<(String, String)>) {
        let numvfs = guest::read_attr(dev_path(&self.pf).join("sriov_numvfs"));
        let vfs = vfs_of(&self.pf)
            .into_iter()
            .map(|vf| {
                let g = fs::read_link(dev_path(&vf).join("iommu_group")).unwrap();
                (vf, g.file_name().unwrap().to_string_lossy().into_owned())
            })
            .collect();
        (numvfs, vfs)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for vm in VMS {
            if let Some(pid) = pid_of(&self.state(), vm) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                let end = Instant::now() + Duration::from_secs(30);
                while Path::new(&format!("/proc/{pid}/stat")).exists()
                    && fs::read_to_string(format!("/proc/{pid}/stat"))
                        .map(|s| !s.contains(") Z "))
                        .unwrap_or(false)
                    && Instant::now() < end
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        if guest::driver_of(&self.pf).is_some() {
            set_numvfs(&self.pf, 0);
        }
        unbind(&self.pf);
    }
}

fn device_id(pf: &str, vf: u64) -> String {
    format!("svff-{}-vf{vf}", pf.replace(':', "-"))
}

/// Sums the `ms` of the steps named `name`, and the largest one.
fn step_ms(r: &Value, name: &str) -> (f64, f64) {
    let v: Vec<f64> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == name)
        .map(|s| s["ms"].as_f64().unwrap())
        .collect();
    (v.iter().sum(), v.iter().copied().fold(0.0, f64::max))
}

fn spec(vfs: impl Iterator<Item = u64>, vq: u64, vi: u64) -> String {
    vfs.map(|i| format!("{i}=vq:{vq},vi:{vi}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_pool_reconf_pauses_only_named_vfs_never_writes_numvfs_refuses_beyond_totals_and_recovers_crashes(
) {
    let s = Setup::new();
    let pf = s.pf.clone();
    let r = s.ok_json(&["init", "--json"]);
    assert!(r["failures"].as_array().unwrap().is_empty(), "{r}");
    let devs = s.devs();
    let vm_of: BTreeMap<u64, (String, String)> = devs
        .iter()
        .flat_map(|(vm, l)| l.iter().map(move |(vf, d)| (*vf, (vm.clone(), d.clone()))))
        .collect();
    assert_eq!(vm_of.len(), POOL, "{devs:?}");
    // The CAP each guest reads first, per VF.
    let mut first_id = BTreeMap::new();
    for (vf, (vm, dev)) in &vm_of {
        let c = s.serial(vm).report_after(dev, 0);
        assert!(c.id != 0 && c.id != u32::MAX, "VF {vf} {vm} {dev}: {c:?}");
        first_id.insert(*vf, c.id);
    }
    let identity = s.vf_identity();
    assert_eq!(identity.0, POOL.to_string());
    let mut res = s.resources();
    assert!(res.values().all(|r| *r == (true, 2, 1)), "{res:?}");

    // Pool reconfs of 1, 4 and 10 VFs.
    let mut timings = Vec::new();
    for (n, vq, vi) in [(1u64, 4u64, 1u64), (4, 3, 1), (10, 4, 1)] {
        let named: Vec<u64> = (0..n).collect();
        let before_pauses = s.vmm_devices();
        let before_counts: BTreeMap<u64, Counters> = vm_of
            .iter()
            .map(|(vf, (vm, dev))| (*vf, s.serial(vm).last(dev).unwrap()))
            .collect();
        let text = spec(named.iter().copied(), vq, vi);
        let r = s.ok_json(&["reconf", "--pf", &pf, "--resources", &text, "--json"]);
        assert!(r["failures"].as_array().unwrap().is_empty(), "{r}");
        let names: Vec<&str> = r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"pause") && names.contains(&"resources") && names.contains(&"unpause"),
            "{names:?}"
        );
        assert!(!names.contains(&"change_numvfs"), "{names:?}");
        let wall: f64 = r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["ms"].as_f64().unwrap())
            .sum();
        let (pause_sum, pause_max) = step_ms(&r, "pause");
        let (res_ms, _) = step_ms(&r, "resources");
        let (unpause_sum, unpause_max) = step_ms(&r, "unpause");
        let (table_ms, _) = step_ms(&r, "table");
        timings.push(format!(
            "pool reconf of {n} VFs: pause max {pause_max:.0} ms (sum over VMs {pause_sum:.0}), resources {res_ms:.0} ms, unpause max {unpause_max:.0} ms (sum {unpause_sum:.0}), table {table_ms:.0} ms; critical path {:.0} ms (step sum {wall:.0})",
            pause_max + res_ms + unpause_max + table_ms
        ));
        println!("{}", timings.last().unwrap());
        // Only the named VFs were paused, each once.
        let after_pauses = s.vmm_devices();
        for (vf, (vm, _)) in &vm_of {
            let id = device_id(&pf, *vf);
            let (st, count) = &after_pauses[&id];
            assert_eq!(st, "attached", "n={n}: {vm} {id}");
            let was = before_pauses[&id].1;
            let want = if named.contains(vf) { was + 1 } else { was };
            assert_eq!(*count, want, "n={n}: pause_count of {vm} {id}");
        }
        // sriov_numvfs never written.
        assert_eq!(s.vf_identity(), identity, "n={n}: VFs re-created");
        let journal = fs::read_to_string(s.state().join("journal.jsonl")).unwrap();
        assert!(
            journal.contains("\"pool_plan\"") && !journal.contains("set_count"),
            "{journal}"
        );
        // New resources on the named VFs, the others as they were.
        let now = s.resources();
        for (vf, r) in &now {
            let want = if named.contains(vf) {
                (true, vq, vi)
            } else {
                res[vf]
            };
            assert_eq!(*r, want, "n={n}: VF {vf}");
        }
        res = now;
        // Every guest reads valid registers afterwards; the untouched ones
        // never read all-ones; nobody saw its device go.
        for (vf, (vm, dev)) in &vm_of {
            let serial = s.serial(vm);
            let now = serial.last(dev).unwrap().round;
            let a = serial.report_after(dev, now);
            let b = serial.report_after(dev, a.round + REPORT_EVERY);
            assert!(b.ok > a.ok, "n={n}: VF {vf} {vm} {dev}: {a:?} -> {b:?}");
            assert_eq!(b.id, first_id[vf], "n={n}: VF {vf} {vm} {dev}: {b:?}");
            assert_eq!(b.gone, 0, "n={n}: VF {vf} {vm} {dev}: {b:?}");
            if !named.contains(vf) {
                assert_eq!(
                    b.ones, before_counts[vf].ones,
                    "n={n}: untouched VF {vf} {vm} {dev} read all-ones"
                );
            }
        }
        for vm in VMS {
            assert_eq!(s.serial(vm).events("gone"), 0, "n={n}: {vm}");
        }
    }

    // Refusals, before anything changes.
    let pauses = s.vmm_devices();
    s.refused(
        &[
            "reconf",
            "--pf",
            &pf,
            "--resources",
            &spec(0..POOL as u64, 16, 1),
        ],
        "flexible VQ resources are free",
    );
    s.refused(
        &[
            "reconf",
            "--pf",
            &pf,
            "--resources",
            &spec(0..POOL as u64, 2, 8),
        ],
        "flexible VI resources are free",
    );
    s.refused(
        &["reconf", "--pf", &pf, "--resources", "12=vq:2,vi:1"],
        &format!("VF 12 given resources, but the PF has {POOL} VFs"),
    );
    s.refused(
        &["reconf", "--pf", &pf, "--resources", "0=vq:17,vi:1"],
        "at most 16 per secondary controller",
    );
    s.refused(&["reconf", "--pf", &pf, "--vfs", "4"], "is in pool mode");
    // The VI count is the VF's MSI-X table size: not while a VM holds it.
    s.refused(
        &["reconf", "--pf", &pf, "--resources", "0=vq:4,vi:2"],
        "changes its MSI-X table size",
    );
    assert_eq!(s.resources(), res, "a refusal changed resources");
    assert_eq!(s.vmm_devices(), pauses, "a refusal paused something");
    assert_eq!(s.vf_identity(), identity);

    // A helper killed after each record of a pool reconf of VF 0 (vm1) and
    // VF 3 (vm2): begin, pool_plan, pause x2, resources, unpause x2, table.
    for seq in 0..=7u32 {
        let cur = res[&0];
        let (vq, vi) = if cur.1 == 4 { (2, 1) } else { (4, 1) };
        let text = format!("0=vq:{vq},vi:{vi},3=vq:{vq},vi:{vi}");
        let out = s.run(
            &["reconf", "--pf", &pf, "--resources", &text, "--json"],
            &[("SVFF_TEST_CRASH_AFTER_RECORD", &seq.to_string())],
        );
        assert_eq!(
            out.status.signal(),
            Some(9),
            "seq {seq}: not killed: {out:?}"
        );
        s.refused(
            &["reconf", "--pf", &pf, "--resources", &text],
            "svff recover",
        );
        let r = s.ok_json(&["recover", "--json"]);
        assert!(
            r["failures"].as_array().unwrap().is_empty(),
            "seq {seq}: {r}"
        );
        let again = s.ok_json(&["recover", "--json"]);
        assert_eq!(again["changed"], false, "seq {seq}: {again}");
        for (id, (st, _)) in s.vmm_devices() {
            assert_eq!(st, "attached", "seq {seq}: {id}");
        }
        let now = s.resources();
        // Killed after begin alone: nothing planned, nothing changed.
        let want = if seq == 0 { cur } else { (true, vq, vi) };
        assert_eq!(now[&0], want, "seq {seq}");
        assert_eq!(now[&3], want, "seq {seq}");
        for vf in [1u64, 2, 4, 5, 6, 7, 8, 9, 10, 11] {
            assert_eq!(now[&vf], res[&vf], "seq {seq}: VF {vf}");
        }
        res = now;
        assert_eq!(s.vf_identity(), identity, "seq {seq}");
        let devs_now = s.devs();
        assert_eq!(devs_now, devs, "seq {seq}: the table");
        for vf in [0u64, 3] {
            let (vm, dev) = &vm_of[&vf];
            let serial = s.serial(vm);
            let now = serial.last(dev).unwrap().round;
            let a = serial.report_after(dev, now);
            let b = serial.report_after(dev, a.round + REPORT_EVERY);
            assert!(
                b.ok > a.ok && b.id == first_id[&vf] && b.gone == 0,
                "seq {seq}: VF {vf}: {a:?} -> {b:?}"
            );
        }
    }
    for vm in VMS {
        assert_eq!(s.serial(vm).events("gone"), 0, "{vm}");
    }
    for t in timings {
        println!("{t}");
    }
}
