//! A fake sysfs for unit tests: a tree in a tempdir laid out like the kernel's
//! (`devices/`, `bus/pci/devices` links, `virtfnN`/`physfn`, `driver` and
//! `iommu_group` links), whose writes go through [`Sysfs::write`] and are answered
//! with the kernel's semantics (ERANGE, EBUSY, ENOENT, driver_override +
//! drivers_probe, remove/rescan, FPGA manager), plus injectable write failures.
//! Reads use the trait's defaults on the tree, which is rebuilt after each write.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::pci::PciAddress;
use crate::sysfs::Sysfs;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DriverModel {
    /// Has `sriov_configure`.
    pub sriov_configure: bool,
    /// Lowers `sriov_totalvfs` while bound (igb: 7).
    pub max_vfs: Option<u16>,
    /// Device ids (vendor, device) in its id table.
    pub ids: Vec<(String, String)>,
    /// Creates a `qdma/` directory on bound devices.
    pub qdma: bool,
    /// Its probe fails: `drivers_probe` succeeds but leaves the device unbound.
    pub probe_fails: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Sriov {
    cap_total: u16,
    num: u16,
    autoprobe: bool,
    vf_device: String,
    offset: u16,
}

#[derive(Debug, Clone, PartialEq)]
struct Dev {
    vendor: String,
    device: String,
    driver: Option<String>,
    driver_override: Option<String>,
    sriov: Option<Sriov>,
    physfn: Option<PciAddress>,
    iommu_group: u32,
    qdma: BTreeMap<String, String>,
    /// Memory BAR index -> register image (its `resource<N>` file).
    bars: BTreeMap<u8, Vec<u8>>,
}

#[derive(Debug, Default)]
struct State {
    devices: BTreeMap<PciAddress, Dev>,
    removed: BTreeMap<PciAddress, Dev>,
    drivers: BTreeMap<String, DriverModel>,
    /// Modules not loaded but available to `load_module`.
    modules: BTreeMap<String, DriverModel>,
    /// Every `load_module` call.
    loads: Vec<String>,
    next_group: u32,
    failures: Vec<(String, i32)>,
    writes: Vec<(String, String)>,
    firmware_available: BTreeSet<String>,
    fpga_firmware: Vec<String>,
    escapes: BTreeSet<PciAddress>,
    /// Functions with memory decoding off (PCI_COMMAND; for a VF: its PF's VF MSE).
    decoding_off: BTreeSet<PciAddress>,
    /// Functions not in D0: their power state (3: D3hot).
    power: BTreeMap<PciAddress, u8>,
    /// What the tree on disk shows: (drivers, escapes, fpga firmware, devices).
    synced: Option<Synced>,
}

#[derive(Debug, Clone, PartialEq)]
struct Synced {
    drivers: BTreeMap<String, DriverModel>,
    escapes: BTreeSet<PciAddress>,
    fpga_firmware: Vec<String>,
    devices: BTreeMap<PciAddress, Dev>,
}

/// The fake sysfs. See the module docs.
#[derive(Debug)]
pub(crate) struct FakeSysfs {
    dir: tempfile::TempDir,
    state: Mutex<State>,
    /// A write to a path ending in this blocks until the sender is used or dropped.
    gate: Mutex<Option<(String, std::sync::mpsc::Receiver<()>)>>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl FakeSysfs {
    /// An empty PCI bus with the drivers vfio-pci, pci-pf-stub, igb, igbvf (not
    /// loaded), nvme, qdma-pf and qdma-vf registered.
    pub fn new() -> Self {
        let mut state = State {
            next_group: 1,
            ..Default::default()
        };
        let drv = |sriov: bool, max: Option<u16>, ids: &[(&str, &str)], qdma: bool| DriverModel {
            sriov_configure: sriov,
            max_vfs: max,
            ids: ids
                .iter()
                .map(|(v, d)| (v.to_string(), d.to_string()))
                .collect(),
            qdma,
            probe_fails: false,
        };
        state
            .drivers
            .insert("vfio-pci".into(), drv(false, None, &[], false));
        state
            .drivers
            .insert("pci-pf-stub".into(), drv(true, None, &[], false));
        state.drivers.insert(
            "igb".into(),
            drv(true, Some(7), &[("0x8086", "0x10c9")], false),
        );
        state.drivers.insert(
            "nvme".into(),
            drv(false, None, &[("0x1b36", "0x0010")], false),
        );
        state.drivers.insert(
            "qdma-pf".into(),
            drv(true, None, &[("0x10ee", "0x903f")], true),
        );
        state.drivers.insert(
            "qdma-vf".into(),
            drv(false, None, &[("0x10ee", "0xa03f")], true),
        );
        let fake = FakeSysfs {
            dir: tempfile::tempdir().expect("tempdir"),
            state: Mutex::new(state),
            gate: Mutex::new(None),
        };
        fs::create_dir_all(fake.root().join("proc/1/fd")).unwrap();
        symlink("/dev/null", fake.root().join("proc/1/fd/0")).unwrap();
        fake.sync();
        fake
    }

    /// A manager on this fake, looking for VFIO users in the fake's `proc/`.
    pub fn manager(self) -> crate::sriov::SriovManager<FakeSysfs> {
        let proc_root = self.root().join("proc");
        crate::sriov::SriovManager::new(self).with_proc_root(proc_root)
    }

    /// Makes process `pid` hold `file` open (a `proc/<pid>/fd/N` link).
    pub fn hold_open(&self, pid: u32, file: &str) {
        let fd_dir = self.root().join(format!("proc/{pid}/fd"));
        fs::create_dir_all(&fd_dir).unwrap();
        fs::write(self.root().join(format!("proc/{pid}/comm")), "fakevmm\n").unwrap();
        let n = fs::read_dir(&fd_dir).unwrap().count() + 3;
        symlink(file, fd_dir.join(n.to_string())).unwrap();
    }

    /// Makes process `pid` hold a VFIO device fd of `bdf` whose fdinfo names
    /// the device (Linux >= 6.13 style), or does not (`named` false, as 6.12).
    pub fn hold_device_fd(&self, pid: u32, bdf: &str, named: bool) {
        self.hold_open(pid, "anon_inode:[vfio-device]");
        let fd_dir = self.root().join(format!("proc/{pid}/fd"));
        let n = fs::read_dir(&fd_dir).unwrap().count() + 2;
        let info_dir = self.root().join(format!("proc/{pid}/fdinfo"));
        fs::create_dir_all(&info_dir).unwrap();
        let mut info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\n".to_owned();
        if named {
            info.push_str(&format!(
                "vfio-device-syspath: /sys/devices/pci0000:00/{bdf}\n"
            ));
        }
        fs::write(info_dir.join(n.to_string()), info).unwrap();
    }

    /// Adds a shared mapping of `path` to process `pid`'s `maps`.
    pub fn map_file(&self, pid: u32, path: &str) {
        let dir = self.root().join(format!("proc/{pid}"));
        fs::create_dir_all(dir.join("fd")).unwrap();
        fs::write(dir.join("comm"), "fakevmm\n").unwrap();
        let mut maps = fs::read_to_string(dir.join("maps")).unwrap_or_default();
        let start = 0x7f00_0000_0000u64 + (maps.lines().count() as u64) * 0x1000;
        maps.push_str(&format!(
            "{start:x}-{:x} rw-s 00000000 00:15 4242                       {path}\n",
            start + 0x1000
        ));
        fs::write(dir.join("maps"), maps).unwrap();
    }

    /// Ends process `pid`.
    pub fn exit_process(&self, pid: u32) {
        fs::remove_dir_all(self.root().join(format!("proc/{pid}"))).unwrap();
    }

    /// The lab's igb PF at 0000:01:00.0 (8 VFs by capability, 7 with igb).
    pub fn with_igb() -> Self {
        let fake = Self::new();
        fake.add_pf("0000:01:00.0", "0x8086", "0x10c9", 8, "0x10ca");
        fake
    }

    pub fn add_pf(&self, bdf: &str, vendor: &str, device: &str, total: u16, vf_device: &str) {
        let bdf = PciAddress::parse(bdf).unwrap();
        let mut st = self.state.lock().unwrap();
        let group = st.next_group;
        st.next_group += 1;
        st.devices.insert(
            bdf,
            Dev {
                vendor: vendor.into(),
                device: device.into(),
                driver: None,
                driver_override: None,
                sriov: Some(Sriov {
                    cap_total: total,
                    num: 0,
                    autoprobe: true,
                    vf_device: vf_device.into(),
                    offset: 0x80,
                }),
                physfn: None,
                iommu_group: group,
                qdma: BTreeMap::new(),
                bars: BTreeMap::new(),
            },
        );
        drop(st);
        self.sync();
    }

    /// A plain (non SR-IOV) device.
    pub fn add_device(&self, bdf: &str) {
        let bdf = PciAddress::parse(bdf).unwrap();
        let mut st = self.state.lock().unwrap();
        let group = st.next_group;
        st.next_group += 1;
        st.devices.insert(
            bdf,
            Dev {
                vendor: "0x1234".into(),
                device: "0x1111".into(),
                driver: None,
                driver_override: None,
                sriov: None,
                physfn: None,
                iommu_group: group,
                qdma: BTreeMap::new(),
                bars: BTreeMap::new(),
            },
        );
        drop(st);
        self.sync();
    }

    /// A `bus/pci/devices/<bdf>` link that leads outside `devices/`.
    pub fn add_escaping_link(&self, bdf: &str) {
        self.state
            .lock()
            .unwrap()
            .escapes
            .insert(PciAddress::parse(bdf).unwrap());
        self.sync();
    }

    /// Unloads a driver; `load_module` can load it again.
    pub fn unload_driver(&self, name: &str) {
        let mut st = self.state.lock().unwrap();
        if let Some(model) = st.drivers.remove(name) {
            st.modules.insert(name.into(), model);
        }
        drop(st);
        self.sync();
    }

    /// Unloads a driver whose module is not installed either.
    pub fn remove_module(&self, name: &str) {
        self.unload_driver(name);
        self.state.lock().unwrap().modules.remove(name);
    }

    /// The modules `load_module` was asked for, in order.
    pub fn module_loads(&self) -> Vec<String> {
        self.state.lock().unwrap().loads.clone()
    }

    pub fn add_driver(&self, name: &str, model: DriverModel) {
        self.state
            .lock()
            .unwrap()
            .drivers
            .insert(name.into(), model);
        self.sync();
    }

    /// Binds directly, as if the device had been bound before the test.
    pub fn preset_driver(&self, bdf: &str, driver: &str) {
        let bdf = PciAddress::parse(bdf).unwrap();
        let mut st = self.state.lock().unwrap();
        st.bind(bdf, driver);
        drop(st);
        self.sync();
    }

    /// Gives the device memory BAR `bar` (0..=5) with `image` as its contents:
    /// a line in `resource` and a regular file `resource<bar>` (which the BAR
    /// reader maps like the kernel's). Lost when the device is destroyed.
    pub fn set_bar(&self, bdf: &str, bar: u8, image: &[u8]) {
        assert!(bar <= 5);
        let bdf = PciAddress::parse(bdf).unwrap();
        let mut st = self.state.lock().unwrap();
        let dev = st.devices.get_mut(&bdf).expect("device exists");
        dev.bars.insert(bar, image.to_vec());
        drop(st);
        self.sync();
    }

    /// Turns memory decoding of `bdf` off (PCI_COMMAND bit 1; for a PF also
    /// the VF MSE bit of its SR-IOV control) or back on.
    pub fn set_decoding(&self, bdf: &str, on: bool) {
        let bdf = PciAddress::parse(bdf).unwrap();
        let mut st = self.state.lock().unwrap();
        if on {
            st.decoding_off.remove(&bdf);
        } else {
            st.decoding_off.insert(bdf);
        }
        st.synced = None;
        drop(st);
        self.sync();
    }

    /// Puts `bdf` in power state D`state` (PMCSR and `power_state`).
    pub fn set_power_state(&self, bdf: &str, state: u8) {
        let bdf = PciAddress::parse(bdf).unwrap();
        let mut st = self.state.lock().unwrap();
        st.power.insert(bdf, state);
        st.synced = None;
        drop(st);
        self.sync();
    }

    /// The next write to a path ending in `suffix` blocks (as a kernel write
    /// waiting for a VF to be released) until the returned sender sends or is dropped.
    pub fn block_next_write(&self, suffix: &str) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.gate.lock().unwrap() = Some((suffix.into(), rx));
        tx
    }

    /// The next write to a path ending in `suffix` fails with `errno`.
    pub fn fail_next_write(&self, suffix: &str, e: i32) {
        self.state.lock().unwrap().failures.push((suffix.into(), e));
    }

    /// Every write so far: (path relative to the root, value).
    pub fn writes(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().writes.clone()
    }

    pub fn clear_writes(&self) {
        self.state.lock().unwrap().writes.clear();
    }

    pub fn add_firmware(&self, name: &str) {
        self.state
            .lock()
            .unwrap()
            .firmware_available
            .insert(name.into());
        self.sync();
    }

    pub fn fpga_firmware_loaded(&self) -> Vec<String> {
        self.state.lock().unwrap().fpga_firmware.clone()
    }

    pub fn qdma_setting(&self, bdf: &str, name: &str) -> Option<String> {
        let bdf = PciAddress::parse(bdf).unwrap();
        self.state
            .lock()
            .unwrap()
            .devices
            .get(&bdf)?
            .qdma
            .get(name)
            .cloned()
    }

    /// Brings the tree on disk up to the state: a full rebuild when drivers or
    /// the FPGA manager changed, otherwise only the devices that changed.
    fn sync(&self) {
        let mut st = self.state.lock().unwrap();
        let root = self.dir.path();
        let globals_same = st.synced.as_ref().is_some_and(|s| {
            s.drivers == st.drivers
                && s.escapes == st.escapes
                && s.fpga_firmware == st.fpga_firmware
        });
        if !globals_same {
            full_rebuild(&st, root);
        } else {
            let old = &st.synced.as_ref().unwrap().devices;
            for (bdf, dev) in old {
                if st.devices.get(bdf) != Some(dev) {
                    remove_device(root, *bdf, dev);
                }
            }
            for (bdf, dev) in &st.devices {
                if old.get(bdf) != Some(dev) {
                    render_device(&st, root, *bdf, dev);
                }
            }
        }
        st.synced = Some(Synced {
            drivers: st.drivers.clone(),
            escapes: st.escapes.clone(),
            fpga_firmware: st.fpga_firmware.clone(),
            devices: st.devices.clone(),
        });
    }
}

fn remove_device(root: &Path, bdf: PciAddress, dev: &Dev) {
    let name = bdf.to_string();
    let _ = fs::remove_dir_all(root.join("devices/pci0000:00").join(&name));
    let _ = fs::remove_file(root.join("bus/pci/devices").join(&name));
    if let Some(drv) = &dev.driver {
        let _ = fs::remove_file(root.join("bus/pci/drivers").join(drv).join(&name));
    }
}

fn full_rebuild(st: &State, root: &Path) {
    for top in ["devices", "bus", "kernel", "class", "outside"] {
        let _ = fs::remove_dir_all(root.join(top));
    }
    let drivers = root.join("bus/pci/drivers");
    let links = root.join("bus/pci/devices");
    for d in [
        &root.join("devices/pci0000:00"),
        &drivers,
        &links,
        &root.join("kernel/iommu_groups"),
        &root.join("outside/0000:0f:00.0"),
    ] {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(root.join("bus/pci/drivers_probe"), "").unwrap();
    fs::write(root.join("bus/pci/rescan"), "").unwrap();
    for name in st.drivers.keys() {
        let d = drivers.join(name);
        fs::create_dir_all(&d).unwrap();
        for f in ["bind", "unbind", "new_id", "remove_id"] {
            fs::write(d.join(f), "").unwrap();
        }
    }
    let fpga = root.join("class/fpga_manager/fpga0");
    fs::create_dir_all(&fpga).unwrap();
    fs::write(fpga.join("firmware"), "").unwrap();
    fs::write(fpga.join("name"), "fake FPGA manager\n").unwrap();
    let state = if st.fpga_firmware.is_empty() {
        "unknown"
    } else {
        "operating"
    };
    fs::write(fpga.join("state"), format!("{state}\n")).unwrap();
    for (bdf, dev) in &st.devices {
        render_device(st, root, *bdf, dev);
    }
    for bdf in &st.escapes {
        symlink(
            format!("../../../outside/{bdf}"),
            links.join(bdf.to_string()),
        )
        .unwrap();
    }
}

fn render_device(st: &State, root: &Path, bdf: PciAddress, dev: &Dev) {
    let name = bdf.to_string();
    let d = root.join("devices/pci0000:00").join(&name);
    let drivers = root.join("bus/pci/drivers");
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("vendor"), format!("{}\n", dev.vendor)).unwrap();
    fs::write(d.join("device"), format!("{}\n", dev.device)).unwrap();
    fs::write(d.join("remove"), "").unwrap();
    let ovr = dev.driver_override.as_deref().unwrap_or("(null)");
    fs::write(d.join("driver_override"), format!("{ovr}\n")).unwrap();
    let group = root.join(format!("kernel/iommu_groups/{}", dev.iommu_group));
    fs::create_dir_all(group.join("devices")).unwrap();
    symlink(
        format!("../../../kernel/iommu_groups/{}", dev.iommu_group),
        d.join("iommu_group"),
    )
    .unwrap();
    if let Some(drv) = &dev.driver {
        symlink(format!("../../../bus/pci/drivers/{drv}"), d.join("driver")).unwrap();
        symlink(
            format!("../../../../devices/pci0000:00/{name}"),
            drivers.join(drv).join(&name),
        )
        .unwrap();
    }
    // As the kernel: one `start end flags` line per resource (BARs 0..5, the
    // ROM, the SR-IOV BARs), zeros when absent; `resource<N>` for memory BARs.
    let mut resource = String::new();
    for i in 0..13u8 {
        let (start, end, flags) = match dev.bars.get(&i) {
            Some(image) if !image.is_empty() => {
                let start = 0xf000_0000u64 + (u64::from(i) << 24);
                (start, start + image.len() as u64 - 1, 0x0004_0200u64)
            }
            _ => (0, 0, 0),
        };
        resource.push_str(&format!("{start:#018x} {end:#018x} {flags:#018x}\n"));
    }
    fs::write(d.join("resource"), resource).unwrap();
    // Config space as the kernel shows it (4096 bytes, root): ids, command,
    // a PM capability at 0x40, the SR-IOV capability at 0x100 on PFs.
    let mut cfg = vec![0u8; 4096];
    let hex = |t: &str| u16::from_str_radix(t.trim_start_matches("0x"), 16).unwrap_or(0xffff);
    let put16 =
        |cfg: &mut Vec<u8>, at: usize, v: u16| cfg[at..at + 2].copy_from_slice(&v.to_le_bytes());
    // A VF's vendor and device ids read all ones (SR-IOV); sysfs has the real ones.
    let ids = if dev.physfn.is_some() {
        (0xffff, 0xffff)
    } else {
        (hex(&dev.vendor), hex(&dev.device))
    };
    put16(&mut cfg, 0, ids.0);
    put16(&mut cfg, 2, ids.1);
    // A VF's own memory space bit is hardwired to 0; its PF's VF MSE decides.
    let mse = dev.physfn.is_none() && !st.decoding_off.contains(&bdf);
    put16(&mut cfg, 4, 0x0004 | if mse { 0x0002 } else { 0 });
    put16(&mut cfg, 6, 0x0010);
    cfg[0x34] = 0x40;
    cfg[0x40] = 0x01;
    let power = st.power.get(&bdf).copied().unwrap_or(0);
    put16(&mut cfg, 0x44, u16::from(power & 3));
    if let Some(s) = &dev.sriov {
        cfg[0x100..0x104].copy_from_slice(&(0x0010u32 | 1 << 16).to_le_bytes());
        let vf_mse = if st.decoding_off.contains(&bdf) {
            0
        } else {
            0x8
        };
        put16(&mut cfg, 0x108, if s.num > 0 { 0x1 | vf_mse } else { 0 });
    }
    fs::write(d.join("config"), cfg).unwrap();
    let state = match power {
        0 => "D0",
        1 => "D1",
        2 => "D2",
        _ => "D3hot",
    };
    fs::write(d.join("power_state"), format!("{state}\n")).unwrap();
    for (i, image) in &dev.bars {
        fs::write(d.join(format!("resource{i}")), image).unwrap();
    }
    if !dev.qdma.is_empty() {
        fs::create_dir_all(d.join("qdma")).unwrap();
        for (k, v) in &dev.qdma {
            fs::write(d.join("qdma").join(k), format!("{v}\n")).unwrap();
        }
    }
    if let Some(s) = &dev.sriov {
        fs::write(d.join("sriov_totalvfs"), format!("{}\n", st.total(dev, s))).unwrap();
        fs::write(d.join("sriov_numvfs"), format!("{}\n", s.num)).unwrap();
        fs::write(
            d.join("sriov_drivers_autoprobe"),
            format!("{}\n", u8::from(s.autoprobe)),
        )
        .unwrap();
        for i in 0..s.num {
            symlink(
                format!("../{}", vf_address(bdf, s, i)),
                d.join(format!("virtfn{i}")),
            )
            .unwrap();
        }
    }
    if let Some(pf) = dev.physfn {
        symlink(format!("../{pf}"), d.join("physfn")).unwrap();
    }
    symlink(
        format!("../../../devices/pci0000:00/{name}"),
        root.join("bus/pci/devices").join(&name),
    )
    .unwrap();
}

fn vf_address(pf: PciAddress, s: &Sriov, i: u16) -> PciAddress {
    let devfn = u16::from(pf.device()) << 3 | u16::from(pf.function());
    let devfn = devfn + s.offset + i;
    let text = format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        pf.domain(),
        pf.bus(),
        devfn >> 3 & 0x1f,
        devfn & 7
    );
    PciAddress::parse(&text).unwrap()
}

impl State {
    fn total(&self, dev: &Dev, s: &Sriov) -> u16 {
        let cap = dev
            .driver
            .as_ref()
            .and_then(|d| self.drivers.get(d))
            .and_then(|m| m.max_vfs);
        cap.map_or(s.cap_total, |c| c.min(s.cap_total))
    }

    fn bind(&mut self, bdf: PciAddress, driver: &str) {
        let qdma = self.drivers.get(driver).is_some_and(|m| m.qdma);
        let dev = self.devices.get_mut(&bdf).unwrap();
        dev.driver = Some(driver.into());
        if qdma {
            dev.qdma.insert("qmax".into(), "0".into());
            dev.qdma.insert("intr_rngsz".into(), "0".into());
        }
    }

    fn unbind(&mut self, bdf: PciAddress) {
        let dev = self.devices.get_mut(&bdf).unwrap();
        dev.driver = None;
        dev.qdma.clear();
    }

    /// What `drivers_probe` would bind `bdf` to.
    fn probe_candidate(&self, bdf: PciAddress) -> Option<String> {
        let dev = self.devices.get(&bdf)?;
        if dev.driver.is_some() {
            return None;
        }
        if let Some(ovr) = &dev.driver_override {
            return self
                .drivers
                .get(ovr)
                .is_some_and(|m| !m.probe_fails)
                .then(|| ovr.clone());
        }
        if let Some(pf) = dev.physfn {
            if !self.devices[&pf].sriov.as_ref().unwrap().autoprobe {
                return None;
            }
        }
        self.drivers
            .iter()
            .find(|(_, m)| {
                m.ids
                    .iter()
                    .any(|(v, d)| *v == dev.vendor && *d == dev.device)
            })
            .map(|(n, _)| n.clone())
    }

    fn set_numvfs(&mut self, pf: PciAddress, value: &str) -> io::Result<()> {
        let n: u16 = value.trim().parse().map_err(|_| errno(libc::EINVAL))?;
        let dev = self.devices[&pf].clone();
        let s = dev.sriov.clone().ok_or_else(|| errno(libc::EACCES))?;
        if n > self.total(&dev, &s) {
            return Err(errno(libc::ERANGE));
        }
        if n == s.num {
            return Ok(());
        }
        let model = dev
            .driver
            .as_ref()
            .and_then(|d| self.drivers.get(d))
            .ok_or_else(|| errno(libc::ENOENT))?;
        if !model.sriov_configure {
            return Err(errno(libc::ENOENT));
        }
        if n == 0 {
            for i in 0..s.num {
                self.devices.remove(&vf_address(pf, &s, i));
            }
        } else {
            if s.num != 0 {
                return Err(errno(libc::EBUSY));
            }
            for i in 0..n {
                let vf = vf_address(pf, &s, i);
                let group = self.next_group;
                self.next_group += 1;
                self.devices.insert(
                    vf,
                    Dev {
                        vendor: dev.vendor.clone(),
                        device: s.vf_device.clone(),
                        driver: None,
                        driver_override: None,
                        sriov: None,
                        physfn: Some(pf),
                        iommu_group: group,
                        qdma: BTreeMap::new(),
                        bars: BTreeMap::new(),
                    },
                );
                if s.autoprobe {
                    if let Some(drv) = self.probe_candidate(vf) {
                        self.bind(vf, &drv);
                    }
                }
            }
        }
        self.devices
            .get_mut(&pf)
            .unwrap()
            .sriov
            .as_mut()
            .unwrap()
            .num = n;
        Ok(())
    }

    fn remove(&mut self, bdf: PciAddress) {
        if let Some(mut dev) = self.devices.remove(&bdf) {
            if let Some(s) = dev.sriov.as_mut() {
                for i in 0..s.num {
                    self.devices.remove(&vf_address(bdf, s, i));
                }
                s.num = 0;
                s.autoprobe = true;
            }
            dev.driver = None;
            dev.driver_override = None;
            dev.qdma.clear();
            self.removed.insert(bdf, dev);
        }
    }

    fn write(&mut self, rel: &str, value: &str) -> io::Result<()> {
        let parts: Vec<&str> = rel.split('/').collect();
        match parts.as_slice() {
            ["bus", "pci", "drivers_probe"] => {
                let bdf = PciAddress::parse(value.trim()).map_err(|_| errno(libc::ENODEV))?;
                if !self.devices.contains_key(&bdf) {
                    return Err(errno(libc::ENODEV));
                }
                if let Some(drv) = self.probe_candidate(bdf) {
                    self.bind(bdf, &drv);
                }
                Ok(())
            }
            ["bus", "pci", "rescan"] => {
                let removed = std::mem::take(&mut self.removed);
                self.devices.extend(removed);
                Ok(())
            }
            ["bus", "pci", "drivers", drv, op] => {
                if !self.drivers.contains_key(*drv) {
                    return Err(errno(libc::ENOENT));
                }
                let bdf = PciAddress::parse(value.trim()).map_err(|_| errno(libc::ENODEV))?;
                match *op {
                    "unbind" => {
                        let dev = self.devices.get(&bdf).ok_or_else(|| errno(libc::ENODEV))?;
                        if dev.driver.as_deref() != Some(*drv) {
                            return Err(errno(libc::ENODEV));
                        }
                        self.unbind(bdf);
                        Ok(())
                    }
                    "bind" => {
                        let dev = self.devices.get(&bdf).ok_or_else(|| errno(libc::ENODEV))?;
                        if dev.driver.is_some() {
                            return Err(errno(libc::EBUSY));
                        }
                        self.bind(bdf, drv);
                        Ok(())
                    }
                    // new_id is recorded (tests assert it is never used) and accepted.
                    "new_id" | "remove_id" => Ok(()),
                    _ => Err(errno(libc::ENOENT)),
                }
            }
            ["bus", "pci", "devices", name, rest @ ..] => {
                if let Ok(bdf) = PciAddress::parse(name) {
                    if self.escapes.contains(&bdf) {
                        return Err(errno(libc::ENOENT));
                    }
                }
                let bdf = PciAddress::parse(name).map_err(|_| errno(libc::ENOENT))?;
                let dev = self
                    .devices
                    .get(&bdf)
                    .ok_or_else(|| errno(libc::ENOENT))?
                    .clone();
                match rest {
                    ["sriov_numvfs"] => self.set_numvfs(bdf, value),
                    ["sriov_drivers_autoprobe"] => {
                        let v = match value.trim() {
                            "0" => false,
                            "1" => true,
                            _ => return Err(errno(libc::EINVAL)),
                        };
                        let s = self
                            .devices
                            .get_mut(&bdf)
                            .unwrap()
                            .sriov
                            .as_mut()
                            .ok_or_else(|| errno(libc::ENOENT))?;
                        s.autoprobe = v;
                        Ok(())
                    }
                    ["driver_override"] => {
                        let v = value.trim_end_matches('\n');
                        self.devices.get_mut(&bdf).unwrap().driver_override =
                            (!v.is_empty()).then(|| v.to_owned());
                        Ok(())
                    }
                    ["driver", "unbind"] => {
                        let drv = dev.driver.ok_or_else(|| errno(libc::ENOENT))?;
                        self.write(&format!("bus/pci/drivers/{drv}/unbind"), value)
                    }
                    ["remove"] => {
                        self.remove(bdf);
                        Ok(())
                    }
                    ["qdma", setting] => {
                        let d = self.devices.get_mut(&bdf).unwrap();
                        match d.qdma.get_mut(*setting) {
                            Some(v) => {
                                let n: u64 =
                                    value.trim().parse().map_err(|_| errno(libc::EINVAL))?;
                                *v = n.to_string();
                                Ok(())
                            }
                            None => Err(errno(libc::ENOENT)),
                        }
                    }
                    ["vendor" | "device" | "sriov_totalvfs" | "iommu_group"] => {
                        Err(errno(libc::EACCES))
                    }
                    _ => Err(errno(libc::ENOENT)),
                }
            }
            ["class", "fpga_manager", "fpga0", "firmware"] => {
                let name = value.trim();
                if !self.firmware_available.contains(name) {
                    return Err(errno(libc::ENOENT));
                }
                self.fpga_firmware.push(name.to_owned());
                Ok(())
            }
            _ => Err(errno(libc::ENOENT)),
        }
    }
}

impl Sysfs for FakeSysfs {
    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn load_module(&self, name: &str) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        st.loads.push(name.into());
        // modprobe treats '-' and '_' alike.
        let key = st
            .modules
            .keys()
            .find(|k| k.replace('_', "-") == name.replace('_', "-"))
            .cloned();
        let Some(key) = key else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("modprobe: FATAL: Module {name} not found"),
            ));
        };
        let model = st.modules.remove(&key).unwrap();
        st.drivers.insert(key, model);
        drop(st);
        self.sync();
        Ok(())
    }

    fn write(&self, rel: &Path, value: &str) -> io::Result<()> {
        let rel_text = rel.to_string_lossy().into_owned();
        let gate = {
            let mut g = self.gate.lock().unwrap();
            match &*g {
                Some((suffix, _)) if rel_text.ends_with(suffix.as_str()) => g.take(),
                _ => None,
            }
        };
        if let Some((_, rx)) = gate {
            let _ = rx.recv();
        }
        let result = {
            let mut st = self.state.lock().unwrap();
            st.writes.push((rel_text.clone(), value.to_owned()));
            if let Some(i) = st
                .failures
                .iter()
                .position(|(suffix, _)| rel_text.ends_with(suffix.as_str()))
            {
                let (_, e) = st.failures.remove(i);
                Err(errno(e))
            } else {
                st.write(&rel_text, value)
            }
        };
        self.sync();
        result
    }
}

/// Convenience for tests: a path under the fake's root.
#[allow(dead_code)]
pub(crate) fn abs(fake: &FakeSysfs, rel: &str) -> PathBuf {
    fake.root().join(rel)
}
