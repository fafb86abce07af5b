//! The minimal VMM on KVM inside L1 (nested KVM over L0's emulated SVM), so it runs the same on
//! every machine that runs the lab, with or without a /dev/kvm of its own.

use rust_vmm_poc::{MiniVm, PortIo, VmmError};
use svff_lab::guest;

/// Writes "OK" to port 0x3f8, reads port 0x60, halts.
const PROG: &[u8] = &[
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
    0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
    0xe4, 0x60, // in al, 0x60
    0xf4, // hlt
];

fn kvm_ready() {
    guest::require_lab();
    guest::modprobe("kvm-amd");
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn real_mode_guest_port_io_reaches_the_vmm_in_order_then_halts() {
    kvm_ready();
    let mut vm = MiniVm::new(1 << 20).unwrap();
    vm.load_real_mode(0x1000, PROG).unwrap();
    let io = vm.run_until_halt(100).unwrap();
    assert_eq!(
        io,
        [
            PortIo::Out(0x3f8, vec![b'O']),
            PortIo::Out(0x3f8, vec![b'K']),
            PortIo::In(0x60, 1)
        ]
    );
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn a_guest_that_never_halts_is_stopped_by_the_exit_budget() {
    kvm_ready();
    let mut vm = MiniVm::new(1 << 20).unwrap();
    // out 0x80, al; jmp back to it
    vm.load_real_mode(0x1000, &[0xe6, 0x80, 0xeb, 0xfc])
        .unwrap();
    assert!(matches!(vm.run_until_halt(5), Err(VmmError::NoHalt(5))));
}
