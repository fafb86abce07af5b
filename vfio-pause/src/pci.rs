//! Config-space layout and function identity; the PCI address type is
//! svff-types' [`PciAddress`], shared by every svff crate.

use std::fmt;

pub use svff_types::PciAddress;

/// Config-space offsets used here.
pub(crate) mod cfg {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const STATUS_CAP_LIST: u16 = 0x10;
    pub const CAP_PTR: usize = 0x34;
    pub const CAP_ID_MSIX: u8 = 0x11;
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
    /// Revision id.
    pub revision: u8,
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
            revision: class_rev as u8,
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:04x} rev {:02x} (subsystem {:04x}:{:04x}, class {:06x})",
            self.vendor,
            self.device,
            self.revision,
            self.subsystem_vendor,
            self.subsystem,
            self.class
        )
    }
}

/// Everything of a function that the guest driver and the VMM rely on and
/// that a replacement must match: its [`Identity`], BAR sizes and types, the
/// MSI-X table size and the capability layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Profile {
    pub identity: Identity,
    /// Per BAR: size (0: not implemented) and type bits (I/O, 64-bit, prefetchable).
    pub bars: [(u64, u32); 6],
    /// MSI-X table size (vectors), if the function has MSI-X.
    pub msix_table: Option<u16>,
    /// Standard capabilities (id, offset) in list order.
    pub caps: Vec<(u8, u16)>,
    /// Extended capabilities (id, offset) in list order.
    pub ext_caps: Vec<(u16, u16)>,
}

impl Profile {
    /// Read from a config-space image and the BAR region sizes.
    pub fn from_config(config: &[u8], bar_sizes: [u64; 6]) -> Option<Profile> {
        let identity = Identity::from_config(config)?;
        let r8 = |o: usize| config.get(o).copied().unwrap_or(0);
        let r16 = |o: usize| u16::from_le_bytes([r8(o), r8(o + 1)]);
        let r32 = |o: usize| u32::from_le_bytes([r8(o), r8(o + 1), r8(o + 2), r8(o + 3)]);
        let mut bars = [(0u64, 0u32); 6];
        for (i, b) in bars.iter_mut().enumerate() {
            let dw = r32(cfg::BAR0 + 4 * i);
            let kind = if dw & 1 == 1 { dw & 0x3 } else { dw & 0xf };
            *b = (bar_sizes[i], if bar_sizes[i] == 0 { 0 } else { kind });
        }
        let mut caps = Vec::new();
        if r16(cfg::STATUS) & cfg::STATUS_CAP_LIST != 0 {
            let mut off = usize::from(r8(cfg::CAP_PTR) & 0xfc);
            // At most 48 standard capabilities fit in 256 bytes: bounds loops.
            while off >= cfg::HEADER_SIZE && caps.len() < 48 {
                caps.push((r8(off), off as u16));
                off = usize::from(r8(off + 1) & 0xfc);
            }
        }
        let msix_table = caps
            .iter()
            .find(|(id, _)| *id == cfg::CAP_ID_MSIX)
            .map(|&(_, o)| (r16(usize::from(o) + 2) & 0x7ff) + 1);
        let mut ext_caps = Vec::new();
        if config.len() > 0x100 {
            let mut off = 0x100usize;
            while off >= 0x100 && ext_caps.len() < 1024 {
                let hdr = r32(off);
                if hdr == 0 || hdr == u32::MAX {
                    break;
                }
                ext_caps.push((hdr as u16, off as u16));
                off = (hdr >> 20) as usize & 0xffc;
            }
        }
        Some(Profile {
            identity,
            bars,
            msix_table,
            caps,
            ext_caps,
        })
    }

    /// The first difference from `other`, in words, or `None` if they match.
    pub fn difference(&self, other: &Profile) -> Option<String> {
        let (a, b) = (&self.identity, &other.identity);
        if (a.vendor, a.device, a.subsystem_vendor, a.subsystem, a.class)
            != (b.vendor, b.device, b.subsystem_vendor, b.subsystem, b.class)
        {
            return Some("ids differ".into());
        }
        if a.revision != b.revision {
            return Some(format!("revision {:02x} vs {:02x}", a.revision, b.revision));
        }
        for (i, (x, y)) in self.bars.iter().zip(&other.bars).enumerate() {
            if x != y {
                return Some(format!(
                    "BAR{i} size {:#x} type {:#x} vs size {:#x} type {:#x}",
                    x.0, x.1, y.0, y.1
                ));
            }
        }
        if self.msix_table != other.msix_table {
            return Some(format!(
                "MSI-X table size {:?} vs {:?}",
                self.msix_table, other.msix_table
            ));
        }
        if self.caps != other.caps || self.ext_caps != other.ext_caps {
            return Some(format!(
                "capability layout {:x?} {:x?} vs {:x?} {:x?}",
                self.caps, self.ext_caps, other.caps, other.ext_caps
            ));
        }
        None
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
