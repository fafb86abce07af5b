//! Strictly parsed PCI names: [`PciAddress`] and [`DriverName`].
//!
//! Both types are built only from strings that format back to exactly the same
//! text, so every sysfs path the helper builds comes from a value that cannot
//! hold `/`, `..`, NUL, signs, whitespace or uppercase aliases.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

/// A PCI function address `domain:bus:device.function`, e.g. `0000:01:00.0`:
/// the workspace's one address type, from svff-types (strict canonical parse,
/// 32-bit domain; the attack-input tests live there).
pub use svff_types::PciAddress;

impl From<svff_types::InvalidPciAddress> for Error {
    fn from(e: svff_types::InvalidPciAddress) -> Self {
        Error::InvalidPciAddress {
            input: e.input,
            reason: e.reason,
        }
    }
}

/// Longest accepted driver name (the kernel's module names are shorter).
const MAX_DRIVER_LEN: usize = 56;

/// A kernel PCI driver name such as `vfio-pci`, `pci-pf-stub`, `igb` or `qdma-pf`.
///
/// Only `[a-z0-9_-]`, starting with a letter, at most 56 characters: it is used as a
/// path component under `/sys/bus/pci/drivers/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DriverName(String);

impl DriverName {
    /// Parses a driver name.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = |reason: &'static str| Error::InvalidDriverName {
            input: text.escape_debug().to_string(),
            reason,
        };
        if text.is_empty() || text.len() > MAX_DRIVER_LEN {
            return Err(bad("must be 1 to 56 characters"));
        }
        if !text.as_bytes()[0].is_ascii_lowercase() {
            return Err(bad("must start with a lowercase letter"));
        }
        if !text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(bad("only [a-z0-9_-] are allowed"));
        }
        Ok(DriverName(text.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `vfio-pci`.
    pub fn vfio_pci() -> Self {
        DriverName("vfio-pci".to_owned())
    }
}

impl fmt::Display for DriverName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DriverName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl Serialize for DriverName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DriverName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        DriverName::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn a_rejected_address_is_the_helpers_invalid_argument() {
        let err: Error = PciAddress::parse("0000:01:00.0/..").unwrap_err().into();
        assert!(matches!(err, Error::InvalidPciAddress { .. }), "{err}");
        assert_eq!(err.kind(), "invalid_argument");
        let ok: PciAddress = serde_json::from_str("\"0000:01:00.0\"").unwrap();
        assert_eq!(
            ok.sysfs_rel(),
            PathBuf::from("bus/pci/devices/0000:01:00.0")
        );
    }

    #[test]
    fn driver_names_are_path_safe() {
        for ok in [
            "vfio-pci",
            "pci-pf-stub",
            "igb",
            "qdma-pf",
            "nvme",
            "qdma_vf",
        ] {
            assert_eq!(DriverName::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "..",
            "../vfio-pci",
            "vfio/pci",
            "VFIO-pci",
            "-pci",
            "1pci",
            "vfio pci",
            "vfio\0",
            &"a".repeat(57),
        ] {
            assert!(DriverName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
