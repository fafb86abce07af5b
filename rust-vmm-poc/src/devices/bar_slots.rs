//! BARs of an attached VF mapped straight into KVM memory slots.
//!
//! vfio-pause mmaps the mappable areas of each BAR (never the MSI-X table and PBA pages) at
//! open and unpause and hands them to [`VmmHooks::map_bars`]; it calls
//! [`VmmHooks::unmap_bars`] first in a pause, before it munmaps them. [`BarSlots`] keeps
//! those areas and the guest addresses of the BARs (from the shadow config space, only while
//! memory decoding is on) and keeps one KVM slot per area at `BAR address + area offset`.
//! Without a slot (paused, decoding off, an unmapped page) an access exits to the VMM and is
//! trapped as before.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vfio_pause::{MmapArea, VmmHooks};

use super::lock;
use crate::pci::NUM_BARS;

/// Memory slot numbers for BAR mappings, shared by the VM's devices.
#[derive(Debug)]
pub struct SlotPool {
    next: u32,
    free: Vec<u32>,
    limit: u32,
}

impl SlotPool {
    /// Slots `first..limit`.
    pub fn new(first: u32, limit: u32) -> Self {
        SlotPool {
            next: first,
            free: Vec::new(),
            limit,
        }
    }

    fn take(&mut self) -> Option<u32> {
        self.free.pop().or_else(|| {
            (self.next < self.limit).then(|| {
                self.next += 1;
                self.next - 1
            })
        })
    }

    fn give(&mut self, slot: u32) {
        self.free.push(slot);
    }
}

/// A KVM slot of one mapped area: (guest address, length, host address).
type Mapping = (u64, u64, u64);

#[derive(Debug, Default)]
struct State {
    areas: Vec<MmapArea>,
    guest_bars: [Option<u64>; NUM_BARS],
    slots: BTreeMap<Mapping, u32>,
    /// Slots added since the device was opened (for tests: "remapped").
    maps: u64,
}

/// The KVM slots of one VF's BARs (cheap to clone: shared state).
#[derive(Debug, Clone)]
pub struct BarSlots {
    name: String,
    vm: Option<Arc<VmFd>>,
    pool: Arc<Mutex<SlotPool>>,
    state: Arc<Mutex<State>>,
}

impl BarSlots {
    /// Slots of the device `name` in `vm`, numbers from `pool`.
    pub fn new(name: String, vm: Arc<VmFd>, pool: Arc<Mutex<SlotPool>>) -> Self {
        BarSlots {
            name,
            vm: Some(vm),
            pool,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// Slots that never map anything (a VF with `mmap=off`: vfio-pause gets other hooks).
    pub fn disabled(name: &str) -> Self {
        BarSlots {
            name: name.into(),
            vm: None,
            pool: Arc::new(Mutex::new(SlotPool::new(0, 0))),
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// The guest moved a BAR or changed decoding: `bars` are the decoded (BAR, address).
    pub fn set_guest_bars(&self, bars: &[(usize, u64)]) {
        let mut s = lock(&self.state);
        let mut g = [None; NUM_BARS];
        for &(i, a) in bars {
            if i < NUM_BARS {
                g[i] = Some(a);
            }
        }
        if g != s.guest_bars {
            s.guest_bars = g;
            self.sync(&mut s);
        }
    }

    /// Number of KVM slots now mapped, and slots added so far.
    pub fn counts(&self) -> (usize, u64) {
        let s = lock(&self.state);
        (s.slots.len(), s.maps)
    }

    fn region(&self, slot: u32, (gpa, len, host): Mapping) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
        }
    }

    /// Makes the slots match the areas at the guest's BAR addresses: stale ones removed
    /// first, then the missing ones added.
    fn sync(&self, s: &mut State) {
        let Some(vm) = &self.vm else {
            return;
        };
        let want: Vec<Mapping> = s
            .areas
            .iter()
            .filter_map(|a| {
                let base = s.guest_bars.get(a.index as usize).copied().flatten()?;
                Some((
                    base.checked_add(a.offset)?,
                    a.len as u64,
                    a.host_addr as u64,
                ))
            })
            .collect();
        let stale: Vec<Mapping> = s
            .slots
            .keys()
            .filter(|m| !want.contains(m))
            .copied()
            .collect();
        for m in stale {
            let slot = s.slots.remove(&m).expect("listed above");
            let mut r = self.region(slot, m);
            r.memory_size = 0;
            // SAFETY: a zero-sized region deletes slot `slot`, which this struct added; no
            // host memory is handed to KVM.
            match unsafe { vm.set_user_memory_region(r) } {
                Ok(()) => lock(&self.pool).give(slot),
                Err(e) => tracing::warn!("{}: removing BAR slot {slot}: {e}", self.name),
            }
        }
        for m in want {
            if s.slots.contains_key(&m) {
                continue;
            }
            let Some(slot) = lock(&self.pool).take() else {
                tracing::warn!(
                    "{}: no free KVM slot for a BAR; it stays trapped",
                    self.name
                );
                continue;
            };
            // SAFETY: `m.2` is the start of an mmap of `m.1` bytes of the VF's BAR held by
            // vfio-pause; it calls unmap_bars (which removes this slot) before it munmaps it,
            // and removes every slot at detach (Drop), so KVM never keeps a slot over an
            // unmapped range.
            match unsafe { vm.set_user_memory_region(self.region(slot, m)) } {
                Ok(()) => {
                    s.slots.insert(m, slot);
                    s.maps += 1;
                }
                Err(e) => {
                    lock(&self.pool).give(slot);
                    tracing::warn!(
                        "{}: mapping {:#x}+{:#x} into the guest: {e}; it stays trapped",
                        self.name,
                        m.0,
                        m.1
                    );
                }
            }
        }
    }
}

impl VmmHooks for BarSlots {
    fn unmap_bars(&self, _device: &str) -> Result<(), String> {
        let mut s = lock(&self.state);
        s.areas.clear();
        self.sync(&mut s);
        if s.slots.is_empty() {
            Ok(())
        } else {
            Err(format!("{} KVM slots could not be removed", s.slots.len()))
        }
    }

    fn map_bars(&self, _device: &str, areas: &[MmapArea]) -> Result<(), String> {
        let mut s = lock(&self.state);
        s.areas = areas.to_vec();
        self.sync(&mut s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_pool_reuses_given_back_slots_and_stops_at_its_limit() {
        let mut p = SlotPool::new(3, 5);
        assert_eq!((p.take(), p.take(), p.take()), (Some(3), Some(4), None));
        p.give(3);
        assert_eq!(p.take(), Some(3));
    }
}
