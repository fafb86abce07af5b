//! [`PciAddress`], strictly parsed.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Longest accepted address text: an 8-digit domain, `:bb:dd.f`.
const MAX_ADDRESS_LEN: usize = 16;

/// A PCI function address `domain:bus:device.function`, e.g. `0000:01:00.0`.
///
/// Parsing is strict: lowercase hex only, a domain of 4 to 8 digits (32 bits,
/// as Linux allows), two-digit bus and device, device `<= 0x1f`, function
/// `<= 7`, and the text must be the canonical form (what [`fmt::Display`]
/// prints), so `0000:01:00.0` is the only spelling of that function. Every
/// sysfs path built from it therefore holds no `/`, `..`, NUL, sign,
/// whitespace or uppercase alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

/// A text that is not a canonical PCI address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPciAddress {
    /// The rejected text, escaped (`escape_debug`).
    pub input: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

impl fmt::Display for InvalidPciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid PCI address \"{}\": {} (expected dddd:bb:dd.f, lowercase hex)",
            self.input, self.reason
        )
    }
}

impl std::error::Error for InvalidPciAddress {}

impl PciAddress {
    /// Parses `text`, accepting only the canonical spelling.
    pub fn parse(text: &str) -> Result<Self, InvalidPciAddress> {
        let bad = |reason: &'static str| InvalidPciAddress {
            input: text.escape_debug().to_string(),
            reason,
        };
        if text.len() > MAX_ADDRESS_LEN {
            return Err(bad("too long"));
        }
        if !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b':' || b == b'.')
        {
            return Err(bad("only lowercase hex digits, ':' and '.' are allowed"));
        }
        let (domain, rest) = text
            .split_once(':')
            .ok_or_else(|| bad("expected domain:bus:device.function"))?;
        let (bus, rest) = rest
            .split_once(':')
            .ok_or_else(|| bad("expected domain:bus:device.function"))?;
        let (device, function) = rest
            .split_once('.')
            .ok_or_else(|| bad("expected device.function"))?;
        let hex = |field: &str, max_digits: usize| -> Result<u32, InvalidPciAddress> {
            if field.is_empty() || field.len() > max_digits {
                return Err(bad("field has the wrong number of digits"));
            }
            // Only hex digits remain after the character check above, so no sign or space.
            u32::from_str_radix(field, 16).map_err(|_| bad("field is not hex"))
        };
        let domain = hex(domain, 8)?;
        let bus = hex(bus, 2)?;
        let device = hex(device, 2)?;
        let function = hex(function, 1)?;
        if device > 0x1f {
            return Err(bad("device number above 0x1f"));
        }
        if function > 7 {
            return Err(bad("function number above 7"));
        }
        let addr = PciAddress {
            domain,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        };
        if addr.to_string() != text {
            return Err(bad("not in canonical form (dddd:bb:dd.f)"));
        }
        Ok(addr)
    }

    /// `0000:00:00.0`, for messages about container-wide operations that
    /// concern no particular function.
    pub const fn zero() -> Self {
        PciAddress {
            domain: 0,
            bus: 0,
            device: 0,
            function: 0,
        }
    }

    /// PCI domain (segment).
    pub fn domain(&self) -> u32 {
        self.domain
    }

    /// Bus number.
    pub fn bus(&self) -> u8 {
        self.bus
    }

    /// Device (slot) number, `<= 0x1f`.
    pub fn device(&self) -> u8 {
        self.device
    }

    /// Function number, `<= 7`.
    pub fn function(&self) -> u8 {
        self.function
    }

    /// The function's directory relative to the sysfs root: `bus/pci/devices/<bdf>`.
    pub fn sysfs_rel(&self) -> PathBuf {
        PathBuf::from("bus/pci/devices").join(self.to_string())
    }

    /// The function's sysfs directory, `/sys/bus/pci/devices/<bdf>`.
    pub fn sysfs_path(&self) -> PathBuf {
        PathBuf::from("/sys").join(self.sysfs_rel())
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
    type Err = InvalidPciAddress;
    fn from_str(s: &str) -> Result<Self, InvalidPciAddress> {
        Self::parse(s)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for PciAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for PciAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        PciAddress::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses_parse_and_format_back() {
        for text in [
            "0000:01:00.0",
            "0000:00:1f.7",
            "0001:ff:10.3",
            "10000:00:00.0",
            "ffffffff:00:00.0",
        ] {
            let addr = PciAddress::parse(text).unwrap();
            assert_eq!(addr.to_string(), text);
        }
        let a = PciAddress::parse("0000:02:1f.7").unwrap();
        assert_eq!(
            (a.domain(), a.bus(), a.device(), a.function()),
            (0, 2, 0x1f, 7)
        );
    }

    #[test]
    fn address_attacks_are_rejected() {
        let attacks = [
            "",
            "..",
            "../0000:01:00.0",
            "0000:01:00.0/..",
            "0000:01:00.0/../../..",
            "0000:+1:00.0",
            "0000:01:+1f.0",
            "+000:01:00.0",
            "0000:-1:00.0",
            "00:20.0",
            "0000:00:20.0",
            "0000:00:1f.8",
            "0000:0A:00.0",
            "0000:01:00.0\0",
            "0000:01\0:00.0",
            "0000:01:00.0 ",
            " 0000:01:00.0",
            "0000:01:00.0\n",
            "0000:1:00.0",
            "0000:001:00.0",
            "0000:01:0.0",
            "0000:01:00.00",
            "000:01:00.0",
            "00000:01:00.0",
            "00000000:01:00.0",
            "000000000:01:00.0",
            "0000:01:00",
            "0000:01:00.0.0",
            "0000:01:00:0",
            "0000.01.00.0",
            "0x00:01:00.0",
            "0000:01:00.0000000000000000000000000000",
        ];
        for text in attacks {
            let err = PciAddress::parse(text).expect_err(text);
            assert_eq!(err.input, text.escape_debug().to_string());
            assert!(err.to_string().contains("invalid PCI address"), "{err}");
        }
    }

    #[test]
    fn sysfs_paths_are_built_from_the_parsed_value() {
        let addr = PciAddress::parse("0000:01:10.2").unwrap();
        assert_eq!(
            addr.sysfs_rel(),
            PathBuf::from("bus/pci/devices/0000:01:10.2")
        );
        assert_eq!(
            addr.sysfs_path(),
            PathBuf::from("/sys/bus/pci/devices/0000:01:10.2")
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn address_deserialization_is_strict() {
        let ok: PciAddress = serde_json::from_str("\"0000:01:00.0\"").unwrap();
        assert_eq!(ok.to_string(), "0000:01:00.0");
        assert!(serde_json::from_str::<PciAddress>("\"0000:01:00.0/..\"").is_err());
        assert_eq!(serde_json::to_string(&ok).unwrap(), "\"0000:01:00.0\"");
    }
}
