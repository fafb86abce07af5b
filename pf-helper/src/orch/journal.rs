//! The write-ahead journal: `<state_dir>/journal.jsonl`.
//!
//! Every orchestration operation (`init`, `reconf`, `recover`) writes one
//! JSON record per line, and each record is fsync'd *before* the step it
//! names is carried out. A record (format version [`JOURNAL_VERSION`]):
//!
//! ```json
//! {"v":1,"op":1733043000123,"seq":0,"step":{"step":"begin","kind":"reconf","pf":"0000:01:00.0","mode":"detach","from":4,"to":2,"before":[...],"target":[...]}}
//! {"v":1,"op":1733043000123,"seq":1,"step":{"step":"detach","vm":"vm1","id":"svff-0000-01-00.0-vf3"}}
//! {"v":1,"op":1733043000123,"seq":2,"step":{"step":"set_count","pf":"0000:01:00.0","from":4,"to":2}}
//! {"v":1,"op":1733043000123,"seq":3,"step":{"step":"bind","pf":"0000:01:00.0"}}
//! {"v":1,"op":1733043000123,"seq":4,"step":{"step":"attach","vm":"vm1","id":"svff-0000-01-00.0-vf0","host":"0000:01:10.0"}}
//! {"v":1,"op":1733043000123,"seq":5,"step":{"step":"table"}}
//! {"v":1,"op":1733043000123,"seq":6,"step":{"step":"end","outcome":"done"}}
//! ```
//!
//! `op` identifies the operation (its start time in ms), `seq` counts its
//! records from 0. The `begin` record carries the whole plan: the PF
//! assignments before (`before`) and the target (`target`, entries as in
//! the assignment table), the VF counts, the mode. Steps: `program`,
//! `set_count`, `pool_plan`, `resources` (pool mode), `bind`, `attach`, `detach`, `pause`, `unpause`, `table`
//! (the assignment table is being replaced), `rollback` (the operation
//! turned back, the target is now `before`), `end` (`outcome` `done`,
//! `rolled_back` or `failed`). An operation without `end` was interrupted:
//! `svff recover` reads its plan and brings the system to the target. A new
//! operation moves the previous journal to `journal.prev.jsonl`. A last line
//! cut short by a crash (no newline, not JSON) is ignored: its step was not
//! started.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::orch::state::{read_bounded, state_err, sync_dir, Assignment, StateDir};
use crate::pci::PciAddress;

/// Version of the journal records (`v`).
pub const JOURNAL_VERSION: u32 = 1;

/// Environment variable of the crash tests: the helper SIGKILLs itself right
/// after fsyncing the record with this `seq` (before doing its step). Read by
/// debug builds only; a release build ignores it.
pub const CRASH_AFTER_ENV: &str = "SVFF_TEST_CRASH_AFTER_RECORD";

/// Environment variable of the failure tests: `<step>:<vm>` (e.g.
/// `pause:vm2`): the helper stops itself (SIGSTOP) right after fsyncing the
/// first record of that step for that VM, so that a test can act at that
/// exact point (stop the VMM, start a second operation) and then SIGCONT it.
/// Read by debug builds only.
pub const STOP_AT_ENV: &str = "SVFF_TEST_STOP_AT";

/// How a reconf treats the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `svff-vfio-pause` / `svff-vfio-unpause`: the guest keeps the device.
    #[default]
    Pause,
    /// `device_del` / `device_add`: the paper's baseline.
    Detach,
}

/// What an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// `svff init` of one PF.
    Init,
    /// `svff reconf`.
    Reconf,
    /// `svff reconf --resources` of a PF in pool mode (see `pool.rs`): the
    /// count stays, `pool_plan` follows `begin`.
    Pool,
}

/// One journal step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// The plan of the operation.
    Begin {
        /// init or reconf.
        kind: OpKind,
        /// The PF.
        pf: PciAddress,
        /// pause or detach.
        mode: Mode,
        /// VF count before.
        from: u16,
        /// VF count after.
        to: u16,
        /// The PF's assignments before.
        before: Vec<Assignment>,
        /// The PF's assignments after.
        target: Vec<Assignment>,
    },
    /// Programming the PF's bitstream.
    Program {
        /// The PF.
        pf: PciAddress,
    },
    /// Changing the VF count.
    SetCount {
        /// The PF.
        pf: PciAddress,
        /// From.
        from: u16,
        /// To.
        to: u16,
    },
    /// Binding the PF's VFs to vfio-pci.
    Bind {
        /// The PF.
        pf: PciAddress,
    },
    /// `device_add` of a VF.
    Attach {
        /// The VM.
        vm: String,
        /// The device id.
        id: String,
        /// The VF.
        host: PciAddress,
    },
    /// `device_del` of a VF.
    Detach {
        /// The VM.
        vm: String,
        /// The device id.
        id: String,
    },
    /// `svff-vfio-pause` of a VF.
    Pause {
        /// The VM.
        vm: String,
        /// The device id.
        id: String,
    },
    /// `svff-vfio-unpause` of a VF.
    Unpause {
        /// The VM.
        vm: String,
        /// The device id.
        id: String,
        /// The VF it goes onto.
        host: PciAddress,
    },
    /// Starting an svff-vmm VM (kind `svff-vmm`) with these devices as `--vfio`.
    StartVmm {
        /// The VM.
        vm: String,
        /// The device ids it starts with.
        ids: Vec<String>,
    },
    /// Pool mode: the NVMe resources of the VFs that change, as they were
    /// (`before`) and as they are to be (`target`); right after `begin`.
    PoolPlan {
        /// The PF.
        pf: PciAddress,
        /// The resources before, per VF index.
        before: crate::nvme::NvmeResources,
        /// The resources asked, per VF index.
        target: crate::nvme::NvmeResources,
    },
    /// Pool mode: changing these VFs' resources (offline, assign, online).
    Resources {
        /// The PF.
        pf: PciAddress,
        /// The VF indices.
        vfs: Vec<u16>,
    },
    /// Replacing the assignment table.
    Table,
    /// The operation turns back: its target is now the `before` of `begin`.
    Rollback {
        /// Why.
        reason: String,
    },
    /// The operation ended.
    End {
        /// `done`, `rolled_back` or `failed`.
        outcome: String,
    },
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// [`JOURNAL_VERSION`].
    pub v: u32,
    /// The operation.
    pub op: u64,
    /// The record's number within the operation.
    pub seq: u32,
    /// The step.
    pub step: Step,
}

/// The journal of an operation being carried out.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    op: u64,
    seq: u32,
    crash_after: Option<u32>,
}

fn journal_path(dir: &StateDir) -> PathBuf {
    dir.path().join("journal.jsonl")
}

impl Journal {
    /// Starts a new operation: moves the previous journal aside and writes `begin`.
    pub fn begin(dir: &StateDir, begin: Step) -> Result<Journal, Error> {
        let path = journal_path(dir);
        if path.exists() {
            let prev = dir.path().join("journal.prev.jsonl");
            std::fs::rename(&path, &prev).map_err(|e| state_err(&path, "rename", e))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| state_err(&path, "create", e))?;
        sync_dir(dir.path())?;
        let op = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Test hook, compiled into debug builds only (like the in-use check's bypass).
        let crash_after = if cfg!(debug_assertions) {
            std::env::var(CRASH_AFTER_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
        } else {
            None
        };
        let mut j = Journal {
            file,
            path,
            op,
            seq: 0,
            crash_after,
        };
        j.record(begin)?;
        Ok(j)
    }

    /// Continues the interrupted operation `pending` (for `recover`).
    pub fn resume(dir: &StateDir, pending: &Pending) -> Result<Journal, Error> {
        let path = journal_path(dir);
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| state_err(&path, "open", e))?;
        Ok(Journal {
            file,
            path,
            op: pending.op,
            seq: pending.next_seq,
            crash_after: None,
        })
    }

    /// Appends `step` and fsyncs it; only then may the step be carried out.
    pub fn record(&mut self, step: Step) -> Result<(), Error> {
        let rec = Record {
            v: JOURNAL_VERSION,
            op: self.op,
            seq: self.seq,
            step,
        };
        let mut line = serde_json::to_vec(&rec)
            .map_err(|e| Error::Internal(format!("encoding a journal record: {e}")))?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(|e| state_err(&self.path, "write", e))?;
        self.file
            .sync_data()
            .map_err(|e| state_err(&self.path, "fsync", e))?;
        if cfg!(debug_assertions) {
            if let Ok(at) = std::env::var(STOP_AT_ENV) {
                let here = serde_json::to_value(&rec.step).ok().and_then(|v| {
                    Some(format!(
                        "{}:{}",
                        v.get("step")?.as_str()?,
                        v.get("vm")?.as_str()?
                    ))
                });
                if here.as_deref() == Some(at.as_str()) {
                    tracing::warn!(seq = self.seq, "{STOP_AT_ENV}={at}: stopping myself");
                    // Once per process: the test continues it with SIGCONT.
                    std::env::remove_var(STOP_AT_ENV);
                    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
                }
            }
        }
        if self.crash_after == Some(self.seq) {
            tracing::warn!(seq = self.seq, "{CRASH_AFTER_ENV}: killing myself");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        self.seq += 1;
        Ok(())
    }

    /// Writes the `end` record.
    pub fn end(mut self, outcome: &str) -> Result<(), Error> {
        self.record(Step::End {
            outcome: outcome.into(),
        })
    }
}

/// An operation the journal shows as not ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Its id.
    pub op: u64,
    /// Its `begin` step.
    pub begin: Step,
    /// The steps after `begin`, in order.
    pub steps: Vec<Step>,
    /// The `seq` of the next record.
    pub next_seq: u32,
}

impl Pending {
    /// Whether the operation had turned back.
    pub fn rolled_back(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s, Step::Rollback { .. }))
    }
}

/// The operation left unfinished in the journal, if any.
pub fn pending(dir: &StateDir) -> Result<Option<Pending>, Error> {
    let path = journal_path(dir);
    let Some(text) = read_bounded(&path)? else {
        return Ok(None);
    };
    let corrupt = |reason: String| Error::StateCorrupt {
        path: path.clone(),
        reason,
    };
    let mut records = Vec::new();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (n, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Record>(line.trim_end()) {
            Ok(r) if r.v == JOURNAL_VERSION => records.push(r),
            Ok(r) => {
                return Err(corrupt(format!(
                    "line {}: record version {} (this svff reads {JOURNAL_VERSION})",
                    n + 1,
                    r.v
                )))
            }
            // A torn last write: its step never started.
            Err(_) if n + 1 == lines.len() && !line.ends_with('\n') => {}
            Err(e) => return Err(corrupt(format!("line {}: {e}", n + 1))),
        }
    }
    let Some(first) = records.first() else {
        return Ok(None);
    };
    let op = first.op;
    if records.iter().any(|r| r.op != op) {
        return Err(corrupt("records of several operations".into()));
    }
    if matches!(records.last().map(|r| &r.step), Some(Step::End { .. })) {
        return Ok(None);
    }
    let next_seq = records.last().map_or(0, |r| r.seq + 1);
    let mut it = records.into_iter();
    let begin = it.next().map(|r| r.step).expect("not empty");
    if !matches!(begin, Step::Begin { .. }) {
        return Err(corrupt("the first record is not begin".into()));
    }
    Ok(Some(Pending {
        op,
        begin,
        steps: it.map(|r| r.step).collect(),
        next_seq,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin() -> Step {
        Step::Begin {
            kind: OpKind::Reconf,
            pf: PciAddress::parse("0000:01:00.0").unwrap(),
            mode: Mode::Detach,
            from: 4,
            to: 2,
            before: vec![],
            target: vec![],
        }
    }

    #[test]
    fn an_operation_without_end_is_pending_with_its_steps() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        assert_eq!(pending(&sd).unwrap(), None);
        let mut j = Journal::begin(&sd, begin()).unwrap();
        j.record(Step::Detach {
            vm: "vm1".into(),
            id: "a".into(),
        })
        .unwrap();
        let p = pending(&sd).unwrap().unwrap();
        assert_eq!(p.begin, begin());
        assert_eq!(p.steps.len(), 1);
        assert_eq!(p.next_seq, 2);
        let mut r = Journal::resume(&sd, &p).unwrap();
        r.record(Step::Table).unwrap();
        r.end("done").unwrap();
        assert_eq!(pending(&sd).unwrap(), None);
        let text = std::fs::read_to_string(sd.path().join("journal.jsonl")).unwrap();
        let seqs: Vec<u32> = text
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap().seq)
            .collect();
        assert_eq!(seqs, [0, 1, 2, 3]);
        assert!(
            text.lines().next().unwrap().starts_with("{\"v\":1,"),
            "{text}"
        );
    }

    #[test]
    fn a_torn_last_line_is_ignored_but_a_corrupt_middle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        let j = Journal::begin(&sd, begin()).unwrap();
        drop(j);
        let path = sd.path().join("journal.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"v\":1,\"op\":");
        std::fs::write(&path, &text).unwrap();
        let p = pending(&sd).unwrap().unwrap();
        assert!(p.steps.is_empty());
        text.push_str("\n{\"v\":1}\n");
        std::fs::write(&path, &text).unwrap();
        let e = pending(&sd).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn a_new_operation_moves_the_previous_journal_aside() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        Journal::begin(&sd, begin()).unwrap().end("done").unwrap();
        let j = Journal::begin(&sd, begin()).unwrap();
        drop(j);
        assert!(sd.path().join("journal.prev.jsonl").exists());
        assert!(pending(&sd).unwrap().is_some());
    }
}
