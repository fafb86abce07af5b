//! PCI addresses, config-space layout and function identity.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// A PCI function address `DDDD:BB:DD.F`. Built only from a string that
/// formats back to itself, so sysfs paths built from it are safe.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    domain: u16,
    bus: u8,
    device: u8,
    function: u8,
}

impl PciAddress {
    /// The sysfs directory of this function, `/sys/bus/pci/devices/<BDF>`.
    pub fn sysfs_path(&self) -> PathBuf {
        PathBuf::from(format!("/sys/bus/pci/devices/{self}"))
    }

    /// Placeholder address used for container-wide errors.
    pub(crate) fn none() -> Self {
        PciAddress {
            domain: 0,
            bus: 0,
            device: 0,
            function: 0,
        }
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidAddress(s.to_string());
        let (domain, rest) = s.split_once(':').ok_or_else(bad)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
        let (device, function) = rest.split_once('.').ok_or_else(bad)?;
        let hex = |t: &str| u32::from_str_radix(t, 16).map_err(|_| bad());
        let domain = hex(domain)?;
        let (bus, device, function) = (hex(bus)?, hex(device)?, hex(function)?);
        if domain > 0xffff || bus > 0xff || device > 0x1f || function > 7 {
            return Err(bad());
        }
        let addr = PciAddress {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        };
        // Parse, don't validate: only the canonical spelling is accepted.
        if addr.to_string() != s {
            return Err(bad());
        }
        Ok(addr)
    }
}

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
    fn pci_address_accepts_only_canonical_spelling() {
        let a: PciAddress = "0000:02:00.1".parse().unwrap();
        assert_eq!(a.to_string(), "0000:02:00.1");
        assert_eq!(
            a.sysfs_path(),
            PathBuf::from("/sys/bus/pci/devices/0000:02:00.1")
        );
        for bad in [
            "0000:02:00.8",
            "0000:2:00.1",
            "0000:02:00.1/../x",
            "0000:02:20.1",
            "0000:0A:00.1",
            "",
            "02:00.1",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad} accepted");
        }
    }

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
