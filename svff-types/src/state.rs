//! States, pause policies and phase names of a pausable VFIO device.

use std::fmt;
use std::time::Duration;

/// Lifecycle state of a pausable VFIO device.
///
/// The discriminants are the values of the C ABI (`vp_device_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
#[repr(C)]
pub enum DeviceState {
    /// Host function open, IRQs wired; guest accesses reach it.
    Attached = 0,
    /// Every host fd of the function closed; the guest still sees the
    /// device, its accesses are handled by the VMM per the [`PausePolicy`].
    Paused = 1,
    /// Closed for good (hot-unplugged); no further operation is possible.
    Detached = 2,
    /// A pause is in progress (fds being closed); accesses are handled as
    /// while paused.
    Pausing = 3,
    /// An unpause is in progress (function being opened and checked);
    /// accesses are handled as while paused.
    Unpausing = 4,
}

impl DeviceState {
    /// Every state.
    pub const ALL: [DeviceState; 5] = [
        DeviceState::Attached,
        DeviceState::Pausing,
        DeviceState::Paused,
        DeviceState::Unpausing,
        DeviceState::Detached,
    ];

    /// Wire name, e.g. `unpausing`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceState::Attached => "attached",
            DeviceState::Pausing => "pausing",
            DeviceState::Paused => "paused",
            DeviceState::Unpausing => "unpausing",
            DeviceState::Detached => "detached",
        }
    }

    /// Whether guest accesses are handled by the VMM (shadow config space,
    /// [`PausePolicy`] for BARs) rather than by the host function.
    pub fn is_paused_view(self) -> bool {
        matches!(
            self,
            DeviceState::Pausing | DeviceState::Paused | DeviceState::Unpausing
        )
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What guest BAR accesses do while a device is paused (or pausing or
/// unpausing). The default is [`PausePolicy::Ignore`] everywhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
pub enum PausePolicy {
    /// Reads return all ones, writes are dropped; both are counted.
    #[default]
    Ignore,
    /// The access waits, holding none of the locks an unpause needs, until
    /// the device is attached again (then it is performed) or its deadline
    /// passes (then it is ignored). Every stall is bounded by [`MAX_STALL`].
    Stall,
}

impl PausePolicy {
    /// Wire name.
    pub fn name(self) -> &'static str {
        match self {
            PausePolicy::Ignore => "ignore",
            PausePolicy::Stall => "stall",
        }
    }

    /// The deadline a stall actually gets for a requested one: at most
    /// [`MAX_STALL`] (so any value, `Duration::MAX` included, is safe to add
    /// to an `Instant`).
    pub fn bounded_stall(requested: Duration) -> Duration {
        requested.min(MAX_STALL)
    }
}

impl fmt::Display for PausePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Longest a stalled access waits, whatever was asked for: 10 s (a guest
/// kernel reports a soft lockup of a vCPU after 20 s).
pub const MAX_STALL: Duration = Duration::from_secs(10);

/// Stall deadline when the stall policy is chosen without one: 5 s, about
/// twice a 10-VF reconfiguration in the lab.
pub const DEFAULT_STALL: Duration = Duration::from_secs(5);

/// A timed step of a pause or unpause; the names are those of the QMP
/// schema's `SvffVfioPhaseName`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
#[repr(C)]
pub enum Phase {
    /// VMM drops guest BAR mappings.
    UnmapBars = 0,
    /// Config-space snapshot into the shadow.
    Snapshot = 1,
    /// Device IRQs and the request IRQ disabled.
    IrqTeardown = 2,
    /// BAR mmaps released.
    Munmap = 3,
    /// Device fd closed (FLR), group out of the container, group fd closed.
    Close = 4,
    /// Group into the container, device fd opened (FLR).
    Reopen = 5,
    /// Registered guest memory mapped again (only when the container had lost it).
    DmaRemap = 6,
    /// Identity check of the new function.
    Identity = 7,
    /// Config restore (BARs, guest writes made while paused, command).
    Restore = 8,
    /// IRQs wired again.
    IrqSetup = 9,
    /// BARs mmapped again.
    Mmap = 10,
    /// VMM maps BARs into the guest again.
    MapBars = 11,
}

impl Phase {
    /// Number of phases.
    pub const COUNT: usize = 12;
    /// Every phase in order.
    pub const ALL: [Phase; Phase::COUNT] = [
        Phase::UnmapBars,
        Phase::Snapshot,
        Phase::IrqTeardown,
        Phase::Munmap,
        Phase::Close,
        Phase::Reopen,
        Phase::DmaRemap,
        Phase::Identity,
        Phase::Restore,
        Phase::IrqSetup,
        Phase::Mmap,
        Phase::MapBars,
    ];

    /// Wire name, e.g. `irq-teardown`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::UnmapBars => "unmap-bars",
            Phase::Snapshot => "snapshot",
            Phase::IrqTeardown => "irq-teardown",
            Phase::Munmap => "munmap",
            Phase::Close => "close",
            Phase::Reopen => "reopen",
            Phase::DmaRemap => "dma-remap",
            Phase::Identity => "identity",
            Phase::Restore => "restore",
            Phase::IrqSetup => "irq-setup",
            Phase::Mmap => "mmap",
            Phase::MapBars => "map-bars",
        }
    }

    /// The phase with this wire name.
    pub fn from_name(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_round_trip_and_follow_the_discriminants() {
        for (i, p) in Phase::ALL.into_iter().enumerate() {
            assert_eq!(p as usize, i);
            assert_eq!(Phase::from_name(p.name()), Some(p));
        }
        assert_eq!(Phase::from_name("quiesce"), None);
    }

    #[test]
    fn ignore_is_the_default_policy_and_stalls_are_bounded() {
        assert_eq!(PausePolicy::default(), PausePolicy::Ignore);
        assert_eq!(PausePolicy::bounded_stall(Duration::MAX), MAX_STALL);
        assert!(DEFAULT_STALL <= MAX_STALL);
        // A bounded deadline can be added to now without overflow.
        let _ = std::time::Instant::now() + PausePolicy::bounded_stall(Duration::MAX);
    }

    #[test]
    fn paused_view_covers_the_transitions() {
        let v: Vec<&str> = DeviceState::ALL
            .into_iter()
            .filter(|s| s.is_paused_view())
            .map(DeviceState::name)
            .collect();
        assert_eq!(v, ["pausing", "paused", "unpausing"]);
    }

    #[cfg(feature = "serde")]
    #[test]
    fn serde_uses_the_wire_names() {
        for s in DeviceState::ALL {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        for p in Phase::ALL {
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
        let p: PausePolicy = serde_json::from_str("\"stall\"").unwrap();
        assert_eq!(p, PausePolicy::Stall);
    }
}
