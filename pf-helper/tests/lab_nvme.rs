//! Lab tests of the nvme PF profile on the real kernel in L1: the emulated
//! nvme PF bound to the kernel's `nvme` driver, VFs created by `svff vfs set
//! --direct` with per-VF VQ/VI resources, checked against an independent
//! reading of the controller's Secondary Controller List (an Identify issued
//! by this file's own ioctl code, not the crate's) and against the VFs' BAR0.
//! Each test puts the PF back on the driver it found (pci-pf-stub or none)
//! with 0 VFs.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use svff_lab::guest;
use svff_pf_helper::{DriverName, PciAddress, RealSysfs, SriovManager, VfsSetOptions};

/// NVMe VS of QEMU's controller (1.4).
const QEMU_NVME_VS: u32 = 0x0001_0400;

fn svff(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_svff"))
        .args(args)
        .output()
        .expect("run svff");
    eprintln!(
        "svff {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One entry of the Secondary Controller List as this test reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Secondary {
    scid: u16,
    online: bool,
    vfn: u16,
    nvq: u16,
    nvi: u16,
}

/// The kernel's `struct nvme_passthru_cmd`, written out here independently of
/// the crate's.
#[repr(C)]
#[derive(Default)]
struct AdminCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

/// `/dev/nvmeN` of the PF, from its sysfs `nvme/` directory.
fn controller_node(pf: &str) -> PathBuf {
    let dir = guest::dev_path(pf).join("nvme");
    let name = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("nvme"))
        .expect("an nvmeN entry");
    Path::new("/dev").join(name)
}

/// Identify CNS 15h, one page from controller id 0 (the lab has 64 < 127).
fn read_secondaries(pf: &str) -> Vec<Secondary> {
    let node = controller_node(pf);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&node)
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut cmd = AdminCmd {
        opcode: 0x06,
        addr: buf.as_mut_ptr() as u64,
        data_len: 4096,
        cdw10: 0x15,
        timeout_ms: 10_000,
        ..Default::default()
    };
    let req: u64 = 0xC048_4E41; // _IOWR('N', 0x41, 72 bytes)
                                // SAFETY: `f` is the controller's character device; `cmd` is a live
                                // struct nvme_passthru_cmd whose addr/data_len describe `buf` (4096
                                // bytes), which outlives the call and is not otherwise borrowed.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), req as libc::c_ulong, &mut cmd) };
    assert_eq!(
        rc,
        0,
        "Identify CNS 15h on {}: {}",
        node.display(),
        std::io::Error::last_os_error()
    );
    let le16 = |at: usize| u16::from_le_bytes([buf[at], buf[at + 1]]);
    (0..usize::from(buf[0]))
        .map(|i| {
            let e = 32 + 32 * i;
            Secondary {
                scid: le16(e),
                online: buf[e + 4] & 1 == 1,
                vfn: le16(e + 8),
                nvq: le16(e + 10),
                nvi: le16(e + 12),
            }
        })
        .collect()
}

fn secondary_of_vf(list: &[Secondary], index: u16) -> Secondary {
    *list
        .iter()
        .find(|s| s.vfn == index + 1)
        .unwrap_or_else(|| panic!("no secondary controller for VF {index}: {list:?}"))
}

/// Puts the PF back on its driver from before the test, with 0 VFs.
struct Restore {
    pf: PciAddress,
    driver: Option<String>,
}

impl Restore {
    fn new(pf: &str) -> Self {
        Restore {
            pf: PciAddress::parse(pf).unwrap(),
            driver: guest::driver_of(pf),
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let mgr = SriovManager::new(RealSysfs::new());
        if let Err(e) = mgr.set_vf_count(self.pf, 0, &VfsSetOptions::default()) {
            eprintln!(
                "cleanup: removing the VFs of {} failed: {}",
                self.pf,
                e.chain()
            );
        }
        let r = match &self.driver {
            Some(d) => mgr.ensure_pf_driver(self.pf, &DriverName::parse(d).unwrap()),
            None => mgr.unbind(self.pf),
        };
        if let Err(e) = r {
            eprintln!(
                "cleanup: restoring the driver of {} failed: {}",
                self.pf,
                e.chain()
            );
        }
    }
}

/// Keeps a device in D0 (`power/control` = `on`) until dropped.
struct RuntimePmOn(PathBuf, String);

impl RuntimePmOn {
    fn new(bdf: &str) -> Self {
        let path = guest::dev_path(bdf).join("power/control");
        let old = guest::read_attr(&path);
        guest::write_attr(&path, "on");
        RuntimePmOn(path, old)
    }
}

impl Drop for RuntimePmOn {
    fn drop(&mut self) {
        let _ = fs::write(&self.0, &self.1);
    }
}

/// Sets PCI_COMMAND's memory space bit through sysfs `config` until dropped.
struct CommandMemoryOn(PathBuf, [u8; 2]);

impl CommandMemoryOn {
    fn new(bdf: &str) -> Self {
        use std::os::unix::fs::FileExt;
        let path = guest::dev_path(bdf).join("config");
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut old = [0u8; 2];
        f.read_exact_at(&mut old, 4).unwrap();
        let new = (u16::from_le_bytes(old) | 0x2).to_le_bytes();
        f.write_all_at(&new, 4).unwrap();
        CommandMemoryOn(path, old)
    }
}

impl Drop for CommandMemoryOn {
    fn drop(&mut self) {
        use std::os::unix::fs::FileExt;
        if let Ok(f) = fs::OpenOptions::new().write(true).open(&self.0) {
            let _ = f.write_all_at(&self.1, 4);
        }
    }
}

fn setup() -> (String, Restore) {
    guest::require_lab();
    let pf = guest::nvme_pf();
    // Every test (this file's included) leaves the PF off nvme with 0 VFs.
    assert_ne!(
        guest::driver_of(&pf).as_deref(),
        Some("nvme"),
        "left on nvme"
    );
    assert_eq!(
        guest::read_attr(guest::dev_path(&pf).join("sriov_numvfs")),
        "0",
        "VFs left behind"
    );
    // Recorded before nvme is loaded: loading it binds an unbound PF.
    let restore = Restore::new(&pf);
    guest::modprobe("nvme");
    guest::modprobe("vfio-pci");
    (pf, restore)
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn vfs_set_with_the_nvme_profile_gives_online_vfs_with_the_requested_resources() {
    let (pf, _restore) = setup();
    let out = svff(&[
        "--direct",
        "vfs",
        "set",
        "--pf",
        &pf,
        "4",
        "--pf-driver",
        "nvme",
        "--bind",
        "vfio-pci",
        "--resources",
        "0=vq:2,vi:1,1=vq:2,vi:1,2=vq:0,vi:0,3=vq:2,vi:1",
        "--json",
    ]);
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let pos = |n: &str| {
        steps
            .iter()
            .position(|s| *s == n)
            .unwrap_or_else(|| panic!("{n} in {steps:?}"))
    };
    assert!(pos("nvme_check") < pos("enable_vfs"), "{steps:?}");
    assert!(
        pos("enable_vfs") < pos("nvme_resources") && pos("nvme_resources") < pos("bind_vfs"),
        "{steps:?}"
    );
    assert_eq!(guest::driver_of(&pf).as_deref(), Some("nvme"));

    // The independent reading: VFs 0, 1, 3 online with 2 VQ / 1 VI, VF 2 offline with none.
    let list = read_secondaries(&pf);
    for i in [0, 1, 3] {
        let s = secondary_of_vf(&list, i);
        assert!(s.online && (s.nvq, s.nvi) == (2, 1), "VF {i}: {s:?}");
    }
    let s2 = secondary_of_vf(&list, 2);
    assert!(!s2.online && (s2.nvq, s2.nvi) == (0, 0), "VF 2: {s2:?}");
    assert!(
        !secondary_of_vf(&list, 4).online,
        "VF 4 does not exist and stays offline"
    );

    // An online VF's BAR0 shows real NVMe registers; the offline one reads 0.
    let mgr = SriovManager::new(RealSysfs::new());
    let vfs = mgr.vfs(PciAddress::parse(&pf).unwrap()).unwrap();
    assert_eq!(vfs.len(), 4);
    for (i, vf) in &vfs {
        assert_eq!(
            mgr.driver_of(*vf).unwrap().as_deref(),
            Some("vfio-pci"),
            "{vf}"
        );
        // vfio-pci keeps an unopened device in D3hot (runtime PM): hold it in
        // D0 for the read. QEMU's VF decodes its BAR only with the memory bit
        // of its own PCI_COMMAND set (vfio-pci sets it when a VMM opens the
        // device); set it for the read and put it back afterwards.
        let _d0 = RuntimePmOn::new(&vf.to_string());
        let _mem = CommandMemoryOn::new(&vf.to_string());
        let bar = mgr.open_bar(*vf, 0).unwrap();
        let vs = bar.read_u32(0x8).unwrap();
        let cap_lo = bar.read_u32(0x0).unwrap();
        eprintln!("VF {i} {vf}: CAP lo {cap_lo:#010x} VS {vs:#010x}");
        if *i == 2 {
            assert_eq!(vs, 0, "offline VF {vf}");
        } else {
            assert_eq!(vs, QEMU_NVME_VS, "online VF {vf}");
            assert!(
                cap_lo & 0xffff >= 1 && cap_lo != u32::MAX,
                "CAP.MQES of {vf}"
            );
        }
    }

    // svff status shows the same.
    let out = svff(&["--direct", "status", "--pf", &pf, "--json"]);
    assert!(out.status.success());
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &st["pfs"][0];
    assert_eq!(p["nvme"]["error"], serde_json::Value::Null, "{p}");
    assert_eq!(
        p["nvme"]["vq_max_per_vf"], 16,
        "the lab's sriov_max_vq_per_vf"
    );
    for v in p["vfs"].as_array().unwrap() {
        let i = v["index"].as_u64().unwrap() as u16;
        let s = secondary_of_vf(&list, i);
        assert_eq!(v["nvme"]["scid"], s.scid, "{v}");
        assert_eq!(v["nvme"]["online"], s.online, "{v}");
        assert_eq!(
            (v["nvme"]["vq"].as_u64(), v["nvme"]["vi"].as_u64()),
            (Some(u64::from(s.nvq)), Some(u64::from(s.nvi))),
            "{v}"
        );
    }
    let text = svff(&["--direct", "status", "--pf", &pf]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("nvme: secondary controller") && text.contains("online vq 2 vi 1"),
        "{text}"
    );

    // A second set changes only VF 2 (brought online), leaving the others online.
    let out = svff(&[
        "--direct", "vfs", "set", "--pf", &pf, "4", "--bind", "vfio-pci", "--vq", "2", "--vi", "1",
    ]);
    assert!(out.status.success());
    let list = read_secondaries(&pf);
    for i in 0..4 {
        let s = secondary_of_vf(&list, i);
        assert!(s.online && (s.nvq, s.nvi) == (2, 1), "VF {i}: {s:?}");
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn too_many_resources_are_refused_with_a_clear_error_and_nothing_changed() {
    let (pf, _restore) = setup();
    let out = svff(&[
        "--direct",
        "vfs",
        "set",
        "--pf",
        &pf,
        "4",
        "--pf-driver",
        "nvme",
        "--vq",
        "2",
        "--vi",
        "1",
    ]);
    assert!(out.status.success());
    let before = read_secondaries(&pf);
    let numvfs = || guest::read_attr(guest::dev_path(&pf).join("sriov_numvfs"));
    assert_eq!(numvfs(), "4");

    // Above the per-VF maximum (VQFRSM 16, VIFRSM 8 in the lab), same count.
    let out = svff(&[
        "--direct",
        "vfs",
        "set",
        "--pf",
        &pf,
        "4",
        "--resources",
        "0=vq:2,vi:1,1=vq:17,vi:1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("PF {pf}: NVMe VF resources: VF 1: 17 VQ requested, at most 16 per secondary controller (VQFRSM)")),
        "{err}"
    );
    // With a count change: refused before sriov_numvfs is written.
    let out = svff(&[
        "--direct", "vfs", "set", "--pf", &pf, "2", "--vq", "2", "--vi", "9",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("VF 0: 9 VI requested, at most 8 per secondary controller (VIFRSM)"),
        "{err}"
    );
    assert_eq!(numvfs(), "4");
    assert_eq!(
        read_secondaries(&pf),
        before,
        "nothing changed on the controller"
    );
    for i in 0..4 {
        let s = secondary_of_vf(&before, i);
        assert!(s.online && (s.nvq, s.nvi) == (2, 1), "VF {i}: {s:?}");
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn count_changes_on_the_nvme_driver_give_the_new_vfs_their_resources() {
    let (pf, _restore) = setup();
    for count in ["4", "2", "3"] {
        let out = svff(&[
            "--direct",
            "vfs",
            "set",
            "--pf",
            &pf,
            count,
            "--pf-driver",
            "nvme",
            "--bind",
            "vfio-pci",
            "--vq",
            "2",
            "--vi",
            "1",
        ]);
        assert!(out.status.success(), "vfs set {count}");
    }
    let list = read_secondaries(&pf);
    eprintln!("after 4 -> 2 -> 3: {list:?}");
    for i in 0..3 {
        let s = secondary_of_vf(&list, i);
        assert!(s.online && (s.nvq, s.nvi) == (2, 1), "VF {i}: {s:?}");
    }
    let mgr = SriovManager::new(RealSysfs::new());
    let vfs = mgr.vfs(PciAddress::parse(&pf).unwrap()).unwrap();
    assert_eq!(vfs.len(), 3);
    for (i, vf) in &vfs {
        let _d0 = RuntimePmOn::new(&vf.to_string());
        let _mem = CommandMemoryOn::new(&vf.to_string());
        let vs = mgr.open_bar(*vf, 0).unwrap().read_u32(0x8).unwrap();
        assert_eq!(vs, QEMU_NVME_VS, "VF {i} {vf} after the count changes");
    }
}
