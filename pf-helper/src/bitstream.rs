//! Programming the FPGA behind a PF: through the Linux FPGA manager or an
//! external command, with the PF removed from the PCI bus around it.

use std::os::unix::process::CommandExt;
use std::path::{Component, Path};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::Error;
use crate::pci::PciAddress;
use crate::sriov::{timed, SriovManager, VfsSetOptions};
use crate::status::Step;
use crate::sysfs::Sysfs;

fn default_timeout() -> u64 {
    600
}

/// How to program a PF's FPGA. Exactly one of `fpga_manager` + `firmware` or
/// `command` is given.
///
/// - FPGA manager: `firmware` (a file name relative to the kernel's firmware
///   search path, e.g. `/lib/firmware`) is written to
///   `/sys/class/fpga_manager/<fpga_manager>/firmware`, then `state` must read `operating`.
/// - `command`: argv of an external tool (e.g. the vendor's flash tool), run
///   without a shell in its own process group, killed with that group after `timeout_s`.
///
/// Both run with the PF's VFs disabled and the PF removed (`remove`), and end
/// with a PCI rescan that brings the PF back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitstreamConfig {
    /// FPGA manager name under `/sys/class/fpga_manager/`, e.g. `fpga0`.
    #[serde(default)]
    pub fpga_manager: Option<String>,
    /// Firmware file name for the FPGA manager.
    #[serde(default)]
    pub firmware: Option<String>,
    /// External programming command (argv).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Time limit of the external command, seconds (default 600).
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && name != "."
        && name != ".."
}

impl BitstreamConfig {
    /// Checks that exactly one method is configured and that names are path-safe.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.fpga_manager, &self.firmware, &self.command) {
            (Some(mgr), Some(fw), None) => {
                if !plain_name(mgr) {
                    return Err(format!("invalid fpga_manager name {mgr:?}"));
                }
                let path = Path::new(fw);
                let ok = !fw.is_empty()
                    && fw.len() <= 255
                    && !fw.contains('\0')
                    && path.components().all(|c| matches!(c, Component::Normal(_)));
                if !ok {
                    return Err(format!(
                        "firmware {fw:?} must be a relative path under the firmware search path, without '..'"
                    ));
                }
                Ok(())
            }
            (None, None, Some(argv)) if !argv.is_empty() && Path::new(&argv[0]).is_absolute() => {
                Ok(())
            }
            (None, None, Some(_)) => {
                Err("command must be a non-empty argv with an absolute program path".into())
            }
            _ => Err("give either fpga_manager and firmware, or command".into()),
        }
    }
}

impl<S: Sysfs> SriovManager<S> {
    /// Programs the FPGA behind `pf`: VFs to 0, PF `remove`, program, `bus/pci/rescan`.
    /// The rescan is attempted even when programming failed. Returns the timed steps.
    pub fn program_bitstream(
        &self,
        pf: PciAddress,
        cfg: &BitstreamConfig,
    ) -> Result<Vec<Step>, Error> {
        let fail = |reason: String, source: Option<std::io::Error>| Error::Bitstream {
            pf,
            reason,
            source,
        };
        cfg.validate().map_err(|r| fail(r, None))?;
        let span = tracing::info_span!("program", %pf);
        let _enter = span.enter();
        let mut steps = Vec::new();
        let (_, num) = self.vf_counts(pf)?;
        if num != 0 {
            let report = self.set_vf_count(pf, 0, &VfsSetOptions::default())?;
            steps.extend(report.steps);
        }
        let remove = self.device_dir(pf)?.join("remove");
        timed(&mut steps, "remove_pf", || {
            self.write_raw(&remove, "1").map_err(|e| {
                fail(
                    format!("removing the PF ({}) failed", remove.display()),
                    Some(e),
                )
            })
        })?;
        let programmed = timed(&mut steps, "program", || match &cfg.command {
            Some(argv) => {
                run_command(argv, Duration::from_secs(cfg.timeout_s)).map_err(|(r, e)| fail(r, e))
            }
            None => self.program_fpga_manager(pf, cfg),
        });
        let rescan = timed(&mut steps, "rescan", || {
            self.write_raw(Path::new("bus/pci/rescan"), "1")
                .map_err(|e| fail("PCI rescan failed".into(), Some(e)))?;
            self.device_dir(pf)
                .map(|_| ())
                .map_err(|_| fail("the PF did not come back after the rescan".into(), None))
        });
        if let Err(e) = &rescan {
            warn!(%pf, error = %e.chain(), "rescan after programming failed");
        }
        programmed?;
        rescan?;
        info!(%pf, "bitstream programmed");
        Ok(steps)
    }

    fn program_fpga_manager(&self, pf: PciAddress, cfg: &BitstreamConfig) -> Result<(), Error> {
        let (Some(mgr), Some(fw)) = (&cfg.fpga_manager, &cfg.firmware) else {
            unreachable!("validated")
        };
        let dir = Path::new("class/fpga_manager").join(mgr);
        let firmware = dir.join("firmware");
        self.write_raw(&firmware, fw).map_err(|e| Error::Bitstream {
            pf,
            reason: format!(
                "FPGA manager {mgr} refused firmware {fw} ({}): is it under the firmware search path?",
                self.sysfs().root().join(&firmware).display()
            ),
            source: Some(e),
        })?;
        let state = self
            .sysfs()
            .read(&dir.join("state"))
            .map_err(|e| Error::Bitstream {
                pf,
                reason: format!("cannot read the state of FPGA manager {mgr}"),
                source: Some(e),
            })?;
        if state.trim() != "operating" {
            return Err(Error::Bitstream {
                pf,
                reason: format!(
                    "FPGA manager {mgr} is in state {:?} after programming, not operating",
                    state.trim()
                ),
                source: None,
            });
        }
        Ok(())
    }
}

fn run_command(argv: &[String], timeout: Duration) -> Result<(), (String, Option<std::io::Error>)> {
    // Its own process group, so that a timeout kills whatever it started too.
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| (format!("cannot start {}", argv[0]), Some(e)))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err((format!("{} exited with {status}", argv[0]), None)),
            Ok(None) if Instant::now() >= deadline => {
                // The group's id is the child's pid (process_group(0)); the
                // child is not reaped yet, so that id cannot have been reused.
                let kill = i32::try_from(child.id())
                    .map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))
                    .and_then(|pgid| {
                        killpg(Pid::from_raw(pgid), Signal::SIGKILL).map_err(std::io::Error::from)
                    });
                let _ = child.wait();
                return Err((
                    format!(
                        "{} did not finish within {} s and was killed",
                        argv[0],
                        timeout.as_secs()
                    ),
                    kill.err(),
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err((format!("waiting for {} failed", argv[0]), Some(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeSysfs;
    use std::fs;
    use std::io;
    use std::os::unix::fs::OpenOptionsExt;

    fn setup() -> (SriovManager<FakeSysfs>, PciAddress) {
        let fake = FakeSysfs::new();
        fake.add_pf("0000:03:00.0", "0x10ee", "0x903f", 252, "0xa03f");
        fake.preset_driver("0000:03:00.0", "qdma-pf");
        (fake.manager(), PciAddress::parse("0000:03:00.0").unwrap())
    }

    fn fpga(fw: &str) -> BitstreamConfig {
        BitstreamConfig {
            fpga_manager: Some("fpga0".into()),
            firmware: Some(fw.into()),
            command: None,
            timeout_s: 5,
        }
    }

    fn command(argv: &[&str], timeout_s: u64) -> BitstreamConfig {
        BitstreamConfig {
            fpga_manager: None,
            firmware: None,
            command: Some(argv.iter().map(|s| s.to_string()).collect()),
            timeout_s,
        }
    }

    #[test]
    fn fpga_manager_programming_disables_vfs_removes_and_rescans_the_pf() {
        let (mgr, pf) = setup();
        mgr.set_vf_count(pf, 4, &VfsSetOptions::default()).unwrap();
        mgr.sysfs().add_firmware("user.bin");
        mgr.sysfs().clear_writes();
        let steps = mgr.program_bitstream(pf, &fpga("user.bin")).unwrap();
        let w: Vec<(String, String)> = mgr.sysfs().writes();
        let order: Vec<&str> = w.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            order,
            [
                "bus/pci/devices/0000:03:00.0/sriov_numvfs",
                "bus/pci/devices/0000:03:00.0/remove",
                "class/fpga_manager/fpga0/firmware",
                "bus/pci/rescan",
            ]
        );
        assert_eq!(mgr.sysfs().fpga_firmware_loaded(), ["user.bin"]);
        let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "check_in_use",
                "disable_vfs",
                "remove_pf",
                "program",
                "rescan"
            ]
        );
        // The PF is back, unbound, with no VFs.
        assert_eq!(mgr.vf_counts(pf).unwrap().1, 0);
        assert_eq!(mgr.driver_of(pf).unwrap(), None);
    }

    #[test]
    fn missing_firmware_fails_clearly_and_still_rescans() {
        let (mgr, pf) = setup();
        let err = mgr.program_bitstream(pf, &fpga("absent.bin")).unwrap_err();
        assert!(
            err.to_string().contains("refused firmware absent.bin"),
            "{err}"
        );
        assert!(mgr
            .sysfs()
            .writes()
            .iter()
            .any(|(p, _)| p == "bus/pci/rescan"));
        assert!(mgr.pf_status(pf).is_ok());
    }

    #[test]
    fn external_command_runs_between_remove_and_rescan() {
        let (mgr, pf) = setup();
        mgr.program_bitstream(pf, &command(&["/bin/true"], 5))
            .unwrap();
        let err = mgr
            .program_bitstream(pf, &command(&["/bin/false"], 5))
            .unwrap_err();
        assert!(err.to_string().contains("/bin/false exited with"), "{err}");
        let err = mgr
            .program_bitstream(pf, &command(&["/bin/sleep", "30"], 1))
            .unwrap_err();
        assert!(
            err.to_string().contains("did not finish within 1 s"),
            "{err}"
        );
        let rescans = mgr
            .sysfs()
            .writes()
            .iter()
            .filter(|(p, _)| p == "bus/pci/rescan")
            .count();
        assert_eq!(rescans, 3);
        assert!(mgr.pf_status(pf).is_ok());
    }

    #[test]
    fn timed_out_tool_is_killed_with_its_process_group() {
        let (mgr, pf) = setup();
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("alive");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Opened before the tool runs, so the tool's open for writing does not block.
        let reader = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        // The tool leaves a background child holding the fifo's write end.
        let script = format!("(echo started; exec sleep 300) > {} & wait", fifo.display());
        let err = mgr
            .program_bitstream(pf, &command(&["/bin/sh", "-c", &script], 2))
            .unwrap_err();
        assert!(
            err.to_string().contains("did not finish within 2 s"),
            "{err}"
        );
        // EOF on the fifo comes only once every writer, the background child
        // included, is gone. The read runs on a thread with a hang guard.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let fd = std::os::fd::AsFd::as_fd(&reader);
            let flags = nix::fcntl::OFlag::from_bits_truncate(
                nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).unwrap(),
            );
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFL(flags - nix::fcntl::OFlag::O_NONBLOCK),
            )
            .unwrap();
            let mut text = String::new();
            let _ = tx.send(io::Read::read_to_string(&mut &reader, &mut text).map(|_| text));
        });
        let text = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the tool's background child still holds the fifo after 60 s")
            .unwrap();
        assert_eq!(text.trim(), "started");
    }

    #[test]
    fn unsafe_bitstream_configs_are_rejected() {
        for bad in [
            fpga("../../etc/shadow"),
            fpga("/etc/shadow"),
            fpga(""),
            BitstreamConfig {
                fpga_manager: Some("../fpga0".into()),
                ..fpga("x.bin")
            },
            command(&["flash-tool"], 5),
            command(&[], 5),
            BitstreamConfig {
                command: Some(vec!["/bin/true".into()]),
                ..fpga("x.bin")
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(fpga("xilinx/user.bin").validate().is_ok());
    }
}
