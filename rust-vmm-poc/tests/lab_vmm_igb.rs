//! The acceptance scenario of issue 11 on the igb PF on pci-pf-stub, whose VFs have live
//! registers in the lab (STATUS at BAR0+8 shows IOV mode and the PF's VF count) and raise
//! MSI-X themselves: the test guest (`--guest-mode ring-vf`) writes EIAC/EIMS/EICS of each
//! igb VF every round, so the interrupts it counts come from the VF, through VFIO and the
//! KVM irqfd the unpause re-wired. The PF needs GPIE.MSIX_MODE for that (the `igb` driver
//! sets it; with pci-pf-stub the test sets it through the PF's BAR0).

mod common;

use common::Kind;
use svff_lab::guest::{self, bind, igbvf, set_numvfs, unbind, vfs_of};
use svff_pf_helper::{DriverName, PciAddress, RealSysfs, SriovManager, VfsSetOptions};
use svff_vmm::GuestCounters;

/// The igb PF on pci-pf-stub with GPIE.MSIX_MODE set; put back (GPIE, command, 0 VFs,
/// unbound) on drop. Declare it before the VMMs so they end first.
struct IgbPf {
    pf: String,
    gpie: u32,
    command: u16,
}

impl IgbPf {
    fn new() -> IgbPf {
        guest::require_lab();
        guest::modprobe("kvm-amd");
        guest::modprobe("vfio-pci");
        let pf = guest::igb_pf();
        if guest::driver_of(&pf).is_some() {
            set_numvfs(&pf, 0);
        }
        bind(&pf, "pci-pf-stub");
        let command = guest::set_command_bits(&pf, guest::PCI_COMMAND_MEMORY);
        let bar = guest::BarMap::open(&pf, 0);
        let gpie = bar.read32(igbvf::PF_GPIE);
        bar.write32(igbvf::PF_GPIE, gpie | igbvf::PF_GPIE_MSIX_MODE);
        IgbPf { pf, gpie, command }
    }
}

impl common::Pf for IgbPf {
    /// Through pf-helper's library, as `svff` does it (binds in parallel, no modprobe).
    fn vfs(&self, n: u16) -> Vec<String> {
        let mgr = SriovManager::new(RealSysfs::new());
        let pf = PciAddress::parse(&self.pf).unwrap();
        let opts = VfsSetOptions {
            bind: Some(DriverName::parse("vfio-pci").unwrap()),
            ..Default::default()
        };
        mgr.set_vf_count(pf, 0, &VfsSetOptions::default())
            .and_then(|_| mgr.set_vf_count(pf, n, &opts))
            .unwrap_or_else(|e| panic!("{n} VFs on {pf}: {}", e.chain()));
        vfs_of(&self.pf)
    }
}

impl Drop for IgbPf {
    fn drop(&mut self) {
        for vf in vfs_of(&self.pf) {
            unbind(&vf);
        }
        set_numvfs(&self.pf, 0);
        guest::BarMap::open(&self.pf, 0).write32(igbvf::PF_GPIE, self.gpie);
        guest::config_write16(&self.pf, 4, self.command);
        unbind(&self.pf);
    }
}

/// An igb VF's STATUS (BAR0+8): IOV mode, and the PF's VF count at bits 14..=17; CTRL
/// (BAR0+0) not all-ones.
fn live(c: &GuestCounters, numvfs: u16) -> bool {
    c.id != u32::MAX
        && c.st & igbvf::STATUS_IOV_MODE != 0
        && (c.st >> igbvf::STATUS_NUM_VFS_SHIFT) & 0xf == u32::from(numvfs)
}

const IGB: Kind = Kind {
    vendor: "8086",
    self_irqs: true,
    live,
};

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn two_vmms_keep_four_igb_vfs_across_parallel_pauses_numvfs_4_0_6_and_take_their_msix_again() {
    let pf = IgbPf::new();
    common::pause_across_numvfs_4_0_6(&pf, &IGB);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn two_vmms_see_device_del_and_device_add_of_igb_vfs_across_numvfs_4_0_6_as_removal_and_addition() {
    let pf = IgbPf::new();
    common::del_add_across_numvfs_4_0_6(&pf, &IGB);
}

#[test]
#[ignore = "lab: runs inside the emulated host (svff-lab test)"]
fn a_masked_msix_vector_of_an_igb_vf_delivers_nothing_until_the_guest_unmasks_it() {
    use common::Pf as _;
    use svff_vmm::parse_counters;

    let pf = IgbPf::new();
    let vfs = pf.vfs(1);
    let mut vmm = common::Vmm::spawn("vmm", &[("vf0", &vfs[0], "ignore")], 20, "ring-vf-masked");
    vmm.wait("round 260", &|| {
        vmm.last("00:01.0").is_some_and(|c| c.round >= 260)
    });
    let out = vmm.out();
    let irqs_at = |round: u64| {
        out.lines()
            .filter_map(parse_counters)
            .find(|c| c.dev == "00:01.0" && c.round == round)
            .unwrap_or_else(|| panic!("no report at round {round}:\n{out}"))
            .irqs
    };
    let (i100, i120, i180, i260) = (irqs_at(100), irqs_at(120), irqs_at(180), irqs_at(260));
    assert!(vmm.quit().success());
    drop(vmm);
    println!("irqs at rounds 100/120/180/260: {i100} {i120} {i180} {i260}");
    assert!(
        i100 >= 1,
        "the VF's vector reached the guest while unmasked"
    );
    // The VF raises vector 0 every round meanwhile; masked, nothing reaches the guest.
    assert_eq!(i120, i180, "masked (rounds 101..200): no interrupt");
    assert!(i260 > i180, "unmasked after round 200: interrupts again");
}
