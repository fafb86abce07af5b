//! Serializable views: `svff status --json` and the report of a VF count change.

use serde::{Deserialize, Serialize};

use crate::pci::PciAddress;

/// Version of the `svff status --json` format ([`Status::format_version`]).
/// Bumped only on incompatible changes; fields may be added without a bump.
pub const STATUS_FORMAT_VERSION: u32 = 1;

/// The state of the SR-IOV PFs, as `svff status --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Always [`STATUS_FORMAT_VERSION`] for this layout.
    pub format_version: u32,
    /// The PFs, sorted by address.
    pub pfs: Vec<PfStatus>,
    /// The helper's assignment table for these PFs, each entry with the
    /// pause state its VMM reports (added to format 1 later: absent means
    /// empty; always empty when the table is not readable, e.g. a
    /// `--direct` status without `--config`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assignments: Vec<AssignmentStatus>,
    /// The configured VMs (added to format 1 later: absent means none or
    /// no config), for kind `svff-vmm` with the VMM process svff started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmStatus>,
}

/// One configured VM, as `svff status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Its name.
    pub name: String,
    /// `svff-vmm` or `qmp`.
    pub kind: crate::config::VmKind,
    /// Its QMP socket.
    pub qmp: std::path::PathBuf,
    /// Kind `svff-vmm`: `running`, `exited` or `not started` (from svff's
    /// pid file and `/proc`); `null` for kind `qmp`.
    pub process: Option<String>,
    /// Kind `svff-vmm`: the VMM's pid (running or last).
    pub pid: Option<u32>,
    /// Kind `svff-vmm`: the VMM's stderr log.
    pub log: Option<std::path::PathBuf>,
    /// Kind `svff-vmm`: the VMM's stdout (the guest's serial console by default).
    pub serial: Option<std::path::PathBuf>,
}

/// One entry of the assignment table, as `svff status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentStatus {
    /// The entry (PF, VF index, host BDF, VM, device id, bus, guest address, state).
    #[serde(flatten)]
    pub entry: crate::orch::state::Assignment,
    /// The device's state as the VMM reports it (`query-svff-vfio`:
    /// `attached`, `paused`, `pausing`, `unpausing`, `detached`), `null`
    /// when the VMM does not speak the svff commands or did not answer.
    pub vmm_state: Option<svff_types::DeviceState>,
    /// Why `vmm_state` is `null`: `"VMM does not speak the svff QMP
    /// commands"`, or the error reaching it; `null` when it answered.
    pub vmm_note: Option<String>,
}

/// One SR-IOV physical function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PfStatus {
    /// PF address.
    pub bdf: PciAddress,
    /// `vendor` attribute as sysfs shows it, e.g. `0x8086`.
    pub vendor: String,
    /// `device` attribute as sysfs shows it, e.g. `0x10c9`.
    pub device: String,
    /// Bound driver (`driver` link name), `null` when unbound.
    pub driver: Option<String>,
    /// `sriov_totalvfs`.
    pub totalvfs: u16,
    /// `sriov_numvfs`.
    pub numvfs: u16,
    /// `sriov_drivers_autoprobe`.
    pub drivers_autoprobe: bool,
    /// The VFs, in `virtfnN` order.
    pub vfs: Vec<VfStatus>,
    /// The svff register window, for a PF of the svff QDMA design; `null`
    /// for other devices.
    #[serde(default)]
    pub fpga: Option<FpgaStatus>,
    /// The NVMe controller's flexible resources, for a PF on the `nvme`
    /// driver (the nvme profile); `null` for other PFs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<crate::nvme::NvmeStatus>,
}

/// One virtual function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfStatus {
    /// N of the PF's `virtfnN` link.
    pub index: u16,
    /// VF address.
    pub bdf: PciAddress,
    /// `vendor` attribute, e.g. `0x8086`.
    pub vendor: String,
    /// `device` attribute, e.g. `0x10ca`.
    pub device: String,
    /// Bound driver, `null` when unbound.
    pub driver: Option<String>,
    /// IOMMU group number, `null` without an IOMMU.
    pub iommu_group: Option<u32>,
    /// Id of the VMM device holding this VF per the helper's assignment table;
    /// `null` when no VMM holds it.
    pub holder: Option<String>,
    /// A process holding the VF's VFIO group (or cdev) open, found in
    /// `/proc/<pid>/fd`; `null` when none visible to the caller does.
    pub held_by: Option<HeldBy>,
    /// The svff register window, for a VF of the svff QDMA design; `null`
    /// for other devices.
    #[serde(default)]
    pub fpga: Option<FpgaStatus>,
    /// This VF's NVMe secondary controller (state and resources), for a VF
    /// of a PF on the `nvme` driver; `null` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<crate::nvme::SecondaryStatus>,
}

/// What a function of the svff QDMA design shows in its register window
/// (`fpga` in the status), read through its BAR [`crate::SVFF_REGS_BAR`].
///
/// On success `id`, `version`, `function` and `is_pf` are set and `error` is
/// `null`; when the window cannot be read or does not hold the svff magic,
/// `error` says why (and `id` holds what was read, if anything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpgaStatus {
    /// The BAR the window was read through (2).
    pub bar: u8,
    /// The ID register, e.g. `0x53564646` (ASCII "SVFF").
    pub id: Option<String>,
    /// The VERSION register, e.g. `0x00010000` (major in bits 31:16, minor in 15:0).
    pub version: Option<String>,
    /// FUNC_INFO.FN: the function number QDMA gives this function (0..=3:
    /// PF0..PF3, 4..=255: the VFs).
    pub function: Option<u32>,
    /// FUNC_INFO.IS_PF.
    pub is_pf: Option<bool>,
    /// Why the window could not be read, or is not svff's.
    pub error: Option<String>,
}

/// A process holding a VF's VFIO file open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBy {
    /// Its pid.
    pub pid: u32,
    /// Its name (`/proc/<pid>/comm`), e.g. `qemu-system-x86`.
    pub comm: String,
    /// The file it holds, e.g. `/dev/vfio/8`.
    pub file: String,
}

/// One timed step of an operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// What was done, e.g. `disable_vfs`, `enable_vfs`, `bind_vfs`.
    pub name: String,
    /// Wall time in milliseconds.
    pub ms: f64,
}

/// The result of `svff vfs set`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VfsSetReport {
    /// The PF.
    pub pf: PciAddress,
    /// `sriov_numvfs` before.
    pub from: u16,
    /// `sriov_numvfs` after.
    pub to: u16,
    /// Whether the count was changed (false: it already was `to`).
    pub changed: bool,
    /// The steps taken, in order, with their wall time.
    pub steps: Vec<Step>,
    /// The PF afterwards.
    pub status: PfStatus,
}

/// Sets each VF's `holder` to the device id the assignment table gives it.
pub fn fill_holders(status: &mut Status) {
    for pf in &mut status.pfs {
        for vf in &mut pf.vfs {
            vf.holder = status
                .assignments
                .iter()
                .find(|a| a.entry.pf == pf.bdf && a.entry.vf == vf.index)
                .map(|a| a.entry.id.clone());
        }
    }
}
