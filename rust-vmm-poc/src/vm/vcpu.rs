//! vCPU set-up (CPUID, LAPIC LINT pins) and the vCPU thread's run loop.

use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use super::control::Control;
use super::ExitReason;
use crate::devices::Devices;
use crate::error::{kvm, Error};

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4 << 8;
const APIC_MODE_EXTINT: u32 = 0x7 << 8;

/// The host's supported CPUID, read once per VM.
pub(crate) fn supported_cpuid(kvm_sys: &Kvm) -> Result<CpuId, Error> {
    kvm_sys
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))
}

/// CPUID with vCPU `id`'s APIC ID and the CPU count, LAPIC LINT0 as ExtINT (the PIC's output)
/// and LINT1 as NMI, as a PC's firmware leaves them.
pub(crate) fn configure(vcpu: &VcpuFd, id: u8, cpus: u8, base: &CpuId) -> Result<(), Error> {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(cpus) << 16);
                e.edx |= 1 << 28; // HTT: the count in EBX[23:16] is valid
                e.ecx |= 1 << 31; // running under a hypervisor: guests look for KVM's leaves
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm(format!("KVM_SET_CPUID2 on vCPU {id}")))?;

    let mut lapic = vcpu
        .get_lapic()
        .map_err(kvm(format!("KVM_GET_LAPIC on vCPU {id}")))?;
    let set = |regs: &mut [libc::c_char], off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | mode;
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as libc::c_char;
        }
    };
    set(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(kvm(format!("KVM_SET_LAPIC on vCPU {id}")))?;
    Ok(())
}

enum Step {
    Continue,
    Exit(ExitReason),
    Interrupted,
    Failed(kvm_ioctls::Error),
}

fn handle(id: u8, exit: VcpuExit<'_>, devices: &Devices) -> Step {
    match exit {
        VcpuExit::IoOut(port, data) => match devices.pio_write(port, data) {
            Some(r) => Step::Exit(r),
            None => Step::Continue,
        },
        VcpuExit::IoIn(port, data) => {
            devices.pio_read(port, data);
            Step::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            devices.mmio_read(addr, data);
            Step::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            devices.mmio_write(addr, data);
            Step::Continue
        }
        VcpuExit::Shutdown => Step::Exit(ExitReason::GuestShutdown),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Step::Exit(ExitReason::GuestReset),
            _ => Step::Exit(ExitReason::GuestShutdown),
        },
        // With the in-kernel irqchip, HLT is handled by KVM; seeing one is harmless.
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Step::Continue,
        other => Step::Exit(ExitReason::VcpuFailed {
            cpu: id,
            reason: format!("unhandled exit {other:?}"),
        }),
    }
}

/// The body of vCPU thread `id`: runs until the VM exits, parking while it is paused.
pub(crate) fn run_loop(id: u8, mut vcpu: VcpuFd, devices: Arc<Devices>, ctl: Arc<Control>) {
    let run_ptr: *mut kvm_bindings::kvm_run = vcpu.get_kvm_run();
    ctl.vcpu_started(id, run_ptr);
    while ctl.wait_runnable() {
        let step = match vcpu.run() {
            Ok(exit) => handle(id, exit, &devices),
            Err(e) if e.errno() == libc::EINTR => Step::Interrupted,
            Err(e) if e.errno() == libc::EAGAIN => Step::Continue,
            Err(e) => Step::Failed(e),
        };
        match step {
            Step::Continue => {}
            Step::Interrupted => vcpu.set_kvm_immediate_exit(0),
            Step::Exit(ExitReason::VcpuFailed { cpu, reason }) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                let run = vcpu.get_kvm_run();
                let detail = if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
                    // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal`
                    // member of the exit union.
                    format!(" (suberror {})", unsafe {
                        run.__bindgen_anon_1.internal.suberror
                    })
                } else {
                    String::new()
                };
                ctl.request_exit(ExitReason::VcpuFailed {
                    cpu,
                    reason: format!("{reason}{detail} at rip {rip:#x}"),
                })
            }
            Step::Exit(r) => ctl.request_exit(r),
            Step::Failed(e) => ctl.request_exit(ExitReason::VcpuFailed {
                cpu: id,
                reason: format!("KVM_RUN: {e}"),
            }),
        }
    }
    ctl.vcpu_stopped(id);
    drop(vcpu);
}
