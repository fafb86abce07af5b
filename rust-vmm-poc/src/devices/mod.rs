//! Emulated devices and the port-I/O / MMIO dispatch that vCPU threads call on exits.

mod legacy;
mod serial;

use std::sync::{Mutex, MutexGuard, PoisonError};

pub use legacy::{DEBUG_EXIT_PORT, I8042_COMMAND, I8042_DATA, I8042_RESET, POST_PORT};
pub use serial::{SerialPort, SerialSink, COM1_BASE, COM1_IRQ};

use crate::vm::ExitReason;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every device of a VM, shared by its vCPU threads.
#[derive(Debug)]
pub(crate) struct Devices {
    serial: Mutex<SerialPort>,
}

impl Devices {
    pub(crate) fn new(serial: SerialPort) -> Self {
        Devices {
            serial: Mutex::new(serial),
        }
    }

    /// `in` from `port`: fills `data`. Unclaimed ports read all-ones, as on a PC.
    pub(crate) fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) && data.len() == 1 => {
                data[0] = lock(&self.serial).read((p - COM1_BASE) as u8);
            }
            I8042_DATA | I8042_COMMAND | POST_PORT => data.fill(0),
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
            (I8042_COMMAND, [I8042_RESET]) => Some(ExitReason::GuestReset),
            (DEBUG_EXIT_PORT, [code, ..]) => Some(ExitReason::DebugExit(*code)),
            _ => None,
        }
    }

    /// MMIO read at guest-physical `addr` that no memory slot covers: all-ones.
    pub(crate) fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// MMIO write outside every slot: dropped.
    pub(crate) fn mmio_write(&self, _addr: u64, _data: &[u8]) {}

    /// Flushes the serial sink (at exit).
    pub(crate) fn flush(&self) {
        lock(&self.serial).flush();
    }
}
