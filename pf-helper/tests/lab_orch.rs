//! Lab tests of the orchestration (`svff init`, `svff reconf`, `svff recover`)
//! on the real kernel in L1, driving a stock QEMU L2 guest over QMP (kind
//! `qmp`, detach mode), and checking what the guest itself sees through its
//! command channel. The nvme PF under pci-pf-stub gives the VFs (1b36:0010);
//! the L2 has four q35 root ports for hot-plug. Each test leaves the PF with
//! 0 VFs and unbound.

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use svff_lab::guest::{self, dev_path, set_numvfs, unbind, vfs_of};
use svff_lab::l2::{Image, Qemu, L2};

const CMD: Duration = Duration::from_secs(90);
const PORTS: [&str; 4] = ["svffrp0", "svffrp1", "svffrp2", "svffrp3"];

/// Deadline for an L2 boot (`SVFF_LAB_L2_BOOT_DEADLINE` seconds, default 180).
fn boot_deadline() -> Duration {
    Duration::from_secs(
        std::env::var("SVFF_LAB_L2_BOOT_DEADLINE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(180),
    )
}

/// Runs svff (its copy in L1's RAM) under `timeout(1)` with `env`.
fn svff_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    common::svff_env(common::svff_in_ram(), args, env)
}

fn svff(args: &[&str]) -> Output {
    svff_env(args, &[])
}

fn ok_json(args: &[&str]) -> Value {
    common::json_of(args, &svff(args))
}

fn fails_with(args: &[&str], wanted: &[&str]) {
    let out = svff(args);
    assert_eq!(out.status.code(), Some(1), "svff {args:?} must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    for w in wanted {
        assert!(err.contains(w), "svff {args:?}: stderr lacks {w:?}: {err}");
    }
}

fn numvfs(pf: &str) -> u32 {
    guest::read_attr(dev_path(pf).join("sriov_numvfs"))
        .parse()
        .unwrap()
}

fn release(pf: &str) {
    for vf in vfs_of(pf) {
        unbind(&vf);
    }
    set_numvfs(pf, 0);
    unbind(pf);
}

/// One L1 setup: the nvme PF released, an L2 under stock QEMU with a QMP
/// socket and four root ports, a config naming both.
struct Setup {
    pf: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    vm: L2,
}

impl Setup {
    fn new() -> Setup {
        let pf = common::released_nvme_pf(&["vfio-pci", "kvm-amd"]);
        let dir = tempfile::tempdir().unwrap();
        let qmp = dir.path().join("vm1.qmp");
        let mut qemu = Qemu::stock()
            .arg("-qmp")
            .arg(&format!("unix:{},server=on,wait=off", qmp.display()));
        for (i, port) in PORTS.iter().enumerate() {
            qemu = qemu.device(&format!(
                "pcie-root-port,id={port},bus=pcie.0,chassis={},slot={}",
                20 + i,
                20 + i
            ));
        }
        let initrd = Image::new().build().expect("build the L2 image");
        let vm = L2::boot(&qemu, &initrd, boot_deadline()).unwrap_or_else(|e| panic!("{e}"));
        println!("L2 boot: {:.1} s", vm.boot_time.as_secs_f64());
        let config = dir.path().join("helper.toml");
        let s = Setup {
            pf,
            config,
            dir,
            vm,
        };
        s.write_config(&s.config, "");
        s
    }

    fn qmp(&self) -> PathBuf {
        self.dir.path().join("vm1.qmp")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The config: the PF (pci-pf-stub, 4 VFs) and vm1 taking all 4; `extra` appended.
    fn write_config(&self, path: &Path, extra: &str) {
        let text = format!(
            r#"allowed_uids = [0]
state_dir = "{state}"
[[pf]]
bdf = "{pf}"
profile = "pci-pf-stub"
vfs = 4
[[vm]]
name = "vm1"
kind = "qmp"
qmp = "{qmp}"
hotplug_ports = ["svffrp0", "svffrp1", "svffrp2", "svffrp3"]
qmp_timeout_s = 60
detach_timeout_s = 30
vfs = [{{ pf = "{pf}", count = 4 }}]
{extra}"#,
            state = self.state_dir().display(),
            pf = self.pf,
            qmp = self.qmp().display(),
        );
        fs::write(path, text).unwrap();
    }

    fn cfg(&self) -> String {
        self.config.display().to_string()
    }

    /// `svff --direct --config <cfg> <args>`.
    fn args<'a>(&'a self, cfg: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["--direct", "--config", cfg];
        v.extend_from_slice(args);
        v
    }

    /// The nvme VFs the guest sees (guest BDFs), once their number is `n`
    /// (the guest's hot-plug handling is asynchronous; bounded wait).
    fn guest_vfs(&mut self, n: usize) -> Vec<String> {
        let script = format!(
            "i=0; while [ $i -lt 600 ]; do \
               l=$(for d in /sys/bus/pci/devices/*; do \
                     [ \"$(cat $d/vendor)$(cat $d/device)\" = 0x1b360x0010 ] && echo ${{d##*/}}; done); \
               [ $(echo -n \"$l\" | grep -c .) -eq {n} ] && break; sleep 0.1; i=$((i+1)); done; \
             echo \"$l\""
        );
        let out = self
            .vm
            .sh_ok(&script, CMD)
            .unwrap_or_else(|e| panic!("{e}"));
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The assignment table as `svff status --json` shows it: `(vf, id, host)`.
    fn table(&self) -> Vec<(u64, String, String)> {
        let cfg = self.cfg();
        let s = ok_json(&self.args(&cfg, &["status", "--json", "--pf", &self.pf]));
        s["assignments"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["vf"].as_u64().unwrap(),
                            e["id"].as_str().unwrap().to_owned(),
                            e["host"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Checks the PF, the table and the guest agree on `n` VFs in vm1.
    fn assert_consistent(&mut self, n: usize, what: &str) {
        assert_eq!(numvfs(&self.pf) as usize, n, "{what}: sriov_numvfs");
        let vfs = vfs_of(&self.pf);
        for vf in &vfs {
            assert_eq!(
                guest::driver_of(vf).as_deref(),
                Some("vfio-pci"),
                "{what}: {vf} driver"
            );
        }
        let table = self.table();
        let want: Vec<(u64, String, String)> = vfs
            .iter()
            .enumerate()
            .map(|(i, bdf)| {
                (
                    i as u64,
                    format!("svff-{}-vf{i}", self.pf.replace(':', "-")),
                    bdf.clone(),
                )
            })
            .collect();
        assert_eq!(table, want, "{what}: assignment table");
        let seen = self.guest_vfs(n);
        assert_eq!(seen.len(), n, "{what}: the guest sees {seen:?}");
    }

    fn cleanup(mut self) {
        let cfg = self.cfg();
        let out = svff(&self.args(
            &cfg,
            &["reconf", "--pf", &self.pf, "--vfs", "0", "--mode", "detach"],
        ));
        assert!(out.status.success(), "cleanup reconf to 0");
        assert!(self.guest_vfs(0).is_empty());
        let pf = self.pf.clone();
        drop(self);
        release(&pf);
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_orch_init_and_detach_reconf_drive_a_stock_qemu_guest_and_bad_input_changes_nothing() {
    let mut s = Setup::new();
    let cfg = s.cfg();
    let pf = s.pf.clone();
    assert!(s.guest_vfs(0).is_empty(), "no VF before init");

    // init: 4 VFs on vfio-pci, all in vm1, seen by the guest.
    let r = ok_json(&s.args(&cfg, &["init", "--json"]));
    assert_eq!(r["format_version"], 1);
    assert_eq!(r["changed"], true, "{r}");
    assert_eq!(r["assignments"].as_array().unwrap().len(), 4, "{r}");
    assert!(
        r["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["guest"].is_string() && a["bus"].is_string()),
        "guest addresses and buses recorded: {r}"
    );
    s.assert_consistent(4, "after init");
    let guest_before = s.guest_vfs(4);

    // init again: nothing changes, and it says so.
    let journal = fs::read_to_string(s.state_dir().join("journal.jsonl")).unwrap();
    let out = svff(&s.args(&cfg, &["init"]));
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nothing to do"), "{text}");
    assert_eq!(
        fs::read_to_string(s.state_dir().join("journal.jsonl")).unwrap(),
        journal,
        "a second init journals nothing"
    );
    assert_eq!(s.guest_vfs(4), guest_before);

    // status: the table, holders, and the pause state stock QEMU cannot give.
    let st = ok_json(&s.args(&cfg, &["status", "--json", "--pf", &pf]));
    let a = &st["assignments"][0];
    assert_eq!(a["vm"], "vm1");
    assert_eq!(a["vmm_state"], Value::Null);
    assert!(
        a["vmm_note"]
            .as_str()
            .unwrap()
            .contains("does not speak the svff QMP commands"),
        "{a}"
    );
    assert_eq!(st["pfs"][0]["vfs"][0]["holder"], a["id"]);

    // Pause mode against stock QEMU: refused by the VMM, rolled back, guest untouched.
    fails_with(
        &s.args(
            &cfg,
            &["reconf", "--pf", &pf, "--vfs", "2", "--mode", "pause"],
        ),
        &[
            "VM vm1: svff-vfio-pause of svff-",
            "rolled back",
            "kept 4 VFs",
        ],
    );
    s.assert_consistent(4, "after the refused pause");
    assert_eq!(s.guest_vfs(4), guest_before);

    // Detach mode 4 -> 2: the guest sees the two removals; 2 -> 4 with vm1=2: additions.
    let r = ok_json(&s.args(
        &cfg,
        &[
            "reconf", "--pf", &pf, "--vfs", "2", "--mode", "detach", "--json",
        ],
    ));
    let steps: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    for want in ["remove_vf", "change_numvfs", "bind_vfs", "add_vf"] {
        assert!(steps.contains(&want), "{steps:?}");
    }
    println!("detach 4 -> 2 steps: {}", r["steps"]);
    s.assert_consistent(2, "after reconf to 2");
    let two = s.guest_vfs(2);
    assert!(
        two.iter().all(|g| guest_before.contains(g)),
        "survivors come back on their ports: {two:?} of {guest_before:?}"
    );
    let r = ok_json(&s.args(
        &cfg,
        &[
            "reconf", "--pf", &pf, "--vfs", "4", "--mode", "detach", "--assign", "vm1=2", "--json",
        ],
    ));
    println!("detach 2 -> 4 steps: {}", r["steps"]);
    s.assert_consistent(4, "after reconf back to 4");

    // Bad input: each a clear error, nothing changed.
    fails_with(
        &s.args(
            &cfg,
            &[
                "reconf",
                "--pf",
                "0000:77:00.0",
                "--vfs",
                "2",
                "--mode",
                "detach",
            ],
        ),
        &["PF 0000:77:00.0 is not on the helper's allow-list"],
    );
    fails_with(
        &s.args(
            &cfg,
            &["reconf", "--pf", &pf, "--vfs", "65", "--mode", "detach"],
        ),
        &["supports at most 64 VFs (65 requested)"],
    );
    fails_with(
        &s.args(
            &cfg,
            &[
                "reconf", "--pf", &pf, "--vfs", "6", "--mode", "detach", "--assign", "vm9=1",
            ],
        ),
        &["unknown VM \"vm9\" (configured: vm1)"],
    );
    fails_with(
        &s.args(
            &cfg,
            &[
                "reconf", "--pf", &pf, "--vfs", "4", "--mode", "detach", "--assign", "vm1=1",
            ],
        ),
        &["more VFs than the 4 requested have free"],
    );
    let bad = s.dir.path().join("bad.toml");
    s.write_config(&bad, "");
    let text = fs::read_to_string(&bad)
        .unwrap()
        .replace("vfs = 4", "vfs = \"four\"");
    fs::write(&bad, text).unwrap();
    let badcfg = bad.display().to_string();
    fails_with(
        &s.args(&badcfg, &["init"]),
        &[&format!("config {badcfg}:6:7: pf[0].vfs: invalid type")],
    );
    s.write_config(&bad, "");
    let text = fs::read_to_string(&bad)
        .unwrap()
        .replace("count = 4 }]", "index = [7] }]");
    fs::write(&bad, text).unwrap();
    fails_with(
        &s.args(&badcfg, &["init"]),
        &[
            "vm[0].vfs",
            "VF index 7 of PF",
            "does not exist (the PF gets 4 VFs)",
        ],
    );
    // A VMM that accepts the connection and never answers: named, deadline, nothing changed.
    let silent_sock = s.dir.path().join("silent.qmp");
    let _silent = std::os::unix::net::UnixListener::bind(&silent_sock).unwrap();
    let silent = s.dir.path().join("silent.toml");
    s.write_config(
        &silent,
        &format!(
            "[[vm]]\nname = \"silent\"\nkind = \"qmp\"\nqmp = \"{}\"\nqmp_timeout_s = 2\n",
            silent_sock.display()
        ),
    );
    let silentcfg = silent.display().to_string();
    fails_with(
        &s.args(
            &silentcfg,
            &[
                "reconf", "--pf", &pf, "--vfs", "5", "--mode", "detach", "--assign", "silent=1",
            ],
        ),
        &[
            "VM silent: connecting to its QMP socket",
            "timed out waiting for the greeting",
        ],
    );
    // A reconf while another holds the operation lock.
    {
        use std::io::Write;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(s.state_dir().join("lock"))
            .unwrap();
        let mut held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .unwrap();
        held.set_len(0).unwrap();
        writeln!(&mut *held, "pid 1 reconf of PF {pf} to 8 VFs (pause mode)").unwrap();
        fails_with(
            &s.args(
                &cfg,
                &["reconf", "--pf", &pf, "--vfs", "2", "--mode", "detach"],
            ),
            &["another svff operation is running (pid 1 reconf of PF"],
        );
    }
    s.assert_consistent(4, "after the bad inputs");
    assert_eq!(s.guest_vfs(4).len(), 4);
    s.cleanup();
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_orch_helper_killed_after_each_journaled_step_of_a_detach_reconf_is_recovered() {
    let mut s = Setup::new();
    let cfg = s.cfg();
    let pf = s.pf.clone();
    ok_json(&s.args(&cfg, &["init", "--json"]));
    s.assert_consistent(4, "after init");
    let mut killed = 0;
    for k in 0.. {
        let ks = k.to_string();
        let out = svff_env(
            &s.args(
                &cfg,
                &["reconf", "--pf", &pf, "--vfs", "2", "--mode", "detach"],
            ),
            &[("SVFF_TEST_CRASH_AFTER_RECORD", &ks)],
        );
        if out.status.success() {
            // k is past the last record: the whole run happened.
            println!("record {k} is past the end: {killed} crash points tested");
            s.assert_consistent(2, "after the uninterrupted run");
            break;
        }
        // `timeout` passes the child's death on as 128+9.
        assert!(
            out.status.code() == Some(137) || out.status.signal() == Some(9),
            "record {k}: svff must die of SIGKILL, not {:?}",
            out.status
        );
        killed += 1;
        let journal = fs::read_to_string(s.state_dir().join("journal.jsonl")).unwrap();
        let last = journal.lines().last().unwrap().to_owned();
        println!("killed after record {k}: {last}");
        let r = ok_json(&s.args(&cfg, &["recover", "--json"]));
        assert!(
            r["failures"].as_array().unwrap().is_empty(),
            "record {k}: {r}"
        );
        s.assert_consistent(2, &format!("recovered after record {k}"));
        let again = ok_json(&s.args(&cfg, &["recover", "--json"]));
        assert_eq!(
            again["changed"], false,
            "record {k}: a second recover has nothing to do"
        );
        // Back to 4 for the next crash point.
        ok_json(&s.args(
            &cfg,
            &[
                "reconf", "--pf", &pf, "--vfs", "4", "--mode", "detach", "--assign", "vm1=2",
                "--json",
            ],
        ));
        s.assert_consistent(4, &format!("back to 4 after record {k}"));
        assert!(k < 40, "the reconf never completed");
    }
    // begin, 4 detaches, set_count, bind, 2 attaches, table, end.
    assert!(killed >= 10, "only {killed} crash points");
    s.cleanup();
}
