//! Lab smoke tests of `svff bench` on the real kernel in L1: every mode that
//! exists, 1 VF, 2 runs, on the nvme PF (under pci-pf-stub; pool mode on the
//! kernel's nvme driver, which it needs); svff-vmm test guests and stock and
//! patched QEMU L2 Linux guests started by the bench itself (the patched
//! QEMU is `make qemu`'s, as `make test` builds it), and a stock QEMU L2
//! described in a helper config. They check that the command works, that its JSON has the
//! documented shape and what the guests saw (no device vanishes in pause
//! mode, every one in detach mode); the numbers themselves are never
//! asserted. Each test leaves the PF with 0 VFs and unbound.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use svff_lab::guest::{self, dev_path, set_numvfs, unbind, vfs_of};
use svff_lab::l2::{Image, Qemu, L2};

const SVFF: &str = env!("CARGO_BIN_EXE_svff");
/// Upper bound of one svff bench call.
const CALL_TIMEOUT_S: &str = "280";
/// Upper bound of one svff bench call that boots QEMU L2 guests.
const BOOTING_CALL_TIMEOUT_S: &str = "600";

fn svff(args: &[&str]) -> Output {
    svff_within(CALL_TIMEOUT_S, args)
}

fn svff_within(timeout_s: &str, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg(timeout_s)
        .arg(SVFF)
        .args(args)
        .output()
        .expect("run timeout(1)");
    eprintln!(
        "$ svff {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
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

fn setup() -> (String, tempfile::TempDir) {
    guest::require_lab();
    let pf = guest::nvme_pf();
    if guest::driver_of(&pf).is_some() {
        set_numvfs(&pf, 0);
    }
    release(&pf);
    guest::modprobe("vfio-pci");
    guest::modprobe("kvm-amd");
    (pf, tempfile::tempdir().unwrap())
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).expect("the --json file")).expect("JSON")
}

fn series<'a>(doc: &'a Value, mode: &str, vmm: &str) -> &'a Value {
    doc["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["mode"] == mode && s["vmm"] == vmm)
        .unwrap_or_else(|| panic!("no {mode}/{vmm} series in {doc}"))
}

fn step_names(s: &Value) -> Vec<String> {
    let mut v: Vec<String> = s["summary"]["steps"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    v.sort();
    v
}

/// The shape every series has: 2 counted runs, each with a total and steps, a summary.
fn assert_series_shape(s: &Value, vfs: u64) {
    assert_eq!(s["vfs"], vfs, "{s}");
    let runs = s["runs"].as_array().unwrap();
    assert_eq!(
        runs.len(),
        2,
        "2 counted runs (the warm-up is not among them): {s}"
    );
    for r in runs {
        assert!(r["total_ms"].as_f64().unwrap() > 0.0, "{r}");
        let (from, to) = (r["from"].as_u64().unwrap(), r["to"].as_u64().unwrap());
        if s["mode"] == "pool" {
            assert!(
                from == to && (from == vfs || from == vfs + 1),
                "a pool run keeps the VF count: {r}"
            );
        } else {
            assert!(
                (from, to) == (vfs, vfs + 1) || (from, to) == (vfs + 1, vfs),
                "each run changes the count between N and N+1: {r}"
            );
        }
    }
    for k in ["avg_ms", "sigma_ms", "min_ms", "max_ms"] {
        assert!(s["summary"][k].is_number(), "{k}: {s}");
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_bench_floor_pause_detach_with_svff_vmm_stock_and_patched_qemu_in_one_run_writes_the_documented_json_and_plot(
) {
    let (pf, dir) = setup();
    let out_json = dir.path().join("bench.json");
    let out_svg = dir.path().join("bench.svg");
    let vmm = Path::new(SVFF).with_file_name("svff-vmm");
    assert!(
        vmm.is_file(),
        "{} is built with the workspace",
        vmm.display()
    );
    let out = svff_within(
        BOOTING_CALL_TIMEOUT_S,
        &[
            "bench",
            "--pf",
            &pf,
            "--vfs",
            "1",
            "--runs",
            "2",
            "--mode",
            "floor,pause,detach",
            "--vmm",
            "svff-vmm,qemu-stock,qemu",
            "--json",
            out_json.to_str().unwrap(),
            "--plot",
            out_svg.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "svff bench failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for want in [
        "Table I",
        "Table II",
        "Guest view",
        "pause/svff-vmm",
        "detach/qemu-stock",
        "pause/qemu",
        "detach reference: detach/qemu-stock",
        "floor",
    ] {
        assert!(stdout.contains(want), "stdout lacks {want:?}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bench: pause/svff-vmm 1 VF: run 2/2"),
        "a progress line per run"
    );

    let doc = json(&out_json);
    assert_eq!(doc["format_version"], 1);
    assert_eq!(doc["pf"], pf.as_str());
    assert_eq!(doc["series"].as_array().unwrap().len(), 6, "{doc}");
    let floor = series(&doc, "floor", "none");
    let pause = series(&doc, "pause", "svff-vmm");
    let detach = series(&doc, "detach", "svff-vmm");
    let stock = series(&doc, "detach", "qemu-stock");
    let qpause = series(&doc, "pause", "qemu");
    let qdetach = series(&doc, "detach", "qemu");
    for s in [floor, pause, detach, stock, qpause, qdetach] {
        assert_series_shape(s, 1);
    }
    for s in [stock, qdetach] {
        let d = step_names(s);
        for want in ["remove_vf", "change_numvfs", "bind_vfs", "add_vf"] {
            assert!(d.contains(&want.to_owned()), "{d:?}");
        }
        assert!(
            s["runs"][0]["guest"].as_array().unwrap().is_empty(),
            "no counters from an L2 Linux"
        );
    }
    // The L2 Linux guests' own view: on pci-pf-stub (offline VFs) no driver;
    // the detached VF vanished from the guest in every run and came back,
    // the paused one never left.
    for (s, vanished) in [(stock, true), (qdetach, true), (qpause, false)] {
        for r in s["runs"].as_array().unwrap() {
            let l2 = &r["l2"];
            assert_eq!(l2["vm"], "qemu0", "{r}");
            assert_eq!(l2["driver"], Value::Null, "{r}");
            assert_eq!(l2["vanished"], vanished, "{r}");
            assert!(l2["back_ms"].is_number(), "the VF was back: {r}");
        }
        assert_eq!(s["summary"]["l2_driver"], "none", "{s}");
        assert_eq!(s["summary"]["l2_not_back"], 0, "{s}");
    }
    assert!(
        pause["runs"][0].get("l2").is_none(),
        "no L2 view without a QEMU guest"
    );
    assert!(stdout.contains("L2 guest view"), "stdout lacks the L2 view");
    let q = step_names(qpause);
    for want in [
        "pause",
        "change_numvfs",
        "bind_vfs",
        "unpause",
        "pause.vmm",
        "unpause.vmm",
    ] {
        assert!(
            q.contains(&want.to_owned()),
            "the patched QEMU pauses and times itself: {q:?}"
        );
    }
    assert_eq!(
        step_names(floor),
        ["bind_vfs", "change_numvfs", "pause", "unpause"]
    );
    let p = step_names(pause);
    for want in ["pause", "change_numvfs", "bind_vfs", "unpause"] {
        assert!(p.contains(&want.to_owned()), "{p:?}");
    }
    let d = step_names(detach);
    for want in ["remove_vf", "change_numvfs", "bind_vfs", "add_vf"] {
        assert!(d.contains(&want.to_owned()), "{d:?}");
    }
    // The guests' view: the paused device stayed, the detached one vanished each time.
    for r in pause["runs"].as_array().unwrap() {
        let g = &r["guest"][0];
        assert_eq!(g["vm"], "vm0", "{r}");
        assert_eq!(
            g["disappeared"], false,
            "pause: the guest keeps the device: {r}"
        );
        assert!(g["samples"].as_u64().unwrap() >= 2, "{r}");
    }
    assert_eq!(pause["summary"]["guest_disappeared"], 0);
    assert_eq!(detach["summary"]["guest_disappeared"], 2, "{detach}");
    assert!(floor["runs"][0]["guest"].as_array().unwrap().is_empty());
    // Table I: a row per series, compared with stock QEMU's detach and the floor.
    let t = doc["table_i"].as_array().unwrap();
    assert_eq!(t.len(), 6);
    let prow = t
        .iter()
        .find(|r| r["mode"] == "pause" && r["vmm"] == "svff-vmm")
        .unwrap();
    assert!(
        prow["floor_ratio"].is_number() && prow["overhead_pct"].is_number(),
        "{prow}"
    );
    let srow = t.iter().find(|r| r["vmm"] == "qemu-stock").unwrap();
    assert_eq!(
        srow["overhead_pct"], 0.0,
        "stock QEMU's detach is the reference: {srow}"
    );
    assert_eq!(doc["reference"], "qemu-stock");
    assert_eq!(doc["paper_table_i"].as_array().unwrap().len(), 4);

    let svg = fs::read_to_string(&out_svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("(paper, CITS 2023 Table I"));
    // The report re-renders from the JSON alone.
    let again = svff(&["bench", "--report", out_json.to_str().unwrap()]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("Table II"));

    assert_eq!(numvfs(&pf), 0, "the bench leaves the PF without VFs");
    release(&pf);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_bench_pool_mode_changes_vf_resources_without_a_count_change_and_no_guest_loses_its_vf() {
    let (pf, dir) = setup();
    let out_json = dir.path().join("bench.json");
    let out = svff(&[
        "bench",
        "--pf",
        &pf,
        "--profile",
        "nvme",
        "--vfs",
        "1",
        "--runs",
        "2",
        "--mode",
        "pool",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "svff bench --mode pool failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("pool/svff-vmm") && stdout.contains("resources ms"),
        "Table I/II show the pool series and its resources step"
    );
    let doc = json(&out_json);
    assert_eq!(doc["profile"], "nvme");
    assert_eq!(doc["series"].as_array().unwrap().len(), 1, "{doc}");
    let pool = series(&doc, "pool", "svff-vmm");
    assert_series_shape(pool, 1);
    let steps = step_names(pool);
    for want in ["pause", "resources", "unpause"] {
        assert!(steps.contains(&want.to_owned()), "pool steps {steps:?}");
    }
    assert!(
        !steps.contains(&"change_numvfs".to_owned()),
        "pool mode never changes the count: {steps:?}"
    );
    for r in pool["runs"].as_array().unwrap() {
        let g = &r["guest"][0];
        assert_eq!(g["vm"], "vm0", "{r}");
        assert_eq!(g["disappeared"], false, "pool: the guest keeps its VF: {r}");
    }
    assert_eq!(pool["summary"]["guest_disappeared"], 0, "{pool}");
    assert_eq!(numvfs(&pf), 0, "the bench leaves the PF without VFs");
    release(&pf);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_bench_refuses_bad_input_before_the_pf_changes() {
    let (pf, _dir) = setup();
    guest::bind(&pf, "pci-pf-stub");
    set_numvfs(&pf, 2);
    let cases: [(&[&str], &str); 7] = [
        (&["--mode", "pool"], "add --profile nvme"),
        (&["--mode", "pause,turbo"], "unknown mode"),
        (&["--vmm", "xen"], "unknown VMM"),
        (
            &["--vmm", "svff-vmm,qemu", "--qemu", "/nonexistent/qemu"],
            "patched QEMU is not built",
        ),
        (
            &[
                "--mode",
                "detach",
                "--vmm",
                "qemu-stock",
                "--l2-kernel",
                "/nonexistent/vmlinuz",
            ],
            "/nonexistent/vmlinuz does not exist",
        ),
        (
            &["--mode", "pool", "--vmm", "qemu-stock", "--profile", "nvme"],
            "has no pause",
        ),
        (
            &["--vfs", "64"],
            "supports at most 64 VFs, and svff bench needs 65",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["bench", "--pf", &pf, "--runs", "1"];
        args.extend_from_slice(extra);
        let out = svff(&args);
        assert_eq!(out.status.code(), Some(1), "{extra:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want),
            "{extra:?}: stderr lacks {want:?}: {err}"
        );
        assert!(!err.contains("bench: "), "{extra:?}: no run started: {err}");
        assert_eq!(numvfs(&pf), 2, "{extra:?}: the PF is untouched");
    }
    release(&pf);
}

/// Boot deadline of the L2 (`SVFF_LAB_L2_BOOT_DEADLINE` seconds, default 180).
fn boot_deadline() -> Duration {
    Duration::from_secs(
        std::env::var("SVFF_LAB_L2_BOOT_DEADLINE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(180),
    )
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn lab_bench_detach_mode_on_a_configured_stock_qemu_guest() {
    let (pf, dir) = setup();
    let qmp: PathBuf = dir.path().join("vm1.qmp");
    let qemu = Qemu::stock()
        .arg("-qmp")
        .arg(&format!("unix:{},server=on,wait=off", qmp.display()))
        .device("pcie-root-port,id=svffrp0,bus=pcie.0,chassis=20,slot=20")
        .device("pcie-root-port,id=svffrp1,bus=pcie.0,chassis=21,slot=21");
    let initrd = Image::new().build().expect("build the L2 image");
    let mut vm = L2::boot(&qemu, &initrd, boot_deadline()).unwrap_or_else(|e| panic!("{e}"));
    let config = dir.path().join("helper.toml");
    fs::write(
        &config,
        format!(
            "allowed_uids = [0]\nstate_dir = \"{}\"\n[[pf]]\nbdf = \"{pf}\"\nprofile = \"pci-pf-stub\"\n\
             [[vm]]\nname = \"vm1\"\nkind = \"qmp\"\nqmp = \"{}\"\n\
             hotplug_ports = [\"svffrp0\", \"svffrp1\"]\ndetach_timeout_s = 30\n",
            dir.path().join("state").display(),
            qmp.display()
        ),
    )
    .unwrap();
    let out_json = dir.path().join("bench.json");
    let cfg = config.display().to_string();
    let out = svff(&[
        "--config",
        &cfg,
        "bench",
        "--vmm",
        "qemu-stock",
        "--mode",
        "detach,floor",
        "--vfs",
        "1",
        "--runs",
        "2",
        "--json",
        out_json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "svff bench on stock QEMU failed");
    let doc = json(&out_json);
    assert_eq!(doc["format_version"], 1);
    let detach = series(&doc, "detach", "qemu-stock");
    assert_series_shape(detach, 1);
    let d = step_names(detach);
    for want in ["remove_vf", "change_numvfs", "bind_vfs", "add_vf"] {
        assert!(d.contains(&want.to_owned()), "{d:?}");
    }
    assert!(
        detach["runs"][0]["guest"].as_array().unwrap().is_empty(),
        "no test guest counters from a Linux guest"
    );
    assert_series_shape(series(&doc, "floor", "none"), 1);
    assert_eq!(doc["reference"], "qemu-stock");
    let script = "i=0; while [ $i -lt 60 ]; do n=0; for d in /sys/bus/pci/devices/*; do \
                  [ \"$(cat $d/vendor)$(cat $d/device)\" = 0x1b360x0010 ] && n=$((n+1)); done; \
                  [ $n -eq 1 ] && break; sleep 1; i=$((i+1)); done; echo $n";
    let seen = vm
        .sh_ok(script, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        seen.trim(),
        "1",
        "the guest has its one VF back after the runs"
    );
    // Leave the configured set-up as found: no VF in the guest, none on the PF.
    let out = svff(&[
        "--direct", "--config", &cfg, "reconf", "--pf", &pf, "--vfs", "0", "--mode", "detach",
    ]);
    assert!(out.status.success(), "cleanup reconf to 0");
    drop(vm);
    release(&pf);
}
