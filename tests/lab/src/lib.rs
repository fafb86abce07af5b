//! The svff lab: an emulated SR-IOV host (L1) under QEMU, on the real Linux kernel.
//!
//! L1 is a QEMU TCG guest with an intel-iommu, an igb PF (7 VFs with its driver, 8 with
//! `pci-pf-stub`), an emulated nvme PF (64 VFs with `pci-pf-stub`) and QEMU's `edu`, an
//! MSI-only function ([`guest::edu`]). Its root file system is
//! L0's own root, read-only over 9p, so L1 runs the binaries just built at the same paths. An
//! agent in L1 runs commands as root on request over a virtio-serial port and streams their
//! output back ([`proto`]).
//!
//! ```no_run
//! use std::time::Duration;
//! let cfg = svff_lab::LabConfig::detect()?;
//! let mut lab = svff_lab::Lab::boot(&cfg)?; // ~10-20 s; share it between checks
//! let out = lab.run(&["cat", "/sys/bus/pci/devices/0000:02:00.0/sriov_totalvfs"], Duration::from_secs(30))?;
//! assert!(out.success());
//! # Ok::<(), svff_lab::LabError>(())
//! ```
//!
//! Tests that run inside L1 use [`guest`]; the `svff-lab test` command boots one L1 and runs
//! every `lab_*` test binary of the workspace in it. Tests that need a guest to see a device
//! start an L2 VM inside L1 with [`l2`] (nested KVM; stock QEMU today, other VMMs through
//! [`l2::Vmm`]).
//!
//! L1 runs with one vCPU under single-threaded TCG by default ([`TcgThread`], [`DEFAULT_CPUS`];
//! `SVFF_LAB_CPUS`, `SVFF_LAB_TCG_THREAD` change it): with two vCPUs an L2 guest needs more than
//! 150 s to reach its init, and multi-threaded TCG loses LAPIC timer interrupts now and then.
//! Whatever the configuration, a stalled L1 is detected by per-CPU heartbeats of its agent (with
//! one vCPU: by the silence of all of them) and killed ([`LabError::Stalled`]).

mod agent;
mod config;
mod cpio;
mod error;
pub mod guest;
mod initramfs;
pub mod l2;
pub mod proto;
mod session;
mod signals;

pub use agent::serve as serve_agent;
pub use config::{LabConfig, TcgThread, DEFAULT_CPUS, INSTALL_HINT, L1_MEMORY_MIB};
pub use error::LabError;
pub use initramfs::{ensure_initramfs, resolve_modules, ROOT_MODULES};
pub use session::{shell, Lab, Output, NS_IMAGE_BYTES};
pub use signals::{await_signal_cleanup, exit_cleanly_on_signals};
