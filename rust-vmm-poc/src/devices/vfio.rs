//! A VF passed through with vfio-pause: config space forwarded to the VF through
//! [`PausableDevice`] except the BARs and the expansion ROM, which this model shadows (sizes
//! from the VF's sysfs `resource` file, addresses as the guest programs them; never forwarded),
//! and BAR accesses that reach the VMM forwarded.
//!
//! Paused (QMP `svff-vfio-pause`), config space is served from vfio-pause's shadow and BAR
//! accesses follow the device's policy (all-ones, or the vCPU waits for the unpause).
//!
//! MSI-X: the VF's MSI-X table and PBA are emulated here ([`Msix`], never forwarded: the
//! kernel programs the real table with host vectors), and so are Enable and Function Mask of
//! its Message Control (reads merge them into the VF's value; writes are not forwarded).
//! When the guest enables MSI-X, every vector's eventfd is handed to vfio-pause
//! (`VFIO_DEVICE_SET_IRQS`, MSI-X index), which re-wires them at every unpause; each
//! unmasked vector has a KVM GSI route to the guest's message and an irqfd on that eventfd
//! (route first; on mask the irqfd goes first, then the route). The PBA reads the
//! model's pending bits (none for a VF: a masked vector's signals wait in its eventfd).
//!
//! BARs: vfio-pause mmaps their mappable areas (not the MSI-X table and PBA pages) and
//! [`BarSlots`] maps them into KVM slots at the guest's BAR addresses, following BAR moves
//! and decode changes; the slots go at pause (accesses then trap and get the policy) and
//! come back at unpause. `--vfio ...,mmap=off` traps every access instead.
//!
//! MSI: the VF's MSI capability is emulated here too ([`Msi`]: Enable, Multiple Message
//! Enable, address, data and mask bits are the model's; reads of the capability come from the
//! model, writes are not forwarded, as the kernel's vfio-pci virtualizes them anyway). When the
//! guest enables MSI, the eventfds of its enabled vectors go to vfio-pause (MSI index), which
//! re-wires them at every unpause; each enabled, unmasked vector has a GSI route to its message
//! (vector `i` of `n`: the data's low `log2 n` bits set to `i`) and an irqfd, with the same
//! ordering as MSI-X.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::{BarAccessStats, BarSlots};

use vfio_pause::{irq, Container, DeviceOptions, PausableDevice, PausePolicy, VfSource};

use crate::error::{io, Error};
use crate::pci::{
    reg, BarKind, BarSpec, ConfigSpace, Msi, MsiLayout, Msix, PciDevice, CAP_ID_MSI, CAP_ID_MSIX,
    MIN_BAR_SIZE, NUM_BARS,
};
use crate::vm::GsiRouter;

/// Where a VF's MSI-X capability puts things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    /// Config offset of the capability.
    pub cap: usize,
    /// Number of vectors.
    pub vectors: u16,
    /// BAR and offset of the table.
    pub table: (usize, u64),
    /// BAR and offset of the PBA.
    pub pba: (usize, u64),
}

impl MsixLayout {
    /// The layout from the capability's three dwords (ID/next/control, table, PBA).
    pub fn from_regs(cap: usize, header: u32, table: u32, pba: u32) -> Self {
        MsixLayout {
            cap,
            vectors: ((header >> 16) & 0x7ff) as u16 + 1,
            table: ((table & 7) as usize, u64::from(table & !7)),
            pba: ((pba & 7) as usize, u64::from(pba & !7)),
        }
    }

    fn table_len(&self) -> u64 {
        16 * u64::from(self.vectors)
    }

    fn pba_len(&self) -> u64 {
        8 * u64::from(self.vectors).div_ceil(64)
    }
}

/// Walks the capability list read through `read` (dword reads at aligned offsets) for the
/// capability `id`: its offset and first dword. The walk is bounded to 48 entries.
fn find_cap(read: &mut dyn FnMut(usize) -> u32, id: u8) -> Option<(usize, u32)> {
    if read(reg::COMMAND) & (1 << 20) == 0 {
        return None;
    }
    let mut at = (read(0x34) & 0xfc) as usize;
    for _ in 0..48 {
        if at < 0x40 {
            return None;
        }
        let h = read(at);
        if h as u8 == id {
            return Some((at, h));
        }
        at = ((h >> 8) & 0xfc) as usize;
    }
    None
}

/// Walks the capability list read through `read` (dword reads at aligned offsets) for
/// MSI-X. The walk is bounded to 48 entries.
pub fn find_msix(read: &mut dyn FnMut(usize) -> u32) -> Option<MsixLayout> {
    let (at, h) = find_cap(read, CAP_ID_MSIX)?;
    Some(MsixLayout::from_regs(at, h, read(at + 4), read(at + 8)))
}

/// Walks the capability list read through `read` for MSI: its layout and first dword.
pub fn find_msi(read: &mut dyn FnMut(usize) -> u32) -> Option<(MsiLayout, u32)> {
    let (at, h) = find_cap(read, CAP_ID_MSI)?;
    Some((MsiLayout::from_header(at, h), h))
}

const IORESOURCE_IO: u64 = 0x100;
const IORESOURCE_MEM: u64 = 0x200;
const IORESOURCE_PREFETCH: u64 = 0x2000;
const IORESOURCE_MEM_64: u64 = 0x10_0000;

/// Parses a sysfs `resource` file into the memory BARs it lists.
pub fn parse_resource(text: &str, what: &str) -> Result<Vec<(usize, BarSpec)>, Error> {
    let mut bars = Vec::new();
    for (i, line) in text.lines().take(NUM_BARS).enumerate() {
        let f: Vec<u64> = line
            .split_whitespace()
            .map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16))
            .collect::<Result<_, _>>()
            .map_err(|_| Error::Pci(format!("{what}: unparsable resource line {line:?}")))?;
        let [start, end, flags] = f[..] else {
            return Err(Error::Pci(format!("{what}: resource line {line:?}")));
        };
        if end == 0 || end < start {
            continue;
        }
        if flags & IORESOURCE_IO != 0 {
            return Err(Error::Pci(format!(
                "{what}: BAR{i} is an I/O BAR, which svff-vmm does not pass through"
            )));
        }
        if flags & IORESOURCE_MEM == 0 {
            continue;
        }
        let size = (end - start + 1).next_power_of_two().max(MIN_BAR_SIZE);
        bars.push((
            i,
            BarSpec {
                size,
                kind: if flags & IORESOURCE_MEM_64 != 0 {
                    BarKind::Memory64
                } else {
                    BarKind::Memory32
                },
                prefetchable: flags & IORESOURCE_PREFETCH != 0,
            },
        ));
    }
    Ok(bars)
}

/// A passed-through VF.
pub struct VfioPci {
    name: String,
    dev: Arc<PausableDevice>,
    shadow: ConfigSpace,
    msix: Option<(MsixLayout, Msix)>,
    msi: Option<Msi>,
    slots: BarSlots,
    trapped: Arc<BarAccessStats>,
}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci").field("name", &self.name).finish()
    }
}

fn shadowed(offset: usize) -> bool {
    (reg::BAR0..reg::BAR0 + 4 * NUM_BARS).contains(&offset)
        || (reg::ROM..reg::ROM + 4).contains(&offset)
}

impl VfioPci {
    /// Opens the VF of `source` (bound to vfio-pci; by its sysfs address or through a passed
    /// group fd) into `container`, under the VMM id `id`.
    pub fn open(
        container: Arc<Container>,
        source: VfSource,
        id: &str,
        policy: PausePolicy,
        router: Arc<Mutex<GsiRouter>>,
        slots: Option<BarSlots>,
        trapped: Arc<BarAccessStats>,
    ) -> Result<Self, Error> {
        let host = *source.address();
        let res = host.sysfs_path().join("resource");
        if !Path::new(&host.sysfs_path()).exists() {
            return Err(Error::Pci(format!("--vfio {host}: no such PCI function")));
        }
        let driver = std::fs::read_link(host.sysfs_path().join("driver"))
            .ok()
            .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()));
        if driver.as_deref() != Some("vfio-pci") {
            return Err(Error::Pci(format!(
                "--vfio {host}: bound to {}, not vfio-pci",
                driver.as_deref().unwrap_or("no driver")
            )));
        }
        let text =
            std::fs::read_to_string(&res).map_err(io(format!("reading {}", res.display())))?;
        let bars = parse_resource(&text, &format!("--vfio {host}"))?;
        let dev = PausableDevice::open(
            id,
            container,
            source,
            DeviceOptions {
                policy,
                mmap_bars: slots.is_some(),
                ..DeviceOptions::default()
            },
            match &slots {
                Some(s) => Arc::new(s.clone()) as Arc<dyn vfio_pause::VmmHooks>,
                None => Arc::new(vfio_pause::TrapAllBars),
            },
        )
        .map_err(|e| Error::Vfio {
            device: format!("{id} ({host})"),
            source: Box::new(e),
        })?;
        let ident = dev.identity();
        let mut shadow = ConfigSpace::new(ident.vendor, ident.device, ident.class, 0);
        for (i, spec) in bars {
            shadow.set_bar(i, spec);
        }
        let mut read = |off: usize| {
            let mut b = [0u8; 4];
            match dev.config_read(off as u64, &mut b) {
                Ok(()) => u32::from_le_bytes(b),
                Err(_) => 0,
            }
        };
        let msi = match find_msi(&mut read) {
            Some((l, header)) => Some(Msi::external(l, header, router.clone())?),
            None => None,
        };
        let msix = match find_msix(&mut read) {
            Some(l) if l.vectors <= 64 => Some((l, Msix::external(l.cap, l.vectors, router)?)),
            Some(l) => {
                tracing::warn!("{id}: {} MSI-X vectors, at most 64 are wired", l.vectors);
                None
            }
            None => None,
        };
        Ok(VfioPci {
            name: format!("vfio {id} ({host})"),
            dev: Arc::new(dev),
            shadow,
            msix,
            msi,
            slots: slots.unwrap_or_else(|| BarSlots::disabled(id)),
            trapped,
        })
    }

    fn guest_bars_changed(&self) {
        let bars: Vec<(usize, u64)> = self
            .shadow
            .decoded_bars()
            .into_iter()
            .map(|(i, a, _)| (i, a))
            .collect();
        self.slots.set_guest_bars(&bars);
    }

    /// The VF's MSI-X layout, if it has MSI-X.
    pub fn msix_layout(&self) -> Option<MsixLayout> {
        self.msix.as_ref().map(|(l, _)| *l)
    }

    /// A write reaching the Message Control word of the MSI-X capability: the model takes
    /// Enable and Function Mask, and an Enable change wires or unwires the VF's vectors.
    fn msix_control_write(&mut self, offset: usize, data: &[u8]) {
        let Some((l, m)) = &mut self.msix else {
            return;
        };
        let hi = l.cap + 3;
        let Some(&b) = hi.checked_sub(offset).and_then(|i| data.get(i)) else {
            return;
        };
        let was = m.enabled();
        let ctrl = u16::from(b) << 8;
        if ctrl & (1 << 15) != 0 && !was {
            // Eventfds to the VF first: the routes and irqfds follow in set_control.
            match m.eventfds() {
                Ok(fds) => {
                    if let Err(e) = self.dev.set_irqs(irq::MSIX, fds) {
                        tracing::warn!("{}: wiring MSI-X: {e}", self.name);
                    }
                }
                Err(e) => tracing::warn!("{}: {e}", self.name),
            }
        }
        m.set_control(ctrl);
        if ctrl & (1 << 15) == 0 && was {
            if let Err(e) = self.dev.set_irqs(irq::MSIX, Vec::new()) {
                tracing::warn!("{}: unwiring MSI-X: {e}", self.name);
            }
        }
    }

    /// A write inside the MSI capability: the model takes it; a change of the vectors in use
    /// wires (or unwires) the VF's MSI eventfds.
    fn msi_write(&mut self, offset: usize, data: &[u8]) {
        let Some(m) = &mut self.msi else {
            return;
        };
        let (dev, name) = (&self.dev, &self.name);
        m.write(offset, data, &mut |fds| {
            let n = fds.len();
            if let Err(e) = dev.set_irqs(irq::MSI, fds) {
                tracing::warn!("{name}: wiring {n} MSI vectors: {e}");
            }
        });
    }

    /// The VF's MSI layout, if it has MSI.
    pub fn msi_layout(&self) -> Option<MsiLayout> {
        self.msi.as_ref().map(Msi::layout)
    }

    fn msix_region(&self, bar: usize, offset: u64) -> Option<(bool, u64)> {
        let (l, _) = self.msix.as_ref()?;
        if bar == l.table.0 && (l.table.1..l.table.1 + l.table_len()).contains(&offset) {
            return Some((true, offset - l.table.1));
        }
        if bar == l.pba.0 && (l.pba.1..l.pba.1 + l.pba_len()).contains(&offset) {
            return Some((false, offset - l.pba.1));
        }
        None
    }

    /// The pausable device (QMP pauses and unpauses it without the bus lock).
    pub fn device(&self) -> Arc<PausableDevice> {
        self.dev.clone()
    }
}

impl PciDevice for VfioPci {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn config(&self) -> &ConfigSpace {
        &self.shadow
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.shadow
    }
    fn config_read(&mut self, offset: usize) -> u32 {
        if shadowed(offset) {
            return self.shadow.read(offset);
        }
        let mut b = [0u8; 4];
        let v = match self.dev.config_read(offset as u64, &mut b) {
            Ok(()) => u32::from_le_bytes(b),
            Err(e) => {
                tracing::debug!("{}: config read {offset:#x}: {e}", self.name);
                return u32::MAX;
            }
        };
        let v = match &self.msi {
            Some(m) => m.merge(offset, v),
            None => v,
        };
        match &self.msix {
            Some((l, m)) if l.cap == offset => {
                (v & !(0xc000 << 16)) | (u32::from(m.control_bits()) << 16)
            }
            _ => v,
        }
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if shadowed(offset) {
            self.shadow.write(offset, data);
            return self.guest_bars_changed();
        }
        if (reg::COMMAND..reg::COMMAND + 2).contains(&offset) {
            // The bus decodes BARs from the shadow's command register.
            self.shadow.write(offset, data);
            self.guest_bars_changed();
        }
        if self
            .msi
            .as_ref()
            .is_some_and(|m| m.layout().overlaps(offset, data.len()))
        {
            return self.msi_write(offset, data);
        }
        if let Some(cap) = self.msix.as_ref().map(|(l, _)| l.cap) {
            if offset < cap + 4 && offset + data.len() > cap {
                // The capability header is read-only; Message Control is the model's.
                return self.msix_control_write(offset, data);
            }
        }
        if let Err(e) = self.dev.config_write(offset as u64, data) {
            tracing::debug!("{}: config write {offset:#x}: {e}", self.name);
        }
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let Some((table, off)) = self.msix_region(bar, offset) {
            let m = &self.msix.as_ref().expect("msix_region found it").1;
            return if table {
                m.table_read(off, data)
            } else {
                m.pba_read(off, data)
            };
        }
        self.trapped.trapped.fetch_add(1, Ordering::Relaxed);
        // vfio-pause's bar_read, with the stall counted here (its counters do not tell
        // reads from writes).
        let mut stall = vfio_pause::Stall::default();
        let r = loop {
            match self.dev.try_bar_read(bar as u32, offset, data, &mut stall) {
                Ok(vfio_pause::Access::Retry) => self.dev.wait_unpaused(&stall),
                other => break other.map(drop),
            }
        };
        if stall.deadline().is_some() {
            self.trapped.stalled_reads.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = r {
            tracing::debug!("{}: BAR{bar} read {offset:#x}: {e}", self.name);
            data.fill(0xff);
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some((table, off)) = self.msix_region(bar, offset) {
            if table {
                self.msix
                    .as_mut()
                    .expect("msix_region found it")
                    .1
                    .table_write(off, data);
            }
            return;
        }
        self.trapped.trapped.fetch_add(1, Ordering::Relaxed);
        let mut stall = vfio_pause::Stall::default();
        let r = loop {
            match self.dev.try_bar_write(bar as u32, offset, data, &mut stall) {
                Ok(vfio_pause::Access::Retry) => self.dev.wait_unpaused(&stall),
                other => break other.map(drop),
            }
        };
        if stall.deadline().is_some() {
            self.trapped.stalled_writes.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = r {
            tracing::debug!("{}: BAR{bar} write {offset:#x}: {e}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_resource_of_an_igb_vf_gives_two_64_bit_memory_bars() {
        let text = "0x00000000fe800000 0x00000000fe803fff 0x0000000000140204\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x00000000fe880000 0x00000000fe883fff 0x0000000000140204\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
        let bars = parse_resource(text, "vf").unwrap();
        assert_eq!(bars.len(), 2);
        assert_eq!(bars[0].0, 0);
        assert_eq!(bars[1].0, 3);
        assert_eq!(bars[0].1.size, 0x4000);
        assert_eq!(bars[0].1.kind, BarKind::Memory64);
        assert!(!bars[0].1.prefetchable);
    }

    #[test]
    fn io_bars_and_garbage_are_refused() {
        assert!(parse_resource("0x1000 0x101f 0x40101\n", "vf").is_err());
        assert!(parse_resource("zz\n", "vf").is_err());
    }

    #[test]
    fn the_msix_capability_of_an_igb_vf_is_found_behind_msi_x_layout() {
        // As on the lab's igb VF: MSI-X at 0x70 (next: 0xa0), 3 vectors, table at BAR3+0,
        // PBA at BAR3+0x2000.
        let mut cfg = [0u32; 64];
        cfg[1] = 1 << 20;
        cfg[0x34 / 4] = 0x70;
        cfg[0x70 / 4] = 0x0002_a011;
        cfg[0x74 / 4] = 3;
        cfg[0x78 / 4] = 0x2003;
        cfg[0xa0 / 4] = 0x0000_0010;
        let l = find_msix(&mut |o| cfg[o / 4]).unwrap();
        assert_eq!(
            l,
            MsixLayout {
                cap: 0x70,
                vectors: 3,
                table: (3, 0),
                pba: (3, 0x2000)
            }
        );
        assert_eq!((l.table_len(), l.pba_len()), (48, 8));
        cfg[0x70 / 4] = 0x0000_a005;
        assert_eq!(find_msix(&mut |o| cfg[o / 4]), None, "MSI only");
        cfg[0x70 / 4] = 0x0000_7005;
        assert_eq!(find_msix(&mut |o| cfg[o / 4]), None, "a loop ends");
    }

    #[test]
    fn the_msi_capability_of_qemus_edu_device_is_found_with_its_layout() {
        // As QEMU's edu (1234:11e8): MSI at 0x40, the only capability, 64-bit, 1 vector.
        let mut cfg = [0u32; 64];
        cfg[1] = 1 << 20;
        cfg[0x34 / 4] = 0x40;
        cfg[0x40 / 4] = 0x0080_0005;
        let (l, header) = find_msi(&mut |o| cfg[o / 4]).unwrap();
        assert_eq!(header, 0x0080_0005);
        assert_eq!(
            (l.cap, l.vectors(), l.addr64, l.len()),
            (0x40, 1, true, 0x10)
        );
        assert_eq!(find_msix(&mut |o| cfg[o / 4]), None);
        cfg[1] = 0;
        assert!(
            find_msi(&mut |o| cfg[o / 4]).is_none(),
            "no capability list"
        );
    }

    #[test]
    fn bars_and_rom_are_shadowed_everything_else_forwarded() {
        assert!(shadowed(0x10) && shadowed(0x24) && shadowed(0x30));
        assert!(!shadowed(0x04) && !shadowed(0x28) && !shadowed(0x40));
    }
}
