//! A recording, failure-injecting [`VfioBackend`] double for unit tests and
//! benchmarks. It models the kernel facts vfio-pause relies on: a VF must
//! exist to be opened, type1 drops every DMA mapping when the last group
//! leaves the container, DMA map needs a group in the container, and an mmap
//! keeps the device referenced.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use crate::backend::{
    irq, region, GroupId, Joined, MmapArea, RegionInfo, VfId, VfSource, VfioBackend,
};
use crate::error::{Error, Result};
use crate::pci::{cfg, Identity, PciAddress};

/// Kinds of backend call, for recording and failure injection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FakeOp {
    /// [`VfioBackend::join_group`].
    Join,
    /// [`VfioBackend::leave_group`].
    Leave,
    /// [`VfioBackend::open_device`] (the function reset of a real open).
    Open,
    /// [`VfioBackend::close_device`] (the function reset of a real close).
    Close,
    /// [`VfioBackend::dma_map`].
    DmaMap,
    /// [`VfioBackend::dma_unmap`].
    DmaUnmap,
    /// [`VfioBackend::region_read`].
    RegionRead,
    /// [`VfioBackend::region_write`].
    RegionWrite,
    /// [`VfioBackend::mmap_region`].
    Mmap,
    /// [`VfioBackend::munmap_region`].
    Munmap,
    /// [`VfioBackend::set_irqs`].
    SetIrqs,
}

/// One recorded backend call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeCall {
    /// A VF's group was joined (or a join was attempted).
    Open {
        /// Host address.
        address: PciAddress,
        /// Whether through a passed group fd.
        group_fd: bool,
    },
    /// A VF's device fd was closed.
    Close(PciAddress),
    /// A VF's group left the container.
    Leave(PciAddress),
    /// DMA map.
    DmaMap {
        /// IO virtual address.
        iova: u64,
        /// Length.
        size: u64,
    },
    /// DMA unmap.
    DmaUnmap {
        /// IO virtual address.
        iova: u64,
        /// Length.
        size: u64,
    },
    /// Region read.
    Read {
        /// Host address.
        address: PciAddress,
        /// Region index.
        index: u32,
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
    },
    /// Region write.
    Write {
        /// Host address.
        address: PciAddress,
        /// Region index.
        index: u32,
        /// Offset.
        offset: u64,
        /// Data written.
        data: Vec<u8>,
    },
    /// mmap of a region.
    Mmap(PciAddress, u32),
    /// munmap of a region.
    Munmap(PciAddress, u32),
    /// SET_IRQS; `count == 0` disables.
    SetIrqs {
        /// Host address.
        address: PciAddress,
        /// IRQ index.
        index: u32,
        /// Number of eventfds.
        count: usize,
    },
}

/// A simulated function: config space with an MSI-X capability at 0x40,
/// one 16 KiB memory BAR0, MSI-X with 8 vectors (table and PBA in BAR0).
#[derive(Clone, Debug)]
pub struct FakeVf {
    config: Vec<u8>,
    bar0: Vec<u8>,
    msix_vectors: u32,
}

impl FakeVf {
    /// A function with these ids.
    pub fn new(identity: Identity) -> Self {
        let mut config = vec![0u8; 0x100];
        config[cfg::VENDOR_ID..cfg::VENDOR_ID + 2].copy_from_slice(&identity.vendor.to_le_bytes());
        config[cfg::DEVICE_ID..cfg::DEVICE_ID + 2].copy_from_slice(&identity.device.to_le_bytes());
        config[cfg::REVISION_CLASS..cfg::REVISION_CLASS + 4]
            .copy_from_slice(&(identity.class << 8 | u32::from(identity.revision)).to_le_bytes());
        config[cfg::SUBSYS_VENDOR_ID..cfg::SUBSYS_VENDOR_ID + 2]
            .copy_from_slice(&identity.subsystem_vendor.to_le_bytes());
        config[cfg::SUBSYS_ID..cfg::SUBSYS_ID + 2]
            .copy_from_slice(&identity.subsystem.to_le_bytes());
        // Status: capability list; first capability MSI-X at 0x40.
        config[0x06] = 0x10;
        config[0x34] = 0x40;
        config[0x40] = 0x11;
        config[0x41] = 0x00;
        let mut bar0 = vec![0u8; 0x4000];
        // A recognisable register at BAR0 offset 0 (like NVMe CAP).
        bar0[0..4].copy_from_slice(&0x0040_0fffu32.to_le_bytes());
        let mut vf = FakeVf {
            config,
            bar0,
            msix_vectors: 0,
        };
        vf.set_msix_vectors(8);
        vf
    }

    fn set_msix_vectors(&mut self, n: u32) {
        self.msix_vectors = n;
        let ctrl = (n.saturating_sub(1) as u16).to_le_bytes();
        self.config[0x42..0x44].copy_from_slice(&ctrl);
        // Table in BAR0 at 0x2000, PBA at 0x3000.
        self.config[0x44..0x48].copy_from_slice(&0x2000u32.to_le_bytes());
        self.config[0x48..0x4c].copy_from_slice(&0x3000u32.to_le_bytes());
    }

    /// The same function with another revision id.
    pub fn with_revision(mut self, revision: u8) -> Self {
        self.config[cfg::REVISION_CLASS] = revision;
        self
    }

    /// The same function with a BAR0 of `size` bytes (a power of two).
    pub fn with_bar0_size(mut self, size: usize) -> Self {
        self.bar0.resize(size, 0);
        self
    }

    /// The same function with `n` MSI-X vectors.
    pub fn with_msix_vectors(mut self, n: u32) -> Self {
        self.set_msix_vectors(n);
        self
    }

    /// The same function with a second capability (id `id`) at `offset`
    /// (>= 0x50, dword aligned), after MSI-X.
    pub fn with_capability(mut self, id: u8, offset: u8) -> Self {
        self.config[0x41] = offset;
        self.config[offset as usize] = id;
        self.config[offset as usize + 1] = 0;
        self
    }

    /// An emulated-NVMe-like VF (1b36:0010, class 010802).
    pub fn nvme() -> Self {
        Self::new(Identity {
            vendor: 0x1b36,
            device: 0x0010,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
            class: 0x010802,
            revision: 0,
        })
    }

    /// An igb-VF-like function (8086:10ca, class 020000).
    pub fn igbvf() -> Self {
        Self::new(Identity {
            vendor: 0x8086,
            device: 0x10ca,
            subsystem_vendor: 0x8086,
            subsystem: 0x0000,
            class: 0x020000,
            revision: 0,
        })
    }
}

struct FakeGroup {
    address: PciAddress,
    /// False once the simulated kernel took the group out itself (its
    /// function was removed while only the group fd was open).
    in_container: bool,
}

struct OpenVf {
    address: PciAddress,
    mmaps: Vec<Box<[u8]>>,
    irqs_enabled: BTreeMap<u32, usize>,
}

/// A call of kind `op` that, once reached, waits until the test releases it
/// (see [`FakeBackend::gate`]). It waits outside the backend's lock, like a
/// slow kernel call (an FLR) would.
#[derive(Debug)]
pub struct FakeGate {
    entered: std::sync::mpsc::Receiver<()>,
    release: std::sync::mpsc::Sender<()>,
}

impl FakeGate {
    /// Block until the gated call has been reached.
    pub fn wait_entered(&self) {
        self.entered.recv().expect("gated call reached");
    }

    /// Let the gated call go on.
    pub fn release(&self) {
        let _ = self.release.send(());
    }
}

struct GateEnd {
    op: FakeOp,
    entered: std::sync::mpsc::Sender<()>,
    release: std::sync::mpsc::Receiver<()>,
}

#[derive(Default)]
struct State {
    present: BTreeMap<PciAddress, FakeVf>,
    groups: BTreeMap<GroupId, FakeGroup>,
    open: BTreeMap<VfId, OpenVf>,
    dma: BTreeMap<u64, u64>,
    calls: Vec<FakeCall>,
    failures: Vec<(FakeOp, usize)>,
    gates: Vec<GateEnd>,
    next: u64,
}

/// The double. Cloning gives another handle onto the same simulated host, so a
/// test keeps one clone to inspect and script while the device owns another.
#[derive(Clone, Default)]
pub struct FakeBackend {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FakeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("FakeBackend")
            .field("present", &s.present.len())
            .field("open", &s.open.len())
            .finish()
    }
}

impl FakeBackend {
    /// An empty simulated host.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Create (or replace) a function at `address`.
    pub fn add_vf(&self, address: &PciAddress, vf: FakeVf) {
        self.lock().present.insert(*address, vf);
    }

    /// Remove the function at `address` (like `sriov_numvfs=0`). The simulated
    /// kernel refuses while its device fd is open, as the real one blocks the
    /// remover; a group fd alone does not block it, but the group is taken
    /// out of the container (and type1 drops every mapping when it was the last).
    pub fn remove_vf(&self, address: &PciAddress) -> std::result::Result<(), String> {
        let mut s = self.lock();
        if s.open.values().any(|o| &o.address == address) {
            return Err(format!("{address} is still open: the remover would block"));
        }
        s.present.remove(address);
        for g in s.groups.values_mut().filter(|g| &g.address == address) {
            g.in_container = false;
        }
        if !s.groups.values().any(|g| g.in_container) {
            s.dma.clear();
        }
        Ok(())
    }

    /// Group fds held (in the container or not).
    pub fn open_groups(&self) -> usize {
        self.lock().groups.len()
    }

    /// Make the `skip`+1-th next call of kind `op` fail with EIO (`skip` = 0: the next one).
    pub fn fail(&self, op: FakeOp, skip: usize) {
        self.lock().failures.push((op, skip));
    }

    /// Make the next call of kind `op` wait until the returned gate is
    /// released: before it does anything, except [`FakeOp::Close`], which
    /// waits after the device fd is closed (when a real remover goes on).
    pub fn gate(&self, op: FakeOp) -> FakeGate {
        let (etx, erx) = std::sync::mpsc::channel();
        let (rtx, rrx) = std::sync::mpsc::channel();
        self.lock().gates.push(GateEnd {
            op,
            entered: etx,
            release: rrx,
        });
        FakeGate {
            entered: erx,
            release: rtx,
        }
    }

    fn pass_gate(&self, op: FakeOp) {
        let end = {
            let mut s = self.lock();
            let pos = s.gates.iter().position(|g| g.op == op);
            pos.map(|p| s.gates.remove(p))
        };
        if let Some(g) = end {
            let _ = g.entered.send(());
            let _ = g.release.recv();
        }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// Forget the recorded calls.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Open device fds plus live mmaps (each mmap pins the device file).
    pub fn open_handles(&self) -> usize {
        let s = self.lock();
        s.open.len() + s.open.values().map(|o| o.mmaps.len()).sum::<usize>()
    }

    /// Current DMA mappings of the container (iova -> size).
    pub fn dma_mappings(&self) -> BTreeMap<u64, u64> {
        self.lock().dma.clone()
    }

    /// Enabled interrupt indices of the open VF at `address` (index -> vectors).
    pub fn irqs_enabled(&self, address: &PciAddress) -> BTreeMap<u32, usize> {
        let s = self.lock();
        s.open
            .values()
            .find(|o| &o.address == address)
            .map(|o| o.irqs_enabled.clone())
            .unwrap_or_default()
    }

    /// Config space of the function at `address` as the simulated hardware holds it.
    pub fn config_of(&self, address: &PciAddress) -> Option<Vec<u8>> {
        self.lock().present.get(address).map(|v| v.config.clone())
    }

    fn injected(s: &mut State, op: FakeOp) -> bool {
        if let Some(pos) = s.failures.iter().position(|(o, _)| *o == op) {
            if s.failures[pos].1 == 0 {
                s.failures.remove(pos);
                return true;
            }
            s.failures[pos].1 -= 1;
        }
        false
    }

    fn eio(address: &PciAddress, op: &str) -> Error {
        Error::io(
            address,
            format!("{op} (injected)"),
            io::Error::from_raw_os_error(libc::EIO),
        )
    }
}

fn open_vf(s: &mut State, vf: VfId) -> Result<&mut OpenVf> {
    s.open.get_mut(&vf).ok_or_else(|| Error::OutOfRange {
        address: PciAddress::zero(),
        what: format!("no open VF with handle {}", vf.0),
    })
}

fn eexist(iova: u64, size: u64) -> Error {
    Error::Container {
        op: format!("dma map iova {iova:#x} size {size:#x}"),
        source: Box::new(io::Error::from_raw_os_error(libc::EEXIST)),
    }
}

impl VfioBackend for FakeBackend {
    fn join_group(&self, source: VfSource) -> Result<Joined> {
        self.pass_gate(FakeOp::Join);
        let mut s = self.lock();
        let address = *source.address();
        s.calls.push(FakeCall::Open {
            address,
            group_fd: source.is_group_fd(),
        });
        // A passed group fd is owned (and here closed) by the backend.
        drop(source);
        if Self::injected(&mut s, FakeOp::Join) {
            return Err(Self::eio(&address, "join group"));
        }
        if !s.present.contains_key(&address) {
            return Err(Error::VfGone {
                path: format!("{}/iommu_group", address.sysfs_path().display()),
                address,
            });
        }
        if s.groups.values().any(|g| g.address == address) {
            return Err(Error::io(
                &address,
                "open group",
                io::Error::from_raw_os_error(libc::EBUSY),
            ));
        }
        let first = !s.groups.values().any(|g| g.in_container);
        s.next += 1;
        let group = GroupId(s.next);
        s.groups.insert(
            group,
            FakeGroup {
                address,
                in_container: true,
            },
        );
        Ok(Joined { group, first })
    }

    fn leave_group(&self, group: GroupId) -> Result<()> {
        self.pass_gate(FakeOp::Leave);
        let mut s = self.lock();
        let g = s.groups.remove(&group).ok_or_else(|| Error::OutOfRange {
            address: PciAddress::zero(),
            what: format!("no group with handle {}", group.0),
        })?;
        s.calls.push(FakeCall::Leave(g.address));
        if !s.groups.values().any(|g| g.in_container) {
            // type1: the last group leaving the container unpins every mapping.
            s.dma.clear();
        }
        // Even an injected failure releases the group (the trait's contract).
        if Self::injected(&mut s, FakeOp::Leave) {
            return Err(Self::eio(&g.address, "leave group"));
        }
        Ok(())
    }

    fn open_device(&self, group: GroupId) -> Result<VfId> {
        self.pass_gate(FakeOp::Open);
        let mut s = self.lock();
        let address = match s.groups.get(&group) {
            Some(g) if g.in_container => g.address,
            _ => {
                return Err(Error::OutOfRange {
                    address: PciAddress::zero(),
                    what: format!("no group with handle {} in the container", group.0),
                })
            }
        };
        if Self::injected(&mut s, FakeOp::Open) {
            return Err(Self::eio(&address, "open device"));
        }
        if !s.present.contains_key(&address) {
            return Err(Error::VfGone {
                path: format!("{}", address.sysfs_path().display()),
                address,
            });
        }
        if s.open.values().any(|o| o.address == address) {
            return Err(Error::io(
                &address,
                "VFIO_GROUP_GET_DEVICE_FD",
                io::Error::from_raw_os_error(libc::EBUSY),
            ));
        }
        s.next += 1;
        let id = VfId(s.next);
        s.open.insert(
            id,
            OpenVf {
                address,
                mmaps: Vec::new(),
                irqs_enabled: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    fn close_device(&self, vf: VfId) -> Result<()> {
        let res = {
            let mut s = self.lock();
            let o = s.open.remove(&vf).ok_or_else(|| Error::OutOfRange {
                address: PciAddress::zero(),
                what: format!("no open VF with handle {}", vf.0),
            })?;
            s.calls.push(FakeCall::Close(o.address));
            // Even an injected failure releases everything (the trait's contract).
            if Self::injected(&mut s, FakeOp::Close) {
                Err(Self::eio(&o.address, "close"))
            } else {
                Ok(())
            }
        };
        // Gated after the fd is closed: the moment a remover blocked on it
        // goes on (the real close returns after the function reset).
        self.pass_gate(FakeOp::Close);
        res
    }

    unsafe fn dma_map(&self, iova: u64, size: u64, _host_addr: *mut u8) -> Result<()> {
        let mut s = self.lock();
        s.calls.push(FakeCall::DmaMap { iova, size });
        if Self::injected(&mut s, FakeOp::DmaMap) {
            return Err(Error::Container {
                op: format!("dma map iova {iova:#x} (injected)"),
                source: Box::new(io::Error::from_raw_os_error(libc::EIO)),
            });
        }
        if !s.groups.values().any(|g| g.in_container) {
            return Err(Error::Container {
                op: format!("dma map iova {iova:#x}: no group in the container"),
                source: Box::new(io::Error::from_raw_os_error(libc::EINVAL)),
            });
        }
        // type1: EEXIST for any overlap, whatever the host address.
        let end = iova.saturating_add(size);
        if s.dma
            .iter()
            .any(|(&a, &l)| iova < a.saturating_add(l) && a < end)
        {
            return Err(eexist(iova, size));
        }
        s.dma.insert(iova, size);
        Ok(())
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        let mut s = self.lock();
        s.calls.push(FakeCall::DmaUnmap { iova, size });
        if Self::injected(&mut s, FakeOp::DmaUnmap) {
            return Err(Error::Container {
                op: format!("dma unmap iova {iova:#x} (injected)"),
                source: Box::new(io::Error::from_raw_os_error(libc::EIO)),
            });
        }
        if s.dma.get(&iova) != Some(&size) {
            return Err(Error::Container {
                op: format!("dma unmap iova {iova:#x} size {size:#x}"),
                source: "nothing of that size is mapped there".into(),
            });
        }
        s.dma.remove(&iova);
        Ok(())
    }

    fn region_info(&self, vf: VfId, index: u32) -> Result<RegionInfo> {
        let mut s = self.lock();
        let address = open_vf(&mut s, vf)?.address;
        let bar0 = s.present.get(&address).map_or(0, |f| f.bar0.len() as u64);
        Ok(match index {
            region::BAR0 => RegionInfo {
                size: bar0,
                offset: 0,
                read: true,
                write: true,
                mmap: true,
                msix_mappable: true,
            },
            region::CONFIG => RegionInfo {
                size: 0x100,
                offset: 0x7000_0000_0000,
                read: true,
                write: true,
                mmap: false,
                msix_mappable: false,
            },
            _ => RegionInfo::default(),
        })
    }

    fn irq_count(&self, vf: VfId, index: u32) -> Result<u32> {
        let mut s = self.lock();
        let address = open_vf(&mut s, vf)?.address;
        let msix = s.present.get(&address).map_or(0, |f| f.msix_vectors);
        Ok(match index {
            irq::INTX | irq::REQ => 1,
            irq::MSIX => msix,
            _ => 0,
        })
    }

    fn region_read(&self, vf: VfId, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut s = self.lock();
        let address = open_vf(&mut s, vf)?.address;
        s.calls.push(FakeCall::Read {
            address,
            index,
            offset,
            len: buf.len(),
        });
        if Self::injected(&mut s, FakeOp::RegionRead) {
            return Err(Self::eio(&address, "region read"));
        }
        let f = s.present.get(&address).expect("open VFs are present");
        let src = match index {
            region::CONFIG => &f.config,
            region::BAR0 => &f.bar0,
            _ => {
                return Err(Error::OutOfRange {
                    address,
                    what: format!("no region {index}"),
                })
            }
        };
        let o = offset as usize;
        let Some(chunk) = src.get(o..o + buf.len()) else {
            return Err(Error::OutOfRange {
                address,
                what: format!("read {offset:#x}+{} outside region {index}", buf.len()),
            });
        };
        buf.copy_from_slice(chunk);
        Ok(())
    }

    fn region_write(&self, vf: VfId, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let mut s = self.lock();
        let address = open_vf(&mut s, vf)?.address;
        s.calls.push(FakeCall::Write {
            address,
            index,
            offset,
            data: data.to_vec(),
        });
        if Self::injected(&mut s, FakeOp::RegionWrite) {
            return Err(Self::eio(&address, "region write"));
        }
        let f = s.present.get_mut(&address).expect("open VFs are present");
        let dst = match index {
            region::CONFIG => &mut f.config,
            region::BAR0 => &mut f.bar0,
            _ => {
                return Err(Error::OutOfRange {
                    address,
                    what: format!("no region {index}"),
                })
            }
        };
        let o = offset as usize;
        let Some(chunk) = dst.get_mut(o..o + data.len()) else {
            return Err(Error::OutOfRange {
                address,
                what: format!("write {offset:#x}+{} outside region {index}", data.len()),
            });
        };
        chunk.copy_from_slice(data);
        Ok(())
    }

    fn mmap_areas(&self, vf: VfId, index: u32) -> Result<Vec<(u64, u64)>> {
        let mut s = self.lock();
        let address = open_vf(&mut s, vf)?.address;
        let bar0 = s.present.get(&address).map_or(0, |f| f.bar0.len() as u64);
        Ok(if index == region::BAR0 {
            vec![(0, bar0)]
        } else {
            Vec::new()
        })
    }

    fn mmap_region(&self, vf: VfId, index: u32, offset: u64, len: u64) -> Result<MmapArea> {
        let mut s = self.lock();
        let address = open_vf(&mut s, vf)?.address;
        s.calls.push(FakeCall::Mmap(address, index));
        if Self::injected(&mut s, FakeOp::Mmap) {
            return Err(Self::eio(&address, "mmap"));
        }
        if index != region::BAR0 {
            return Err(Error::OutOfRange {
                address,
                what: format!("region {index} is not mmap-able"),
            });
        }
        let mut mem = vec![0u8; len as usize].into_boxed_slice();
        let area = MmapArea {
            index,
            offset,
            host_addr: mem.as_mut_ptr() as usize,
            len: mem.len(),
        };
        open_vf(&mut s, vf)?.mmaps.push(mem);
        Ok(area)
    }

    fn munmap_region(&self, vf: VfId, area: MmapArea) -> Result<()> {
        let mut s = self.lock();
        let address = open_vf(&mut s, vf)?.address;
        s.calls.push(FakeCall::Munmap(address, area.index));
        let fail = Self::injected(&mut s, FakeOp::Munmap);
        let o = open_vf(&mut s, vf)?;
        // munmap cannot really fail for a valid mapping; the injected error
        // still removes it, as the kernel would.
        o.mmaps.retain(|m| m.as_ptr() as usize != area.host_addr);
        if fail {
            return Err(Self::eio(&address, "munmap"));
        }
        Ok(())
    }

    fn set_irqs(&self, vf: VfId, index: u32, fds: &[&EventFd]) -> Result<()> {
        let mut s = self.lock();
        let address = open_vf(&mut s, vf)?.address;
        s.calls.push(FakeCall::SetIrqs {
            address,
            index,
            count: fds.len(),
        });
        if Self::injected(&mut s, FakeOp::SetIrqs) {
            return Err(Self::eio(&address, "set irqs"));
        }
        let o = open_vf(&mut s, vf)?;
        if fds.is_empty() {
            o.irqs_enabled.remove(&index);
        } else {
            o.irqs_enabled.insert(index, fds.len());
        }
        Ok(())
    }

    fn trigger_irq(&self, vf: VfId, index: u32, vector: u32) -> Result<()> {
        let mut s = self.lock();
        let o = open_vf(&mut s, vf)?;
        match o.irqs_enabled.get(&index) {
            Some(&n) if (vector as usize) < n => Ok(()),
            _ => Err(Error::io(
                &o.address,
                format!("trigger index {index} vector {vector}: not wired"),
                io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }

    fn address(&self, vf: VfId) -> Result<PciAddress> {
        let mut s = self.lock();
        Ok(open_vf(&mut s, vf)?.address)
    }
}
