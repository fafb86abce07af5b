//! An emulated MSI-X capability and table for device models: the guest programs vectors in
//! the table, the model calls [`Msix::fire`], and an enabled, unmasked vector is delivered
//! through its irqfd and GSI route; a masked one is left pending in the PBA until unmasked.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::ConfigSpace;
use crate::devices::lock;
use crate::error::{io, Error};
use crate::vm::GsiRouter;

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// The MSI-X state of one function with at most 64 vectors.
#[derive(Debug)]
pub struct Msix {
    cap: usize,
    entries: Vec<[u32; 4]>,
    pending: u64,
    enabled: bool,
    masked: bool,
    router: Arc<Mutex<GsiRouter>>,
    vectors: Vec<(u32, EventFd)>,
}

impl Msix {
    /// Adds an MSI-X capability at config offset `cap` (the capability list starts there) of
    /// `n` vectors, table at `table` and PBA at `pba` in BAR `bir`, each vector with its own
    /// GSI and eventfd.
    pub fn new(
        config: &mut ConfigSpace,
        cap: usize,
        n: u16,
        bir: u8,
        table: u32,
        pba: u32,
        router: Arc<Mutex<GsiRouter>>,
    ) -> Result<Msix, Error> {
        assert!((1..=64).contains(&n) && bir < 6 && table % 8 == 0 && pba % 8 == 0);
        config.add_capability_list(cap);
        config.init_reg(
            cap,
            u32::from(CAP_ID_MSIX) | (u32::from(n - 1) << 16),
            u32::from(CTRL_ENABLE | CTRL_MASK) << 16,
        );
        config.init_reg(cap + 4, table | u32::from(bir), 0);
        config.init_reg(cap + 8, pba | u32::from(bir), 0);
        Self::external(cap, n, router)
    }

    /// MSI-X state of `n` vectors for a capability at `cap` that lives elsewhere (a VF's
    /// config space): the caller reports Enable and Function Mask with
    /// [`Msix::set_control`].
    pub fn external(cap: usize, n: u16, router: Arc<Mutex<GsiRouter>>) -> Result<Msix, Error> {
        assert!((1..=64).contains(&n));
        let mut vectors = Vec::new();
        for i in 0..n {
            let gsi = lock(&router).allocate_gsi()?;
            let evt =
                EventFd::new(EFD_NONBLOCK).map_err(io(format!("eventfd for MSI-X vector {i}")))?;
            vectors.push((gsi, evt));
        }
        Ok(Msix {
            cap,
            entries: vec![[0, 0, 0, ENTRY_MASKED]; n.into()],
            pending: 0,
            enabled: false,
            masked: false,
            router,
            vectors,
        })
    }

    /// Call after every config write: picks up Enable and Function Mask.
    pub fn config_written(&mut self, config: &ConfigSpace) {
        let ctrl = (config.read(self.cap) >> 16) as u16;
        self.set_control(ctrl);
    }

    /// The Message Control bits this model keeps (Enable, Function Mask), to merge into
    /// reads of an external capability.
    pub fn control_bits(&self) -> u16 {
        (if self.enabled { CTRL_ENABLE } else { 0 }) | (if self.masked { CTRL_MASK } else { 0 })
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Duplicates of the vectors' eventfds, vector n at index n (for VFIO_DEVICE_SET_IRQS:
    /// the kernel signals them, KVM's irqfds read them).
    pub fn eventfds(&self) -> Result<Vec<EventFd>, Error> {
        self.vectors
            .iter()
            .map(|(_, e)| e.try_clone().map_err(io("duplicating an MSI-X eventfd")))
            .collect()
    }

    /// Takes a new Message Control value (Enable and Function Mask; other bits ignored) and
    /// re-routes every vector if they changed.
    pub fn set_control(&mut self, ctrl: u16) {
        let (enabled, masked) = (ctrl & CTRL_ENABLE != 0, ctrl & CTRL_MASK != 0);
        if (enabled, masked) != (self.enabled, self.masked) {
            self.enabled = enabled;
            self.masked = masked;
            for v in 0..self.entries.len() {
                self.update(v);
            }
        }
    }

    /// Table read at `offset` from the table start.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let v = self.entries.get((offset / 16) as usize);
        let w = v.map(|e| e[((offset % 16) / 4) as usize]).unwrap_or(0);
        put(w, offset, data);
    }

    /// Table write (dword-sized; others dropped).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let (v, word) = ((offset / 16) as usize, ((offset % 16) / 4) as usize);
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if v >= self.entries.len() || offset % 4 != 0 {
            return;
        }
        self.entries[v][word] = u32::from_le_bytes(b);
        self.update(v);
    }

    /// PBA read at `offset` from the PBA start.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let w = match offset & !3 {
            0 => self.pending as u32,
            4 => (self.pending >> 32) as u32,
            _ => 0,
        };
        put(w, offset, data);
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.masked && self.entries[v][3] & ENTRY_MASKED == 0
    }

    /// Re-routes vector `v` and delivers it if it was pending and is now unmasked; a vector
    /// that is masked or disabled loses its irqfd, then its route.
    fn update(&mut self, v: usize) {
        let (gsi, evt) = &self.vectors[v];
        if !self.deliverable(v) {
            if let Err(err) = lock(&self.router).clear_msi(*gsi, evt) {
                tracing::warn!("MSI-X vector {v}: {err}");
            }
            return;
        }
        let e = self.entries[v];
        let addr = u64::from(e[0]) | (u64::from(e[1]) << 32);
        if let Err(err) = lock(&self.router).set_msi(*gsi, addr, e[2], evt) {
            tracing::warn!("MSI-X vector {v}: {err}");
            return;
        }
        if self.pending & (1 << v) != 0 {
            self.pending &= !(1 << v);
            let _ = evt.write(1);
        }
    }

    /// The device raises vector `v`: delivered now, or left pending while masked. Dropped
    /// while MSI-X is disabled.
    pub fn fire(&mut self, v: usize) {
        if !self.enabled || v >= self.entries.len() {
            return;
        }
        if self.deliverable(v) {
            let _ = self.vectors[v].1.write(1);
        } else {
            self.pending |= 1 << v;
        }
    }
}

impl Drop for Msix {
    /// A removed device leaves no irqfd or route behind.
    fn drop(&mut self) {
        for (gsi, evt) in &self.vectors {
            if let Err(e) = lock(&self.router).clear_msi(*gsi, evt) {
                tracing::warn!("MSI-X GSI {gsi} at removal: {e}");
            }
        }
    }
}

fn put(w: u32, offset: u64, data: &mut [u8]) {
    let b = w.to_le_bytes();
    let s = (offset % 4) as usize;
    for (i, d) in data.iter_mut().enumerate() {
        *d = b.get(s + i).copied().unwrap_or(0);
    }
}
