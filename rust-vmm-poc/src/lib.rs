//! A minimal KVM VMM on rust-vmm crates: the base that svff's pausable VFIO passthrough and QMP
//! socket are built on. This first module runs a real-mode guest on KVM, with guest memory from
//! `vm-memory` and port I/O exits collected for the VMM.
//!
//! ```no_run
//! let mut vm = rust_vmm_poc::MiniVm::new(1 << 20)?;
//! // mov al, 'A'; out 0x3f8, al ... ; hlt
//! vm.load_real_mode(0x1000, &[0xb0, b'A', 0xe6, 0xf8, 0xf4])?;
//! let exits = vm.run_until_halt(1000)?;
//! # Ok::<(), rust_vmm_poc::VmmError>(())
//! ```

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Errors of the minimal VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A KVM ioctl failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest did something this VMM does not handle.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// The guest did not halt within the exit budget.
    #[error("guest did not halt within {0} exits")]
    NoHalt(usize),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// A port I/O access by the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortIo {
    /// `out`: port and bytes written.
    Out(u16, Vec<u8>),
    /// `in`: port and size (the VMM answered with all-ones).
    In(u16, usize),
}

/// One VM with one vCPU and flat guest memory at guest physical address 0.
#[derive(Debug)]
pub struct MiniVm {
    // Field order matters for drop: vCPU before VM before memory.
    vcpu: VcpuFd,
    _vm: VmFd,
    mem: GuestMemoryMmap,
}

impl MiniVm {
    /// Creates the VM with `mem_size` bytes of RAM registered with KVM.
    pub fn new(mem_size: usize) -> Result<Self, VmmError> {
        let kvm_sys = Kvm::new().map_err(kvm("open /dev/kvm"))?;
        let vm = kvm_sys.create_vm().map_err(kvm("create VM"))?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size)])
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            let desc = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` points to `region.len()` bytes mapped by `mem`, which this struct owns
            // and drops only after the VM (field order), so the mapping outlives KVM's use of it.
            unsafe { vm.set_user_memory_region(desc) }.map_err(kvm("set user memory region"))?;
        }
        let vcpu = vm.create_vcpu(0).map_err(kvm("create vCPU"))?;
        Ok(MiniVm { vcpu, _vm: vm, mem })
    }

    /// Copies `code` to `addr` and points the vCPU at it in real mode (CS base 0, IP = addr).
    pub fn load_real_mode(&mut self, addr: u64, code: &[u8]) -> Result<(), VmmError> {
        self.mem
            .write_slice(code, GuestAddress(addr))
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        let mut sregs = self.vcpu.get_sregs().map_err(kvm("get sregs"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        self.vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;
        let mut regs = self.vcpu.get_regs().map_err(kvm("get regs"))?;
        regs.rip = addr;
        regs.rflags = 2;
        self.vcpu.set_regs(&regs).map_err(kvm("set regs"))?;
        Ok(())
    }

    /// Runs the vCPU until `hlt`, returning the guest's port I/O in order.
    pub fn run_until_halt(&mut self, max_exits: usize) -> Result<Vec<PortIo>, VmmError> {
        let mut io = Vec::new();
        for _ in 0..max_exits {
            match self.vcpu.run().map_err(kvm("run vCPU"))? {
                VcpuExit::Hlt => return Ok(io),
                VcpuExit::IoOut(port, data) => io.push(PortIo::Out(port, data.to_vec())),
                VcpuExit::IoIn(port, data) => {
                    data.fill(0xff);
                    io.push(PortIo::In(port, data.len()));
                }
                other => return Err(VmmError::UnexpectedExit(format!("{other:?}"))),
            }
        }
        Err(VmmError::NoHalt(max_exits))
    }
}
