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

/// `err` and every error below it, `: `-separated (a QMP answer then carries the errno).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut at = err.source();
    for _ in 0..16 {
        let Some(e) = at else { break };
        let m = e.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        at = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("VF 0000:01:10.6: open /dev/vfio/12 failed")]
    struct Open(#[source] std::io::Error);

    #[test]
    fn an_error_chain_carries_the_errno_once() {
        let open = Open(std::io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(
            error_chain(&open),
            "VF 0000:01:10.6: open /dev/vfio/12 failed: Permission denied (os error 13)"
        );
        // Messages that already end with their source's text are not repeated.
        let e = io("reading resource")(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            error_chain(&e),
            "reading resource: No such file or directory (os error 2)"
        );
    }
}
