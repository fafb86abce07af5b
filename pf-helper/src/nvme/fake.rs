//! A model of QEMU's emulated NVMe primary controller with SR-IOV, for unit
//! tests: it decodes the admin commands it gets with the spec's layout
//! (independently of the encoder) and answers with QEMU's rules (assign only
//! offline, per-secondary maximum, free pool, online needs 2 VQ and 1 VI,
//! offline returns the resources).

use std::sync::{Arc, Mutex};

use super::admin::{AdminCommand, AdminError, NvmeAdmin};
use super::NvmeOpener;
use crate::error::Error;
use crate::pci::PciAddress;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sec {
    pub scid: u16,
    pub online: bool,
    pub vfn: u16,
    pub nvq: u16,
    pub nvi: u16,
}

#[derive(Debug)]
pub(crate) struct Model {
    pub cntlid: u16,
    pub vqfrt: u32,
    pub vifrt: u32,
    pub vqrfap: u16,
    pub virfap: u16,
    pub vqfrsm: u16,
    pub vifrsm: u16,
    pub secs: Vec<Sec>,
    /// Every command, as (opcode, cdw10, cdw11).
    pub log: Vec<(u8, u32, u32)>,
    /// Fail the command with this index in `log` with this status.
    pub fail_at: Option<(usize, u16)>,
}

/// The shared model; clones see the same controller.
#[derive(Debug, Clone)]
pub(crate) struct FakeNvme(pub Arc<Mutex<Model>>);

const INVALID_FIELD: u16 = 0x4002;
const INVALID_CTRL_ID: u16 = 0x411f;
const INVALID_SEC_STATE: u16 = 0x4120;
const INVALID_NUM_RES: u16 = 0x4121;
const INVALID_RES_ID: u16 = 0x4122;

impl FakeNvme {
    /// The lab's controller: 64 secondaries (ids 1..=64, VF numbers 1..=64),
    /// VQ 128 / VI 64 flexible, at most 2 VQ / 1 VI each.
    pub fn lab() -> Self {
        Self::new(64, 128, 64, 2, 1)
    }

    pub fn new(n: u16, vqfrt: u32, vifrt: u32, vqfrsm: u16, vifrsm: u16) -> Self {
        FakeNvme(Arc::new(Mutex::new(Model {
            cntlid: 0,
            vqfrt,
            vifrt,
            vqrfap: 0,
            virfap: 0,
            vqfrsm,
            vifrsm,
            secs: (1..=n)
                .map(|i| Sec {
                    scid: i,
                    online: false,
                    vfn: i,
                    nvq: 0,
                    nvi: 0,
                })
                .collect(),
            log: Vec::new(),
            fail_at: None,
        })))
    }

    pub fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.0.lock().unwrap()
    }

    pub fn log(&self) -> Vec<(u8, u32, u32)> {
        self.model().log.clone()
    }

    pub fn sec(&self, scid: u16) -> Sec {
        *self.model().secs.iter().find(|s| s.scid == scid).unwrap()
    }
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

impl NvmeAdmin for FakeNvme {
    fn name(&self) -> String {
        "/dev/nvme-fake".into()
    }

    fn admin(&self, cmd: &AdminCommand, data: Option<&mut [u8]>) -> Result<u32, AdminError> {
        let mut m = self.0.lock().unwrap();
        let pt = cmd.to_passthru(0);
        let at = m.log.len();
        m.log.push((pt.opcode, pt.cdw10, pt.cdw11));
        if let Some((i, status)) = m.fail_at {
            if i == at {
                return Err(AdminError::Status(status));
            }
        }
        let assigned = |m: &Model, vq: bool| -> u32 {
            m.secs
                .iter()
                .map(|s| u32::from(if vq { s.nvq } else { s.nvi }))
                .sum()
        };
        match pt.opcode {
            0x06 => {
                let buf = data.ok_or(AdminError::Status(INVALID_FIELD))?;
                assert_eq!(buf.len(), 4096);
                assert_eq!(pt.data_len, 4096);
                buf.fill(0);
                let cns = pt.cdw10 & 0xff;
                let cntid = (pt.cdw10 >> 16) as u16;
                match cns {
                    0x14 => {
                        put16(buf, 0, m.cntlid);
                        buf[4] = 0x3;
                        put32(buf, 32, m.vqfrt);
                        put32(buf, 36, assigned(&m, true));
                        put16(buf, 40, m.vqrfap);
                        put16(buf, 42, 3);
                        put16(buf, 44, m.vqfrsm);
                        put16(buf, 46, 1);
                        put32(buf, 64, m.vifrt);
                        put32(buf, 68, assigned(&m, false));
                        put16(buf, 72, m.virfap);
                        put16(buf, 74, 16);
                        put16(buf, 76, m.vifrsm);
                        put16(buf, 78, 1);
                    }
                    0x15 => {
                        let list: Vec<Sec> = m
                            .secs
                            .iter()
                            .filter(|s| s.scid >= cntid)
                            .take(127)
                            .copied()
                            .collect();
                        buf[0] = list.len() as u8;
                        for (i, s) in list.iter().enumerate() {
                            let e = 32 + 32 * i;
                            put16(buf, e, s.scid);
                            put16(buf, e + 2, m.cntlid);
                            buf[e + 4] = u8::from(s.online);
                            put16(buf, e + 8, s.vfn);
                            put16(buf, e + 10, s.nvq);
                            put16(buf, e + 12, s.nvi);
                        }
                    }
                    _ => return Err(AdminError::Status(INVALID_FIELD)),
                }
                Ok(0)
            }
            0x1c => {
                assert!(data.is_none() && pt.data_len == 0);
                let act = pt.cdw10 & 0xf;
                let rt = (pt.cdw10 >> 8) & 0x7;
                let cntlid = (pt.cdw10 >> 16) as u16;
                let nr = (pt.cdw11 & 0xffff) as u16;
                if rt > 1 {
                    return Err(AdminError::Status(INVALID_RES_ID));
                }
                let Some(i) = m.secs.iter().position(|s| s.scid == cntlid) else {
                    return Err(AdminError::Status(INVALID_CTRL_ID));
                };
                match act {
                    7 => {
                        let s = &mut m.secs[i];
                        s.online = false;
                        s.nvq = 0;
                        s.nvi = 0;
                        Ok(0)
                    }
                    8 => {
                        if m.secs[i].online {
                            return Err(AdminError::Status(INVALID_SEC_STATE));
                        }
                        let vq = rt == 0;
                        let (limit, total, prim) = if vq {
                            (m.vqfrsm, m.vqfrt, u32::from(m.vqrfap))
                        } else {
                            (m.vifrsm, m.vifrt, u32::from(m.virfap))
                        };
                        if nr > limit {
                            return Err(AdminError::Status(INVALID_NUM_RES));
                        }
                        let cur = if vq { m.secs[i].nvq } else { m.secs[i].nvi };
                        let free = total as i64 - prim as i64 - assigned(&m, vq) as i64;
                        if i64::from(nr) - i64::from(cur) > free {
                            return Err(AdminError::Status(INVALID_RES_ID));
                        }
                        if vq {
                            m.secs[i].nvq = nr;
                        } else {
                            m.secs[i].nvi = nr;
                        }
                        Ok(u32::from(nr))
                    }
                    9 => {
                        let s = &mut m.secs[i];
                        if s.nvi == 0 || s.nvq < 2 {
                            return Err(AdminError::Status(INVALID_SEC_STATE));
                        }
                        s.online = true;
                        Ok(0)
                    }
                    _ => Err(AdminError::Status(INVALID_FIELD)),
                }
            }
            _ => Err(AdminError::Status(0x4001)),
        }
    }
}

impl NvmeOpener for FakeNvme {
    fn open(&self, _pf: PciAddress) -> Result<Box<dyn NvmeAdmin>, Error> {
        Ok(Box::new(self.clone()))
    }
}
