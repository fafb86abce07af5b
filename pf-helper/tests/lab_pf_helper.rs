//! Lab tests of the `svff` CLI and helper daemon on the real kernel in L1 (see
//! the svff-lab crate): the igb PF (igb driver: 7 VFs; pci-pf-stub: 8) and the
//! nvme PF (pci-pf-stub: 64 VFs). Each test puts the PFs in the state it needs
//! and leaves them with 0 VFs.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod common;

use serde_json::{json, Value};
use svff_lab::guest::{dev_path as dev, igb_pf, modprobe, nvme_pf, read_attr};

/// The `svff` binary the tests run (a copy in L1's RAM).
fn svff_bin() -> &'static str {
    common::svff_in_ram().to_str().unwrap()
}
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
    run(&[svff_bin()], args)
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

/// `svff --direct vfs set --pf <pf> <n> --pf-driver <driver> [--bind <bind>] --json`.
fn vfs_set_direct(pf: &str, n: u16, driver: &str, bind: Option<&str>) -> Value {
    let n = n.to_string();
    let mut args = vec![
        "--direct",
        "vfs",
        "set",
        "--pf",
        pf,
        &n,
        "--pf-driver",
        driver,
    ];
    if let Some(b) = bind {
        args.extend(["--bind", b]);
    }
    args.push("--json");
    svff_ok_json(&args)
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
        let report = vfs_set_direct(&pf, n, "igb", Some("vfio-pci"));
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
        let report = vfs_set_direct(&pf, n, "pci-pf-stub", Some("vfio-pci"));
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
    let report = vfs_set_direct(&pf, 8, "pci-pf-stub", Some("vfio-pci"));
    print_steps(&report);
    assert_eq!(attr(&pf, "sriov_totalvfs"), "8");
    assert_all_vfs_on(&pf, "vfio-pci", 8);
    // Back to its own driver: VFs go through 0 and the PF is rebound to igb.
    let report = vfs_set_direct(&pf, 2, "igb", None);
    print_steps(&report);
    assert_eq!(link_name(&dev(&pf).join("driver")).as_deref(), Some("igb"));
    assert_eq!(numvfs(&pf), 2);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn more_vfs_than_totalvfs_fails_clearly_and_leaves_the_count() {
    let _guard = setup();
    let pf = igb_pf();
    vfs_set_direct(&pf, 3, "igb", None);
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
    vfs_set_direct(&igb, 4, "igb", Some("vfio-pci"));
    vfs_set_direct(&nvme, 5, "pci-pf-stub", None);
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
    start_helper_with("", &[], pf_extra, "", &[])
}

/// [`start_helper`] with `top` (top-level keys) first in the config, these
/// `allowed_gids`, `more` appended after the igb PF's entry and `env` in the
/// daemon's environment.
fn start_helper_with(
    top: &str,
    allowed_gids: &[u32],
    pf_extra: &str,
    more: &str,
    env: &[(&str, &str)],
) -> HelperDaemon {
    let dir = PathBuf::from(format!("/tmp/svff-lab-helper-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.join("helper.sock");
    let config = dir.join("helper.toml");
    fs::write(
        &config,
        format!(
            "{top}socket = \"{}\"\nsocket_group = \"1000\"\nallowed_uids = [0, 1000]\nallowed_gids = {allowed_gids:?}\n\n[[pf]]\nbdf = \"{}\"\ndriver = \"igb\"\n{pf_extra}\n{more}\n",
            socket.display(),
            igb_pf()
        ),
    )
    .unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    let mut child = Command::new(svff_bin())
        .args(["helper", "--config"])
        .arg(&config)
        .envs(env.iter().copied())
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
    common::await_helper_listening(stdout);
    daemon
}

fn as_user(uid: u32, gid: u32, socket: &Path, args: &[&str]) -> Output {
    let reuid = format!("--reuid={uid}");
    let regid = format!("--regid={gid}");
    let sock = socket.to_str().unwrap();
    let mut full = vec!["--socket", sock];
    full.extend_from_slice(args);
    run(
        &[
            "setpriv",
            &reuid,
            &regid,
            "--clear-groups",
            "--",
            svff_bin(),
        ],
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
        .args([svff_bin(), "helper", "--config"])
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
    vfs_set_direct(&pf, 2, "igb", Some("vfio-pci"));
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

/// Hang guard of one raw request to the daemon: it must answer at all, and
/// long before this (it is not a timing requirement of the feature).
const ANSWER_GUARD: Duration = Duration::from_secs(30);

/// Sends one request line to the daemon and returns its response, failing the
/// test if no answer comes within [`ANSWER_GUARD`].
fn raw_request(socket: &Path, line: &str) -> Value {
    let mut s = UnixStream::connect(socket).expect("connect to the helper");
    s.set_read_timeout(Some(ANSWER_GUARD)).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(&s)
        .read_line(&mut answer)
        .unwrap_or_else(|e| panic!("no answer to {line} within {ANSWER_GUARD:?}: {e}"));
    eprintln!("> {line}\n< {}", answer.trim_end());
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad answer {answer:?}: {e}"))
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn daemon_answers_ping_and_status_with_40_half_open_connections() {
    let _guard = setup();
    let helper = start_helper("");
    // Each sends the start of a request, then nothing.
    let stalled: Vec<UnixStream> = (0..40)
        .map(|_| {
            let mut s = UnixStream::connect(&helper.socket).unwrap();
            s.write_all(br#"{"op":"#).unwrap();
            s
        })
        .collect();
    let ping = raw_request(&helper.socket, r#"{"op":"ping"}"#);
    assert_eq!(ping["ok"], true, "{ping}");
    assert_eq!(ping["result"]["version"], env!("CARGO_PKG_VERSION"));
    let status = raw_request(&helper.socket, r#"{"op":"status"}"#);
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["result"]["pfs"][0], sysfs_view(&igb_pf()));
    // A unit request with an unknown field is refused like every other.
    let extra = raw_request(&helper.socket, r#"{"op":"ping","extra":1}"#);
    assert_eq!(extra["error"]["kind"], "protocol", "{extra}");
    drop(stalled);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn daemon_lets_in_a_peer_whose_supplementary_group_is_allowed() {
    let _guard = setup();
    let helper = start_helper_with("", &[2000], "", "", &[]);
    let sock = helper.socket.to_str().unwrap().to_owned();
    let as_groups = |groups: &str| {
        let g = format!("--groups={groups}");
        run(
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                &g,
                "--",
                svff_bin(),
            ],
            &["--socket", &sock, "status", "--json"],
        )
    };
    // Group 1000 owns the socket (so the peer can connect); 2000 is allowed.
    let out = as_groups("1000,2000");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["pfs"][0], sysfs_view(&igb_pf()));
    let out = as_groups("1000");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied: uid 65534 gid 65534"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// VFIO ioctls (linux/vfio.h: _IO(VFIO_TYPE ';', VFIO_BASE 100 + n)).
const VFIO_SET_IOMMU: libc::c_ulong = 0x3b66;
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = 0x3b68;
const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = 0x3b6a;
const VFIO_TYPE1_IOMMU: libc::c_ulong = 1;

/// Opens `vf`'s VFIO device fd the legacy way (container, group,
/// `VFIO_GROUP_GET_DEVICE_FD`), then closes the group and the container: only
/// the device fd remains.
fn vfio_device_fd(vf: &str) -> OwnedFd {
    let rw = |p: &str| {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap_or_else(|e| panic!("open {p}: {e}"))
    };
    let container = rw("/dev/vfio/vfio");
    let group_no = svff_lab::guest::iommu_group(vf);
    let group = rw(&format!("/dev/vfio/{group_no}"));
    let container_fd: libc::c_int = container.as_raw_fd();
    // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int (the container fd) from
    // the pointer, which points to `container_fd` on the stack; both files are open.
    let rc = unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_SET_CONTAINER, &container_fd) };
    assert_eq!(
        rc,
        0,
        "VFIO_GROUP_SET_CONTAINER: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: VFIO_SET_IOMMU takes its argument by value; no memory is passed.
    let rc = unsafe { libc::ioctl(container.as_raw_fd(), VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU) };
    assert_eq!(rc, 0, "VFIO_SET_IOMMU: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(vf).unwrap();
    // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated device name from
    // the pointer, which points to `name`, alive across the call.
    let fd = unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD, name.as_ptr()) };
    assert!(
        fd >= 0,
        "VFIO_GROUP_GET_DEVICE_FD {vf}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    let device = unsafe { OwnedFd::from_raw_fd(fd) };
    drop(group);
    drop(container);
    device
}

fn set_vfs_on_vfio_pci(pf: &str, n: u16) {
    svff_ok_json(&[
        "--direct",
        "vfs",
        "set",
        "--pf",
        pf,
        &n.to_string(),
        "--pf-driver",
        "igb",
        "--bind",
        "vfio-pci",
        "--json",
    ]);
}

/// `svff --direct vfs set --pf <pf> 3 --bind vfio-pci` must refuse because
/// `pid` holds `vf`, with a message naming both and `what`.
fn assert_refused_in_use(pf: &str, vf: &str, pid: u32, what: &str) {
    let out = svff(&[
        "--direct", "vfs", "set", "--pf", pf, "3", "--bind", "vfio-pci",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("VF {vf} is in use: pid {pid} holds")),
        "{stderr}"
    );
    assert!(stderr.contains(what), "{stderr}");
    assert_eq!(numvfs(pf), 2);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn vf_held_only_by_a_vfio_device_fd_or_a_bar_mapping_is_not_destroyed() {
    let _guard = setup();
    let pf = igb_pf();
    set_vfs_on_vfio_pci(&pf, 2);
    let (_, vf) = sysfs_vfs(&pf).remove(1);

    // A child holds only the device fd (its group and container are closed).
    let device = vfio_device_fd(&vf);
    let inherited = nix::unistd::dup(&device).unwrap(); // no FD_CLOEXEC: the child gets it
    let child = Command::new("sleep").arg("300").spawn().unwrap();
    drop(inherited);
    drop(device);
    let holder = Holder(child);
    let pid = holder.0.id();
    // Linux 6.12's fdinfo does not name the device of a VFIO device fd: the
    // check learns it from the group the kernel keeps busy for it.
    assert_refused_in_use(&pf, &vf, pid, "anon_inode:[vfio-device]");
    drop(holder);

    // The device fd in flight in a unix socket: in no process's fd table.
    let held = in_flight(vfio_device_fd(&vf));
    let out = svff(&[
        "--direct", "vfs", "set", "--pf", &pf, "3", "--bind", "vfio-pci",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "VF {vf} is in use: /dev/vfio/{} is held through an fd no process shows",
            svff_lab::guest::iommu_group(&vf)
        )),
        "{stderr}"
    );
    assert_eq!(numvfs(&pf), 2);
    drop(held);

    // This process maps the VF's BAR0 through sysfs.
    let resource = fs::File::open(dev(&vf).join("resource0")).unwrap();
    let len = std::num::NonZeroUsize::new(4096).unwrap();
    // SAFETY: a fresh shared read-only mapping at an address the kernel picks;
    // nothing reads it, and it is unmapped below with the same length.
    let map = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &resource,
            0,
        )
    }
    .expect("mmap the VF's resource0");
    drop(resource);
    assert_refused_in_use(&pf, &vf, std::process::id(), "resource0");
    // SAFETY: `map` is the 4096-byte mapping made above, not used after this.
    unsafe { nix::sys::mman::munmap(map, len.get()) }.unwrap();

    set_vfs_on_vfio_pci(&pf, 3);
    assert_all_vfs_on(&pf, "vfio-pci", 3);
}

/// A VFIO device fd in flight in a unix socket: no process has it in its fd
/// table, so no in-use check can see it, yet the VF stays open until the socket
/// is closed (on drop).
struct InFlight {
    _ends: (UnixStream, UnixStream),
}

fn in_flight(device: OwnedFd) -> InFlight {
    let (a, b) = UnixStream::pair().unwrap();
    let fds = [device.as_raw_fd()];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(b"x")];
    nix::sys::socket::sendmsg::<()>(
        a.as_raw_fd(),
        &iov,
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .expect("send the device fd");
    drop(device);
    InFlight { _ends: (a, b) }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn stuck_sriov_numvfs_write_leaves_ping_and_status_answering() {
    let _guard = setup();
    let pf = igb_pf();
    let nvme = nvme_pf();
    set_vfs_on_vfio_pci(&pf, 2);
    // The in-use check would refuse (it sees the group busy): the debug
    // build's test knob skips it, as a holder opening the VF right after the
    // check would.
    let helper = start_helper_with(
        "watchdog_s = 10\n",
        &[],
        "",
        &format!("[[pf]]\nbdf = \"{nvme}\"\ndriver = \"pci-pf-stub\"\n"),
        &[("SVFF_TEST_SKIP_IN_USE_CHECK", "1")],
    );
    let sock = helper.socket.to_str().unwrap().to_owned();
    let (_, vf) = sysfs_vfs(&pf).remove(1);
    let held = in_flight(vfio_device_fd(&vf));

    // The removal blocks in the kernel until the VF's device is released. The
    // daemon must answer this request by itself (its 10 s watchdog); 90 s is
    // the hang guard of the test.
    let out = run(
        &["timeout", "90", svff_bin()],
        &["--socket", &sock, "vfs", "set", "--pf", &pf, "0"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let answered = out.status.code() != Some(124);
    let checks = std::panic::catch_unwind(|| {
        assert!(answered, "vfs set got no answer within 90 s");
        assert!(!out.status.success());
        assert!(stderr.contains("has not finished"), "{stderr}");
        let ping = raw_request(&helper.socket, r#"{"op":"ping"}"#);
        assert_eq!(ping["ok"], true, "{ping}");
        // The stuck PF's attributes would block a reader too: busy, promptly.
        let st = raw_request(&helper.socket, &format!(r#"{{"op":"status","pf":"{pf}"}}"#));
        assert_eq!(st["error"]["kind"], "busy", "{st}");
        // Another PF's status is read as usual.
        let st = raw_request(
            &helper.socket,
            &format!(r#"{{"op":"status","pf":"{nvme}"}}"#),
        );
        assert_eq!(st["ok"], true, "{st}");
        assert_eq!(st["result"]["pfs"][0], sysfs_view(&nvme));
        let again = raw_request(
            &helper.socket,
            &format!(r#"{{"op":"vfs_set","pf":"{pf}","count":1}}"#),
        );
        assert_eq!(again["error"]["kind"], "busy", "{again}");
    });
    // Release the device: the kernel write completes.
    drop(held);
    if let Err(panic) = checks {
        drop(helper);
        std::panic::resume_unwind(panic);
    }
    // Once the write returned, the PF's status reads again (each try waits up
    // to 2 s for the stuck change to return; the loop is bounded).
    let mut last = Value::Null;
    for _ in 0..20 {
        last = raw_request(&helper.socket, &format!(r#"{{"op":"status","pf":"{pf}"}}"#));
        if last["ok"] == true {
            break;
        }
    }
    assert_eq!(last["ok"], true, "{last}");
    assert_eq!(last["result"]["pfs"][0]["numvfs"], 0);
    assert_eq!(numvfs(&pf), 0);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn vfs_set_direct_loads_the_pf_and_vf_drivers_itself() {
    let _guard = setup();
    let pf = igb_pf();
    let out = run(&["modprobe", "-r"], &["vfio_pci", "igb"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for d in ["igb", "vfio-pci"] {
        assert!(
            !Path::new("/sys/bus/pci/drivers").join(d).exists(),
            "precondition: {d} unloaded"
        );
    }
    let report = vfs_set_direct(&pf, 4, "igb", Some("vfio-pci"));
    print_steps(&report);
    assert_eq!(link_name(&dev(&pf).join("driver")).as_deref(), Some("igb"));
    assert_all_vfs_on(&pf, "vfio-pci", 4);
}
