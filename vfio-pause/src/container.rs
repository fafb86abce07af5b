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

#[derive(Debug)]
struct Inner {
    backend: Box<dyn VfioBackend>,
    regions: Vec<DmaRegion>,
    /// Whether `regions` are currently mapped in the IOMMU.
    mapped: bool,
    /// VFs currently open in this container.
    open_vfs: usize,
}

/// The VFIO container shared by the pausable devices of one VM.
///
/// Type1 semantics are modelled here: DMA can only be mapped while at least
/// one group is in the container, and when the last group leaves, every
/// mapping is dropped. Registered guest memory is therefore (re-)mapped when
/// the first VF joins, which is the `dma-remap` phase of an unpause.
///
/// Opening and closing VFs is serialised per container (the remap decision
/// must see group joins and leaves in order); to overlap the FLRs of many VFs,
/// give each VF its own container.
#[derive(Debug)]
pub struct Container {
    inner: Mutex<Inner>,
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
            inner: Mutex::new(Inner {
                backend,
                regions: Vec::new(),
                mapped: false,
                open_vfs: 0,
            }),
        })
    }

    /// A container over the real VFIO backend (opens `/dev/vfio/vfio`).
    pub fn open_real() -> Result<Arc<Self>> {
        Ok(Self::new(Box::new(VfioIoctlsBackend::new()?)))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
        let r = DmaRegion {
            iova,
            size,
            host_addr: host_addr as usize,
        };
        if g.mapped {
            // SAFETY: the caller upholds the dma_map contract for this range.
            unsafe { g.backend.dma_map(iova, size, host_addr) }?;
        }
        g.regions.push(r);
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
        if g.mapped {
            g.backend.dma_unmap(iova, size)?;
        }
        g.regions.remove(pos);
        Ok(())
    }

    /// Whether registered memory is currently mapped in the IOMMU.
    pub fn dma_mapped(&self) -> bool {
        self.lock().mapped
    }

    pub(crate) fn open_vf(&self, source: VfSource) -> Result<Opened> {
        let mut g = self.lock();
        let t = Instant::now();
        let vf = g.backend.open(source)?;
        let open = t.elapsed();
        g.open_vfs += 1;
        let mut remap = None;
        if !g.mapped && !g.regions.is_empty() {
            let t = Instant::now();
            let regions = g.regions.clone();
            for (i, r) in regions.iter().enumerate() {
                // SAFETY: every registered region was registered under
                // register_dma's contract, which holds until it is unregistered.
                let res = unsafe { g.backend.dma_map(r.iova, r.size, r.host_addr as *mut u8) };
                if let Err(e) = res {
                    for done in &regions[..i] {
                        if let Err(u) = g.backend.dma_unmap(done.iova, done.size) {
                            tracing::warn!("dma unmap during remap cleanup: {u}");
                        }
                    }
                    g.open_vfs -= 1;
                    if let Err(c) = g.backend.close(vf) {
                        tracing::warn!("close after failed dma remap: {c}");
                    }
                    return Err(e);
                }
            }
            remap = Some(t.elapsed());
        }
        g.mapped = true;
        Ok(Opened { vf, open, remap })
    }

    pub(crate) fn close_vf(&self, vf: VfId) -> Result<()> {
        let mut g = self.lock();
        g.open_vfs -= 1;
        if g.open_vfs == 0 {
            // The last group leaves: type1 unpins every mapping.
            g.mapped = false;
        }
        g.backend.close(vf)
    }

    pub(crate) fn with_backend<T>(&self, f: impl FnOnce(&mut dyn VfioBackend) -> T) -> T {
        let mut g = self.lock();
        f(g.backend.as_mut())
    }
}
