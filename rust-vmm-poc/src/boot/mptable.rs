//! An Intel MultiProcessor Specification 1.4 table, so that Linux without ACPI finds its CPUs,
//! the IOAPIC and the ISA interrupt wiring: one processor entry per vCPU (APIC ID = index,
//! vCPU 0 the BSP), bus 0 PCI and bus 1 ISA, the in-kernel IOAPIC (ID = number of vCPUs) at
//! 0xFEC00000, ISA IRQ n on IOAPIC pin n (the in-kernel irqchip's default routing), LINT0 as
//! ExtINT and LINT1 as NMI on every LAPIC.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::Error;

/// Where the floating pointer and table are written (the BIOS area Linux scans).
pub const MPTABLE_ADDR: u64 = 0xf_0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const BUS_PCI: u8 = 0;
const BUS_ISA: u8 = 1;

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)))
}

/// The floating pointer (16 bytes) followed by the configuration table, for `cpus` vCPUs,
/// as placed at `base`.
pub fn build(cpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        entries.extend([0, id, 0x14, flags]);
        entries.extend(0x0000_0600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend(0x0000_0201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend([0; 8]);
        count += 1;
    }
    for (id, name) in [(BUS_PCI, b"PCI   "), (BUS_ISA, b"ISA   ")] {
        entries.extend([1, id]);
        entries.extend(name);
        count += 1;
    }
    entries.extend([2, ioapic_id, 0x11, 1]);
    entries.extend(IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..16u8 {
        // type 3 (I/O interrupt), INT, conforming polarity/trigger, ISA irq -> IOAPIC pin
        entries.extend([3, 0, 0, 0, BUS_ISA, irq, ioapic_id, irq]);
        count += 1;
    }
    // type 4 (local interrupt): ExtINT on LINT0, NMI on LINT1, all LAPICs
    entries.extend([4, 3, 0, 0, BUS_ISA, 0, 0xff, 0]);
    entries.extend([4, 1, 0, 0, BUS_ISA, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut table = Vec::new();
    table.extend(b"PCMP");
    table.extend(((44 + entries.len()) as u16).to_le_bytes());
    table.extend([4, 0]); // spec 1.4, checksum later
    table.extend(b"SVFF    ");
    table.extend(b"SVFF-VMM    ");
    table.extend(0u32.to_le_bytes()); // OEM table
    table.extend(0u16.to_le_bytes());
    table.extend(count.to_le_bytes());
    table.extend(LAPIC_ADDR.to_le_bytes());
    table.extend(0u16.to_le_bytes()); // extended table
    table.extend([0, 0]);
    table.extend(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::new();
    fp.extend(b"_MP_");
    fp.extend((table_addr as u32).to_le_bytes());
    fp.extend([1, 4, 0, 0, 0, 0, 0, 0]); // 1 x 16 bytes, spec 1.4, checksum, features
    fp[10] = checksum(&fp);
    fp.extend(table);
    fp
}

/// Writes the MP table for `cpus` vCPUs at [`MPTABLE_ADDR`].
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), Error> {
    mem.write_slice(&build(cpus, MPTABLE_ADDR), GuestAddress(MPTABLE_ADDR))
        .map_err(|e| Error::Memory(format!("writing the MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floating_pointer_and_table_checksum_to_zero_and_point_at_each_other() {
        let b = build(4, MPTABLE_ADDR);
        assert_eq!(&b[..4], b"_MP_");
        assert_eq!(b[..16].iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
        let ptr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_ADDR + 16);
        let t = &b[16..];
        assert_eq!(&t[..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        assert_eq!(t.iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
        // 4 CPUs + 2 buses + IOAPIC + 16 IRQs + 2 local
        assert_eq!(u16::from_le_bytes([t[34], t[35]]), 25);
        assert_eq!(len, 44 + 4 * 20 + 21 * 8);
    }

    #[test]
    fn only_vcpu_0_is_the_boot_processor() {
        let b = build(2, MPTABLE_ADDR);
        let e = &b[16 + 44..];
        assert_eq!((e[0], e[1], e[3]), (0, 0, 3));
        assert_eq!((e[20], e[21], e[23]), (0, 1, 1));
    }
}
