//! svff commands (to be written)
