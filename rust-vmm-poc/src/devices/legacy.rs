//! The few legacy ports a guest needs besides the UART: the i8042's reset line, a debug exit
//! port, and the POST code port.

/// i8042 data port (reads 0: no data).
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port: writing 0xFE pulses the CPU reset line.
pub const I8042_COMMAND: u16 = 0x64;
/// The i8042 command that resets the machine.
pub const I8042_RESET: u8 = 0xfe;
/// Debug exit port: a byte written here ends the VM with that byte as exit code (like QEMU's
/// `isa-debug-exit` at its usual 0x501, but the code is passed as written).
pub const DEBUG_EXIT_PORT: u16 = 0x501;
/// CMOS/RTC index and data ports: read as 0 (no RTC; an all-ones read would look like an
/// update in progress forever to Linux's rtc-cmos probe).
pub const CMOS_INDEX: u16 = 0x70;
/// See [`CMOS_INDEX`].
pub const CMOS_DATA: u16 = 0x71;
/// POST codes (and Linux's I/O delay port): writes ignored.
pub const POST_PORT: u16 = 0x80;
