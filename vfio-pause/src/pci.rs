//! Config-space layout and function identity; the PCI address type is
//! svff-types' [`PciAddress`], shared by every svff crate.

use std::fmt;

pub use svff_types::PciAddress;

/// Config-space offsets used here.
pub(crate) mod cfg {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const REVISION_CLASS: usize = 0x08;
    pub const BAR0: usize = 0x10;
    pub const BAR_END: usize = 0x28;
    pub const SUBSYS_VENDOR_ID: usize = 0x2c;
    pub const SUBSYS_ID: usize = 0x2e;
    /// Size of the standard header that every function has.
    pub const HEADER_SIZE: usize = 0x40;
    /// Largest config space (PCIe extended).
    pub const MAX_SIZE: usize = 0x1000;
}

/// What makes two functions interchangeable for a guest: the ids the guest
/// driver bound to. Read from config space (vfio-pci presents a VF's real
/// vendor/device ids there, although the hardware reads them as all-ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct Identity {
    /// PCI vendor id.
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
    /// Class code (base class, sub-class, programming interface), 24 bits.
    pub class: u32,
}

impl Identity {
    /// Extract the identity from the first 0x30 bytes of config space.
    pub fn from_config(config: &[u8]) -> Option<Identity> {
        if config.len() < cfg::SUBSYS_ID + 2 {
            return None;
        }
        let r16 = |o: usize| u16::from_le_bytes([config[o], config[o + 1]]);
        let class_rev = u32::from_le_bytes([
            config[cfg::REVISION_CLASS],
            config[cfg::REVISION_CLASS + 1],
            config[cfg::REVISION_CLASS + 2],
            config[cfg::REVISION_CLASS + 3],
        ]);
        Some(Identity {
            vendor: r16(cfg::VENDOR_ID),
            device: r16(cfg::DEVICE_ID),
            subsystem_vendor: r16(cfg::SUBSYS_VENDOR_ID),
            subsystem: r16(cfg::SUBSYS_ID),
            class: class_rev >> 8,
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:04x} (subsystem {:04x}:{:04x}, class {:06x})",
            self.vendor, self.device, self.subsystem_vendor, self.subsystem, self.class
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_read_from_config_header() {
        let mut c = vec![0u8; 0x40];
        c[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x0010u16.to_le_bytes());
        c[8..12].copy_from_slice(&0x0108_0202u32.to_le_bytes());
        c[0x2c..0x2e].copy_from_slice(&0x1af4u16.to_le_bytes());
        c[0x2e..0x30].copy_from_slice(&0x1100u16.to_le_bytes());
        let id = Identity::from_config(&c).unwrap();
        assert_eq!(id.vendor, 0x1b36);
        assert_eq!(id.device, 0x0010);
        assert_eq!(id.class, 0x010802);
        assert_eq!(id.subsystem_vendor, 0x1af4);
        assert_eq!(id.subsystem, 0x1100);
        assert!(id.to_string().contains("1b36:0010"));
    }
}
