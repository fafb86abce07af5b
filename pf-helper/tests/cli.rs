//! Host tests of the `svff` binary that touch no device: help, argument
//! checking, error messages, and the daemon's peer check end to end.

use std::fs;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const SVFF: &str = env!("CARGO_BIN_EXE_svff");

fn svff(args: &[&str]) -> Output {
    Command::new(SVFF).args(args).output().expect("run svff")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_every_command_and_option() {
    let top = stdout(&svff(&["--help"]));
    for word in ["status", "vfs", "program", "helper", "--socket", "--direct"] {
        assert!(top.contains(word), "svff --help lacks {word}:\n{top}");
    }
    let set = stdout(&svff(&["vfs", "set", "--help"]));
    for word in [
        "--pf <BDF>",
        "<COUNT>",
        "--bind <DRIVER>",
        "--pf-driver <DRIVER>",
        "--json",
        "--direct",
    ] {
        assert!(
            set.contains(word),
            "svff vfs set --help lacks {word}:\n{set}"
        );
    }
    let status = stdout(&svff(&["status", "--help"]));
    for word in ["--json", "format_version", "--pf <BDF>"] {
        assert!(
            status.contains(word),
            "svff status --help lacks {word}:\n{status}"
        );
    }
    let helper = stdout(&svff(&["helper", "--help"]));
    assert!(
        helper.contains("--config <PATH>") && helper.contains("SO_PEERCRED"),
        "{helper}"
    );
    assert!(stdout(&svff(&["program", "--help"])).contains("--pf <BDF>"));
}

#[test]
fn malformed_pf_addresses_are_rejected_by_the_cli() {
    for bad in ["0000:0A:00.0", "00:20.0", "0000:01:00.0/..", "0000:+1:00.0"] {
        let out = svff(&["--direct", "vfs", "set", "--pf", bad, "1"]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(
            stderr(&out).contains("invalid PCI address"),
            "{bad}: {}",
            stderr(&out)
        );
    }
    let out = svff(&[
        "vfs",
        "set",
        "--pf",
        "0000:01:00.0",
        "1",
        "--bind",
        "../vfio-pci",
    ]);
    assert!(
        stderr(&out).contains("invalid driver name"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn pf_driver_without_direct_is_a_usage_error() {
    let out = svff(&[
        "--socket",
        "/nonexistent/helper.sock",
        "vfs",
        "set",
        "--pf",
        "0000:01:00.0",
        "1",
        "--pf-driver",
        "igb",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--pf-driver needs --direct"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unreachable_daemon_is_named_in_the_error() {
    let out = svff(&["--socket", "/nonexistent/helper.sock", "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("helper socket /nonexistent/helper.sock: connect failed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn helper_refuses_a_missing_config() {
    let out = svff(&["helper", "--config", "/nonexistent/helper.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("config /nonexistent/helper.toml: cannot stat"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn helper_refuses_peers_whose_uid_is_not_listed() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("helper.sock");
    let config = dir.path().join("helper.toml");
    let me = nix::unistd::getuid().as_raw();
    let other = me.wrapping_add(4242);
    fs::write(
        &config,
        format!(
            "socket = \"{}\"\nallowed_uids = [{other}]\n[[pf]]\nbdf = \"0000:7f:1f.7\"\n",
            socket.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(SVFF)
        .args(["helper", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(30));
    let result = std::panic::catch_unwind(|| {
        let line = line.expect("helper started or exited within 30 s");
        if me == 0 {
            assert!(line.starts_with("svff helper listening on"), "{line:?}");
            let out = svff(&["--socket", socket.to_str().unwrap(), "status"]);
            assert_eq!(out.status.code(), Some(1));
            assert!(
                stderr(&out).contains(&format!("permission denied: uid {me} ")),
                "{}",
                stderr(&out)
            );
        } else {
            // A config not owned by root is refused before anything else.
            assert!(line.is_empty(), "{line:?}");
        }
    });
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    if me != 0 {
        assert!(
            stderr(&output).contains("must be owned by root"),
            "{}",
            stderr(&output)
        );
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("{dir}/svff-helper.socket"))
        .arg(format!("{dir}/svff-helper.service"))
        .output()
        .expect("systemd-analyze (package systemd) must be installed");
    // The only complaint allowed: the binary is not installed on this machine.
    let text = format!("{}{}", stdout(&out), stderr(&out));
    let other: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("/usr/local/bin/svff is not executable"))
        .collect();
    assert!(other.is_empty(), "systemd-analyze verify: {other:#?}");
}

/// A one-shot stand-in for the daemon: answers the first request with `result`.
fn answer_once(
    socket: &std::path::Path,
    result: serde_json::Value,
) -> std::thread::JoinHandle<String> {
    use std::io::Write;
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut request = String::new();
        BufReader::new(&stream).read_line(&mut request).unwrap();
        let response = serde_json::json!({"protocol": 1, "ok": true, "result": result});
        writeln!(&stream, "{response}").unwrap();
        request
    })
}

#[test]
fn status_shows_the_svff_register_window_of_fpga_functions() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("helper.sock");
    let status = serde_json::json!({
        "format_version": 1,
        "pfs": [{
            "bdf": "0000:81:00.0", "vendor": "0x10ee", "device": "0x903f",
            "driver": "qdma-pf", "totalvfs": 64, "numvfs": 2, "drivers_autoprobe": false,
            "fpga": {"bar": 2, "id": "0x53564646", "version": "0x00010000",
                     "function": 0, "is_pf": true, "error": null},
            "vfs": [
                {"index": 0, "bdf": "0000:81:00.4", "vendor": "0x10ee", "device": "0xa03f",
                 "driver": "vfio-pci", "iommu_group": 40, "holder": null, "held_by": null,
                 "fpga": {"bar": 2, "id": "0x53564646", "version": "0x00010000",
                          "function": 4, "is_pf": false, "error": null}},
                {"index": 1, "bdf": "0000:81:00.5", "vendor": "0x10ee", "device": "0xa03f",
                 "driver": null, "iommu_group": 41, "holder": null, "held_by": null,
                 "fpga": {"bar": 2, "id": "0x12345678", "version": null, "function": null,
                          "is_pf": null, "error": "0000:81:00.5 is not an svff function: its ID register reads 0x12345678"}}
            ]
        }]
    });
    let daemon = answer_once(&socket, status.clone());
    let out = svff(&["--socket", socket.to_str().unwrap(), "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(daemon.join().unwrap().trim_end(), r#"{"op":"status"}"#);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("PF 0000:81:00.0 [0x10ee:0x903f] driver qdma-pf"),
        "{text}"
    );
    assert_eq!(
        lines[1],
        "  fpga: svff ID 0x53564646 version 1.0 (0x00010000) function 0 (PF) via BAR2"
    );
    assert!(lines[2].starts_with("  VF 0   0000:81:00.4"), "{text}");
    assert_eq!(
        lines[3],
        "    fpga: svff ID 0x53564646 version 1.0 (0x00010000) function 4 (VF) via BAR2"
    );
    assert_eq!(
        lines[5],
        "    fpga: 0000:81:00.5 is not an svff function: its ID register reads 0x12345678"
    );
    // --json passes the entries through unchanged.
    fs::remove_file(&socket).unwrap();
    let daemon = answer_once(&socket, status.clone());
    let out = svff(&["--socket", socket.to_str().unwrap(), "status", "--json"]);
    daemon.join().unwrap();
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, status);
}
