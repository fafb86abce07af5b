//! The helper's state directory: the assignment table, written atomically,
//! and the lock that keeps orchestration operations one at a time.
//!
//! `<state_dir>/assignments.json` (format version 1):
//!
//! ```json
//! { "format_version": 1,
//!   "assignments": [
//!     { "pf": "0000:01:00.0", "vf": 0, "host": "0000:01:10.0", "vm": "vm1",
//!       "id": "svff-0000-01-00.0-vf0", "bus": "svffrp0", "guest": "0000:01:00.0", "state": "attached" } ] }
//! ```
//!
//! `vf` is the PF's `virtfnN` index, `host` the VF's address, `id` the VMM's
//! device id, `bus` the hotplug port it went on (`null`: none given), `guest` the address the guest sees it at (`null` when the VMM
//! does not say), `state` `attached`, `paused` (the VMM holds the device
//! paused; only between the steps of a reconf), or `gone` (the VMM did not
//! answer during a recovery: recorded as gone, its VF kept free of others).
//! The file is replaced with write-to-temp, fsync, rename, fsync of the
//! directory, so a reader sees the old or the new table, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::pci::PciAddress;

/// Version of `assignments.json`.
pub const TABLE_FORMAT_VERSION: u32 = 1;
/// Largest state file read (a table of thousands of VFs is far smaller).
const MAX_STATE_FILE: u64 = 16 << 20;

/// The state of an assigned VF as the helper last left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssignState {
    /// In the VMM, open, guest I/O reaching it.
    Attached,
    /// In the VMM, paused (between the steps of a reconf).
    Paused,
    /// The VMM did not answer: recorded as gone.
    Gone,
}

/// One VF in one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// The PF.
    pub pf: PciAddress,
    /// The VF's `virtfnN` index.
    pub vf: u16,
    /// The VF's address.
    pub host: PciAddress,
    /// The VM's name.
    pub vm: String,
    /// The VMM's device id.
    pub id: String,
    /// The bus it was hot-plugged on (a `hotplug_ports` entry), if any.
    #[serde(default)]
    pub bus: Option<String>,
    /// The guest address, when the VMM reports it.
    pub guest: Option<String>,
    /// Where it stands.
    pub state: AssignState,
}

/// The assignment table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignmentTable {
    /// Always [`TABLE_FORMAT_VERSION`].
    pub format_version: u32,
    /// Sorted by PF, then VF index.
    pub assignments: Vec<Assignment>,
}

impl AssignmentTable {
    /// An empty table.
    pub fn new() -> Self {
        AssignmentTable {
            format_version: TABLE_FORMAT_VERSION,
            assignments: Vec::new(),
        }
    }

    /// Sorts the entries (PF, then VF index).
    pub fn sort(&mut self) {
        self.assignments.sort_by_key(|a| (a.pf, a.vf));
    }

    /// The entries of `pf`.
    pub fn of_pf(&self, pf: PciAddress) -> impl Iterator<Item = &Assignment> {
        self.assignments.iter().filter(move |a| a.pf == pf)
    }

    /// Replaces the entries of `pf` with `entries`.
    pub fn replace_pf(&mut self, pf: PciAddress, entries: &[Assignment]) {
        self.assignments.retain(|a| a.pf != pf);
        self.assignments.extend(entries.iter().cloned());
        self.sort();
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

/// Held while an operation runs; dropping it releases the lock.
#[derive(Debug)]
pub struct OpLock {
    _lock: Flock<File>,
}

pub(crate) fn state_err(path: &Path, op: &'static str, source: io::Error) -> Error {
    Error::State {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Reads at most [`MAX_STATE_FILE`] bytes of `path`; `None` if it does not exist.
pub(crate) fn read_bounded(path: &Path) -> Result<Option<String>, Error> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_err(path, "open", e)),
    };
    let mut text = String::new();
    file.take(MAX_STATE_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| state_err(path, "read", e))?;
    if text.len() as u64 > MAX_STATE_FILE {
        return Err(Error::StateCorrupt {
            path: path.to_owned(),
            reason: format!("larger than {MAX_STATE_FILE} bytes"),
        });
    }
    Ok(Some(text))
}

/// fsyncs a directory, so that a rename or create in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| state_err(dir, "fsync", e))
}

impl StateDir {
    /// Opens (creating it with mode 0700 if needed) the state directory.
    pub fn open(path: &Path) -> Result<Self, Error> {
        if !path.is_absolute() {
            return Err(Error::Usage(format!(
                "state directory {} must be an absolute path",
                path.display()
            )));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| state_err(path, "create", e))?;
        Ok(StateDir {
            path: path.to_owned(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `assignments.json`.
    pub fn table_path(&self) -> PathBuf {
        self.path.join("assignments.json")
    }

    /// Reads the assignment table (empty if there is none yet).
    pub fn load_table(&self) -> Result<AssignmentTable, Error> {
        let path = self.table_path();
        let Some(text) = read_bounded(&path)? else {
            return Ok(AssignmentTable::new());
        };
        let table: AssignmentTable =
            serde_json::from_str(&text).map_err(|e| Error::StateCorrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if table.format_version != TABLE_FORMAT_VERSION {
            return Err(Error::StateCorrupt {
                path,
                reason: format!(
                    "format_version {} (this svff reads {TABLE_FORMAT_VERSION})",
                    table.format_version
                ),
            });
        }
        Ok(table)
    }

    /// Replaces the assignment table atomically: temp file, fsync, rename, fsync of the directory.
    pub fn store_table(&self, table: &AssignmentTable) -> Result<(), Error> {
        let mut table = table.clone();
        table.format_version = TABLE_FORMAT_VERSION;
        table.sort();
        let mut text = serde_json::to_vec_pretty(&table)
            .map_err(|e| Error::Internal(format!("encoding the assignment table: {e}")))?;
        text.push(b'\n');
        write_atomic(&self.table_path(), &text)
    }

    /// Takes the operation lock (`<state_dir>/lock`, `flock`), or answers
    /// [`Error::OperationRunning`] naming the process and operation holding it.
    pub fn lock(&self, what: &str) -> Result<OpLock, Error> {
        let path = self.path.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| state_err(&path, "open", e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                let _ = lock.set_len(0);
                let _ = writeln!(&mut *lock, "pid {} {what}", std::process::id());
                Ok(OpLock { _lock: lock })
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = read_bounded(&path)?.unwrap_or_default();
                Err(Error::OperationRunning {
                    holder: holder.trim().to_owned(),
                })
            }
            Err((_, e)) => Err(state_err(&path, "lock", io::Error::from(e))),
        }
    }
}

/// Writes `path` atomically: `<path>.tmp`, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| state_err(&tmp, "create", e))?;
        f.write_all(data).map_err(|e| state_err(&tmp, "write", e))?;
        f.sync_all().map_err(|e| state_err(&tmp, "fsync", e))?;
    }
    fs::rename(&tmp, path).map_err(|e| state_err(path, "rename", e))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vf: u16, vm: &str) -> Assignment {
        Assignment {
            pf: PciAddress::parse("0000:01:00.0").unwrap(),
            vf,
            host: PciAddress::parse(&format!("0000:01:10.{vf}")).unwrap(),
            vm: vm.into(),
            id: format!("svff-0000-01-00.0-vf{vf}"),
            bus: None,
            guest: None,
            state: AssignState::Attached,
        }
    }

    #[test]
    fn table_round_trips_sorted_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(&dir.path().join("state")).unwrap();
        assert_eq!(sd.load_table().unwrap(), AssignmentTable::new());
        let mut t = AssignmentTable::new();
        t.assignments = vec![entry(2, "vm2"), entry(0, "vm1")];
        sd.store_table(&t).unwrap();
        let back = sd.load_table().unwrap();
        assert_eq!(back.assignments[0].vf, 0);
        assert_eq!(back.assignments[1].vm, "vm2");
        let names: Vec<_> = fs::read_dir(sd.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["assignments.json"]);
        let text = fs::read_to_string(sd.table_path()).unwrap();
        assert!(text.contains("\"format_version\": 1"), "{text}");
        assert!(text.contains("\"state\": \"attached\""), "{text}");
    }

    #[test]
    fn corrupt_or_future_tables_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        fs::write(sd.table_path(), "{\"format_version\": 1, \"assign").unwrap();
        let e = sd.load_table().unwrap_err();
        assert!(e.to_string().contains("assignments.json"), "{e}");
        fs::write(
            sd.table_path(),
            "{\"format_version\": 2, \"assignments\": []}",
        )
        .unwrap();
        let e = sd.load_table().unwrap_err();
        assert!(e.to_string().contains("format_version 2"), "{e}");
    }

    #[test]
    fn second_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        let held = sd.lock("reconf 0000:01:00.0 to 2").unwrap();
        let e = sd.lock("reconf 0000:01:00.0 to 4").unwrap_err();
        assert_eq!(e.kind(), "busy");
        assert!(
            e.to_string().contains(&format!(
                "pid {} reconf 0000:01:00.0 to 2",
                std::process::id()
            )),
            "{e}"
        );
        drop(held);
        assert!(sd.lock("again").is_ok());
    }

    #[test]
    fn relative_state_dirs_are_refused() {
        assert!(StateDir::open(Path::new("var/lib/svff")).is_err());
    }
}
