//! SR-IOV PF management on sysfs: discovery, VF count, driver binding.

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::error::Error;
use crate::nvme::{NvmeOpener, NvmeResources, NVME_PF_DRIVER};
use crate::pci::{DriverName, PciAddress};
use crate::qdma::QdmaProfile;
use crate::status::{
    HeldBy, PfStatus, Status, Step, VfStatus, VfsSetReport, STATUS_FORMAT_VERSION,
};
use crate::sysfs::Sysfs;

/// Most threads used to bind VFs at once.
pub const BIND_THREADS: usize = 8;

/// What `/proc/<pid>/fd/N` and `/proc/<pid>/maps` show for a VFIO device file.
const VFIO_DEVICE_INODE: &str = "anon_inode:[vfio-device]";

/// Largest `/proc/<pid>/maps` read (a VMM's is a few hundred KiB).
const MAX_MAPS_BYTES: u64 = 16 << 20;

/// A device the in-use check looks for.
#[derive(Debug)]
struct Watched {
    dev: PciAddress,
    /// Its VFIO group and cdev nodes (empty unless on vfio-pci).
    files: Vec<PathBuf>,
    /// `/sys/devices/...` as the kernel names it.
    kernel_path: PathBuf,
}

/// What the /proc scan found.
#[derive(Debug)]
struct Holders {
    /// (device, pid, what), at most one per device.
    found: Vec<(PciAddress, u32, PathBuf)>,
    /// VFIO device fds of unknown device, (pid, what).
    unidentified: Vec<(u32, PathBuf)>,
    watched: Vec<Watched>,
}

/// A text file of /proc read up to `max` bytes; `None` when unreadable.
fn read_bounded(path: &Path, max: u64) -> Option<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(std::fs::File::open(path).ok()?, max),
        &mut text,
    )
    .ok()?;
    Some(text)
}

/// What `set_vf_count` does besides writing the count.
#[derive(Debug, Clone, Default)]
pub struct VfsSetOptions {
    /// Bind the PF to this driver first (e.g. `pci-pf-stub`, `igb`, `qdma-pf`).
    pub pf_driver: Option<DriverName>,
    /// Bind every VF to this driver afterwards (normally `vfio-pci`).
    pub bind: Option<DriverName>,
    /// QDMA settings applied after the VFs exist (skipped unless the PF driver is `qdma-pf`).
    pub qdma: Option<QdmaProfile>,
}

/// SR-IOV operations on one sysfs tree.
#[derive(Debug)]
pub struct SriovManager<S: Sysfs> {
    sysfs: S,
    proc_root: PathBuf,
    nvme: std::sync::Arc<dyn NvmeOpener>,
}

/// Milliseconds since `start`, rounded to the microsecond (for logs and step reports).
pub(crate) fn elapsed_ms(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// Times a step and records it.
pub(crate) fn timed<T>(
    steps: &mut Vec<Step>,
    name: &str,
    f: impl FnOnce() -> Result<T, Error>,
) -> Result<T, Error> {
    let start = Instant::now();
    let result = f();
    let ms = elapsed_ms(start);
    info!(step = name, ms, ok = result.is_ok(), "step done");
    steps.push(Step {
        name: name.to_owned(),
        ms,
    });
    result
}

fn parse_u16(path: &Path, text: &str) -> Result<u16, Error> {
    text.trim().parse().map_err(|_| Error::Parse {
        path: path.to_owned(),
        content: text.to_owned(),
    })
}

impl<S: Sysfs> SriovManager<S> {
    /// Operations on `sysfs`.
    pub fn new(sysfs: S) -> Self {
        let nvme = std::sync::Arc::new(crate::nvme::DevNvmeOpener {
            sysfs_root: sysfs.root().to_owned(),
        });
        SriovManager {
            sysfs,
            proc_root: PathBuf::from("/proc"),
            nvme,
        }
    }

    /// Uses `opener` to reach the NVMe controller of nvme-profile PFs
    /// (default: `/dev/nvmeN` found under the sysfs root).
    pub fn with_nvme_opener(mut self, opener: std::sync::Arc<dyn NvmeOpener>) -> Self {
        self.nvme = opener;
        self
    }

    /// The opener of NVMe controllers.
    pub fn nvme_opener(&self) -> &dyn NvmeOpener {
        &*self.nvme
    }

    /// Uses `root` instead of `/proc` to find processes holding VFIO files.
    pub fn with_proc_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.proc_root = root.into();
        self
    }

    /// What identifies a holder of `dev`: its VFIO files when it is bound to
    /// `vfio-pci` (its group `/dev/vfio/<group>` and cdevs
    /// `/dev/vfio/devices/vfioN`), and its kernel path (`/sys/devices/...`),
    /// which a VFIO device fd names in its fdinfo and a BAR mapping of a
    /// `resource<N>` file in `/proc/<pid>/maps`.
    fn watch(&self, dev: PciAddress) -> Result<Watched, Error> {
        let dir = self.device_dir(dev)?;
        let mut files = Vec::new();
        if self.driver_in(&dir)?.as_deref() == Some("vfio-pci") {
            if let Some(group) = self.link_name(&dir.join("iommu_group"))? {
                files.push(Path::new("/dev/vfio").join(group));
            }
            if let Ok(cdevs) = self.sysfs.list(&dir.join("vfio-dev")) {
                files.extend(cdevs.iter().map(|c| Path::new("/dev/vfio/devices").join(c)));
            }
        }
        let root = self.sysfs.root();
        let real = self
            .sysfs
            .canonicalize(&dir)
            .map_err(|source| Error::NoSuchDevice {
                bdf: dev,
                path: root.join(&dir),
                source,
            })?;
        let canonical_root = self
            .sysfs
            .canonicalize(Path::new(""))
            .unwrap_or(root.to_owned());
        let rel = real.strip_prefix(&canonical_root).unwrap_or(&real);
        Ok(Watched {
            dev,
            files,
            kernel_path: Path::new("/sys").join(rel),
        })
    }

    /// The processes holding one of `devices`, as (device, pid, what), at most
    /// one entry per device: an open VFIO group or cdev, a VFIO device fd
    /// (`anon_inode:[vfio-device]` whose fdinfo names the device, kept even
    /// after its group fd is closed), or a mapping of one of its BARs (a sysfs
    /// `resource<N>` file, or a VFIO region of a process that holds no
    /// identifiable VFIO device fd). Processes whose fd table the caller cannot
    /// read are not seen, nor an fd in flight in a unix socket.
    fn vfio_holders(
        &self,
        devices: &[PciAddress],
    ) -> Result<Vec<(PciAddress, u32, PathBuf)>, Error> {
        Ok(self.scan_holders(devices)?.found)
    }

    /// [`SriovManager::vfio_holders`], plus the VFIO device fds whose device
    /// the kernel does not name (fdinfo without `vfio-device-syspath`, as on
    /// Linux 6.12), as (pid, what).
    fn scan_holders(&self, devices: &[PciAddress]) -> Result<Holders, Error> {
        let watched: Vec<Watched> = devices
            .iter()
            .map(|d| self.watch(*d))
            .collect::<Result<_, _>>()?;
        let mut found: Vec<(PciAddress, u32, PathBuf)> = Vec::new();
        let mut unidentified: Vec<(u32, PathBuf)> = Vec::new();
        if watched.is_empty() {
            return Ok(Holders {
                found,
                unidentified,
                watched,
            });
        }
        // Without a process list nothing can be said: an error, not "nobody".
        let procs = std::fs::read_dir(&self.proc_root).map_err(|source| Error::Sysfs {
            op: "read",
            path: self.proc_root.clone(),
            source,
        })?;
        let add = |found: &mut Vec<(PciAddress, u32, PathBuf)>, dev: PciAddress, pid, what| {
            if !found.iter().any(|(d, _, _)| *d == dev) {
                found.push((dev, pid, what));
            }
        };
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Processes come and go, and some fd tables are not readable: skip those.
            let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
                continue;
            };
            let mut has_device_fd = false;
            for fd in fds.flatten() {
                let Ok(target) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                if target.as_os_str() == VFIO_DEVICE_INODE {
                    has_device_fd = true;
                    let info = entry.path().join("fdinfo").join(fd.file_name());
                    let Some(syspath) = read_bounded(&info, 64 * 1024).and_then(|t| {
                        t.lines()
                            .find_map(|l| l.strip_prefix("vfio-device-syspath:"))
                            .map(|p| PathBuf::from(p.trim()))
                    }) else {
                        // The kernel does not name the device: the group probe
                        // of the in-use check finds it.
                        unidentified.push((
                            pid,
                            PathBuf::from(format!(
                                "{VFIO_DEVICE_INODE} (VFIO device fd {})",
                                fd.file_name().to_string_lossy()
                            )),
                        ));
                        continue;
                    };
                    for w in watched.iter().filter(|w| w.kernel_path == syspath) {
                        let what = PathBuf::from(format!(
                            "{VFIO_DEVICE_INODE} (VFIO device fd {})",
                            fd.file_name().to_string_lossy()
                        ));
                        add(&mut found, w.dev, pid, what);
                    }
                    continue;
                }
                for w in watched.iter().filter(|w| w.files.contains(&target)) {
                    add(&mut found, w.dev, pid, target.clone());
                }
            }
            let Some(maps) = read_bounded(&entry.path().join("maps"), MAX_MAPS_BYTES) else {
                continue;
            };
            for line in maps.lines() {
                // The path is the 6th field; it may contain spaces.
                let Some(path) = line.splitn(6, ' ').nth(5).map(str::trim_start) else {
                    continue;
                };
                if path == VFIO_DEVICE_INODE && !has_device_fd {
                    // A VFIO region mapped by a process that closed its device
                    // fd: which device is not shown, so every watched one on
                    // vfio-pci may be it.
                    for w in watched.iter().filter(|w| !w.files.is_empty()) {
                        let what =
                            PathBuf::from(format!("{VFIO_DEVICE_INODE} (a mapped VFIO region)"));
                        add(&mut found, w.dev, pid, what);
                    }
                    continue;
                }
                let p = Path::new(path);
                for w in &watched {
                    let is_bar = p.parent() == Some(&w.kernel_path)
                        && p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("resource"));
                    if is_bar {
                        add(
                            &mut found,
                            w.dev,
                            pid,
                            PathBuf::from(format!("{path} (mapped)")),
                        );
                    }
                }
            }
        }
        found.sort();
        Ok(Holders {
            found,
            unidentified,
            watched,
        })
    }

    /// The process name (`/proc/<pid>/comm`), empty when unreadable.
    fn comm(&self, pid: u32) -> String {
        std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("comm"))
            .map(|c| c.trim_end().to_owned())
            .unwrap_or_default()
    }

    /// Refuses when one of `devices` is held: removing or unbinding it would
    /// block in the kernel until it is released. First the processes seen in
    /// `/proc` ([`SriovManager::vfio_holders`]); then, for each device on
    /// vfio-pci, the kernel's own exclusivity: a group that an open device fd
    /// still references cannot be opened again (`EBUSY`), which also reveals
    /// device fds whose device fdinfo does not name and fds no process table
    /// shows (in flight in a unix socket). The probe opens and at once closes
    /// the group, which touches no device.
    fn check_not_in_use(&self, pf: PciAddress, devices: &[PciAddress]) -> Result<(), Error> {
        #[cfg(debug_assertions)]
        if std::env::var_os("SVFF_TEST_SKIP_IN_USE_CHECK").is_some_and(|v| v == "1") {
            warn!(%pf, "debug build: in-use check skipped (SVFF_TEST_SKIP_IN_USE_CHECK=1)");
            return Ok(());
        }
        let holders = self.scan_holders(devices)?;
        if let Some((vf, pid, file)) = holders.found.into_iter().next() {
            return Err(Error::VfInUse { pf, vf, pid, file });
        }
        for w in &holders.watched {
            let Some(group) = w.files.iter().find(|f| !f.starts_with("/dev/vfio/devices")) else {
                continue;
            };
            let probe = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(group);
            match probe {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(match holders.unidentified.first() {
                        Some((pid, what)) => Error::VfInUse {
                            pf,
                            vf: w.dev,
                            pid: *pid,
                            file: PathBuf::from(format!(
                                "{} while {} is busy",
                                what.display(),
                                group.display()
                            )),
                        },
                        None => Error::VfHeldUnseen {
                            pf,
                            vf: w.dev,
                            group: group.clone(),
                        },
                    });
                }
                // Closed at once; a group with no device open has nothing to release.
                Ok(_) => {}
                // No such node or not allowed (non-root): nothing more to learn.
                Err(e) => debug!(group = %group.display(), error = %e, "group probe"),
            }
        }
        Ok(())
    }

    /// The sysfs layer.
    pub fn sysfs(&self) -> &S {
        &self.sysfs
    }

    fn read(&self, rel: &Path) -> Result<String, Error> {
        self.sysfs.read(rel).map_err(|source| Error::Sysfs {
            op: "read",
            path: self.sysfs.root().join(rel),
            source,
        })
    }

    fn write(&self, rel: &Path, value: &str) -> Result<(), Error> {
        debug!(path = %rel.display(), value, "sysfs write");
        self.sysfs.write(rel, value).map_err(|source| Error::Sysfs {
            op: "write",
            path: self.sysfs.root().join(rel),
            source,
        })
    }

    /// The device's directory (relative to the root), checked to exist and to
    /// resolve under `<root>/devices`.
    pub(crate) fn device_dir(&self, bdf: PciAddress) -> Result<PathBuf, Error> {
        let rel = bdf.sysfs_rel();
        let resolved = self
            .sysfs
            .canonicalize(&rel)
            .map_err(|source| Error::NoSuchDevice {
                bdf,
                path: self.sysfs.root().join(&rel),
                source,
            })?;
        let devices = self
            .sysfs
            .canonicalize(Path::new("devices"))
            .map_err(|source| Error::Sysfs {
                op: "read",
                path: self.sysfs.root().join("devices"),
                source,
            })?;
        if !resolved.starts_with(&devices) || resolved == devices {
            return Err(Error::OutsideDevices {
                bdf,
                path: resolved,
            });
        }
        Ok(rel)
    }

    /// The device's bound driver, `None` when unbound.
    pub fn driver_of(&self, bdf: PciAddress) -> Result<Option<String>, Error> {
        let dir = self.device_dir(bdf)?;
        self.driver_in(&dir)
    }

    /// The device's IOMMU group (its `iommu_group` link), `None` when it
    /// has none.
    pub fn iommu_group_of(&self, bdf: PciAddress) -> Result<Option<u32>, Error> {
        self.group_in(&self.device_dir(bdf)?)
    }

    /// The IOMMU group of the device at `dir` (its `iommu_group` link).
    fn group_in(&self, dir: &Path) -> Result<Option<u32>, Error> {
        let rel = dir.join("iommu_group");
        match self.link_name(&rel)? {
            Some(n) => n.parse().map(Some).map_err(|_| Error::Parse {
                path: self.sysfs.root().join(&rel),
                content: n,
            }),
            None => Ok(None),
        }
    }

    fn driver_in(&self, dir: &Path) -> Result<Option<String>, Error> {
        self.link_name(&dir.join("driver"))
    }

    fn link_name(&self, rel: &Path) -> Result<Option<String>, Error> {
        match self.sysfs.read_link(rel) {
            Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Sysfs {
                op: "read",
                path: self.sysfs.root().join(rel),
                source,
            }),
        }
    }

    fn pf_dir(&self, pf: PciAddress) -> Result<PathBuf, Error> {
        let dir = self.device_dir(pf)?;
        let total = dir.join("sriov_totalvfs");
        if !self.sysfs.exists(&total) {
            return Err(Error::NotSriov {
                bdf: pf,
                path: self.sysfs.root().join(total),
            });
        }
        Ok(dir)
    }

    /// Every SR-IOV capable device (one with `sriov_totalvfs`), sorted.
    pub fn list_pfs(&self) -> Result<Vec<PciAddress>, Error> {
        let devices = Path::new("bus/pci/devices");
        let names = self.sysfs.list(devices).map_err(|source| Error::Sysfs {
            op: "read",
            path: self.sysfs.root().join(devices),
            source,
        })?;
        let mut pfs: Vec<PciAddress> = names
            .iter()
            .filter_map(|n| PciAddress::parse(n).ok())
            .filter(|a| self.sysfs.exists(&a.sysfs_rel().join("sriov_totalvfs")))
            .collect();
        pfs.sort();
        Ok(pfs)
    }

    /// The status of the given PFs (all SR-IOV PFs when `pfs` is `None`).
    pub fn status(&self, pfs: Option<&[PciAddress]>) -> Result<Status, Error> {
        let list = match pfs {
            Some(p) => {
                let mut p = p.to_vec();
                p.sort();
                p
            }
            None => self.list_pfs()?,
        };
        let pfs = list
            .into_iter()
            .map(|pf| self.pf_status(pf))
            .collect::<Result<_, _>>()?;
        Ok(Status {
            assignments: Vec::new(),
            vms: Vec::new(),
            format_version: STATUS_FORMAT_VERSION,
            pfs,
        })
    }

    /// `sriov_totalvfs` and `sriov_numvfs` of a PF.
    pub fn vf_counts(&self, pf: PciAddress) -> Result<(u16, u16), Error> {
        let dir = self.pf_dir(pf)?;
        self.counts_in(&dir)
    }

    fn counts_in(&self, dir: &Path) -> Result<(u16, u16), Error> {
        let total_rel = dir.join("sriov_totalvfs");
        let num_rel = dir.join("sriov_numvfs");
        let root = self.sysfs.root();
        let total = parse_u16(&root.join(&total_rel), &self.read(&total_rel)?)?;
        let num = parse_u16(&root.join(&num_rel), &self.read(&num_rel)?)?;
        Ok((total, num))
    }

    /// The PF's VFs from its `virtfnN` links, in index order.
    pub fn vfs(&self, pf: PciAddress) -> Result<Vec<(u16, PciAddress)>, Error> {
        let dir = self.pf_dir(pf)?;
        self.vfs_in(&dir)
    }

    fn vfs_in(&self, dir: &Path) -> Result<Vec<(u16, PciAddress)>, Error> {
        let names = self.sysfs.list(dir).map_err(|source| Error::Sysfs {
            op: "read",
            path: self.sysfs.root().join(dir),
            source,
        })?;
        let mut vfs = Vec::new();
        for name in names {
            let Some(index) = name
                .strip_prefix("virtfn")
                .and_then(|i| i.parse::<u16>().ok())
            else {
                continue;
            };
            let link = dir.join(&name);
            let target = self.sysfs.read_link(&link).map_err(|source| Error::Sysfs {
                op: "read",
                path: self.sysfs.root().join(&link),
                source,
            })?;
            let text = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let vf = PciAddress::parse(&text).map_err(|_| Error::Parse {
                path: self.sysfs.root().join(&link),
                content: target.display().to_string(),
            })?;
            vfs.push((index, vf));
        }
        vfs.sort();
        Ok(vfs)
    }

    /// Everything about one PF.
    pub fn pf_status(&self, pf: PciAddress) -> Result<PfStatus, Error> {
        let dir = self.pf_dir(pf)?;
        let (totalvfs, numvfs) = self.counts_in(&dir)?;
        let autoprobe_rel = dir.join("sriov_drivers_autoprobe");
        let drivers_autoprobe = self.read(&autoprobe_rel)? != "0";
        let mut vfs = Vec::new();
        let pf_driver = self.driver_in(&dir)?;
        let (nvme, secondaries) = if pf_driver.as_deref() == Some(NVME_PF_DRIVER) {
            let (st, secs) = crate::nvme::read_status(&*self.nvme, pf);
            (Some(st), secs)
        } else {
            (None, Default::default())
        };
        let list = self.vfs_in(&dir)?;
        let held = self.vfio_holders(&list.iter().map(|(_, vf)| *vf).collect::<Vec<_>>())?;
        for (index, vf) in list {
            let vf_dir = self.device_dir(vf)?;
            let iommu_group = self.group_in(&vf_dir)?;
            let vendor = self.read(&vf_dir.join("vendor"))?;
            let device = self.read(&vf_dir.join("device"))?;
            let fpga = self.fpga_status(vf, &vendor, &device);
            vfs.push(VfStatus {
                index,
                bdf: vf,
                vendor,
                device,
                driver: self.driver_in(&vf_dir)?,
                iommu_group,
                holder: None,
                held_by: held
                    .iter()
                    .find(|(d, _, _)| *d == vf)
                    .map(|(_, pid, file)| HeldBy {
                        pid: *pid,
                        comm: self.comm(*pid),
                        file: file.display().to_string(),
                    }),
                fpga,
                nvme: secondaries.get(&index).copied(),
            });
        }
        let vendor = self.read(&dir.join("vendor"))?;
        let device = self.read(&dir.join("device"))?;
        let fpga = self.fpga_status(pf, &vendor, &device);
        Ok(PfStatus {
            bdf: pf,
            vendor,
            device,
            driver: pf_driver,
            totalvfs,
            numvfs,
            drivers_autoprobe,
            vfs,
            fpga,
            nvme,
        })
    }

    /// Makes sure `driver` is registered with the PCI bus, loading its module
    /// (as `modprobe` does, with a bounded wait) when it is not, like libvirt
    /// loads vfio-pci. The name is a [`DriverName`]: plain `[a-z0-9_-]`; the
    /// daemon takes it from its root-owned config (PF driver, `vf_drivers`).
    fn require_driver_loaded(&self, driver: &DriverName) -> Result<(), Error> {
        let rel = Path::new("bus/pci/drivers").join(driver.as_str());
        if self.sysfs.exists(&rel) {
            return Ok(());
        }
        info!(%driver, "driver not loaded: loading its module");
        self.sysfs
            .load_module(driver.as_str())
            .map_err(|source| Error::ModuleLoad {
                driver: driver.clone(),
                source,
            })?;
        if self.sysfs.exists(&rel) {
            Ok(())
        } else {
            Err(Error::DriverNotLoaded {
                driver: driver.clone(),
                path: self.sysfs.root().join(rel),
            })
        }
    }

    /// Unbinds the device from its driver, if it has one, after checking that
    /// no process holds its VFIO files open (the unbind would block).
    pub fn unbind(&self, bdf: PciAddress) -> Result<(), Error> {
        let dir = self.device_dir(bdf)?;
        if self.driver_in(&dir)?.is_some() {
            self.check_not_in_use(bdf, &[bdf])?;
            self.write(&dir.join("driver/unbind"), &bdf.to_string())?;
        }
        Ok(())
    }

    /// Binds the device to `driver` with `driver_override` + `drivers_probe`
    /// (never `new_id`), unbinding it from another driver first.
    /// Does nothing when it already is on `driver`.
    pub fn bind(&self, bdf: PciAddress, driver: &DriverName) -> Result<(), Error> {
        let dir = self.device_dir(bdf)?;
        let current = self.driver_in(&dir)?;
        if current.as_deref() == Some(driver.as_str()) {
            return Ok(());
        }
        self.require_driver_loaded(driver)?;
        if current.as_deref() == Some("vfio-pci") {
            self.check_not_in_use(bdf, &[bdf])?;
        }
        self.write(&dir.join("driver_override"), driver.as_str())?;
        if current.is_some() {
            self.write(&dir.join("driver/unbind"), &bdf.to_string())?;
        }
        self.write(Path::new("bus/pci/drivers_probe"), &bdf.to_string())?;
        let actual = self.driver_in(&dir)?;
        if actual.as_deref() != Some(driver.as_str()) {
            return Err(Error::BindFailed {
                bdf,
                driver: driver.clone(),
                actual,
            });
        }
        debug!(%bdf, %driver, "bound");
        Ok(())
    }

    /// Binds every device of `list` to `driver`, spread over up to
    /// [`BIND_THREADS`] threads. Every device is tried; the first error (in
    /// list order) is returned.
    pub fn bind_all(&self, list: &[PciAddress], driver: &DriverName) -> Result<(), Error> {
        if list.len() <= 1 {
            return list.iter().try_for_each(|d| self.bind(*d, driver));
        }
        let per_thread = list.len().div_ceil(BIND_THREADS);
        std::thread::scope(|scope| {
            let handles: Vec<_> = list
                .chunks(per_thread)
                .map(|chunk| {
                    scope.spawn(move || {
                        // Bind every device even after a failure; keep the first error.
                        chunk
                            .iter()
                            .map(|d| self.bind(*d, driver))
                            .fold(Ok(()), Result::and)
                    })
                })
                .collect();
            let mut first = None;
            for h in handles {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        first.get_or_insert(e);
                    }
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            first.map_or(Ok(()), Err)
        })
    }

    /// Puts the PF on `driver` (its own driver, `pci-pf-stub`, `qdma-pf`...).
    /// VFs are disabled first when the driver has to change.
    pub fn ensure_pf_driver(&self, pf: PciAddress, driver: &DriverName) -> Result<(), Error> {
        let dir = self.pf_dir(pf)?;
        if self.driver_in(&dir)?.as_deref() == Some(driver.as_str()) {
            return Ok(());
        }
        self.require_driver_loaded(driver)?;
        let (_, num) = self.counts_in(&dir)?;
        if num != 0 {
            let vfs: Vec<PciAddress> = self.vfs_in(&dir)?.into_iter().map(|(_, vf)| vf).collect();
            self.check_not_in_use(pf, &vfs)?;
            self.write_numvfs(pf, &dir, 0)?;
        }
        self.bind(pf, driver)
    }

    fn write_numvfs(&self, pf: PciAddress, dir: &Path, n: u16) -> Result<(), Error> {
        let rel = dir.join("sriov_numvfs");
        debug!(%pf, n, "write sriov_numvfs");
        self.sysfs.write(&rel, &n.to_string()).map_err(|source| {
            let path = self.sysfs.root().join(&rel);
            match source.raw_os_error() {
                Some(libc::ERANGE) => {
                    let max = self
                        .read(&dir.join("sriov_totalvfs"))
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0);
                    Error::TooManyVfs {
                        pf,
                        max,
                        requested: n,
                        source: Some(source),
                    }
                }
                Some(libc::EBUSY) => Error::Busy { pf, path, source },
                // ENOENT from open(2): the PF itself went away.
                Some(libc::ENOENT) if !self.sysfs.exists(&rel) => Error::Sysfs {
                    op: "write",
                    path,
                    source,
                },
                Some(libc::ENOENT) => Error::NoSriovConfigure {
                    pf,
                    driver: self.driver_in(dir).ok().flatten(),
                    source,
                },
                _ => Error::Sysfs {
                    op: "write",
                    path,
                    source,
                },
            }
        })
    }

    /// Sets the PF's VF count to `n`: a no-op when it already is `n`, otherwise
    /// `sriov_drivers_autoprobe=0`, `sriov_numvfs=0` (if VFs exist), `sriov_numvfs=n`;
    /// then the binds and QDMA settings of `opts`. Asking for more than
    /// `sriov_totalvfs` fails before anything is written.
    pub fn set_vf_count(
        &self,
        pf: PciAddress,
        n: u16,
        opts: &VfsSetOptions,
    ) -> Result<VfsSetReport, Error> {
        self.set_vf_count_with(pf, n, opts, None)
    }

    /// [`SriovManager::set_vf_count`], then (nvme profile) gives the VFs the
    /// NVMe resources of `resources` before they are bound: checked against
    /// the PF's controller before anything is written (step `nvme_check`;
    /// the PF must be on the `nvme` driver), applied after the VFs exist
    /// (step `nvme_resources`: offline, assign VQ, assign VI, online). See
    /// the crate docs' nvme section.
    pub fn set_vf_count_with(
        &self,
        pf: PciAddress,
        n: u16,
        opts: &VfsSetOptions,
        resources: Option<&NvmeResources>,
    ) -> Result<VfsSetReport, Error> {
        let span = tracing::info_span!("vfs_set", %pf, count = n);
        let _enter = span.enter();
        let mut steps = Vec::new();
        let dir = self.pf_dir(pf)?;
        if let Some(driver) = &opts.pf_driver {
            timed(&mut steps, "pf_driver", || {
                self.ensure_pf_driver(pf, driver)
            })?;
        }
        let (total, from) = self.counts_in(&dir)?;
        if n > total {
            return Err(Error::TooManyVfs {
                pf,
                max: total,
                requested: n,
                source: None,
            });
        }
        if let Some(driver) = &opts.bind {
            if n > 0 {
                self.require_driver_loaded(driver)?;
            }
        }
        let nvme_plan = match resources {
            Some(req) => {
                let driver = self.driver_in(&dir)?;
                if driver.as_deref() != Some(NVME_PF_DRIVER) {
                    return Err(Error::NvmeResources {
                        pf,
                        reason: format!(
                            "VF resources need the PF on the nvme driver (bound: {})",
                            driver.as_deref().unwrap_or("none")
                        ),
                    });
                }
                Some(timed(&mut steps, "nvme_check", || {
                    let ctrl = self.nvme.open(pf)?;
                    let caps = crate::nvme::primary_caps(&*ctrl)?;
                    let secs = crate::nvme::secondary_controllers(&*ctrl)?;
                    let plan = crate::nvme::check_plan(pf, &caps, &secs, n, req)?;
                    Ok((ctrl, plan))
                })?)
            }
            None => None,
        };
        let changed = n != from;
        if changed && from != 0 {
            let vfs: Vec<PciAddress> = self.vfs_in(&dir)?.into_iter().map(|(_, vf)| vf).collect();
            timed(&mut steps, "check_in_use", || {
                self.check_not_in_use(pf, &vfs)
            })?;
        }
        if changed {
            info!(%pf, from, to = n, "changing VF count");
            let autoprobe = dir.join("sriov_drivers_autoprobe");
            if self.read(&autoprobe)? != "0" {
                timed(&mut steps, "autoprobe_off", || self.write(&autoprobe, "0"))?;
            }
            if from != 0 {
                timed(&mut steps, "disable_vfs", || self.write_numvfs(pf, &dir, 0))?;
            }
            if n != 0 {
                timed(&mut steps, "enable_vfs", || self.write_numvfs(pf, &dir, n))?;
            }
            let (_, actual) = self.counts_in(&dir)?;
            if actual != n {
                return Err(Error::VfCountMismatch {
                    pf,
                    expected: n,
                    actual,
                });
            }
        } else {
            info!(%pf, n, "VF count already set");
        }
        let vfs = self.vfs_in(&dir)?;
        if vfs.len() != usize::from(n) {
            warn!(%pf, links = vfs.len(), n, "virtfn links do not match sriov_numvfs");
            return Err(Error::VfCountMismatch {
                pf,
                expected: n,
                actual: vfs.len() as u16,
            });
        }
        if let Some((ctrl, plan)) = &nvme_plan {
            timed(&mut steps, "nvme_resources", || {
                let bdf = |i: u16| vfs.iter().find(|(x, _)| *x == i).map(|(_, b)| *b);
                crate::nvme::apply_plan(pf, &**ctrl, plan, changed, &bdf).map(|_| ())
            })?;
        }
        if let Some(driver) = &opts.bind {
            if !vfs.is_empty() {
                let list: Vec<PciAddress> = vfs.iter().map(|(_, vf)| *vf).collect();
                timed(&mut steps, "bind_vfs", || self.bind_all(&list, driver))?;
            }
        }
        if let Some(profile) = &opts.qdma {
            let pf_driver = self.driver_in(&dir)?;
            if pf_driver.as_deref() == Some(crate::qdma::QDMA_PF_DRIVER) {
                timed(&mut steps, "qdma_profile", || {
                    profile.apply(self, pf, &vfs.iter().map(|(_, vf)| *vf).collect::<Vec<_>>())
                })?;
            } else {
                info!(%pf, driver = pf_driver.as_deref().unwrap_or("none"), "not a QDMA PF: generic SR-IOV path, QDMA profile skipped");
            }
        }
        Ok(VfsSetReport {
            pf,
            from,
            to: n,
            changed,
            steps,
            status: self.pf_status(pf)?,
        })
    }

    /// Writes an attribute of a device's directory, mapping nothing: the caller
    /// builds the error. Used by the QDMA and bitstream code.
    pub(crate) fn write_raw(&self, rel: &Path, value: &str) -> io::Result<()> {
        debug!(path = %rel.display(), value, "sysfs write");
        self.sysfs.write(rel, value)
    }
}

#[cfg(test)]
#[path = "sriov_tests.rs"]
mod tests;
