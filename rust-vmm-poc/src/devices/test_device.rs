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

use crate::pci::{BarKind, BarSpec, ConfigSpace, PciDevice};

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
}

impl Default for TestDevice {
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
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0xff);
            return;
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
        if bar == 0 && offset == 0x10 && data.len() == 4 {
            self.scratch = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }
}
