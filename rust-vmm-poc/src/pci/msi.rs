//! An emulated MSI capability for a function whose capability lives elsewhere (a VF's config
//! space): the model keeps every register the guest can write (Message Control's Enable and
//! Multiple Message Enable, Message Address, Message Data, Mask Bits), and each enabled,
//! unmasked vector gets a KVM GSI route to its message and an irqfd on its eventfd. The
//! eventfds are handed to the device (VFIO's MSI index) when the guest enables MSI.
//!
//! Multiple messages: with Multiple Message Enable at `log2 n`, vector `i` of `n` sends the
//! guest's Message Data with its low `log2 n` bits replaced by `i` (PCI Local Bus 3.0,
//! 6.8.1.6). Extended Message Data is not offered (its capable bit reads 0). Pending Bits
//! read 0: a masked vector's signals wait in its eventfd (its irqfd is deassigned while
//! masked) and are delivered when it is unmasked.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::lock;
use crate::error::{io, Error};
use crate::vm::GsiRouter;

/// Capability ID of MSI.
pub const CAP_ID_MSI: u8 = 0x05;

const CTRL_ENABLE: u16 = 1;
const CTRL_64BIT: u16 = 1 << 7;
const CTRL_PER_VECTOR_MASK: u16 = 1 << 8;

/// The shape of an MSI capability, from its header dword.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiLayout {
    /// Config offset of the capability.
    pub cap: usize,
    /// Multiple Message Capable: the function supports `1 << mmc` vectors (0..=5).
    pub mmc: u8,
    /// 64-bit Message Address.
    pub addr64: bool,
    /// Per-vector masking (Mask Bits and Pending Bits registers).
    pub per_vector_mask: bool,
}

impl MsiLayout {
    /// The layout of the capability at `cap` whose first dword (ID, next, Message Control)
    /// is `header`.
    pub fn from_header(cap: usize, header: u32) -> Self {
        let ctrl = (header >> 16) as u16;
        MsiLayout {
            cap,
            mmc: (((ctrl >> 1) & 7) as u8).min(5),
            addr64: ctrl & CTRL_64BIT != 0,
            per_vector_mask: ctrl & CTRL_PER_VECTOR_MASK != 0,
        }
    }

    /// Vectors the function supports.
    pub fn vectors(&self) -> usize {
        1 << self.mmc
    }

    /// Offset of Message Data from the capability start.
    fn data(&self) -> usize {
        if self.addr64 {
            0x0c
        } else {
            0x08
        }
    }

    /// Offset of Mask Bits (when per-vector masking is supported).
    fn mask(&self) -> usize {
        self.data() + 4
    }

    /// Bytes of config space the capability covers, rounded up to whole dwords.
    pub fn len(&self) -> usize {
        if self.per_vector_mask {
            self.mask() + 8
        } else {
            self.data() + 4
        }
    }

    /// Whether config `offset..offset + n` overlaps the capability.
    pub fn overlaps(&self, offset: usize, n: usize) -> bool {
        offset < self.cap + self.len() && offset + n > self.cap
    }

    /// Write mask of capability byte `i`.
    fn wmask(&self, i: usize) -> u8 {
        let mask_bits: u32 = if self.vectors() == 32 {
            u32::MAX
        } else {
            (1 << self.vectors()) - 1
        };
        match i {
            2 => 0x71, // Enable, Multiple Message Enable
            4 => 0xfc, // Message Address is dword aligned
            5..=7 => 0xff,
            8..=11 if self.addr64 => 0xff,
            d if d == self.data() || d == self.data() + 1 => 0xff,
            m if self.per_vector_mask && (self.mask()..self.mask() + 4).contains(&m) => {
                (mask_bits >> (8 * (m - self.mask()))) as u8
            }
            _ => 0,
        }
    }
}

/// The guest-visible registers of an MSI capability, with their write masks (no routing;
/// [`Msi`] routes from them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsiRegs {
    layout: MsiLayout,
    bytes: [u8; 0x18],
}

impl MsiRegs {
    /// Registers as after reset, for a capability whose first dword reads `header`: ID and
    /// next pointer as given, Message Control's read-only bits as given (Extended Message
    /// Data Capable cleared), everything writable 0.
    pub fn new(layout: MsiLayout, header: u32) -> Self {
        let mut bytes = [0u8; 0x18];
        let ctrl = ((header >> 16) as u16) & (0xe | CTRL_64BIT | CTRL_PER_VECTOR_MASK);
        bytes[..2].copy_from_slice(&header.to_le_bytes()[..2]);
        bytes[2..4].copy_from_slice(&ctrl.to_le_bytes());
        MsiRegs { layout, bytes }
    }

    /// The layout.
    pub fn layout(&self) -> MsiLayout {
        self.layout
    }

    /// `dword` (a config read of the dword at `offset`, from the device) with the bytes the
    /// capability covers replaced by the model's.
    pub fn merge(&self, offset: usize, dword: u32) -> u32 {
        let mut b = dword.to_le_bytes();
        for (i, byte) in b.iter_mut().enumerate() {
            if let Some(r) = (offset + i)
                .checked_sub(self.layout.cap)
                .filter(|&r| r < self.layout.len())
            {
                *byte = self.bytes[r];
            }
        }
        u32::from_le_bytes(b)
    }

    /// A config write of `data` at `offset`: bytes inside the capability are taken under their
    /// write masks, bytes outside ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            if let Some(r) = (offset + i)
                .checked_sub(self.layout.cap)
                .filter(|&r| r < self.layout.len())
            {
                let m = self.layout.wmask(r);
                self.bytes[r] = (self.bytes[r] & !m) | (v & m);
            }
        }
    }

    fn u16_at(&self, r: usize) -> u16 {
        u16::from_le_bytes([self.bytes[r], self.bytes[r + 1]])
    }

    fn u32_at(&self, r: usize) -> u32 {
        u32::from_le_bytes(self.bytes[r..r + 4].try_into().expect("4 bytes"))
    }

    /// Whether the guest enabled MSI.
    pub fn enabled(&self) -> bool {
        self.u16_at(2) & CTRL_ENABLE != 0
    }

    /// Vectors enabled: `1 << Multiple Message Enable`, at most what the function supports.
    pub fn enabled_vectors(&self) -> usize {
        1 << ((self.u16_at(2) >> 4) & 7).min(u16::from(self.layout.mmc))
    }

    /// The message of vector `v` (address, data) if it can be delivered now: MSI enabled,
    /// `v` among the enabled vectors, not masked.
    pub fn message(&self, v: usize) -> Option<(u64, u32)> {
        let n = self.enabled_vectors();
        if !self.enabled() || v >= n {
            return None;
        }
        if self.layout.per_vector_mask && self.u32_at(self.layout.mask()) & (1 << v) != 0 {
            return None;
        }
        let hi = if self.layout.addr64 {
            u64::from(self.u32_at(8))
        } else {
            0
        };
        let addr = u64::from(self.u32_at(4)) | (hi << 32);
        let data = u32::from(self.u16_at(self.layout.data()));
        Some((addr, (data & !(n as u32 - 1)) | v as u32))
    }
}

/// The MSI state of a function: its registers, and one GSI and eventfd per vector it supports.
#[derive(Debug)]
pub struct Msi {
    regs: MsiRegs,
    router: Arc<Mutex<GsiRouter>>,
    vectors: Vec<(u32, EventFd)>,
    /// Vectors handed to the device (0: MSI off on the device).
    wired: usize,
}

impl Msi {
    /// MSI for the capability at `layout.cap` whose first dword reads `header`.
    pub fn external(
        layout: MsiLayout,
        header: u32,
        router: Arc<Mutex<GsiRouter>>,
    ) -> Result<Msi, Error> {
        let mut vectors = Vec::new();
        for i in 0..layout.vectors() {
            let gsi = lock(&router).allocate_gsi()?;
            let evt =
                EventFd::new(EFD_NONBLOCK).map_err(io(format!("eventfd for MSI vector {i}")))?;
            vectors.push((gsi, evt));
        }
        Ok(Msi {
            regs: MsiRegs::new(layout, header),
            router,
            vectors,
            wired: 0,
        })
    }

    /// The layout.
    pub fn layout(&self) -> MsiLayout {
        self.regs.layout()
    }

    /// See [`MsiRegs::merge`].
    pub fn merge(&self, offset: usize, dword: u32) -> u32 {
        self.regs.merge(offset, dword)
    }

    /// A guest config write inside the capability. When the number of vectors the device
    /// must signal changes (MSI enabled or disabled, or Multiple Message Enable changed while
    /// enabled), `wire` gets the eventfds of the vectors now enabled (empty: MSI off), before
    /// the routes of newly enabled vectors go in and after the routes of disabled ones went.
    pub fn write(&mut self, offset: usize, data: &[u8], wire: &mut dyn FnMut(Vec<EventFd>)) {
        self.regs.write(offset, data);
        let want = if self.regs.enabled() {
            self.regs.enabled_vectors()
        } else {
            0
        };
        if want == self.wired {
            return self.route();
        }
        if want < self.wired {
            self.route();
        }
        let fds = self.vectors[..want]
            .iter()
            .map(|(_, e)| e.try_clone())
            .collect::<Result<Vec<_>, _>>();
        match fds {
            Ok(fds) => wire(fds),
            Err(e) => tracing::warn!("duplicating an MSI eventfd: {e}"),
        }
        self.wired = want;
        self.route();
    }

    /// Every vector's route and irqfd brought in line with the registers: a deliverable
    /// vector is routed to its message (route first, then irqfd), any other loses its irqfd,
    /// then its route.
    fn route(&mut self) {
        for (v, (gsi, evt)) in self.vectors.iter().enumerate() {
            let r = match self.regs.message(v) {
                Some((addr, data)) => lock(&self.router).set_msi(*gsi, addr, data, evt),
                None => lock(&self.router).clear_msi(*gsi, evt),
            };
            if let Err(e) = r {
                tracing::warn!("MSI vector {v}: {e}");
            }
        }
    }
}

impl Drop for Msi {
    /// A removed device leaves no irqfd or route behind.
    fn drop(&mut self) {
        for (gsi, evt) in &self.vectors {
            if let Err(e) = lock(&self.router).clear_msi(*gsi, evt) {
                tracing::warn!("MSI GSI {gsi} at removal: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // As QEMU's edu device: MSI at 0x40, 1 vector, 64-bit, no per-vector masking.
    const EDU: u32 = 0x0080_0005;
    // 8 vectors (MMC 3), 32-bit, per-vector masking, Extended Message Data Capable.
    const MULTI: u32 = 0x0306_5005;

    fn w32(r: &mut MsiRegs, off: usize, v: u32) {
        r.write(off, &v.to_le_bytes());
    }

    #[test]
    fn edu_layout_is_64_bit_single_vector_without_masking_14_bytes_rounded_to_16() {
        let l = MsiLayout::from_header(0x40, EDU);
        assert_eq!(
            l,
            MsiLayout {
                cap: 0x40,
                mmc: 0,
                addr64: true,
                per_vector_mask: false
            }
        );
        assert_eq!((l.vectors(), l.len()), (1, 0x10));
        assert!(l.overlaps(0x4c, 4) && !l.overlaps(0x50, 4) && !l.overlaps(0x3c, 4));
        let m = MsiLayout::from_header(0x50, MULTI);
        assert_eq!((m.vectors(), m.addr64, m.per_vector_mask), (8, false, true));
        assert_eq!(m.len(), 0x14);
    }

    #[test]
    fn a_64_bit_message_is_delivered_only_once_enabled() {
        let mut r = MsiRegs::new(MsiLayout::from_header(0x40, EDU), EDU);
        w32(&mut r, 0x44, 0xfee0_1003); // bits 1:0 are reserved
        w32(&mut r, 0x48, 0x1);
        w32(&mut r, 0x4c, 0xdead_0041); // only 16 bits of data
        assert_eq!(r.message(0), None, "not enabled yet");
        r.write(0x42, &[0x01]);
        assert_eq!(r.message(0), Some((0x1_fee0_1000, 0x41)));
        assert_eq!(r.message(1), None, "one vector");
        assert_eq!(
            r.merge(0x40, 0xffff_ffff),
            0x0081_0005,
            "ID, next, control: the model's"
        );
        assert_eq!(r.merge(0x4c, 0), 0x41);
        assert_eq!(r.merge(0x50, 0x1234), 0x1234, "beyond the capability");
    }

    #[test]
    fn read_only_bits_of_message_control_keep_their_value() {
        let mut r = MsiRegs::new(MsiLayout::from_header(0x50, MULTI), MULTI);
        assert_eq!(
            r.merge(0x50, 0) >> 16,
            0x0106,
            "Extended Message Data Capable hidden"
        );
        r.write(0x52, &[0xff, 0xff]);
        assert_eq!(r.merge(0x50, 0) >> 16, 0x0177, "Enable and MME only");
        assert_eq!(r.enabled_vectors(), 8, "MME 7 is clamped to MMC 3");
    }

    #[test]
    fn multiple_messages_carry_the_vector_in_the_low_data_bits_and_masks_hold_them() {
        let mut r = MsiRegs::new(MsiLayout::from_header(0x50, MULTI), MULTI);
        w32(&mut r, 0x54, 0xfee0_0000);
        w32(&mut r, 0x58, 0x0043); // data; 4 vectors take its low 2 bits
        r.write(0x52, &[0x21]); // MME = 2 (4 vectors), Enable
        assert_eq!(r.enabled_vectors(), 4);
        assert_eq!(r.message(0), Some((0xfee0_0000, 0x40)));
        assert_eq!(r.message(3), Some((0xfee0_0000, 0x43)));
        assert_eq!(r.message(4), None);
        w32(&mut r, 0x5c, 0xffff_ff02); // mask vector 1; bits of absent vectors stay 0
        assert_eq!(r.merge(0x5c, 0), 0x02);
        assert_eq!(r.message(1), None);
        assert!(r.message(2).is_some());
        w32(&mut r, 0x60, u32::MAX);
        assert_eq!(r.merge(0x60, 0x55), 0, "pending bits are read-only 0");
        r.write(0x52, &[0x20]);
        assert_eq!(r.message(0), None, "disabled");
    }
}
