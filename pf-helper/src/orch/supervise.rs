//! VMs of kind `svff-vmm`: svff starts the VMM and keeps track of it.
//!
//! The VMM is started with the VM's `command` (default: the `svff-vmm`
//! beside the running `svff` binary), `--qmp <qmp>` and one `--vfio` per VF
//! it gets; with `run_as` it runs as that uid/gid and opens no `/dev/vfio`
//! node itself: its VFs are `--vfio <BDF>,id=<id>,fd=<id>` and svff passes
//! each VFIO group fd with `getfd` before `x-svff-start`. It runs in its own
//! session (it outlives the `svff` CLI that started it); its stdout (the
//! guest's serial console with the default `--serial stdout`) goes to
//! `<state_dir>/vm-<name>.serial`, its stderr to `<state_dir>/vm-<name>.log`,
//! and `<state_dir>/vm-<name>.pid` holds `PID STARTTIME` (the process's start
//! time in clock ticks, `/proc/PID/stat` field 22), so that a reused pid is
//! never taken for the VMM.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::VmConfig;
use crate::error::Error;
use crate::pci::PciAddress;

/// How long a started VMM may take to serve QMP (and, with passed fds, to
/// build its VM at `x-svff-start`).
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Name of the default VMM binary, looked up beside the running `svff`.
pub const DEFAULT_VMM: &str = "svff-vmm";

/// The files of an svff-started VMM in the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmFiles {
    /// `vm-<name>.pid`: `PID STARTTIME`.
    pub pid: PathBuf,
    /// `vm-<name>.log`: the VMM's stderr.
    pub log: PathBuf,
    /// `vm-<name>.serial`: the VMM's stdout (the guest's console by default).
    pub serial: PathBuf,
}

/// The files of VM `name` under `state_dir`.
pub fn files(state_dir: &Path, name: &str) -> VmmFiles {
    VmmFiles {
        pid: state_dir.join(format!("vm-{name}.pid")),
        log: state_dir.join(format!("vm-{name}.log")),
        serial: state_dir.join(format!("vm-{name}.serial")),
    }
}

/// What svff knows of a VM's VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// No pid file: svff never started it (or it was cleaned up).
    NotStarted,
    /// The process of the pid file runs.
    Running {
        /// Its pid.
        pid: u32,
    },
    /// The process of the pid file has ended.
    Exited {
        /// Its pid.
        pid: u32,
    },
}

/// The state of the process recorded in `vm`'s pid file.
pub fn process(state_dir: &Path, name: &str) -> Process {
    let Ok(text) = fs::read_to_string(files(state_dir, name).pid) else {
        return Process::NotStarted;
    };
    let mut it = text.split_whitespace();
    let (Some(pid), Some(start)) = (
        it.next().and_then(|p| p.parse::<u32>().ok()),
        it.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return Process::NotStarted;
    };
    match proc_start_time(pid) {
        Some((t, state)) if t == start && state != 'Z' && state != 'X' => Process::Running { pid },
        _ => Process::Exited { pid },
    }
}

/// `(starttime, state)` of `pid` from `/proc/<pid>/stat`.
fn proc_start_time(pid: u32) -> Option<(u64, char)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); starttime is field 22.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(22 - 3)?.parse().ok()?;
    Some((start, state))
}

/// One VF a VMM starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartVf {
    /// Its device id in the VMM.
    pub id: String,
    /// The VF.
    pub host: PciAddress,
    /// Its VFIO group, for a VMM that gets group fds (`run_as`, `pass_group_fd`).
    pub group: Option<u32>,
}

/// Whether `vm`'s VMM gets its VFIO groups as fds from svff.
pub fn passes_fds(vm: &VmConfig) -> bool {
    vm.pass_group_fd || vm.run_as.is_some()
}

/// The VMM's command line: `command` (or `<svff_dir>/svff-vmm`), `--qmp`,
/// one `--vfio` per VF (`fd=<id>` when svff passes the group fds).
pub fn command_line(vm: &VmConfig, svff_dir: &Path, vfs: &[StartVf]) -> Vec<String> {
    let mut argv = if vm.command.is_empty() {
        vec![svff_dir.join(DEFAULT_VMM).display().to_string()]
    } else {
        vm.command.clone()
    };
    argv.push("--qmp".into());
    argv.push(vm.qmp.display().to_string());
    for v in vfs {
        let mut spec = format!("{},id={},policy={}", v.host, v.id, vm.pause_policy);
        if passes_fds(vm) {
            spec.push_str(&format!(",fd={}", v.id));
        }
        argv.push("--vfio".into());
        argv.push(spec);
    }
    argv
}

/// The directory of the running binary (where the default VMM is looked up).
fn own_dir(vm: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(|source| Error::VmmProcess {
        vm: vm.into(),
        action: "finding the svff binary (/proc/self/exe) beside which svff-vmm is".into(),
        source,
    })?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn io<'a>(vm: &'a str, what: &'a str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::VmmProcess {
        vm: vm.into(),
        action: format!("{what} {}", path.display()),
        source,
    }
}

/// The last lines of `path`, for an error message.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// A started VMM: its pid and files.
#[derive(Debug)]
pub struct Started {
    /// The VMM's pid.
    pub pid: u32,
}

/// Starts `vm`'s VMM with `vfs`, records its pid, and waits until its QMP
/// socket accepts a connection (bounded by [`START_TIMEOUT`]); the caller
/// then connects (and, with passed fds, does the start-up handshake).
pub fn spawn(vm: &VmConfig, state_dir: &Path, vfs: &[StartVf]) -> Result<Started, Error> {
    let f = files(state_dir, &vm.name);
    // A socket left by a VMM that is gone: svff-vmm wants a path that does not exist.
    if vm.qmp.exists() {
        match std::os::unix::net::UnixStream::connect(&vm.qmp) {
            Ok(_) => {
                return Err(Error::VmmUnsupported {
                    vm: vm.name.clone(),
                    reason: format!(
                        "something already serves its QMP socket {} but svff's pid file {} names no running VMM; stop it first",
                        vm.qmp.display(),
                        f.pid.display()
                    ),
                })
            }
            Err(_) => fs::remove_file(&vm.qmp).map_err(io(&vm.name, "removing the stale socket", &vm.qmp))?,
        }
    }
    if let Some(dir) = vm.qmp.parent() {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(io(&vm.name, "creating the socket directory", dir))?;
            if let Some(r) = &vm.run_as {
                nix::unistd::chown(
                    dir,
                    Some(nix::unistd::Uid::from_raw(r.uid)),
                    Some(nix::unistd::Gid::from_raw(r.gid)),
                )
                .map_err(|e| io(&vm.name, "giving run_as the socket directory", dir)(e.into()))?;
            }
        }
    }
    let argv = command_line(vm, &own_dir(&vm.name)?, vfs);
    let open_out = |p: &Path, truncate: bool| -> Result<File, Error> {
        OpenOptions::new()
            .create(true)
            .write(true)
            .append(!truncate)
            .truncate(truncate)
            .mode(0o640)
            .open(p)
            .map_err(io(&vm.name, "opening", p))
    };
    let serial = open_out(&f.serial, true)?;
    let mut log = open_out(&f.log, false)?;
    let _ = writeln!(log, "svff: starting VM {}: {}", vm.name, argv.join(" "));
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(serial)
        .stderr(log);
    let run_as = vm.run_as.clone();
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls async-signal-safe functions (setsid, setrlimit, setgroups,
    // setgid, setuid) on values computed before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(r) = &run_as {
                // VFIO type1 pins guest RAM against RLIMIT_MEMLOCK of the
                // VMM's user: lifted while still root.
                let unlimited = libc::rlimit {
                    rlim_cur: libc::RLIM_INFINITY,
                    rlim_max: libc::RLIM_INFINITY,
                };
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) < 0
                    || libc::setgroups(r.groups.len(), r.groups.as_ptr()) < 0
                    || libc::setgid(r.gid) < 0
                    || libc::setuid(r.uid) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| Error::VmmProcess {
        vm: vm.name.clone(),
        action: format!("starting {}", argv[0]),
        source,
    })?;
    let pid = child.id();
    let start = proc_start_time(pid).map(|(t, _)| t).unwrap_or(0);
    let tmp = f.pid.with_extension("pid.tmp");
    fs::write(&tmp, format!("{pid} {start}\n")).map_err(io(&vm.name, "writing", &tmp))?;
    fs::rename(&tmp, &f.pid).map_err(io(&vm.name, "renaming to", &f.pid))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::VmmUnsupported {
                vm: vm.name.clone(),
                reason: format!(
                    "its VMM (pid {pid}) exited with {status} before serving QMP; {}: {}",
                    f.log.display(),
                    tail(&f.log, 5)
                ),
            });
        }
        if std::os::unix::net::UnixStream::connect(&vm.qmp).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::VmmUnsupported {
                vm: vm.name.clone(),
                reason: format!(
                    "its VMM (pid {pid}) did not serve QMP on {} within {} s (killed); {}: {}",
                    vm.qmp.display(),
                    START_TIMEOUT.as_secs(),
                    f.log.display(),
                    tail(&f.log, 5)
                ),
            });
        }
        // Polling the socket: the VMM gives no other sign of being ready.
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reaped by this process while it lives (the daemon), by init after.
    std::thread::spawn(move || {
        let status = child.wait();
        tracing::info!(pid, ?status, "svff-vmm ended");
    });
    Ok(Started { pid })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RunAs, VmKind};

    fn vm(command: &[&str], run_as: Option<RunAs>) -> VmConfig {
        VmConfig {
            name: "vm1".into(),
            kind: VmKind::SvffVmm,
            qmp: "/run/svff/vm1.qmp".into(),
            libvirt: None,
            hotplug_ports: vec![],
            device_props: Default::default(),
            pause_policy: svff_types::PausePolicy::Stall,
            stall_ms: None,
            pass_group_fd: false,
            qmp_timeout_s: 10,
            detach_timeout_s: 30,
            command: command.iter().map(|s| s.to_string()).collect(),
            run_as,
            vfs: vec![],
        }
    }

    fn vfs() -> Vec<StartVf> {
        vec![
            StartVf {
                id: "svff-0000-01-00.0-vf0".into(),
                host: PciAddress::parse("0000:01:00.1").unwrap(),
                group: Some(7),
            },
            StartVf {
                id: "svff-0000-01-00.0-vf1".into(),
                host: PciAddress::parse("0000:01:00.2").unwrap(),
                group: Some(8),
            },
        ]
    }

    #[test]
    fn default_command_is_the_svff_vmm_beside_svff_with_qmp_and_one_vfio_per_vf() {
        let argv = command_line(&vm(&[], None), Path::new("/opt/svff/bin"), &vfs());
        assert_eq!(
            argv,
            [
                "/opt/svff/bin/svff-vmm",
                "--qmp",
                "/run/svff/vm1.qmp",
                "--vfio",
                "0000:01:00.1,id=svff-0000-01-00.0-vf0,policy=stall",
                "--vfio",
                "0000:01:00.2,id=svff-0000-01-00.0-vf1,policy=stall",
            ]
        );
    }

    #[test]
    fn unprivileged_vmm_gets_its_vfs_by_fd_name_and_keeps_its_own_arguments() {
        let run_as = RunAs {
            uid: 1000,
            gid: 1000,
            groups: vec![],
        };
        let argv = command_line(
            &vm(&["/usr/bin/svff-vmm", "--memory", "64M"], Some(run_as)),
            Path::new("/x"),
            &vfs()[..1],
        );
        assert_eq!(
            argv,
            [
                "/usr/bin/svff-vmm",
                "--memory",
                "64M",
                "--qmp",
                "/run/svff/vm1.qmp",
                "--vfio",
                "0000:01:00.1,id=svff-0000-01-00.0-vf0,policy=stall,fd=svff-0000-01-00.0-vf0",
            ]
        );
    }

    #[test]
    fn pid_file_of_a_running_process_is_running_and_of_an_ended_one_exited() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(process(dir.path(), "vm1"), Process::NotStarted);
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let (start, _) = proc_start_time(pid).unwrap();
        let f = files(dir.path(), "vm1");
        fs::write(&f.pid, format!("{pid} {start}\n")).unwrap();
        assert_eq!(process(dir.path(), "vm1"), Process::Running { pid });
        // The same pid with another start time is another process.
        fs::write(&f.pid, format!("{pid} {}\n", start + 1)).unwrap();
        assert_eq!(process(dir.path(), "vm1"), Process::Exited { pid });
        fs::write(&f.pid, format!("{pid} {start}\n")).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(process(dir.path(), "vm1"), Process::Exited { pid });
    }

    #[test]
    fn vmm_that_exits_at_start_is_an_error_naming_the_vm_and_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = vm(&["/bin/sh", "-c", "echo no kvm here >&2; exit 3"], None);
        cfg.qmp = dir.path().join("vm1.qmp");
        let e = spawn(&cfg, dir.path(), &vfs()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("VM vm1") || text.contains("vm1"), "{text}");
        assert!(text.contains("exited with"), "{text}");
        assert!(text.contains("no kvm here"), "{text}");
        assert!(matches!(process(dir.path(), "vm1"), Process::Exited { .. }));
    }
}
