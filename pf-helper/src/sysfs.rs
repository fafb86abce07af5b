//! The sysfs access layer: every read and write the helper does goes through [`Sysfs`].

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Access to a sysfs tree. Paths are relative to [`Sysfs::root`]
/// (e.g. `bus/pci/devices/0000:01:00.0/sriov_numvfs`).
///
/// Only [`Sysfs::write`] changes anything; the reads have default
/// implementations on the tree under `root()`. The real implementation is
/// [`RealSysfs`]; unit tests use a fake that models the kernel's answers.
pub trait Sysfs: fmt::Debug + Send + Sync {
    /// The tree's root, `/sys` on a real system.
    fn root(&self) -> &Path;

    /// Writes `value` to the attribute in one `write(2)`, without creating or
    /// truncating it. The kernel's errno comes back in the `io::Error`.
    fn write(&self, rel: &Path, value: &str) -> io::Result<()>;

    /// Reads an attribute, trailing newline removed.
    fn read(&self, rel: &Path) -> io::Result<String> {
        let mut text = fs::read_to_string(self.root().join(rel))?;
        while text.ends_with('\n') {
            text.pop();
        }
        Ok(text)
    }

    /// Reads a symbolic link.
    fn read_link(&self, rel: &Path) -> io::Result<PathBuf> {
        fs::read_link(self.root().join(rel))
    }

    /// Names of the entries of a directory.
    fn list(&self, rel: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.root().join(rel))? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    /// Whether the path exists (following links).
    fn exists(&self, rel: &Path) -> bool {
        self.root().join(rel).exists()
    }

    /// Opens a file read-only, e.g. a BAR's `resource<N>` file to map it.
    fn open(&self, rel: &Path) -> io::Result<fs::File> {
        fs::File::open(self.root().join(rel))
    }

    /// Loads the kernel module `name` (a plain module name, e.g. `vfio-pci`),
    /// as `modprobe` does. The default refuses: only [`RealSysfs`] on `/sys`
    /// loads modules.
    fn load_module(&self, name: &str) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("cannot load module {name}: this sysfs does not load modules"),
        ))
    }

    /// The absolute, link-free path.
    fn canonicalize(&self, rel: &Path) -> io::Result<PathBuf> {
        fs::canonicalize(self.root().join(rel))
    }
}

/// The kernel's sysfs, at `/sys` or another root.
#[derive(Debug, Clone)]
pub struct RealSysfs {
    root: PathBuf,
}

impl RealSysfs {
    /// The system's `/sys`.
    pub fn new() -> Self {
        Self::with_root("/sys")
    }

    /// A sysfs tree mounted at `root`.
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        RealSysfs { root: root.into() }
    }
}

impl Default for RealSysfs {
    fn default() -> Self {
        Self::new()
    }
}

/// Where modprobe is looked for (never through `PATH`).
const MODPROBE: [&str; 4] = [
    "/usr/sbin/modprobe",
    "/sbin/modprobe",
    "/usr/bin/modprobe",
    "/bin/modprobe",
];

/// The longest a `modprobe` may take before it is killed.
const MODPROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// A module name modprobe gets: `[a-z0-9_-]`, starting with a letter or digit,
/// at most 56 bytes (the kernel's MODULE_NAME_LEN - 1 is 55 on 64-bit).
fn valid_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 56
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Runs `modprobe -q -- name` with a bounded wait; the error carries its stderr.
fn modprobe(name: &str) -> io::Result<()> {
    if !valid_module_name(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "refusing to load module {:?}: not a plain module name",
                name.escape_debug().to_string()
            ),
        ));
    }
    let Some(tool) = MODPROBE.iter().find(|p| Path::new(p).exists()) else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no modprobe in {}", MODPROBE.join(", ")),
        ));
    };
    let mut child = Command::new(tool)
        .args(["--", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_clear()
        .spawn()?;
    let deadline = Instant::now() + MODPROBE_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{tool} {name} did not finish within {} s and was killed",
                    MODPROBE_TIMEOUT.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(e) = child.stderr.take() {
        let _ = io::Read::read_to_string(&mut io::Read::take(e, 4096), &mut stderr);
    }
    Err(io::Error::other(format!(
        "{tool} {name} exited with {status}: {}",
        stderr.trim()
    )))
}

impl Sysfs for RealSysfs {
    fn root(&self) -> &Path {
        &self.root
    }

    fn load_module(&self, name: &str) -> io::Result<()> {
        // A tree elsewhere (a test's) must never load modules into this kernel.
        if self.root != Path::new("/sys") {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "cannot load module {name}: sysfs root {} is not /sys",
                    self.root.display()
                ),
            ));
        }
        modprobe(name)
    }

    fn write(&self, rel: &Path, value: &str) -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .open(self.root.join(rel))?;
        // sysfs stores take the whole value from a single write(2).
        let n = file.write(value.as_bytes())?;
        if n != value.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short sysfs write: {n} of {} bytes", value.len()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_plain_and_trees_other_than_sys_load_nothing() {
        for good in [
            "igb",
            "vfio-pci",
            "vfio_pci",
            "pci-pf-stub",
            "qdma-pf",
            "8139cp",
        ] {
            assert!(valid_module_name(good), "{good}");
        }
        for bad in [
            "",
            "-r",
            "../x",
            "a b",
            "Igb",
            "x/y",
            "a;b",
            &"a".repeat(57),
        ] {
            assert!(!valid_module_name(bad), "{bad}");
            assert_eq!(
                modprobe(bad).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let err = RealSysfs::with_root(dir.path())
            .load_module("igb")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
    }

    #[test]
    fn real_sysfs_writes_existing_attributes_and_never_creates_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("bus/pci")).unwrap();
        fs::write(dir.path().join("bus/pci/drivers_probe"), "old-and-longer\n").unwrap();
        let sysfs = RealSysfs::with_root(dir.path());
        sysfs
            .write(Path::new("bus/pci/drivers_probe"), "0000:01:00.0")
            .unwrap();
        // No truncation (sysfs has no file length); the value lands at offset 0.
        assert!(fs::read_to_string(dir.path().join("bus/pci/drivers_probe"))
            .unwrap()
            .starts_with("0000:01:00.0"));
        let err = sysfs.write(Path::new("bus/pci/new_attr"), "1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!dir.path().join("bus/pci/new_attr").exists());
        assert_eq!(
            sysfs
                .read(Path::new("bus/pci/drivers_probe"))
                .unwrap()
                .lines()
                .count(),
            1
        );
    }
}
