//! Lab tests of the `svff` CLI and helper daemon on the real kernel in L1 (see
//! the svff-lab crate): the igb PF (igb driver: 7 VFs; pci-pf-stub: 8) and the
//! nvme PF (pci-pf-stub: 64 VFs). Each test puts the PFs in the state it needs
//! and leaves them with 0 VFs.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};
use svff_lab::guest::{dev_path as dev, igb_pf, modprobe, nvme_pf, read_attr};

const SVFF: &str = env!("CARGO_BIN_EXE_svff");
/// Upper bound of one CLI call (64 VFs under TCG take seconds, not minutes).
const CALL_TIMEOUT_S: &str = "180";

/// Runs a command under `timeout(1)` so that no call can hang the run.
fn run(prefix: &[&str], args: &[&str]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg(CALL_TIMEOUT_S).args(prefix).args(args);
    let out = cmd.output().expect("run timeout(1)");
    eprintln!(
        "$ {} {}\n{}{}",
        prefix.join(" "),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn svff(args: &[&str]) -> Output {
    run(&[SVFF], args)
}

fn svff_ok_json(args: &[&str]) -> Value {
    let out = svff(args);
    assert!(
        out.status.success(),
        "svff {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("svff printed JSON")
}

fn attr(bdf: &str, name: &str) -> String {
    read_attr(dev(bdf).join(name))
}

fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()
        .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
}

fn numvfs(bdf: &str) -> u16 {
    attr(bdf, "sriov_numvfs").parse().unwrap()
}

/// The VFs of a PF read straight from its virtfnN links, in index order.
fn sysfs_vfs(pf: &str) -> Vec<(u16, String)> {
    let mut vfs: Vec<(u16, String)> = fs::read_dir(dev(pf))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let index = name.strip_prefix("virtfn")?.parse().ok()?;
            Some((index, link_name(&dev(pf).join(&name)).unwrap()))
        })
        .collect();
    vfs.sort();
    vfs
}

/// What `svff status --json` must say about `pf`, built from sysfs without the crate.
fn sysfs_view(pf: &str) -> Value {
    let vfs: Vec<Value> = sysfs_vfs(pf)
        .into_iter()
        .map(|(index, vf)| {
            json!({
                "index": index,
                "bdf": vf,
                "vendor": attr(&vf, "vendor"),
                "device": attr(&vf, "device"),
                "driver": link_name(&dev(&vf).join("driver")),
                "iommu_group": link_name(&dev(&vf).join("iommu_group")).map(|g| g.parse::<u32>().unwrap()),
                "holder": null,
                "held_by": null,
                // igb and nvme are not svff FPGA functions: no BAR is read.
                "fpga": null,
            })
        })
        .collect();
    json!({
        "bdf": pf,
        "vendor": attr(pf, "vendor"),
        "device": attr(pf, "device"),
        "driver": link_name(&dev(pf).join("driver")),
        "totalvfs": attr(pf, "sriov_totalvfs").parse::<u16>().unwrap(),
        "numvfs": numvfs(pf),
        "drivers_autoprobe": attr(pf, "sriov_drivers_autoprobe") != "0",
        "vfs": vfs,
        "fpga": null,
    })
}

fn assert_all_vfs_on(pf: &str, driver: &str, n: u16) {
    assert_eq!(numvfs(pf), n, "sriov_numvfs of {pf}");
    let vfs = sysfs_vfs(pf);
    assert_eq!(vfs.len(), usize::from(n), "virtfn links of {pf}");
    for (_, vf) in vfs {
        assert_eq!(
            link_name(&dev(&vf).join("driver")).as_deref(),
            Some(driver),
            "driver of VF {vf}"
        );
        let group = link_name(&dev(&vf).join("iommu_group")).expect("VF has an IOMMU group");
        assert!(
            Path::new("/dev/vfio").join(&group).exists(),
            "/dev/vfio/{group} for {vf}"
        );
    }
}

fn print_steps(report: &Value) {
    let steps: Vec<String> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}={:.1}ms",
                s["name"].as_str().unwrap(),
                s["ms"].as_f64().unwrap()
            )
        })
        .collect();
    eprintln!(
        "measure: {} {} -> {}: {}",
        report["pf"],
        report["from"],
        report["to"],
        steps.join(" ")
    );
}

/// Writes 0 to both PFs' `sriov_numvfs` when dropped, whatever the test did.
struct ZeroVfsOnDrop;

impl Drop for ZeroVfsOnDrop {
    fn drop(&mut self) {
        for pf in [igb_pf(), nvme_pf()] {
            let path = dev(&pf).join("sriov_numvfs");
            if fs::read_to_string(&path)
                .map(|s| s.trim() != "0")
                .unwrap_or(false)
            {
                if let Err(e) = fs::write(&path, "0") {
                    eprintln!("cleanup: writing 0 to {} failed: {e}", path.display());
                }
            }
        }
    }
}

fn setup() -> ZeroVfsOnDrop {
    for m in ["vfio-pci", "pci-pf-stub", "igb"] {
        modprobe(m);
    }
    let guard = ZeroVfsOnDrop;
    for pf in [igb_pf(), nvme_pf()] {
        let path = dev(&pf).join("sriov_numvfs");
        if numvfs(&pf) != 0 {
            fs::write(&path, "0").expect("reset sriov_numvfs");
        }
    }
    guard
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn igb_pf_on_igb_gets_1_4_7_vfs_on_vfio_pci_in_both_directions() {
    let _guard = setup();
    let pf = igb_pf();
    for n in [1u16, 4, 7, 4, 1, 7, 0] {
        let report = svff_ok_json(&[
            "--direct",
            "vfs",
            "set",
            "--pf",
            &pf,
            &n.to_string(),
            "--pf-driver",
            "igb",
            "--bind",
            "vfio-pci",
            "--json",
        ]);
        print_steps(&report);
        assert_eq!(report["to"], n);
        assert_eq!(attr(&pf, "sriov_totalvfs"), "7");
        assert_eq!(link_name(&dev(&pf).join("driver")).as_deref(), Some("igb"));
        assert_all_vfs_on(&pf, "vfio-pci", n);
        assert_eq!(report["status"], sysfs_view(&pf));
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn nvme_pf_on_pci_pf_stub_gets_64_vfs_on_vfio_pci_and_back_down() {
    let _guard = setup();
    let pf = nvme_pf();
    for n in [64u16, 8, 0] {
        let report = svff_ok_json(&[
            "--direct",
            "vfs",
            "set",
            "--pf",
            &pf,
            &n.to_string(),
            "--pf-driver",
            "pci-pf-stub",
            "--bind",
            "vfio-pci",
            "--json",
        ]);
        print_steps(&report);
        assert_eq!(
            link_name(&dev(&pf).join("driver")).as_deref(),
            Some("pci-pf-stub")
        );
        assert_all_vfs_on(&pf, "vfio-pci", n);
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn igb_pf_on_pci_pf_stub_offers_8_vfs() {
    let _guard = setup();
    let pf = igb_pf();
    let report = svff_ok_json(&[
        "--direct",
        "vfs",
        "set",
        "--pf",
        &pf,
        "8",
        "--pf-driver",
        "pci-pf-stub",
        "--bind",
        "vfio-pci",
        "--json",
    ]);
    print_steps(&report);
    assert_eq!(attr(&pf, "sriov_totalvfs"), "8");
    assert_all_vfs_on(&pf, "vfio-pci", 8);
    // Back to its own driver: VFs go through 0 and the PF is rebound to igb.
    let report = svff_ok_json(&[
        "--direct",
        "vfs",
        "set",
        "--pf",
        &pf,
        "2",
        "--pf-driver",
        "igb",
        "--json",
    ]);
    print_steps(&report);
    assert_eq!(link_name(&dev(&pf).join("driver")).as_deref(), Some("igb"));
    assert_eq!(numvfs(&pf), 2);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn more_vfs_than_totalvfs_fails_clearly_and_leaves_the_count() {
    let _guard = setup();
    let pf = igb_pf();
    svff_ok_json(&[
        "--direct",
        "vfs",
        "set",
        "--pf",
        &pf,
        "3",
        "--pf-driver",
        "igb",
        "--json",
    ]);
    let out = svff(&["--direct", "vfs", "set", "--pf", &pf, "8"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("PF {pf} supports at most 7 VFs")),
        "{stderr}"
    );
    assert_eq!(numvfs(&pf), 3);
    assert_eq!(sysfs_vfs(&pf).len(), 3);
    // The kernel's own ERANGE answer, for the record.
    let err = fs::write(dev(&pf).join("sriov_numvfs"), "8").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ERANGE));
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn status_json_reports_exactly_what_sysfs_shows() {
    let _guard = setup();
    let (igb, nvme) = (igb_pf(), nvme_pf());
    svff_ok_json(&[
        "--direct",
        "vfs",
        "set",
        "--pf",
        &igb,
        "4",
        "--pf-driver",
        "igb",
        "--bind",
        "vfio-pci",
        "--json",
    ]);
    svff_ok_json(&[
        "--direct",
        "vfs",
        "set",
        "--pf",
        &nvme,
        "5",
        "--pf-driver",
        "pci-pf-stub",
        "--json",
    ]);
    // Leave one VF unbound on purpose.
    let (_, first) = sysfs_vfs(&igb).remove(0);
    fs::write(dev(&first).join("driver/unbind"), &first).unwrap();
    let status = svff_ok_json(&["--direct", "status", "--json"]);
    assert_eq!(status["format_version"], 1);
    let pfs = status["pfs"].as_array().unwrap();
    let mine: Vec<&Value> = pfs
        .iter()
        .filter(|p| p["bdf"] == igb.as_str() || p["bdf"] == nvme.as_str())
        .collect();
    assert_eq!(mine.len(), 2, "{status}");
    assert_eq!(*mine[0], sysfs_view(&igb));
    assert_eq!(*mine[1], sysfs_view(&nvme));
    assert_eq!(mine[0]["vfs"][0]["driver"], Value::Null);
    let one = svff_ok_json(&["--direct", "status", "--json", "--pf", &nvme]);
    assert_eq!(one["pfs"].as_array().unwrap().len(), 1);
    assert_eq!(one["pfs"][0], sysfs_view(&nvme));
}

/// A daemon started for a test, killed on drop, with its directory.
struct HelperDaemon {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Drop for HelperDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Starts `svff helper` with the socket group 1000, uids 0 and 1000 allowed, and
/// only the igb PF on the allow-list (with `pf_extra` appended to its entry);
/// returns once it says it listens.
fn start_helper(pf_extra: &str) -> HelperDaemon {
    let dir = PathBuf::from(format!("/tmp/svff-lab-helper-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.join("helper.sock");
    let config = dir.join("helper.toml");
    fs::write(
        &config,
        format!(
            "socket = \"{}\"\nsocket_group = \"1000\"\nallowed_uids = [0, 1000]\nallowed_gids = []\n\n[[pf]]\nbdf = \"{}\"\ndriver = \"igb\"\n{pf_extra}\n",
            socket.display(),
            igb_pf()
        ),
    )
    .unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    let mut child = Command::new(SVFF)
        .args(["helper", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start svff helper");
    let stdout = child.stdout.take().unwrap();
    // The daemon's log goes to the test's (captured) output.
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("helper: {line}");
        }
    });
    let daemon = HelperDaemon { child, dir, socket };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("helper did not report listening within 60 s");
    assert!(
        line.starts_with("svff helper listening on"),
        "helper said {line:?}"
    );
    daemon
}

fn as_user(uid: u32, gid: u32, socket: &Path, args: &[&str]) -> Output {
    let reuid = format!("--reuid={uid}");
    let regid = format!("--regid={gid}");
    let sock = socket.to_str().unwrap();
    let mut full = vec!["--socket", sock];
    full.extend_from_slice(args);
    run(
        &["setpriv", &reuid, &regid, "--clear-groups", "--", SVFF],
        &full,
    )
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn daemon_refuses_uids_not_on_its_list_and_serves_allowed_ones() {
    let _guard = setup();
    let pf = igb_pf();
    let helper = start_helper("");
    let sock = helper.socket.to_str().unwrap().to_owned();
    let meta = fs::metadata(&helper.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 1000);

    // root is on the list: changes the count through the daemon.
    let report = svff_ok_json(&[
        "--socket", &sock, "vfs", "set", "--pf", &pf, "2", "--bind", "vfio-pci", "--json",
    ]);
    print_steps(&report);
    assert_all_vfs_on(&pf, "vfio-pci", 2);

    // uid 65534 in the socket's group passes the file mode but not SO_PEERCRED.
    let out = as_user(
        65534,
        1000,
        &helper.socket,
        &["vfs", "set", "--pf", &pf, "0"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("permission denied: uid 65534 gid 1000"),
        "{stderr}"
    );
    assert_eq!(numvfs(&pf), 2);

    // uid 65534 outside the group cannot even connect (socket mode 0660).
    let out = as_user(65534, 65534, &helper.socket, &["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("connect failed"));

    // uid 1000 is on the list: sees the status, and it matches sysfs.
    let out = as_user(1000, 1000, &helper.socket, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["pfs"].as_array().unwrap().len(), 1);
    assert_eq!(status["pfs"][0], sysfs_view(&pf));

    // The allow-list holds: the nvme PF is not on it; too many VFs fail clearly.
    let out = svff(&["--socket", &sock, "vfs", "set", "--pf", &nvme_pf(), "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not on the helper's allow-list"));
    let out = svff(&["--socket", &sock, "vfs", "set", "--pf", &pf, "9"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("PF {pf} supports at most 7 VFs"))
    );
    assert_eq!(numvfs(&pf), 2);

    svff_ok_json(&["--socket", &sock, "vfs", "set", "--pf", &pf, "0", "--json"]);
    assert_eq!(numvfs(&pf), 0);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn program_with_an_external_command_removes_and_rescans_the_pf() {
    let _guard = setup();
    let pf = igb_pf();
    // The "flash tool" records whether the PF was gone while it ran.
    let dir = PathBuf::from(format!("/tmp/svff-lab-flash-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let tool = dir.join("flash.sh");
    let seen = dir.join("seen");
    fs::write(
        &tool,
        format!(
            "#!/bin/sh\nif [ -e {} ]; then echo present > {}; else echo removed > {}; fi\n",
            dev(&pf).display(),
            seen.display(),
            seen.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).unwrap();
    let helper = start_helper(&format!(
        "bitstream = {{ command = [\"{}\"], timeout_s = 60 }}",
        tool.display()
    ));
    let sock = helper.socket.to_str().unwrap().to_owned();
    let report = svff_ok_json(&["--socket", &sock, "vfs", "set", "--pf", &pf, "2", "--json"]);
    assert!(
        report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["name"] != "qdma_profile"),
        "{report}"
    );
    let out = svff_ok_json(&["--socket", &sock, "program", "--pf", &pf]);
    let names: Vec<&str> = out["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "check_in_use",
            "disable_vfs",
            "remove_pf",
            "program",
            "rescan"
        ],
        "{out}"
    );
    eprintln!("measure: program (remove, /bin/sh tool, rescan): {out}");
    assert_eq!(fs::read_to_string(&seen).unwrap().trim(), "removed");
    assert!(dev(&pf).exists(), "PF back after rescan");
    assert_eq!(numvfs(&pf), 0);
    // The PF works again: the daemon can create VFs on it.
    svff_ok_json(&["--socket", &sock, "vfs", "set", "--pf", &pf, "1", "--json"]);
    assert_eq!(numvfs(&pf), 1);
    drop(helper);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn daemon_serves_on_a_systemd_activated_socket() {
    let _guard = setup();
    let dir = PathBuf::from(format!("/tmp/svff-lab-activate-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let activated = dir.join("activated.sock");
    let configured = dir.join("configured.sock");
    let config = dir.join("helper.toml");
    fs::write(
        &config,
        format!(
            "socket = \"{}\"\nallowed_uids = [0]\n[[pf]]\nbdf = \"{}\"\n",
            configured.display(),
            igb_pf()
        ),
    )
    .unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&activated)
        .args([SVFF, "helper", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (package systemd) must be installed");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    // Forward everything it and the daemon log; hand the first line to the test.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("activated: {line}");
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(60));
    let result = std::panic::catch_unwind(|| {
        let line = line.expect("systemd-socket-activate did not start listening within 60 s");
        assert!(line.contains("Listening on"), "{line}");
        let status = svff_ok_json(&["--socket", activated.to_str().unwrap(), "status", "--json"]);
        assert_eq!(status["pfs"][0], sysfs_view(&igb_pf()));
        assert!(
            !configured.exists(),
            "the daemon must use the passed socket, not bind its own"
        );
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = fs::remove_dir_all(&dir);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A child process holding a file open, killed on drop.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn vf_whose_vfio_group_is_held_open_is_not_destroyed() {
    let _guard = setup();
    let pf = igb_pf();
    svff_ok_json(&[
        "--direct",
        "vfs",
        "set",
        "--pf",
        &pf,
        "2",
        "--pf-driver",
        "igb",
        "--bind",
        "vfio-pci",
        "--json",
    ]);
    let (_, vf) = sysfs_vfs(&pf).remove(1);
    let group = link_name(&dev(&vf).join("iommu_group")).unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec 3<>/dev/vfio/{group} && echo open && exec sleep 300"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let holder = Holder(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "open",
        "the holder could not open /dev/vfio/{group}"
    );
    let pid = holder.0.id();
    let status = svff_ok_json(&["--direct", "status", "--json", "--pf", &pf]);
    let held = &status["pfs"][0]["vfs"][1]["held_by"];
    assert_eq!(held["pid"], pid, "{status}");
    assert_eq!(held["comm"], "sleep");
    assert_eq!(held["file"], format!("/dev/vfio/{group}"));
    assert_eq!(status["pfs"][0]["vfs"][0]["held_by"], Value::Null);

    let out = svff(&[
        "--direct", "vfs", "set", "--pf", &pf, "3", "--bind", "vfio-pci",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "VF {vf} is in use: pid {pid} holds /dev/vfio/{group} open"
        )),
        "{stderr}"
    );
    assert_eq!(numvfs(&pf), 2);
    assert_eq!(
        link_name(&dev(&vf).join("driver")).as_deref(),
        Some("vfio-pci")
    );

    drop(holder);
    svff_ok_json(&[
        "--direct", "vfs", "set", "--pf", &pf, "3", "--bind", "vfio-pci", "--json",
    ]);
    assert_all_vfs_on(&pf, "vfio-pci", 3);
}
