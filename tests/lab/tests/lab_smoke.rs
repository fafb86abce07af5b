//! Smoke tests of the lab itself, run inside L1 by `svff-lab test`: the emulated SR-IOV
//! hardware and the kernel interfaces svff relies on are really there.

use std::path::Path;

use svff_lab::guest::{self, bind, dev_path, read_attr, set_numvfs, unbind, vfs_of};

fn totalvfs(pf: &str) -> u32 {
    read_attr(dev_path(pf).join("sriov_totalvfs"))
        .parse()
        .expect("numeric sriov_totalvfs")
}

fn reset_pf(pf: &str) {
    if guest::driver_of(pf).is_some() {
        set_numvfs(pf, 0);
    }
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn igb_pf_offers_7_vfs_with_the_igb_driver() {
    guest::require_lab();
    let pf = guest::igb_pf();
    reset_pf(&pf);
    bind(&pf, "igb");
    assert_eq!(read_attr(dev_path(&pf).join("vendor")), "0x8086");
    assert_eq!(read_attr(dev_path(&pf).join("device")), "0x10c9");
    assert_eq!(totalvfs(&pf), 7, "the igb driver limits its PF to 7 VFs");
    unbind(&pf);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn igb_pf_offers_8_vfs_with_pci_pf_stub() {
    guest::require_lab();
    let pf = guest::igb_pf();
    reset_pf(&pf);
    bind(&pf, "pci-pf-stub");
    assert_eq!(totalvfs(&pf), 8);
    unbind(&pf);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn nvme_pf_offers_64_vfs_with_pci_pf_stub() {
    guest::require_lab();
    let pf = guest::nvme_pf();
    reset_pf(&pf);
    bind(&pf, "pci-pf-stub");
    assert_eq!(read_attr(dev_path(&pf).join("vendor")), "0x1b36");
    assert_eq!(totalvfs(&pf), 64);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn four_vfs_are_created_and_one_binds_to_vfio_pci_with_a_group_node() {
    guest::require_lab();
    let pf = guest::igb_pf();
    reset_pf(&pf);
    bind(&pf, "pci-pf-stub");
    set_numvfs(&pf, 4);
    let vfs = vfs_of(&pf);
    assert_eq!(vfs.len(), 4, "virtfn links: {vfs:?}");
    for vf in &vfs {
        assert_eq!(
            read_attr(dev_path(vf).join("device")),
            "0x10ca",
            "{vf} is an igb VF"
        );
        assert!(
            guest::driver_of(vf).is_none(),
            "{vf} must not be autoprobed"
        );
    }
    bind(&vfs[0], "vfio-pci");
    let group = guest::iommu_group(&vfs[0]);
    let node = format!("/dev/vfio/{group}");
    assert!(
        Path::new(&node).exists(),
        "{node} missing after binding {} to vfio-pci",
        vfs[0]
    );
    // Every VF has its own IOMMU group (intel-iommu, no ACS sharing).
    let mut groups: Vec<u32> = vfs.iter().map(|v| guest::iommu_group(v)).collect();
    groups.sort_unstable();
    groups.dedup();
    assert_eq!(groups.len(), 4, "groups {groups:?}");
    unbind(&vfs[0]);
    set_numvfs(&pf, 0);
    assert!(vfs_of(&pf).is_empty());
    unbind(&pf);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn kvm_is_usable_in_l1_after_loading_kvm_amd() {
    guest::require_lab();
    guest::modprobe("kvm-amd");
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm in L1");
    assert_eq!(kvm.get_api_version(), 12);
    let vm = kvm.create_vm().expect("create a VM in L1");
    vm.create_vcpu(0).expect("create a vCPU in L1");
}

/// Before the lab kept L1's RAM below 4 GiB, the igb VF BARs landed above 4 GiB and QEMU 10.0.2
/// decoded them at the truncated 32-bit address: every register read 0 (see
/// `svff_lab::L1_MEMORY_MIB`).
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn igb_vf_registers_are_live_in_l1_through_its_bars_on_pci_pf_stub() {
    use guest::igbvf;
    guest::require_lab();
    let pf = guest::igb_pf();
    reset_pf(&pf);
    bind(&pf, "pci-pf-stub");
    set_numvfs(&pf, 2);
    let vfs = vfs_of(&pf);
    assert_eq!(vfs.len(), 2, "virtfn links: {vfs:?}");
    let mut seen = Vec::new();
    for vf in &vfs {
        bind(vf, "vfio-pci");
        let res = read_attr(dev_path(vf).join("resource"));
        let old = guest::set_command_bits(vf, guest::PCI_COMMAND_MEMORY);
        let bar0 = guest::BarMap::open(vf, 0);
        let bar3 = guest::BarMap::open(vf, igbvf::MSIX_BAR);
        let status = bar0.read32(igbvf::STATUS);
        let vector_ctl = bar3.read32(12);
        drop((bar0, bar3));
        guest::config_write16(vf, 4, old);
        let bar0_line = res.lines().next().unwrap_or_default().to_owned();
        seen.push((vf.clone(), status, vector_ctl, bar0_line));
    }
    for vf in &vfs {
        unbind(vf);
    }
    set_numvfs(&pf, 0);
    unbind(&pf);
    for (vf, status, vector_ctl, bar0) in seen {
        println!("{vf}: BAR0 {bar0}, STATUS {status:#010x}, MSI-X entry 0 control {vector_ctl:#x}");
        assert!(
            status & igbvf::STATUS_IOV_MODE != 0
                && (status >> igbvf::STATUS_NUM_VFS_SHIFT) & 0xf == 2,
            "{vf}: STATUS {status:#010x} at BAR0 0x0008 must show IOV mode and 2 VFs (BAR0 at {bar0}; 0 means L0 does not decode the BAR there)"
        );
        assert_eq!(
            vector_ctl & 1,
            1,
            "{vf}: MSI-X table entry 0 must start masked (BAR3 offset 0xc)"
        );
    }
}
