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

/// The plain-MSI passthrough tests rely on this: QEMU's `edu` sits alone in its IOMMU group,
/// with an MSI capability and no MSI-X, and binds to vfio-pci.
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn edu_is_an_msi_only_function_alone_in_its_iommu_group_and_binds_to_vfio_pci() {
    let edu = guest::edu();
    let group = guest::iommu_group(&edu);
    let members: Vec<_> = std::fs::read_dir(format!("/sys/kernel/iommu_groups/{group}/devices"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(members.len(), 1, "group {group}: {members:?}");
    let cfg = std::fs::read(dev_path(&edu).join("config")).unwrap();
    assert!(cfg[6] & 0x10 != 0, "capability list");
    let mut caps = Vec::new();
    let mut at = usize::from(cfg[0x34] & 0xfc);
    while at >= 0x40 && caps.len() < 48 {
        caps.push(cfg[at]);
        at = usize::from(cfg[at + 1] & 0xfc);
    }
    assert!(
        caps.contains(&0x05) && !caps.contains(&0x11),
        "{edu} capabilities: {caps:x?}"
    );
    bind(&edu, "vfio-pci");
    assert!(Path::new(&format!("/dev/vfio/{group}")).exists());
    unbind(&edu);
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

/// Waits until `efd` has fired (its counter is non-zero) or `deadline` passes; returns the count.
fn eventfd_wait(efd: &vmm_sys_util::eventfd::EventFd, deadline: std::time::Instant) -> u64 {
    use std::os::fd::AsRawFd;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd {
            fd: efd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for an open eventfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as libc::c_int) };
        if n > 0 {
            return efd.read().expect("read eventfd");
        }
        if left.is_zero() {
            return 0;
        }
    }
}

/// The register sequence a guest (or a VMM's test guest) uses to raise MSI-X from an igb VF whose
/// PF has no driver: the host sets the PF's GPIE.MSIX_MODE once (the `igb` driver would), then
/// the VF unmasks its vectors in EIMS, makes them auto-clear in EIAC and raises vector `v` by
/// writing bit `v` to EICS. Measured in the lab (QEMU 10.0.2): without GPIE.MSIX_MODE no vector
/// fires; without EIAC a vector's cause stays set after it fired and the next EICS write of it
/// raises nothing until the VF clears the cause (write 1 to EICR). EIAC only ORs bits in (until
/// the PF resets) and takes effect only once GPIE.MSIX_MODE is set.
#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn igb_vf_on_pci_pf_stub_raises_each_msix_vector_through_vfio_when_eics_is_written() {
    use guest::igbvf;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    const CONFIG_REGION: u32 = 7; // VFIO_PCI_CONFIG_REGION_INDEX
    guest::require_lab();
    let pf = guest::igb_pf();
    reset_pf(&pf);
    bind(&pf, "pci-pf-stub");
    set_numvfs(&pf, 2);
    let vf = vfs_of(&pf)[1].clone();
    bind(&vf, "vfio-pci");
    let pf_cmd = guest::set_command_bits(&pf, guest::PCI_COMMAND_MEMORY);
    let pf_bar = guest::BarMap::open(&pf, 0);
    let gpie = pf_bar.read32(igbvf::PF_GPIE);
    pf_bar.write32(igbvf::PF_GPIE, gpie | igbvf::PF_GPIE_MSIX_MODE);

    let container = Arc::new(VfioContainer::new(None).expect("open /dev/vfio/vfio"));
    let ops: Arc<dyn VfioOps> = container.clone();
    let dev = VfioDevice::new(&dev_path(&vf), ops, false)
        .unwrap_or_else(|e| panic!("open {vf} through VFIO: {e:?}"));
    let efds: Vec<EventFd> = (0..igbvf::MSIX_VECTORS)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    dev.enable_msix(efds.iter().collect())
        .unwrap_or_else(|e| panic!("enable MSI-X of {vf}: {e:?}"));
    let mut cmd = [0u8; 2];
    dev.region_read(CONFIG_REGION, &mut cmd, 4);
    let cmd = u16::from_le_bytes(cmd) | guest::PCI_COMMAND_MASTER;
    dev.region_write(CONFIG_REGION, &cmd.to_le_bytes(), 4);
    let write = |reg: usize, v: u32| dev.region_write(0, &v.to_le_bytes(), reg as u64);
    let all = (1u32 << igbvf::MSIX_VECTORS) - 1;
    write(igbvf::EIAC, all);
    write(igbvf::EIMS, all);
    let mut fired = Vec::new();
    for (v, efd) in efds.iter().enumerate() {
        for round in 0..2 {
            write(igbvf::EICS, 1 << v);
            let n = eventfd_wait(efd, Instant::now() + Duration::from_secs(10));
            fired.push((v, round, n));
        }
    }
    write(igbvf::EIMC, all);
    let _ = dev.disable_msix();
    drop(dev);
    drop(container);
    pf_bar.write32(igbvf::PF_GPIE, gpie);
    drop(pf_bar);
    guest::config_write16(&pf, 4, pf_cmd);
    unbind(&vf);
    set_numvfs(&pf, 0);
    unbind(&pf);
    println!("(vector, round, eventfd count): {fired:?}");
    for (v, round, n) in fired {
        assert!(
            n >= 1,
            "{vf}: MSI-X vector {v} did not fire within 10 s of EICS write {round}"
        );
    }
}
