//! svff's privileged helper: SR-IOV PF management on sysfs, the helper daemon
//! and the `svff` CLI.
//!
//! - [`PciAddress`] / [`DriverName`]: strictly parsed names; every sysfs path is
//!   built from them and checked to resolve under `/sys/devices`.
//! - [`Sysfs`] / [`RealSysfs`]: the only access to sysfs.
//! - [`SriovManager`]: PF discovery, VF count changes (`sriov_drivers_autoprobe=0`,
//!   through `sriov_numvfs=0`), binding with `driver_override` + `drivers_probe`,
//!   PF driver handling, QDMA settings ([`QdmaProfile`]).

mod bitstream;
mod client;
mod config;
mod daemon;
mod error;
#[cfg(test)]
mod fake;
mod pci;
mod protocol;
mod qdma;
mod sriov;
mod status;
mod sysfs;

pub use bitstream::BitstreamConfig;
pub use client::request;
pub use config::{Config, PfConfig, DEFAULT_CONFIG_PATH, DEFAULT_SOCKET_PATH};
pub use daemon::{bind_socket, listener_from_systemd, Daemon};
pub use error::Error;
pub use pci::{DriverName, PciAddress};
pub use protocol::{ErrorBody, Request, Response, PROTOCOL_VERSION};
pub use qdma::QdmaProfile;
pub use sriov::{SriovManager, VfsSetOptions};
pub use status::{PfStatus, Status, Step, VfStatus, VfsSetReport, STATUS_FORMAT_VERSION};
pub use sysfs::{RealSysfs, Sysfs};
