//! The one error type of svff-vmm.

use std::path::PathBuf;

/// Everything that can go wrong while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The KVM device node could not be opened (missing, no permission, KVM not loaded).
    #[error("cannot open the KVM device {}: {source} (is KVM available here? `modprobe kvm-amd` or `kvm-intel`, and read/write access to the node)", path.display())]
    KvmOpen {
        /// The device node tried.
        path: PathBuf,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A KVM ioctl failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// Which call, and on what (VM, vCPU n).
        what: String,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A configuration value is out of range or inconsistent.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// A guest image (kernel, initrd) does not fit in guest RAM.
    #[error("{what} {} ({size} bytes) does not fit in the guest RAM ({memory} bytes)", path.display())]
    ImageTooLarge {
        /// "kernel" or "initrd".
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The guest RAM.
        memory: u64,
    },
    /// A host I/O operation (files, threads, eventfds) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file or object.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A guest kernel could not be loaded (not a bzImage, bad command line, ...).
    #[error("boot: {0}")]
    Boot(String),
    /// The PCI layer could not place or add a device.
    #[error("PCI: {0}")]
    Pci(String),
    /// vfio-pause refused or failed an operation on a passed-through VF.
    #[error("VFIO device {device}: {source}")]
    Vfio {
        /// The VMM id and host address.
        device: String,
        /// vfio-pause's error (boxed: it is large).
        #[source]
        source: Box<vfio_pause::Error>,
    },
    /// The QMP socket could not be set up.
    #[error("QMP socket {}: {source}", path.display())]
    Qmp {
        /// The socket path.
        path: PathBuf,
        /// The server error.
        #[source]
        source: qmp_ext::Error,
    },
    /// vCPUs did not stop in time (pause or shutdown).
    #[error("{0}")]
    Timeout(String),
    /// A feature reserved in the command line that this build does not implement yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
}

/// Maps a KVM error with a description of the call.
pub(crate) fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    let what = what.into();
    move |source| Error::Kvm { what, source }
}

/// Maps an I/O error with a description.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}
