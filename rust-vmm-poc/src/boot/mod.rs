//! Putting a guest's first instructions in place: 32-bit flat protected mode for the built-in
//! test guest and raw code images.

mod protected;

pub(crate) use protected::{enter_protected_mode, write_gdt};
#[allow(unused_imports)]
pub(crate) use protected::{CODE_SELECTOR, DATA_SELECTOR, GDT_ADDR};
pub use protected::{GUEST_LOAD_ADDR, GUEST_STACK_TOP};
