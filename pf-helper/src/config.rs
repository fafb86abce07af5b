//! The helper daemon's TOML configuration.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bitstream::BitstreamConfig;
use crate::error::Error;
use crate::pci::{DriverName, PciAddress};
use crate::qdma::QdmaProfile;

/// Default config path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/svff/helper.toml";
/// Default socket path.
pub const DEFAULT_SOCKET_PATH: &str = "/run/svff/helper.sock";

/// The daemon's configuration (`/etc/svff/helper.toml`). Unknown keys are errors.
///
/// ```toml
/// socket = "/run/svff/helper.sock"   # default
/// socket_group = "svff"              # group owning the socket (name or number); optional
/// allowed_uids = [0]                 # peers allowed by uid (SO_PEERCRED)
/// allowed_gids = [990]               # peers allowed by primary or supplementary gid
/// vf_drivers = ["vfio-pci"]          # drivers VFs may be bound to (default)
/// watchdog_s = 60                    # a change running longer is reported stuck (default)
///
/// [[pf]]
/// bdf = "0000:01:00.0"
/// driver = "igb"                     # PF driver to bind before changing VFs; optional
///
/// [[pf]]
/// bdf = "0000:81:00.0"
/// driver = "qdma-pf"
/// qdma = { pf = { qmax = 512 }, vf = { qmax = 64 } }
/// bitstream = { fpga_manager = "fpga0", firmware = "svff_user.bin" }
/// ```
///
/// The file must be owned by root and not writable by group or others.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Unix socket path (ignored under systemd socket activation).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Group that owns the socket (mode 0660); name or decimal gid.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Peer uids allowed to talk to the daemon.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Gids allowed to talk to the daemon: a peer whose primary gid or one of
    /// whose supplementary groups (`SO_PEERGROUPS`) is listed is let in.
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    /// Drivers VFs may be bound to.
    #[serde(default = "default_vf_drivers")]
    pub vf_drivers: Vec<DriverName>,
    /// Seconds a change (vfs_set; program adds its `timeout_s`) may take
    /// before the daemon answers that it is stuck in the kernel (default 60).
    #[serde(default = "default_watchdog")]
    pub watchdog_s: u64,
    /// The PFs the daemon may manage: its allow-list.
    #[serde(default, rename = "pf")]
    pub pfs: Vec<PfConfig>,
}

/// One allowed PF.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PfConfig {
    /// The PF's address.
    pub bdf: PciAddress,
    /// The PF driver to bind before changing the VF count (own driver, `pci-pf-stub`, `qdma-pf`).
    #[serde(default)]
    pub driver: Option<DriverName>,
    /// QDMA settings applied after VF creation.
    #[serde(default)]
    pub qdma: Option<QdmaProfile>,
    /// How to program the FPGA behind this PF.
    #[serde(default)]
    pub bitstream: Option<BitstreamConfig>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET_PATH)
}

fn default_watchdog() -> u64 {
    60
}

fn default_vf_drivers() -> Vec<DriverName> {
    vec![DriverName::vfio_pci()]
}

impl Config {
    /// Parses and checks config text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        let bad = |reason: String| Error::Config {
            path: path.to_owned(),
            reason,
        };
        let config: Config = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut seen = std::collections::BTreeSet::new();
        for pf in &config.pfs {
            if !seen.insert(pf.bdf) {
                return Err(bad(format!("PF {} listed twice", pf.bdf)));
            }
            if let Some(q) = &pf.qdma {
                q.validate().map_err(bad)?;
            }
            if let Some(b) = &pf.bitstream {
                b.validate()
                    .map_err(|r| bad(format!("PF {}: {r}", pf.bdf)))?;
            }
        }
        if config.allowed_uids.is_empty() && config.allowed_gids.is_empty() {
            return Err(bad(
                "allowed_uids and allowed_gids are both empty: nobody could connect".into(),
            ));
        }
        Ok(config)
    }

    /// Reads the file, refusing one that is not owned by root or is writable
    /// by group or others, then parses it.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let bad = |reason: String| Error::Config {
            path: path.to_owned(),
            reason,
        };
        let meta = fs::metadata(path).map_err(|e| bad(format!("cannot stat: {e}")))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.uid() != 0 {
            return Err(bad(format!(
                "owned by uid {}, must be owned by root",
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(bad(format!(
                "mode {:o} is writable by group or others",
                meta.mode() & 0o7777
            )));
        }
        let text = fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        Self::parse(&text, path)
    }

    /// The watchdog of a change.
    pub fn watchdog(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.watchdog_s.max(1))
    }

    /// The allow-list entry of `pf`.
    pub fn pf(&self, pf: PciAddress) -> Option<&PfConfig> {
        self.pfs.iter().find(|p| p.bdf == pf)
    }

    /// Whether a peer with these credentials (uid, primary gid, supplementary
    /// groups) may use the daemon.
    pub fn peer_allowed(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        self.allowed_uids.contains(&uid)
            || self.allowed_gids.contains(&gid)
            || groups.iter().any(|g| self.allowed_gids.contains(g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, Path::new("/etc/svff/helper.toml"))
    }

    #[test]
    fn full_config_parses_with_defaults() {
        let c = parse(
            r#"
            allowed_uids = [0]
            allowed_gids = [990]
            [[pf]]
            bdf = "0000:01:00.0"
            driver = "igb"
            [[pf]]
            bdf = "0000:81:00.0"
            driver = "qdma-pf"
            qdma = { pf = { qmax = 512 }, vf = { qmax = 64 } }
            bitstream = { fpga_manager = "fpga0", firmware = "user.bin" }
            "#,
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert_eq!(c.vf_drivers, vec![DriverName::vfio_pci()]);
        assert_eq!(c.pfs.len(), 2);
        assert_eq!(c.pfs[1].qdma.as_ref().unwrap().pf["qmax"], 512);
        assert!(c.peer_allowed(0, 5, &[]) && c.peer_allowed(1000, 990, &[]));
        assert!(!c.peer_allowed(1000, 1000, &[1000, 4]));
        assert!(
            c.peer_allowed(1000, 1000, &[4, 990]),
            "a supplementary group lets the peer in"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = parse("allowed_uids = [0]\nallow_everyone = true\n").unwrap_err();
        assert!(err.to_string().contains("allow_everyone"), "{err}");
        let err =
            parse("allowed_uids = [0]\n[[pf]]\nbdf = \"0000:01:00.0\"\nnumvfs = 3\n").unwrap_err();
        assert!(err.to_string().contains("numvfs"), "{err}");
    }

    #[test]
    fn bad_pf_addresses_and_duplicates_are_rejected() {
        assert!(parse("allowed_uids = [0]\n[[pf]]\nbdf = \"0000:01:00.0/../..\"\n").is_err());
        assert!(parse("allowed_uids = [0]\n[[pf]]\nbdf = \"0000:0A:00.0\"\n").is_err());
        let err = parse(
            "allowed_uids = [0]\n[[pf]]\nbdf = \"0000:01:00.0\"\n[[pf]]\nbdf = \"0000:01:00.0\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("twice"));
    }

    #[test]
    fn empty_peer_lists_are_rejected() {
        assert!(parse("[[pf]]\nbdf = \"0000:01:00.0\"\n").is_err());
    }

    #[test]
    fn config_writable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("helper.toml");
        fs::write(&path, "allowed_uids = [0]\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        let err = Config::load(&path).unwrap_err();
        let owner_is_root = fs::metadata(&path).unwrap().uid() == 0;
        if owner_is_root {
            assert!(
                err.to_string().contains("writable by group or others"),
                "{err}"
            );
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(Config::load(&path).is_ok());
        } else {
            assert!(err.to_string().contains("must be owned by root"), "{err}");
        }
    }
}
