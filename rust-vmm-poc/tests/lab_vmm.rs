//! svff-vmm on KVM inside L1 (nested KVM over L0's emulated SVM), so it runs the same on every
//! machine that runs the lab, with or without a /dev/kvm of its own. Every check reads what the
//! guest itself wrote to its serial port, or how the VM ended.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use svff_lab::guest;
use svff_vmm::{
    parse_counters, DevFn, ExitReason, GuestCounters, GuestImage, RunState, SerialOutput,
    TestGuest, Vm, VmConfig, TEST_DEVICE_ID,
};

fn kvm_ready() {
    guest::require_lab();
    guest::modprobe("kvm-amd");
}

/// A serial sink the test can read.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// 32-bit code: print `s` on COM1.
fn print(s: &str) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in s.bytes() {
        c.extend([0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    c
}

/// 32-bit code: write `code` to the debug exit port, then halt forever.
fn debug_exit(code: u8) -> Vec<u8> {
    vec![0x66, 0xba, 0x01, 0x05, 0xb0, code, 0xee, 0xf4, 0xeb, 0xfd]
}

fn run_raw(code: Vec<u8>, cpus: u8) -> (Result<ExitReason, svff_vmm::Error>, String) {
    let cap = Capture::default();
    let vm = Vm::new(VmConfig {
        cpus,
        serial: SerialOutput::Writer(Box::new(cap.clone())),
        guest: GuestImage::Raw(code),
        ..Default::default()
    })
    .expect("build the VM");
    (vm.run(), cap.text())
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn vcpu_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("svff-vcpu"))
        .count()
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn protected_mode_guest_prints_on_com1_and_ends_the_vm_through_the_debug_exit_port() {
    kvm_ready();
    let mut code = print("hello from svff-vmm\n");
    code.extend(debug_exit(42));
    let (reason, out) = run_raw(code, 1);
    assert_eq!(reason.unwrap(), ExitReason::DebugExit(42));
    assert_eq!(out, "hello from svff-vmm\n");
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn i8042_reset_command_ends_the_vm_as_a_guest_reset() {
    kvm_ready();
    let mut code = print("resetting\n");
    code.extend([0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]); // mov al, 0xfe; out 0x64, al; hlt
    let (reason, out) = run_raw(code, 1);
    assert_eq!(reason.unwrap(), ExitReason::GuestReset);
    assert_eq!(out, "resetting\n");
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn a_triple_fault_ends_the_vm_as_a_guest_shutdown() {
    kvm_ready();
    // ud2 with an empty IDT: #UD -> #GP -> #DF -> triple fault -> KVM_EXIT_SHUTDOWN.
    let mut code = print("faulting\n");
    code.extend([0x0f, 0x0b]);
    let (reason, out) = run_raw(code, 1);
    assert_eq!(reason.unwrap(), ExitReason::GuestShutdown);
    assert_eq!(out, "faulting\n");
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn pause_parks_every_vcpu_thread_and_quit_joins_them_all_and_closes_every_fd() {
    kvm_ready();
    let fds_before = fd_count();
    assert_eq!(vcpu_threads(), 0);
    let vm = Vm::new(VmConfig {
        cpus: 3,
        serial: SerialOutput::Null,
        guest: GuestImage::Raw(vec![0xeb, 0xfe]), // jmp $
        ..Default::default()
    })
    .unwrap();
    let h = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    // pause() returns once all three vCPU threads are up and parked.
    h.pause().expect("pause");
    assert_eq!(h.state(), RunState::Paused);
    assert_eq!(vcpu_threads(), 3, "one thread per vCPU");
    h.resume();
    assert_eq!(h.state(), RunState::Running);
    h.pause().expect("pause again");
    h.resume();
    h.request_exit(ExitReason::Quit);
    assert_eq!(runner.join().unwrap().unwrap(), ExitReason::Quit);
    assert_eq!(vcpu_threads(), 0, "every vCPU thread joined");
    assert_eq!(fd_count(), fds_before, "every fd of the VM closed");
}

fn test_guest_vm(test_devices: u8, guest: TestGuest) -> (Vm, Capture) {
    let cap = Capture::default();
    let vm = Vm::new(VmConfig {
        serial: SerialOutput::Writer(Box::new(cap.clone())),
        guest: GuestImage::Test(guest),
        test_devices,
        ..Default::default()
    })
    .expect("build the VM");
    (vm, cap)
}

/// The last complete counter line of `dev` (a line still being printed is ignored).
fn last_counters_opt(out: &str, dev: &str) -> Option<GuestCounters> {
    let complete = &out[..out.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .rev()
        .filter_map(parse_counters)
        .find(|c| c.dev == dev)
}

fn last_counters(out: &str, dev: &str) -> GuestCounters {
    last_counters_opt(out, dev).unwrap_or_else(|| panic!("no counter line for {dev} in:\n{out}"))
}

/// Waits (bounded) until the guest's output satisfies `cond`.
fn wait_output(cap: &Capture, what: &str, cond: impl Fn(&str) -> bool) {
    let end = Instant::now() + Duration::from_secs(60);
    while !cond(&cap.text()) {
        assert!(
            Instant::now() < end,
            "guest never printed {what}:\n{}",
            cap.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn test_guest_enumerates_bus_0_and_reads_every_test_device_bar0_validly() {
    kvm_ready();
    let (vm, cap) = test_guest_vm(
        2,
        TestGuest {
            rounds: 50,
            report_every: 25,
            ..Default::default()
        },
    );
    assert_eq!(vm.run().unwrap(), ExitReason::DebugExit(0));
    let out = cap.text();
    println!("{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "svff-guest: start");
    assert_eq!(
        &lines[1..8],
        &[
            "svff-guest: found 00:00.0 vendor=1b36 device=0008 class=060000",
            "svff-guest: found 00:01.0 vendor=1234 device=5ff0 class=ff0000",
            "svff-guest: found 00:02.0 vendor=1234 device=5ff0 class=ff0000",
            "svff-guest: enumerated 3 functions, 2 targets",
            // COM1's IRQ 4: vm-superio -> eventfd -> KVM irqfd -> in-kernel PIC -> LINT0.
            "svff-guest: serial irqs=1",
            "svff-guest: dev=00:01.0 msix vector=64",
            "svff-guest: dev=00:02.0 msix vector=65",
        ]
    );
    for dev in ["00:01.0", "00:02.0"] {
        let c = last_counters(&out, dev);
        assert_eq!(c.round, 50);
        assert_eq!(c.reads, 100, "two reads per round: {c:?}");
        assert_eq!((c.ok, c.ones, c.gone, c.back), (100, 0, 0, 0), "{c:?}");
        assert_eq!(c.id, TEST_DEVICE_ID);
        assert!(c.max_tsc > 0, "a BAR read that exits to the VMM takes time");
        // One doorbell per round, each delivered as MSI-X through a GSI route and irqfd
        // before the guest's next instruction.
        assert_eq!(c.irqs, 50, "{c:?}");
    }
    assert_eq!(
        out.lines()
            .filter_map(parse_counters)
            .filter(|c| c.dev == "00:01.0")
            .count(),
        2,
        "a report every 25 rounds"
    );
    assert_eq!(lines.last(), Some(&"svff-guest: done rounds=50"));
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn test_guest_notices_a_function_leaving_config_space_and_coming_back() {
    kvm_ready();
    let (vm, cap) = test_guest_vm(
        1,
        TestGuest {
            rounds: 0,
            report_every: 20,
            ..Default::default()
        },
    );
    let h = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let df = DevFn::new(1, 0).unwrap();
    wait_output(&cap, "a first report", |o| {
        o.contains("svff-guest: dev=00:01.0 round=")
    });
    h.set_device_present(df, false).unwrap();
    wait_output(&cap, "event=gone", |o| o.contains("dev=00:01.0 event=gone"));
    h.set_device_present(df, true).unwrap();
    wait_output(&cap, "event=back", |o| o.contains("dev=00:01.0 event=back"));
    wait_output(&cap, "a report after the return", |o| {
        last_counters_opt(o, "00:01.0").is_some_and(|c| c.back == 1)
    });
    h.request_exit(ExitReason::Quit);
    assert_eq!(runner.join().unwrap().unwrap(), ExitReason::Quit);
    let out = cap.text();
    let c = last_counters(&out, "00:01.0");
    assert_eq!((c.gone, c.back), (1, 1), "{c:?}");
    // A hidden function is skipped, not read; only the (at most two) reads of the round in
    // which it vanished, after its config check, can see all-ones.
    assert!(c.ones <= 2, "{c:?}");
    assert_eq!(c.id, TEST_DEVICE_ID, "valid reads after the return");
}

/// Polls `cond` (bounded) until it holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn svff_vmm_serves_qmp_and_quit_ends_the_process_cleanly() {
    use qmp_ext::Client;
    use serde_json::json;
    use std::os::fd::AsFd;

    kvm_ready();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let serial = dir.path().join("serial.log");
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_svff-vmm"))
            .args([
                "--cpus",
                "2",
                "--test-devices",
                "1",
                "--guest-report-every",
                "20",
            ])
            .arg("--qmp")
            .arg(&sock)
            .arg(format!("--serial=file:{}", serial.display()))
            .spawn()
            .expect("spawn svff-vmm"),
    );
    let pid = child.0.id();
    wait_until("the QMP socket", || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let mut qmp = Client::connect(&sock, Duration::from_secs(10)).expect("QMP connect");
    let guest_out = || std::fs::read_to_string(&serial).unwrap_or_default();
    wait_until("a counter report", || {
        guest_out().contains("svff-guest: dev=00:01.0 round=")
    });

    assert_eq!(
        qmp.execute("query-status", None).unwrap(),
        json!({"running": true, "status": "running"})
    );
    qmp.execute("stop", None).unwrap();
    qmp.wait_event("STOP", Duration::from_secs(10)).unwrap();
    assert_eq!(
        qmp.execute("query-status", None).unwrap()["status"],
        "paused"
    );
    qmp.execute("cont", None).unwrap();
    qmp.wait_event("RESUME", Duration::from_secs(10)).unwrap();
    assert_eq!(qmp.execute("query-status", None).unwrap()["running"], true);
    assert!(qmp.execute("query-status", Some(json!({"x": 1}))).is_err());
    assert!(qmp.execute("no-such-command", None).is_err());

    // getfd / closefd with a descriptor passed over SCM_RIGHTS.
    let f = std::fs::File::open("/dev/null").unwrap();
    qmp.send_fd("nullfd", f.as_fd()).unwrap();
    qmp.execute("closefd", Some(json!({"fdname": "nullfd"})))
        .unwrap();
    assert!(qmp
        .execute("closefd", Some(json!({"fdname": "nullfd"})))
        .is_err());

    // The guest sees a hidden function vanish from config space and return.
    qmp.execute(
        "x-svff-set-present",
        Some(json!({"device": "00:01.0", "present": false})),
    )
    .unwrap();
    wait_until("event=gone", || {
        guest_out().contains("dev=00:01.0 event=gone")
    });
    qmp.execute(
        "x-svff-set-present",
        Some(json!({"device": "00:01.0", "present": true})),
    )
    .unwrap();
    wait_until("event=back", || {
        guest_out().contains("dev=00:01.0 event=back")
    });
    wait_until("a report after the return", || {
        last_counters_opt(&guest_out(), "00:01.0").is_some_and(|c| c.back == 1)
    });
    assert!(qmp
        .execute(
            "x-svff-set-present",
            Some(json!({"device": "00:09.0", "present": false}))
        )
        .is_err());

    // Garbage and a client that disconnects mid-command leave the VMM serving.
    {
        use std::io::Write;
        let mut raw = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        raw.write_all(b"\xff\xfe{garbage\n{\"execute\": \"qmp_capab")
            .unwrap();
    }
    assert_eq!(qmp.execute("query-status", None).unwrap()["running"], true);

    qmp.execute("quit", None).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "svff-vmm still running after quit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "quit exits 0");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "no process left"
    );
    assert!(!sock.exists(), "the QMP socket is removed");
    let out = guest_out();
    let c = last_counters(&out, "00:01.0");
    assert_eq!((c.gone, c.back), (1, 1), "{c:?} in:\n{out}");
    assert!(
        c.ones <= 2,
        "all-ones only in the round the function vanished: {c:?}"
    );
}
