//! The PCI layer: configuration space with BAR sizing, the device trait, bus 0 behind conf1
//! with a host bridge at 00:00.0, BAR placement in the MMIO window and MMIO routing.

mod bus;
mod config;
mod device;
mod msi;
mod msix;
#[cfg(test)]
mod tests;

pub use bus::{DevFn, PciBus, CONF1_ADDRESS, CONF1_DATA};
pub use config::{
    reg, BarKind, BarSpec, ConfigSpace, COMMAND_MASTER, COMMAND_MEMORY, MIN_BAR_SIZE, NUM_BARS,
};
pub use device::{HostBridge, PciDevice, HOST_BRIDGE_DEVICE, HOST_BRIDGE_VENDOR};
pub(crate) use msi::Msi;
pub use msi::{MsiLayout, CAP_ID_MSI};
pub(crate) use msix::Msix;
pub use msix::CAP_ID_MSIX;
