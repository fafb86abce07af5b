//! The VFIO container of one VM: the backend plus the guest memory the VMM
//! registered for device DMA, re-mapped whenever type1 dropped it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::backend::{VfId, VfSource, VfioBackend};
use crate::error::{Error, Result};
use crate::real::VfioIoctlsBackend;

#[derive(Clone, Copy, Debug)]
struct DmaRegion {
    iova: u64,
    size: u64,
    host_addr: usize,
}

#[derive(Debug, Default)]
struct Dma {
    regions: Vec<DmaRegion>,
    /// VFs open in this container (counted after their group joined and
    /// before it leaves).
    open_vfs: usize,
}

/// The VFIO container shared by the pausable devices of one VM.
///
/// Type1 semantics: DMA can only be mapped while at least one group is in
/// the container, and when the last group leaves every mapping is dropped.
/// Registered guest memory is therefore mapped when a VF joins; a region that
/// is still mapped answers `EEXIST`, which tells "kept" from "lost" without
/// holding a lock across group joins and leaves. So opens and closes of
/// different VFs (and their FLRs) run in parallel, also within one container.
#[derive(Debug)]
pub struct Container {
    backend: Box<dyn VfioBackend>,
    dma: Mutex<Dma>,
}

/// What [`Container::open_vf`] did, for the timings.
pub(crate) struct Opened {
    pub vf: VfId,
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
    /// if a VF is open, otherwise when the first one opens.
    ///
    /// # Safety
    /// The memory must stay mapped until [`Container::unregister_dma`] or the
    /// container is dropped, and while registered it must only be accessed
    /// through raw pointers, volatile accesses or syscalls (the device may DMA
    /// into it at any time): the contract of vfio-ioctls' `vfio_dma_map`.
    pub unsafe fn register_dma(&self, iova: u64, size: u64, host_addr: *mut u8) -> Result<()> {
        let mut g = self.lock();
        if g.open_vfs > 0 {
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

    /// Remove a registration (and its mapping, if mapped).
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
        if g.open_vfs > 0 {
            self.backend.dma_unmap(iova, size)?;
        }
        g.regions.remove(pos);
        Ok(())
    }

    /// Whether a VF is open, i.e. registered memory is mapped in the IOMMU.
    pub fn dma_mapped(&self) -> bool {
        self.lock().open_vfs > 0
    }

    pub(crate) fn open_vf(&self, source: VfSource) -> Result<Opened> {
        let t = Instant::now();
        let vf = self.backend.open(source)?;
        let open = t.elapsed();
        let mut g = self.lock();
        g.open_vfs += 1;
        let t = Instant::now();
        let mut remapped = false;
        for r in g.regions.clone() {
            // SAFETY: every registered region was registered under
            // register_dma's contract, which holds until it is unregistered.
            match unsafe { self.backend.dma_map(r.iova, r.size, r.host_addr as *mut u8) } {
                Ok(newly) => remapped |= newly,
                Err(e) => {
                    // Leave the container as it was: our group goes, and with
                    // it whatever this call mapped if it was the only one.
                    g.open_vfs -= 1;
                    drop(g);
                    if let Err(c) = self.backend.close(vf) {
                        tracing::warn!("close after failed dma remap: {c}");
                    }
                    return Err(e);
                }
            }
        }
        let remap = remapped.then(|| t.elapsed());
        Ok(Opened { vf, open, remap })
    }

    pub(crate) fn close_vf(&self, vf: VfId) -> Result<()> {
        self.lock().open_vfs -= 1;
        self.backend.close(vf)
    }

    pub(crate) fn with_backend<T>(&self, f: impl FnOnce(&dyn VfioBackend) -> T) -> T {
        f(self.backend.as_ref())
    }
}
