//! 32-bit flat protected mode, paging off, set up by the VMM through `KVM_SET_SREGS`.
//!
//! The VMM writes a GDT at [`GDT_ADDR`]: null, a flat 4 GiB code segment ([`CODE_SELECTOR`]),
//! a flat data segment ([`DATA_SELECTOR`]), and a TSS descriptor (the segment caches are
//! loaded directly, so the guest never needs to reload them, but it may).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::Error;

/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Selector of the flat code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the flat data segment.
pub const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;
/// Where guest code images (the test guest, raw code) are loaded and entered.
pub const GUEST_LOAD_ADDR: u64 = 0x10_0000;
/// Initial stack pointer of the boot CPU.
pub const GUEST_STACK_TOP: u64 = 0x9_0000;

const GDT: [u64; 4] = [
    0,
    0x00cf_9a00_0000_ffff, // code: base 0, limit 4 GiB, exec/read, 32-bit
    0x00cf_9200_0000_ffff, // data: base 0, limit 4 GiB, read/write, 32-bit
    0x0000_8b00_0000_0067, // TSS (busy), base 0, limit 0x67
];

/// Writes the GDT into guest memory.
pub(crate) fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|e| Error::Memory(format!("writing the GDT: {e}")))?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets `sregs`/`regs` for flat protected mode at `entry` with the stack at `stack`.
pub(crate) fn enter_protected_mode(
    sregs: &mut kvm_sregs,
    regs: &mut kvm_regs,
    entry: u64,
    stack: u64,
) {
    let code = segment(CODE_SELECTOR, 0xb, 1);
    let data = segment(DATA_SELECTOR, 0x3, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        db: 0,
        g: 0,
        ..segment(TSS_SELECTOR, 0xb, 0)
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x11; // PE | ET, paging off
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    *regs = kvm_regs {
        rip: entry,
        rsp: stack,
        rflags: 0x2,
        ..Default::default()
    };
}
