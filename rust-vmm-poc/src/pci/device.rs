//! The device side of the PCI bus.

use super::config::ConfigSpace;

/// A PCI function on the bus.
///
/// The bus serves configuration cycles through [`config_read`](Self::config_read) and
/// [`config_write`](Self::config_write) (by default straight from the device's
/// [`ConfigSpace`], which implements BAR sizing), learns where BARs are from the config space
/// after every write, and sends guest accesses inside a decoded BAR to
/// [`bar_read`](Self::bar_read) / [`bar_write`](Self::bar_write).
pub trait PciDevice: Send {
    /// A short name for logs and errors (e.g. `svff-test`, `vfio 0000:01:10.0`).
    fn name(&self) -> String;

    /// The function's configuration space (BARs, command register).
    fn config(&self) -> &ConfigSpace;

    /// Mutable access for the bus (placing BARs) and for default config writes.
    fn config_mut(&mut self) -> &mut ConfigSpace;

    /// The dword register at `offset` (a multiple of 4, below 256).
    fn config_read(&mut self, offset: usize) -> u32 {
        self.config().read(offset)
    }

    /// A config write of `data` (1, 2 or 4 bytes) at byte `offset`.
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data)
    }

    /// A guest read of `data.len()` bytes at `offset` into BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// A guest write at `offset` into BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge at 00:00.0 (class 0x0600), which Linux's conf1 probe looks for. It has no
/// BARs; its identity is QEMU's generic host bridge (1b36:0008), which no Linux quirk matches.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

/// Vendor ID of the host bridge.
pub const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
/// Device ID of the host bridge.
pub const HOST_BRIDGE_DEVICE: u16 = 0x0008;

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge {
            config: ConfigSpace::new(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, 0x06_0000, 0),
        }
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> String {
        "host bridge".into()
    }
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}
