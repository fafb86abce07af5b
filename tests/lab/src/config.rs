//! What the lab boots: QEMU binary, L1 kernel, sizes, timeouts. Detected from the host.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::LabError;

/// Install hint for the lab's Debian packages.
pub const INSTALL_HINT: &str = "sudo bash scripts/deps.sh   (or: make deps)";

/// How to boot L1.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The L1 kernel image.
    pub kernel: PathBuf,
    /// Its version (the `/lib/modules/<version>` directory).
    pub kernel_version: String,
    /// The `svff-lab` binary that runs as the agent inside L1 (its directory goes first on PATH).
    pub agent: PathBuf,
    /// Where the initramfs is cached.
    pub cache_dir: PathBuf,
    /// L1 memory ([`L1_MEMORY_MIB`]; keep it below 2816 MiB, see there).
    pub memory_mib: u32,
    /// L1 vCPUs (`SVFF_LAB_CPUS`, default 1).
    pub cpus: u32,
    /// QEMU's TCG threading for L1 (`SVFF_LAB_TCG_THREAD`: `single`, the default, or `multi`).
    pub tcg_thread: TcgThread,
    /// Longest time from QEMU start to the agent's hello.
    pub boot_timeout: Duration,
    /// Longest silence (no heartbeat, no output) before L1 counts as stalled and is killed.
    pub stall_timeout: Duration,
    /// Host directories that must be visible in L1 even when they lie under a directory L1
    /// replaces with a fresh tmpfs (`/tmp`, `/run`, `/var/tmp`, `/root`), e.g. a workspace cloned
    /// into `/tmp`. Defaults: the current directory and the agent's target directory.
    pub keep: Vec<PathBuf>,
    /// Extra L1 kernel parameters (`SVFF_LAB_APPEND`), for experiments.
    pub extra_append: String,
    /// Extra QEMU arguments (`SVFF_LAB_QEMU_ARGS`, split on blanks), for experiments.
    pub extra_qemu_args: Vec<String>,
}

/// How QEMU runs L1's vCPUs under TCG.
///
/// The default is [`TcgThread::Single`] with one vCPU: measured on QEMU 10.0.2 with 2 host cores,
/// multi-threaded TCG loses a vCPU's LAPIC timer interrupt now and then (L1 stalls; 7 of 31
/// boots), and single-threaded TCG with two vCPUs round-robins them so slowly that an L2 guest
/// under nested KVM needs more than 150 s to reach its init (29 s with one vCPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcgThread {
    /// `-accel tcg,thread=single`: one host thread runs every vCPU in turn.
    Single,
    /// `-accel tcg,thread=multi`: one host thread per vCPU.
    Multi,
}

impl TcgThread {
    /// The value of QEMU's `thread=` option.
    pub fn as_str(self) -> &'static str {
        match self {
            TcgThread::Single => "single",
            TcgThread::Multi => "multi",
        }
    }
}

impl std::str::FromStr for TcgThread {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, LabError> {
        match s {
            "single" => Ok(TcgThread::Single),
            "multi" => Ok(TcgThread::Multi),
            _ => Err(LabError::Invalid(format!(
                "SVFF_LAB_TCG_THREAD={s}: expected single or multi"
            ))),
        }
    }
}

/// L1's memory: 2800 MiB, so that all of it lies below 4 GiB.
///
/// Why not more: on q35, QEMU puts RAM above 4 GiB as soon as there are 2816 MiB (0xb000_0000)
/// or more, and SeaBIOS then moves every 64-bit prefetchable bridge window above 4 GiB (its
/// `pci_pad_mem64`: a 512 MiB window per hotplug root port). L1's kernel places the igb VF BARs
/// (64-bit prefetchable) in that window, e.g. at 0xc0_2000_0000, and QEMU 10.0.2 maps them at
/// the low 32 bits of that address only: its igb PF registers the VF BAR types after creating
/// the VFs, so the VFs' BARs count as 32-bit BARs (`info pci`: "BAR0: 32 bit memory at
/// 0x20000000", which is L1's RAM). The VF registers then read as zero and writes go nowhere.
/// With all RAM below 4 GiB, SeaBIOS keeps the windows in the 32-bit hole, the VF BARs land
/// there (0xfe80_0000) and the truncation is harmless. The nvme VF BARs are not prefetchable,
/// so they always lie below 4 GiB.
pub const L1_MEMORY_MIB: u32 = 2800;
const _: () = assert!(
    L1_MEMORY_MIB < 0xb000_0000 / (1 << 20),
    "L1 RAM must stay below 4 GiB"
);

/// Default number of L1 vCPUs (see [`TcgThread`] for why one).
pub const DEFAULT_CPUS: u32 = 1;

fn env_cpus() -> Result<u32, LabError> {
    match std::env::var("SVFF_LAB_CPUS") {
        Err(_) => Ok(DEFAULT_CPUS),
        Ok(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=16).contains(n))
            .ok_or_else(|| {
                LabError::Invalid(format!("SVFF_LAB_CPUS={v}: expected a number from 1 to 16"))
            }),
    }
}

fn env_tcg_thread() -> Result<TcgThread, LabError> {
    std::env::var("SVFF_LAB_TCG_THREAD").map_or(Ok(TcgThread::Single), |v| v.parse())
}

/// A path that can go on the kernel command line: absolute, no blanks or quotes.
fn cmdline_safe(p: &Path) -> bool {
    let s = p.to_string_lossy();
    p.is_absolute()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c.is_control())
}

fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The newest `/boot/vmlinuz-<ver>` of the 6.12 series or later that has `/lib/modules/<ver>`.
fn find_kernel() -> Result<(PathBuf, String), LabError> {
    if let Ok(k) = std::env::var("SVFF_LAB_KERNEL") {
        let path = PathBuf::from(&k);
        if !path.is_file() {
            return Err(LabError::Missing {
                what: "the L1 kernel".into(),
                detail: format!("SVFF_LAB_KERNEL={k} does not exist"),
                install: INSTALL_HINT.into(),
            });
        }
        let ver = path
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_prefix("vmlinuz-"))
            .ok_or_else(|| {
                LabError::Invalid(format!(
                    "SVFF_LAB_KERNEL={k}: expected a path ending in vmlinuz-<version>"
                ))
            })?
            .to_owned();
        return Ok((path, ver));
    }
    let mut best: Option<(Vec<u64>, String)> = None;
    for e in fs::read_dir("/boot")
        .map_err(|e| LabError::io("/boot", e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(ver) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        let key = version_key(ver);
        if key.as_slice() < [6, 12].as_slice()
            || !Path::new("/lib/modules")
                .join(ver)
                .join("modules.dep")
                .exists()
        {
            continue;
        }
        if best.as_ref().is_none_or(|(k, _)| key > *k) {
            best = Some((key, ver.to_owned()));
        }
    }
    let (_, ver) = best.ok_or_else(|| LabError::Missing {
        what: "a Linux >= 6.12 kernel for L1".into(),
        detail: "no /boot/vmlinuz-6.12+ with /lib/modules/<ver>/modules.dep".into(),
        install: INSTALL_HINT.into(),
    })?;
    Ok((PathBuf::from(format!("/boot/vmlinuz-{ver}")), ver))
}

fn find_qemu() -> Result<PathBuf, LabError> {
    let name = std::env::var("SVFF_LAB_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let missing = |detail: String| LabError::Missing {
        what: "QEMU (qemu-system-x86_64 >= 10.0)".into(),
        detail,
        install: INSTALL_HINT.into(),
    };
    if name.contains('/') {
        let p = PathBuf::from(&name);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(missing(format!("{name} does not exist")))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(&name))
        .find(|p| p.is_file())
        .ok_or_else(|| missing(format!("{name} is not on PATH")))
}

/// The agent binary: `SVFF_LAB_AGENT`, else this executable when it is `svff-lab`, else the
/// `svff-lab` next to it or one directory up (test binaries live in `target/<profile>/deps`).
fn find_agent() -> Result<PathBuf, LabError> {
    if let Ok(a) = std::env::var("SVFF_LAB_AGENT") {
        return Ok(PathBuf::from(a));
    }
    let me = std::env::current_exe().map_err(|e| LabError::io("/proc/self/exe", e))?;
    if me.file_name().is_some_and(|n| n == "svff-lab") {
        return Ok(me);
    }
    let dir = me.parent().unwrap_or(Path::new("."));
    [dir.join("svff-lab"), dir.join("../svff-lab")]
        .into_iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or(p))
        .ok_or_else(|| LabError::Missing {
            what: "the svff-lab agent binary".into(),
            detail: format!("not next to {}", me.display()),
            install: "cargo build -p svff-lab".into(),
        })
}

pub(crate) fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SVFF_LAB_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("svff-lab")
}

impl LabConfig {
    /// Detects everything from the host, with the lab's standard sizes. Errors name the missing
    /// piece and how to install it.
    pub fn detect() -> Result<Self, LabError> {
        let qemu = find_qemu()?;
        let (kernel, kernel_version) = find_kernel()?;
        if let Err(e) = fs::File::open(&kernel) {
            return Err(LabError::Invalid(format!(
                "cannot read the L1 kernel {}: {e} (the lab needs to read it: run as root, or set SVFF_LAB_KERNEL to a readable copy)",
                kernel.display()
            )));
        }
        let agent = find_agent()?;
        if !cmdline_safe(&agent) {
            return Err(LabError::Invalid(format!(
                "agent path {} must be absolute and free of blanks (it goes on the L1 kernel command line)",
                agent.display()
            )));
        }
        // The agent's target directory (target/<profile>/svff-lab -> target) holds the test
        // binaries too.
        let target = agent.parent().and_then(Path::parent).map(Path::to_path_buf);
        let keep: Vec<PathBuf> = std::env::current_dir()
            .ok()
            .into_iter()
            .chain(target)
            .filter(|p| cmdline_safe(p))
            .collect();
        Ok(LabConfig {
            qemu,
            kernel,
            kernel_version,
            agent,
            cache_dir: cache_dir(),
            memory_mib: L1_MEMORY_MIB,
            cpus: env_cpus()?,
            tcg_thread: env_tcg_thread()?,
            boot_timeout: Duration::from_secs(180),
            stall_timeout: Duration::from_secs(60),
            keep,
            extra_append: std::env::var("SVFF_LAB_APPEND").unwrap_or_default(),
            extra_qemu_args: std::env::var("SVFF_LAB_QEMU_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_thread_modes_parse_and_others_are_rejected() {
        assert_eq!("single".parse::<TcgThread>().unwrap(), TcgThread::Single);
        assert_eq!("multi".parse::<TcgThread>().unwrap().as_str(), "multi");
        let e = "mttcg".parse::<TcgThread>().unwrap_err();
        assert!(e.to_string().contains("SVFF_LAB_TCG_THREAD=mttcg"), "{e}");
    }

    #[test]
    fn kernel_versions_compare_numerically() {
        assert!(version_key("6.12.95+deb12-amd64") > version_key("6.12.9+deb12-amd64"));
        assert!(version_key("6.1.0-31-amd64").as_slice() < [6, 12].as_slice());
        assert!(version_key("6.12.0").as_slice() >= [6, 12].as_slice());
    }
}
