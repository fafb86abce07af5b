//! Emulated devices and the port-I/O / MMIO dispatch that vCPU threads call on exits.

mod bar_slots;
mod legacy;
mod serial;
mod test_device;
mod vfio;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

pub use legacy::{
    CMOS_DATA, CMOS_INDEX, DEBUG_EXIT_PORT, I8042_COMMAND, I8042_DATA, I8042_RESET, POST_PORT,
};
pub use serial::{SerialPort, SerialSink, COM1_BASE, COM1_IRQ};
pub use test_device::{
    TestDevice, TEST_DEVICE_BAR0_SIZE, TEST_DEVICE_DEVICE, TEST_DEVICE_ID, TEST_DEVICE_VENDOR,
};

pub use bar_slots::{BarSlots, SlotPool};
pub use vfio::VfioPci;

use crate::pci::{DevFn, PciBus, CONF1_ADDRESS};
use crate::vm::ExitReason;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every device of a VM, shared by its vCPU threads.
#[derive(Debug)]
pub(crate) struct Devices {
    serial: Mutex<SerialPort>,
    pci: Mutex<PciBus>,
    vfio: Mutex<Vec<Arc<VfioEntry>>>,
    hotplug: Option<VfioFactory>,
}

/// What opening a VF at run time needs (the VM's container, GSI router, slots).
#[derive(Debug, Clone)]
pub(crate) struct VfioFactory {
    pub(crate) container: Arc<vfio_pause::Container>,
    pub(crate) router: Arc<Mutex<crate::vm::GsiRouter>>,
    pub(crate) slot_pool: Arc<Mutex<SlotPool>>,
    pub(crate) vm: Arc<kvm_ioctls::VmFd>,
}

impl VfioFactory {
    /// Opens the VF of `spec` from `source` for guest address `df`.
    pub(crate) fn open(
        &self,
        spec: &crate::vm::VfioSpec,
        source: vfio_pause::VfSource,
        df: DevFn,
    ) -> Result<(Arc<VfioEntry>, Box<dyn crate::pci::PciDevice>), crate::Error> {
        let slots = BarSlots::new(
            format!("vfio {}", spec.id),
            self.vm.clone(),
            self.slot_pool.clone(),
        );
        let trapped = Arc::new(BarAccessStats::default());
        let dev = VfioPci::open(
            self.container.clone(),
            source,
            &spec.id,
            spec.policy,
            self.router.clone(),
            spec.mmap.then(|| slots.clone()),
            trapped.clone(),
        )?;
        let entry = Arc::new(VfioEntry {
            id: spec.id.clone(),
            guest: df,
            policy: Mutex::new(spec.policy),
            dev: dev.device(),
            pauses: Default::default(),
            slots,
            trapped,
        });
        Ok((entry, Box::new(dev)))
    }
}

/// A passed-through VF as QMP sees it.
#[derive(Debug)]
pub(crate) struct VfioEntry {
    /// The VMM id.
    pub(crate) id: String,
    /// Its address on the guest's bus 0.
    pub(crate) guest: DevFn,
    /// The policy of the current or last pause (at first: the one it was opened with).
    pub(crate) policy: Mutex<vfio_pause::PausePolicy>,
    /// The device.
    pub(crate) dev: Arc<vfio_pause::PausableDevice>,
    /// Completed pauses.
    pub(crate) pauses: std::sync::atomic::AtomicU64,
    /// Its BARs' KVM slots.
    pub(crate) slots: BarSlots,
    /// BAR accesses that reached the VMM (trapped) outside the MSI-X table and PBA, and
    /// how many of them were held by a `stall` pause.
    pub(crate) trapped: Arc<BarAccessStats>,
}

/// Counts of a VF's BAR accesses that reached the VMM.
#[derive(Debug, Default)]
pub struct BarAccessStats {
    /// Trapped accesses outside the MSI-X table and PBA.
    pub trapped: std::sync::atomic::AtomicU64,
    /// Reads that waited for an unpause (policy `stall`).
    pub stalled_reads: std::sync::atomic::AtomicU64,
    /// Writes that waited for an unpause (policy `stall`).
    pub stalled_writes: std::sync::atomic::AtomicU64,
}

impl Devices {
    pub(crate) fn new(
        serial: SerialPort,
        pci: PciBus,
        vfio: Vec<Arc<VfioEntry>>,
        hotplug: Option<VfioFactory>,
    ) -> Self {
        Devices {
            serial: Mutex::new(serial),
            pci: Mutex::new(pci),
            vfio: Mutex::new(vfio),
            hotplug,
        }
    }

    /// The passed-through VFs.
    pub(crate) fn vfio(&self) -> Vec<Arc<VfioEntry>> {
        lock(&self.vfio).clone()
    }

    /// See [`crate::VmHandle::vfio_del`].
    pub(crate) fn vfio_del(&self, id: &str) -> Result<(), crate::Error> {
        let entry = {
            let mut v = lock(&self.vfio);
            let i = v
                .iter()
                .position(|e| e.id == id)
                .ok_or_else(|| crate::Error::Config(format!("no VFIO device '{id}'")))?;
            v.remove(i)
        };
        // Detach first (BAR slots removed, IRQs disabled, fds closed), then the function
        // leaves the bus; dropping the model drops its MSI-X routes and irqfds.
        if let Err(e) = entry.dev.detach() {
            tracing::warn!("device_del {id}: {e}");
        }
        let removed = self.pci().remove(entry.guest);
        drop(removed);
        Ok(())
    }

    /// See [`crate::VmHandle::vfio_add`].
    pub(crate) fn vfio_add(
        &self,
        spec: &crate::vm::VfioSpec,
        source: vfio_pause::VfSource,
    ) -> Result<DevFn, crate::Error> {
        let f = self.hotplug.as_ref().ok_or_else(|| {
            crate::Error::Config(
                "device_add of vfio-pci needs a VMM started with at least one --vfio \
                 (its VFIO container holds the guest RAM mappings)"
                    .into(),
            )
        })?;
        let mut v = lock(&self.vfio);
        if v.iter().any(|e| e.id == spec.id) {
            return Err(crate::Error::Config(format!(
                "a VFIO device with id '{}' exists",
                spec.id
            )));
        }
        let df = self
            .pci()
            .next_free_device()
            .ok_or_else(|| crate::Error::Config(format!("no free PCI slot for {}", spec.id)))?;
        let (entry, dev) = f.open(spec, source, df)?;
        self.pci().add(df, dev)?;
        v.push(entry);
        Ok(df)
    }

    /// The PCI bus (QMP and tests reach devices through it).
    pub(crate) fn pci(&self) -> MutexGuard<'_, PciBus> {
        lock(&self.pci)
    }

    /// `in` from `port`: fills `data`. Unclaimed ports read all-ones, as on a PC.
    pub(crate) fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) && data.len() == 1 => {
                data[0] = lock(&self.serial).read((p - COM1_BASE) as u8);
            }
            CONF1_ADDRESS..=0xcff => lock(&self.pci).pio_read(port, data),
            I8042_DATA | I8042_COMMAND | POST_PORT | CMOS_INDEX | CMOS_DATA => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    /// `out` to `port`. Returns the exit the write asks for, if any.
    pub(crate) fn pio_write(&self, port: u16, data: &[u8]) -> Option<ExitReason> {
        match (port, data) {
            (p, [v]) if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                lock(&self.serial).write((p - COM1_BASE) as u8, *v);
                None
            }
            (CONF1_ADDRESS..=0xcff, _) => {
                lock(&self.pci).pio_write(port, data);
                None
            }
            (I8042_COMMAND, [I8042_RESET]) => Some(ExitReason::GuestReset),
            (DEBUG_EXIT_PORT, [code, ..]) => Some(ExitReason::DebugExit(*code)),
            _ => None,
        }
    }

    /// MMIO read at guest-physical `addr` that no memory slot covers: the BAR that decodes
    /// it, else all-ones (as an unclaimed PCI read).
    pub(crate) fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !lock(&self.pci).mmio_read(addr, data) {
            data.fill(0xff);
        }
    }

    /// MMIO write outside every slot: to the BAR that decodes it, else dropped.
    pub(crate) fn mmio_write(&self, addr: u64, data: &[u8]) {
        lock(&self.pci).mmio_write(addr, data);
    }

    /// Flushes the serial sink (at exit).
    pub(crate) fn flush(&self) {
        lock(&self.serial).flush();
    }
}
