//! PCI bus 0 behind configuration mechanism #1 (ports 0xCF8 address, 0xCFC..0xCFF data), with
//! BARs placed in an MMIO window and guest MMIO routed to the BAR that decodes it.

use vm_allocator::{AddressAllocator, AllocPolicy};

use super::config::{BarKind, NUM_BARS};
use super::device::{HostBridge, PciDevice};
use crate::error::Error;

/// The conf1 address port.
pub const CONF1_ADDRESS: u16 = 0xcf8;
/// The first conf1 data port.
pub const CONF1_DATA: u16 = 0xcfc;
const ENABLE: u32 = 1 << 31;

/// Device and function of a function on bus 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevFn(u8);

impl DevFn {
    /// Device 0..32, function 0..8.
    pub fn new(device: u8, function: u8) -> Option<DevFn> {
        (device < 32 && function < 8).then_some(DevFn((device << 3) | function))
    }
    /// The device number.
    pub fn device(self) -> u8 {
        self.0 >> 3
    }
    /// The function number.
    pub fn function(self) -> u8 {
        self.0 & 7
    }
}

impl std::fmt::Display for DevFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "00:{:02x}.{}", self.device(), self.function())
    }
}

struct Slot {
    devfn: DevFn,
    dev: Box<dyn PciDevice>,
    present: bool,
    ranges: Vec<vm_allocator::RangeInclusive>,
}

#[derive(Debug, Clone, Copy)]
struct Route {
    start: u64,
    end: u64, // exclusive
    slot: usize,
    bar: usize,
}

/// Bus 0.
pub struct PciBus {
    slots: Vec<Slot>,
    address: u32,
    mmio: AddressAllocator,
    routes: Vec<Route>,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field(
                "functions",
                &self
                    .slots
                    .iter()
                    .map(|s| format!("{} {}", s.devfn, s.dev.name()))
                    .collect::<Vec<_>>(),
            )
            .field("routes", &self.routes)
            .finish()
    }
}

impl PciBus {
    /// A bus with the host bridge at 00:00.0, placing BARs in `[window_start, window_end)`.
    pub fn new(window_start: u64, window_end: u64) -> Result<PciBus, Error> {
        let mmio = AddressAllocator::new(window_start, window_end - window_start).map_err(|e| {
            Error::Pci(format!(
                "MMIO window {window_start:#x}..{window_end:#x}: {e}"
            ))
        })?;
        let mut bus = PciBus {
            slots: Vec::new(),
            address: 0,
            mmio,
            routes: Vec::new(),
        };
        bus.add(DevFn(0), Box::new(HostBridge::default()))?;
        Ok(bus)
    }

    /// The first free function 0 of a device number, from 00:01.0 on.
    pub fn next_free_device(&self) -> Option<DevFn> {
        (1..32)
            .map(|d| DevFn((d << 3) as u8))
            .find(|df| !self.slots.iter().any(|s| s.devfn.device() == df.device()))
    }

    /// Adds `dev` at `devfn`, placing each of its BARs in the MMIO window (aligned to its
    /// size), as firmware would. Memory decoding stays off until the guest enables it.
    pub fn add(&mut self, devfn: DevFn, mut dev: Box<dyn PciDevice>) -> Result<(), Error> {
        if self.slots.iter().any(|s| s.devfn == devfn) {
            return Err(Error::Pci(format!("{devfn} is already taken")));
        }
        let mut idx = 0;
        let mut ranges = Vec::new();
        while idx < NUM_BARS {
            let Some(spec) = dev.config().bar(idx) else {
                idx += 1;
                continue;
            };
            let r = self
                .mmio
                .allocate(spec.size, spec.size, AllocPolicy::FirstMatch)
                .map_err(|e| {
                    Error::Pci(format!(
                        "no room for BAR{idx} ({:#x} bytes) of {devfn} {}: {e}",
                        spec.size,
                        dev.name()
                    ))
                })?;
            dev.config_mut().set_bar_address(idx, r.start());
            ranges.push(r);
            idx += if spec.kind == BarKind::Memory64 { 2 } else { 1 };
        }
        self.slots.push(Slot {
            devfn,
            dev,
            present: true,
            ranges,
        });
        self.slots.sort_by_key(|s| s.devfn);
        self.rebuild_routes();
        Ok(())
    }

    /// Removes the function at `devfn` (hot-unplug), freeing its BAR ranges; it reads
    /// all-ones from now on. Returns the device model.
    pub fn remove(&mut self, devfn: DevFn) -> Option<Box<dyn PciDevice>> {
        let i = self.slots.iter().position(|s| s.devfn == devfn)?;
        let s = self.slots.remove(i);
        for r in &s.ranges {
            if let Err(e) = self.mmio.free(r) {
                tracing::warn!("freeing BAR range of {devfn}: {e}");
            }
        }
        self.rebuild_routes();
        Some(s.dev)
    }

    /// Shows or hides a function: a hidden one reads all-ones in config space and decodes no
    /// BAR, as if it had been removed (used to test how a guest notices).
    pub fn set_present(&mut self, devfn: DevFn, present: bool) -> Result<(), Error> {
        let s = self
            .slots
            .iter_mut()
            .find(|s| s.devfn == devfn)
            .ok_or_else(|| Error::Pci(format!("no function at {devfn}")))?;
        s.present = present;
        self.rebuild_routes();
        Ok(())
    }

    fn rebuild_routes(&mut self) {
        self.routes.clear();
        for (i, s) in self.slots.iter().enumerate().filter(|(_, s)| s.present) {
            for (bar, addr, size) in s.dev.config().decoded_bars() {
                if let Some(end) = addr.checked_add(size) {
                    self.routes.push(Route {
                        start: addr,
                        end,
                        slot: i,
                        bar,
                    });
                }
            }
        }
    }

    fn slot_mut(&mut self, devfn: DevFn) -> Option<&mut Slot> {
        self.slots
            .iter_mut()
            .find(|s| s.devfn == devfn && s.present)
    }

    /// The function the address register selects, and the byte offset within config space of
    /// data port `port`. None: no cycle (enable bit clear, another bus).
    fn target(&self, port: u16) -> Option<(DevFn, usize)> {
        let a = self.address;
        if a & ENABLE == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        let devfn = DevFn(((a >> 8) & 0xff) as u8);
        Some((devfn, (a & 0xfc) as usize + usize::from(port - CONF1_DATA)))
    }

    /// A config read of the function at `devfn`, dword `offset` (all-ones when absent).
    pub fn config_read(&mut self, devfn: DevFn, offset: usize) -> u32 {
        match self.slot_mut(devfn) {
            Some(s) => s.dev.config_read(offset & 0xfc),
            None => u32::MAX,
        }
    }

    /// A config write to the function at `devfn`. BAR moves and decode changes take effect
    /// for the next MMIO access.
    pub fn config_write(&mut self, devfn: DevFn, offset: usize, data: &[u8]) {
        if let Some(s) = self.slot_mut(devfn) {
            s.dev.config_write(offset, data);
            self.rebuild_routes();
        }
    }

    /// A port read in 0xCF8..=0xCFF.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            CONF1_ADDRESS if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            CONF1_DATA..=0xcff => {
                if let Some((devfn, off)) = self.target(port) {
                    if off % 4 + data.len() <= 4 {
                        let v = self.config_read(devfn, off).to_le_bytes();
                        data.copy_from_slice(&v[off % 4..off % 4 + data.len()]);
                    }
                }
            }
            _ => {}
        }
    }

    /// A port write in 0xCF8..=0xCFF. Writes to the address register other than whole dwords
    /// are ignored (Linux's conf1 probe writes a byte to 0xCFB and expects that).
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        match (port, data) {
            (CONF1_ADDRESS, &[a, b, c, d]) => self.address = u32::from_le_bytes([a, b, c, d]),
            (CONF1_DATA..=0xcff, _) => {
                if let Some((devfn, off)) = self.target(port) {
                    if off % 4 + data.len() <= 4 {
                        self.config_write(devfn, off, data);
                    }
                }
            }
            _ => {}
        }
    }

    fn route(&self, addr: u64, len: usize) -> Option<Route> {
        self.routes
            .iter()
            .find(|r| addr >= r.start && addr + len as u64 <= r.end)
            .copied()
    }

    /// An MMIO read; false when no BAR decodes `addr` (the caller answers all-ones).
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        let Some(r) = self.route(addr, data.len()) else {
            return false;
        };
        self.slots[r.slot].dev.bar_read(r.bar, addr - r.start, data);
        true
    }

    /// An MMIO write; false when no BAR decodes `addr` (dropped).
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool {
        let Some(r) = self.route(addr, data.len()) else {
            return false;
        };
        self.slots[r.slot]
            .dev
            .bar_write(r.bar, addr - r.start, data);
        true
    }

    /// `(devfn, name)` of every function on the bus.
    pub fn functions(&self) -> Vec<(DevFn, String)> {
        self.slots.iter().map(|s| (s.devfn, s.dev.name())).collect()
    }
}
