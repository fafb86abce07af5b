//! The 16550 UART on COM1 (ports 0x3F8..0x3FF, IRQ 4), from vm-superio, with its interrupt
//! delivered by a KVM irqfd.

use std::io::Write;

use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Its ISA IRQ (GSI 4 on the in-kernel PIC and IOAPIC).
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt by signalling the eventfd that KVM listens on (an irqfd).
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What the guest writes to its serial port goes to this sink.
pub type SerialSink = Box<dyn Write + Send>;

/// COM1: the emulated UART.
pub struct SerialPort {
    uart: Serial<IrqTrigger, NoEvents, SerialSink>,
}

impl std::fmt::Debug for SerialPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort").finish_non_exhaustive()
    }
}

impl SerialPort {
    /// A UART writing to `out` and raising its IRQ through `irq`.
    pub fn new(irq: EventFd, out: SerialSink) -> Self {
        SerialPort {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Port read at `offset` (0..8) from [`COM1_BASE`].
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Port write at `offset`. A sink that fails (closed file, full disk) loses output; the
    /// guest is not stopped for it.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!("serial write at offset {offset}: {e:?}");
        }
    }

    /// Flushes the sink.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}
