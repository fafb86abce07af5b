//! svff's patched QEMU in the lab's L1 with KVM: `svff-vfio-pci` on a real
//! igb VF (vfio-pci, intel-iommu, Linux 6.12). Most runs have no guest OS
//! (`-S`): they prove the host side (fds, numvfs cycle, reopen, identity,
//! QMP); one boots an L2 Linux (`svff_lab::l2`) to show what the guest sees.
//! Each test sets up its PFs and leaves their VFs destroyed.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use svff_lab::guest;
use svff_lab::l2::{self, Image, L2};
use svff_pf_helper::{
    DriverName, NvmeResources, PciAddress, RealSysfs, SriovManager, VfsSetOptions,
};
use svff_qemu_lab::{fd_links, qemu_binary, Qemu};

const QMP_TIMEOUT: Duration = Duration::from_secs(60);

/// Put `pf` on pci-pf-stub with `n` VFs and bind VF `which` to vfio-pci.
fn pf_with_vfio_vf(pf: &str, n: u32, which: usize) -> String {
    guest::modprobe("vfio-pci");
    guest::bind(pf, "pci-pf-stub");
    guest::set_numvfs(pf, 0);
    guest::set_numvfs(pf, n);
    let vf = guest::vfs_of(pf)[which].clone();
    bind_vfio(&vf);
    vf
}

fn bind_vfio(vf: &str) {
    guest::write_attr(guest::dev_path(vf).join("driver_override"), "vfio-pci");
    guest::write_attr("/sys/bus/pci/drivers_probe", vf);
    assert_eq!(
        guest::driver_of(vf).as_deref(),
        Some("vfio-pci"),
        "{vf} bound"
    );
}

/// The patched QEMU with KVM, no guest code running, `vf` as `svff-vfio-pci` id `vf0`.
fn start(vf: &str) -> Qemu {
    start_with(&[], vf)
}

/// [`start`] with `extra` arguments before the device.
fn start_with(extra: &[&str], vf: &str) -> Qemu {
    guest::modprobe("kvm_amd");
    let bin = qemu_binary().unwrap_or_else(|e| panic!("{e}"));
    let device = format!("svff-vfio-pci,host={vf},id=vf0");
    let args: Vec<String> = [
        "-S",
        "-accel",
        "kvm",
        "-machine",
        "q35",
        "-cpu",
        "host",
        "-m",
        "256",
        "-L",
        "/usr/share/qemu",
        "-bios",
        "qboot.rom",
    ]
    .iter()
    .chain(extra)
    .chain(&["-device", device.as_str()])
    .map(|s| s.to_string())
    .collect();
    Qemu::start(&bin, &args, QMP_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

fn query(q: &mut Qemu) -> Value {
    let v = q.execute("query-svff-vfio", None).unwrap();
    let list = v.as_array().expect("query-svff-vfio returns a list");
    assert_eq!(list.len(), 1, "one pausable device: {v}");
    list[0].clone()
}

fn pause(q: &mut Qemu) -> Value {
    q.execute("svff-vfio-pause", Some(json!({ "id": "vf0" })))
        .unwrap_or_else(|e| panic!("pause: {e}"))
}

fn unpause(q: &mut Qemu, host: &str) -> Result<Value, (String, String)> {
    q.try_execute(
        "svff-vfio-unpause",
        Some(json!({ "id": "vf0", "host": host })),
    )
}

fn group_node(vf: &str) -> String {
    format!("/dev/vfio/{}", guest::iommu_group(vf))
}

#[test]
#[ignore = "lab: run with `svff-lab test --filter lab_qemu` after `make qemu`"]
fn pause_closes_every_vf_fd_so_numvfs_cycles_and_unpause_reopens_a_new_vf() {
    guest::require_lab();
    let pf = guest::igb_pf();
    let vf = pf_with_vfio_vf(&pf, 2, 0);
    let mut q = start(&vf);

    let info = query(&mut q);
    assert_eq!(info["id"], "vf0");
    assert_eq!(info["state"], "attached");
    assert_eq!(info["host"], vf.as_str());
    assert_eq!(info["pause-count"], 0);
    let fds = q.vf_fds();
    assert!(
        fds.contains(&group_node(&vf)),
        "group fd of {vf} open: {fds:?}"
    );
    assert!(
        fds.iter().any(|l| l.contains("vfio-device")),
        "device fd of {vf} open: {fds:?}"
    );

    let t = pause(&mut q);
    assert!(t["total-ns"].as_u64().unwrap() > 0, "{t}");
    assert!(!t["phases"].as_array().unwrap().is_empty(), "{t}");
    assert_eq!(
        q.vf_fds(),
        Vec::<String>::new(),
        "no fd of the VF after pause"
    );
    let info = query(&mut q);
    assert_eq!(info["state"], "paused");
    assert_eq!(info["pause-count"], 1);
    assert_eq!(info["policy"], "ignore");

    // With an fd of a VF open this write would block in the kernel forever.
    let t0 = Instant::now();
    guest::write_attr(guest::dev_path(&pf).join("sriov_numvfs"), "0");
    let disable = t0.elapsed();
    assert!(guest::vfs_of(&pf).is_empty(), "VFs destroyed");
    guest::write_attr(guest::dev_path(&pf).join("sriov_numvfs"), "2");
    let new_vf = guest::vfs_of(&pf)[1].clone();
    bind_vfio(&new_vf);

    let t = unpause(&mut q, &new_vf).unwrap_or_else(|e| panic!("unpause: {e:?}"));
    assert!(t["total-ns"].as_u64().unwrap() > 0, "{t}");
    let info = query(&mut q);
    assert_eq!(info["state"], "attached");
    assert_eq!(info["host"], new_vf.as_str());
    assert!(info["last-unpause"].is_object(), "{info}");
    let fds = q.vf_fds();
    assert!(
        fds.contains(&group_node(&new_vf)),
        "group of {new_vf}: {fds:?}"
    );

    let states: Vec<String> = q
        .take_events()
        .into_iter()
        .filter(|e| e.name == "SVFF_VFIO_STATE_CHANGED")
        .map(|e| {
            e.data
                .as_ref()
                .and_then(|d| d.get("state"))
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    assert_eq!(states, ["pausing", "paused", "unpausing", "attached"]);
    println!(
        "pause {} ns, sriov_numvfs 2 -> 0 {disable:?}, unpause {} ns",
        info["last-pause"]["total-ns"], info["last-unpause"]["total-ns"]
    );
    assert!(
        q.quit(QMP_TIMEOUT).is_some_and(|s| s.success()),
        "QEMU quits cleanly"
    );
    guest::set_numvfs(&pf, 0);
}

#[test]
#[ignore = "lab: run with `svff-lab test --filter lab_qemu` after `make qemu`"]
fn unpause_onto_a_function_with_other_ids_fails_and_leaves_the_device_paused() {
    guest::require_lab();
    let pf = guest::igb_pf();
    let vf = pf_with_vfio_vf(&pf, 1, 0);
    let other = pf_with_vfio_vf(&guest::nvme_pf(), 1, 0);
    let mut q = start(&vf);
    pause(&mut q);

    let (class, desc) = unpause(&mut q, &other).expect_err("an nvme VF is not the igb VF");
    assert_eq!(class, "GenericError");
    assert!(
        desc.contains(&other) && desc.contains("still paused"),
        "{desc}"
    );
    assert_eq!(query(&mut q)["state"], "paused");
    assert_eq!(
        q.vf_fds(),
        Vec::<String>::new(),
        "the refused VF is closed again"
    );

    unpause(&mut q, &vf).unwrap_or_else(|e| panic!("unpause onto the right VF: {e:?}"));
    assert_eq!(query(&mut q)["state"], "attached");
    assert!(q.quit(QMP_TIMEOUT).is_some_and(|s| s.success()));
    guest::set_numvfs(&pf, 0);
    guest::set_numvfs(&guest::nvme_pf(), 0);
}

#[test]
#[ignore = "lab: run with `svff-lab test --filter lab_qemu` after `make qemu`"]
fn twenty_pause_unpause_cycles_leave_the_fd_count_unchanged() {
    guest::require_lab();
    let pf = guest::igb_pf();
    let vf = pf_with_vfio_vf(&pf, 1, 0);
    let mut q = start(&vf);
    let before = q.fd_links();
    let t0 = Instant::now();
    for i in 0..20 {
        pause(&mut q);
        assert_eq!(
            q.vf_fds(),
            Vec::<String>::new(),
            "cycle {i}: paused, no VF fd"
        );
        unpause(&mut q, &vf).unwrap_or_else(|e| panic!("cycle {i}: {e:?}"));
    }
    let after = q.fd_links();
    println!(
        "20 cycles in {:?}; fds before {} after {}",
        t0.elapsed(),
        before.len(),
        after.len()
    );
    assert_eq!(
        after.len(),
        before.len(),
        "before {before:?}\nafter {after:?}"
    );
    assert_eq!(query(&mut q)["pause-count"], 20);
    assert!(q.quit(QMP_TIMEOUT).is_some_and(|s| s.success()));
    guest::set_numvfs(&pf, 0);
}

/// Deadline for an L2 boot (`SVFF_LAB_L2_BOOT_DEADLINE` seconds, default 300).
fn boot_deadline() -> Duration {
    Duration::from_secs(
        std::env::var("SVFF_LAB_L2_BOOT_DEADLINE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    )
}

const CMD: Duration = Duration::from_secs(60);

/// An L2 Linux (image with `module`) under the patched QEMU that `configure` sets up, with a
/// QMP socket; returns the guest, the socket's path and the directory holding it.
fn boot_patched(
    module: &str,
    configure: impl FnOnce(l2::Qemu) -> l2::Qemu,
) -> (L2, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut vmm = configure(l2::Qemu::stock())
        .arg("-qmp")
        .arg(&format!("unix:{},server=on,wait=off", sock.display()));
    vmm.binary = qemu_binary().unwrap_or_else(|e| panic!("{e}"));
    let initrd = Image::new().module(module).build().expect("L2 image");
    let vm = L2::boot(&vmm, &initrd, boot_deadline()).unwrap_or_else(|e| panic!("{e}"));
    (vm, sock, dir)
}

/// Vendor and device id the guest reads from the device's config space now
/// (not the kernel's cached copy), as "vvvv dddd".
fn guest_config_ids(vm: &mut L2, gbdf: &str) -> String {
    vm.sh_ok(
        &format!("od -An -tx2 -N4 /sys/bus/pci/devices/{gbdf}/config"),
        CMD,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .trim()
    .to_string()
}

/// The guest interface of `gbdf` (igbvf's net device).
fn guest_iface(vm: &mut L2, gbdf: &str) -> String {
    vm.sh_ok(&format!("ls /sys/bus/pci/devices/{gbdf}/net"), CMD)
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .to_string()
}

/// Number of the guest's MSI-X vectors of `gbdf` in /proc/interrupts.
fn guest_msix_vectors(vm: &mut L2, gbdf: &str) -> usize {
    vm.sh_ok("cat /proc/interrupts", CMD)
        .unwrap_or_else(|e| panic!("{e}"))
        .lines()
        .filter(|l| l.contains(&format!("PCI-MSIX-{gbdf}")))
        .count()
}

/// Load igbvf, bring the VF's interface up; returns (interface, MSI-X vectors).
fn igbvf_up(vm: &mut L2, gbdf: &str) -> (String, usize) {
    let out = vm.sh("modprobe igbvf", CMD).unwrap();
    assert!(out.success(), "modprobe igbvf: {out:?}");
    let eth = guest_iface(vm, gbdf);
    assert!(!eth.is_empty(), "igbvf made no net device for {gbdf}");
    let out = vm.sh(&format!("ip link set {eth} up"), CMD).unwrap();
    assert!(out.success(), "ip link set {eth} up: {out:?}");
    let n = guest_msix_vectors(vm, gbdf);
    (eth, n)
}

/// The one igb VF (8086:10ca) the guest sees.
fn guest_igb_vf(vm: &mut L2) -> String {
    let gbdf = vm
        .sh_ok(
            "for d in /sys/bus/pci/devices/*; do [ $(cat $d/vendor):$(cat $d/device) = 0x8086:0x10ca ] && echo ${d##*/}; done; true",
            CMD,
        )
        .unwrap()
        .trim()
        .to_string();
    assert!(
        !gbdf.is_empty() && !gbdf.contains('\n'),
        "one igb VF in L2: {gbdf:?}"
    );
    gbdf
}

/// `pf` with no VFs, unbound (the cleanup of a test that used it).
fn release_pf(pf: &str) {
    guest::set_numvfs(pf, 0);
    guest::unbind(pf);
}

/// The igb PF on its own driver with no VFs and its interface up (the VF's link follows the
/// PF's, and the PF answers igbvf's mailbox only with its interface up).
fn igb_pf_up() -> String {
    guest::modprobe("kvm-amd");
    guest::modprobe("vfio-pci");
    let pf = guest::igb_pf();
    if guest::driver_of(&pf).is_some() {
        guest::set_numvfs(&pf, 0);
    }
    guest::bind(&pf, "igb");
    let net = guest::dev_path(&pf).join("net");
    for e in std::fs::read_dir(&net).unwrap_or_else(|e| panic!("{}: {e}", net.display())) {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let st = std::process::Command::new("ip")
            .args(["link", "set", &name, "up"])
            .status()
            .unwrap();
        assert!(st.success(), "ip link set {name} up in L1");
    }
    pf
}

/// The igb PF on its own driver with `n` VFs, VF 0 bound to vfio-pci.
fn igb_pf_with_vfio_vf(n: u32) -> (String, String) {
    let pf = igb_pf_up();
    guest::set_numvfs(&pf, n);
    let vf = guest::vfs_of(&pf)[0].clone();
    bind_vfio(&vf);
    (pf, vf)
}

#[test]
#[ignore = "lab: run with `svff-lab test --filter lab_qemu` after `make qemu`"]
fn l2_guest_keeps_its_igb_vf_at_the_same_address_across_pause_numvfs_cycle_and_unpause() {
    guest::require_lab();
    let (pf, vf) = igb_pf_with_vfio_vf(1);

    let (mut vm, sock, _dir) = boot_patched("igbvf", |vmm| {
        vmm.device(&format!("svff-vfio-pci,host={vf},id=vf0"))
    });
    println!(
        "L2 boot with svff-vfio-pci: {:.1} s",
        vm.boot_time.as_secs_f64()
    );
    // QEMU created the socket before the guest ran: it exists now.
    let mut qmp = qmp_ext::Client::connect(&sock, CMD).unwrap();

    let gbdf = guest_igb_vf(&mut vm);
    assert_eq!(guest_config_ids(&mut vm, &gbdf), "8086 10ca");
    // igbvf enables MSI-X through svff-vfio-pci's IRQ wiring (tx, rx, mailbox).
    let (eth, vectors) = igbvf_up(&mut vm, &gbdf);
    assert_eq!(vectors, 3, "igbvf's MSI-X vectors of {gbdf}");
    let driver = |vm: &mut L2| {
        vm.sh_ok(
            &format!("basename $(readlink /sys/bus/pci/devices/{gbdf}/driver) 2>/dev/null"),
            CMD,
        )
        .unwrap()
        .trim()
        .to_string()
    };
    assert_eq!(driver(&mut vm), "igbvf");

    qmp.execute("svff-vfio-pause", Some(json!({ "id": "vf0" })))
        .unwrap();
    let vf_fds: Vec<String> = fd_links(vm.vmm_pid() as u32)
        .into_iter()
        .filter(|l| {
            l.contains("vfio-device") || l == &format!("/dev/vfio/{}", guest::iommu_group(&vf))
        })
        .collect();
    assert_eq!(
        vf_fds,
        Vec::<String>::new(),
        "no fd of {vf} in QEMU while paused"
    );
    // While paused the guest reads config space from the shadow.
    assert_eq!(guest_config_ids(&mut vm, &gbdf), "8086 10ca");

    guest::write_attr(guest::dev_path(&pf).join("sriov_numvfs"), "0");
    guest::write_attr(guest::dev_path(&pf).join("sriov_numvfs"), "1");
    let new_vf = guest::vfs_of(&pf)[0].clone();
    bind_vfio(&new_vf);
    qmp.execute(
        "svff-vfio-unpause",
        Some(json!({ "id": "vf0", "host": new_vf })),
    )
    .unwrap();

    // Same guest address, config space read from the new VF, driver still bound.
    assert_eq!(guest_config_ids(&mut vm, &gbdf), "8086 10ca");
    assert_eq!(driver(&mut vm), "igbvf", "igbvf still bound to {gbdf}");
    // The interface cycles on the new VF: MSI-X is disabled and enabled again on it.
    let out = vm
        .sh(
            &format!("ip link set {eth} down && ip link set {eth} up"),
            CMD,
        )
        .unwrap();
    assert!(out.success(), "ip link down/up on the new VF: {out:?}");
    assert_eq!(
        guest_msix_vectors(&mut vm, &gbdf),
        3,
        "MSI-X vectors after unpause"
    );
    let dmesg = vm.dmesg().unwrap();
    for unplug in ["Card not present", "Link Down", "Removing from iommu group"] {
        assert!(
            !dmesg.contains(unplug),
            "guest saw an unplug ({unplug}):\n{dmesg}"
        );
    }
    println!(
        "L2 dmesg tail:\n{}",
        dmesg.lines().rev().take(15).collect::<Vec<_>>().join("\n")
    );
    drop(qmp);
    drop(vm);
    release_pf(&pf);
}

#[test]
#[ignore = "lab: run with `svff-lab test --filter lab_qemu` after `make qemu`"]
fn patched_qemu_runs_a_plain_vfio_pci_igb_vf_as_stock_qemu_does_and_does_not_pause_it() {
    guest::require_lab();
    let (pf, vf) = igb_pf_with_vfio_vf(1);
    let (mut vm, sock, _dir) = boot_patched("igbvf", |vmm| {
        vmm.device(&format!("vfio-pci,host={vf},id=plain0"))
    });
    let mut qmp = qmp_ext::Client::connect(&sock, CMD).unwrap();

    // What lab_l2 checks for stock QEMU: the guest sees the VF, igbvf binds
    // and requests its 3 MSI-X vectors.
    let gbdf = guest_igb_vf(&mut vm);
    let (_, vectors) = igbvf_up(&mut vm, &gbdf);
    assert_eq!(
        vectors, 3,
        "igbvf's MSI-X vectors of {gbdf} under plain vfio-pci"
    );
    // A plain vfio-pci is not pausable: not listed, and pausing it is refused.
    assert_eq!(qmp.execute("query-svff-vfio", None).unwrap(), json!([]));
    let e = qmp
        .execute("svff-vfio-pause", Some(json!({ "id": "plain0" })))
        .expect_err("a plain vfio-pci does not pause");
    let q = e.qmp().expect("a QMP error");
    assert_eq!(format!("{:?}", q.class), "DeviceNotFound");
    assert!(q.desc.contains("not a pausable VFIO device"), "{}", q.desc);
    drop(qmp);
    drop(vm);
    release_pf(&pf);
}

/// Runs `f` and returns its result with its wall time.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

#[test]
#[ignore = "lab: run with `svff-lab test --filter lab_qemu` after `make qemu`"]
fn pause_unpause_and_device_del_add_of_the_same_vf_change_timed_in_one_boot() {
    guest::require_lab();
    let (pf, vf) = igb_pf_with_vfio_vf(1);
    // On a root port, so that the baseline can hot-unplug it.
    let (mut vm, sock, _dir) = boot_patched("igbvf", |vmm| {
        vmm.device("pcie-root-port,id=rp0,slot=1,chassis=1")
            .device(&format!("svff-vfio-pci,host={vf},id=vf0,bus=rp0"))
    });
    let mut qmp = qmp_ext::Client::connect(&sock, CMD).unwrap();
    let gbdf = guest_igb_vf(&mut vm);
    let numvfs = |n: &str| guest::write_attr(guest::dev_path(&pf).join("sriov_numvfs"), n);

    // svff: pause, count change, bind, unpause.
    let (r, pause) = timed(|| qmp.execute("svff-vfio-pause", Some(json!({ "id": "vf0" }))));
    r.unwrap();
    let ((), change) = timed(|| {
        numvfs("0");
        numvfs("1");
    });
    let new_vf = guest::vfs_of(&pf)[0].clone();
    let ((), bind) = timed(|| bind_vfio(&new_vf));
    let (r, unpause) = timed(|| {
        qmp.execute(
            "svff-vfio-unpause",
            Some(json!({ "id": "vf0", "host": new_vf })),
        )
    });
    r.unwrap();
    assert_eq!(
        guest_config_ids(&mut vm, &gbdf),
        "8086 10ca",
        "svff: same guest BDF"
    );
    let svff = pause + change + bind + unpause;

    // Baseline: device_del (until DEVICE_DELETED), count change, bind, device_add.
    let (r, del) = timed(|| {
        qmp.execute("device_del", Some(json!({ "id": "vf0" })))
            .and_then(|_| qmp.wait_event("DEVICE_DELETED", CMD))
    });
    r.unwrap_or_else(|e| panic!("device_del: {e}"));
    let gone = vm
        .sh(&format!("[ ! -e /sys/bus/pci/devices/{gbdf} ]"), CMD)
        .unwrap();
    assert!(gone.success(), "the guest lost {gbdf} after device_del");
    let ((), change2) = timed(|| {
        numvfs("0");
        numvfs("1");
    });
    let vf2 = guest::vfs_of(&pf)[0].clone();
    let ((), bind2) = timed(|| bind_vfio(&vf2));
    let (r, add) = timed(|| {
        qmp.execute(
            "device_add",
            Some(json!({ "driver": "vfio-pci", "host": vf2, "id": "plain0", "bus": "rp0" })),
        )
    });
    r.unwrap_or_else(|e| panic!("device_add: {e}"));
    // The guest's hotplug handling is asynchronous: wait (bounded) for the function.
    let (seen, guest_add) = timed(|| {
        vm.sh(
            &format!(
                "i=0; while [ ! -e /sys/bus/pci/devices/{gbdf} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; [ -e /sys/bus/pci/devices/{gbdf} ]"
            ),
            CMD,
        )
        .unwrap()
    });
    assert!(
        seen.success(),
        "the guest sees {gbdf} again after device_add"
    );
    let detach = del + change2 + bind2 + add + guest_add;
    println!(
        "svff pause-mode change: {svff:?} (pause {pause:?}, sriov_numvfs 1 -> 0 -> 1 {change:?}, bind {bind:?}, unpause {unpause:?})"
    );
    println!(
        "device_del/device_add change: {detach:?} (device_del to DEVICE_DELETED {del:?}, sriov_numvfs 1 -> 0 -> 1 {change2:?}, bind {bind2:?}, device_add {add:?}, until the guest sees it {guest_add:?})"
    );
    drop(qmp);
    drop(vm);
    release_pf(&pf);
}

#[test]
#[ignore = "lab: run with `svff-lab test --filter lab_qemu` after `make qemu`"]
fn numvfs_zero_while_attached_is_answered_by_a_pause_not_an_unplug() {
    guest::require_lab();
    let pf = guest::igb_pf();
    let vf = pf_with_vfio_vf(&pf, 1, 0);
    let mut q = start(&vf);
    assert_eq!(query(&mut q)["state"], "attached");
    // No svff-vfio-pause: the kernel's request IRQ must make QEMU release the VF,
    // else this write blocks (the kernel re-asks every 10 s, forever).
    let ((), disable) = timed(|| {
        guest::write_attr(guest::dev_path(&pf).join("sriov_numvfs"), "0");
    });
    assert!(guest::vfs_of(&pf).is_empty(), "VFs destroyed");
    let info = query(&mut q);
    assert_eq!(info["state"], "paused", "{info}");
    assert_eq!(info["pause-count"], 1);
    assert_eq!(q.vf_fds(), Vec::<String>::new());
    guest::write_attr(guest::dev_path(&pf).join("sriov_numvfs"), "1");
    let new_vf = guest::vfs_of(&pf)[0].clone();
    bind_vfio(&new_vf);
    unpause(&mut q, &new_vf).unwrap_or_else(|e| panic!("unpause: {e:?}"));
    assert_eq!(query(&mut q)["state"], "attached");
    println!("sriov_numvfs 1 -> 0 with the VF attached: {disable:?}");
    assert!(q.quit(QMP_TIMEOUT).is_some_and(|s| s.success()));
    guest::set_numvfs(&pf, 0);
}

// ---- nvme VF with a real guest driver: the recover=aer mechanism ----

/// Puts the nvme PF back on the driver it had before the test, with 0 VFs.
struct NvmePfRestore {
    pf: PciAddress,
    driver: Option<String>,
}

impl NvmePfRestore {
    /// Recorded before `nvme` is loaded: loading it binds an unbound PF.
    fn new(pf: &str) -> Self {
        NvmePfRestore {
            pf: PciAddress::parse(pf).unwrap(),
            driver: guest::driver_of(pf),
        }
    }
}

impl Drop for NvmePfRestore {
    fn drop(&mut self) {
        let mgr = SriovManager::new(RealSysfs::new());
        if let Err(e) = mgr.set_vf_count(self.pf, 0, &VfsSetOptions::default()) {
            eprintln!("cleanup: removing the VFs of {}: {}", self.pf, e.chain());
        }
        let r = match &self.driver {
            Some(d) => mgr.ensure_pf_driver(self.pf, &DriverName::parse(d).unwrap()),
            None => mgr.unbind(self.pf),
        };
        if let Err(e) = r {
            eprintln!(
                "cleanup: restoring the driver of {}: {}",
                self.pf,
                e.chain()
            );
        }
    }
}

/// The helper's nvme profile: the PF on the kernel's `nvme` driver with `n`
/// VFs (from any count, through 0), each secondary controller online with
/// 2 VQ and 1 VI resources, every VF bound to vfio-pci. Returns the VFs.
fn nvme_profile_vfs(pf: PciAddress, n: u16) -> Vec<String> {
    let mgr = SriovManager::new(RealSysfs::new());
    let opts = VfsSetOptions {
        pf_driver: Some(DriverName::parse("nvme").unwrap()),
        bind: Some(DriverName::parse("vfio-pci").unwrap()),
        ..VfsSetOptions::default()
    };
    mgr.set_vf_count_with(pf, n, &opts, Some(&NvmeResources::uniform(2, 1)))
        .unwrap_or_else(|e| panic!("nvme profile on {pf} with {n} VFs: {}", e.chain()));
    let vfs = guest::vfs_of(&pf.to_string());
    assert_eq!(vfs.len(), usize::from(n), "VFs of {pf}: {vfs:?}");
    vfs
}

/// Shell function of the guest: the sum of the interrupt counts of nvme0's
/// queues in /proc/interrupts (the VF's MSI-X vectors).
const NVME_IRQS: &str = "irqs() { awk '/nvme0q/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i } END { print s + 0 }' /proc/interrupts; }";

fn nvme_irqs(vm: &mut L2) -> u64 {
    let out = vm
        .sh_ok(&format!("{NVME_IRQS}; irqs"), CMD)
        .unwrap_or_else(|e| panic!("{e}"));
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("interrupt count {out:?}: {e}"))
}

/// NVMe VS of QEMU's emulated controller (1.4).
const NVME_VS_1_4: u64 = 0x0001_0400;

/// The guest's read of BAR0 + 8 (NVMe VS) through /dev/mem.
fn guest_nvme_vs(vm: &mut L2, gbdf: &str) -> u64 {
    let out = vm
        .sh_ok(
            &format!(
                "read start end flags < /sys/bus/pci/devices/{gbdf}/resource; devmem $((start + 8)) 32"
            ),
            CMD,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let t = out.trim();
    u64::from_str_radix(t.trim_start_matches("0x").trim_start_matches("0X"), 16)
        .unwrap_or_else(|e| panic!("devmem said {t:?}: {e}"))
}

fn query_vf0(qmp: &mut qmp_ext::Client) -> Value {
    let v = qmp.execute("query-svff-vfio", None).unwrap();
    v.as_array()
        .and_then(|l| l.iter().find(|d| d["id"] == "vf0"))
        .cloned()
        .unwrap_or_else(|| panic!("vf0 in {v}"))
}

fn nvme_state(vm: &mut L2) -> String {
    vm.sh_ok("cat /sys/class/nvme/nvme0/state", CMD)
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .to_string()
}

/// Waits (at most `limit_s` seconds) until the guest's dmesg contains `text`.
fn wait_dmesg(vm: &mut L2, text: &str, limit_s: u32) -> bool {
    vm.sh_until(&format!("dmesg | grep -qF '{text}'"), limit_s)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// An admin command round trip: asks nvme0 to rescan (the driver sends an
/// Identify on the admin queue) and waits, at most `limit_s` seconds, until
/// an interrupt beyond `before` has counted with the controller live.
/// Returns the interrupt count then, or None when it did not happen in time.
fn nvme_admin_roundtrip(vm: &mut L2, before: u64, limit_s: u32) -> Option<u64> {
    let out = vm.sh(
            &format!(
                "{NVME_IRQS}; echo 1 > /sys/class/nvme/nvme0/rescan_controller || exit 2
                 i=0; while [ $(irqs) -le {before} ] || [ \"$(cat /sys/class/nvme/nvme0/state)\" != live ]; do
                   i=$((i+1)); [ $i -gt {} ] && exit 1; sleep 0.1; done; irqs",
                limit_s * 10
            ),
            Duration::from_secs(u64::from(limit_s) + 30),
        );
    let out = match out {
        Ok(out) => out,
        Err(e) => panic!("{e}\nL2 console:\n{}", vm.console_tail(300)),
    };
    assert_ne!(out.code, Some(2), "rescan_controller: {out:?}");
    out.success().then(|| out.stdout.trim().parse().unwrap())
}

fn qom_get(qmp: &mut qmp_ext::Client, property: &str) -> Value {
    qmp.execute(
        "qom-get",
        Some(json!({ "path": "/machine/peripheral/vf0", "property": property })),
    )
    .unwrap_or_else(|e| panic!("qom-get {property}: {e}"))
}

fn no_unplug_in(dmesg: &str) {
    for unplug in [
        "Card not present",
        "Link Down",
        "Removing from iommu group",
        "removing",
    ] {
        assert!(
            !dmesg.contains(unplug),
            "guest saw an unplug ({unplug}):\n{dmesg}"
        );
    }
}

#[test]
#[ignore = "lab: run with `svff-lab test --filter lab_qemu` after `make qemu`"]
fn nvme_vf_driver_recovers_by_itself_after_unpause_with_recover_aer_and_only_after_its_admin_timeout_without(
) {
    guest::require_lab();
    let pf_s = guest::nvme_pf();
    let pf = PciAddress::parse(&pf_s).unwrap();
    let _restore = NvmePfRestore::new(&pf_s);
    guest::modprobe("kvm_amd");
    guest::modprobe("nvme");
    guest::modprobe("vfio-pci");
    let vf = nvme_profile_vfs(pf, 1)[0].clone();

    // Every kernel message on the console (kept on failure); /dev/mem reads
    // of the BAR the driver owns.
    let (mut vm, sock, _dir) = boot_patched("nvme", |vmm| {
        vmm.kernel_param("ignore_loglevel")
            .kernel_param("iomem=relaxed")
            .device("pcie-root-port,id=rp0,slot=1,chassis=1")
            .device(&format!(
                "svff-vfio-pci,host={vf},id=vf0,bus=rp0,recover=aer"
            ))
    });
    let mut qmp = qmp_ext::Client::connect(&sock, CMD).unwrap();
    let gbdf = vm
        .sh_ok(
            "for d in /sys/bus/pci/devices/*; do [ $(cat $d/vendor):$(cat $d/device) = 0x1b36:0x0010 ] && echo ${d##*/}; done; true",
            CMD,
        )
        .unwrap()
        .trim()
        .to_string();
    assert!(
        !gbdf.is_empty() && !gbdf.contains('\n'),
        "one nvme VF in L2: {gbdf:?}"
    );

    // The guest's nvme driver brings the VF's controller up (admin queue, Identify).
    let out = vm.sh("modprobe nvme", CMD).unwrap();
    assert!(out.success(), "modprobe nvme: {out:?}");
    assert!(
        wait_dmesg(&mut vm, "nvme nvme0:", 60)
            && vm
                .sh(
                    "i=0; until [ \"$(cat /sys/class/nvme/nvme0/state 2>/dev/null)\" = live ]; do i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.1; done",
                    Duration::from_secs(90)
                )
                .unwrap()
                .success(),
        "nvme0 live in L2:\n{}",
        vm.dmesg().unwrap()
    );
    let dmesg = vm.dmesg().unwrap();
    assert!(
        dmesg.contains("AER: enabled with IRQ"),
        "the guest's AER driver runs on the root port:\n{dmesg}"
    );
    let lines = vm.sh_ok("grep nvme0q /proc/interrupts", CMD).unwrap();
    assert!(
        lines.contains(&format!("PCI-MSIX-0000:{gbdf}")) || lines.contains("PCI-MSIX"),
        "nvme0's queues on MSI-X: {lines}"
    );
    assert_eq!(guest_nvme_vs(&mut vm, &gbdf), NVME_VS_1_4, "VS attached");
    let probed = nvme_irqs(&mut vm);
    assert!(probed > 0, "admin interrupts during the probe: {lines}");
    // Before any pause: an admin command completes by interrupt.
    let before = nvme_admin_roundtrip(&mut vm, probed, 10).unwrap_or_else(|| {
        panic!(
            "admin round trip before the pause:\n{}",
            vm.dmesg().unwrap()
        )
    });
    println!("nvme0 MSI-X interrupts: {probed} after the probe, {before} after a rescan");

    // 1. recover=aer: pause, numvfs 1 -> 0 -> 2 with the nvme profile, unpause onto VF 1.
    qmp.execute("svff-vfio-pause", Some(json!({ "id": "vf0" })))
        .unwrap();
    let ((), change) = timed(|| {
        nvme_profile_vfs(pf, 2);
    });
    let new_vf = guest::vfs_of(&pf_s)[1].clone();
    assert_ne!(new_vf, vf, "a different function");
    let paused_irqs = nvme_irqs(&mut vm);
    // A guest read of BAR0 (the VS register) while paused traps and, under
    // the default policy (ignore), reads all-ones; counted by the library.
    assert_eq!(
        guest_nvme_vs(&mut vm, &gbdf),
        0xffff_ffff,
        "VS while paused"
    );
    let paused = query_vf0(&mut qmp);
    assert!(
        paused["paused-accesses"]["bar-reads"].as_u64().unwrap() >= 1,
        "{paused}"
    );
    let (r, unpause) = timed(|| {
        qmp.execute(
            "svff-vfio-unpause",
            Some(json!({ "id": "vf0", "host": new_vf })),
        )
    });
    r.unwrap();
    let t0 = Instant::now();
    assert_eq!(qom_get(&mut qmp, "x-recover-count"), json!(1));
    assert!(
        wait_dmesg(&mut vm, "AER: device recovery successful", 60),
        "AER recovery in L2:\n{}",
        vm.dmesg().unwrap()
    );
    let recovered = t0.elapsed();
    let reinit = nvme_irqs(&mut vm);
    let after = nvme_admin_roundtrip(&mut vm, reinit, 30).unwrap_or_else(|| {
        panic!(
            "admin round trip after the AER recovery:\n{}",
            vm.dmesg().unwrap()
        )
    });
    let working_aer = t0.elapsed();
    // The reset freed and re-allocated the vectors (their counts restart):
    // the admin commands of the re-initialisation completed by interrupt.
    assert!(
        reinit > 0,
        "the driver's reset re-initialised the new VF by interrupts ({paused_irqs} before, {reinit} after)"
    );
    let dmesg = vm.dmesg().unwrap();
    assert!(
        dmesg.contains("frozen state error detected, reset controller"),
        "nvme's error_detected ran:\n{dmesg}"
    );
    no_unplug_in(&dmesg);
    assert_eq!(nvme_state(&mut vm), "live");
    assert_eq!(
        guest_config_ids(&mut vm, &gbdf),
        "1b36 0010",
        "same guest address"
    );
    assert_eq!(
        guest_nvme_vs(&mut vm, &gbdf),
        NVME_VS_1_4,
        "BAR0 reads the new VF's controller after unpause"
    );
    println!(
        "recover=aer: numvfs 1 -> 0 -> 2 with the nvme profile {change:?}, unpause {unpause:?}; \
         AER recovery done {recovered:?} after the unpause, admin command completed {working_aer:?} after it; \
         interrupts {paused_irqs} -> {reinit} (reset) -> {after} (rescan)"
    );
    let aer_lines: Vec<&str> = dmesg
        .lines()
        .filter(|l| l.contains("AER") || l.contains("nvme") || l.contains("pcieport"))
        .collect();
    println!("L2 dmesg (AER, nvme):\n{}", aer_lines.join("\n"));

    // 2. recover=none (set at run time): the same change, the driver is not told.
    qmp.execute(
        "qom-set",
        Some(json!({ "path": "/machine/peripheral/vf0", "property": "recover", "value": "none" })),
    )
    .unwrap();
    qmp.execute("svff-vfio-pause", Some(json!({ "id": "vf0" })))
        .unwrap();
    nvme_profile_vfs(pf, 1);
    let vf3 = guest::vfs_of(&pf_s)[0].clone();
    qmp.execute(
        "svff-vfio-unpause",
        Some(json!({ "id": "vf0", "host": vf3 })),
    )
    .unwrap();
    let t0 = Instant::now();
    assert_eq!(
        qom_get(&mut qmp, "x-recover-count"),
        json!(1),
        "no AER error signalled"
    );
    assert_eq!(nvme_state(&mut vm), "live", "the driver does not know");
    let quiet = nvme_irqs(&mut vm);
    // The new VF's controller is disabled (reset by vfio on open): the
    // Identify of a rescan goes unanswered until nvme's admin timeout
    // (nvme_core.admin_timeout, 60 s) makes the driver reset the controller.
    let out = vm
        .sh("echo 1 > /sys/class/nvme/nvme0/rescan_controller", CMD)
        .unwrap();
    assert!(out.success(), "rescan_controller: {out:?}");
    let unanswered = vm
        .sh(
            &format!("{NVME_IRQS}; sleep 5; [ $(irqs) -eq {quiet} ]"),
            CMD,
        )
        .unwrap();
    assert!(
        unanswered.success(),
        "no completion interrupt from the disabled controller"
    );
    assert!(
        wait_dmesg(&mut vm, "timeout, reset controller", 180),
        "nvme's admin timeout resets the controller:\n{}",
        vm.dmesg().unwrap()
    );
    let reset_seen = t0.elapsed();
    let live = vm
        .sh(
            "i=0; until [ \"$(cat /sys/class/nvme/nvme0/state)\" = live ]; do i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.1; done",
            Duration::from_secs(90),
        )
        .unwrap();
    assert!(live.success(), "nvme0 live again:\n{}", vm.dmesg().unwrap());
    let reinit = nvme_irqs(&mut vm);
    let after = nvme_admin_roundtrip(&mut vm, reinit, 30).unwrap_or_else(|| {
        panic!(
            "no admin round trip after the driver's own reset:\n{}",
            vm.dmesg().unwrap()
        )
    });
    let working_none = t0.elapsed();
    let dmesg = vm.dmesg().unwrap();
    no_unplug_in(&dmesg);
    println!(
        "recover=none: admin timeout and controller reset {reset_seen:?} after the unpause, admin command completed {working_none:?} after it; interrupts {quiet} (stuck) -> {reinit} (reset) -> {after} (rescan)"
    );
    let tail: Vec<&str> = dmesg
        .lines()
        .rev()
        .take(12)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    println!("L2 dmesg tail:\n{}", tail.join("\n"));
    drop(qmp);
    drop(vm);
}

#[test]
#[ignore = "lab: run with `svff-lab test --filter lab_qemu` after `make qemu`"]
fn unpause_with_a_group_fd_passed_by_getfd_works_where_qemu_cannot_open_dev_vfio() {
    guest::require_lab();
    let pf = guest::igb_pf();
    let vf = pf_with_vfio_vf(&pf, 2, 0);
    // QEMU opens the first VF as root, then drops to nobody (as under
    // libvirt, it can then open no /dev/vfio node itself).
    let mut q = start_with(&["-run-with", "user=65534:65534"], &vf);
    let status = std::fs::read_to_string(format!("/proc/{}/status", q.pid())).unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "65534"),
        "QEMU runs as nobody: {uid}"
    );
    assert_eq!(query(&mut q)["state"], "attached");

    pause(&mut q);
    guest::set_numvfs(&pf, 0);
    guest::set_numvfs(&pf, 2);
    let new_vf = guest::vfs_of(&pf)[1].clone();
    bind_vfio(&new_vf);
    let node = group_node(&new_vf);

    // By path, QEMU cannot open the new group: refused, still paused.
    let (_, desc) = unpause(&mut q, &new_vf).expect_err("nobody cannot open the group");
    assert!(desc.contains("still paused"), "{desc}");
    assert_eq!(query(&mut q)["state"], "paused");

    // The group fd opened here (as root) and passed with getfd.
    let group = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&node)
        .unwrap_or_else(|e| panic!("{node}: {e}"));
    q.send_fd("grp", std::os::fd::AsFd::as_fd(&group))
        .unwrap_or_else(|e| panic!("getfd: {e}"));
    drop(group);
    let t = q
        .try_execute(
            "svff-vfio-unpause",
            Some(json!({ "id": "vf0", "host": new_vf, "fdname": "grp" })),
        )
        .unwrap_or_else(|e| panic!("unpause with the passed fd: {e:?}"));
    let info = query(&mut q);
    assert_eq!(info["state"], "attached", "{info}");
    assert_eq!(info["host"], new_vf.as_str());
    let fds = q.vf_fds();
    assert!(
        fds.contains(&node),
        "QEMU holds the passed group {node}: {fds:?}"
    );
    assert!(
        fds.iter().any(|l| l.contains("vfio-device")),
        "and the new VF's device fd: {fds:?}"
    );
    // The fd was taken over by the device: its name is gone from the monitor.
    let (_, desc) = q
        .try_execute(
            "svff-vfio-unpause",
            Some(json!({ "id": "vf0", "fdname": "grp" })),
        )
        .expect_err("the name was used up");
    assert!(desc.contains("grp"), "{desc}");
    println!(
        "unpause with a getfd group fd as uid 65534: {} ns",
        t["total-ns"]
    );
    assert!(q.quit(QMP_TIMEOUT).is_some_and(|s| s.success()));
    guest::set_numvfs(&pf, 0);
}

// ---- igb VF with igbvf in L2: interrupts and the recover=aer* mechanisms ----

/// Sum of the guest's interrupt counts of `gbdf`'s MSI-X vectors.
fn guest_msix_count(vm: &mut L2, gbdf: &str) -> u64 {
    let text = vm
        .sh_ok("cat /proc/interrupts", CMD)
        .unwrap_or_else(|e| panic!("{e}"));
    text.lines()
        .filter(|l| l.contains(&format!("PCI-MSIX-{gbdf}")))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Waits (at most `limit`) until `gbdf`'s MSI-X interrupt count passes
/// `above`; returns the count then. igbvf's watchdog raises its rx vector
/// every 2 s while the interface is up and the VF answers.
fn wait_msix_growth(vm: &mut L2, gbdf: &str, above: u64, limit: Duration) -> Option<u64> {
    let until = Instant::now() + limit;
    loop {
        let now = guest_msix_count(vm, gbdf);
        if now > above {
            return Some(now);
        }
        if Instant::now() >= until {
            return None;
        }
        // Pacing between polls of /proc/interrupts; the deadline bounds the wait.
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The guest's operstate of `eth` (`up`, `down`, ...).
fn operstate(vm: &mut L2, eth: &str) -> String {
    vm.sh_ok(&format!("cat /sys/class/net/{eth}/operstate"), CMD)
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .to_string()
}

/// Waits (at most `limit`) until the guest's `eth` is operationally up.
fn wait_operstate_up(vm: &mut L2, eth: &str, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    loop {
        if operstate(vm, eth) == "up" {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        // Pacing between polls; the deadline bounds the wait.
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits (at most `limit_s` seconds) until `text` occurs `n` times in the
/// guest's dmesg.
fn wait_dmesg_count(vm: &mut L2, text: &str, n: usize, limit_s: u32) -> bool {
    vm.sh_until(
        &format!("[ $(dmesg | grep -cF '{text}') -ge {n} ]"),
        limit_s,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// COMMAND, BAR0 and MSI-X message control of a config space dump.
fn config_summary(cfg: &[u8]) -> String {
    if cfg.len() < 64 {
        return "config unreadable".into();
    }
    let cmd = u16::from_le_bytes([cfg[4], cfg[5]]);
    let bar0 = u32::from_le_bytes([cfg[0x10], cfg[0x11], cfg[0x12], cfg[0x13]]);
    let mut msix = None;
    let mut ptr = usize::from(cfg[0x34]);
    for _ in 0..48 {
        if ptr < 0x40 || ptr + 3 >= cfg.len() {
            break;
        }
        if cfg[ptr] == 0x11 {
            msix = Some(u16::from_le_bytes([cfg[ptr + 2], cfg[ptr + 3]]));
            break;
        }
        ptr = usize::from(cfg[ptr + 1]);
    }
    let msix = msix.map_or("none".to_string(), |m| format!("{m:#06x}"));
    format!("COMMAND {cmd:#06x}, BAR0 {bar0:#010x}, MSI-X control {msix}")
}

/// The host-side PCI state of VF `vf` in L1, read from sysfs.
fn l1_vf_state(vf: &str) -> String {
    let cfg = std::fs::read(guest::dev_path(vf).join("config")).unwrap_or_default();
    format!("{vf}: {}", config_summary(&cfg))
}

/// The guest's view of `gbdf`'s config space (the device model's, read now).
fn guest_vf_state(vm: &mut L2, gbdf: &str) -> String {
    let hex = vm
        .sh_ok(
            &format!("od -An -v -tx1 -N256 /sys/bus/pci/devices/{gbdf}/config"),
            CMD,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let cfg: Vec<u8> = hex
        .split_whitespace()
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    format!("{gbdf}: {}", config_summary(&cfg))
}

/// L1's kernel messages of the igb PF driver (its VF mailbox handling).
fn l1_igb_log() -> String {
    let out = std::process::Command::new("dmesg").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("igb "))
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

/// igbvf's dmesg lines after the first `skip` ones.
fn igbvf_lines(vm: &mut L2, skip: usize) -> (Vec<String>, usize) {
    let dmesg = vm.dmesg().unwrap();
    let lines: Vec<String> = dmesg
        .lines()
        .filter(|l| l.contains("igbvf") || l.contains("AER") || l.contains("pcieport"))
        .map(str::to_owned)
        .collect();
    let n = lines.len();
    (lines.into_iter().skip(skip).collect(), n)
}

/// How long the igbvf test waits for an outcome that may not come (igbvf
/// after an unpause without recovery): ten of igbvf's 2 s watchdog
/// periods, so that "no interrupt" means something while `make test`
/// stays fast.
const NO_RECOVERY_WAIT: Duration = Duration::from_secs(20);

/// After an unpause without recovery (at `t0`): whether igbvf's interrupts
/// count again by themselves within `wait`, else whether they do within
/// `wait` after `ip link set down/up`, as a sentence.
fn igbvf_without_recovery(
    vm: &mut L2,
    gbdf: &str,
    eth: &str,
    t0: Instant,
    wait: Duration,
) -> String {
    let base = guest_msix_count(vm, gbdf);
    if let Some(n) = wait_msix_growth(vm, gbdf, base, wait) {
        return format!(
            "interrupts counting again by themselves {:?} after the unpause ({base} -> {n}), {eth} {}",
            t0.elapsed(),
            operstate(vm, eth)
        );
    }
    let by_itself = format!(
        "no interrupt for {wait:?} ({base}), {eth} {}",
        operstate(vm, eth)
    );
    let out = vm
        .sh(
            &format!("ip link set {eth} down && ip link set {eth} up"),
            CMD,
        )
        .unwrap();
    assert!(out.success(), "ip link set {eth} down/up: {out:?}");
    let base2 = guest_msix_count(vm, gbdf);
    match wait_msix_growth(vm, gbdf, base2, wait) {
        Some(n) => format!(
            "{by_itself}; after ip link set down/up counting again {:?} after the unpause ({base2} -> {n}), {eth} {}",
            t0.elapsed(),
            operstate(vm, eth)
        ),
        None => format!(
            "{by_itself}; after ip link set down/up still no interrupt for {wait:?} ({base2}), {eth} {}",
            operstate(vm, eth)
        ),
    }
}

/// Pause `vf0`, cycle the PF's VFs 1 -> 0 -> 1, bind the new VF to
/// vfio-pci and unpause onto it; returns the new VF and the unpause's end.
fn igb_change(qmp: &mut qmp_ext::Client, pf: &str) -> (String, Instant) {
    let numvfs = |n: &str| guest::write_attr(guest::dev_path(pf).join("sriov_numvfs"), n);
    qmp.execute("svff-vfio-pause", Some(json!({ "id": "vf0" })))
        .unwrap();
    numvfs("0");
    numvfs("1");
    let vf = guest::vfs_of(pf)[0].clone();
    bind_vfio(&vf);
    qmp.execute(
        "svff-vfio-unpause",
        Some(json!({ "id": "vf0", "host": vf })),
    )
    .unwrap();
    (vf, Instant::now())
}

fn set_recover(qmp: &mut qmp_ext::Client, value: &str) {
    qmp.execute(
        "qom-set",
        Some(json!({ "path": "/machine/peripheral/vf0", "property": "recover", "value": value })),
    )
    .unwrap_or_else(|e| panic!("qom-set recover={value}: {e}"));
}

/// The recover=aer-nonfatal recovery after an unpause at `t0`: the AER core's
/// `n`-th successful recovery, then igbvf's interrupts counting up from their
/// count at the unpause and its link up. Returns what was seen, timed.
fn igbvf_recovers(vm: &mut L2, gbdf: &str, eth: &str, t0: Instant, n: usize) -> String {
    let base = guest_msix_count(vm, gbdf);
    assert!(
        wait_dmesg_count(vm, "AER: device recovery successful", n, 60),
        "AER recovery {n} of igbvf in L2:\n{}",
        vm.dmesg().unwrap()
    );
    let recovered = t0.elapsed();
    // igbvf's watchdog raises its rx vector every 2 s once the VF answers;
    // 60 s bounds the wait (interrupts counted 1.5 s after an unpause here).
    let counted = wait_msix_growth(vm, gbdf, base, Duration::from_secs(60));
    let counted_at = t0.elapsed();
    assert!(
        counted.is_some(),
        "igbvf's MSI-X interrupts stayed at {base} after the recovery ({}):\n{}",
        guest_vf_state(vm, gbdf),
        vm.dmesg().unwrap()
    );
    assert!(
        wait_operstate_up(vm, eth, Duration::from_secs(60)),
        "{eth} not up after the recovery ({}):\n{}",
        operstate(vm, eth),
        vm.dmesg().unwrap()
    );
    format!(
        "AER recovery done {recovered:?} after the unpause, interrupts {base} -> {} at {counted_at:?}, {eth} up at {:?}",
        counted.unwrap(),
        t0.elapsed()
    )
}

#[test]
#[ignore = "lab: run with `svff-lab test --filter lab_qemu` after `make qemu`"]
fn igbvf_interrupts_count_again_and_its_link_comes_up_after_unpause_with_recover_aer_nonfatal() {
    guest::require_lab();
    let (pf, vf) = igb_pf_with_vfio_vf(1);
    let (mut vm, sock, _dir) = boot_patched("igbvf", |vmm| {
        vmm.kernel_param("ignore_loglevel")
            .device("pcie-root-port,id=rp0,slot=1,chassis=1")
            .device(&format!(
                "svff-vfio-pci,host={vf},id=vf0,bus=rp0,recover=aer-nonfatal"
            ))
            .arg("-trace")
            .arg("svff_set_irqs")
    });
    let mut qmp = qmp_ext::Client::connect(&sock, CMD).unwrap();
    let gbdf = guest_igb_vf(&mut vm);
    let (eth, vectors) = igbvf_up(&mut vm, &gbdf);
    assert_eq!(vectors, 3, "igbvf's MSI-X vectors of {gbdf}");
    let c0 = guest_msix_count(&mut vm, &gbdf);
    let c1 = wait_msix_growth(&mut vm, &gbdf, c0, Duration::from_secs(60)).unwrap_or_else(|| {
        panic!(
            "igbvf's interrupts stayed at {c0} before any pause:\n{}",
            vm.dmesg().unwrap()
        )
    });
    assert!(wait_operstate_up(&mut vm, &eth, Duration::from_secs(60)));
    println!(
        "igbvf MSI-X interrupts before the pause: {c0} -> {c1}; L1 {}",
        l1_vf_state(&vf)
    );
    let (_, seen) = igbvf_lines(&mut vm, 0);

    // 1. recover=aer-nonfatal: pause, numvfs 1 -> 0 -> 1, unpause onto the
    // new VF; the AER core runs igbvf's handlers without a bus reset.
    let (new_vf, t0) = igb_change(&mut qmp, &pf);
    let state = l1_vf_state(&new_vf);
    assert!(
        state.contains("MSI-X control 0x8"),
        "MSI-X enabled on the host VF after the unpause: {state}"
    );
    let nonfatal = igbvf_recovers(&mut vm, &gbdf, &eth, t0, 1);
    let (log, seen) = igbvf_lines(&mut vm, seen);
    println!(
        "recover=aer-nonfatal: {nonfatal}\nL2 dmesg:\n{}",
        log.join("\n")
    );
    println!("L1 after the recovery: {}", l1_vf_state(&new_vf));
    let dmesg = vm.dmesg().unwrap();
    assert!(
        dmesg.contains("Uncorrectable (Non-Fatal) error"),
        "a non-fatal error was signalled:\n{dmesg}"
    );
    assert!(
        !dmesg.contains("link has been reset"),
        "no bus reset for a non-fatal error:\n{dmesg}"
    );
    no_unplug_in(&dmesg);
    assert_eq!(
        guest_config_ids(&mut vm, &gbdf),
        "8086 10ca",
        "same guest address"
    );
    assert_eq!(qom_get(&mut qmp, "x-recover-count"), json!(1));

    // 2. recover=none, from the working igbvf: what the driver does by itself.
    set_recover(&mut qmp, "none");
    let (vf3, t0) = igb_change(&mut qmp, &pf);
    let none = igbvf_without_recovery(&mut vm, &gbdf, &eth, t0, NO_RECOVERY_WAIT);
    let (log, seen) = igbvf_lines(&mut vm, seen);
    println!("recover=none: {none}\nL2 dmesg:\n{}", log.join("\n"));
    println!("L1: {}; igb PF log:\n{}", l1_vf_state(&vf3), l1_igb_log());
    no_unplug_in(&vm.dmesg().unwrap());
    assert_eq!(qom_get(&mut qmp, "x-recover-count"), json!(1));

    // 3. recover=aer (fatal): the bus reset resets the device's emulated
    // config space and igbvf's slot_reset does not restore it. Shown, not
    // asserted beyond the recovery itself: it is the guest driver's doing.
    set_recover(&mut qmp, "aer");
    let (vf4, t0) = igb_change(&mut qmp, &pf);
    assert!(
        wait_dmesg_count(&mut vm, "AER: device recovery successful", 2, 60),
        "fatal AER recovery of igbvf in L2:\n{}",
        vm.dmesg().unwrap()
    );
    let fatal_at = t0.elapsed();
    let base = guest_msix_count(&mut vm, &gbdf);
    let after = wait_msix_growth(&mut vm, &gbdf, base, Duration::from_secs(10));
    let (log, _) = igbvf_lines(&mut vm, seen);
    println!(
        "recover=aer (fatal): recovery done {fatal_at:?} after the unpause; interrupts within 10 s: {after:?} (from {base}); {eth} {}; guest {}; L1 {}\nL2 dmesg:\n{}",
        operstate(&mut vm, &eth),
        guest_vf_state(&mut vm, &gbdf),
        l1_vf_state(&vf4),
        log.join("\n")
    );
    assert_eq!(qom_get(&mut qmp, "x-recover-count"), json!(2));

    drop(qmp);
    drop(vm);
    release_pf(&pf);
}

// ---- svff's orchestrator driving the patched QEMU (VM kind `qmp`) ----

/// Runs `svff --direct --config <cfg> <args>` (the workspace's debug build,
/// built by `svff-lab test` with the test targets), bounded by timeout(1).
fn svff_cli(cfg: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/svff");
    assert!(bin.is_file(), "no svff binary at {}", bin.display());
    let out = std::process::Command::new("timeout")
        .arg("300")
        .arg(&bin)
        .args(["--direct", "--config"])
        .arg(cfg)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    println!(
        "$ svff {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "svff {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("svff printed JSON")
}

#[test]
#[ignore = "lab: run with `svff-lab test --filter lab_qemu` after `make qemu`"]
fn svff_init_and_pause_reconf_drive_the_patched_qemu_and_igbvf_keeps_working_without_unplug() {
    guest::require_lab();
    let pf = igb_pf_up();
    let (mut vm, qmp, dir) = boot_patched("igbvf", |vmm| {
        vmm.kernel_param("ignore_loglevel")
            .device("pcie-root-port,id=rp0,slot=1,chassis=1")
    });
    let out = vm.sh("modprobe igbvf", CMD).unwrap();
    assert!(out.success(), "modprobe igbvf: {out:?}");
    let cfg = dir.path().join("helper.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"allowed_uids = [0]
state_dir = "{state}"
[[pf]]
bdf = "{pf}"
profile = "generic"
driver = "igb"
vfs = 1
[[vm]]
name = "vm1"
kind = "qmp"
qmp = "{qmp}"
hotplug_ports = ["rp0"]
device_props = {{ driver = "svff-vfio-pci", recover = "aer-nonfatal" }}
qmp_timeout_s = 60
vfs = [{{ pf = "{pf}", count = 1 }}]
"#,
            state = dir.path().join("state").display(),
            qmp = qmp.display(),
        ),
    )
    .unwrap();

    // init: svff creates the VF, binds it and device_adds it as svff-vfio-pci.
    let r = svff_cli(&cfg, &["init"]);
    let gbdf = r["assignments"][0]["guest"]
        .as_str()
        .unwrap_or_else(|| panic!("a guest address in {r}"))
        .to_string();
    let host0 = r["assignments"][0]["host"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let seen = vm
        .sh(
            &format!("i=0; until [ -n \"$(ls /sys/bus/pci/devices/{gbdf}/net 2>/dev/null)\" ]; do i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.1; done"),
            CMD,
        )
        .unwrap();
    assert!(seen.success(), "igbvf probed the VF svff added at {gbdf}");
    let eth = guest_iface(&mut vm, &gbdf);
    let up = vm.sh(&format!("ip link set {eth} up"), CMD).unwrap();
    assert!(up.success(), "{up:?}");
    let c0 = guest_msix_count(&mut vm, &gbdf);
    let c1 = wait_msix_growth(&mut vm, &gbdf, c0, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("igbvf's interrupts after init:\n{}", vm.dmesg().unwrap()));
    assert!(wait_operstate_up(&mut vm, &eth, Duration::from_secs(60)));
    println!("after svff init: {gbdf} ({host0} in L1), igbvf interrupts {c0} -> {c1}, {eth} up");

    // reconf in pause mode: 1 -> 0 -> 2 VFs; vm1's VF is paused, not removed.
    let t0 = Instant::now();
    let r = svff_cli(
        &cfg,
        &["reconf", "--pf", &pf, "--vfs", "2", "--mode", "pause"],
    );
    let reconf = t0.elapsed();
    println!("reconf: {reconf:?}: {r}");
    assert_eq!(guest::vfs_of(&pf).len(), 2);
    assert_eq!(r["assignments"][0]["guest"], json!(gbdf), "{r}");
    let recovered = igbvf_recovers(&mut vm, &gbdf, &eth, t0, 1);
    println!("svff reconf --mode pause: {recovered} (times from the reconf's start)");
    let dmesg = vm.dmesg().unwrap();
    no_unplug_in(&dmesg);
    assert_eq!(
        guest_config_ids(&mut vm, &gbdf),
        "8086 10ca",
        "same guest address"
    );
    let st = svff_cli(&cfg, &["status", "--pf", &pf]);
    println!("status: {st}");
    assert_eq!(st["assignments"][0]["vmm_state"], json!("attached"), "{st}");
    drop(vm);
    release_pf(&pf);
}
