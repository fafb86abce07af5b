//! A type-0 PCI configuration space: 256 bytes of registers with per-bit write masks, and the
//! BAR sizing protocol (a BAR's low address bits read back as zero, so writing all-ones and
//! reading back gives `!(size - 1)` plus the type bits).

/// Register offsets of the type-0 header.
pub mod reg {
    /// Vendor ID (16 bits) and Device ID (16 bits).
    pub const ID: usize = 0x00;
    /// Command (16 bits) and Status (16 bits).
    pub const COMMAND: usize = 0x04;
    /// Revision ID (8 bits) and Class Code (24 bits).
    pub const CLASS: usize = 0x08;
    /// Cache line size, latency timer, header type, BIST.
    pub const HEADER: usize = 0x0c;
    /// First BAR.
    pub const BAR0: usize = 0x10;
    /// Expansion ROM BAR.
    pub const ROM: usize = 0x30;
    /// Capabilities pointer.
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt line (8 bits) and pin (8 bits).
    pub const INTERRUPT: usize = 0x3c;
}

/// Command register: memory space decoding enabled.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: I/O space decoding enabled.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: bus master.
pub const COMMAND_MASTER: u16 = 1 << 2;
/// Command register: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;
/// Smallest BAR placed (so every BAR can later be a whole KVM memory slot).
pub const MIN_BAR_SIZE: u64 = 4096;

/// The kind of a memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR: one register.
    Memory32,
    /// 64-bit memory BAR: this register and the next.
    Memory64,
}

/// What a BAR is: its size (a power of two, at least [`MIN_BAR_SIZE`]), kind and
/// prefetchability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    /// Size in bytes.
    pub size: u64,
    /// 32 or 64 bits.
    pub kind: BarKind,
    /// The prefetchable bit.
    pub prefetchable: bool,
}

impl BarSpec {
    /// The type bits (3:0) of the low register.
    fn flags(&self) -> u32 {
        let mut f = 0;
        if self.kind == BarKind::Memory64 {
            f |= 0b100;
        }
        if self.prefetchable {
            f |= 0b1000;
        }
        f
    }
}

/// A configuration space.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    regs: [u32; 64],
    wmask: [u32; 64],
    bars: [Option<BarSpec>; NUM_BARS],
}

impl ConfigSpace {
    /// A type-0 header with these identities; `class` is the 24-bit class code
    /// (class, subclass, programming interface). Writable: command, cache line size, latency
    /// timer, interrupt line, and BARs once [`set_bar`](Self::set_bar) adds them.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut regs = [0u32; 64];
        let mut wmask = [0u32; 64];
        regs[reg::ID / 4] = u32::from(vendor) | (u32::from(device) << 16);
        regs[reg::CLASS / 4] = ((class & 0x00ff_ffff) << 8) | u32::from(revision);
        wmask[reg::COMMAND / 4] = u32::from(
            COMMAND_IO
                | COMMAND_MEMORY
                | COMMAND_MASTER
                | COMMAND_INTX_DISABLE
                | (1 << 6)
                | (1 << 8),
        );
        wmask[reg::HEADER / 4] = 0x0000_ffff;
        wmask[reg::INTERRUPT / 4] = 0x0000_00ff;
        ConfigSpace {
            regs,
            wmask,
            bars: [None; NUM_BARS],
        }
    }

    /// Marks the function as part of a multi-function device (header type bit 7).
    pub fn set_multifunction(&mut self) {
        self.regs[reg::HEADER / 4] |= 0x80 << 16;
    }

    /// Sets the interrupt pin (1 = INTA#, ... 4 = INTD#; 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        let r = &mut self.regs[reg::INTERRUPT / 4];
        *r = (*r & !0xff00) | (u32::from(pin) << 8);
    }

    /// Declares BAR `idx` (a 64-bit BAR also takes `idx + 1`). Panics on a size that is not a
    /// power of two of at least [`MIN_BAR_SIZE`] or an index out of range: device models
    /// declare fixed BARs.
    pub fn set_bar(&mut self, idx: usize, spec: BarSpec) {
        assert!(spec.size.is_power_of_two() && spec.size >= MIN_BAR_SIZE);
        let wide = spec.kind == BarKind::Memory64;
        assert!(idx < NUM_BARS && (!wide || idx + 1 < NUM_BARS));
        assert!(wide || spec.size <= 1 << 31);
        let mask = !(spec.size - 1);
        let r = reg::BAR0 / 4 + idx;
        self.regs[r] = spec.flags();
        self.wmask[r] = (mask as u32) & 0xffff_fff0;
        if wide {
            self.regs[r + 1] = 0;
            self.wmask[r + 1] = (mask >> 32) as u32;
        }
        self.bars[idx] = Some(spec);
    }

    /// The spec of BAR `idx`, if it was declared there.
    pub fn bar(&self, idx: usize) -> Option<BarSpec> {
        self.bars.get(idx).copied().flatten()
    }

    /// The address BAR `idx` holds now (whatever the guest wrote).
    pub fn bar_address(&self, idx: usize) -> Option<u64> {
        let spec = self.bar(idx)?;
        let r = reg::BAR0 / 4 + idx;
        let lo = u64::from(self.regs[r] & 0xffff_fff0);
        let hi = match spec.kind {
            BarKind::Memory64 => u64::from(self.regs[r + 1]) << 32,
            BarKind::Memory32 => 0,
        };
        Some(hi | lo)
    }

    /// Programs BAR `idx` with `addr` (as firmware does), keeping only the writable bits.
    pub fn set_bar_address(&mut self, idx: usize, addr: u64) {
        if let Some(spec) = self.bar(idx) {
            let r = reg::BAR0 / 4 + idx;
            self.regs[r] = ((addr as u32) & self.wmask[r]) | spec.flags();
            if spec.kind == BarKind::Memory64 {
                self.regs[r + 1] = ((addr >> 32) as u32) & self.wmask[r + 1];
            }
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[reg::COMMAND / 4] as u16
    }

    /// Memory BARs the function decodes now: `(bar, address, size)` for each declared BAR,
    /// when memory space is enabled in the command register.
    pub fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
        if self.command() & COMMAND_MEMORY == 0 {
            return Vec::new();
        }
        (0..NUM_BARS)
            .filter_map(|i| Some((i, self.bar_address(i)?, self.bar(i)?.size)))
            .collect()
    }

    /// The 32-bit register at `offset & !3` (offsets beyond 255 read all-ones).
    pub fn read(&self, offset: usize) -> u32 {
        self.regs.get(offset / 4).copied().unwrap_or(u32::MAX)
    }

    /// Writes `data` at byte `offset`, honouring the write masks (read-only bits keep their
    /// value; bytes beyond the header are dropped).
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let off = offset + i;
            let Some(r) = self.regs.get_mut(off / 4) else {
                return;
            };
            let shift = (off % 4) * 8;
            let m = (self.wmask[off / 4] >> shift) & 0xff;
            *r = (*r & !(m << shift)) | ((u32::from(b) & m) << shift);
        }
    }

    /// Links a capability at config offset `cap` into the capability list (sets the Status
    /// register's Capabilities List bit). Its first byte must be written as its ID afterwards;
    /// its next pointer is left 0.
    pub fn add_capability_list(&mut self, cap: usize) {
        assert!((0x40..0x100).contains(&cap) && cap % 4 == 0);
        self.regs[reg::COMMAND / 4] |= 1 << 20;
        let mut at = reg::CAP_PTR;
        for _ in 0..48 {
            let next = ((self.regs[at / 4] >> ((at % 4) * 8)) & 0xfc) as usize;
            if next == 0 {
                break;
            }
            at = next + 1;
        }
        let shift = (at % 4) * 8;
        self.regs[at / 4] = (self.regs[at / 4] & !(0xff << shift)) | ((cap as u32) << shift);
    }

    /// Sets a register and its write mask directly (device models use this for their own
    /// registers, e.g. capabilities).
    pub fn init_reg(&mut self, offset: usize, value: u32, wmask: u32) {
        self.regs[offset / 4] = value;
        self.wmask[offset / 4] = wmask;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar32(size: u64) -> BarSpec {
        BarSpec {
            size,
            kind: BarKind::Memory32,
            prefetchable: false,
        }
    }

    #[test]
    fn writing_all_ones_to_a_32_bit_bar_reads_back_its_size_mask_and_flags() {
        let mut c = ConfigSpace::new(0x1234, 0x5678, 0xff_0000, 1);
        c.set_bar(0, bar32(0x4000));
        c.write(reg::BAR0, &[0xff; 4]);
        assert_eq!(c.read(reg::BAR0), 0xffff_c000);
        c.set_bar(
            1,
            BarSpec {
                prefetchable: true,
                ..bar32(0x1000)
            },
        );
        c.write(reg::BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.read(reg::BAR0 + 4), 0xffff_f008);
    }

    #[test]
    fn a_64_bit_bar_sizes_over_both_registers_and_holds_a_64_bit_address() {
        let mut c = ConfigSpace::new(0x1234, 0x5678, 0xff_0000, 1);
        c.set_bar(
            2,
            BarSpec {
                size: 8 << 30,
                kind: BarKind::Memory64,
                prefetchable: true,
            },
        );
        c.write(reg::BAR0 + 8, &[0xff; 4]);
        c.write(reg::BAR0 + 12, &[0xff; 4]);
        assert_eq!(c.read(reg::BAR0 + 8), 0x0000_000c);
        assert_eq!(c.read(reg::BAR0 + 12), 0xffff_fffe);
        c.set_bar_address(2, 0x8_0000_0000);
        assert_eq!(c.bar_address(2), Some(0x8_0000_0000));
    }

    #[test]
    fn undeclared_bars_and_identity_registers_ignore_writes() {
        let mut c = ConfigSpace::new(0x1234, 0x5678, 0xff_0000, 1);
        c.write(reg::BAR0 + 20, &[0xff; 4]);
        assert_eq!(c.read(reg::BAR0 + 20), 0);
        c.write(reg::ID, &[0; 4]);
        assert_eq!(c.read(reg::ID), 0x5678_1234);
        c.write(reg::CLASS, &[0; 4]);
        assert_eq!(c.read(reg::CLASS), 0xff00_0001);
    }

    #[test]
    fn byte_writes_reach_only_their_byte() {
        let mut c = ConfigSpace::new(0x1234, 0x5678, 0xff_0000, 1);
        c.write(reg::INTERRUPT, &[0x0b]);
        c.set_interrupt_pin(1);
        assert_eq!(c.read(reg::INTERRUPT), 0x0000_010b);
        c.write(reg::COMMAND, &[0x02]);
        assert_eq!(c.command(), COMMAND_MEMORY);
    }

    #[test]
    fn bars_decode_only_with_memory_space_enabled() {
        let mut c = ConfigSpace::new(0x1234, 0x5678, 0xff_0000, 1);
        c.set_bar(0, bar32(0x1000));
        c.set_bar_address(0, 0xc000_0000);
        assert!(c.decoded_bars().is_empty());
        c.write(reg::COMMAND, &[0x02, 0]);
        assert_eq!(c.decoded_bars(), vec![(0, 0xc000_0000, 0x1000)]);
    }
}
