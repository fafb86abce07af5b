//! L2 guests: a Linux VM started *inside* L1 (nested KVM) by a VMM under test, for lab tests
//! that need a guest to see a device.
//!
//! An [`Image`] is a busybox initramfs with the kernel modules a test names (resolved from
//! `modules.dep`, decompressed, loadable with `modprobe` in the guest), files and a setup script
//! of the test, cached by a hash of its inputs. [`L2::boot`] starts a [`Vmm`] on it with L1's own
//! kernel, waits for the guest's ready line (bounded) and then runs shell scripts in the guest
//! over a control channel, with their stdout, stderr and exit status ([`L2::sh`]). Dropping an
//! [`L2`] kills the VMM; it also dies with the test process (parent-death signal).
//!
//! ```no_run
//! use std::time::Duration;
//! use svff_lab::l2::{Image, Qemu, L2};
//! let initrd = Image::new().module("igbvf").build()?;
//! let qemu = Qemu::stock().device("vfio-pci,host=0000:01:10.0");
//! let mut vm = L2::boot(&qemu, &initrd, Duration::from_secs(120))?;
//! let out = vm.sh("modprobe igbvf && ls /sys/bus/pci/drivers/igbvf", Duration::from_secs(60))?;
//! assert!(out.success(), "{out:?}");
//! # Ok::<(), svff_lab::LabError>(())
//! ```
//!
//! The control protocol is line based: the host sends `<nonce> <base64 script>`, the guest's
//! init (`l2_init.sh`) answers with lines `@@<nonce> o|e <base64>` and one `@@<nonce> x <status>`.
//! Lines without the current nonce (kernel messages on a shared console, stale output) are
//! ignored, so the channel may be a dedicated virtio-serial port ([`Control::Virtio`], the
//! default) or a serial port ([`Control::Tty`]) for VMMs without virtio.

use std::collections::BTreeSet;
use std::fs;
use std::hash::Hasher;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::initramfs::{cached_cpio, read_module, stamp, Fnv, BUSYBOX};
use crate::session::{
    accept_before, console_tail_of, kill_and_reap, make_session_dir, spawn_qemu, Accepted,
};
use crate::{resolve_modules, LabError, Output};

const INIT: &str = include_str!("l2_init.sh");

/// Name of the virtio-serial port [`Qemu`] gives the guest for the control channel.
pub const CTL_PORT: &str = "svff.l2";

/// Longest line accepted from the guest (a base64 line is 76 characters; more is garbage).
const MAX_LINE: usize = 64 * 1024;

/// The running kernel's release (L1 boots the same kernel the guest gets).
fn kernel_release() -> Result<String, LabError> {
    let p = "/proc/sys/kernel/osrelease";
    Ok(fs::read_to_string(p)
        .map_err(|e| LabError::io(p, e))?
        .trim()
        .to_owned())
}

/// The guest kernel: `/boot/vmlinuz-<release of the running kernel>`.
pub fn default_kernel() -> Result<PathBuf, LabError> {
    let k = PathBuf::from(format!("/boot/vmlinuz-{}", kernel_release()?));
    if k.is_file() {
        Ok(k)
    } else {
        Err(LabError::Missing {
            what: "the L2 kernel".into(),
            detail: format!("{} does not exist", k.display()),
            install: crate::INSTALL_HINT.into(),
        })
    }
}

/// Where built images are cached: `SVFF_LAB_CACHE` or `~/.cache/svff-lab` (in L1 a tmpfs that
/// lives as long as the boot), subdirectory `l2`.
fn cache_dir() -> PathBuf {
    crate::config::cache_dir().join("l2")
}

/// A guest initramfs under construction: busybox, modules, files, a setup script.
#[derive(Debug, Clone, Default)]
pub struct Image {
    kernel_version: Option<String>,
    modules: Vec<String>,
    files: Vec<(String, u32, Vec<u8>)>,
    setup: Option<String>,
}

fn bad_path(path: &str) -> bool {
    path.is_empty()
        || path.starts_with('/')
        || path.ends_with('/')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
}

impl Image {
    /// An image for the running kernel with nothing but busybox and the control loop.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds for kernel `version` (`/lib/modules/<version>`) instead of the running one.
    pub fn kernel_version(mut self, version: &str) -> Self {
        self.kernel_version = Some(version.to_owned());
        self
    }

    /// Adds kernel module `name` and its dependencies; the guest loads it with `modprobe name`.
    pub fn module(mut self, name: &str) -> Self {
        self.modules.push(name.to_owned());
        self
    }

    /// Adds a file at `path` (relative to the guest's root, e.g. `etc/x.conf`) with mode `perm`.
    pub fn file(mut self, path: &str, perm: u32, data: impl Into<Vec<u8>>) -> Self {
        self.files.push((path.to_owned(), perm, data.into()));
        self
    }

    /// A `sh` script the guest runs before it reports ready; a non-zero exit fails the boot.
    pub fn setup(mut self, script: &str) -> Self {
        self.setup = Some(script.to_owned());
        self
    }

    /// Writes the image (unless a cached one with the same inputs exists) and returns its path.
    pub fn build(&self) -> Result<PathBuf, LabError> {
        self.build_in(&cache_dir())
    }

    /// [`Image::build`] into `dir`.
    pub fn build_in(&self, dir: &Path) -> Result<PathBuf, LabError> {
        let version = match &self.kernel_version {
            Some(v) => v.clone(),
            None => kernel_release()?,
        };
        for (p, _, _) in &self.files {
            if bad_path(p) {
                return Err(LabError::Invalid(format!(
                    "L2 image file path {p:?} must be relative, without empty, . or .. parts"
                )));
            }
        }
        if !Path::new(BUSYBOX).exists() {
            return Err(LabError::Missing {
                what: "busybox".into(),
                detail: BUSYBOX.into(),
                install: "apt-get install busybox-static".into(),
            });
        }
        let moddir = PathBuf::from("/lib/modules").join(&version);
        let dep_path = moddir.join("modules.dep");
        let dep_text = if self.modules.is_empty() {
            String::new()
        } else {
            fs::read_to_string(&dep_path).map_err(|e| LabError::io(&dep_path, e))?
        };
        let roots: Vec<&str> = self.modules.iter().map(String::as_str).collect();
        let order = resolve_modules(&dep_text, &roots)?;
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        h.write(INIT.as_bytes());
        h.write(version.as_bytes());
        stamp(&mut h, Path::new(BUSYBOX))?;
        for m in &order {
            h.write(m.as_bytes());
            stamp(&mut h, &moddir.join(m))?;
        }
        for (p, perm, data) in &self.files {
            h.write(p.as_bytes());
            h.write(&perm.to_le_bytes());
            h.write(&(data.len() as u64).to_le_bytes());
            h.write(data);
        }
        if let Some(s) = &self.setup {
            h.write(b"setup\0");
            h.write(s.as_bytes());
        }
        let name = format!("l2-{version}-{:016x}.cpio", h.finish());
        cached_cpio(dir, &name, |w, io| {
            let mut dirs = BTreeSet::new();
            let mut mkdirs = |w: &mut crate::initramfs::CacheWriter, path: &str| {
                let mut at = 0;
                while let Some(i) = path[at..].find('/') {
                    let d = &path[..at + i];
                    if dirs.insert(d.to_owned()) {
                        w.dir(d).map_err(io)?;
                    }
                    at += i + 1;
                }
                Ok::<(), LabError>(())
            };
            for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "run"] {
                mkdirs(w, &format!("{d}/"))?;
            }
            w.char_dev("dev/console", 5, 1).map_err(io)?;
            w.char_dev("dev/null", 1, 3).map_err(io)?;
            let bb = fs::read(BUSYBOX).map_err(|e| LabError::io(BUSYBOX, e))?;
            w.file("bin/busybox", 0o755, &bb).map_err(io)?;
            w.file("init", 0o755, INIT.as_bytes()).map_err(io)?;
            // Modules go where modprobe looks, decompressed, with a modules.dep of their own.
            let kdir = format!("lib/modules/{version}");
            let plain = |m: &str| {
                let stem = m.split(".ko").next().unwrap_or(m);
                format!("{stem}.ko")
            };
            let full = resolve_full_deps(&dep_text);
            let mut dep = String::new();
            for m in &order {
                let data = read_module(&moddir.join(m))?;
                let path = format!("{kdir}/{}", plain(m));
                mkdirs(w, &path)?;
                w.file(&path, 0o644, &data).map_err(io)?;
                let deps = full.get(m.as_str()).cloned().unwrap_or_default();
                let deps: Vec<String> = deps.iter().map(|d| plain(d)).collect();
                dep.push_str(&format!("{}: {}\n", plain(m), deps.join(" ")));
            }
            mkdirs(w, &format!("{kdir}/modules.dep"))?;
            w.file(&format!("{kdir}/modules.dep"), 0o644, dep.as_bytes())
                .map_err(io)?;
            for (p, perm, data) in &self.files {
                mkdirs(w, p)?;
                w.file(p, *perm, data).map_err(io)?;
            }
            if let Some(s) = &self.setup {
                w.file("svff-setup.sh", 0o755, s.as_bytes()).map_err(io)?;
            }
            Ok(())
        })
    }
}

/// `modules.dep` as a map from module path to its dependency paths.
fn resolve_full_deps(text: &str) -> std::collections::BTreeMap<&str, Vec<&str>> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(p, rest)| (p, rest.split_whitespace().collect()))
        .collect()
}

/// How the guest reaches its control channel (the kernel parameter `svff.ctl=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A virtio-serial port with this name (`/sys/class/virtio-ports/*/name`).
    Virtio(String),
    /// A tty device, e.g. `ttyS1` (put in raw mode, echo off).
    Tty(String),
}

impl Control {
    fn param(&self) -> String {
        match self {
            Control::Virtio(n) => format!("svff.ctl=virtio:{n}"),
            Control::Tty(t) => format!("svff.ctl={t}"),
        }
    }
}

/// What a [`Vmm`] must wire up for one L2 boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The initramfs ([`Image::build`]).
    pub initrd: PathBuf,
    /// The kernel command line (console, control channel, panic behaviour).
    pub append: String,
    /// A file the guest console (its first serial port) must be written to.
    pub console_log: PathBuf,
    /// A unix socket, listened on by the lab, the VMM must connect the control channel to.
    pub control_socket: PathBuf,
}

/// A VMM that can boot an L2 guest: stock QEMU ([`Qemu`]) now, svff's own VMM and the patched
/// QEMU later.
pub trait Vmm {
    /// A short name for messages (`qemu`, `svff-vmm`).
    fn name(&self) -> String;
    /// The guest side of the control channel this VMM provides.
    fn control(&self) -> Control;
    /// Extra kernel parameters (e.g. `console=ttyS0`); the lab adds its own after these.
    fn kernel_params(&self) -> String {
        "console=ttyS0".into()
    }
    /// The command that starts the VMM for `spec`. Its stdout and stderr go to a log the lab
    /// shows when the guest fails.
    fn command(&self, spec: &BootSpec) -> Command;
}

/// Stock QEMU in L1 with KVM: `-accel kvm -machine q35 -cpu host -bios qboot.rom`, direct kernel
/// boot, console on the first serial port, the control channel on a virtio-serial port.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The binary (`qemu-system-x86_64`, or a patched build).
    pub binary: PathBuf,
    /// Guest memory; the Debian kernel needs at least 256 MiB.
    pub memory_mib: u32,
    /// Guest vCPUs.
    pub cpus: u32,
    /// Arguments before the lab's own (machine, accelerator, firmware, devices).
    pub args: Vec<String>,
    /// Extra guest kernel parameters.
    pub append: Vec<String>,
}

impl Qemu {
    /// Stock QEMU as DESIGN's lab recipe runs it in L1 (qboot: SeaBIOS stalls under nesting).
    pub fn stock() -> Self {
        let args = [
            "-accel",
            "kvm",
            "-machine",
            "q35",
            "-cpu",
            "host",
            "-bios",
            "/usr/share/qemu/qboot.rom",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
        ];
        Qemu {
            binary: PathBuf::from("qemu-system-x86_64"),
            memory_mib: 512,
            cpus: 1,
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            append: Vec::new(),
        }
    }

    /// Adds a guest kernel parameter, e.g. `iomem=relaxed`.
    pub fn kernel_param(mut self, p: &str) -> Self {
        self.append.push(p.to_owned());
        self
    }

    /// Adds `-device <spec>`, e.g. `vfio-pci,host=0000:01:10.0`.
    pub fn device(mut self, spec: &str) -> Self {
        self.args.extend(["-device".into(), spec.to_owned()]);
        self
    }

    /// Adds raw arguments.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_owned());
        self
    }
}

impl Vmm for Qemu {
    fn name(&self) -> String {
        format!("QEMU ({})", self.binary.display())
    }

    fn control(&self) -> Control {
        Control::Virtio(CTL_PORT.into())
    }

    fn kernel_params(&self) -> String {
        std::iter::once("console=ttyS0")
            .chain(self.append.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn command(&self, spec: &BootSpec) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args)
            .args([
                "-smp",
                &self.cpus.to_string(),
                "-m",
                &self.memory_mib.to_string(),
            ])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initrd)
            .args(["-append", &spec.append])
            .arg("-serial")
            .arg(format!("file:{}", spec.console_log.display()))
            .args(["-device", "virtio-serial-pci,id=svffser"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=svffctl,path={}",
                spec.control_socket.display()
            ))
            .args([
                "-device",
                &format!("virtserialport,bus=svffser.0,chardev=svffctl,name={CTL_PORT}"),
            ]);
        cmd
    }
}

/// A running L2 guest. Dropping it kills the VMM and removes its session directory.
#[derive(Debug)]
pub struct L2 {
    pid: i32,
    exited: mpsc::Receiver<ExitStatus>,
    dir: PathBuf,
    vmm: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    dead: bool,
    seq: u64,
    kernel: String,
    /// Time from the VMM's start to the guest's ready line.
    pub boot_time: Duration,
}

/// Decodes base64 (standard alphabet, padded), as busybox `base64` writes it.
fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim().as_bytes();
    if s.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for q in s.chunks(4) {
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

fn b64_encode(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One line of the guest's reply to command `nonce`.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Out(Vec<u8>),
    Err(Vec<u8>),
    Exit(i32),
    /// Not for this command (kernel message, stale output): skipped.
    Other,
}

fn parse_line(line: &str, nonce: &str) -> Result<Line, String> {
    let Some(rest) = line
        .trim_end_matches(['\r', '\n'])
        .strip_prefix("@@")
        .and_then(|r| r.strip_prefix(nonce))
        .and_then(|r| r.strip_prefix(' '))
    else {
        return Ok(Line::Other);
    };
    let (kind, body) = rest.split_once(' ').unwrap_or((rest, ""));
    let decode = || b64_decode(body).ok_or_else(|| format!("bad base64 in {line:?}"));
    match kind {
        "o" => Ok(Line::Out(decode()?)),
        "e" => Ok(Line::Err(decode()?)),
        "x" => body
            .trim()
            .parse()
            .map(Line::Exit)
            .map_err(|_| format!("bad exit status in {line:?}")),
        _ => Err(format!("unknown reply {line:?}")),
    }
}

impl L2 {
    /// Boots the guest in `initrd` with L1's kernel under `vmm` and waits until its init reports
    /// ready, at most `deadline` after the start. A guest that does not come up is killed and
    /// reported with the tail of its console.
    pub fn boot(vmm: &dyn Vmm, initrd: &Path, deadline: Duration) -> Result<L2, LabError> {
        Self::boot_kernel(vmm, &default_kernel()?, initrd, deadline)
    }

    /// [`L2::boot`] with a given kernel.
    pub fn boot_kernel(
        vmm: &dyn Vmm,
        kernel: &Path,
        initrd: &Path,
        deadline: Duration,
    ) -> Result<L2, LabError> {
        let dir = make_session_dir()?;
        let sock = dir.join("l2ctl.sock");
        let listener = match UnixListener::bind(&sock) {
            Ok(l) => l,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(LabError::io(&sock, e));
            }
        };
        let spec = BootSpec {
            kernel: kernel.to_owned(),
            initrd: initrd.to_owned(),
            append: format!(
                "{} panic=-1 quiet loglevel=4 rdinit=/init {}",
                vmm.kernel_params(),
                vmm.control().param()
            ),
            console_log: dir.join("console.log"),
            control_socket: sock.clone(),
        };
        let log = dir.join("vmm.log");
        let mut cmd = vmm.command(&spec);
        let out = fs::File::create(&log).map_err(|e| LabError::io(&log, e));
        let out = match out.and_then(|f| {
            let f2 = f.try_clone().map_err(|e| LabError::io(&log, e))?;
            Ok((f, f2))
        }) {
            Ok(o) => o,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        cmd.stdin(Stdio::null()).stdout(out.0).stderr(out.1);
        let start = Instant::now();
        let (pid, exited) = match spawn_qemu(cmd) {
            Ok(p) => p,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(LabError::Vm(format!("{}: {e}", vmm.name())));
            }
        };
        let until = start + deadline;
        let accepted = accept_before(&listener, until, &exited);
        // From here on the L2 value owns the VMM and the directory (Drop cleans up).
        let (reader, writer) = match accepted {
            Ok(Accepted::Stream(s)) => match s.try_clone() {
                Ok(w) => (BufReader::new(s), w),
                Err(e) => return Err(cleanup_err(pid, &exited, &dir, LabError::io(&sock, e))),
            },
            Ok(Accepted::Exited(st)) => {
                let e = guest_error(&vmm.name(), &format!("exited ({st}) at start"), &dir);
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
            Ok(Accepted::TimedOut) => {
                let e = guest_error(&vmm.name(), "never connected its control channel", &dir);
                return Err(cleanup_err(pid, &exited, &dir, e));
            }
            Err(e) => return Err(cleanup_err(pid, &exited, &dir, e)),
        };
        let mut vm = L2 {
            pid,
            exited,
            dir,
            vmm: vmm.name(),
            reader,
            writer,
            dead: false,
            seq: 0,
            kernel: String::new(),
            boot_time: Duration::ZERO,
        };
        loop {
            let line =
                vm.read_line(until, start, "booting (waiting for the guest's ready line)")?;
            if let Some(k) = line.trim_end().strip_prefix("@@svff ready ") {
                vm.kernel = k.to_owned();
                break;
            }
            if let Some(rc) = line.trim_end().strip_prefix("@@svff failed ") {
                let e = vm.fail(&format!("setup script exited with {rc}"));
                return Err(e);
            }
        }
        vm.boot_time = start.elapsed();
        Ok(vm)
    }

    /// The guest's kernel release, as it reported it.
    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    /// The VMM's pid (in L1).
    pub fn vmm_pid(&self) -> i32 {
        self.pid
    }

    /// The session directory (console log, VMM log, control socket); removed on drop.
    pub fn session_dir(&self) -> &Path {
        &self.dir
    }

    /// The last `lines` lines of the guest console.
    pub fn console_tail(&self, lines: usize) -> String {
        console_tail_of(&self.dir, lines)
    }

    fn fail(&mut self, what: &str) -> LabError {
        self.kill();
        guest_error(&self.vmm, what, &self.dir)
    }

    /// Reads one line from the control channel, failing (and killing the guest) at `until`.
    fn read_line(
        &mut self,
        until: Instant,
        started: Instant,
        what: &str,
    ) -> Result<String, LabError> {
        if self.dead {
            return Err(LabError::Guest {
                vmm: self.vmm.clone(),
                what: "is no longer running (an earlier command failed or timed out)".into(),
                console: String::new(),
            });
        }
        let mut line = String::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let after = started.elapsed().as_secs();
                return Err(self.fail(&format!("timed out after {after} s while {what}")));
            }
            if let Err(e) = self.reader.get_ref().set_read_timeout(Some(left)) {
                return Err(self.fail(&format!("control socket: {e}")));
            }
            let mut limited = (&mut self.reader).take((MAX_LINE - line.len()) as u64 + 1);
            match limited.read_line(&mut line) {
                Ok(0) => {
                    let st = self
                        .exited
                        .recv_timeout(Duration::from_secs(5))
                        .map(|s| s.to_string())
                        .unwrap_or_else(|_| "still running".into());
                    return Err(
                        self.fail(&format!("closed its control channel ({st}) while {what}"))
                    );
                }
                Ok(_) if line.ends_with('\n') => return Ok(line),
                Ok(_) if line.len() > MAX_LINE => {
                    return Err(
                        self.fail(&format!("sent a line over {MAX_LINE} bytes while {what}"))
                    )
                }
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(self.fail(&format!("control channel: {e} while {what}"))),
            }
        }
    }

    /// Runs `script` with the guest's `sh` (busybox) as root, stdin from /dev/null, and returns
    /// its output and exit status. Past `timeout` the guest is killed and every later call fails.
    pub fn sh(&mut self, script: &str, timeout: Duration) -> Result<Output, LabError> {
        self.seq += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let nonce = format!("{:x}{:08x}{}", std::process::id(), nanos, self.seq);
        let what = format!("running `{}`", script.lines().next().unwrap_or(""));
        let msg = format!("{nonce} {}\n", b64_encode(script.as_bytes()));
        if self.dead {
            return Err(LabError::Guest {
                vmm: self.vmm.clone(),
                what: "is no longer running (an earlier command failed or timed out)".into(),
                console: String::new(),
            });
        }
        let started = Instant::now();
        if let Err(e) = self.writer.write_all(msg.as_bytes()) {
            return Err(self.fail(&format!("control channel write: {e} while {what}")));
        }
        let until = started + timeout;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            let line = self.read_line(until, started, &what)?;
            match parse_line(&line, &nonce) {
                Ok(Line::Out(b)) => stdout.extend(b),
                Ok(Line::Err(b)) => stderr.extend(b),
                Ok(Line::Exit(code)) => {
                    return Ok(Output {
                        code: Some(code),
                        signal: None,
                        stdout: String::from_utf8_lossy(&stdout).into_owned(),
                        stderr: String::from_utf8_lossy(&stderr).into_owned(),
                    })
                }
                Ok(Line::Other) => {}
                Err(e) => return Err(self.fail(&format!("garbled reply ({e}) while {what}"))),
            }
        }
    }

    /// Like [`L2::sh`], but a non-zero exit is an error carrying the script and its output.
    pub fn sh_ok(&mut self, script: &str, timeout: Duration) -> Result<String, LabError> {
        let out = self.sh(script, timeout)?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(LabError::Guest {
                vmm: self.vmm.clone(),
                what: format!(
                    "script `{script}` exited with {:?}: stdout {:?}, stderr {:?}",
                    out.code, out.stdout, out.stderr
                ),
                console: String::new(),
            })
        }
    }

    /// Runs the shell condition `cond` in the guest every 0.1 s until it holds, for at most
    /// `limit_s` seconds (the guest counts its polls; the host call is bounded by the same limit
    /// plus 30 s). `Ok(false)` when the limit passed with `cond` still false.
    pub fn sh_until(&mut self, cond: &str, limit_s: u32) -> Result<bool, LabError> {
        let script = format!(
            "i=0; until {cond}; do i=$((i+1)); [ $i -gt {} ] && exit 1; sleep 0.1; done",
            limit_s * 10
        );
        let out = self.sh(&script, Duration::from_secs(u64::from(limit_s) + 30))?;
        Ok(out.success())
    }

    /// The guest kernel's log.
    pub fn dmesg(&mut self) -> Result<String, LabError> {
        self.sh_ok("dmesg", Duration::from_secs(60))
    }

    fn kill(&mut self) {
        if !self.dead {
            self.dead = true;
            kill_and_reap(self.pid, &self.exited);
        }
    }
}

impl Drop for L2 {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Kills the VMM, removes its directory and returns `e`.
fn cleanup_err(pid: i32, exited: &mpsc::Receiver<ExitStatus>, dir: &Path, e: LabError) -> LabError {
    kill_and_reap(pid, exited);
    let _ = fs::remove_dir_all(dir);
    e
}

/// An error naming the VMM, with what it said and the tail of the guest console.
fn guest_error(vmm: &str, what: &str, dir: &Path) -> LabError {
    let log = fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
    let log: Vec<&str> = log.lines().collect();
    let log = log[log.len().saturating_sub(10)..].join("\n");
    let what = if log.is_empty() {
        what.to_owned()
    } else {
        format!("{what}; the VMM said:\n{log}")
    };
    LabError::Guest {
        vmm: vmm.to_owned(),
        what,
        console: console_tail_of(dir, 30),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_every_length_and_matches_busybox() {
        for n in 0..40u8 {
            let data: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
            assert_eq!(b64_decode(&b64_encode(&data)).unwrap(), data, "length {n}");
        }
        assert_eq!(b64_encode(b"hello\n"), "aGVsbG8K");
        assert_eq!(b64_decode("aGk=\n").unwrap(), b"hi");
        assert!(b64_decode("a b=").is_none());
        assert!(b64_decode("abc").is_none());
    }

    #[test]
    fn replies_of_other_commands_and_kernel_lines_are_skipped() {
        let n = "abc1";
        assert_eq!(
            parse_line("@@abc1 o aGk=\n", n).unwrap(),
            Line::Out(b"hi".to_vec())
        );
        assert_eq!(
            parse_line("@@abc1 e aGk=\r\n", n).unwrap(),
            Line::Err(b"hi".to_vec())
        );
        assert_eq!(parse_line("@@abc1 x 3\n", n).unwrap(), Line::Exit(3));
        assert_eq!(parse_line("@@abc12 x 0\n", n).unwrap(), Line::Other);
        assert_eq!(parse_line("[ 1.0] igbvf: probe\n", n).unwrap(), Line::Other);
        assert!(parse_line("@@abc1 x zero\n", n).is_err());
        assert!(parse_line("@@abc1 o !!!!\n", n).is_err());
    }

    #[test]
    fn image_paths_must_be_relative_and_plain() {
        for bad in ["/etc/x", "", "a//b", "a/../b", "./a", "a/"] {
            assert!(bad_path(bad), "{bad:?}");
        }
        assert!(!bad_path("etc/x.conf"));
        let e = Image::new()
            .file("/etc/x", 0o644, "x")
            .build_in(Path::new("/nonexistent"));
        assert!(e.unwrap_err().to_string().contains("/etc/x"));
    }

    #[test]
    fn image_is_cached_by_its_inputs() {
        let dir = std::env::temp_dir().join(format!("svff-l2-image-test.{}", std::process::id()));
        let v = kernel_release().unwrap();
        let a = Image::new().kernel_version(&v).file("etc/a", 0o644, "1");
        let p1 = a.build_in(&dir).unwrap();
        let p2 = a.clone().build_in(&dir).unwrap();
        let p3 = Image::new()
            .kernel_version(&v)
            .file("etc/a", 0o644, "2")
            .build_in(&dir)
            .unwrap();
        assert_eq!(p1, p2);
        assert_ne!(p1, p3);
        let data = fs::read(&p3).unwrap();
        assert!(
            data.windows(6).any(|w| w == b"etc/a\0"),
            "etc/a is in the archive"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
