//! svff's privileged helper: SR-IOV PF management on sysfs, the helper daemon
//! and the `svff` CLI.
//!
//! # Library
//!
//! - [`PciAddress`] / [`DriverName`]: strictly parsed names (a `PciAddress` is
//!   accepted only if it formats back to the exact input). Every sysfs path is
//!   built from them and checked to resolve under `<sysfs>/devices`.
//! - [`Sysfs`] / [`RealSysfs`]: the only access to sysfs, with a configurable root.
//! - [`SriovManager`]: PF discovery ([`SriovManager::status`]), VF count changes
//!   ([`SriovManager::set_vf_count`]: a no-op when equal, else
//!   `sriov_drivers_autoprobe=0`, `sriov_numvfs=0`, `sriov_numvfs=N`), binding with
//!   `driver_override` + `drivers_probe` (never `new_id`), PF driver handling
//!   (own driver, `pci-pf-stub`, `qdma-pf`), QDMA settings ([`QdmaProfile`]) and
//!   bitstream programming ([`BitstreamConfig`]). The kernel's answers become
//!   clear [`Error`]s: `ERANGE` → "PF 0000:01:00.0 supports at most 7 VFs",
//!   `EBUSY` → busy, `ENOENT` → "PF driver cannot configure SR-IOV".
//! - [`SriovManager::open_bar`] / [`BarReader`]: 32-bit register reads from a
//!   function's memory BAR through its sysfs `resource<N>` file (mmap of one
//!   page, volatile loads, offsets checked against the BAR size), and
//!   [`SriovManager::read_svff_identity`]: the ID / VERSION / FUNC_INFO
//!   registers of the svff FPGA user logic on BAR [`SVFF_REGS_BAR`], with the
//!   offsets and the magic generated from `fpga-rtl/REGISTERS.md`.
//! - [`Daemon`], [`Config`], [`request`]: the daemon and its client.
//! - The **nvme profile** (PF bound to the kernel's `nvme` driver, VFs are NVMe
//!   secondary controllers): [`SriovManager::set_vf_count_with`] gives VFs
//!   flexible queue (VQ) and interrupt (VI) resources ([`NvmeResources`]),
//!   checked against the controller's Primary Controller Capabilities before
//!   anything is written and applied after VF creation with NVMe
//!   Virtualization Management (each secondary offline, assign VQ, assign
//!   VI, online), before the VFs are bound. The helper issues the admin
//!   commands itself through the kernel's passthrough ioctl
//!   (`NVME_IOCTL_ADMIN_CMD` on `/dev/nvmeN`, [`NvmeDevice`]) rather than
//!   running nvme-cli: no shell-out from privileged code, every command
//!   bounded by the kernel's `timeout_ms` (10 s), the encoding unit-tested,
//!   no extra package. `svff vfs set --resources 0=vq:2,vi:1,1=vq:4,vi:2` or
//!   `--vq 2 --vi 1` (every VF); in the daemon's config
//!   `nvme = { vq = 2, vi = 1, vf = { 3 = { vq = 4, vi = 2 } } }`.
//!   A VF given resources needs at least 2 VQ and 1 VI to go online;
//!   `vq:0,vi:0` leaves it offline. Refusals (`nvme_resources`) name the PF,
//!   the VF and the resource, e.g. "PF 0000:02:00.0: NVMe VF resources: VF 1:
//!   3 VQ requested, at most 2 per secondary controller (VQFRSM)".
//! - [`Orchestrator`]: `svff init`, `svff reconf`, `svff recover` across
//!   running VMs ([`Vmm`] / [`Connector`]: QMP to QEMU or svff-vmm), with the
//!   assignment table ([`StateDir`], [`AssignmentTable`]) and the
//!   write-ahead journal in the config's `state_dir`. The flow, the failure
//!   outcomes and the `--json` result ([`OpReport`], format
//!   [`RESULT_FORMAT_VERSION`]) are described in the `orch` module docs,
//!   reproduced here:
//!
#![doc = include_str!("orch/README.md")]
//!
//!
//! # `svff status --json` (format version 1)
//!
//! ```json
//! {
//!   "format_version": 1,
//!   "pfs": [
//!     {
//!       "bdf": "0000:01:00.0",
//!       "vendor": "0x8086", "device": "0x10c9",
//!       "driver": "igb",
//!       "totalvfs": 7, "numvfs": 2, "drivers_autoprobe": false,
//!       "vfs": [
//!         { "index": 0, "bdf": "0000:01:10.0", "vendor": "0x8086", "device": "0x10ca",
//!           "driver": "vfio-pci", "iommu_group": 8, "holder": null,
//!           "held_by": { "pid": 4242, "comm": "qemu-system-x86", "file": "/dev/vfio/8" },
//!           "fpga": null }
//!       ],
//!       "fpga": null
//!     },
//!     {
//!       "bdf": "0000:81:00.0",
//!       "vendor": "0x10ee", "device": "0x903f",
//!       "driver": "qdma-pf",
//!       "totalvfs": 64, "numvfs": 1, "drivers_autoprobe": false,
//!       "vfs": [
//!         { "index": 0, "bdf": "0000:81:00.4", "vendor": "0x10ee", "device": "0xa03f",
//!           "driver": "vfio-pci", "iommu_group": 40, "holder": null, "held_by": null,
//!           "fpga": { "bar": 2, "id": "0x53564646", "version": "0x00010000",
//!                     "function": 4, "is_pf": false, "error": null } }
//!       ],
//!       "fpga": { "bar": 2, "id": "0x53564646", "version": "0x00010000",
//!                 "function": 0, "is_pf": true, "error": null }
//!     }
//!   ]
//! }
//! ```
//!
//! For a PF on the `nvme` driver (nvme profile), the PF entry also has
//! `"nvme": {"controller": "/dev/nvme0 (PF 0000:02:00.0)", "vq_total": 128,
//! "vq_assigned": 6, "vq_primary": 0, "vq_max_per_vf": 16, "vi_total": 64,
//! "vi_assigned": 3, "vi_primary": 0, "vi_max_per_vf": 8, "error": null}`
//! ([`NvmeStatus`]: VQFRT, VQRFA, VQRFAP, VQFRSM and the VI counterparts from
//! Identify Primary Controller Capabilities; when the controller cannot be
//! read, `error` says why and the rest is `null`), and each of its VFs
//! `"nvme": {"scid": 1, "online": true, "vq": 2, "vi": 1}`
//! ([`SecondaryStatus`]: its secondary controller from the Secondary
//! Controller List, matched by VF number). Both were added to format 1: they
//! are absent (meaning `null`) for other PFs and their VFs.
//!
//! `format_version` ([`STATUS_FORMAT_VERSION`]) changes only on incompatible
//! changes; new fields may appear without a bump. PFs are sorted by address,
//! VFs by `virtfnN` index. `vendor`/`device` are the sysfs attributes verbatim;
//! `driver` is the name of the `driver` link (`null`: unbound); `iommu_group`
//! the number of the `iommu_group` link (`null`: no IOMMU); `holder` the VMM
//! device id holding the VF per the assignment table (`null`: none, or the
//! table is not known: a `--direct` status without a readable `--config`); `held_by` a
//! process that holds the VF: its VFIO group or cdev open, a VFIO device fd
//! whose fdinfo names the VF (`file` then reads `anon_inode:[vfio-device] (VFIO
//! device fd N)`), or a mapping of one of its BARs (`<path> (mapped)`), from
//! `/proc/<pid>/fd`, `fdinfo` and `maps` (`null`: none visible to the caller; a
//! non-root `--direct` caller sees only its own processes; a device fd whose
//! fdinfo does not name its device, as on Linux 6.12, is found only by the
//! in-use check's group probe, not by status). `fpga` ([`FpgaStatus`]; added to format 1 later, so an
//! absent field means `null`) is `null` except for functions of the
//! svff FPGA design (vendor `0x10ee`, device `0x903f`/`0x913f`/`0x923f`/`0x933f`
//! for PF0..PF3, `0xa03f`..`0xa33f` for their VFs, per
//! `fpga-rtl/vivado/svff_qdma.tcl`): for those the helper maps BAR 2 (the svff
//! register window of `fpga-rtl/REGISTERS.md`) and reports `id` and `version`
//! (the ID and VERSION registers, `0x%08x`), `function` and `is_pf` (from
//! FUNC_INFO), `error` `null`. When the BAR cannot be read (no root, BAR
//! claimed by a driver on a kernel with `CONFIG_IO_STRICT_DEVMEM`, function
//! gone, memory decoding off or not in D0: "not read: ...", and the BAR is then
//! not touched) or ID is not the svff magic `0x53564646` (another QDMA design),
//! `error` holds the message, `id` what was read if anything, and the other
//! fields are `null`: one unreadable function never fails the whole status.
//! With `--direct` every SR-IOV capable
//! device is listed, through the daemon the PFs of its allow-list. The field
//! meanings are those of [`Status`], [`PfStatus`] and [`VfStatus`].
//!
//! `svff vfs set --json` prints a [`VfsSetReport`]: `pf`, `from`, `to`,
//! `changed`, `steps` (`[{"name": "enable_vfs", "ms": 513.6}, ...]`, names
//! `pf_driver`, `nvme_check`, `check_in_use`, `autoprobe_off`, `disable_vfs`,
//! `enable_vfs`, `nvme_resources`, `bind_vfs`, `qdma_profile`) and `status` (the PF afterwards, as above).
//!
//! Before VFs are destroyed or a VF leaves `vfio-pci`, the helper looks for
//! every holder of the VF (the `held_by` sources above, then a probe of the
//! kernel's group exclusivity: a group an open device fd keeps busy answers
//! `EBUSY`, which also reveals device fds in flight in a unix socket) and
//! refuses with `vf_in_use` instead of letting the kernel block the write
//! until the VMM lets go. Drivers that are not loaded are loaded first
//! (`modprobe`, bounded wait, names restricted to `[a-z0-9_-]`).
//!
//! # Daemon protocol (version 1)
//!
//! `svff helper` listens on a unix stream socket (default
//! `/run/svff/helper.sock`, mode 0660, or the socket passed by systemd socket
//! activation, see `pf-helper/systemd/`). On accept it reads the peer's
//! credentials with `SO_PEERCRED` and its supplementary groups with
//! `SO_PEERGROUPS`; a peer whose uid is not in `allowed_uids` and none of whose
//! gids is in `allowed_gids` gets one error line (`kind` `permission_denied`)
//! and is disconnected at once, without taking a connection slot. A request
//! line must be complete within 10 s of its first byte (an idle connection is
//! dropped after 60 s); when all 32 slots are taken, the connection that has
//! waited longest for a request line is closed to make room.
//!
//! A client then sends requests, one JSON object per line (at most 64 KiB), and
//! gets one response line each, in order:
//!
//! | request | result |
//! |---|---|
//! | `{"op":"ping"}` | `{"version":"0.1.0"}` |
//! | `{"op":"status"}` or `{"op":"status","pf":"0000:01:00.0"}` | a status object as above |
//! | `{"op":"vfs_set","pf":"0000:01:00.0","count":4,"bind":"vfio-pci"}` (`bind` optional; `"resources": {"default": {"vq": 2, "vi": 1}, "vfs": {"1": {"vq": 2, "vi": 1}}}` optional, nvme profile, overrides the PF's `nvme` config) | a [`VfsSetReport`] |
//! | `{"op":"program","pf":"0000:81:00.0"}` | `{"steps":[...]}` |
//!
//! Responses: `{"protocol":1,"ok":true,"result":...}` or
//! `{"protocol":1,"ok":false,"error":{"kind":"too_many_vfs","message":"PF 0000:01:00.0 supports at most 7 VFs (8 requested)"}}`.
//! Error kinds ([`Error::kind`]): `invalid_argument`, `no_device`,
//! `too_many_vfs`, `busy`, `stuck`, `vf_in_use`, `no_sriov_configure`, `driver_not_loaded`,
//! `bind_failed`, `count_mismatch`, `sysfs`, `bar`, `not_svff`, `qdma`, `bitstream`, `config`,
//! `nvme` (controller not found, or an admin command failed: the NVMe status is in the message),
//! `nvme_resources` (requested VF resources refused, or not what the controller shows afterwards),
//! `not_allowed` (PF not on the allow-list, or driver not in `vf_drivers`),
//! `permission_denied`, `protocol`, `internal`. Unknown fields (on every
//! request, `ping` included), malformed addresses or driver names are
//! `protocol` errors. Changes (`vfs_set`, `program`) are carried out one at a
//! time on a worker thread under a watchdog (`watchdog_s`, default 60 s;
//! `program` adds its `timeout_s`): when it fires, a sysfs write is blocked in
//! the kernel; the answer is `stuck`, the write goes on in the background, and
//! until it returns every other change gets `busy`. `ping` takes no lock;
//! `status` waits for a change running on one of its PFs (whose attributes the
//! kernel locks meanwhile) and answers `busy` for a PF whose change is stuck
//! (after at most 2 s more), while other PFs' status is served as usual.
//! The PF driver and QDMA settings come from the PF's entry in the config.
//! The config format is described at [`Config`].
//!
//! Orchestration requests (results: an [`OpReport`]), carried out as changes
//! (one at a time, under the watchdog plus the VMs' deadlines):
//!
//! | request | CLI |
//! |---|---|
//! | `{"op":"init"}` | `svff init` |
//! | `{"op":"reconf","pf":"0000:01:00.0","vfs":2,"mode":"detach","assign":[{"vm":"vm1","count":1}]}` (`mode` default `pause`, `assign` optional) | `svff reconf --pf 0000:01:00.0 --vfs 2 --mode detach --assign vm1=1` |
//! | `{"op":"pool_reconf","pf":"0000:02:00.0","resources":{"vfs":{"0":{"vq":4,"vi":2}}},"assign":[{"vm":"vm1","count":1}]}` (pool mode; `assign` optional) | `svff reconf --pf 0000:02:00.0 --resources 0=vq:4,vi:2 --assign vm1=1` |
//! | `{"op":"recover"}` | `svff recover` |
//!
//! Their error kinds add `state` (state directory unusable), `vmm` (a VMM
//! failed or did not answer; the message names the VM and device),
//! `recovery_needed` (the journal holds an unfinished operation),
//! `not_supported` (starting `svff-vmm` VMs), and `busy` for a second
//! operation while one runs. The daemon finishes an interrupted operation at
//! start-up, before serving.
//!
//! # Status: the assignment table
//!
//! With VMs configured, `svff status --json` adds `assignments` (absent when
//! empty): the table's entries of the PFs shown, each as in
//! `assignments.json` plus `vmm_state` (the VMM's `query-svff-vfio` state:
//! `attached`, `paused`, `pausing`, `unpausing`, `detached`; `null` when it
//! cannot say) and `vmm_note` (why `vmm_state` is `null`, e.g. "VMM does not
//! speak the svff QMP commands"); each VF's `holder` is its device id:
//!
//! ```json
//! "assignments": [ { "pf": "0000:01:00.0", "vf": 0, "host": "0000:01:10.0", "vm": "vm1",
//!   "id": "svff-0000-01-00.0-vf0", "bus": "svffrp0", "guest": "0000:01:00.0",
//!   "state": "attached", "vmm_state": "paused", "vmm_note": null } ]
//! ```
//!
//! # `svff bench`
//!
#![doc = include_str!("bench/README.md")]

mod bench;
mod bitstream;
mod client;
mod config;
mod daemon;
mod error;
#[cfg(test)]
mod fake;
mod fpga;
mod nvme;
mod orch;
mod pci;
mod protocol;
mod qdma;
mod sriov;
mod status;
mod sysfs;

pub use bench::{
    draw_plot, finish as bench_finish, parse_modes, parse_vf_counts, parse_vmms, plan, render_all,
    run as bench_run, BenchMode, BenchOptions, BenchReport, GuestLoad, GuestRunView, L2RunView,
    PaperPoint, Planned, Run as BenchRun, Series as BenchSeries, Summary as BenchSummary,
    TableIRow, VmmKind, BENCH_FORMAT_VERSION, PAPER_TABLE_I,
};
pub use bitstream::BitstreamConfig;
pub use client::request;
pub use config::{
    Config, PfConfig, PfProfile, RunAs, VfSelect, VmConfig, VmKind, DEFAULT_CONFIG_PATH,
    DEFAULT_SOCKET_PATH, DEFAULT_STATE_DIR,
};
pub use daemon::{bind_socket, listener_from_systemd, Daemon};
pub use error::Error;
pub use fpga::{BarReader, SvffIdentity, SVFF_REGS_BAR};
pub use nvme::{
    apply_plan as nvme_apply_plan, changed_vfs as nvme_changed_vfs, check_plan as nvme_check_plan,
    primary_caps as nvme_primary_caps, read_status as nvme_read_status,
    secondary_controllers as nvme_secondary_controllers, AdminCommand, AdminError, DevNvmeOpener,
    NvmeAdmin, NvmeDevice, NvmeOpener, NvmeProfile, NvmeResources, NvmeStatus, PassthruCmd,
    PlannedVf, PrimaryCaps, ResourceType, SecondaryController, SecondaryStatus, VfResources,
    VirtAction, NVME_PF_DRIVER,
};
pub use orch::journal::{Mode, CRASH_AFTER_ENV, JOURNAL_VERSION};
pub use orch::state::{AssignState, Assignment, AssignmentTable, StateDir, TABLE_FORMAT_VERSION};
pub use orch::supervise::{Process as VmmProcess, StartVf};
pub use orch::vmm::{Connector, PersistentConnector, QmpConnector, QmpVmm, Vmm};
pub use orch::{
    device_id, AssignRequest, OpReport, Orchestrator, TimedStep, RESULT_FORMAT_VERSION,
};
pub use pci::{DriverName, PciAddress};
pub use protocol::{ErrorBody, Request, Response, PROTOCOL_VERSION};
pub use qdma::QdmaProfile;
pub use sriov::{SriovManager, VfsSetOptions, BIND_THREADS};
pub use status::{
    fill_holders, AssignmentStatus, FpgaStatus, HeldBy, PfStatus, Status, Step, VfStatus,
    VfsSetReport, VmStatus, STATUS_FORMAT_VERSION,
};
pub use sysfs::{RealSysfs, Sysfs};
