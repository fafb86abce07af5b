//! Lab test of pool mode (`pool = true`, nvme profile) through the real
//! `svff` CLI on the real kernel in L1: a pool of 12 nvme VFs held by four
//! svff-vmm test guests (3 VFs each); pool-mode reconfs of 1, 4 and 10 VFs
//! change only the named VFs' NVMe resources, pause only them, and never
//! write `sriov_numvfs`; requests beyond the controller's limits are refused;
//! a helper killed after each journal record of a pool reconf is recovered.
//! What a guest saw comes from its serial console's counter lines; what the
//! VMM did from `query-svff-vfio` (`pause_count`). The test leaves the PF
//! with 0 VFs, unbound, and no VMM running.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{reports_past, Counters, Serial};
use serde_json::Value;
use svff_lab::guest::{self, dev_path, set_numvfs, unbind, vfs_of};

const REPORT_EVERY: u64 = 20;
const POOL: usize = 12;
const VMS: [&str; 4] = ["vm1", "vm2", "vm3", "vm4"];

struct Setup {
    pf: String,
    dir: tempfile::TempDir,
    config: String,
    vms: Vec<String>,
    /// Each VM's console, read incrementally.
    serials: BTreeMap<String, Serial>,
}

/// One `[[vm]]` of the test's config: kind `svff-vmm`, started by `svff init` with `command`
/// (a TOML array), holding the pool VFs `index`.
struct VmSpec {
    name: String,
    command: String,
    index: Vec<usize>,
    policy: &'static str,
}

impl Setup {
    /// The lab's nvme PF, unbound with no VFs, and a config for a pool of `POOL` VFs (2 VQ /
    /// 1 VI each) held by four svff-vmm test guests, 3 VFs each.
    fn new() -> Setup {
        Self::with(POOL, (2, 1), |_| {
            let command = common::test_guest_command(REPORT_EVERY);
            VMS.iter()
                .enumerate()
                .map(|(i, vm)| VmSpec {
                    name: (*vm).to_owned(),
                    command: command.clone(),
                    index: (i * 3..i * 3 + 3).collect(),
                    policy: "ignore",
                })
                .collect()
        })
    }

    /// A pool of `pool` VFs with `(vq, vi)` each and the VMs `vms(path of svff-vmm)` returns.
    fn with(pool: usize, (vq, vi): (u32, u32), vms: impl FnOnce(&Path) -> Vec<VmSpec>) -> Setup {
        let pf = common::released_nvme_pf(&["vfio-pci", "kvm-amd", "nvme"]);
        let dir = tempfile::tempdir().unwrap();
        let vms = vms(common::svff_vmm_in_ram());
        let config = dir.path().join("helper.toml");
        let mut text = format!(
            "allowed_uids = [0]\nstate_dir = \"{}\"\n[[pf]]\nbdf = \"{pf}\"\nprofile = \"nvme\"\nvfs = {pool}\npool = true\nnvme = {{ vq = {vq}, vi = {vi} }}\n",
            dir.path().join("state").display()
        );
        for vm in &vms {
            let idx: Vec<String> = vm.index.iter().map(|v| v.to_string()).collect();
            text.push_str(&format!(
                "[[vm]]\nname = \"{}\"\nkind = \"svff-vmm\"\nqmp = \"{}/{}.qmp\"\nqmp_timeout_s = 30\npause_policy = \"{}\"\ncommand = {}\nvfs = [{{ pf = \"{pf}\", index = [{}] }}]\n",
                vm.name,
                dir.path().display(),
                vm.name,
                vm.policy,
                vm.command,
                idx.join(", ")
            ));
        }
        fs::write(&config, text).unwrap();
        let serials = vms
            .iter()
            .map(|v| {
                let path = dir.path().join(format!("state/vm-{}.serial", v.name));
                (v.name.clone(), Serial::new(path))
            })
            .collect();
        Setup {
            pf,
            config: config.display().to_string(),
            dir,
            vms: vms.into_iter().map(|v| v.name).collect(),
            serials,
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn serial(&self, vm: &str) -> &Serial {
        &self.serials[vm]
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut v = vec!["--direct", "--config", &self.config];
        v.extend_from_slice(args);
        common::svff_env(common::svff_in_ram(), &v, env)
    }

    fn ok_json(&self, args: &[&str]) -> Value {
        common::json_of(args, &self.run(args, &[]))
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
        for vm in &self.vms {
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

    /// For each VF of `vfs` (`vf -> (vm, guest dev)`): the first report of its guest begun
    /// after now (`a`) and one at least a full report later (`b`). Every VF's "now" is taken
    /// before any wait, so all guests' reports are awaited together.
    fn two_reports_from_now(
        &self,
        vfs: &[(u64, &(String, String))],
    ) -> Vec<(u64, String, String, Counters, Counters)> {
        let serials: Vec<&Serial> = vfs.iter().map(|(_, (vm, _))| self.serial(vm)).collect();
        let now: Vec<(&Serial, &str, u64)> = serials
            .iter()
            .zip(vfs)
            .map(|(serial, (_, (_, dev)))| (*serial, dev.as_str(), serial.last(dev).unwrap().round))
            .collect();
        let a = reports_past(&now);
        let then: Vec<(&Serial, &str, u64)> = now
            .iter()
            .zip(&a)
            .map(|((serial, dev, _), a)| (*serial, *dev, a.round + REPORT_EVERY))
            .collect();
        let b = reports_past(&then);
        vfs.iter()
            .zip(a.into_iter().zip(b))
            .map(|((vf, (vm, dev)), (a, b))| (*vf, vm.clone(), dev.clone(), a, b))
            .collect()
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
        let vms: Vec<&str> = self.vms.iter().map(String::as_str).collect();
        common::kill_vmms(&self.state(), &vms);
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
        let all: Vec<(u64, &(String, String))> = vm_of.iter().map(|(vf, v)| (*vf, v)).collect();
        for (vf, vm, dev, a, b) in s.two_reports_from_now(&all) {
            let vf = &vf;
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
            assert_eq!(s.serial(vm).all_events("gone"), 0, "n={n}: {vm}");
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
        let named = [(0u64, &vm_of[&0]), (3, &vm_of[&3])];
        for (vf, _, _, a, b) in s.two_reports_from_now(&named) {
            assert!(
                b.ok > a.ok && b.id == first_id[&vf] && b.gone == 0,
                "seq {seq}: VF {vf}: {a:?} -> {b:?}"
            );
        }
    }
    for vm in VMS {
        assert_eq!(s.serial(vm).all_events("gone"), 0, "{vm}");
    }
    for t in timings {
        println!("{t}");
    }
}

/// The L2 guest's side of the nvme test (the image's setup script; it never returns). Loads
/// `nvme` with a poll queue (it needs no interrupt, so the I/O queue count follows the VF's VQ
/// resources although its single VI stays; `poll_queues` is at most the guest's CPU count, 1)
/// and short command timeouts, then every second:
/// writes a tick marker to a new block of the namespace, drops the page cache, reads it back,
/// and prints one line (tick, hardware queues of `nvme0n1`, I/O result, the VF's driver),
/// followed by the kernel messages since the last tick. Hardware queues: the `mq/N` entries of
/// the namespace's block device.
const NVME_GUEST: &str = r#"
say() { echo "svff-l2: $*"; }
modprobe nvme_core io_timeout=5 admin_timeout=5 || say "modprobe nvme_core failed"
modprobe nvme poll_queues=1 || say "modprobe nvme failed"
g=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x1b36 ] && [ "$(cat $d/device)" = 0x0010 ] && g=${d##*/}
done
say "vf $g"
i=0
while [ ! -b /dev/nvme0n1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
n=0
while :; do
    n=$((n + 1))
    b=$((n % 30000))
    m=$(printf 'svff-tick-%08d' $n)
    io=fail
    if [ -b /dev/nvme0n1 ] && printf '%s' "$m" | dd of=/dev/nvme0n1 bs=512 seek=$b conv=fsync 2>/dev/null \
        && echo 1 > /proc/sys/vm/drop_caches \
        && [ "$(dd if=/dev/nvme0n1 bs=512 skip=$b count=1 2>/dev/null | head -c 18)" = "$m" ]; then
        io=ok
    fi
    # With native multipath nvme0n1 is the head and nvme0c0n1 the path with the queues.
    q=$(ls -d /sys/block/nvme0*n1/mq/[0-9]* 2>/dev/null | wc -l)
    say "tick $n mq=$q io=$io drv=$(basename "$(readlink /sys/bus/pci/devices/$g/driver)")"
    dmesg -c | sed 's/^/svff-l2: dmesg /'
    sleep 1
done
"#;

/// One `svff-l2: tick N mq=Q io=R drv=D` line of the nvme guest.
#[derive(Debug, Clone, PartialEq)]
struct Tick {
    n: u64,
    mq: u64,
    io_ok: bool,
    driver: String,
}

fn ticks(serial: &str) -> Vec<Tick> {
    serial
        .lines()
        .filter_map(|l| {
            let mut w = l.trim().strip_prefix("svff-l2: tick ")?.split_whitespace();
            let n = w.next()?.parse().ok()?;
            let mq = w.next()?.strip_prefix("mq=")?.parse().ok()?;
            let io_ok = w.next()?.strip_prefix("io=")? == "ok";
            let driver = w.next()?.strip_prefix("drv=")?.to_owned();
            Some(Tick {
                n,
                mq,
                io_ok,
                driver,
            })
        })
        .collect()
}

fn guest_dmesg(serial: &str) -> Vec<String> {
    serial
        .lines()
        .filter_map(|l| l.trim().strip_prefix("svff-l2: dmesg ").map(str::to_owned))
        .collect()
}

/// `(default, read, poll)` from each "nvme nvme0: D/R/P default/read/poll queues" line.
fn queue_lines(dmesg: &[String]) -> Vec<(u64, u64, u64)> {
    dmesg
        .iter()
        .filter_map(|l| {
            let (_, rest) = l.split_once("nvme nvme0: ")?;
            let counts = rest.strip_suffix(" default/read/poll queues")?;
            let v: Vec<u64> = counts.split('/').filter_map(|x| x.parse().ok()).collect();
            (v.len() == 3).then(|| (v[0], v[1], v[2]))
        })
        .collect()
}

#[test]
fn nvme_guest_lines_parse() {
    let s = "svff-l2: tick 7 mq=3 io=ok drv=nvme\nsvff-l2: dmesg [    3.1] nvme nvme0: 1/0/2 default/read/poll queues\nnoise\n";
    assert_eq!(
        ticks(s),
        vec![Tick {
            n: 7,
            mq: 3,
            io_ok: true,
            driver: "nvme".into()
        }]
    );
    assert_eq!(queue_lines(&guest_dmesg(s)), vec![(1, 0, 2)]);
}

#[test]
fn serial_reads_only_complete_appended_lines_and_starts_over_when_the_file_shrinks() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.serial");
    let line = |dev: &str, round: u64| {
        format!("svff-guest: dev={dev} round={round} reads=4 ok=4 ones=0 gone=0 back=0 max_tsc=1 irqs=0 win_ktsc=0 id=00000001 st=00000000\n")
    };
    fs::write(&path, line("00:01.0", 20)).unwrap();
    let serial = Serial::new(path.clone());
    assert_eq!(serial.last("00:01.0").unwrap().round, 20);
    assert_eq!(serial.last("00:02.0"), None);
    let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
    write!(
        f,
        "svff-guest: dev=00:02.0 event=gone\n{}",
        line("00:01.0", 40)
    )
    .unwrap();
    // A line being written counts only once complete.
    write!(f, "svff-guest: dev=00:01.0 round=6").unwrap();
    assert_eq!(serial.last("00:01.0").unwrap().round, 40);
    assert_eq!(serial.events("00:02.0", "gone"), 1);
    assert_eq!(serial.events("00:01.0", "gone"), 0);
    assert_eq!(serial.all_events("gone"), 1);
    writeln!(
        f,
        "0 reads=4 ok=4 ones=0 gone=0 back=0 max_tsc=1 irqs=0 win_ktsc=0 id=00000001 st=00000000"
    )
    .unwrap();
    assert_eq!(serial.last("00:01.0").unwrap().round, 60);
    assert_eq!(serial.events("00:02.0", "gone"), 1, "counted once");
    // A new console in its place (shorter): read from its start.
    fs::write(&path, line("00:03.0", 20)).unwrap();
    assert_eq!(serial.last("00:03.0").unwrap().round, 20);
    assert_eq!(serial.last("00:01.0"), None);
    assert_eq!(serial.all_events("gone"), 0);
}

#[test]
fn low_priority_vmm_command_is_a_toml_array_that_execs_the_vmm_with_svffs_arguments() {
    let text = format!(
        "command = {}",
        common::low_priority_vmm_command(Path::new("/bin/echo"), &["--memory", "32M"])
    );
    let v: toml::Value = toml::from_str(&text).unwrap();
    let mut argv: Vec<String> = v["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    // What svff appends.
    argv.extend(["--qmp".to_owned(), "/run/vm1.qmp".to_owned()]);
    // In a session of its own, as svff starts a VMM: the autogroup it lowers is its own,
    // not the one of whoever runs this test.
    let out = std::process::Command::new("setsid")
        .arg("--wait")
        .args(&argv)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "--memory 32M --qmp /run/vm1.qmp\n"
    );
}

/// Waits (bounded) until the guest's serial has a tick line past `after` for which `cond` holds.
fn wait_tick(serial: &Serial, what: &str, secs: u64, cond: &dyn Fn(&Tick) -> bool) -> Tick {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let text = serial.text();
        if let Some(t) = ticks(&text).into_iter().find(|t| cond(t)) {
            return t;
        }
        assert!(
            Instant::now() < end,
            "timed out after {secs} s waiting for {what}; guest serial:\n{text}"
        );
        // The guest's only sign is its next line (one a second).
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_pool_l2_linux_nvme_driver_keeps_its_vf_across_a_pool_queue_change_resets_and_sees_the_new_queue_count(
) {
    // VF 0 starts with 3 VQ (admin + 2 I/O queues: the guest's nvme makes 1 default + 1
    // poll queue) and 1 VI, and goes to 2 VQ (1 I/O queue: 1 default, no poll queue).
    let s = Setup::with(2, (3, 1), |vmm| {
        let kernel = svff_lab::l2::default_kernel().unwrap();
        let initrd = svff_lab::l2::Image::new()
            .module("nvme")
            .setup(NVME_GUEST)
            .build()
            .expect("build the L2 image");
        let cmdline = format!(
            "{} quiet loglevel=4 rdinit=/init svff.ctl=ttyS0",
            svff_vmm_cmdline()
        );
        vec![VmSpec {
            name: "linux".into(),
            command: format!(
                r#"["{}", "--memory", "512M", "--test-devices", "0", "--kernel", "{}", "--initrd", "{}", "--cmdline", "{cmdline}"]"#,
                vmm.display(),
                kernel.display(),
                initrd.display()
            ),
            index: vec![0],
            // A vCPU touching the paused VF waits for the unpause: the driver never reads
            // all-ones (which would make it give the device up).
            policy: "stall",
        }]
    });
    let pf = s.pf.clone();
    let r = s.ok_json(&["init", "--json"]);
    assert!(r["failures"].as_array().unwrap().is_empty(), "{r}");
    let serial = s.serial("linux");
    let started = Instant::now();
    let first = wait_tick(serial, "the guest's first I/O", 400, &|t| t.io_ok);
    println!(
        "L2 up with nvme I/O after {:.1} s: {first:?}",
        started.elapsed().as_secs_f64()
    );
    // The kernel messages of a tick follow its line: the next tick has them.
    wait_tick(serial, "the next tick", 60, &|t| t.n > first.n);
    let before = serial.text();
    assert_eq!(first.driver, "nvme", "{before}");
    assert_eq!(first.mq, 2, "1 default + 1 poll queue: {before}");
    assert_eq!(
        queue_lines(&guest_dmesg(&before)),
        vec![(1, 0, 1)],
        "{before}"
    );
    let identity = s.vf_identity();
    let pauses = s.vmm_devices();

    let r = s.ok_json(&[
        "reconf",
        "--pf",
        &pf,
        "--resources",
        "0=vq:2,vi:1",
        "--json",
    ]);
    assert!(r["failures"].as_array().unwrap().is_empty(), "{r}");
    let changed_at = ticks(&serial.text()).last().map_or(0, |t| t.n);
    let reconf_at = Instant::now();
    let (p, _) = step_ms(&r, "pause");
    let (res, _) = step_ms(&r, "resources");
    let (u, _) = step_ms(&r, "unpause");
    println!(
        "pool reconf of the guest's VF: pause {p:.0} ms, resources {res:.0} ms, unpause {u:.0} ms"
    );
    assert_eq!(s.resources()[&0], (true, 2, 1));
    assert_eq!(s.vf_identity(), identity, "sriov_numvfs was written");
    let id = device_id(&pf, 0);
    assert_eq!(s.vmm_devices()[&id].1, pauses[&id].1 + 1, "paused once");

    // The driver finds the controller reset (its queues gone), times out, resets it and
    // comes back with the new count; then I/O works again.
    let after = wait_tick(
        serial,
        "I/O on 1 hardware queue after the change",
        300,
        &|t| t.n > changed_at && t.io_ok && t.mq == 1,
    );
    println!(
        "guest back with {} queues and working I/O {:.1} s after the reconf: {after:?}",
        after.mq,
        reconf_at.elapsed().as_secs_f64()
    );
    let more = wait_tick(serial, "two more ticks", 60, &|t| t.n >= after.n + 2);
    let text = serial.text();
    let dmesg = guest_dmesg(&text);
    let nvme_log: Vec<&String> = dmesg
        .iter()
        .filter(|l| l.contains("nvme") || l.contains("0000:00:01.0"))
        .collect();
    println!(
        "guest kernel's nvme messages:\n{}",
        nvme_log
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let t = ticks(&text);
    println!(
        "ticks around the change: {:?}",
        t.iter()
            .filter(|t| t.n + 3 >= changed_at && t.n <= more.n)
            .map(|t| (t.n, t.mq, t.io_ok))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        queue_lines(&dmesg),
        vec![(1, 0, 1), (1, 0, 0)],
        "the reset's queue line"
    );
    assert!(
        nvme_log.iter().any(|l| l.contains("reset controller")),
        "the driver reset the controller"
    );
    let gone: Vec<&&String> = nvme_log
        .iter()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("remov") || l.contains("disable controller")
        })
        .collect();
    assert!(gone.is_empty(), "removal in the guest's dmesg: {gone:?}");
    assert!(t.iter().all(|t| t.driver == "nvme"), "nvme stayed bound");
    assert!(more.io_ok && more.mq == 1, "{more:?}");
    assert_eq!(s.serial("linux").all_events("gone"), 0);
}

/// svff-vmm's default kernel command line (its `--cmdline` replaces it).
fn svff_vmm_cmdline() -> &'static str {
    "console=ttyS0 reboot=k panic=1 pci=conf1 acpi=off"
}
