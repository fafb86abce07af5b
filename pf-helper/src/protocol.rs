//! The daemon's wire protocol: one JSON object per line, each way.
//!
//! See the crate docs for the full description.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::pci::{DriverName, PciAddress};

/// Protocol version, sent in every response as `protocol`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest accepted request line, bytes.
pub(crate) const MAX_LINE: u64 = 64 * 1024;

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness check; the result is `{"version": "<crate version>"}`. (A
    /// struct variant, so that unknown fields are refused as for the others.)
    Ping {},
    /// The status of the allowed PFs (or of one); the result is a [`crate::Status`].
    Status {
        /// Only this PF.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pf: Option<PciAddress>,
    },
    /// Sets a PF's VF count; the result is a [`crate::VfsSetReport`].
    VfsSet {
        /// The PF.
        pf: PciAddress,
        /// The VF count.
        count: u16,
        /// Bind the VFs to this driver (must be in the config's `vf_drivers`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bind: Option<DriverName>,
        /// NVMe VF resources (nvme profile), overriding the PF's config.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resources: Option<crate::nvme::NvmeResources>,
    },
    /// `svff init`; the result is an [`crate::OpReport`].
    Init {},
    /// `svff reconf`; the result is an [`crate::OpReport`].
    Reconf {
        /// The PF.
        pf: PciAddress,
        /// The VF count.
        vfs: u16,
        /// pause (default) or detach.
        #[serde(default)]
        mode: crate::orch::journal::Mode,
        /// New VFs for VMs.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        assign: Vec<crate::orch::AssignRequest>,
    },
    /// `svff reconf --resources` of a PF in pool mode; the result is an [`crate::OpReport`].
    PoolReconf {
        /// The PF.
        pf: PciAddress,
        /// The VFs' new NVMe resources.
        resources: crate::nvme::NvmeResources,
        /// Free pool VFs for VMs.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        assign: Vec<crate::orch::AssignRequest>,
    },
    /// `svff recover`; the result is an [`crate::OpReport`].
    Recover {},
    /// Programs the PF's configured bitstream; the result is `{"steps": [...]}`.
    Program {
        /// The PF.
        pf: PciAddress,
    },
}

/// An error as sent by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine-readable kind, e.g. `too_many_vfs`, `permission_denied`.
    pub kind: String,
    /// Human-readable message with its causes.
    pub message: String,
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Always [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    /// A success carrying `result`.
    pub(crate) fn ok(result: serde_json::Value) -> Self {
        Response {
            protocol: PROTOCOL_VERSION,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A failure.
    pub(crate) fn err(kind: &str, message: String) -> Self {
        Response {
            protocol: PROTOCOL_VERSION,
            ok: false,
            result: None,
            error: Some(ErrorBody {
                kind: kind.to_owned(),
                message,
            }),
        }
    }

    /// A failure from an [`Error`].
    pub(crate) fn from_error(e: &Error) -> Self {
        Self::err(e.kind(), e.chain())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_shape() {
        let r: Request = serde_json::from_str(
            r#"{"op":"vfs_set","pf":"0000:01:00.0","count":4,"bind":"vfio-pci"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::VfsSet {
                pf: PciAddress::parse("0000:01:00.0").unwrap(),
                count: 4,
                bind: Some(DriverName::vfio_pci()),
                resources: None,
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Ping {}).unwrap(),
            r#"{"op":"ping"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Status { pf: None }).unwrap(),
            r#"{"op":"status"}"#
        );
    }

    #[test]
    fn vfs_set_carries_nvme_resources() {
        let r: Request = serde_json::from_str(
            r#"{"op":"vfs_set","pf":"0000:02:00.0","count":2,"resources":{"default":{"vq":2,"vi":1},"vfs":{"1":{"vq":4,"vi":2}}}}"#,
        )
        .unwrap();
        let Request::VfsSet {
            resources: Some(res),
            ..
        } = &r
        else {
            panic!("{r:?}");
        };
        assert_eq!(
            res.for_vf(0),
            Some(crate::nvme::VfResources { vq: 2, vi: 1 })
        );
        assert_eq!(
            res.for_vf(1),
            Some(crate::nvme::VfResources { vq: 4, vi: 2 })
        );
        let back: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        for bad in [
            r#"{"op":"vfs_set","pf":"0000:02:00.0","count":2,"resources":{"vfs":{"x":{"vq":2,"vi":1}}}}"#,
            r#"{"op":"vfs_set","pf":"0000:02:00.0","count":2,"resources":{"default":{"vq":2}}}"#,
            r#"{"op":"vfs_set","pf":"0000:02:00.0","count":2,"resources":{"default":{"vq":2,"vi":1,"qmax":3}}}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn orchestration_requests_have_the_documented_shape() {
        let r: Request = serde_json::from_str(
            r#"{"op":"reconf","pf":"0000:01:00.0","vfs":2,"mode":"detach","assign":[{"vm":"vm1","count":1}]}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Reconf {
                pf: PciAddress::parse("0000:01:00.0").unwrap(),
                vfs: 2,
                mode: crate::orch::journal::Mode::Detach,
                assign: vec![crate::orch::AssignRequest {
                    vm: "vm1".into(),
                    count: 1
                }],
            }
        );
        let r: Request =
            serde_json::from_str(r#"{"op":"reconf","pf":"0000:01:00.0","vfs":8}"#).unwrap();
        assert!(matches!(
            r,
            Request::Reconf {
                mode: crate::orch::journal::Mode::Pause,
                ..
            }
        ));
        assert_eq!(
            serde_json::to_string(&Request::Init {}).unwrap(),
            r#"{"op":"init"}"#
        );
        for bad in [
            r#"{"op":"reconf","pf":"0000:01:00.0","vfs":2,"mode":"teleport"}"#,
            r#"{"op":"reconf","pf":"0000:01:00.0","vfs":2,"assign":[{"vm":"a","count":1,"x":1}]}"#,
            r#"{"op":"recover","force":true}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pool_reconf_requests_have_the_documented_shape() {
        let text = r#"{"op":"pool_reconf","pf":"0000:02:00.0","resources":{"vfs":{"0":{"vq":4,"vi":2}}},"assign":[{"vm":"vm1","count":1}]}"#;
        let r: Request = serde_json::from_str(text).unwrap();
        let Request::PoolReconf {
            pf,
            resources,
            assign,
        } = &r
        else {
            panic!("{r:?}");
        };
        assert_eq!(pf.to_string(), "0000:02:00.0");
        assert_eq!(
            resources.for_vf(0),
            Some(crate::nvme::VfResources { vq: 4, vi: 2 })
        );
        assert_eq!(resources.for_vf(1), None);
        assert_eq!(assign.len(), 1);
        assert_eq!(serde_json::to_string(&r).unwrap(), text);
        assert!(serde_json::from_str::<Request>(
            r#"{"op":"pool_reconf","pf":"0000:02:00.0","resources":{"vfs":{"x":{"vq":4,"vi":2}}}}"#
        )
        .is_err());
    }

    #[test]
    fn malformed_requests_are_rejected() {
        for bad in [
            r#"{"op":"vfs_set","pf":"0000:01:00.0","count":4,"extra":1}"#,
            r#"{"op":"vfs_set","pf":"0000:01:00.0/..","count":4}"#,
            r#"{"op":"vfs_set","pf":"0000:01:00.0","count":-1}"#,
            r#"{"op":"vfs_set","pf":"0000:01:00.0","count":70000}"#,
            r#"{"op":"vfs_set","pf":"0000:01:00.0","count":1,"bind":"../x"}"#,
            r#"{"op":"rm_rf"}"#,
            r#"{"op":"ping","extra":1}"#,
            r#"{"op":"ping","pf":"0000:01:00.0"}"#,
            r#"{"pf":"0000:01:00.0"}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_carry_the_protocol_version() {
        let text = serde_json::to_string(&Response::err("busy", "PF busy".into())).unwrap();
        assert_eq!(
            text,
            r#"{"protocol":1,"ok":false,"error":{"kind":"busy","message":"PF busy"}}"#
        );
    }
}
