//! QDMA per-function settings (`/sys/bus/pci/devices/<BDF>/qdma/<setting>`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::Error;
use crate::pci::PciAddress;
use crate::sriov::SriovManager;
use crate::sysfs::Sysfs;

/// Name of the Xilinx/AMD QDMA PF driver.
pub(crate) const QDMA_PF_DRIVER: &str = "qdma-pf";

/// QDMA settings written after the VFs are created, when the PF is on `qdma-pf`.
///
/// In the config: `[pf.qdma] pf = { qmax = 512 }` and `vf = { qmax = 64 }`.
/// `pf` settings go to the PF's `qdma/` directory, `vf` settings to each VF's
/// `qdma/` directory (a VF without one, e.g. on `vfio-pci`, is skipped with a
/// warning). Setting names are `[a-z0-9_]`, values unsigned integers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QdmaProfile {
    /// Settings of the PF, e.g. `qmax`.
    #[serde(default)]
    pub pf: BTreeMap<String, u64>,
    /// Settings of every VF, e.g. `qmax`.
    #[serde(default)]
    pub vf: BTreeMap<String, u64>,
}

fn valid_setting(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl QdmaProfile {
    /// Checks the setting names (they become path components).
    pub fn validate(&self) -> Result<(), String> {
        for name in self.pf.keys().chain(self.vf.keys()) {
            if !valid_setting(name) {
                return Err(format!(
                    "invalid QDMA setting name {name:?} (allowed: [a-z0-9_])"
                ));
            }
        }
        Ok(())
    }

    fn write_all<S: Sysfs>(
        mgr: &SriovManager<S>,
        bdf: PciAddress,
        settings: &BTreeMap<String, u64>,
    ) -> Result<(), Error> {
        for (name, value) in settings {
            if !valid_setting(name) {
                return Err(Error::InvalidDriverName {
                    input: name.escape_debug().to_string(),
                    reason: "invalid QDMA setting name",
                });
            }
            let rel = bdf.sysfs_rel().join("qdma").join(name);
            let value = value.to_string();
            mgr.write_raw(&rel, &value).map_err(|source| Error::Qdma {
                bdf,
                setting: name.clone(),
                value: value.clone(),
                path: mgr.sysfs().root().join(&rel),
                source,
            })?;
            info!(%bdf, setting = %name, %value, "QDMA setting applied");
        }
        Ok(())
    }

    /// Applies the profile to the PF and its VFs.
    pub(crate) fn apply<S: Sysfs>(
        &self,
        mgr: &SriovManager<S>,
        pf: PciAddress,
        vfs: &[PciAddress],
    ) -> Result<(), Error> {
        mgr.device_dir(pf)?;
        Self::write_all(mgr, pf, &self.pf)?;
        if self.vf.is_empty() {
            return Ok(());
        }
        for vf in vfs {
            let dir = mgr.device_dir(*vf)?;
            if !mgr.sysfs().exists(&dir.join("qdma")) {
                warn!(%vf, "VF has no qdma/ directory (not on qdma-vf): VF settings skipped");
                continue;
            }
            Self::write_all(mgr, *vf, &self.vf)?;
        }
        Ok(())
    }
}
