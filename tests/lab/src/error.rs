use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while preparing, booting or driving the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A host tool or file the lab needs is not there.
    #[error("{what} is missing ({detail}); install it with: {install}")]
    Missing {
        /// The missing piece.
        what: String,
        /// Where we looked.
        detail: String,
        /// The command that installs it.
        install: String,
    },
    /// Reading or writing a host file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Starting or talking to the L1 VM failed.
    #[error("L1 {0}")]
    Vm(String),
    /// L1 did not answer in time; it has been killed.
    #[error("L1 timed out after {} s while {what}; the VM was killed. Last console lines:\n{console}", .after.as_secs())]
    Timeout {
        /// What the lab was waiting for.
        what: String,
        /// The deadline that passed.
        after: Duration,
        /// The tail of L1's console log.
        console: String,
    },
    /// L1 stopped answering (no heartbeat from its agent); it has been killed. Under TCG this
    /// happens rarely when L1's timers stop firing; it is not a failure of the command.
    #[error("L1 stalled: no heartbeat from its agent for {} s while {what}; the VM was killed. Last console lines:\n{console}", .silent.as_secs())]
    Stalled {
        /// What the lab was waiting for.
        what: String,
        /// How long L1 had been silent.
        silent: Duration,
        /// The tail of L1's console log.
        console: String,
    },
    /// An L2 guest (a VM started in L1) failed to come up or to answer; it has been killed.
    #[error("L2 guest under {vmm} {what}. Last console lines:\n{console}")]
    Guest {
        /// The VMM that ran it.
        vmm: String,
        /// What went wrong.
        what: String,
        /// The tail of the guest's console.
        console: String,
    },
    /// The agent inside L1 reported an error.
    #[error("in L1: {0}")]
    Agent(String),
    /// Bad input given to the lab itself.
    #[error("{0}")]
    Invalid(String),
}

impl LabError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LabError::Io {
            path: path.into(),
            source,
        }
    }
}
