//! # svff-types: what the svff crates must agree on
//!
//! Defined once here and used by vfio-pause (the pausable device), qmp-ext
//! (the svff QMP command set) and pf-helper (the privileged helper):
//!
//! - [`PciAddress`]: a PCI function address, built only from its canonical text.
//! - [`DeviceState`]: the lifecycle of a pausable VFIO device.
//! - [`PausePolicy`]: what guest BAR accesses do while a device is paused,
//!   and the bounds of a stall ([`MAX_STALL`], [`DEFAULT_STALL`]).
//! - [`Phase`]: the timed steps of a pause and an unpause, with their names.
//! - [`GuestCounters`], [`parse_counters`]: the svff-vmm test guest's serial counter lines.
//!
//! With the `serde` feature every type (de)serializes in the spelling of the
//! svff QMP schema (`kebab-case` names, an address as its text).

mod guest;
mod pci;
mod state;

pub use guest::{parse_counters, GuestCounters};
pub use pci::{InvalidPciAddress, PciAddress};
pub use state::{DeviceState, PausePolicy, Phase, DEFAULT_STALL, MAX_STALL};
