//! QMP wire types (docs/interop/qmp-spec.rst): greeting, errors, events.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `{"qemu": {"major", "minor", "micro"}, "package"}` as in QEMU's `VersionInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The version triple.
    pub qemu: VersionTriple,
    /// Free-form package/build string (QEMU puts its distro version here).
    pub package: String,
}

/// Major, minor and micro version numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
}

impl VersionInfo {
    /// Version information naming this crate's version and `package`.
    pub fn svff(package: &str) -> Self {
        let num = |s: &str| s.parse().unwrap_or(0);
        VersionInfo {
            qemu: VersionTriple {
                major: num(env!("CARGO_PKG_VERSION_MAJOR")),
                minor: num(env!("CARGO_PKG_VERSION_MINOR")),
                micro: num(env!("CARGO_PKG_VERSION_PATCH")),
            },
            package: package.to_string(),
        }
    }
}

/// The server greeting: `{"QMP": {"version": ..., "capabilities": [...]}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// The greeting body.
    #[serde(rename = "QMP")]
    pub qmp: GreetingBody,
}

/// Contents of the `QMP` member of the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GreetingBody {
    /// Server version.
    pub version: VersionInfo,
    /// Capabilities the client may enable with `qmp_capabilities`.
    pub capabilities: Vec<String>,
}

/// QEMU's `QapiErrorClass` values; unknown classes from newer servers are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ErrorClass {
    /// Every error without a more specific class.
    GenericError,
    /// The command does not exist (or is not allowed in the current mode).
    CommandNotFound,
    /// A device has no medium / is not active.
    DeviceNotActive,
    /// The requested device does not exist.
    DeviceNotFound,
    /// KVM lacks a required capability.
    KVMMissingCap,
    /// A class this crate does not know.
    Other(String),
}

impl From<String> for ErrorClass {
    fn from(s: String) -> Self {
        match s.as_str() {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KVMMissingCap,
            _ => ErrorClass::Other(s),
        }
    }
}

impl From<ErrorClass> for String {
    fn from(c: ErrorClass) -> Self {
        c.as_str().to_string()
    }
}

impl ErrorClass {
    /// The class name as on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
            ErrorClass::Other(s) => s,
        }
    }
}

/// The body of an error response: `{"class": ..., "desc": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QmpError {
    /// Error class; clients branch on this.
    pub class: ErrorClass,
    /// Human-readable description; clients must not parse it.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with this description.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A `DeviceNotFound` error with this description.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: desc.into(),
        }
    }

    /// QEMU's `CommandNotFound` error for an unknown command.
    pub fn command_not_found(command: &str) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {command} has not been found"),
        }
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class.as_str(), self.desc)
    }
}

impl std::error::Error for QmpError {}

/// Time of an event, relative to the Unix epoch; `-1`/`-1` if unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Whole seconds.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                seconds: i64::try_from(d.as_secs()).unwrap_or(-1),
                microseconds: i64::from(d.subsec_micros()),
            },
            Err(_) => Timestamp {
                seconds: -1,
                microseconds: -1,
            },
        }
    }
}

/// An asynchronous event: `{"event": NAME, "data": {...}, "timestamp": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Event name, e.g. `STOP`.
    #[serde(rename = "event")]
    pub name: String,
    /// Event-specific data, if the event has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Map<String, Value>>,
    /// When the server emitted the event.
    pub timestamp: Timestamp,
}

impl Event {
    /// Decodes `data` into an event's typed payload, checking the name.
    pub fn decode<E: QmpEvent>(&self) -> Result<E, QmpError> {
        if self.name != E::NAME {
            return Err(QmpError::generic(format!(
                "event {} is not {}",
                self.name,
                E::NAME
            )));
        }
        let data = Value::Object(self.data.clone().unwrap_or_default());
        serde_json::from_value(data)
            .map_err(|e| QmpError::generic(format!("event {}: {e}", self.name)))
    }
}

/// A QMP command with typed arguments and return value.
pub trait QmpCommand: Serialize + DeserializeOwned {
    /// The command name as on the wire.
    const NAME: &'static str;
    /// What the command returns on success.
    type Returns: Serialize + DeserializeOwned;
}

/// A QMP event with a typed payload.
pub trait QmpEvent: Serialize + DeserializeOwned {
    /// The event name as on the wire.
    const NAME: &'static str;
}

/// Serializes `value` as one line of ASCII-only JSON, as QMP servers send
/// it: non-ASCII characters become `\uXXXX` escapes (surrogate pairs above
/// U+FFFF), and the line ends with CRLF.
pub(crate) fn to_ascii_line(value: &Value) -> Vec<u8> {
    struct Ascii;
    impl serde_json::ser::Formatter for Ascii {
        fn write_string_fragment<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            fragment: &str,
        ) -> std::io::Result<()> {
            for c in fragment.chars() {
                if c.is_ascii() {
                    w.write_all(&[c as u8])?;
                } else {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        write!(w, "\\u{u:04x}")?;
                    }
                }
            }
            Ok(())
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Ascii);
    // Serializing a Value into memory cannot fail.
    if value.serialize(&mut ser).is_err() {
        out.clear();
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Decodes command arguments, answering QEMU-style `GenericError` on mismatch.
pub fn decode_arguments<T: DeserializeOwned>(
    command: &str,
    arguments: Map<String, Value>,
) -> Result<T, QmpError> {
    serde_json::from_value(Value::Object(arguments))
        .map_err(|e| QmpError::generic(format!("Invalid arguments for '{command}': {e}")))
}
