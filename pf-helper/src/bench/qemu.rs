//! QEMU L2 guests for `svff bench --vmm qemu,qemu-stock` without `--config`:
//! one QEMU per VMM kind and VF count, holding every assigned VF on its
//! own PCIe root port (`svffrpI`, the VM's hotplug ports), booting the
//! machine's Linux kernel with a tiny initramfs that svff bench writes
//! itself (busybox, the guest driver's kernel modules when the VFs have one
//! (`nvme` on the nvme profile), and an `/init` that loads them and, four
//! times a second, prints how many functions of the PF's VF device id it
//! sees, how many of them the driver holds and, for nvme, how many
//! controllers are `live`). Stock QEMU gets `vfio-pci` devices, the patched
//! QEMU `svff-vfio-pci` (the device its svff commands pause), with
//! `recover=aer` when a driver is bound: the unpaused VF comes back reset,
//! and the AER error QEMU then signals makes the guest driver recover it.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::guest::follow;

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

/// The line the guest's `/init` prints four times a second:
/// `svff-bench-l2 vfs=N` and, with a driver, ` bound=B live=L`.
pub const READY_MARK: &str = "svff-bench-l2 vfs=";

/// The `recover=` mode of the patched QEMU's `svff-vfio-pci` when the guest
/// has a driver bound (as `lab_qemu`'s nvme test): after an unpause QEMU
/// signals an AER error on the VF's root port, and the guest's AER core has
/// the driver reset and re-initialise the (reset) function.
pub const RECOVER: &str = "aer";

/// The guest driver of the VFs of a PF profile with vendor:device `vf_id`
/// (`1b36:0010` style without colon, as sysfs prints them run together):
/// `nvme` for the nvme profile (online secondary controllers); none
/// otherwise (a VF under pci-pf-stub is offline, an igb VF's mailbox has no
/// PF driver to answer it).
pub fn guest_driver(nvme_profile: bool) -> Option<&'static str> {
    nvme_profile.then_some("nvme")
}

/// One line of the guest's `/init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Line {
    /// Functions with the VFs' vendor:device the guest sees.
    pub vfs: u16,
    /// Of them, those bound to the driver (None: no driver loaded).
    pub bound: Option<u16>,
    /// nvme controllers whose state is `live` (None: no driver loaded).
    pub live: Option<u16>,
    /// AER recoveries the guest's kernel logged as successful so far
    /// (`AER: device recovery successful`; None: no driver loaded).
    pub aer: Option<u32>,
}

impl L2Line {
    /// Whether the guest holds `n` VFs, each driven (bound and live) when a driver is loaded.
    pub fn ready(&self, n: u16) -> bool {
        self.vfs == n && self.bound.is_none_or(|b| b == n) && self.live.is_none_or(|l| l == n)
    }
}

/// Parses a console line holding [`READY_MARK`] (kernel messages may share
/// the line's start); None for any other line.
pub fn parse_line(line: &str) -> Option<L2Line> {
    let at = line.find(READY_MARK)?;
    let mut vfs = None;
    let mut bound = None;
    let mut live = None;
    let mut aer = None;
    for kv in line[at + "svff-bench-l2 ".len()..].split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        match k {
            "vfs" => vfs = Some(v.parse().ok()?),
            "bound" => bound = Some(v.parse().ok()?),
            "live" => live = Some(v.parse().ok()?),
            "aer" => aer = Some(v.parse().ok()?),
            _ => return None,
        }
    }
    Some(L2Line {
        vfs: vfs?,
        bound,
        live,
        aer,
    })
}

/// The kernel modules `root` needs from `modules_dep` (the text of
/// `/lib/modules/<release>/modules.dep`, whose line for a module lists all
/// its dependencies, each after the ones it needs), in load order: the
/// dependencies last to first, then `root` itself. Paths as in the file.
pub fn module_load_order(modules_dep: &str, root: &str) -> Result<Vec<String>, Error> {
    let wanted = |p: &str| {
        let file = p.rsplit('/').next().unwrap_or(p);
        let stem = file.split(".ko").next().unwrap_or(file);
        stem.replace('-', "_") == root.replace('-', "_")
    };
    let line = modules_dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(p, _)| wanted(p))
        .ok_or_else(|| Error::Bench {
            what: format!("kernel module {root} is not in modules.dep"),
            source: None,
        })?;
    let mut out: Vec<String> = line.1.split_whitespace().rev().map(str::to_owned).collect();
    out.push(line.0.to_owned());
    Ok(out)
}

/// The module at `path`, decompressed (`.xz` with `xz -dc` or busybox's
/// `xzcat`, `.gz` with `gzip -dc` or busybox's `zcat`, `.zst` with `zstd -dc`).
fn read_module(path: &Path, busybox: &Path) -> Result<Vec<u8>, Error> {
    let name = path.to_string_lossy().into_owned();
    let bb = busybox.to_string_lossy().into_owned();
    let tools: Vec<Vec<&str>> = if name.ends_with(".xz") {
        vec![vec!["xz", "-dc"], vec![&bb, "xzcat"]]
    } else if name.ends_with(".gz") {
        vec![vec!["gzip", "-dc"], vec![&bb, "zcat"]]
    } else if name.ends_with(".zst") {
        vec![vec!["zstd", "-dc"]]
    } else {
        return fs::read(path).map_err(|e| Error::Bench {
            what: format!("reading {name}"),
            source: Some(Box::new(e)),
        });
    };
    for argv in &tools {
        let Ok(out) = Command::new(argv[0]).args(&argv[1..]).arg(path).output() else {
            continue;
        };
        if !out.status.success() {
            return Err(Error::Bench {
                what: format!(
                    "decompressing {name} with {}: {}",
                    argv.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                source: None,
            });
        }
        return Ok(out.stdout);
    }
    Err(Error::Bench {
        what: format!("no decompressor for {name} (tried {tools:?}; install xz-utils)"),
        source: None,
    })
}

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

/// The guest's `/init`: mounts proc and sysfs, loads `modules` (paths in
/// the initramfs, in load order), then four times a second prints how many
/// functions with vendor:device `vf_id` it sees and, with `driver`, how many
/// of them that driver holds and how many nvme controllers are `live`.
pub(super) fn init_script(vf_id: &str, driver: Option<&str>, modules: &[String]) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n",
    );
    for m in modules {
        s.push_str(&format!(
            "insmod /{m} || echo \"svff-bench-l2: insmod {m} failed\"\n"
        ));
    }
    s.push_str(
        "while :; do\n\
         n=0; b=0; l=0\n\
         for d in /sys/bus/pci/devices/*; do\n",
    );
    s.push_str(&format!(
        "[ \"$(cat $d/vendor 2>/dev/null)$(cat $d/device 2>/dev/null)\" = \"{vf_id}\" ] || continue\n\
         n=$((n+1))\n"
    ));
    match driver {
        Some(drv) => {
            s.push_str(&format!(
                "case \"$(readlink $d/driver 2>/dev/null)\" in */{drv}) b=$((b+1));; esac\n\
                 done\n\
                 for c in /sys/class/nvme/*; do\n\
                 [ \"$(cat $c/state 2>/dev/null)\" = live ] && l=$((l+1))\n\
                 done\n\
                 a=$(dmesg | grep -c 'AER: device recovery successful')\n\
                 echo \"{READY_MARK}$n bound=$b live=$l aer=$a\"\n"
            ));
        }
        None => {
            s.push_str(&format!("done\necho \"{READY_MARK}$n\"\n"));
        }
    }
    s.push_str("sleep 0.25\ndone\n");
    s
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

/// Writes the guest's initramfs into `dir` and returns its path: busybox,
/// `/init`, and with `driver` its modules and their dependencies from
/// `/lib/modules/<release>` (`modules_dir`; the guest runs the machine's
/// kernel), decompressed, loaded by `/init` in order.
pub fn write_initramfs(
    dir: &Path,
    busybox: &Path,
    vf_id: &str,
    driver: Option<&str>,
    modules_dir: &Path,
) -> Result<PathBuf, Error> {
    let bb = fs::read(busybox).map_err(|e| Error::Bench {
        what: format!("reading {}", busybox.display()),
        source: Some(Box::new(e)),
    })?;
    let mut mods: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(drv) = driver {
        let dep_path = modules_dir.join("modules.dep");
        let dep = fs::read_to_string(&dep_path).map_err(|e| Error::Bench {
            what: format!(
                "reading {} (the guest driver {drv}'s modules)",
                dep_path.display()
            ),
            source: Some(Box::new(e)),
        })?;
        for m in module_load_order(&dep, drv)? {
            let file = m.rsplit('/').next().unwrap_or(&m);
            let stem = file.split(".ko").next().unwrap_or(file);
            let data = read_module(&modules_dir.join(&m), busybox)?;
            mods.push((format!("modules/{stem}.ko"), data));
        }
    }
    let names: Vec<String> = mods.iter().map(|(n, _)| n.clone()).collect();
    let init = init_script(vf_id, driver, &names);
    let mut entries: Vec<(&str, u32, &[u8])> = vec![
        ("bin", 0o040_755, &[]),
        ("proc", 0o040_755, &[]),
        ("sys", 0o040_755, &[]),
        ("dev", 0o040_755, &[]),
        ("modules", 0o040_755, &[]),
        ("bin/busybox", 0o100_755, &bb),
        ("init", 0o100_755, init.as_bytes()),
    ];
    for (n, d) in &mods {
        entries.push((n, 0o100_644, d));
    }
    let archive = cpio(&entries);
    let path = dir.join(format!("l2-initramfs-{}.cpio", driver.unwrap_or("none")));
    fs::write(&path, archive).map_err(|e| Error::Bench {
        what: format!("writing {}", path.display()),
        source: Some(Box::new(e)),
    })?;
    Ok(path)
}

/// The QEMU command line of a guest of `kind` holding `vfs` (VF index,
/// host address) of `pf`: root port `svffrpI` and device `svff-<pf>-vfI` per
/// VF; the patched QEMU's devices get `recover=`[`RECOVER`] when the guest
/// has a driver bound (`guest_driver`). QMP socket and console from `files`.
pub fn command_args(
    kind: VmmKind,
    paths: &QemuPaths,
    initrd: &Path,
    files: &GuestFiles,
    pf: PciAddress,
    vfs: &[(u16, PciAddress)],
    guest_driver: bool,
) -> Vec<String> {
    let driver = match (kind, guest_driver) {
        (VmmKind::Qemu, true) => format!("svff-vfio-pci,recover={RECOVER}"),
        (VmmKind::Qemu, false) => "svff-vfio-pci".to_owned(),
        _ => "vfio-pci".to_owned(),
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
        format!("file:{}", files.serial.display()),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", files.qmp.display()),
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

/// A running QEMU guest; killed when dropped. Its console lines
/// ([`parse_line`]) are followed and timestamped as they arrive.
pub struct QemuVm {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, L2Line)>>>,
    stop: Arc<AtomicBool>,
    follower: Option<JoinHandle<()>>,
}

impl QemuVm {
    /// The console lines so far, with their arrival times.
    pub fn lines(&self) -> Vec<(Instant, L2Line)> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (bounded by `deadline`) until `done` holds for the lines so
    /// far; false when the deadline passed first.
    pub fn wait_lines(
        &self,
        deadline: Duration,
        mut done: impl FnMut(&[(Instant, L2Line)]) -> bool,
    ) -> bool {
        let end = Instant::now() + deadline;
        loop {
            if done(&self.lines.lock().unwrap_or_else(|p| p.into_inner())) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.follower.take() {
            let _ = t.join();
        }
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
/// its guest's `/init` printed a line with `want` VFs (each bound and live
/// when a driver is loaded: [`L2Line::ready`]) on the serial console, within `deadline`.
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
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let l2 = lines.clone();
    let follower = follow(serial.clone(), stop.clone(), move |line| {
        if let Some(l) = parse_line(line) {
            l2.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((Instant::now(), l));
        }
    });
    let mut vm = QemuVm {
        child,
        lines,
        stop,
        follower: Some(follower),
    };
    let end = Instant::now() + deadline;
    loop {
        if vm.lines().iter().any(|(_, l)| l.ready(want)) {
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
            let text = fs::read_to_string(serial).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            return Err(Error::Bench {
                what: format!(
                    "VM {name}: its L2 guest did not report {want} VFs (bound and live with a \
                     driver) within {} s (console tail: {:?})",
                    deadline.as_secs(),
                    tail
                ),
                source: None,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
