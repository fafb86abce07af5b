//! The hardware boundary: everything vfio-pause asks of VFIO goes through
//! [`VfioBackend`], implemented over vfio-ioctls ([`crate::VfioIoctlsBackend`])
//! and by a recording, failure-injecting double ([`crate::FakeBackend`]).

use std::fmt;
use std::os::fd::OwnedFd;

use vmm_sys_util::eventfd::EventFd;

use crate::error::Result;
use crate::pci::PciAddress;

/// Where the VF to open comes from.
#[derive(Debug)]
pub enum VfSource {
    /// Open `/dev/vfio/<group>` of the function at this address (found through
    /// its sysfs `iommu_group` link).
    Sysfs(PciAddress),
    /// Use an already-open VFIO group fd (handed over by a privileged helper,
    /// e.g. over SCM_RIGHTS) and take the device with this address out of it.
    /// The backend owns the fd from now on and closes it when the VF is closed.
    GroupFd {
        /// The open `/dev/vfio/<group>` file.
        group: OwnedFd,
        /// The device inside the group.
        address: PciAddress,
    },
}

impl VfSource {
    /// The host address this source names.
    pub fn address(&self) -> &PciAddress {
        match self {
            VfSource::Sysfs(a) => a,
            VfSource::GroupFd { address, .. } => address,
        }
    }

    /// Whether this source carries a passed group fd.
    pub fn is_group_fd(&self) -> bool {
        matches!(self, VfSource::GroupFd { .. })
    }
}

/// Handle of one open VF inside a backend. Never reused by a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VfId(pub u64);

/// VFIO PCI region indices (`VFIO_PCI_*_REGION_INDEX`).
pub mod region {
    /// BAR 0; BAR n is `BAR0 + n`.
    pub const BAR0: u32 = 0;
    /// Expansion ROM.
    pub const ROM: u32 = 6;
    /// Config space.
    pub const CONFIG: u32 = 7;
}

/// VFIO PCI interrupt indices (`VFIO_PCI_*_IRQ_INDEX`).
pub mod irq {
    /// Legacy INTx.
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
    /// Device request (the kernel asks the user to release the device).
    pub const REQ: u32 = 4;
}

/// What the kernel says about one region of an open VF.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// mmap-able.
    pub mmap: bool,
}

/// An mmap of a region of an open VF. While it exists the VF's device file
/// stays referenced by the kernel, so it must be unmapped before a pause is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapArea {
    /// Region index.
    pub index: u32,
    /// Host virtual address of the mapping.
    pub host_addr: usize,
    /// Length in bytes.
    pub len: usize,
}

/// The VFIO operations vfio-pause needs, over one VFIO container (one VM).
///
/// Opening fuses "open group, put it in the container, get the device fd",
/// and closing fuses "close the device fd, take the group out of the
/// container, close the group", because that is how vfio-ioctls'
/// `VfioDevice::new` and its `Drop` work in container/group mode.
///
/// Every method takes `&self` and may run concurrently with the others (on
/// different VFs), so the FLRs of opens and closes of many VFs overlap.
pub trait VfioBackend: Send + Sync + fmt::Debug {
    /// Open a VF: group (own open or passed fd) into the container, device fd.
    fn open(&self, source: VfSource) -> Result<VfId>;

    /// Close a VF: device fd, group out of the container, group fd.
    /// Contract: even when this returns `Err`, every fd of the VF is released.
    fn close(&self, vf: VfId) -> Result<()>;

    /// Map `size` bytes at host address `host_addr` for device DMA at `iova`.
    /// Needs at least one open VF (type1 has no IOMMU before the first group).
    /// Returns `Ok(false)` when exactly this range is already mapped (type1's
    /// `EEXIST`): that is how a reopen finds out whether the container kept
    /// its mappings, without a lock across group joins and leaves.
    ///
    /// # Safety
    /// `[host_addr, host_addr + size)` must stay mapped, and must be accessed only
    /// through raw pointers / volatile accesses / syscalls, until it is unmapped
    /// with [`VfioBackend::dma_unmap`] or the container loses its last group
    /// (the rules of vfio-ioctls' `VfioOps::vfio_dma_map`).
    unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: *mut u8) -> Result<bool>;

    /// Remove a DMA mapping made with [`VfioBackend::dma_map`].
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()>;

    /// Info about region `index` of a VF.
    fn region_info(&self, vf: VfId, index: u32) -> Result<RegionInfo>;

    /// Number of vectors of interrupt `index` (0: not supported).
    fn irq_count(&self, vf: VfId, index: u32) -> Result<u32>;

    /// Read from a region (config space, BARs) at `offset`.
    fn region_read(&self, vf: VfId, index: u32, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Write to a region at `offset`.
    fn region_write(&self, vf: VfId, index: u32, offset: u64, data: &[u8]) -> Result<()>;

    /// mmap a whole region.
    fn mmap_region(&self, vf: VfId, index: u32) -> Result<MmapArea>;

    /// Undo [`VfioBackend::mmap_region`].
    fn munmap_region(&self, vf: VfId, area: MmapArea) -> Result<()>;

    /// Wire interrupt `index` to these eventfds (vector n -> `fds[n]`);
    /// an empty slice disables the whole index.
    fn set_irqs(&self, vf: VfId, index: u32, fds: &[&EventFd]) -> Result<()>;

    /// Host address of an open VF.
    fn address(&self, vf: VfId) -> Result<PciAddress>;
}
