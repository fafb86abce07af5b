//! Putting a guest's first instructions in place: 32-bit flat protected mode for the built-in
//! test guest and raw code images, 64-bit long mode for Linux (with an MP table).

mod linux;
mod mptable;
mod protected;

pub(crate) use linux::{enter_long_mode, load as load_linux};
pub use linux::{LinuxBoot, DEFAULT_CMDLINE};
pub(crate) use mptable::write as write_mptable;
pub(crate) use protected::{enter_protected_mode, write_gdt};
#[allow(unused_imports)]
pub(crate) use protected::{CODE_SELECTOR, DATA_SELECTOR, GDT_ADDR};
pub use protected::{GUEST_LOAD_ADDR, GUEST_STACK_TOP};
