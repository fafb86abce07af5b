//! QEMU L2 guests for `svff bench --vmm qemu,qemu-stock` without `--config`:
//! one QEMU per VMM kind and VF count, holding every assigned VF on its
//! own PCIe root port (`svffrpI`, the VM's hotplug ports), booting the
//! machine's Linux kernel with a tiny initramfs that svff bench writes
//! itself (busybox and an `/init` that mounts sysfs and, once a second,
//! prints how many functions of the PF's VF device id it sees; no driver
//! binds to them). Stock QEMU gets `vfio-pci` devices, the patched QEMU
//! `svff-vfio-pci` (the device its svff commands pause).

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::VmmKind;
use crate::error::Error;
use crate::orch::device_id;
use crate::pci::PciAddress;

/// At most this many VFs per QEMU guest: one root port each on `pcie.0`,
/// whose 32 slots q35 shares with its own devices.
pub const MAX_QEMU_VFS: u16 = 24;

/// Guest RAM of a QEMU L2, MiB (the Debian kernel needs at least 256).
const L2_MEMORY_MIB: u32 = 320;

/// The first chassis/slot number of the root ports.
const FIRST_PORT: u16 = 20;

/// The line the guest's `/init` prints once a second.
pub const READY_MARK: &str = "svff-bench-l2 vfs=";

/// Where the QEMU guests' parts are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuPaths {
    /// Debian's `qemu-system-x86_64` (`--vmm qemu-stock`).
    pub stock: PathBuf,
    /// svff's patched QEMU (`--vmm qemu`; `make qemu` builds it).
    pub patched: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// A static busybox for the guest's initramfs.
    pub busybox: PathBuf,
    /// The firmware (qboot: SeaBIOS stalls under nested KVM in the lab).
    pub firmware: PathBuf,
}

impl QemuPaths {
    /// The binary of `kind` (None for svff-vmm and libvirt).
    pub fn binary(&self, kind: VmmKind) -> Option<&Path> {
        match kind {
            VmmKind::QemuStock => Some(&self.stock),
            VmmKind::Qemu => Some(&self.patched),
            VmmKind::SvffVmm | VmmKind::Libvirt => None,
        }
    }
}

/// What a QEMU guest of `kind` needs on this machine (`exists` tells
/// whether a path is there): checked before anything changes.
pub fn check(
    kind: VmmKind,
    paths: &QemuPaths,
    vfs: &[u16],
    exists: impl Fn(&Path) -> bool,
) -> Result<(), Error> {
    let Some(bin) = paths.binary(kind) else {
        return Ok(());
    };
    let name = kind.name();
    if !exists(bin) {
        return Err(Error::Usage(match kind {
            VmmKind::Qemu => format!(
                "--vmm qemu: svff's patched QEMU is not built ({} does not exist): run `make \
                 qemu`, or give --qemu PATH / SVFF_QEMU",
                bin.display()
            ),
            _ => format!(
                "--vmm {name}: {} does not exist (install qemu-system-x86, or give --qemu-stock PATH)",
                bin.display()
            ),
        }));
    }
    for (what, p) in [
        ("the guest kernel (--l2-kernel)", &paths.kernel),
        (
            "busybox for the guest's initramfs (busybox-static)",
            &paths.busybox,
        ),
        ("the qboot firmware (qemu-system-data)", &paths.firmware),
        ("/dev/kvm", &PathBuf::from("/dev/kvm")),
    ] {
        if !exists(p) {
            return Err(Error::Usage(format!(
                "--vmm {name}: {what}: {} does not exist",
                p.display()
            )));
        }
    }
    if let Some(&max) = vfs.iter().max().filter(|m| **m > MAX_QEMU_VFS) {
        return Err(Error::Usage(format!(
            "--vfs {max} --vmm {name}: a QEMU guest of svff bench holds at most {MAX_QEMU_VFS} \
             VFs (one PCIe root port each)"
        )));
    }
    Ok(())
}

/// The guest's `/init`: mounts proc and sysfs, then once a second prints
/// how many functions with vendor:device `vf_id` it sees (the VFs it holds).
fn init_script(vf_id: &str) -> String {
    format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         while :; do\n\
         n=0\n\
         for d in /sys/bus/pci/devices/*; do\n\
         [ \"$(cat $d/vendor 2>/dev/null)$(cat $d/device 2>/dev/null)\" = \"{vf_id}\" ] && n=$((n+1))\n\
         done\n\
         echo \"{READY_MARK}$n\"\n\
         sleep 1\n\
         done\n"
    )
}

/// A `newc` cpio archive (the initramfs format) of `entries`: `(path, mode, data)`,
/// directories with an empty `data` and a directory mode.
pub fn cpio(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |ino: u32, name: &str, mode: u32, data: &[u8]| {
        let namesize = name.len() + 1;
        let _ = write!(
            out,
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 1, 0, data.len(), 0, 0, 0, 0, 0
        );
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for (i, (name, mode, data)) in entries.iter().enumerate() {
        put(i as u32 + 1, name, *mode, data);
    }
    put(0, "TRAILER!!!", 0, &[]);
    out
}

/// Writes the guest's initramfs into `dir` and returns its path.
pub fn write_initramfs(dir: &Path, busybox: &Path, vf_id: &str) -> Result<PathBuf, Error> {
    let bb = fs::read(busybox).map_err(|e| Error::Bench {
        what: format!("reading {}", busybox.display()),
        source: Some(Box::new(e)),
    })?;
    let init = init_script(vf_id);
    let archive = cpio(&[
        ("bin", 0o040_755, &[]),
        ("proc", 0o040_755, &[]),
        ("sys", 0o040_755, &[]),
        ("dev", 0o040_755, &[]),
        ("bin/busybox", 0o100_755, &bb),
        ("init", 0o100_755, init.as_bytes()),
    ]);
    let path = dir.join("l2-initramfs.cpio");
    fs::write(&path, archive).map_err(|e| Error::Bench {
        what: format!("writing {}", path.display()),
        source: Some(Box::new(e)),
    })?;
    Ok(path)
}

/// The QEMU command line of a guest of `kind` holding `vfs` (VF index,
/// host address) of `pf`: root port `svffrpI` and device `svff-<pf>-vfI` per VF.
pub fn command_args(
    kind: VmmKind,
    paths: &QemuPaths,
    initrd: &Path,
    qmp: &Path,
    serial: &Path,
    pf: PciAddress,
    vfs: &[(u16, PciAddress)],
) -> Vec<String> {
    let driver = if kind == VmmKind::Qemu {
        "svff-vfio-pci"
    } else {
        "vfio-pci"
    };
    let mut a: Vec<String> = [
        "-accel",
        "kvm",
        "-machine",
        "q35",
        "-cpu",
        "host",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-smp",
        "1",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    a.extend([
        "-m".into(),
        L2_MEMORY_MIB.to_string(),
        "-bios".into(),
        paths.firmware.display().to_string(),
        "-kernel".into(),
        paths.kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        "console=ttyS0 quiet panic=-1".into(),
        "-serial".into(),
        format!("file:{}", serial.display()),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    for (k, (i, host)) in vfs.iter().enumerate() {
        let port = FIRST_PORT + k as u16;
        a.push("-device".into());
        a.push(format!(
            "pcie-root-port,id={},bus=pcie.0,chassis={port},slot={port}",
            port_name(k)
        ));
        a.push("-device".into());
        a.push(format!(
            "{driver},host={host},id={},bus={}",
            device_id(pf, *i),
            port_name(k)
        ));
    }
    a
}

/// The `k`th root port's id.
pub fn port_name(k: usize) -> String {
    format!("svffrp{k}")
}

/// A running QEMU guest; killed when dropped.
pub struct QemuVm {
    child: Child,
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A guest's files: QMP socket, serial console, QEMU's stderr.
pub struct GuestFiles {
    /// The QMP socket.
    pub qmp: PathBuf,
    /// The serial console (`-serial file:`).
    pub serial: PathBuf,
    /// QEMU's stderr.
    pub log: PathBuf,
}

/// Starts QEMU (`bin` with `args`, stderr to `files.log`) and waits until
/// its guest's `/init` printed [`READY_MARK`] with `want` VFs on the serial
/// console, within `deadline`.
pub fn start(
    name: &str,
    bin: &Path,
    args: &[String],
    files: &GuestFiles,
    want: u16,
    deadline: Duration,
) -> Result<QemuVm, Error> {
    let (qmp, serial, log) = (&files.qmp, &files.serial, &files.log);
    let _ = fs::remove_file(qmp);
    let _ = fs::remove_file(serial);
    let logf = fs::File::create(log).map_err(|e| Error::Bench {
        what: format!("creating {}", log.display()),
        source: Some(Box::new(e)),
    })?;
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .map_err(|e| Error::Bench {
            what: format!("starting {} for VM {name}", bin.display()),
            source: Some(Box::new(e)),
        })?;
    let mut vm = QemuVm { child };
    let end = Instant::now() + deadline;
    let want_line = format!("{READY_MARK}{want}");
    loop {
        let text = fs::read_to_string(serial).unwrap_or_default();
        if text.lines().any(|l| l.trim() == want_line) {
            return Ok(vm);
        }
        if let Ok(Some(st)) = vm.child.try_wait() {
            let log = fs::read_to_string(log).unwrap_or_default();
            return Err(Error::Bench {
                what: format!(
                    "VM {name}: QEMU exited ({st}) before its guest was up: {}",
                    log.trim()
                ),
                source: None,
            });
        }
        if Instant::now() >= end {
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            return Err(Error::Bench {
                what: format!(
                    "VM {name}: its L2 guest did not print {want_line:?} within {} s (console tail: {:?})",
                    deadline.as_secs(),
                    tail
                ),
                source: None,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
