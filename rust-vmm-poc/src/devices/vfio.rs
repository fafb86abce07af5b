//! A VF passed through with vfio-pause: config space forwarded to the VF through
//! [`PausableDevice`] except the BARs and the expansion ROM, which this model shadows (sizes
//! from the VF's sysfs `resource` file, addresses as the guest programs them; never forwarded),
//! and every BAR access trapped and forwarded (no BAR is mapped into the guest yet).
//!
//! Paused (QMP `svff-vfio-pause`), config space is served from vfio-pause's shadow and BAR
//! accesses follow the device's policy (all-ones, or the vCPU waits for the unpause).
//!
//! Not yet: BAR mmaps into KVM slots, MSI/MSI-X wiring (the VF's MSI-X table is not reachable
//! through trapped accesses).

use std::path::Path;
use std::sync::Arc;

use vfio_pause::{
    Container, DeviceOptions, PausableDevice, PausePolicy, PciAddress, TrapAllBars, VfSource,
};

use crate::error::{io, Error};
use crate::pci::{reg, BarKind, BarSpec, ConfigSpace, PciDevice, MIN_BAR_SIZE, NUM_BARS};

const IORESOURCE_IO: u64 = 0x100;
const IORESOURCE_MEM: u64 = 0x200;
const IORESOURCE_PREFETCH: u64 = 0x2000;
const IORESOURCE_MEM_64: u64 = 0x10_0000;

/// Parses a sysfs `resource` file into the memory BARs it lists.
pub fn parse_resource(text: &str, what: &str) -> Result<Vec<(usize, BarSpec)>, Error> {
    let mut bars = Vec::new();
    for (i, line) in text.lines().take(NUM_BARS).enumerate() {
        let f: Vec<u64> = line
            .split_whitespace()
            .map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16))
            .collect::<Result<_, _>>()
            .map_err(|_| Error::Pci(format!("{what}: unparsable resource line {line:?}")))?;
        let [start, end, flags] = f[..] else {
            return Err(Error::Pci(format!("{what}: resource line {line:?}")));
        };
        if end == 0 || end < start {
            continue;
        }
        if flags & IORESOURCE_IO != 0 {
            return Err(Error::Pci(format!(
                "{what}: BAR{i} is an I/O BAR, which svff-vmm does not pass through"
            )));
        }
        if flags & IORESOURCE_MEM == 0 {
            continue;
        }
        let size = (end - start + 1).next_power_of_two().max(MIN_BAR_SIZE);
        bars.push((
            i,
            BarSpec {
                size,
                kind: if flags & IORESOURCE_MEM_64 != 0 {
                    BarKind::Memory64
                } else {
                    BarKind::Memory32
                },
                prefetchable: flags & IORESOURCE_PREFETCH != 0,
            },
        ));
    }
    Ok(bars)
}

/// A passed-through VF.
pub struct VfioPci {
    name: String,
    dev: Arc<PausableDevice>,
    shadow: ConfigSpace,
}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci").field("name", &self.name).finish()
    }
}

fn shadowed(offset: usize) -> bool {
    (reg::BAR0..reg::BAR0 + 4 * NUM_BARS).contains(&offset)
        || (reg::ROM..reg::ROM + 4).contains(&offset)
}

impl VfioPci {
    /// Opens the VF at `host` (bound to vfio-pci) into `container`, under the VMM id `id`.
    pub fn open(
        container: Arc<Container>,
        host: &PciAddress,
        id: &str,
        policy: PausePolicy,
    ) -> Result<Self, Error> {
        let res = host.sysfs_path().join("resource");
        if !Path::new(&host.sysfs_path()).exists() {
            return Err(Error::Pci(format!("--vfio {host}: no such PCI function")));
        }
        let driver = std::fs::read_link(host.sysfs_path().join("driver"))
            .ok()
            .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()));
        if driver.as_deref() != Some("vfio-pci") {
            return Err(Error::Pci(format!(
                "--vfio {host}: bound to {}, not vfio-pci",
                driver.as_deref().unwrap_or("no driver")
            )));
        }
        let text =
            std::fs::read_to_string(&res).map_err(io(format!("reading {}", res.display())))?;
        let bars = parse_resource(&text, &format!("--vfio {host}"))?;
        let dev = PausableDevice::open(
            id,
            container,
            VfSource::Sysfs(*host),
            DeviceOptions {
                policy,
                mmap_bars: false,
                ..DeviceOptions::default()
            },
            Arc::new(TrapAllBars),
        )
        .map_err(|e| Error::Vfio {
            device: format!("{id} ({host})"),
            source: Box::new(e),
        })?;
        let ident = dev.identity();
        let mut shadow = ConfigSpace::new(ident.vendor, ident.device, ident.class, 0);
        for (i, spec) in bars {
            shadow.set_bar(i, spec);
        }
        Ok(VfioPci {
            name: format!("vfio {id} ({host})"),
            dev: Arc::new(dev),
            shadow,
        })
    }

    /// The pausable device (QMP pauses and unpauses it without the bus lock).
    pub fn device(&self) -> Arc<PausableDevice> {
        self.dev.clone()
    }
}

impl PciDevice for VfioPci {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn config(&self) -> &ConfigSpace {
        &self.shadow
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.shadow
    }
    fn config_read(&mut self, offset: usize) -> u32 {
        if shadowed(offset) {
            return self.shadow.read(offset);
        }
        let mut b = [0u8; 4];
        match self.dev.config_read(offset as u64, &mut b) {
            Ok(()) => u32::from_le_bytes(b),
            Err(e) => {
                tracing::debug!("{}: config read {offset:#x}: {e}", self.name);
                u32::MAX
            }
        }
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if shadowed(offset) {
            return self.shadow.write(offset, data);
        }
        if (reg::COMMAND..reg::COMMAND + 2).contains(&offset) {
            // The bus decodes BARs from the shadow's command register.
            self.shadow.write(offset, data);
        }
        if let Err(e) = self.dev.config_write(offset as u64, data) {
            tracing::debug!("{}: config write {offset:#x}: {e}", self.name);
        }
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let Err(e) = self.dev.bar_read(bar as u32, offset, data) {
            tracing::debug!("{}: BAR{bar} read {offset:#x}: {e}", self.name);
            data.fill(0xff);
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Err(e) = self.dev.bar_write(bar as u32, offset, data) {
            tracing::debug!("{}: BAR{bar} write {offset:#x}: {e}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_resource_of_an_igb_vf_gives_two_64_bit_memory_bars() {
        let text = "0x00000000fe800000 0x00000000fe803fff 0x0000000000140204\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x00000000fe880000 0x00000000fe883fff 0x0000000000140204\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
        let bars = parse_resource(text, "vf").unwrap();
        assert_eq!(bars.len(), 2);
        assert_eq!(bars[0].0, 0);
        assert_eq!(bars[1].0, 3);
        assert_eq!(bars[0].1.size, 0x4000);
        assert_eq!(bars[0].1.kind, BarKind::Memory64);
        assert!(!bars[0].1.prefetchable);
    }

    #[test]
    fn io_bars_and_garbage_are_refused() {
        assert!(parse_resource("0x1000 0x101f 0x40101\n", "vf").is_err());
        assert!(parse_resource("zz\n", "vf").is_err());
    }

    #[test]
    fn bars_and_rom_are_shadowed_everything_else_forwarded() {
        assert!(shadowed(0x10) && shadowed(0x24) && shadowed(0x30));
        assert!(!shadowed(0x04) && !shadowed(0x28) && !shadowed(0x40));
    }
}
