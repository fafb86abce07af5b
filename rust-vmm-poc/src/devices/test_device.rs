//! `svff-test`, an emulated PCI function with a BAR0 of readable registers, standing in for a
//! VF until VFIO passthrough exists (and kept as a control device beside VFs afterwards).
//!
//! Identity 1234:5ff0, class 0xff0000 (unassigned: no Linux driver binds), BAR0: 4 KiB, 32-bit,
//! non-prefetchable. Registers (little-endian dwords; other offsets read 0, writes dropped):
//!
//! | offset | name    | value |
//! |--------|---------|-------|
//! | 0x00   | ID      | `0x5356_4646` ("SVFF") |
//! | 0x04   | VERSION | `0x0001_0000` |
//! | 0x08   | STATUS  | `1` (ready) |
//! | 0x0c   | READS   | number of BAR0 reads so far, this one included |
//! | 0x10   | SCRATCH | read/write |
//! | 0x14   | DOORBELL| write `v`: raise MSI-X vector `v` (write-only, reads 0) |
//!
//! MSI-X (capability at 0x40, the only one): 2 vectors, table at BAR0 + 0x800, PBA at
//! BAR0 + 0xC00, delivered through KVM GSI routes and irqfds.

use std::sync::{Arc, Mutex};

use crate::error::Error;
use crate::pci::{BarKind, BarSpec, ConfigSpace, Msix, PciDevice};
use crate::vm::GsiRouter;

const MSIX_CAP: usize = 0x40;
const MSIX_VECTORS: u16 = 2;
const MSIX_TABLE: u64 = 0x800;
const MSIX_PBA: u64 = 0xc00;

/// Vendor ID of the test device.
pub const TEST_DEVICE_VENDOR: u16 = 0x1234;
/// Device ID of the test device.
pub const TEST_DEVICE_DEVICE: u16 = 0x5ff0;
/// Value of its ID register.
pub const TEST_DEVICE_ID: u32 = 0x5356_4646;
/// Size of its BAR0.
pub const TEST_DEVICE_BAR0_SIZE: u64 = 4096;

/// The test device.
#[derive(Debug)]
pub struct TestDevice {
    config: ConfigSpace,
    reads: u32,
    scratch: u32,
    msix: Option<Msix>,
}

impl TestDevice {
    /// A test device with MSI-X, its vectors routed through `router`.
    pub fn with_msix(router: Arc<Mutex<GsiRouter>>) -> Result<Self, Error> {
        let mut d = TestDevice::default();
        d.msix = Some(Msix::new(
            &mut d.config,
            MSIX_CAP,
            MSIX_VECTORS,
            0,
            MSIX_TABLE as u32,
            MSIX_PBA as u32,
            router,
        )?);
        Ok(d)
    }
}

impl Default for TestDevice {
    /// A test device without MSI-X (no KVM needed: unit tests).
    fn default() -> Self {
        let mut config = ConfigSpace::new(TEST_DEVICE_VENDOR, TEST_DEVICE_DEVICE, 0xff_0000, 1);
        config.set_bar(
            0,
            BarSpec {
                size: TEST_DEVICE_BAR0_SIZE,
                kind: BarKind::Memory32,
                prefetchable: false,
            },
        );
        TestDevice {
            config,
            reads: 0,
            scratch: 0,
            msix: None,
        }
    }
}

impl PciDevice for TestDevice {
    fn name(&self) -> String {
        "svff-test".into()
    }
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if let Some(m) = &mut self.msix {
            m.config_written(&self.config);
        }
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0xff);
            return;
        }
        if let Some(m) = &self.msix {
            if (MSIX_TABLE..MSIX_TABLE + 16 * u64::from(MSIX_VECTORS)).contains(&offset) {
                return m.table_read(offset - MSIX_TABLE, data);
            }
            if (MSIX_PBA..MSIX_PBA + 8).contains(&offset) {
                return m.pba_read(offset - MSIX_PBA, data);
            }
        }
        self.reads = self.reads.wrapping_add(1);
        let v = match offset & !3 {
            0x00 => TEST_DEVICE_ID,
            0x04 => 0x0001_0000,
            0x08 => 1,
            0x0c => self.reads,
            0x10 => self.scratch,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let s = (offset & 3) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(s + i).copied().unwrap_or(0);
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(b);
        match (bar, offset) {
            (0, 0x10) => self.scratch = v,
            (0, 0x14) => {
                if let Some(m) = &mut self.msix {
                    m.fire(v as usize);
                }
            }
            (0, o) if (MSIX_TABLE..MSIX_TABLE + 16 * u64::from(MSIX_VECTORS)).contains(&o) => {
                if let Some(m) = &mut self.msix {
                    m.table_write(o - MSIX_TABLE, data);
                }
            }
            _ => {}
        }
    }
}
