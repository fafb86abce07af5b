//! Robustness of svff-vmm with a VF passed through (igb VFs on pci-pf-stub in the lab): a
//! guest that writes anywhere in a paused VF's BAR and config space, a guest that halts or
//! spins with interrupts off, and QMP clients that disconnect mid-command, send garbage or
//! leave passed fds behind. In each case the VMM keeps serving (or ends cleanly on `quit`,
//! exit 0, no process left) and never panics.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qmp_ext::Client;
use serde_json::{json, Value};
use svff_lab::guest::{self, bind, set_numvfs, unbind, vfs_of};
use svff_vmm::parse_counters;

/// The igb PF on pci-pf-stub with `n` VFs on vfio-pci; back to 0 VFs, unbound, on drop.
/// Declare it before the [`Vmm`] so the VMM (holding VFs) ends first.
struct IgbVfs {
    pf: String,
    vfs: Vec<String>,
}

impl IgbVfs {
    fn new(n: u32) -> IgbVfs {
        guest::require_lab();
        guest::modprobe("kvm-amd");
        guest::modprobe("vfio-pci");
        let pf = guest::igb_pf();
        if guest::driver_of(&pf).is_some() {
            set_numvfs(&pf, 0);
        }
        bind(&pf, "pci-pf-stub");
        set_numvfs(&pf, n);
        let vfs = vfs_of(&pf);
        for vf in &vfs {
            bind(vf, "vfio-pci");
        }
        IgbVfs { pf, vfs }
    }

    /// `sriov_numvfs` n -> 0 -> n, the new VFs on vfio-pci.
    fn cycle(&mut self) {
        let n = self.vfs.len() as u32;
        set_numvfs(&self.pf, 0);
        set_numvfs(&self.pf, n);
        self.vfs = vfs_of(&self.pf);
        for vf in &self.vfs {
            bind(vf, "vfio-pci");
        }
    }
}

impl Drop for IgbVfs {
    fn drop(&mut self) {
        for vf in vfs_of(&self.pf) {
            unbind(&vf);
        }
        set_numvfs(&self.pf, 0);
        unbind(&self.pf);
    }
}

/// svff-vmm with the test guest; its serial log, stderr and QMP socket. Killed on drop.
struct Vmm {
    child: Option<Child>,
    serial: PathBuf,
    stderr: PathBuf,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Vmm {
    fn spawn(args: &[String]) -> Vmm {
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        let stderr = dir.path().join("stderr.log");
        let sock = dir.path().join("qmp.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
            .args(args)
            .arg(format!("--serial=file:{}", serial.display()))
            .arg("--qmp")
            .arg(&sock)
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .spawn()
            .unwrap();
        let vmm = Vmm {
            child: Some(child),
            serial,
            stderr,
            sock,
            _dir: dir,
        };
        vmm.wait("the QMP socket listening", &|| {
            std::os::unix::net::UnixStream::connect(&vmm.sock).is_ok()
        });
        vmm
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn out(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn err(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
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
        let end = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}:\nserial:\n{}\nstderr:\n{}",
                self.out(),
                self.err()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn qmp(&self) -> Client {
        Client::connect(&self.sock, Duration::from_secs(30)).unwrap()
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    fn fds(&self) -> usize {
        self.fd_links().len()
    }

    fn fd_links(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .flatten()
            .map(|e| {
                std::fs::read_link(e.path())
                    .map(|l| l.display().to_string())
                    .unwrap_or_default()
            })
            .collect();
        v.sort();
        v
    }

    /// QMP `quit`; asserts exit 0, no process left, no panic on stderr.
    fn quit(&mut self) {
        let pid = self.pid();
        self.qmp().execute("quit", None).unwrap();
        let mut child = self.child.take().unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < end, "svff-vmm still running after quit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = self.err();
        assert_eq!(status.code(), Some(0), "quit exits 0; stderr:\n{err}");
        assert!(!err.contains("panicked"), "no panic:\n{err}");
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "no process left"
        );
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

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn paused_accesses(qmp: &mut Client) -> Value {
    qmp.execute("query-svff-vfio", None).unwrap()[0]["paused-accesses"].clone()
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn a_guest_writing_anywhere_in_a_paused_vfs_bar_and_config_space_leaves_the_vmm_serving() {
    let mut igb = IgbVfs::new(1);
    let mut args = strings(&[
        "--test-devices",
        "0",
        "--guest-report-every",
        "20",
        "--guest-mode",
        "scribble-paused",
    ]);
    args.push(format!("--vfio={},id=vf0,policy=ignore", igb.vfs[0]));
    let mut vmm = Vmm::spawn(&args);
    vmm.wait("first reports", &|| vmm.round() > 0);
    let mut qmp = vmm.qmp();
    qmp.execute("svff-vfio-pause", Some(json!({"id": "vf0"})))
        .unwrap();
    vmm.wait("scribbles over the paused VF", &|| {
        let p = paused_accesses(&mut vmm.qmp());
        p["config-writes"].as_u64() > Some(20) && p["bar-writes"].as_u64() > Some(20)
    });
    igb.cycle();
    // The shadow now holds whatever the guest wrote (BARs, command, capabilities): the
    // unpause restores it onto the new VF, or refuses; either way it answers.
    let r = qmp.execute(
        "svff-vfio-unpause",
        Some(json!({"id": "vf0", "host": igb.vfs[0]})),
    );
    println!("unpause after the scribbles: {r:?}");
    let r2 = qmp.execute("svff-vfio-pause", Some(json!({"id": "vf0"})));
    let r3 = qmp.execute("svff-vfio-unpause", Some(json!({"id": "vf0"})));
    println!("pause again: {r2:?}; unpause again: {r3:?}");
    let info = qmp.execute("query-svff-vfio", None).unwrap();
    println!("{info:#}");
    let r = vmm.round();
    vmm.wait("the guest still running", &|| vmm.round() >= r + 40);
    assert!(vmm.running(), "the VMM runs on:\n{}", vmm.err());
    assert_eq!(
        qmp.execute("query-status", None).unwrap()["status"],
        "running"
    );
    drop(qmp);
    vmm.quit();
    let out = vmm.out();
    assert!(!out.contains("exception"), "{out}");
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn a_guest_that_halts_or_spins_with_interrupts_off_still_pauses_its_vf_and_quits_cleanly() {
    let igb = IgbVfs::new(1);
    for (mode, line) in [
        ("halt", "svff-guest: halting with interrupts off"),
        ("spin", "svff-guest: spinning with interrupts off"),
    ] {
        let mut args = strings(&["--test-devices", "1", "--cpus", "2", "--guest-mode", mode]);
        args.push(format!("--vfio={},id=vf0", igb.vfs[0]));
        let mut vmm = Vmm::spawn(&args);
        vmm.wait(line, &|| vmm.out().contains(line));
        let mut qmp = vmm.qmp();
        qmp.execute("stop", None).unwrap();
        qmp.wait_event("STOP", Duration::from_secs(10)).unwrap();
        qmp.execute("cont", None).unwrap();
        qmp.execute("svff-vfio-pause", Some(json!({"id": "vf0"})))
            .unwrap();
        qmp.execute("svff-vfio-unpause", Some(json!({"id": "vf0"})))
            .unwrap();
        let info = qmp.execute("query-svff-vfio", None).unwrap();
        assert_eq!(info[0]["state"], "attached", "{mode}: {info}");
        assert_eq!(
            qmp.execute("query-status", None).unwrap()["status"],
            "running"
        );
        assert!(vmm.running(), "{mode}: the VMM runs on");
        drop(qmp);
        vmm.quit();
        println!("{mode}: paused, unpaused and quit");
    }
}

/// A raw QMP connection past the capabilities negotiation.
fn raw_session(sock: &std::path::Path) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"QMP\""), "greeting: {line}");
    (&s).write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"return\""), "{line}");
    (s, r)
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn qmp_clients_that_disconnect_mid_command_send_garbage_or_leave_fds_do_not_disturb_the_vmm() {
    use std::os::fd::AsFd;

    let igb = IgbVfs::new(1);
    let mut args = strings(&["--test-devices", "0", "--guest-report-every", "20"]);
    args.push(format!("--vfio={},id=vf0", igb.vfs[0]));
    let mut vmm = Vmm::spawn(&args);
    vmm.wait("first reports", &|| vmm.round() > 0);
    let mut qmp = vmm.qmp();
    let fds0 = vmm.fds();
    let links0 = vmm.fd_links();
    let phase = |what: &str| println!("after {what}: {} fds (at first {fds0})", vmm.fds());

    // A pause whose client is gone before the reply: it completes all the same.
    {
        let (s, _r) = raw_session(&vmm.sock);
        (&s).write_all(b"{\"execute\": \"svff-vfio-pause\", \"arguments\": {\"id\": \"vf0\"}}\n")
            .unwrap();
    }
    vmm.wait("the orphaned pause to complete", &|| {
        vmm.qmp().execute("query-svff-vfio", None).unwrap()[0]["state"] == "paused"
    });
    // The same for an unpause.
    {
        let (s, _r) = raw_session(&vmm.sock);
        (&s).write_all(b"{\"execute\": \"svff-vfio-unpause\", \"arguments\": {\"id\": \"vf0\"}}\n")
            .unwrap();
    }
    vmm.wait("the orphaned unpause to complete", &|| {
        vmm.qmp().execute("query-svff-vfio", None).unwrap()[0]["state"] == "attached"
    });
    phase("orphaned pause and unpause");

    // Garbage: binary, broken JSON, wrong types, a command cut mid-way, 1 MiB without a
    // newline; each on its own connection, most closed without reading.
    let garbage: [&[u8]; 5] = [
        b"\x00\xff\xfe\x01\x02\n",
        b"{\"execute\": }\n{]\n",
        b"{\"execute\": 17, \"arguments\": []}\n{\"execute\": \"svff-vfio-pause\", \"arguments\": {\"id\": 3}}\n",
        b"{\"execute\": \"svff-vfio-unpa",
        &[b'x'; 1 << 20],
    ];
    for g in garbage {
        let (s, mut r) = raw_session(&vmm.sock);
        let _ = (&s).write_all(g);
        let _ = s.shutdown(std::net::Shutdown::Write);
        // Whatever comes back (errors, or the server closing), until EOF.
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
        let text = String::from_utf8_lossy(&rest);
        assert!(!text.contains("\"return\""), "no command ran: {text}");
    }
    phase("garbage");
    // Before the negotiation, too.
    for _ in 0..20 {
        let mut s = UnixStream::connect(&vmm.sock).unwrap();
        let _ = s.write_all(b"{\"execute\": \"quit\"}\n");
    }

    phase("connections before the negotiation");
    // Fds passed with getfd by a client that then goes away are closed with its session.
    for i in 0..5 {
        let mut c = vmm.qmp();
        let f = std::fs::File::open("/dev/null").unwrap();
        c.send_fd(&format!("leak{i}"), f.as_fd()).unwrap();
    }
    phase("getfd and disconnect");
    // qmp-ext's server drops a finished session's socket when it accepts the next one: with
    // one more connection open, the VMM holds exactly one socket more than at first.
    let probe = vmm.qmp();
    let end = Instant::now() + Duration::from_secs(30);
    while vmm.fds() > fds0 + 1 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let links = vmm.fd_links();
    let extra: Vec<&String> = links.iter().filter(|l| !links0.contains(l)).collect();
    assert_eq!(
        links.len(),
        fds0 + 1,
        "no fd of a gone session or getfd left, only the probe's socket: new {extra:?}"
    );
    drop(probe);
    assert!(vmm.running(), "the VMM serves on:\n{}", vmm.err());
    let info = qmp.execute("query-svff-vfio", None).unwrap();
    assert_eq!(info[0]["state"], "attached", "{info}");
    assert_eq!(
        info[0]["pause-count"], 1,
        "the garbage paused nothing: {info}"
    );
    qmp.execute("svff-vfio-pause", Some(json!({"id": "vf0"})))
        .unwrap();
    qmp.execute("svff-vfio-unpause", Some(json!({"id": "vf0"})))
        .unwrap();
    let r = vmm.round();
    vmm.wait("the guest running on", &|| vmm.round() >= r + 40);
    drop(qmp);
    vmm.quit();
}
