//! The svff QMP command set: Rust types of `qmp-ext/qapi/svff.json`.
//!
//! Members are named as in the schema (`kebab-case` on the wire). Optional
//! members are `Option`s that are left out when `None`. Unknown members are
//! rejected, as QEMU's QAPI input visitor does.
//!
//! [`SCHEMA`] describes these types once more as data; a test parses the
//! schema file and checks it against [`SCHEMA`], and [`SCHEMA`] against the
//! Rust types, so the three cannot drift apart. VMMs serve the commands with
//! [`dispatch`] and a [`PausableDevices`] implementation.

use std::os::fd::OwnedFd;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::server::Session;
use crate::wire::{decode_arguments, QmpCommand, QmpError, QmpEvent};

/// The schema file's text (`qmp-ext/qapi/svff.json`).
pub const SCHEMA_JSON: &str = include_str!("../qapi/svff.json");

/// `SvffVfioState`: state of a pausable VFIO device ([`svff_types::DeviceState`],
/// shared with vfio-pause).
pub use svff_types::DeviceState as SvffVfioState;

/// `SvffVfioPausePolicy`: how guest BAR accesses are handled while paused
/// ([`svff_types::PausePolicy`]; the default is `ignore`).
pub use svff_types::PausePolicy as SvffVfioPausePolicy;

/// `SvffVfioPhaseName`: a timed step of a pause or unpause
/// ([`svff_types::Phase`], the names vfio-pause reports).
pub use svff_types::Phase as SvffVfioPhaseName;

use svff_types::{PausePolicy, Phase};

/// `SvffVfioPhase`: duration of one phase of a pause or unpause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SvffVfioPhase {
    /// Which phase.
    pub name: Phase,
    /// Duration in nanoseconds.
    pub ns: u64,
}

/// `SvffVfioTimings`: timings of one pause or unpause.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SvffVfioTimings {
    /// Duration of the whole operation in nanoseconds.
    pub total_ns: u64,
    /// Phases in the order they ran; empty if there was nothing to do.
    pub phases: Vec<SvffVfioPhase>,
}

/// `SvffVfioPausedAccesses`: guest accesses handled while paused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SvffVfioPausedAccesses {
    /// Config space reads served from the shadow copy.
    pub config_reads: u64,
    /// Config space writes applied to the shadow copy.
    pub config_writes: u64,
    /// BAR reads ignored or stalled.
    pub bar_reads: u64,
    /// BAR writes dropped or stalled.
    pub bar_writes: u64,
}

/// `SvffVfioInfo`: one entry of `query-svff-vfio`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SvffVfioInfo {
    /// Device id.
    pub id: String,
    /// Current state.
    pub state: SvffVfioState,
    /// Host PCI address (current, or before the current pause).
    pub host: String,
    /// Guest PCI address.
    pub guest: String,
    /// Pause policy in force, while not attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<SvffVfioPausePolicy>,
    /// Number of completed pauses.
    pub pause_count: u64,
    /// Guest accesses handled while paused.
    pub paused_accesses: SvffVfioPausedAccesses,
    /// Timings of the last completed pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pause: Option<SvffVfioTimings>,
    /// Timings of the last completed unpause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_unpause: Option<SvffVfioTimings>,
}

/// Arguments of `svff-vfio-pause`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SvffVfioPause {
    /// Device id.
    pub id: String,
    /// Pause policy (default: ignore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<SvffVfioPausePolicy>,
    /// Deadline of each stalled access in milliseconds (policy stall; at
    /// most 10000, default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_ms: Option<u64>,
}

impl SvffVfioPause {
    /// The policy in force: the one asked for, else `ignore`.
    pub fn effective_policy(&self) -> PausePolicy {
        self.policy.unwrap_or_default()
    }

    /// The stall deadline in force: `stall-ms` (default
    /// [`svff_types::DEFAULT_STALL`]) bounded by [`svff_types::MAX_STALL`].
    pub fn stall_deadline(&self) -> std::time::Duration {
        PausePolicy::bounded_stall(
            self.stall_ms
                .map(std::time::Duration::from_millis)
                .unwrap_or(svff_types::DEFAULT_STALL),
        )
    }
}

impl QmpCommand for SvffVfioPause {
    const NAME: &'static str = "svff-vfio-pause";
    type Returns = SvffVfioTimings;
}

/// Arguments of `svff-vfio-unpause`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SvffVfioUnpause {
    /// Device id.
    pub id: String,
    /// Host function: PCI address or sysfs path (default: the previous one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Name of a VFIO group fd passed earlier with `getfd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fdname: Option<String>,
}

impl QmpCommand for SvffVfioUnpause {
    const NAME: &'static str = "svff-vfio-unpause";
    type Returns = SvffVfioTimings;
}

/// Arguments of `query-svff-vfio` (none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySvffVfio {}

impl QmpCommand for QuerySvffVfio {
    const NAME: &'static str = "query-svff-vfio";
    type Returns = Vec<SvffVfioInfo>;
}

/// Data of the `SVFF_VFIO_STATE_CHANGED` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SvffVfioStateChanged {
    /// Device id.
    pub id: String,
    /// The new state.
    pub state: SvffVfioState,
}

impl QmpEvent for SvffVfioStateChanged {
    const NAME: &'static str = "SVFF_VFIO_STATE_CHANGED";
}

/// The pausable VFIO devices of a VMM, as the svff commands see them.
pub trait PausableDevices: Send + Sync {
    /// Pauses device `args.id`; returns once every host fd of it is closed.
    fn pause(&self, args: SvffVfioPause) -> Result<SvffVfioTimings, QmpError>;
    /// Unpauses device `args.id`; `group_fd` is the descriptor `args.fdname`
    /// named, already taken from the session.
    fn unpause(
        &self,
        args: SvffVfioUnpause,
        group_fd: Option<OwnedFd>,
    ) -> Result<SvffVfioTimings, QmpError>;
    /// Lists every pausable device.
    fn query(&self) -> Result<Vec<SvffVfioInfo>, QmpError>;
}

/// Serves an svff command from a [`crate::Handler`]: `None` if `command` is
/// not one of them, else the result to answer with.
pub fn dispatch(
    devices: &dyn PausableDevices,
    session: &mut Session,
    command: &str,
    arguments: Map<String, Value>,
) -> Option<Result<Value, QmpError>> {
    let result = match command {
        SvffVfioPause::NAME => decode_arguments(command, arguments)
            .and_then(|a| devices.pause(a))
            .and_then(encode),
        SvffVfioUnpause::NAME => decode_arguments::<SvffVfioUnpause>(command, arguments)
            .and_then(|a| {
                let fd = a
                    .fdname
                    .as_deref()
                    .map(|n| session.take_fd(n))
                    .transpose()?;
                devices.unpause(a, fd)
            })
            .and_then(encode),
        QuerySvffVfio::NAME => decode_arguments::<QuerySvffVfio>(command, arguments)
            .and_then(|_| devices.query())
            .and_then(encode),
        _ => return None,
    };
    Some(result)
}

fn encode<T: Serialize>(v: T) -> Result<Value, QmpError> {
    serde_json::to_value(v).map_err(|e| QmpError::generic(format!("encoding the result: {e}")))
}

/// A type named in the schema: a built-in or defined type, or a list of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeRef {
    /// `'name'`.
    Named(&'static str),
    /// `['name']`.
    List(&'static str),
}

/// A member of a struct, of command arguments or of event data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Wire name.
    pub name: &'static str,
    /// Its type.
    pub ty: TypeRef,
    /// Whether it may be left out (`'*name'` in the schema).
    pub optional: bool,
}

/// What a schema definition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefinitionKind {
    /// `'enum'` with its values.
    Enum(&'static [&'static str]),
    /// `'struct'` with its members.
    Struct(&'static [Member]),
    /// `'command'` with its argument members and return type.
    Command {
        /// Argument members.
        data: &'static [Member],
        /// Return type, if declared.
        returns: Option<TypeRef>,
    },
    /// `'event'` with its data members.
    Event(&'static [Member]),
}

/// Decodes a JSON value as a Rust type and encodes it again.
pub type Roundtrip = fn(Value) -> Result<Value, String>;

/// One definition of the svff schema as the Rust side knows it.
#[derive(Debug, Clone, Copy)]
pub struct Definition {
    /// Definition name (type, command or event name).
    pub name: &'static str,
    /// Kind and members.
    pub kind: DefinitionKind,
    /// `'features'`.
    pub features: &'static [&'static str],
    /// Round trip through the Rust type: the type itself for enums and
    /// structs, the arguments type for commands, the data type for events.
    pub roundtrip: Roundtrip,
    /// For commands, round trip through the Rust return type.
    pub roundtrip_returns: Option<Roundtrip>,
}

fn roundtrip<T: Serialize + DeserializeOwned>(v: Value) -> Result<Value, String> {
    let t: T = serde_json::from_value(v).map_err(|e| e.to_string())?;
    serde_json::to_value(t).map_err(|e| e.to_string())
}

const fn m(name: &'static str, ty: TypeRef, optional: bool) -> Member {
    Member { name, ty, optional }
}

use TypeRef::{List, Named};

/// The svff schema, hand-maintained next to the Rust types above.
pub const SCHEMA: &[Definition] = &[
    Definition {
        name: "SvffVfioState",
        kind: DefinitionKind::Enum(&["attached", "pausing", "paused", "unpausing", "detached"]),
        features: &[],
        roundtrip: roundtrip::<SvffVfioState>,
        roundtrip_returns: None,
    },
    Definition {
        name: "SvffVfioPausePolicy",
        kind: DefinitionKind::Enum(&["ignore", "stall"]),
        features: &[],
        roundtrip: roundtrip::<SvffVfioPausePolicy>,
        roundtrip_returns: None,
    },
    Definition {
        name: "SvffVfioPhaseName",
        kind: DefinitionKind::Enum(&[
            "unmap-bars",
            "snapshot",
            "irq-teardown",
            "munmap",
            "close",
            "reopen",
            "dma-remap",
            "identity",
            "restore",
            "irq-setup",
            "mmap",
            "map-bars",
        ]),
        features: &[],
        roundtrip: roundtrip::<SvffVfioPhaseName>,
        roundtrip_returns: None,
    },
    Definition {
        name: "SvffVfioPhase",
        kind: DefinitionKind::Struct(&[
            m("name", Named("SvffVfioPhaseName"), false),
            m("ns", Named("uint64"), false),
        ]),
        features: &[],
        roundtrip: roundtrip::<SvffVfioPhase>,
        roundtrip_returns: None,
    },
    Definition {
        name: "SvffVfioTimings",
        kind: DefinitionKind::Struct(&[
            m("total-ns", Named("uint64"), false),
            m("phases", List("SvffVfioPhase"), false),
        ]),
        features: &[],
        roundtrip: roundtrip::<SvffVfioTimings>,
        roundtrip_returns: None,
    },
    Definition {
        name: "SvffVfioPausedAccesses",
        kind: DefinitionKind::Struct(&[
            m("config-reads", Named("uint64"), false),
            m("config-writes", Named("uint64"), false),
            m("bar-reads", Named("uint64"), false),
            m("bar-writes", Named("uint64"), false),
        ]),
        features: &[],
        roundtrip: roundtrip::<SvffVfioPausedAccesses>,
        roundtrip_returns: None,
    },
    Definition {
        name: "SvffVfioInfo",
        kind: DefinitionKind::Struct(&[
            m("id", Named("str"), false),
            m("state", Named("SvffVfioState"), false),
            m("host", Named("str"), false),
            m("guest", Named("str"), false),
            m("policy", Named("SvffVfioPausePolicy"), true),
            m("pause-count", Named("uint64"), false),
            m("paused-accesses", Named("SvffVfioPausedAccesses"), false),
            m("last-pause", Named("SvffVfioTimings"), true),
            m("last-unpause", Named("SvffVfioTimings"), true),
        ]),
        features: &[],
        roundtrip: roundtrip::<SvffVfioInfo>,
        roundtrip_returns: None,
    },
    Definition {
        name: SvffVfioPause::NAME,
        kind: DefinitionKind::Command {
            data: &[
                m("id", Named("str"), false),
                m("policy", Named("SvffVfioPausePolicy"), true),
                m("stall-ms", Named("uint64"), true),
            ],
            returns: Some(Named("SvffVfioTimings")),
        },
        features: &["unstable"],
        roundtrip: roundtrip::<SvffVfioPause>,
        roundtrip_returns: Some(roundtrip::<<SvffVfioPause as QmpCommand>::Returns>),
    },
    Definition {
        name: SvffVfioUnpause::NAME,
        kind: DefinitionKind::Command {
            data: &[
                m("id", Named("str"), false),
                m("host", Named("str"), true),
                m("fdname", Named("str"), true),
            ],
            returns: Some(Named("SvffVfioTimings")),
        },
        features: &["unstable"],
        roundtrip: roundtrip::<SvffVfioUnpause>,
        roundtrip_returns: Some(roundtrip::<<SvffVfioUnpause as QmpCommand>::Returns>),
    },
    Definition {
        name: QuerySvffVfio::NAME,
        kind: DefinitionKind::Command {
            data: &[],
            returns: Some(List("SvffVfioInfo")),
        },
        features: &["unstable"],
        roundtrip: roundtrip::<QuerySvffVfio>,
        roundtrip_returns: Some(roundtrip::<<QuerySvffVfio as QmpCommand>::Returns>),
    },
    Definition {
        name: SvffVfioStateChanged::NAME,
        kind: DefinitionKind::Event(&[
            m("id", Named("str"), false),
            m("state", Named("SvffVfioState"), false),
        ]),
        features: &["unstable"],
        roundtrip: roundtrip::<SvffVfioStateChanged>,
        roundtrip_returns: None,
    },
];
