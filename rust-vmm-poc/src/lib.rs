//! `svff-vmm`: a KVM VMM on rust-vmm crates, the second host of svff's pausable VFIO devices
//! (beside QEMU) and a bench for VFIO pause latency.
//!
//! Built so far: the VM ([`Vm`]: guest RAM from vm-memory, the in-kernel irqchip and PIT,
//! 1..n vCPU threads with race-free pause and exit), a 16550 serial port from vm-superio on
//! COM1 with IRQ 4 through an irqfd, and exits by triple fault, i8042 reset or a debug port.
//!
//! ```no_run
//! use svff_vmm::{GuestImage, SerialOutput, Vm, VmConfig, ExitReason};
//! // mov dx, 0x501; mov al, 3; out dx, al
//! let code = vec![0x66, 0xba, 0x01, 0x05, 0xb0, 0x03, 0xee];
//! let vm = Vm::new(VmConfig { guest: GuestImage::Raw(code), serial: SerialOutput::Null, ..Default::default() })?;
//! assert_eq!(vm.run()?, ExitReason::DebugExit(3));
//! # Ok::<(), svff_vmm::Error>(())
//! ```

mod boot;
mod devices;
mod error;
mod guest;
mod pci;
mod qmp;
mod vm;

pub use boot::{LinuxBoot, DEFAULT_CMDLINE, GUEST_LOAD_ADDR, GUEST_STACK_TOP};
pub use devices::{
    BarAccessStats, SerialSink, TestDevice, VfioPci, COM1_BASE, DEBUG_EXIT_PORT,
    TEST_DEVICE_BAR0_SIZE, TEST_DEVICE_DEVICE, TEST_DEVICE_ID, TEST_DEVICE_VENDOR,
};
pub use error::{error_chain, Error};
pub use guest::{GuestMode, TestGuest};
pub use pci::{
    reg as pci_reg, BarKind, BarSpec, ConfigSpace, DevFn, HostBridge, PciBus, PciDevice,
    CAP_ID_MSI, CAP_ID_MSIX, COMMAND_MASTER, COMMAND_MEMORY, CONF1_ADDRESS, CONF1_DATA,
    HOST_BRIDGE_DEVICE, HOST_BRIDGE_VENDOR, MIN_BAR_SIZE, NUM_BARS,
};
pub use qmp::{parse_devfn, QmpHandler, Start, StartGate, START_TIMEOUT};
pub use svff_types::{parse_counters, GuestCounters};
pub use vm::memory::{check_ram_size, MMIO_WINDOW_END, MMIO_WINDOW_START};
pub use vm::{
    ExitReason, GuestImage, RunState, SerialOutput, VfioSpec, Vm, VmConfig, VmHandle, MAX_CPUS,
};
