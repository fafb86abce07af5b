//! Lab tests of the orchestration in pause mode with VMs of kind `svff-vmm`
//! (svff starts and supervises the VMM), through the real `svff` CLI as a
//! user runs it, on the real kernel in L1. The nvme PF with the `nvme`
//! profile gives VFs with live registers (BAR0+0 is CAP); each VM runs
//! svff-vmm's built-in test guest, which reads every VF's BAR0 in a loop and
//! prints counter lines on its serial console (`<state>/vm-<name>.serial`):
//! every assertion about what a guest saw comes from those lines. vm2 runs
//! unprivileged (uid 4242, no access to `/dev/vfio/<group>`): svff passes
//! its group fds. Each test leaves the PF with 0 VFs, unbound, and no VMM
//! running.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{pid_of, reports_past, signal, wait_proc_state, Serial};
use serde_json::Value;
use svff_lab::guest::{self, dev_path, set_numvfs, unbind, vfs_of};

/// Rounds between two counter reports of the test guests.
const REPORT_EVERY: u64 = 20;
/// The unprivileged VMM's uid and gid.
const UNPRIV: u32 = 4242;

/// `/dev/kvm` given to group `UNPRIV` (mode 0660) until dropped.
struct KvmForGroup(u32, u32, u32);

impl KvmForGroup {
    fn new() -> Self {
        let m = fs::metadata("/dev/kvm").expect("/dev/kvm (kvm-amd loaded)");
        let old = KvmForGroup(m.mode() & 0o7777, m.uid(), m.gid());
        std::os::unix::fs::chown("/dev/kvm", None, Some(UNPRIV)).unwrap();
        fs::set_permissions("/dev/kvm", fs::Permissions::from_mode(0o660)).unwrap();
        old
    }
}

impl Drop for KvmForGroup {
    fn drop(&mut self) {
        let _ = std::os::unix::fs::chown("/dev/kvm", Some(self.1), Some(self.2));
        let _ = fs::set_permissions("/dev/kvm", fs::Permissions::from_mode(self.0));
    }
}

/// One L1 setup: the nvme PF released, a config with vm1 (root) and vm2
/// (uid 4242), both svff-vmm test guests, two VFs each at init.
struct Setup {
    pf: String,
    dir: tempfile::TempDir,
    config: String,
    /// vm1's and vm2's consoles, read incrementally.
    serials: BTreeMap<&'static str, Serial>,
    _kvm: KvmForGroup,
}

impl Setup {
    fn new() -> Setup {
        let pf = common::released_nvme_pf(&["vfio-pci", "kvm-amd", "nvme"]);
        let dir = tempfile::tempdir().unwrap();
        // uid 4242 must reach its socket directory (svff creates it).
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
        let config = dir.path().join("helper.toml");
        let state = dir.path().join("state");
        // The test guests read in a busy loop: at the lowest priority, so that L1's one
        // vCPU still runs svff (the guests only need to keep reading).
        let command = common::test_guest_command(REPORT_EVERY);
        let text = format!(
            r#"allowed_uids = [0]
state_dir = "{state}"
[[pf]]
bdf = "{pf}"
profile = "nvme"
vfs = 4
nvme = {{ vq = 2, vi = 1 }}
[[vm]]
name = "vm1"
kind = "svff-vmm"
qmp = "{dir}/vm1.qmp"
qmp_timeout_s = 30
command = {command}
vfs = [{{ pf = "{pf}", count = 2 }}]
[[vm]]
name = "vm2"
kind = "svff-vmm"
qmp = "{dir}/vm2/qmp.sock"
qmp_timeout_s = 15
command = {command}
run_as = {{ uid = {UNPRIV}, gid = {UNPRIV} }}
vfs = [{{ pf = "{pf}", count = 2 }}]
"#,
            state = state.display(),
            dir = dir.path().display(),
        );
        fs::write(&config, text).unwrap();
        let serials = ["vm1", "vm2"]
            .into_iter()
            .map(|vm| (vm, Serial::new(state.join(format!("vm-{vm}.serial")))))
            .collect();
        Setup {
            pf,
            config: config.display().to_string(),
            dir,
            serials,
            _kvm: KvmForGroup::new(),
        }
    }

    fn svff(&self) -> &'static Path {
        common::svff_in_ram()
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn serial(&self, vm: &str) -> &Serial {
        &self.serials[vm]
    }

    fn pid(&self, vm: &str) -> u32 {
        pid_of(&self.state(), vm).unwrap_or_else(|| panic!("no pid file of {vm}"))
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut v = vec!["--direct", "--config", &self.config];
        v.extend_from_slice(args);
        common::svff_env(self.svff(), &v, env)
    }

    fn ok_json(&self, args: &[&str]) -> Value {
        common::json_of(args, &self.run(args, &[]))
    }

    fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Child {
        let mut cmd = Command::new(self.svff());
        cmd.args(["--direct", "--config", &self.config])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().unwrap()
    }

    fn reconf(&self, vfs: u16, mode: &str, assign: Option<&str>) -> Value {
        let n = vfs.to_string();
        let mut args = vec![
            "reconf", "--pf", &self.pf, "--vfs", &n, "--mode", mode, "--json",
        ];
        if let Some(a) = assign {
            args.extend(["--assign", a]);
        }
        let r = self.ok_json(&args);
        print_steps(&r);
        r
    }

    /// The assignment table (`<state>/assignments.json`, what `svff status`
    /// shows): `vm -> entries`, each with the state its VMM reports.
    fn table(&self) -> BTreeMap<String, Vec<Entry>> {
        let text = fs::read_to_string(self.state().join("assignments.json")).unwrap();
        let t: Value = serde_json::from_str(&text).unwrap();
        let mut m: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
        let mut held: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for a in t["assignments"].as_array().cloned().unwrap_or_default() {
            if a["pf"] != self.pf.as_str() {
                continue;
            }
            let vm = a["vm"].as_str().unwrap().to_owned();
            let state = a["state"].as_str().unwrap().to_owned();
            let id = a["id"].as_str().unwrap().to_owned();
            let vmm_state = if state == "gone" {
                None
            } else {
                held.entry(vm.clone())
                    .or_insert_with(|| self.vmm_devices(&vm))
                    .iter()
                    .find(|d| d["id"] == id.as_str())
                    .and_then(|d| d["state"].as_str().map(str::to_owned))
            };
            m.entry(vm).or_default().push(Entry {
                vf: a["vf"].as_u64().unwrap(),
                dev: a["guest"]
                    .as_str()
                    .map(|g| g.trim_start_matches("0000:").to_owned()),
                host: a["host"].as_str().unwrap().to_owned(),
                state,
                vmm_state,
            });
        }
        for v in m.values_mut() {
            v.sort_by_key(|e| e.vf);
        }
        m
    }

    /// The VMM's own view (`query-svff-vfio`) over a fresh QMP connection.
    fn vmm_devices(&self, vm: &str) -> Vec<Value> {
        let sock = if vm == "vm1" {
            self.dir.path().join("vm1.qmp")
        } else {
            self.dir.path().join("vm2/qmp.sock")
        };
        let mut c = qmp_ext::Client::connect(&sock, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("QMP of {vm}: {e}"));
        c.execute("query-svff-vfio", None)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap()
    }

    /// Checks the PF has `n` VFs on vfio-pci, the table names them as the
    /// VMMs hold them, attached (nobody paused), with the VMMs' views agreeing.
    fn assert_consistent(&self, n: usize, want: &[(&str, &[u64])], what: &str) {
        let numvfs: usize = guest::read_attr(dev_path(&self.pf).join("sriov_numvfs"))
            .parse()
            .unwrap();
        assert_eq!(numvfs, n, "{what}: sriov_numvfs");
        let vfs = vfs_of(&self.pf);
        for vf in &vfs {
            assert_eq!(
                guest::driver_of(vf).as_deref(),
                Some("vfio-pci"),
                "{what}: {vf}"
            );
        }
        let table = self.table();
        for (vm, idx) in want {
            let mine = table.get(*vm).cloned().unwrap_or_default();
            let got: Vec<u64> = mine.iter().map(|e| e.vf).collect();
            assert_eq!(&got, idx, "{what}: table of {vm}: {mine:?}");
            for e in &mine {
                assert_eq!(e.state, "attached", "{what}: {vm} {e:?}");
                assert_eq!(
                    e.vmm_state.as_deref(),
                    Some("attached"),
                    "{what}: {vm} {e:?}"
                );
                assert_eq!(e.host, vfs[e.vf as usize], "{what}: {vm} {e:?}");
            }
            let held = self.vmm_devices(vm);
            assert_eq!(held.len(), idx.len(), "{what}: {vm} holds {held:?}");
            for d in &held {
                assert_eq!(d["state"], "attached", "{what}: {vm} {d}");
            }
        }
    }

    /// Every VMM's devices attached (nobody paused), as the VMMs say.
    fn nobody_paused(&self, what: &str) {
        for vm in ["vm1", "vm2"] {
            for d in self.vmm_devices(vm) {
                assert_eq!(d["state"], "attached", "{what}: {vm}: {d}");
            }
        }
    }

    /// The guest addresses of `vm`'s VFs as the table says.
    fn devs(&self, vm: &str) -> Vec<String> {
        self.table()
            .get(vm)
            .map(|v| {
                v.iter()
                    .map(|e| e.dev.clone().expect("guest address"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every VF in `devs` of each `(vm, devs)` read validly (`id` as the guest read at
    /// first, not all-ones) in a report begun after now. Every VF's "now" is taken before any
    /// wait, so all guests' next reports are awaited together.
    fn guests_read_validly(
        &self,
        vms: &[(&str, &[String])],
        ids: &BTreeMap<String, BTreeMap<String, u32>>,
        what: &str,
    ) {
        let serials: Vec<(&str, &Serial)> =
            vms.iter().map(|(vm, _)| (*vm, self.serial(vm))).collect();
        let mut now = Vec::new();
        let mut before = Vec::new();
        for ((vm, serial), (_, devs)) in serials.iter().zip(vms) {
            for dev in devs.iter() {
                let b = serial
                    .last(dev)
                    .unwrap_or_else(|| serial.report_after(dev, 0));
                // The next report: its rounds ran (at least partly) after now.
                now.push((*serial, dev.as_str(), b.round));
                before.push((*vm, b));
            }
        }
        let start = Instant::now();
        let after = reports_past(&now);
        for (((vm, before), after), (_, dev, _)) in before.iter().zip(after).zip(&now) {
            println!(
                "{what}: {vm} {dev}: report within {:.1} s: {after:?}",
                start.elapsed().as_secs_f64()
            );
            assert!(
                after.ok > before.ok,
                "{what}: {vm} {dev}: no valid reads {before:?} -> {after:?}"
            );
            assert_ne!(after.id, u32::MAX, "{what}: {vm} {dev}: all-ones {after:?}");
            if let Some(id) = ids.get(*vm).and_then(|m| m.get(*dev)) {
                assert_eq!(
                    after.id, *id,
                    "{what}: {vm} {dev}: not the CAP read at first {after:?}"
                );
            }
        }
    }

    fn stop_vmms(&self) {
        common::kill_vmms(&self.state(), &["vm1", "vm2"]);
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop_vmms();
        if guest::driver_of(&self.pf).is_some() {
            set_numvfs(&self.pf, 0);
        }
        unbind(&self.pf);
    }
}

#[derive(Debug, Clone)]
struct Entry {
    vf: u64,
    dev: Option<String>,
    host: String,
    state: String,
    vmm_state: Option<String>,
}

fn print_steps(r: &Value) {
    let steps: Vec<String> = r["steps"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|s| {
                    format!(
                        "{}{} {:.0} ms",
                        s["name"].as_str().unwrap_or("?"),
                        s["vm"]
                            .as_str()
                            .map(|v| format!("({v})"))
                            .unwrap_or_default(),
                        s["ms"].as_f64().unwrap_or(0.0)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "{} {} -> {} ({}): {}",
        r["operation"],
        r["from"],
        r["to"],
        r["mode"],
        steps.join(", ")
    );
}

/// `svff init` (twice), both guests reading their VFs: returns the id each
/// guest's VF reads first (its CAP), by VM and guest address.
fn init_and_first_reads(s: &Setup) -> BTreeMap<String, BTreeMap<String, u32>> {
    let r = s.ok_json(&["init", "--json"]);
    print_steps(&r);
    assert_eq!(r["changed"], true, "{r}");
    assert!(r["failures"].as_array().unwrap().is_empty(), "{r}");
    let mut ids = BTreeMap::new();
    for vm in ["vm1", "vm2"] {
        let ag = fs::read_to_string(format!("/proc/{}/autogroup", s.pid(vm))).unwrap_or_default();
        println!("{vm}: {}", ag.trim());
        let serial = s.serial(vm);
        let mut m = BTreeMap::new();
        for dev in s.devs(vm) {
            let c = serial.report_after(&dev, 0);
            assert_ne!(c.id, u32::MAX, "{vm} {dev}: {c:?}");
            assert_ne!(c.id, 0, "{vm} {dev}: the nvme VF is not online {c:?}");
            m.insert(dev, c.id);
        }
        assert_eq!(m.len(), 2, "{vm}: {m:?}");
        ids.insert(vm.to_owned(), m);
    }
    ids
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_orch_pause_svff_vmm_guests_keep_surviving_vfs_through_pause_reconfs_and_see_detach_removals()
{
    let s = Setup::new();
    let pf = s.pf.clone();

    // init: svff starts both VMMs with their VFs; vm2 unprivileged.
    let ids = init_and_first_reads(&s);
    s.assert_consistent(4, &[("vm1", &[0, 1]), ("vm2", &[2, 3])], "after init");
    let st = s.ok_json(&["status", "--json", "--pf", &pf]);
    for v in st["vms"].as_array().unwrap() {
        assert_eq!(v["kind"], "svff-vmm", "{v}");
        assert_eq!(v["process"], "running", "{v}");
    }
    let pid1 = s.pid("vm1");
    let pid2 = s.pid("vm2");
    let uid_line = fs::read_to_string(format!("/proc/{pid2}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_owned();
    assert_eq!(
        uid_line.split_whitespace().nth(1),
        Some(UNPRIV.to_string().as_str()),
        "vm2 runs as {UNPRIV}: {uid_line}"
    );
    for vf in &vfs_of(&pf)[2..4] {
        let g = guest::iommu_group(vf);
        let m = fs::metadata(format!("/dev/vfio/{g}")).unwrap();
        assert!(
            m.uid() == 0 && m.mode() & 0o077 == 0,
            "/dev/vfio/{g} must be root-only: vm2 got it from svff"
        );
    }

    // init again: nothing changes, the same VMMs run.
    let journal = fs::read_to_string(s.state().join("journal.jsonl")).unwrap();
    let r = s.ok_json(&["init", "--json"]);
    assert_eq!(r["changed"], false, "{r}");
    assert_eq!(
        fs::read_to_string(s.state().join("journal.jsonl")).unwrap(),
        journal,
        "a second init journals nothing"
    );
    assert_eq!((s.pid("vm1"), s.pid("vm2")), (pid1, pid2), "same VMMs");

    // Pause mode 4 -> 8: every VF paused and unpaused onto its re-created
    // VF (vm2's with group fds from svff), two new ones each.
    let devs1 = s.devs("vm1");
    let devs2 = s.devs("vm2");
    let r = s.reconf(8, "pause", Some("vm1=2,vm2=2"));
    assert!(r["failures"].as_array().unwrap().is_empty(), "{r}");
    s.assert_consistent(
        8,
        &[("vm1", &[0, 1, 4, 5]), ("vm2", &[2, 3, 6, 7])],
        "after 4 -> 8",
    );
    s.guests_read_validly(&[("vm1", &devs1), ("vm2", &devs2)], &ids, "after 4 -> 8");
    for (vm, devs) in [("vm1", &devs1), ("vm2", &devs2)] {
        for d in devs.iter() {
            assert_eq!(
                s.serial(vm).events(d, "gone"),
                0,
                "{vm} {d}: a surviving VF left the guest"
            );
        }
    }

    // Pause mode 8 -> 2: vm1 keeps VFs 0 and 1 without a removal; vm2's
    // VFs are gone, and its guest sees them go.
    let r = s.reconf(2, "pause", None);
    assert!(r["failures"].as_array().unwrap().is_empty(), "{r}");
    s.assert_consistent(2, &[("vm1", &[0, 1]), ("vm2", &[])], "after 8 -> 2");
    s.guests_read_validly(&[("vm1", &devs1)], &ids, "after 8 -> 2");
    for d in &devs1 {
        let c = s.serial("vm1").last(d).unwrap();
        assert_eq!(
            (c.gone, s.serial("vm1").events(d, "gone")),
            (0, 0),
            "vm1 {d}: {c:?}"
        );
    }
    for d in &devs2 {
        s.serial("vm2").wait_events(d, "gone", 1);
    }

    // Detach mode 2 -> 4: vm1's VFs removed and added back, vm2 gets two:
    // the guests see removals and additions.
    let r = s.reconf(4, "detach", Some("vm2=2"));
    assert!(r["failures"].as_array().unwrap().is_empty(), "{r}");
    s.assert_consistent(
        4,
        &[("vm1", &[0, 1]), ("vm2", &[2, 3])],
        "after detach 2 -> 4",
    );
    for d in &devs1 {
        s.serial("vm1").wait_events(d, "gone", 1);
        s.serial("vm1").wait_events(d, "back", 1);
    }
    for d in &devs2 {
        s.serial("vm2").wait_events(d, "back", 1);
    }
    let new2 = s.devs("vm2");
    assert_eq!(new2, devs2, "vm2's new VFs reuse the freed slots");
    s.guests_read_validly(
        &[("vm1", &devs1), ("vm2", &new2)],
        &ids,
        "after detach 2 -> 4",
    );

    // A VMM that died: reconf records its VFs as gone, status says it exited.
    signal(pid2, "KILL");
    wait_proc_state(pid2, &[None, Some('Z')], "vm2 killed");
    let out = s.run(
        &[
            "reconf", "--pf", &pf, "--vfs", "6", "--mode", "pause", "--json",
        ],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a VF recorded as gone is a failure"
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("svff printed JSON");
    print_steps(&r);
    let failures = r["failures"].to_string();
    assert!(
        failures.contains("VM vm2") && failures.contains("gone"),
        "{r}"
    );
    let st = s.ok_json(&["status", "--json", "--pf", &pf]);
    let vm2 = st["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vm2")
        .unwrap()
        .clone();
    assert_eq!(vm2["process"], "exited", "{st}");
    let gone: Vec<&Value> = st["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["vm"] == "vm2")
        .collect();
    assert!(
        !gone.is_empty() && gone.iter().all(|a| a["state"] == "gone"),
        "{st}"
    );
    s.guests_read_validly(&[("vm1", &devs1)], &ids, "after vm2 died");
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_orch_pause_helper_killed_after_each_journaled_step_of_a_pause_reconf_is_recovered() {
    let s = Setup::new();
    let pf = s.pf.clone();
    let ids = init_and_first_reads(&s);
    let devs1 = s.devs("vm1");
    // SVFF_LAB_CRASH_FROM=<k> starts at record k (to rerun one crash point); default 0.
    let first: u32 = std::env::var("SVFF_LAB_CRASH_FROM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut killed = 0;
    for k in first.. {
        let iteration = Instant::now();
        let ks = k.to_string();
        let out = s.run(
            &["reconf", "--pf", &pf, "--vfs", "2", "--mode", "pause"],
            &[("SVFF_TEST_CRASH_AFTER_RECORD", &ks)],
        );
        if out.status.success() {
            println!("record {k} is past the end: {killed} crash points tested");
            s.assert_consistent(2, &[("vm1", &[0, 1]), ("vm2", &[])], "uninterrupted run");
            break;
        }
        assert!(
            out.status.code() == Some(137) || out.status.signal() == Some(9),
            "record {k}: svff must die of SIGKILL, not {:?}",
            out.status
        );
        killed += 1;
        let journal = fs::read_to_string(s.state().join("journal.jsonl")).unwrap();
        println!(
            "killed after record {k}: {}",
            journal.lines().last().unwrap()
        );
        let r = s.ok_json(&["recover", "--json"]);
        assert!(
            r["failures"].as_array().unwrap().is_empty(),
            "record {k}: {r}"
        );
        let what = format!("recovered after record {k}");
        s.nobody_paused(&what);
        s.assert_consistent(2, &[("vm1", &[0, 1]), ("vm2", &[])], &what);
        s.guests_read_validly(&[("vm1", &devs1)], &ids, &what);
        for d in &devs1 {
            assert_eq!(
                s.serial("vm1").events(d, "gone"),
                0,
                "{what}: vm1 {d} left the guest"
            );
        }
        let again = s.ok_json(&["recover", "--json"]);
        assert_eq!(
            again["changed"], false,
            "record {k}: a second recover has nothing to do"
        );
        // Back to 4 (pause mode) for the next crash point.
        s.reconf(4, "pause", Some("vm2=2"));
        s.assert_consistent(
            4,
            &[("vm1", &[0, 1]), ("vm2", &[2, 3])],
            &format!("back to 4 after record {k}"),
        );
        println!(
            "crash point {k}: {:.1} s",
            iteration.elapsed().as_secs_f64()
        );
        assert!(k < 40, "the reconf never completed");
    }
    // begin, 4 pauses, set_count, bind, 2 unpauses, 2 detaches, table, end.
    if first == 0 {
        assert!(killed >= 11, "only {killed} crash points");
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_orch_pause_a_stopped_vmm_is_named_rolled_back_recovered_and_a_second_reconf_is_refused() {
    let s = Setup::new();
    let pf = s.pf.clone();
    let ids = init_and_first_reads(&s);
    let devs1 = s.devs("vm1");
    let devs2 = s.devs("vm2");
    let pid2 = s.pid("vm2");

    // The helper stops itself right after journaling vm2's first pause.
    let mut helper = s.spawn(
        &["reconf", "--pf", &pf, "--vfs", "2", "--mode", "pause"],
        &[("SVFF_TEST_STOP_AT", "pause:vm2")],
    );
    wait_proc_state(helper.id(), &[Some('T')], "helper stopping at pause:vm2");
    // A second reconf while this one holds the lock: refused, naming it.
    let out = s.run(
        &["reconf", "--pf", &pf, "--vfs", "8", "--mode", "pause"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&helper.id().to_string()) && err.contains("reconf"),
        "busy error names the holder: {err}"
    );
    // vm2 stops answering; the helper goes on and sends its pause.
    signal(pid2, "STOP");
    wait_proc_state(pid2, &[Some('T')], "vm2 stopped");
    signal(helper.id(), "CONT");
    let end = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = helper.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "the helper did not give up on vm2");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = helper.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{err}");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("VM vm2: svff-vfio-pause of svff-"),
        "names VM and device: {err}"
    );
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains("rolled back with failures"), "{err}");
    // The count never changed; vm1 has its VFs attached again.
    assert_eq!(vfs_of(&pf).len(), 4);
    for d in s.vmm_devices("vm1") {
        assert_eq!(d["state"], "attached", "vm1: {d}");
    }
    // vm2 answers again and carries out the pause it got; recover unpauses it.
    signal(pid2, "CONT");
    let end = Instant::now() + Duration::from_secs(60);
    while !s.vmm_devices("vm2").iter().any(|d| d["state"] == "paused") {
        assert!(Instant::now() < end, "vm2 never carried out its pause");
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = s.run(&["reconf", "--pf", &pf, "--vfs", "2"], &[]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("svff recover"),
        "a reconf before the recover is refused"
    );
    let r = s.ok_json(&["recover", "--json"]);
    assert!(r["failures"].as_array().unwrap().is_empty(), "{r}");
    s.nobody_paused("after recover");
    s.assert_consistent(4, &[("vm1", &[0, 1]), ("vm2", &[2, 3])], "after recover");
    s.guests_read_validly(&[("vm1", &devs1), ("vm2", &devs2)], &ids, "after recover");
    for (vm, devs) in [("vm1", &devs1), ("vm2", &devs2)] {
        for d in devs.iter() {
            assert_eq!(s.serial(vm).events(d, "gone"), 0, "{vm} {d} left the guest");
        }
    }
}
