//! The one error type of this crate.

use std::io;

use crate::device::DeviceState;
use crate::pci::{Identity, PciAddress};

/// Everything that can go wrong in vfio-pause. Every message names the device
/// (VMM id and/or host BDF) and keeps the OS error as its source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A string is not a canonical PCI address.
    #[error(transparent)]
    InvalidAddress(#[from] svff_types::InvalidPciAddress),

    /// The VF does not exist (its sysfs directory or `iommu_group` link is missing).
    #[error("VF {address} is gone: {path} does not exist")]
    VfGone {
        /// Host BDF that was asked for.
        address: PciAddress,
        /// The sysfs path that is missing.
        path: String,
    },

    /// A VFIO ioctl, read, write or mmap on a VF failed.
    #[error("VF {address}: {op} failed")]
    Io {
        /// Host BDF of the VF.
        address: PciAddress,
        /// What was attempted.
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The vfio-ioctls crate reported an error.
    #[error("VF {address}: {op} failed")]
    Vfio {
        /// Host BDF of the VF (`0000:00:00.0` for container-wide operations).
        address: PciAddress,
        /// What was attempted.
        op: String,
        /// The crate's error.
        #[source]
        source: vfio_ioctls::VfioError,
    },

    /// A container-wide operation (DMA map/unmap, container open) failed.
    #[error("VFIO container: {op} failed")]
    Container {
        /// What was attempted.
        op: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The function offered at unpause is not the one that was paused.
    #[error(
        "device {device}: identity mismatch ({what}): paused function was {paused} (at {paused_at}), \
         {offered_at} is {offered}; device stays paused"
    )]
    IdentityMismatch {
        /// VMM id of the device.
        device: String,
        /// The first difference (ids, revision, a BAR, MSI-X, capabilities,
        /// or wired interrupt vectors the new function lacks).
        what: String,
        /// Identity of the paused function.
        paused: Identity,
        /// Host BDF the device was attached to before the pause.
        paused_at: PciAddress,
        /// Identity of the offered function.
        offered: Identity,
        /// Host BDF offered at unpause.
        offered_at: PciAddress,
    },

    /// The operation is not allowed in the device's current state.
    #[error("device {device}: cannot {op} while {state}")]
    InvalidState {
        /// VMM id of the device.
        device: String,
        /// The operation.
        op: &'static str,
        /// The state it was in.
        state: DeviceState,
    },

    /// A VMM hook (guest BAR mapping) failed.
    #[error("device {device}: VMM hook {hook} failed: {reason}")]
    Hook {
        /// VMM id of the device.
        device: String,
        /// Which hook.
        hook: &'static str,
        /// What the VMM said.
        reason: String,
    },

    /// An access outside a region, or to a region the VF does not have.
    #[error("VF {address}: {what}")]
    OutOfRange {
        /// Host BDF of the VF.
        address: PciAddress,
        /// Description of the bad access.
        what: String,
    },

    /// A pause failed and rolling back failed too; `state` says where the
    /// device ended (see the state machine in the crate docs).
    #[error("device {device}: pause failed ({original}) and rollback failed ({rollback}); device is {state}")]
    RollbackFailed {
        /// VMM id of the device.
        device: String,
        /// The error that stopped the pause.
        original: Box<Error>,
        /// The error of the rollback.
        #[source]
        rollback: Box<Error>,
        /// State the device is in now.
        state: DeviceState,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(address: &PciAddress, op: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            address: *address,
            op: op.into(),
            source,
        }
    }

    pub(crate) fn last_os(address: &PciAddress, op: impl Into<String>) -> Self {
        Self::io(address, op, io::Error::last_os_error())
    }
}
