//! Helpers for lab tests: code that runs *inside* L1 (as root, on the real kernel).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// True when running inside the lab's L1.
pub fn in_lab() -> bool {
    std::env::var_os("SVFF_LAB").is_some_and(|v| v == "1")
}

/// Panics with a clear message unless running inside the lab. Lab tests call this first.
pub fn require_lab() {
    assert!(
        in_lab(),
        "this test needs the svff lab: run it with `cargo run -p svff-lab -- test` (or `make test`), not directly"
    );
}

fn pf(var: &str) -> String {
    require_lab();
    std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} is not set: the lab did not find that PF in L1"))
}

/// BDF of the emulated igb PF (8086:10c9).
pub fn igb_pf() -> String {
    pf("SVFF_LAB_IGB_PF")
}

/// BDF of the emulated nvme PF (1b36:0010).
pub fn nvme_pf() -> String {
    pf("SVFF_LAB_NVME_PF")
}

/// `/sys/bus/pci/devices/<bdf>`.
pub fn dev_path(bdf: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(bdf)
}

/// Loads a kernel module with L0's modprobe; panics with modprobe's message on failure.
pub fn modprobe(module: &str) {
    let out = Command::new("modprobe")
        .arg(module)
        .output()
        .expect("run modprobe");
    assert!(
        out.status.success(),
        "modprobe {module}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a sysfs attribute, panicking with the path and errno on failure.
pub fn write_attr(path: impl AsRef<Path>, value: &str) {
    let p = path.as_ref();
    fs::write(p, value).unwrap_or_else(|e| panic!("write {value:?} to {}: {e}", p.display()));
}

/// Reads a sysfs attribute, trimmed.
pub fn read_attr(path: impl AsRef<Path>) -> String {
    let p = path.as_ref();
    fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_owned()
}

/// The driver bound to `bdf`, if any.
pub fn driver_of(bdf: &str) -> Option<String> {
    fs::read_link(dev_path(bdf).join("driver"))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Binds `bdf` to `driver` (loading it first) through `driver_override`, unbinding any other.
pub fn bind(bdf: &str, driver: &str) {
    if driver_of(bdf).as_deref() == Some(driver) {
        return;
    }
    unbind(bdf);
    modprobe(driver);
    write_attr(dev_path(bdf).join("driver_override"), driver);
    write_attr("/sys/bus/pci/drivers_probe", bdf);
    assert_eq!(
        driver_of(bdf).as_deref(),
        Some(driver),
        "{bdf} did not bind to {driver}"
    );
}

/// Unbinds `bdf` from its driver, if it has one, and clears `driver_override`.
pub fn unbind(bdf: &str) {
    if driver_of(bdf).is_some() {
        write_attr(dev_path(bdf).join("driver/unbind"), bdf);
    }
    write_attr(dev_path(bdf).join("driver_override"), "\n");
}

/// Sets `sriov_numvfs` of `pf` to `n` (through 0 when both are non-zero), with autoprobe off.
pub fn set_numvfs(pf: &str, n: u32) {
    let dir = dev_path(pf);
    let cur: u32 = read_attr(dir.join("sriov_numvfs"))
        .parse()
        .expect("numeric sriov_numvfs");
    if cur == n {
        return;
    }
    write_attr(dir.join("sriov_drivers_autoprobe"), "0");
    if cur != 0 {
        write_attr(dir.join("sriov_numvfs"), "0");
    }
    if n != 0 {
        write_attr(dir.join("sriov_numvfs"), &n.to_string());
    }
}

/// BDFs of `pf`'s VFs, in `virtfnN` order.
pub fn vfs_of(pf: &str) -> Vec<String> {
    let dir = dev_path(pf);
    let mut out = Vec::new();
    for i in 0.. {
        match fs::read_link(dir.join(format!("virtfn{i}"))) {
            Ok(l) => out.push(
                l.file_name()
                    .expect("virtfn target")
                    .to_string_lossy()
                    .into_owned(),
            ),
            Err(_) => break,
        }
    }
    out
}

/// The IOMMU group number of `bdf`.
pub fn iommu_group(bdf: &str) -> u32 {
    let l = fs::read_link(dev_path(bdf).join("iommu_group"))
        .unwrap_or_else(|e| panic!("{bdf} has no iommu_group: {e}"));
    l.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .expect("numeric iommu group")
}
