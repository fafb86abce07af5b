//! Linux direct boot (64-bit boot protocol): the bzImage loaded by linux-loader, the zero page
//! with e820 and the command line, an initramfs at the top of low RAM, identity-mapped page
//! tables for the first 4 GiB, and the boot CPU in long mode at the kernel's 64-bit entry.

use std::fs::File;
use std::path::PathBuf;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{io, Error};
use crate::vm::memory::{ram_ranges, HIGH_RAM_START};

/// Where the zero page goes.
const ZERO_PAGE: u64 = 0x7000;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000; // 4 pages: 0xb000..0xf000
const CMDLINE: u64 = 0x2_0000;
const CMDLINE_MAX: usize = 4096;
const EBDA_START: u64 = 0x9_fc00;
const HIMEM: u64 = 0x10_0000;
const LINUX_GDT: u64 = 0x500;
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;
const E820_RAM: u32 = 1;

/// The default command line: serial console, reboot through the i8042 (which ends the VM),
/// PCI over conf1 and no ACPI (the VMM describes CPUs and the IOAPIC with an MP table).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=conf1 acpi=off";

/// A Linux guest.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

/// Where the boot CPU starts.
#[derive(Debug, Clone, Copy)]
pub struct LinuxEntry {
    rip: u64,
}

fn mem_err(what: &str) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error + '_ {
    move |e| Error::Memory(format!("{what}: {e}"))
}

fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    mem.write_obj(PDPT | 3, GuestAddress(PML4))
        .map_err(mem_err("PML4"))?;
    for i in 0..4u64 {
        mem.write_obj((PD + i * 0x1000) | 3, GuestAddress(PDPT + i * 8))
            .map_err(mem_err("PDPT"))?;
    }
    for i in 0..2048u64 {
        // 2 MiB pages: present, writable, large
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))
            .map_err(mem_err("page directory"))?;
    }
    let gdt: [u64; 5] = [
        0,
        0,
        0x00af_9b00_0000_ffff, // 0x10: 64-bit code
        0x00cf_9300_0000_ffff, // 0x18: data
        0x0000_8b00_0000_0067, // 0x20: TSS (busy)
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(LINUX_GDT + 8 * i as u64))
            .map_err(mem_err("GDT"))?;
    }
    Ok(())
}

fn e820(mem_size: u64) -> Vec<boot_e820_entry> {
    let mut v = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    for (start, len) in ram_ranges(mem_size) {
        let (s, l) = if start == 0 {
            (HIMEM, len.saturating_sub(HIMEM))
        } else {
            (start, len)
        };
        if l > 0 {
            v.push(boot_e820_entry {
                addr: s,
                size: l,
                r#type: E820_RAM,
            });
        }
    }
    v
}

/// Loads kernel, initrd, command line, zero page and page tables into `mem`.
pub(crate) fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    boot: &LinuxBoot,
) -> Result<LinuxEntry, Error> {
    let mut kf = File::open(&boot.kernel)
        .map_err(io(format!("opening kernel {}", boot.kernel.display())))?;
    let loaded = BzImage::load(mem, None, &mut kf, Some(GuestAddress(HIMEM))).map_err(|e| {
        Error::Boot(format!(
            "loading kernel {} as a bzImage: {e}",
            boot.kernel.display()
        ))
    })?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| Error::Boot(format!("kernel {}: no setup header", boot.kernel.display())))?;

    let mut cmdline =
        Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Boot(format!("command line: {e}")))?;
    cmdline
        .insert_str(&boot.cmdline)
        .map_err(|e| Error::Boot(format!("command line {:?}: {e}", boot.cmdline)))?;
    load_cmdline(mem, GuestAddress(CMDLINE), &cmdline)
        .map_err(|e| Error::Boot(format!("writing the command line: {e}")))?;

    hdr.type_of_loader = 0xff;
    hdr.boot_flag = 0xaa55;
    hdr.loadflags |= 0x80; // CAN_USE_HEAP
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.cmdline_size = (boot.cmdline.len() + 1) as u32;

    if let Some(initrd) = &boot.initrd {
        let data =
            std::fs::read(initrd).map_err(io(format!("reading initrd {}", initrd.display())))?;
        let low_end = mem_size.min(crate::vm::memory::LOW_RAM_END);
        let max = u64::from(hdr.initrd_addr_max).min(low_end - 1);
        let addr = (max + 1)
            .checked_sub(data.len() as u64)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= loaded.kernel_load.raw_value() + loaded.kernel_end)
            .ok_or_else(|| Error::ImageTooLarge {
                what: "initrd",
                path: initrd.clone(),
                size: data.len() as u64,
                memory: mem_size,
            })?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(mem_err("writing the initrd"))?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = data.len() as u32;
    }

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let map = e820(mem_size);
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i] = *e;
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| Error::Boot(format!("writing the zero page: {e}")))?;
    write_page_tables(mem)?;
    debug_assert!(mem_size <= HIGH_RAM_START || !map.is_empty());
    Ok(LinuxEntry {
        rip: loaded.kernel_load.raw_value() + 0x200,
    })
}

fn seg(selector: u16, type_: u8, l: u8, db: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode at the 64-bit entry, `rsi` = zero page.
pub(crate) fn enter_long_mode(entry: LinuxEntry, sregs: &mut kvm_sregs, regs: &mut kvm_regs) {
    let code = seg(BOOT_CS, 0xb, 1, 0, 1);
    let data = seg(BOOT_DS, 0x3, 0, 1, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        g: 0,
        ..seg(BOOT_TSS, 0xb, 0, 0, 0)
    };
    sregs.gdt.base = LINUX_GDT;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LME | LMA
    *regs = kvm_regs {
        rip: entry.rip,
        rsi: ZERO_PAGE,
        rsp: 0x8ff0,
        rflags: 0x2,
        ..Default::default()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_leaves_the_bios_area_and_the_mmio_window_out() {
        let m = e820(4 << 30);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].addr, m[0].size), (0, EBDA_START));
        assert_eq!((m[1].addr, m[1].addr + m[1].size), (HIMEM, 0xc000_0000));
        assert_eq!((m[2].addr, m[2].size), (1 << 32, 1 << 30));
    }
}
