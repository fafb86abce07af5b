//! GSI routing for MSI/MSI-X: the whole KVM routing table (the in-kernel irqchip's default
//! routes plus one MSI route per vector in use), GSIs allocated from 24, and irqfds registered
//! only once their route exists.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::error::{kvm, Error};

/// First GSI for MSI routes (0..23 are the IOAPIC pins).
pub const FIRST_MSI_GSI: u32 = 24;

/// The VM's GSI routing table.
#[derive(Debug)]
pub struct GsiRouter {
    vm: Arc<VmFd>,
    next_gsi: u32,
    msi: BTreeMap<u32, (u64, u32)>,
    irqfds: BTreeSet<u32>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The routes KVM sets up with `KVM_CREATE_IRQCHIP`: GSI 0..15 to the IOAPIC pin of the same
/// number and to the PIC (master 0..7, slave 8..15), GSI 16..23 to the IOAPIC only.
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..24 {
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip(gsi, chip, gsi % 8));
        }
    }
    v
}

impl GsiRouter {
    /// A router for `vm` (which has its in-kernel irqchip).
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouter {
            vm,
            next_gsi: FIRST_MSI_GSI,
            msi: BTreeMap::new(),
            irqfds: BTreeSet::new(),
        }
    }

    /// A fresh GSI for an MSI vector.
    pub fn allocate_gsi(&mut self) -> Result<u32, Error> {
        if self.next_gsi as usize >= KVM_MAX_IRQ_ROUTES {
            return Err(Error::Config(format!(
                "all {KVM_MAX_IRQ_ROUTES} GSIs are in use"
            )));
        }
        self.next_gsi += 1;
        Ok(self.next_gsi - 1)
    }

    /// The table as it would be committed.
    pub fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let mut v = default_routes();
        for (&gsi, &(addr, data)) in &self.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = addr as u32;
            e.u.msi.address_hi = (addr >> 32) as u32;
            e.u.msi.data = data;
            v.push(e);
        }
        v
    }

    fn commit(&self) -> Result<(), Error> {
        let table = KvmIrqRouting::from_entries(&self.entries())
            .map_err(|e| Error::Config(format!("GSI routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(kvm("KVM_SET_GSI_ROUTING"))
    }

    /// Routes `gsi` to the MSI message `(addr, data)` and, the first time, wires `evt` to it
    /// with an irqfd (after the route is in place). Unchanged routes are not recommitted.
    pub fn set_msi(&mut self, gsi: u32, addr: u64, data: u32, evt: &EventFd) -> Result<(), Error> {
        if self.msi.get(&gsi) != Some(&(addr, data)) {
            self.msi.insert(gsi, (addr, data));
            self.commit()?;
        }
        if self.irqfds.insert(gsi) {
            if let Err(e) = self.vm.register_irqfd(evt, gsi) {
                self.irqfds.remove(&gsi);
                return Err(kvm(format!("KVM_IRQFD on GSI {gsi}"))(e));
            }
        }
        Ok(())
    }

    /// Undoes [`GsiRouter::set_msi`] for `gsi` (a masked or disabled vector): the irqfd is
    /// deassigned first, then the route dropped, so no signal of `evt` meets a GSI without a
    /// route. Signals of `evt` while it has no irqfd stay in its counter; KVM delivers them
    /// when the irqfd is assigned again.
    pub fn clear_msi(&mut self, gsi: u32, evt: &EventFd) -> Result<(), Error> {
        if self.irqfds.remove(&gsi) {
            self.vm
                .unregister_irqfd(evt, gsi)
                .map_err(kvm(format!("KVM_IRQFD deassign on GSI {gsi}")))?;
        }
        if self.msi.remove(&gsi).is_some() {
            self.commit()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_cover_the_pic_and_all_24_ioapic_pins() {
        let r = default_routes();
        assert_eq!(r.len(), 24 + 16);
        // SAFETY: every entry built by default_routes is of type IRQCHIP, whose union member
        // is `irqchip`.
        let pins: Vec<(u32, u32, u32)> = r
            .iter()
            .map(|e| unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect();
        assert!(pins.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(pins.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(pins.contains(&(9, KVM_IRQCHIP_PIC_SLAVE, 1)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!pins.iter().any(|p| p.0 == 20 && p.1 != KVM_IRQCHIP_IOAPIC));
    }
}
