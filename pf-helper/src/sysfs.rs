//! The sysfs access layer: every read and write the helper does goes through [`Sysfs`].

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

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

impl Sysfs for RealSysfs {
    fn root(&self) -> &Path {
        &self.root
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
