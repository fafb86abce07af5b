//! The `nvme` PF profile: a PF bound to the kernel's `nvme` driver whose VFs
//! are NVMe secondary controllers with flexible queue (VQ) and interrupt (VI)
//! resources, assigned by the PF with the Virtualization Management command.
//!
//! # How
//!
//! The helper talks to the PF's controller through the kernel's admin
//! passthrough ioctl (`NVME_IOCTL_ADMIN_CMD` on `/dev/nvmeN`), not through
//! nvme-cli: no shell-out from privileged code, every command bounded by the
//! kernel's `timeout_ms` (10 s), the command encoding unit-tested byte for
//! byte, and no extra package on the host. Identify CNS 14h (Primary Controller
//! Capabilities) gives the flexible totals (VQFRT/VIFRT), what the primary
//! keeps (VQRFAP/VIRFAP) and the per-secondary maxima (VQFRSM/VIFRSM);
//! Identify CNS 15h (Secondary Controller List, paged by controller id) gives
//! each secondary's state, VF number and assigned resources.
//!
//! # Applying resources
//!
//! [`NvmeResources`] says which VF (by `virtfnN` index) gets how many VQ and VI
//! resources. The whole request is checked against the controller before
//! anything is written ([`check_plan`]): every VF index exists, each count is
//! at most the per-secondary maximum, a multiple of the granularity, and the
//! sum fits in the flexible total less what the primary keeps and what
//! secondaries outside the request hold. A VF given resources must be able to
//! go online: at least 2 VQ (its admin queue and one I/O queue) and 1 VI;
//! `vq = 0, vi = 0` leaves it offline. Then ([`apply_plan`]) every secondary
//! whose state differs is set offline first (all of them, so their resources
//! are back in the pool before any is assigned), then each gets its VQ count,
//! its VI count and is set online; secondaries already in the requested state
//! are not touched. The result is read back and compared.

mod admin;
#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tracing::info;

pub use admin::{
    parse_secondary_list, status_text, AdminCommand, AdminError, NvmeAdmin, NvmeDevice,
    PassthruCmd, PrimaryCaps, ResourceType, SecondaryController, VirtAction, CNS_PRIMARY_CTRL_CAPS,
    CNS_SECONDARY_CTRL_LIST, IDENTIFY_LEN,
};

use crate::error::Error;
use crate::pci::PciAddress;

/// Name of the kernel's NVMe PCI driver: a PF on it gets the nvme profile.
pub const NVME_PF_DRIVER: &str = "nvme";

/// Most pages of the Secondary Controller List read (127 entries each).
const MAX_LIST_PAGES: usize = 520;

/// Flexible resources of one secondary controller (one VF).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VfResources {
    /// VQ resources (queue pairs, the admin queue included).
    pub vq: u16,
    /// VI resources (interrupt vectors).
    pub vi: u16,
}

impl fmt::Display for VfResources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vq:{},vi:{}", self.vq, self.vi)
    }
}

/// Requested resources of a PF's VFs: `default` for every VF, `vfs` per
/// `virtfnN` index (overriding `default`). VFs in neither are not touched.
///
/// JSON (protocol): `{"default": {"vq": 2, "vi": 1}, "vfs": {"1": {"vq": 4, "vi": 2}}}`.
/// Command line: `--resources 0=vq:2,vi:1,1=vq:4,vi:2` ([`NvmeResources::parse_spec`])
/// or `--vq 2 --vi 1` (the default).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmeResources {
    /// Resources of every VF not listed in `vfs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<VfResources>,
    /// Resources per VF index.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "index_keys"
    )]
    pub vfs: BTreeMap<u16, VfResources>,
}

/// VF-index map keys as JSON object keys (strings of decimal digits), also
/// inside internally tagged enums (where serde buffers keys as strings).
mod index_keys {
    use std::collections::BTreeMap;

    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    use super::VfResources;

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<u16, VfResources>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k.to_string(), v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u16, VfResources>, D::Error> {
        BTreeMap::<String, VfResources>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| match k.parse::<u16>() {
                Ok(i) if i.to_string() == k => Ok((i, v)),
                _ => Err(D::Error::custom(format!("{k:?} is not a VF index"))),
            })
            .collect()
    }
}

/// The `nvme` table of a PF in the helper's config:
/// `nvme = { vq = 2, vi = 1, vf = { 3 = { vq = 4, vi = 2 } } }`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmeProfile {
    /// VQ resources of every VF (with `vi`).
    #[serde(default)]
    pub vq: Option<u16>,
    /// VI resources of every VF (with `vq`).
    #[serde(default)]
    pub vi: Option<u16>,
    /// Per VF index (TOML keys are strings: `"3"` or bare `3`).
    #[serde(default)]
    pub vf: BTreeMap<String, VfResources>,
}

impl NvmeProfile {
    /// The requested resources, or why the table is malformed.
    pub fn resources(&self) -> Result<NvmeResources, String> {
        let default = match (self.vq, self.vi) {
            (Some(vq), Some(vi)) => Some(VfResources { vq, vi }),
            (None, None) => None,
            _ => return Err("nvme: give both vq and vi, or neither".into()),
        };
        let mut vfs = BTreeMap::new();
        for (k, r) in &self.vf {
            let i: u16 = k
                .parse()
                .map_err(|_| format!("nvme.vf: {k:?} is not a VF index"))?;
            vfs.insert(i, *r);
        }
        Ok(NvmeResources { default, vfs })
    }
}

impl NvmeResources {
    /// The same resources for every VF.
    pub fn uniform(vq: u16, vi: u16) -> Self {
        NvmeResources {
            default: Some(VfResources { vq, vi }),
            vfs: BTreeMap::new(),
        }
    }

    /// Parses `0=vq:2,vi:1,1=vq:4,vi:2`: `INDEX=` starts a VF, then its
    /// `vq:N` and `vi:N` (both required), comma separated. An index given
    /// twice, an unknown key or a missing count is an error.
    pub fn parse_spec(spec: &str) -> Result<Self, String> {
        let mut vfs = BTreeMap::new();
        let mut current: Option<(u16, Option<u16>, Option<u16>)> = None;
        let finish = |c: Option<(u16, Option<u16>, Option<u16>)>,
                      vfs: &mut BTreeMap<u16, VfResources>|
         -> Result<(), String> {
            if let Some((i, vq, vi)) = c {
                let (Some(vq), Some(vi)) = (vq, vi) else {
                    return Err(format!("VF {i}: give both vq:N and vi:N"));
                };
                if vfs.insert(i, VfResources { vq, vi }).is_some() {
                    return Err(format!("VF {i} given twice"));
                }
            }
            Ok(())
        };
        if spec.trim().is_empty() {
            return Err("empty resource list".into());
        }
        for item in spec.split(',') {
            let item = item.trim();
            let kv = match item.split_once('=') {
                Some((index, rest)) => {
                    finish(current.take(), &mut vfs)?;
                    let i: u16 = index
                        .trim()
                        .parse()
                        .map_err(|_| format!("{index:?} is not a VF index"))?;
                    current = Some((i, None, None));
                    rest
                }
                None => item,
            };
            let Some(cur) = current.as_mut() else {
                return Err(format!(
                    "{item:?} before any INDEX=: write e.g. 0=vq:2,vi:1"
                ));
            };
            let (key, value) = kv
                .split_once(':')
                .ok_or_else(|| format!("{kv:?}: expected vq:N or vi:N"))?;
            let n: u16 = value
                .trim()
                .parse()
                .map_err(|_| format!("{value:?} is not a count"))?;
            let slot = match key.trim() {
                "vq" => &mut cur.1,
                "vi" => &mut cur.2,
                other => return Err(format!("unknown resource {other:?} (vq or vi)")),
            };
            if slot.replace(n).is_some() {
                return Err(format!("VF {}: {key} given twice", cur.0));
            }
        }
        finish(current, &mut vfs)?;
        Ok(NvmeResources { default: None, vfs })
    }

    /// The resources VF `index` gets, if any.
    pub fn for_vf(&self, index: u16) -> Option<VfResources> {
        self.vfs.get(&index).copied().or(self.default)
    }
}

/// What status shows of a nvme-profile PF's controller.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NvmeStatus {
    /// The controller device, e.g. `/dev/nvme0`.
    pub controller: Option<String>,
    /// VQFRT: flexible VQ resources in all.
    pub vq_total: Option<u32>,
    /// VQRFA: VQ resources assigned to secondaries.
    pub vq_assigned: Option<u32>,
    /// VQRFAP: flexible VQ resources the primary keeps.
    pub vq_primary: Option<u32>,
    /// VQFRSM: most VQ resources one secondary may have.
    pub vq_max_per_vf: Option<u16>,
    /// VIFRT.
    pub vi_total: Option<u32>,
    /// VIRFA.
    pub vi_assigned: Option<u32>,
    /// VIRFAP.
    pub vi_primary: Option<u32>,
    /// VIFRSM.
    pub vi_max_per_vf: Option<u16>,
    /// Why the controller could not be read (then the other fields are `null`).
    pub error: Option<String>,
}

/// What status shows of one VF of a nvme-profile PF: its secondary controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondaryStatus {
    /// Secondary controller id (SCID).
    pub scid: u16,
    /// Online (SCS bit 0).
    pub online: bool,
    /// VQ resources assigned.
    pub vq: u16,
    /// VI resources assigned.
    pub vi: u16,
}

impl From<&SecondaryController> for SecondaryStatus {
    fn from(s: &SecondaryController) -> Self {
        SecondaryStatus {
            scid: s.scid,
            online: s.online,
            vq: s.nvq,
            vi: s.nvi,
        }
    }
}

/// Opens the NVMe controller of a PF. The real one opens `/dev/nvmeN`
/// ([`NvmeDevice::open`]); unit tests hand out a model.
pub trait NvmeOpener: fmt::Debug + Send + Sync {
    /// The controller of `pf`.
    fn open(&self, pf: PciAddress) -> Result<Box<dyn NvmeAdmin>, Error>;
}

/// [`NvmeDevice::open`] under a sysfs root.
#[derive(Debug, Clone)]
pub struct DevNvmeOpener {
    /// The sysfs root (`/sys`).
    pub sysfs_root: PathBuf,
}

impl NvmeOpener for DevNvmeOpener {
    fn open(&self, pf: PciAddress) -> Result<Box<dyn NvmeAdmin>, Error> {
        Ok(Box::new(NvmeDevice::open(&self.sysfs_root, pf)?))
    }
}

fn admin_err(ctrl: &dyn NvmeAdmin, command: String, e: AdminError) -> Error {
    let (status, source) = match e {
        AdminError::Status(s) => (Some(s), None),
        AdminError::Os(e) => (None, Some(e)),
    };
    Error::NvmeAdmin {
        controller: ctrl.name(),
        command,
        status,
        source,
    }
}

/// Reads the Primary Controller Capabilities.
pub fn primary_caps(ctrl: &dyn NvmeAdmin) -> Result<PrimaryCaps, Error> {
    let mut buf = [0u8; IDENTIFY_LEN];
    ctrl.admin(
        &AdminCommand::identify(CNS_PRIMARY_CTRL_CAPS, 0),
        Some(&mut buf),
    )
    .map_err(|e| admin_err(ctrl, "Identify Primary Controller Capabilities".into(), e))?;
    Ok(PrimaryCaps::parse(&buf))
}

/// Reads the whole Secondary Controller List, 127 entries per Identify,
/// paging by controller id (bounded).
pub fn secondary_controllers(ctrl: &dyn NvmeAdmin) -> Result<Vec<SecondaryController>, Error> {
    let mut all: Vec<SecondaryController> = Vec::new();
    let mut from: u16 = 0;
    for _ in 0..MAX_LIST_PAGES {
        let mut buf = [0u8; IDENTIFY_LEN];
        ctrl.admin(
            &AdminCommand::identify(CNS_SECONDARY_CTRL_LIST, from),
            Some(&mut buf),
        )
        .map_err(|e| {
            admin_err(
                ctrl,
                format!("Identify Secondary Controller List from id {from}"),
                e,
            )
        })?;
        let page = parse_secondary_list(&buf);
        let full = page.len() == admin::MAX_LIST_ENTRIES;
        let last = page.last().map(|s| s.scid);
        // Only entries at or above `from`, in increasing order, are new.
        for s in page {
            if s.scid >= from && all.last().is_none_or(|l| s.scid > l.scid) {
                all.push(s);
            }
        }
        match (full, last) {
            (true, Some(l)) if l >= from && l < u16::MAX => from = l + 1,
            _ => return Ok(all),
        }
    }
    Ok(all)
}

/// One VF's planned change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedVf {
    /// `virtfnN` index.
    pub index: u16,
    /// Its secondary controller id.
    pub scid: u16,
    /// Resources to give it (`0/0`: offline).
    pub want: VfResources,
}

/// Resolves `req` for a PF that has (or is about to have) `numvfs` VFs
/// against the controller's capabilities and secondaries, and refuses before
/// anything is written: a VF index beyond `numvfs`, a VF without a secondary
/// controller, counts above the per-secondary maximum or off the
/// granularity, a type the controller does not support, a VF that could not
/// go online (fewer than 2 VQ or no VI while not both 0), or a sum beyond the
/// flexible total less the primary's share and what secondaries outside the
/// request hold. Errors name the PF, the VF and the resource.
pub fn check_plan(
    pf: PciAddress,
    caps: &PrimaryCaps,
    secondaries: &[SecondaryController],
    numvfs: u16,
    req: &NvmeResources,
) -> Result<Vec<PlannedVf>, Error> {
    let refuse = |reason: String| Error::NvmeResources { pf, reason };
    if let Some((&i, _)) = req.vfs.range(numvfs..).next() {
        return Err(refuse(format!(
            "VF {i} given resources, but the PF has {numvfs} VFs (indices 0..{numvfs})"
        )));
    }
    let mut plan = Vec::new();
    for index in 0..numvfs {
        let Some(want) = req.for_vf(index) else {
            continue;
        };
        let vfn = index + 1;
        let Some(sc) = secondaries.iter().find(|s| s.vfn == vfn) else {
            return Err(refuse(format!(
                "VF {index} has no secondary controller (none with VF number {vfn} in the Secondary Controller List)"
            )));
        };
        let offline = want.vq == 0 && want.vi == 0;
        if !offline && (want.vq < 2 || want.vi < 1) {
            return Err(refuse(format!(
                "VF {index}: {want} cannot go online: a secondary controller needs at least 2 VQ (its admin queue and one I/O queue) and 1 VI (vq:0,vi:0 leaves it offline)"
            )));
        }
        for (rt, n) in [(ResourceType::Vq, want.vq), (ResourceType::Vi, want.vi)] {
            let (_, _, max, gran) = caps.of(rt);
            if n == 0 {
                continue;
            }
            if !caps.supports(rt) {
                return Err(refuse(format!(
                    "VF {index}: {n} {} requested, but the controller has no flexible {} resources (CRT {:#x})",
                    rt.name(),
                    rt.name(),
                    caps.crt
                )));
            }
            if n > max {
                return Err(refuse(format!(
                    "VF {index}: {n} {} requested, at most {max} per secondary controller ({}FRSM)",
                    rt.name(),
                    rt.name()
                )));
            }
            if gran > 1 && n % gran != 0 {
                return Err(refuse(format!(
                    "VF {index}: {n} {} requested, not a multiple of the granularity {gran}",
                    rt.name()
                )));
            }
        }
        plan.push(PlannedVf {
            index,
            scid: sc.scid,
            want,
        });
    }
    for rt in [ResourceType::Vq, ResourceType::Vi] {
        let (total, primary, _, _) = caps.of(rt);
        let count =
            |s: &SecondaryController| u32::from(if rt == ResourceType::Vq { s.nvq } else { s.nvi });
        let others: u32 = secondaries
            .iter()
            .filter(|s| !plan.iter().any(|p| p.scid == s.scid))
            .map(count)
            .sum();
        let wanted: u32 = plan
            .iter()
            .map(|p| {
                u32::from(if rt == ResourceType::Vq {
                    p.want.vq
                } else {
                    p.want.vi
                })
            })
            .sum();
        let free = total.saturating_sub(primary).saturating_sub(others);
        if wanted > free {
            return Err(refuse(format!(
                "{wanted} {n} requested for VFs {}, but only {free} of the {total} flexible {n} resources are free ({primary} kept by the primary, {others} held by other secondaries)",
                plan.iter().map(|p| p.index.to_string()).collect::<Vec<_>>().join(","),
                n = rt.name()
            )));
        }
    }
    Ok(plan)
}

/// Whether secondary `s` already is as `p` plans it: online with exactly the
/// planned counts, or (planned `0/0`) offline with none.
fn matches(p: &PlannedVf, s: &SecondaryController) -> bool {
    let offline = p.want.vq == 0 && p.want.vi == 0;
    if offline {
        !s.online && s.nvq == 0 && s.nvi == 0
    } else {
        s.online && s.nvq == p.want.vq && s.nvi == p.want.vi
    }
}

/// The VF indices of `plan` whose secondary controller `apply_plan` (without
/// `force`) would change, given the current `secondaries`: for pool mode,
/// the only VFs to pause.
pub fn changed_vfs(plan: &[PlannedVf], secondaries: &[SecondaryController]) -> Vec<u16> {
    plan.iter()
        .filter(|p| {
            !secondaries
                .iter()
                .any(|s| s.scid == p.scid && matches(p, s))
        })
        .map(|p| p.index)
        .collect()
}

/// Carries out `plan` (from [`check_plan`]) on the controller: every
/// secondary whose state differs from the plan (with `force`: every planned
/// secondary, as after a VF count change, where the VFs are new devices) is
/// set offline, then each of those gets its VQ and VI counts and is set
/// online (unless planned offline). Reads the list back and checks every
/// planned secondary. Returns the number of secondaries changed.
pub fn apply_plan(
    pf: PciAddress,
    ctrl: &dyn NvmeAdmin,
    plan: &[PlannedVf],
    force: bool,
    vf_bdf: &dyn Fn(u16) -> Option<PciAddress>,
) -> Result<usize, Error> {
    apply_plan_each(pf, ctrl, plan, force, vf_bdf, &|_| ())
}

/// [`apply_plan`], calling `done(index)` as soon as that VF's secondary
/// controller has its resources and is online (or is left offline), before
/// the next one is changed and before the final check: pool mode unpauses
/// each VF then, while the next ones are still being changed.
pub fn apply_plan_each(
    pf: PciAddress,
    ctrl: &dyn NvmeAdmin,
    plan: &[PlannedVf],
    force: bool,
    vf_bdf: &dyn Fn(u16) -> Option<PciAddress>,
    done: &dyn Fn(u16),
) -> Result<usize, Error> {
    // With `force` every planned VF is done again: no need to ask first.
    let before = if force {
        Vec::new()
    } else {
        secondary_controllers(ctrl)?
    };
    let is_done = |p: &PlannedVf, list: &[SecondaryController]| {
        list.iter().any(|s| s.scid == p.scid && matches(p, s))
    };
    let todo: Vec<&PlannedVf> = plan
        .iter()
        .filter(|p| force || !is_done(p, &before))
        .collect();
    let who = |p: &PlannedVf| match vf_bdf(p.index) {
        Some(b) => format!("secondary controller {} (VF {} {b})", p.scid, p.index),
        None => format!("secondary controller {} (VF {})", p.scid, p.index),
    };
    let run = |cmd: AdminCommand, what: String| -> Result<(), Error> {
        ctrl.admin(&cmd, None)
            .map(|_| ())
            .map_err(|e| admin_err(ctrl, what, e))
    };
    for p in &todo {
        run(
            AdminCommand::virt_mgmt(VirtAction::Offline, ResourceType::Vq, p.scid, 0),
            format!("Virtualization Management: set {} offline", who(p)),
        )?;
    }
    for p in &todo {
        if p.want.vq == 0 && p.want.vi == 0 {
            info!(%pf, scid = p.scid, vf = p.index, "secondary controller left offline");
            done(p.index);
            continue;
        }
        for (rt, n) in [(ResourceType::Vq, p.want.vq), (ResourceType::Vi, p.want.vi)] {
            run(
                AdminCommand::virt_mgmt(VirtAction::Assign, rt, p.scid, n),
                format!(
                    "Virtualization Management: assign {n} {} to {}",
                    rt.name(),
                    who(p)
                ),
            )?;
        }
        run(
            AdminCommand::virt_mgmt(VirtAction::Online, ResourceType::Vq, p.scid, 0),
            format!("Virtualization Management: set {} online", who(p)),
        )?;
        info!(%pf, scid = p.scid, vf = p.index, vq = p.want.vq, vi = p.want.vi, "secondary controller online");
        done(p.index);
    }
    let after = secondary_controllers(ctrl)?;
    for p in plan {
        if !is_done(p, &after) {
            let got = after.iter().find(|s| s.scid == p.scid);
            return Err(Error::NvmeResources {
                pf,
                reason: format!(
                    "after the change {} shows {}, expected {} {}",
                    who(p),
                    got.map_or("nothing".to_owned(), |s| format!(
                        "{} vq:{},vi:{}",
                        if s.online { "online" } else { "offline" },
                        s.nvq,
                        s.nvi
                    )),
                    if p.want.vq == 0 && p.want.vi == 0 {
                        "offline"
                    } else {
                        "online"
                    },
                    p.want
                ),
            });
        }
    }
    Ok(todo.len())
}

/// The status of a PF's controller and of each VF's secondary (by VF index);
/// a controller that cannot be read gives `error`, never a failure.
pub fn read_status(
    opener: &dyn NvmeOpener,
    pf: PciAddress,
) -> (NvmeStatus, BTreeMap<u16, SecondaryStatus>) {
    let read = || -> Result<(String, PrimaryCaps, Vec<SecondaryController>), Error> {
        let ctrl = opener.open(pf)?;
        let caps = primary_caps(&*ctrl)?;
        let list = secondary_controllers(&*ctrl)?;
        Ok((ctrl.name(), caps, list))
    };
    match read() {
        Ok((name, caps, list)) => {
            let vfs = list
                .iter()
                .filter(|s| s.vfn > 0)
                .map(|s| (s.vfn - 1, SecondaryStatus::from(s)))
                .collect();
            (
                NvmeStatus {
                    controller: Some(name),
                    vq_total: Some(caps.vqfrt),
                    vq_assigned: Some(caps.vqrfa),
                    vq_primary: Some(u32::from(caps.vqrfap)),
                    vq_max_per_vf: Some(caps.vqfrsm),
                    vi_total: Some(caps.vifrt),
                    vi_assigned: Some(caps.virfa),
                    vi_primary: Some(u32::from(caps.virfap)),
                    vi_max_per_vf: Some(caps.vifrsm),
                    error: None,
                },
                vfs,
            )
        }
        Err(e) => (
            NvmeStatus {
                error: Some(e.chain()),
                ..Default::default()
            },
            BTreeMap::new(),
        ),
    }
}
