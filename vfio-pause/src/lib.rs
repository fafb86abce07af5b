//! # vfio-pause: a pausable VFIO device
//!
//! A VMM wraps each passed-through SR-IOV VF in a [`PausableDevice`]. Pausing
//! releases every host resource of the VF (BAR mmaps, IRQ wiring, device fd,
//! the group's place in the container, the group fd) while the guest keeps
//! the device: config space is served from a shadow and BAR accesses follow a
//! [`PausePolicy`] (`ignore` by default; a `stall` never holds a lock the
//! unpause needs and is bounded). The PF's VF count can then change (which destroys
//! every VF) without blocking on the VMM, and [`PausableDevice::unpause`]
//! reopens a VF — the same or another BDF, by sysfs path or through a passed
//! group fd — checks its [`Identity`], re-maps guest DMA if the container lost
//! it, restores config and IRQs and resumes.
//!
//! Layers:
//! - [`VfioBackend`]: the VFIO operations, implemented over rust-vmm's
//!   vfio-ioctls by [`VfioIoctlsBackend`] and by the test double `FakeBackend`
//!   (cargo feature `sim`, for tests; not in the production library).
//! - [`Container`]: one per VM, owns the backend and the guest
//!   memory registered for DMA.
//! - [`PausableDevice`]: the state machine; its documentation has the
//!   transition table and what each failure leaves behind.
//! - A C ABI (`vp_*` functions, header `include/vfio_pause.h`) for C VMMs.
//!
//! ```no_run
//! use std::sync::Arc;
//! use vfio_pause::{Container, DeviceOptions, PausableDevice, TrapAllBars, VfSource};
//!
//! let container = Container::open_real()?;
//! let dev = PausableDevice::open(
//!     "nvme0",
//!     container,
//!     VfSource::Sysfs("0000:02:00.1".parse()?),
//!     DeviceOptions::default(),
//!     Arc::new(TrapAllBars),
//! )?;
//! let paused = dev.pause()?; // no fd of 0000:02:00.1 is open now
//! // ... sriov_numvfs=0, sriov_numvfs=N, bind to vfio-pci ...
//! let resumed = dev.unpause(VfSource::Sysfs("0000:02:00.1".parse()?))?;
//! println!("pause: {paused}\nunpause: {resumed}");
//! # Ok::<(), vfio_pause::Error>(())
//! ```

mod backend;
mod container;
mod device;
mod error;
#[cfg(any(test, feature = "sim"))]
mod fake;
mod ffi;
mod pci;
mod real;

pub use backend::{
    irq, region, GroupId, Joined, MmapArea, RegionInfo, VfId, VfSource, VfioBackend,
};
pub use container::Container;
pub use device::{
    Access, AccessCounters, DeviceOptions, DeviceState, PausableDevice, PausePolicy, Phase, Stall,
    Timings, TrapAllBars, VmmHooks,
};
pub use error::{Error, Result};
#[cfg(any(test, feature = "sim"))]
pub use fake::{FakeBackend, FakeCall, FakeGate, FakeOp, FakeVf};
pub use pci::{Identity, PciAddress};
pub use real::VfioIoctlsBackend;

#[cfg(test)]
mod tests;
