//! The hardware boundary: everything vfio-pause asks of VFIO goes through
//! [`VfioBackend`], implemented over vfio-ioctls ([`crate::VfioIoctlsBackend`])
//! and by a recording, failure-injecting double (`FakeBackend`, feature `sim`).

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

/// Handle of one open device fd (a VF) inside a backend. Never reused by a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VfId(pub u64);

/// Handle of one VFIO group joined into the backend's container. Never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u64);

/// What [`VfioBackend::join_group`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The group, now in the container.
    pub group: GroupId,
    /// The container had no group (and so no IOMMU and no DMA mapping)
    /// before this one: the kernel's own answer (`VFIO_SET_IOMMU` succeeded),
    /// so it also covers groups the kernel took out by itself when their
    /// function was removed.
    pub first: bool,
}

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
    /// mmap-able (in whole, or the areas of [`VfioBackend::mmap_areas`]).
    pub mmap: bool,
    /// The kernel says the MSI-X table in this BAR may be mmapped
    /// (`VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`). Guest accesses to the table
    /// must still trap to the VMM, so it is never handed out for guest mapping.
    pub msix_mappable: bool,
}

/// An mmap of a region of an open VF. While it exists the VF's device file
/// stays referenced by the kernel, so it must be unmapped before a pause is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapArea {
    /// Region index.
    pub index: u32,
    /// Offset of the mapped area within the region (the BAR).
    pub offset: u64,
    /// Host virtual address of the mapping.
    pub host_addr: usize,
    /// Length in bytes.
    pub len: usize,
}

/// The VFIO operations vfio-pause needs, over one VFIO container (one VM).
///
/// A VF is opened in two steps, because they cost very differently and need
/// different locking: [`VfioBackend::join_group`] (open the group, put it in
/// the container: fast, and the moment type1's DMA mappings appear or, at
/// [`VfioBackend::leave_group`] of the last group, vanish) and
/// [`VfioBackend::open_device`] (the device fd: vfio-pci resets the function,
/// about 100 ms). The [`crate::Container`] serialises joins and leaves with
/// its DMA bookkeeping and runs device opens and closes of many VFs in
/// parallel.
///
/// Every method takes `&self` and may run concurrently with the others (on
/// different VFs).
pub trait VfioBackend: Send + Sync + fmt::Debug {
    /// Open a VF's group (own open of `/dev/vfio/<group>` found through the
    /// VF's sysfs `iommu_group` link, or the passed fd), check it is viable,
    /// put it in the container (setting up the IOMMU when it is the first
    /// group) and register it with the hypervisor's VFIO device, if any.
    /// On error nothing of the group stays open.
    fn join_group(&self, source: VfSource) -> Result<Joined>;

    /// Take a group out of the container (and the hypervisor's VFIO device)
    /// and close it. Contract: even when this returns `Err`, the group fd is
    /// closed (which takes it out of the container too).
    fn leave_group(&self, group: GroupId) -> Result<()>;

    /// Open the device fd of the function the group was joined for.
    fn open_device(&self, group: GroupId) -> Result<VfId>;

    /// Close a device fd (vfio-pci resets the function). Contract: even when
    /// this returns `Err`, the fd is closed.
    fn close_device(&self, vf: VfId) -> Result<()>;

    /// Map `size` bytes at host address `host_addr` for device DMA at `iova`.
    /// Needs a group in the container. Any overlap with an existing mapping
    /// is an error (type1's `EEXIST`, whatever the host address).
    ///
    /// # Safety
    /// `[host_addr, host_addr + size)` must stay mapped, and must be accessed only
    /// through raw pointers / volatile accesses / syscalls, until it is unmapped
    /// with [`VfioBackend::dma_unmap`] or the container loses its last group
    /// (the rules of vfio-ioctls' `VfioContainer::vfio_dma_map`).
    unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: *mut u8) -> Result<()>;

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

    /// The areas of region `index` the kernel lets user space mmap, as
    /// (offset, length): the sparse-mmap capability's areas, the whole region
    /// when it is mmap-able without one, none when it is not mmap-able.
    fn mmap_areas(&self, vf: VfId, index: u32) -> Result<Vec<(u64, u64)>>;

    /// mmap `len` bytes of region `index` at `offset` (within an area of
    /// [`VfioBackend::mmap_areas`]).
    fn mmap_region(&self, vf: VfId, index: u32, offset: u64, len: u64) -> Result<MmapArea>;

    /// Undo [`VfioBackend::mmap_region`].
    fn munmap_region(&self, vf: VfId, area: MmapArea) -> Result<()>;

    /// Wire interrupt `index` to these eventfds (vector n -> `fds[n]`);
    /// an empty slice disables the whole index.
    fn set_irqs(&self, vf: VfId, index: u32, fds: &[&EventFd]) -> Result<()>;

    /// Fire vector `vector` of interrupt `index` from the host side
    /// (`VFIO_DEVICE_SET_IRQS`, `DATA_BOOL | ACTION_TRIGGER`): the kernel
    /// signals the eventfd wired to it, as if the device had raised it. For
    /// self-tests of the interrupt wiring.
    fn trigger_irq(&self, vf: VfId, index: u32, vector: u32) -> Result<()>;

    /// Host address of an open VF.
    fn address(&self, vf: VfId) -> Result<PciAddress>;
}
