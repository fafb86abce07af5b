//! [`VfioBackend`] over rust-vmm's vfio-ioctls (legacy container/group mode).
//!
//! vfio-ioctls does the container (open, API/extension checks) and DMA
//! map/unmap. Groups and device fds are ours, with raw ioctls, for VFs opened
//! by sysfs path and from passed group fds alike: vfio-ioctls' `VfioDevice`
//! cannot take a passed group fd, and its `Drop` unwraps a read of the VF's
//! `iommu_group` link after closing the device fd, which panics when the VF
//! is removed at that moment (the request-IRQ flow: the blocked remover goes
//! on as soon as the device fd closes) and then leaks the group in the
//! container. Owning the group lifetime here, closing a group never depends
//! on the VF still existing.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_group_status, vfio_irq_info, vfio_region_info, VFIO_TYPE1v2_IOMMU,
    VFIO_BASE, VFIO_DEVICE_FLAGS_PCI, VFIO_GROUP_FLAGS_VIABLE, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE,
};
use vfio_ioctls::VfioContainer;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val};

use crate::backend::{GroupId, Joined, MmapArea, RegionInfo, VfId, VfSource, VfioBackend};
use crate::error::{Error, Result};
use crate::pci::PciAddress;

// The crate keeps its ioctl numbers private, so the few raw calls below
// declare their own (same values as <linux/vfio.h>).
vmm_sys_util::ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE.into(), VFIO_BASE + 2);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE.into(), VFIO_BASE + 3);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE.into(), VFIO_BASE + 4);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_UNSET_CONTAINER, VFIO_TYPE.into(), VFIO_BASE + 5);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE.into(), VFIO_BASE + 6);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE.into(), VFIO_BASE + 7);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE.into(), VFIO_BASE + 8);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, VFIO_TYPE.into(), VFIO_BASE + 9);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE.into(), VFIO_BASE + 10);

/// Number of PCI regions (BAR0-5, ROM, config, VGA) and irq indices we query.
const NUM_REGIONS: u32 = 9;
const NUM_IRQS: u32 = 5;

struct RealGroup {
    address: PciAddress,
    file: File,
}

struct RealVf {
    address: PciAddress,
    device: File,
    regions: Vec<RegionInfo>,
    /// Per region, the mmap-able areas (offset, length).
    areas: Vec<Vec<(u64, u64)>>,
    irqs: Vec<u32>,
}

impl RealVf {
    fn fd(&self) -> RawFd {
        self.device.as_raw_fd()
    }
}

/// The real backend: one vfio-ioctls `VfioContainer` (one VM) and the VFs
/// opened into it, by sysfs path (through vfio-ioctls) or from passed group
/// fds (raw ioctls), in any mix and order.
pub struct VfioIoctlsBackend {
    container: Arc<VfioContainer>,
    /// The VM's KVM VFIO device (`KVM_DEV_TYPE_VFIO`), if the VMM gave one:
    /// every group in the container is registered with it (the kernel then
    /// knows the VM does non-coherent DMA and lets the group's devices use
    /// the VM's KVM features).
    kvm_vfio: Option<kvm_ioctls::DeviceFd>,
    table: Mutex<Table>,
}

/// Joined groups and open VFs; the lock is held only to look up, insert and
/// remove entries, never across an ioctl that resets the function.
#[derive(Default)]
struct Table {
    groups: HashMap<GroupId, Arc<RealGroup>>,
    vfs: HashMap<VfId, Arc<RealVf>>,
    next: u64,
}

impl std::fmt::Debug for VfioIoctlsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioIoctlsBackend")
            .field("container_fd", &self.container.as_raw_fd())
            .field("open_vfs", &self.lock().vfs.len())
            .finish()
    }
}

impl VfioIoctlsBackend {
    /// Open a new container (`/dev/vfio/vfio`).
    pub fn new() -> Result<Self> {
        let container = VfioContainer::new(None).map_err(|e| Error::Container {
            op: "open /dev/vfio/vfio".into(),
            source: Box::new(e),
        })?;
        Ok(Self::with_container(Arc::new(container)))
    }

    /// Use a container the VMM already has.
    pub fn with_container(container: Arc<VfioContainer>) -> Self {
        VfioIoctlsBackend {
            container,
            kvm_vfio: None,
            table: Mutex::new(Table::default()),
        }
    }

    /// Open a new container whose groups (opened here by sysfs path or passed
    /// as fds alike) are registered with the VM's KVM VFIO device
    /// (`KVM_DEV_VFIO_FILE_ADD` at join, `_DEL` at leave).
    pub fn with_kvm_vfio_device(kvm_vfio: kvm_ioctls::DeviceFd) -> Result<Self> {
        let mut b = Self::new()?;
        b.kvm_vfio = Some(kvm_vfio);
        Ok(b)
    }

    /// Register (`add`) or unregister a group file with the KVM VFIO device.
    fn kvm_file(&self, group: &File, add: bool, address: &PciAddress) -> Result<()> {
        let Some(dev) = &self.kvm_vfio else {
            return Ok(());
        };
        let fd: RawFd = group.as_raw_fd();
        let attr = kvm_bindings::kvm_device_attr {
            flags: 0,
            group: kvm_bindings::KVM_DEV_VFIO_FILE,
            attr: u64::from(if add {
                kvm_bindings::KVM_DEV_VFIO_FILE_ADD
            } else {
                kvm_bindings::KVM_DEV_VFIO_FILE_DEL
            }),
            addr: &fd as *const RawFd as u64,
        };
        dev.set_device_attr(&attr).map_err(|e| {
            Error::io(
                address,
                if add {
                    "KVM_DEV_VFIO_FILE_ADD"
                } else {
                    "KVM_DEV_VFIO_FILE_DEL"
                },
                io::Error::from_raw_os_error(e.errno()),
            )
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vf(&self, vf: VfId) -> Result<Arc<RealVf>> {
        self.lock()
            .vfs
            .get(&vf)
            .cloned()
            .ok_or_else(|| Error::OutOfRange {
                address: PciAddress::zero(),
                what: format!("no open VF with handle {}", vf.0),
            })
    }

    /// Open `/dev/vfio/<group>` of the VF at `address`, found through its
    /// sysfs `iommu_group` link.
    fn open_group_by_path(&self, address: &PciAddress) -> Result<File> {
        let group_link = address.sysfs_path().join("iommu_group");
        let link = std::fs::read_link(&group_link).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::VfGone {
                    address: *address,
                    path: group_link.display().to_string(),
                }
            } else {
                Error::io(address, format!("read {}", group_link.display()), e)
            }
        })?;
        let id = link
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| Error::OutOfRange {
                address: *address,
                what: format!("iommu_group link {} is not a group", link.display()),
            })?;
        let dev_path = format!("/dev/vfio/{id}");
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&dev_path)
            .map_err(|e| Error::io(address, format!("open {dev_path}"), e))
    }

    /// Put an open group file into the container; returns whether it is the
    /// first group (the IOMMU was set up by this join).
    fn join_file(&self, group: &File, address: &PciAddress) -> Result<bool> {
        let mut status = vfio_group_status {
            argsz: std::mem::size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: `group` is an open file and `status` is a correctly sized
        // vfio_group_status that the kernel fills in.
        let ret = unsafe { ioctl_with_mut_ref(group, VFIO_GROUP_GET_STATUS(), &mut status) };
        if ret < 0 {
            return Err(Error::last_os(address, "VFIO_GROUP_GET_STATUS"));
        }
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(Error::io(
                address,
                "group is not viable (a device of the group is bound to a host driver)",
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let container_fd: RawFd = self.container.as_raw_fd();
        // SAFETY: the argument is a pointer to an int holding the open container fd,
        // as VFIO_GROUP_SET_CONTAINER expects.
        let ret = unsafe { ioctl_with_ref(group, VFIO_GROUP_SET_CONTAINER(), &container_fd) };
        if ret < 0 {
            return Err(Error::last_os(address, "VFIO_GROUP_SET_CONTAINER"));
        }
        // The first group in a container must set up the IOMMU. With our group
        // in, the kernel answers EINVAL exactly when an IOMMU is already set
        // (another group is in), so this also tells the caller whether the
        // container had any DMA mapping.
        // SAFETY: the container fd is open; SET_IOMMU takes the IOMMU type by value.
        let ret = unsafe {
            ioctl_with_val(
                &*self.container,
                VFIO_SET_IOMMU(),
                VFIO_TYPE1v2_IOMMU.into(),
            )
        };
        if ret == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(false);
        }
        unset_container(group, address);
        Err(Error::io(address, "VFIO_SET_IOMMU(type1v2)", e))
    }
}

/// Take a group out of its container. EINVAL (or ENODEV) means it is in
/// none: the kernel took it out itself when its last device was removed.
fn unset_container(group: &File, address: &PciAddress) -> Option<Error> {
    // SAFETY: `group` is an open group fd; UNSET_CONTAINER takes no argument.
    let ret = unsafe { ioctl_with_val(group, VFIO_GROUP_UNSET_CONTAINER(), 0) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENODEV)) {
            tracing::debug!("VF {address}: group already out of the container (VF removed)");
            return None;
        }
        return Some(Error::io(address, "VFIO_GROUP_UNSET_CONTAINER", e));
    }
    None
}

/// Query region and irq info. Raw ioctls because vfio-ioctls' accessors
/// return 0 for a region it failed to query (and do not exist for the raw
/// path), and we need the errno.
/// Region info, irq counts and, per region, the mmap-able areas.
type Info = (Vec<RegionInfo>, Vec<u32>, Vec<Vec<(u64, u64)>>);

/// `VFIO_REGION_INFO_FLAG_CAPS`, `VFIO_REGION_INFO_CAP_SPARSE_MMAP`,
/// `VFIO_REGION_INFO_CAP_MSIX_MAPPABLE` (<linux/vfio.h>).
const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
const CAP_SPARSE_MMAP: u16 = 1;
const CAP_MSIX_MAPPABLE: u16 = 3;
/// Bound on the capability chain we walk and on the info size we accept.
const MAX_REGION_INFO: u32 = 64 * 1024;

/// Sparse-mmap areas (if that capability is present) and MSI-X mappable.
type RegionCaps = (Option<Vec<(u64, u64)>>, bool);

/// Read region `index`'s capability chain: the sparse-mmap areas (if that
/// capability is present) and whether the MSI-X table may be mmapped.
fn region_caps(dev: &Fd, index: u32, argsz: u32, address: &PciAddress) -> Result<RegionCaps> {
    if argsz > MAX_REGION_INFO {
        return Err(Error::OutOfRange {
            address: *address,
            what: format!("region {index} info of {argsz} bytes"),
        });
    }
    let words = (argsz as usize).div_ceil(8);
    let mut buf = vec![0u64; words];
    let base = std::mem::size_of::<vfio_region_info>();
    {
        // SAFETY: `buf` is at least `base` bytes, 8-byte aligned, and
        // vfio_region_info is plain old data.
        let head = unsafe { &mut *(buf.as_mut_ptr() as *mut vfio_region_info) };
        head.argsz = argsz;
        head.index = index;
    }
    // SAFETY: `buf` holds `argsz` writable bytes starting with a
    // vfio_region_info whose argsz says so; the kernel writes at most that.
    let ret = unsafe { ioctl_with_ptr(dev, VFIO_DEVICE_GET_REGION_INFO(), buf.as_mut_ptr()) };
    if ret < 0 {
        return Err(Error::last_os(
            address,
            format!("VFIO_DEVICE_GET_REGION_INFO({index}) with capabilities"),
        ));
    }
    // SAFETY: as above; the buffer is initialised (zeroed, then filled by the kernel).
    let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, words * 8) };
    let r16 = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let r32 = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let r64 = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let flags = r32(4).unwrap_or(0);
    let mut sparse = None;
    let mut msix_mappable = false;
    if flags & REGION_INFO_FLAG_CAPS == 0 {
        return Ok((sparse, msix_mappable));
    }
    let mut off = r32(12).unwrap_or(0) as usize;
    let mut hops = 0;
    while off >= base && hops < 32 {
        hops += 1;
        let (Some(id), Some(next)) = (r16(off), r32(off + 4)) else {
            break;
        };
        match id {
            CAP_SPARSE_MMAP => {
                let n = r32(off + 8).unwrap_or(0).min(256) as usize;
                let mut areas = Vec::with_capacity(n);
                for i in 0..n {
                    let a = off + 16 + 16 * i;
                    if let (Some(o), Some(l)) = (r64(a), r64(a + 8)) {
                        areas.push((o, l));
                    }
                }
                sparse = Some(areas);
            }
            CAP_MSIX_MAPPABLE => msix_mappable = true,
            _ => {}
        }
        off = next as usize;
    }
    Ok((sparse, msix_mappable))
}

fn query_info(fd: RawFd, address: &PciAddress) -> Result<Info> {
    let dev = Fd(fd);
    let mut regions = Vec::with_capacity(NUM_REGIONS as usize);
    let mut areas = Vec::with_capacity(NUM_REGIONS as usize);
    for index in 0..NUM_REGIONS {
        let mut ri = vfio_region_info {
            argsz: std::mem::size_of::<vfio_region_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: `dev` is an open device fd and `ri` a correctly sized vfio_region_info.
        let ret = unsafe { ioctl_with_mut_ref(&dev, VFIO_DEVICE_GET_REGION_INFO(), &mut ri) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            // The VGA region (index 8) does not exist on non-VGA functions: EINVAL.
            if e.raw_os_error() == Some(libc::EINVAL) && index == 8 {
                regions.push(RegionInfo::default());
                areas.push(Vec::new());
                continue;
            }
            return Err(Error::io(
                address,
                format!("VFIO_DEVICE_GET_REGION_INFO({index})"),
                e,
            ));
        }
        let mmap = ri.flags & VFIO_REGION_INFO_FLAG_MMAP != 0;
        let base = std::mem::size_of::<vfio_region_info>() as u32;
        let (sparse, msix_mappable) = if ri.argsz > base {
            region_caps(&dev, index, ri.argsz, address)?
        } else {
            (None, false)
        };
        areas.push(match (mmap, sparse) {
            (false, _) => Vec::new(),
            (true, Some(a)) => a,
            (true, None) => vec![(0, ri.size)],
        });
        regions.push(RegionInfo {
            size: ri.size,
            offset: ri.offset,
            read: ri.flags & VFIO_REGION_INFO_FLAG_READ != 0,
            write: ri.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap,
            msix_mappable,
        });
    }
    let mut irqs = Vec::with_capacity(NUM_IRQS as usize);
    for index in 0..NUM_IRQS {
        let mut ii = vfio_irq_info {
            argsz: std::mem::size_of::<vfio_irq_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: `dev` is an open device fd and `ii` a correctly sized vfio_irq_info.
        let ret = unsafe { ioctl_with_mut_ref(&dev, VFIO_DEVICE_GET_IRQ_INFO(), &mut ii) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            // Older kernels or functions without the index answer EINVAL: no vectors.
            if e.raw_os_error() == Some(libc::EINVAL) {
                irqs.push(0);
                continue;
            }
            return Err(Error::io(
                address,
                format!("VFIO_DEVICE_GET_IRQ_INFO({index})"),
                e,
            ));
        }
        irqs.push(ii.count);
    }
    Ok((regions, irqs, areas))
}

/// A borrowed raw fd usable with vmm-sys-util's ioctl helpers.
struct Fd(RawFd);
impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl VfioBackend for VfioIoctlsBackend {
    fn join_group(&self, source: VfSource) -> Result<Joined> {
        let (file, address) = match source {
            VfSource::Sysfs(a) => (self.open_group_by_path(&a)?, a),
            VfSource::GroupFd { group, address } => (File::from(group), address),
        };
        let first = self.join_file(&file, &address)?;
        // Passed and own-opened groups alike.
        if let Err(e) = self.kvm_file(&file, true, &address) {
            unset_container(&file, &address);
            return Err(e);
        }
        let mut t = self.lock();
        t.next += 1;
        let id = GroupId(t.next);
        t.groups.insert(id, Arc::new(RealGroup { address, file }));
        Ok(Joined { group: id, first })
    }

    fn leave_group(&self, group: GroupId) -> Result<()> {
        let g = self
            .lock()
            .groups
            .remove(&group)
            .ok_or_else(|| Error::OutOfRange {
                address: PciAddress::zero(),
                what: format!("no joined group with handle {}", group.0),
            })?;
        // Only open_device borrows a group, briefly; it cannot be running for
        // a group being left (the caller closed its device first).
        let g = unwrap_arc(g);
        let unregistered = self.kvm_file(&g.file, false, &g.address).err();
        let res = unset_container(&g.file, &g.address).or(unregistered);
        // Closing the group fd also takes it out of the container.
        drop(g);
        res.map_or(Ok(()), Err)
    }

    fn open_device(&self, group: GroupId) -> Result<VfId> {
        let g = self
            .lock()
            .groups
            .get(&group)
            .cloned()
            .ok_or_else(|| Error::OutOfRange {
                address: PciAddress::zero(),
                what: format!("no joined group with handle {}", group.0),
            })?;
        let address = g.address;
        let name = CString::new(address.to_string()).expect("a PCI address has no NUL byte");
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let fd = unsafe { ioctl_with_ptr(&g.file, VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) };
        drop(g);
        if fd < 0 {
            return Err(Error::last_os(&address, "VFIO_GROUP_GET_DEVICE_FD"));
        }
        // SAFETY: the kernel just returned this new fd and nothing else owns it.
        let device = unsafe { File::from_raw_fd(fd) };
        let mut info = vfio_device_info {
            argsz: std::mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: `device` is an open device fd and `info` a correctly sized vfio_device_info.
        let ret = unsafe { ioctl_with_mut_ref(&device, VFIO_DEVICE_GET_INFO(), &mut info) };
        if ret < 0 {
            return Err(Error::last_os(&address, "VFIO_DEVICE_GET_INFO"));
        }
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(Error::io(
                &address,
                "device is not a VFIO PCI device",
                io::Error::from_raw_os_error(libc::ENODEV),
            ));
        }
        let (regions, irqs, areas) = query_info(device.as_raw_fd(), &address)?;
        let mut t = self.lock();
        t.next += 1;
        let id = VfId(t.next);
        t.vfs.insert(
            id,
            Arc::new(RealVf {
                address,
                device,
                regions,
                areas,
                irqs,
            }),
        );
        Ok(id)
    }

    fn close_device(&self, vf: VfId) -> Result<()> {
        let v = self
            .lock()
            .vfs
            .remove(&vf)
            .ok_or_else(|| Error::OutOfRange {
                address: PciAddress::zero(),
                what: format!("no open VF with handle {}", vf.0),
            })?;
        // Another thread may still be inside an access to this VF (the device
        // lets accesses finish before it closes): let it end.
        drop(unwrap_arc(v));
        Ok(())
    }

    unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: *mut u8) -> Result<()> {
        let len = usize::try_from(size).map_err(|e| Error::Container {
            op: format!("dma map of {size:#x} bytes"),
            source: Box::new(e),
        })?;
        // SAFETY: forwarded from this function's own contract, which is the crate's.
        // EEXIST is an error like any other: type1 answers it for any overlap,
        // whatever host memory is behind the existing mapping.
        unsafe { self.container.vfio_dma_map(iova, len, host_addr) }.map_err(|e| Error::Container {
            op: format!("dma map iova {iova:#x} size {size:#x}"),
            source: Box::new(e),
        })
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        let len = usize::try_from(size).map_err(|e| Error::Container {
            op: format!("dma unmap of {size:#x} bytes"),
            source: Box::new(e),
        })?;
        self.container
            .vfio_dma_unmap(iova, len)
            .map_err(|e| Error::Container {
                op: format!("dma unmap iova {iova:#x} size {size:#x}"),
                source: Box::new(e),
            })
    }

    fn region_info(&self, vf: VfId, index: u32) -> Result<RegionInfo> {
        let v = self.vf(vf)?;
        v.regions
            .get(index as usize)
            .copied()
            .ok_or_else(|| Error::OutOfRange {
                address: v.address,
                what: format!("no region {index}"),
            })
    }

    fn irq_count(&self, vf: VfId, index: u32) -> Result<u32> {
        let v = self.vf(vf)?;
        Ok(v.irqs.get(index as usize).copied().unwrap_or(0))
    }

    // pread/pwrite on the device fd rather than VfioDevice::region_read/write:
    // those return () and only log failures.
    fn region_read(&self, vf: VfId, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let v = self.vf(vf)?;
        let r = check_range(&v, index, offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes and the fd is open.
            let n = unsafe {
                libc::pread(
                    v.fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    (r.offset + offset + done as u64) as libc::off_t,
                )
            };
            if n <= 0 {
                let e = if n == 0 {
                    io::Error::from(io::ErrorKind::UnexpectedEof)
                } else {
                    io::Error::last_os_error()
                };
                return Err(Error::io(
                    &v.address,
                    format!("read region {index} at {offset:#x}+{}", buf.len()),
                    e,
                ));
            }
            done += n as usize;
        }
        Ok(())
    }

    fn region_write(&self, vf: VfId, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let v = self.vf(vf)?;
        let r = check_range(&v, index, offset, data.len())?;
        let mut done = 0usize;
        while done < data.len() {
            let rest = &data[done..];
            // SAFETY: `rest` is a valid readable buffer of `rest.len()` bytes and the fd is open.
            let n = unsafe {
                libc::pwrite(
                    v.fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    (r.offset + offset + done as u64) as libc::off_t,
                )
            };
            if n <= 0 {
                let e = if n == 0 {
                    io::Error::from(io::ErrorKind::WriteZero)
                } else {
                    io::Error::last_os_error()
                };
                return Err(Error::io(
                    &v.address,
                    format!("write region {index} at {offset:#x}+{}", data.len()),
                    e,
                ));
            }
            done += n as usize;
        }
        Ok(())
    }

    fn mmap_areas(&self, vf: VfId, index: u32) -> Result<Vec<(u64, u64)>> {
        let v = self.vf(vf)?;
        Ok(v.areas.get(index as usize).cloned().unwrap_or_default())
    }

    // vfio-ioctls has no mmap call.
    fn mmap_region(&self, vf: VfId, index: u32, offset: u64, len: u64) -> Result<MmapArea> {
        let v = self.vf(vf)?;
        let r = v.regions.get(index as usize).copied().unwrap_or_default();
        let inside = v.areas.get(index as usize).is_some_and(|a| {
            a.iter()
                .any(|&(o, l)| offset >= o && offset.checked_add(len).is_some_and(|e| e <= o + l))
        });
        if len == 0 || !inside {
            return Err(Error::OutOfRange {
                address: v.address,
                what: format!("region {index} {offset:#x}+{len:#x} is not in an mmap-able area"),
            });
        }
        let len = usize::try_from(len).map_err(|_| Error::OutOfRange {
            address: v.address,
            what: format!("mmap of {len:#x} bytes"),
        })?;
        // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL) of the
        // device fd inside an mmap-able area of the region; it overlaps no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                v.fd(),
                (r.offset + offset) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os(&v.address, format!("mmap region {index}")));
        }
        Ok(MmapArea {
            index,
            offset,
            host_addr: p as usize,
            len,
        })
    }

    fn munmap_region(&self, vf: VfId, area: MmapArea) -> Result<()> {
        let address = self.vf(vf)?.address;
        // SAFETY: `area` was returned by mmap_region and is unmapped exactly once
        // (the device forgets it after this call).
        let ret = unsafe { libc::munmap(area.host_addr as *mut libc::c_void, area.len) };
        if ret < 0 {
            return Err(Error::last_os(
                &address,
                format!("munmap region {}", area.index),
            ));
        }
        Ok(())
    }

    // Raw VFIO_DEVICE_SET_IRQS: vfio-ioctls' enable_irq/disable_irq map every
    // failure to a unit error and lose the errno; the raw path needs it anyway.
    fn set_irqs(&self, vf: VfId, index: u32, fds: &[&EventFd]) -> Result<()> {
        let v = self.vf(vf)?;
        // struct vfio_irq_set { argsz, flags, index, start, count, data[] } is
        // all u32, so it is laid out as a u32 array followed by the fds.
        let mut buf: Vec<u32> = Vec::with_capacity(5 + fds.len());
        let flags = if fds.is_empty() {
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER
        } else {
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER
        };
        buf.extend_from_slice(&[
            ((5 + fds.len()) * 4) as u32,
            flags,
            index,
            0,
            fds.len() as u32,
        ]);
        buf.extend(fds.iter().map(|f| f.as_raw_fd() as u32));
        let dev = Fd(v.fd());
        // SAFETY: `buf` is a complete vfio_irq_set with `count` fds, argsz covers
        // it, and it outlives the call.
        let ret = unsafe { ioctl_with_ptr(&dev, VFIO_DEVICE_SET_IRQS(), buf.as_ptr()) };
        if ret < 0 {
            let what = if fds.is_empty() { "disable" } else { "enable" };
            return Err(Error::last_os(
                &v.address,
                format!(
                    "VFIO_DEVICE_SET_IRQS {what} index {index} ({} fds)",
                    fds.len()
                ),
            ));
        }
        Ok(())
    }

    fn trigger_irq(&self, vf: VfId, index: u32, vector: u32) -> Result<()> {
        let v = self.vf(vf)?;
        // struct vfio_irq_set with one bool (u8) of data, padded to u32s.
        let buf: [u32; 6] = [
            (5 * 4 + 1) as u32,
            VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            vector,
            1,
            1, // data[0] = true (little-endian: first byte 1)
        ];
        let dev = Fd(v.fd());
        // SAFETY: `buf` is a complete vfio_irq_set with one bool of data,
        // argsz covers it, and it outlives the call.
        let ret = unsafe { ioctl_with_ptr(&dev, VFIO_DEVICE_SET_IRQS(), buf.as_ptr()) };
        if ret < 0 {
            return Err(Error::last_os(
                &v.address,
                format!("VFIO_DEVICE_SET_IRQS trigger index {index} vector {vector}"),
            ));
        }
        Ok(())
    }

    fn address(&self, vf: VfId) -> Result<PciAddress> {
        Ok(self.vf(vf)?.address)
    }
}

fn check_range(v: &RealVf, index: u32, offset: u64, len: usize) -> Result<RegionInfo> {
    let r = v.regions.get(index as usize).copied().unwrap_or_default();
    let end = offset.checked_add(len as u64);
    if r.size == 0 || end.is_none_or(|e| e > r.size) {
        return Err(Error::OutOfRange {
            address: v.address,
            what: format!(
                "access {offset:#x}+{len} outside region {index} (size {:#x})",
                r.size
            ),
        });
    }
    Ok(r)
}

/// Wait until no other thread holds a clone of `a` (an access that looked up
/// its entry just before it was removed), then take it.
fn unwrap_arc<T>(mut a: Arc<T>) -> T {
    loop {
        match Arc::try_unwrap(a) {
            Ok(v) => return v,
            Err(shared) => {
                a = shared;
                std::thread::yield_now();
            }
        }
    }
}

impl Drop for VfioIoctlsBackend {
    fn drop(&mut self) {
        let (vfs, groups) = {
            let table = self.table.get_mut().unwrap_or_else(|p| p.into_inner());
            (
                std::mem::take(&mut table.vfs),
                std::mem::take(&mut table.groups),
            )
        };
        // Device fds first: a group with an open device cannot leave.
        drop(vfs);
        for (_, g) in groups {
            if let Ok(g) = Arc::try_unwrap(g) {
                if let Err(e) = self.kvm_file(&g.file, false, &g.address) {
                    tracing::warn!("unregistering from the KVM VFIO device at backend drop: {e}");
                }
                if let Some(e) = unset_container(&g.file, &g.address) {
                    tracing::warn!("leaving the container at backend drop: {e}");
                }
            }
        }
    }
}
