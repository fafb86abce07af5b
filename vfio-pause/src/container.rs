//! The VFIO container of one VM: the backend plus the guest memory the VMM
//! registered for device DMA, mapped whenever the container gets its first
//! group.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::backend::{GroupId, VfId, VfSource, VfioBackend};
use crate::error::{Error, Result};
use crate::real::VfioIoctlsBackend;

#[derive(Clone, Copy, Debug)]
struct DmaRegion {
    iova: u64,
    size: u64,
    host_addr: usize,
}

impl DmaRegion {
    fn overlaps(&self, iova: u64, size: u64) -> bool {
        let end = |a: u64, s: u64| a.saturating_add(s);
        iova < end(self.iova, self.size) && self.iova < end(iova, size)
    }
}

#[derive(Debug, Default)]
struct Dma {
    regions: Vec<DmaRegion>,
    /// Groups this container put in the kernel container and has not taken
    /// out yet. Changed only with this lock held, around the join and the
    /// leave themselves, so "a group is in" and "every registered region is
    /// mapped" change together.
    groups: usize,
}

/// The VFIO container shared by the pausable devices of one VM.
///
/// Type1 semantics: DMA can only be mapped while at least one group is in
/// the container, and when the last group leaves every mapping is dropped.
/// The container keeps one invariant: while a group is in, every registered
/// region is mapped. Group joins and leaves run under the DMA lock: the first
/// group in (the kernel says so: its `VFIO_SET_IOMMU` succeeds) maps every
/// registered region before the lock is released, a registration made while
/// a group is in is mapped at once, and an unregistration is unmapped at once.
/// The device opens and closes (the function resets, about 100 ms each) run
/// outside that lock, so many VFs of one VM pause and unpause in parallel.
#[derive(Debug)]
pub struct Container {
    backend: Box<dyn VfioBackend>,
    dma: Mutex<Dma>,
}

/// What [`Container::open_vf`] did, for the timings.
pub(crate) struct Opened {
    pub vf: VfId,
    pub group: GroupId,
    pub open: Duration,
    pub remap: Option<Duration>,
}

impl Container {
    /// A container over any backend.
    pub fn new(backend: Box<dyn VfioBackend>) -> Arc<Self> {
        Arc::new(Container {
            backend,
            dma: Mutex::new(Dma::default()),
        })
    }

    /// A container over the real VFIO backend (opens `/dev/vfio/vfio`).
    pub fn open_real() -> Result<Arc<Self>> {
        Ok(Self::new(Box::new(VfioIoctlsBackend::new()?)))
    }

    fn lock(&self) -> MutexGuard<'_, Dma> {
        self.dma.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register `size` bytes at `host_addr` for device DMA at `iova`. Mapped now
    /// if a VF is open, otherwise when the first one opens. A range that
    /// overlaps a registered one is refused.
    ///
    /// # Safety
    /// The memory must stay mapped until [`Container::unregister_dma`] or the
    /// container is dropped, and while registered it must only be accessed
    /// through raw pointers, volatile accesses or syscalls (the device may DMA
    /// into it at any time): the contract of vfio-ioctls' `vfio_dma_map`.
    pub unsafe fn register_dma(&self, iova: u64, size: u64, host_addr: *mut u8) -> Result<()> {
        let mut g = self.lock();
        if let Some(r) = g.regions.iter().find(|r| r.overlaps(iova, size)) {
            return Err(Error::Container {
                op: format!("register dma iova {iova:#x} size {size:#x}"),
                source: format!(
                    "overlaps the registration at iova {:#x} size {:#x}",
                    r.iova, r.size
                )
                .into(),
            });
        }
        if g.groups > 0 {
            // SAFETY: the caller upholds the dma_map contract for this range.
            unsafe { self.backend.dma_map(iova, size, host_addr) }?;
        }
        g.regions.push(DmaRegion {
            iova,
            size,
            host_addr: host_addr as usize,
        });
        Ok(())
    }

    /// Register every region of a vm-memory guest memory map, at IOVA = guest address.
    ///
    /// # Safety
    /// As [`Container::register_dma`], for every region of `mem`; `mem` (or a
    /// clone sharing its mappings) must outlive the registration.
    pub unsafe fn register_guest_memory(&self, mem: &GuestMemoryMmap) -> Result<()> {
        for r in mem.iter() {
            let host =
                r.get_host_address(MemoryRegionAddress(0))
                    .map_err(|e| Error::Container {
                        op: "host address of a guest memory region".into(),
                        source: Box::new(e),
                    })?;
            // SAFETY: forwarded from this function's contract.
            unsafe { self.register_dma(r.start_addr().0, r.len(), host) }?;
        }
        Ok(())
    }

    /// Remove a registration and, while a group is in the container, its
    /// mapping. When the unmap fails the registration is kept and the error
    /// returned (the memory may still be pinned: do not free it).
    pub fn unregister_dma(&self, iova: u64, size: u64) -> Result<()> {
        let mut g = self.lock();
        let pos = g
            .regions
            .iter()
            .position(|r| r.iova == iova && r.size == size)
            .ok_or_else(|| Error::Container {
                op: format!("unregister dma iova {iova:#x} size {size:#x}"),
                source: "no such registration".into(),
            })?;
        if g.groups > 0 {
            self.backend.dma_unmap(iova, size)?;
        }
        g.regions.remove(pos);
        Ok(())
    }

    /// Whether a group is in the container, i.e. registered memory is mapped
    /// in the IOMMU.
    pub fn dma_mapped(&self) -> bool {
        self.lock().groups > 0
    }

    pub(crate) fn open_vf(&self, source: VfSource) -> Result<Opened> {
        let t = Instant::now();
        let (group, remap) = {
            let mut g = self.lock();
            let joined = self.backend.join_group(source)?;
            g.groups += 1;
            let mut remap = None;
            // The first group in (or the first of ours in a container that
            // holds only the VMM's own groups) finds nothing of ours mapped.
            if joined.first || g.groups == 1 {
                let tm = Instant::now();
                for r in g.regions.clone() {
                    // SAFETY: every registered region was registered under
                    // register_dma's contract, which holds until it is unregistered.
                    let res =
                        unsafe { self.backend.dma_map(r.iova, r.size, r.host_addr as *mut u8) };
                    if let Err(e) = res {
                        // Leave the container as it was: our group leaves and,
                        // being the only one, takes what we mapped with it.
                        g.groups -= 1;
                        if let Err(c) = self.backend.leave_group(joined.group) {
                            tracing::warn!("leave group after failed dma map: {c}");
                        }
                        return Err(e);
                    }
                }
                if !g.regions.is_empty() {
                    remap = Some(tm.elapsed());
                }
            }
            (joined.group, remap)
        };
        let vf = match self.backend.open_device(group) {
            Ok(vf) => vf,
            Err(e) => {
                self.leave(group);
                return Err(e);
            }
        };
        let open = t.elapsed() - remap.unwrap_or_default();
        Ok(Opened {
            vf,
            group,
            open,
            remap,
        })
    }

    fn leave(&self, group: GroupId) -> Option<Error> {
        let mut g = self.lock();
        g.groups -= 1;
        self.backend.leave_group(group).err()
    }

    /// Close the device fd (outside the DMA lock: the reset is slow), then
    /// take the group out under it. Every fd is released even on error.
    pub(crate) fn close_vf(&self, vf: VfId, group: GroupId) -> Result<()> {
        let closed = self.backend.close_device(vf);
        let left = self.leave(group);
        match (closed, left) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(e)) => Err(e),
            (Ok(()), None) => Ok(()),
        }
    }

    pub(crate) fn with_backend<T>(&self, f: impl FnOnce(&dyn VfioBackend) -> T) -> T {
        f(self.backend.as_ref())
    }
}
