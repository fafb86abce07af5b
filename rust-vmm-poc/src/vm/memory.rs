//! Guest RAM: where it lies in the guest-physical address space, and its KVM memory slots.
//!
//! Layout (the same for the test guest and Linux):
//!
//! | guest-physical range            | what |
//! |---------------------------------|------|
//! | `0` .. `min(ram, 3 GiB)`        | low RAM |
//! | `0xC000_0000` .. `0xFEC0_0000`  | PCI MMIO window for 32-bit BARs (never RAM) |
//! | `0xFEC0_0000`                   | IOAPIC (in-kernel) |
//! | `0xFEE0_0000`                   | local APICs (in-kernel) |
//! | `4 GiB` .. `4 GiB + rest`       | high RAM, when there is more than 3 GiB |

use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{kvm, Error};

/// The RAM below the PCI hole ends here at the latest.
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// The PCI MMIO window for BARs: `[MMIO_WINDOW_START, MMIO_WINDOW_END)`.
pub const MMIO_WINDOW_START: u64 = LOW_RAM_END;
/// End (exclusive) of the MMIO window, where the IOAPIC page begins.
pub const MMIO_WINDOW_END: u64 = 0xFEC0_0000;
/// RAM beyond [`LOW_RAM_END`] continues here.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// Smallest guest RAM accepted (the test guest and its stack live in the first MiB).
pub const MIN_RAM: u64 = 2 << 20;
/// Largest guest RAM accepted.
pub const MAX_RAM: u64 = 64 << 30;

/// The guest-physical ranges `(start, len)` of `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(LOW_RAM_END);
    let mut v = vec![(0, low)];
    if size > low {
        v.push((HIGH_RAM_START, size - low));
    }
    v
}

/// Checks a RAM size: within bounds and a whole number of 4 KiB pages.
pub fn check_ram_size(size: u64) -> Result<(), Error> {
    if !(MIN_RAM..=MAX_RAM).contains(&size) {
        return Err(Error::Config(format!(
            "guest RAM of {size} bytes is outside {MIN_RAM}..={MAX_RAM}"
        )));
    }
    if size % 4096 != 0 {
        return Err(Error::Config(format!(
            "guest RAM of {size} bytes is not a multiple of 4 KiB"
        )));
    }
    Ok(())
}

/// Allocates guest RAM (anonymous private mappings, one per range).
pub fn create(size: u64) -> Result<GuestMemoryMmap, Error> {
    check_ram_size(size)?;
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestMemoryMmap::<()>::from_ranges(&ranges)
        .map_err(|e| Error::Memory(format!("allocating {size} bytes: {e}")))
}

/// Registers every region of `mem` as a KVM memory slot, slots 0, 1, ... Returns the slot count.
///
/// `mem` must outlive `vm` (the caller drops the VM first).
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<u32, Error> {
    let mut slots = 0;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(format!("host address of a RAM region: {e}")))?;
        let desc = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of `region.len()` bytes mapped by `mem`; the caller keeps
        // `mem` alive until after the VM fd is closed (documented contract, upheld by `Vm`'s
        // field order), so KVM never sees the mapping go away under a live slot.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(kvm(format!("register RAM slot {slot}")))?;
        slots += 1;
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_up_to_3_gib_is_one_low_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(LOW_RAM_END), vec![(0, LOW_RAM_END)]);
    }

    #[test]
    fn ram_above_3_gib_continues_at_4_gib_leaving_the_mmio_window_free() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, LOW_RAM_END), (HIGH_RAM_START, 1 << 30)]);
        for (s, l) in r {
            assert!(s + l <= MMIO_WINDOW_START || s >= MMIO_WINDOW_END);
        }
    }

    #[test]
    fn ram_sizes_out_of_bounds_or_unaligned_are_refused() {
        assert!(check_ram_size(1 << 20).is_err());
        assert!(check_ram_size((256 << 20) + 1).is_err());
        assert!(check_ram_size(MAX_RAM + 4096).is_err());
        assert!(check_ram_size(256 << 20).is_ok());
    }
}
