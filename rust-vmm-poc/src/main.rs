//! `svff-vmm`: a KVM VMM on rust-vmm crates, with a QMP socket. See `svff-vmm --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use qmp_ext::{EventSink, Server, ServerConfig, VersionInfo};
use svff_vmm::{
    Error, GuestImage, GuestMode, LinuxBoot, QmpHandler, SerialOutput, Start, StartGate, TestGuest,
    VfioSpec, Vm, VmConfig, DEFAULT_CMDLINE, START_TIMEOUT,
};
use vfio_pause::PausePolicy;

/// Exit status for errors of the VMM itself (bad configuration, KVM unavailable, ...). Command
/// line syntax errors exit 2 (clap); a VM that ran exits with its reason's code.
const EXIT_VMM_ERROR: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GuestKind {
    /// The built-in test guest: enumerates PCI bus 0 and reads every function's BAR0 in a loop,
    /// printing parseable counter lines on COM1.
    Test,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GuestModeArg {
    /// The read loop.
    Read,
    /// The read loop; while a VF's identity register reads all-ones (paused, policy ignore),
    /// pseudo-random writes anywhere in its BAR0 and config space.
    ScribblePaused,
    /// `cli; hlt` for ever after the set-up.
    Halt,
    /// `cli` and a tight loop for ever after the set-up.
    Spin,
    /// The read loop; every igb VF raises its own MSI-X vector 0 each round (EICS).
    RingVf,
    /// The read loop; after round 100 every target's BAR0 moves to 0xe0000000 + index MiB.
    MoveBar,
    /// As ring-vf, with MSI-X entry 0 masked from round 101 to round 200.
    RingVfMasked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SerialArg {
    Stdout,
    File(PathBuf),
    Null,
}

fn parse_serial(s: &str) -> Result<SerialArg, String> {
    match s {
        "stdout" => Ok(SerialArg::Stdout),
        "none" => Ok(SerialArg::Null),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialArg::File(PathBuf::from(p))),
            _ => Err(format!("'{s}' is not `stdout`, `none` or `file:<path>`")),
        },
    }
}

/// Parses `256M`, `1G`, `4096`, `512K` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (bytes, or a number with K, M or G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// svff-vmm: a minimal KVM VMM (rust-vmm crates) for svff's pausable VFIO passthrough.
///
/// Boots the built-in test guest or a Linux kernel with an in-kernel irqchip and
/// PIT, COM1 at 0x3f8 (IRQ 4), PCI bus 0 behind conf1 with a host bridge at 00:00.0 and
/// emulated `svff-test` functions from 00:01.0 on, and serves QMP on a unix socket.
///
/// Exit status: 0 after QMP `quit`, a guest reset (i8042 0xFE) or shutdown (triple fault);
/// the byte a guest wrote to the debug exit port 0x501; 1 for a VMM error (the message names
/// the device, path or value at fault); 2 for a bad command line.
#[derive(Debug, Parser)]
#[command(name = "svff-vmm", version, max_term_width = 100)]
struct Cli {
    /// Guest RAM: bytes, or a number with K, M or G (binary units). 2M..=64G, whole 4 KiB
    /// pages. RAM above 3 GiB continues at 4 GiB (0xC0000000..0xFEC00000 is the PCI MMIO
    /// window).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    memory: u64,

    /// Number of vCPUs. vCPU 0 boots; the others wait for INIT/SIPI.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=svff_vmm::MAX_CPUS as i64))]
    cpus: u8,

    /// Where the guest's COM1 output goes: `stdout`, `file:<path>` (created or truncated) or
    /// `none`.
    #[arg(long, value_name = "WHERE", default_value = "stdout", value_parser = parse_serial)]
    serial: SerialArg,

    /// Serve QMP on a unix socket at this path (must not exist). Commands: qmp_capabilities,
    /// query-version, query-status, stop, cont, quit, getfd, closefd, x-svff-set-present,
    /// device_add (vfio-pci), device_del, x-svff-trigger-irq, x-svff-query-bar-slots and
    /// x-svff-query-tsc (test only), x-svff-start (start-up handshake of --vfio ...,fd=),
    /// svff-vfio-pause, svff-vfio-unpause, query-svff-vfio.
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,

    /// The guest to boot when no --kernel is given.
    #[arg(long, value_enum, default_value = "test", conflicts_with = "kernel")]
    guest: GuestKind,

    /// Test guest: rounds of BAR reads before it ends the VM through the debug exit port
    /// (exit status 0); 0 runs until QMP `quit`.
    #[arg(long, value_name = "N", default_value_t = 0)]
    guest_rounds: u32,

    /// Test guest: rounds between two counter reports.
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    guest_report_every: u32,

    /// Test guest: what it does after enumerating bus 0 and setting up interrupts, MSI-X and
    /// MSI (robustness tests: a guest that scribbles over paused VFs, halts or spins).
    #[arg(long, value_enum, value_name = "MODE", default_value = "read")]
    guest_mode: GuestModeArg,

    /// Emulated `svff-test` PCI functions (1234:5ff0, a 4 KiB BAR0 of registers), placed at
    /// 00:01.0, 00:02.0, ...
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(0..=16))]
    test_devices: u8,

    /// Linux bzImage to boot directly (64-bit boot protocol, e820, MP table, no ACPI); the
    /// Debian kernel needs --memory 256M or more.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initramfs for --kernel, placed at the top of RAM below 3 GiB.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,

    /// Kernel command line for --kernel [default: console=ttyS0 reboot=k panic=1 pci=conf1
    /// acpi=off]. `reboot=k` makes a guest reboot end the VMM (i8042 reset, exit status 0).
    #[arg(long, value_name = "ARGS", requires = "kernel")]
    cmdline: Option<String>,

    /// Pass a VF (bound to vfio-pci) through:
    /// `<BDF or sysfs path>[,id=<id>][,policy=ignore|stall][,mmap=on|off][,fd=<name>]`,
    /// repeatable; placed on bus 0 after the test devices; id defaults to vfio<N>. Config
    /// space goes through vfio-pause (BARs and ROM shadowed). BARs are mapped into KVM slots
    /// while attached (not the MSI-X table and PBA pages, which trap); mmap=off traps every
    /// BAR access. QMP svff-vfio-pause /
    /// svff-vfio-unpause pause it; while paused, BAR reads give all-ones (ignore) or wait up
    /// to 10 s for the unpause (stall). MSI and MSI-X are emulated and wired through KVM
    /// irqfds (INTx is not wired).
    /// `fd=<name>` (a name not starting with a digit): open the VF through a VFIO group fd
    /// passed over QMP instead of /dev/vfio/<group> (for a VMM without /dev/vfio access);
    /// then --qmp is required and the VMM starts in the start-up handshake: it serves QMP
    /// before building the VM, takes `getfd <name>` of every such fd and builds the VM at
    /// `x-svff-start` on the same connection (answered once the VM is built, or with the
    /// error that stopped it), waiting at most 300 s for it.
    #[arg(long, value_name = "SPEC")]
    vfio: Vec<String>,

    /// The KVM device node to open.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    kvm_device: PathBuf,
}

fn file_size(what: &'static str, p: &PathBuf) -> Result<u64, Error> {
    std::fs::metadata(p)
        .map(|m| m.len())
        .map_err(|source| Error::Io {
            what: format!("{what} {}", p.display()),
            source,
        })
}

/// Parses `<BDF or /sys/bus/pci/devices/BDF>[,id=<id>][,policy=ignore|stall]`.
fn parse_vfio(spec: &str, index: usize) -> Result<VfioSpec, Error> {
    let mut parts = spec.split(',');
    let dev = parts.next().unwrap_or_default();
    let bdf = dev
        .strip_prefix("/sys/bus/pci/devices/")
        .unwrap_or(dev)
        .trim_end_matches('/');
    let host: vfio_pause::PciAddress = bdf.parse().map_err(|_| {
        Error::Config(format!(
            "--vfio {spec}: '{dev}' is not a PCI address (DDDD:BB:DD.F) or its sysfs path"
        ))
    })?;
    let mut id = format!("vfio{index}");
    let mut policy = PausePolicy::Ignore;
    let mut fd = None;
    let mut mmap = true;
    for p in parts {
        match p.split_once('=') {
            Some(("id", v)) if !v.is_empty() => id = v.to_string(),
            Some(("fd", v)) if !v.is_empty() && !v.starts_with(|c: char| c.is_ascii_digit()) => {
                fd = Some(v.to_string())
            }
            Some(("policy", "ignore")) => policy = PausePolicy::Ignore,
            Some(("policy", "stall")) => policy = PausePolicy::Stall,
            Some(("mmap", "on")) => mmap = true,
            Some(("mmap", "off")) => mmap = false,
            _ => {
                return Err(Error::Config(format!(
                    "--vfio {spec}: unknown option '{p}' (id=<id>, policy=ignore|stall, mmap=on|off, fd=<name>)"
                )))
            }
        }
    }
    Ok(VfioSpec {
        host,
        id,
        policy,
        fd,
        mmap,
    })
}

fn build_config(cli: &Cli) -> Result<VmConfig, Error> {
    svff_vmm::check_ram_size(cli.memory)?;
    if let Some(k) = &cli.kernel {
        let mut total = 0;
        for (what, p) in [("kernel", Some(k)), ("initrd", cli.initrd.as_ref())] {
            let Some(p) = p else { continue };
            let size = file_size(what, p)?;
            total += size;
            if total >= cli.memory {
                return Err(Error::ImageTooLarge {
                    what,
                    path: p.clone(),
                    size,
                    memory: cli.memory,
                });
            }
        }
    }
    let vfio = cli
        .vfio
        .iter()
        .enumerate()
        .map(|(i, s)| parse_vfio(s, i))
        .collect::<Result<Vec<_>, _>>()?;
    let guest = match (&cli.kernel, cli.guest) {
        (Some(k), _) => GuestImage::Linux(LinuxBoot {
            kernel: k.clone(),
            initrd: cli.initrd.clone(),
            cmdline: cli
                .cmdline
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
        }),
        (None, GuestKind::Test) => GuestImage::Test(TestGuest {
            rounds: cli.guest_rounds,
            report_every: cli.guest_report_every,
            mode: match cli.guest_mode {
                GuestModeArg::Read => GuestMode::Read,
                GuestModeArg::ScribblePaused => GuestMode::ScribblePaused,
                GuestModeArg::Halt => GuestMode::Halt,
                GuestModeArg::Spin => GuestMode::Spin,
                GuestModeArg::RingVf => GuestMode::RingVf,
                GuestModeArg::MoveBar => GuestMode::MoveBar,
                GuestModeArg::RingVfMasked => GuestMode::RingVfMasked,
            },
        }),
    };
    Ok(VmConfig {
        memory: cli.memory,
        cpus: cli.cpus,
        kvm_device: cli.kvm_device.clone(),
        serial: match &cli.serial {
            SerialArg::Stdout => SerialOutput::Stdout,
            SerialArg::File(p) => SerialOutput::File(p.clone()),
            SerialArg::Null => SerialOutput::Null,
        },
        guest,
        test_devices: cli.test_devices,
        vfio,
    })
}

fn run(cli: Cli) -> Result<u8, Error> {
    let config = build_config(&cli)?;
    let fd_names: Vec<String> = config.vfio.iter().filter_map(|v| v.fd.clone()).collect();
    let events = EventSink::new();
    let serve = |gate: &StartGate| -> Result<Option<Server>, Error> {
        let Some(path) = &cli.qmp else {
            return Ok(None);
        };
        Server::bind(
            path,
            ServerConfig {
                version: VersionInfo::svff("svff-vmm"),
                events: events.clone(),
            },
            gate.clone(),
        )
        .map(Some)
        .map_err(|source| Error::Qmp {
            path: path.clone(),
            source,
        })
    };
    let (vm, server) = if fd_names.is_empty() {
        let vm = Vm::new(config)?;
        let gate = StartGate::started(QmpHandler::new(vm.handle(), events.clone()));
        let server = serve(&gate)?;
        (vm, server)
    } else {
        if cli.qmp.is_none() {
            return Err(Error::Config(
                "--vfio ...,fd=<name> needs --qmp: the group fds are passed over it".into(),
            ));
        }
        let (gate, starts) = StartGate::waiting(fd_names);
        let server = serve(&gate)?;
        match starts.recv_timeout(START_TIMEOUT) {
            Ok(Start::Fds(fds, reply)) => match Vm::with_group_fds(config, fds) {
                Ok(vm) => {
                    gate.start(QmpHandler::new(vm.handle(), events.clone()));
                    let _ = reply.send(Ok(()));
                    (vm, server)
                }
                Err(e) => {
                    let _ = reply.send(Err(svff_vmm::error_chain(&e)));
                    return Err(e);
                }
            },
            Ok(Start::Quit) => return Ok(0),
            Err(_) => {
                return Err(Error::Config(format!(
                    "no x-svff-start on the QMP socket within {} s",
                    START_TIMEOUT.as_secs()
                )))
            }
        }
    };
    let reason = vm.run()?;
    tracing::info!("VM ended: {reason:?}");
    QmpHandler::emit_shutdown(&events, &reason);
    // Stops accepting, disconnects clients and joins the server's threads.
    drop(server);
    if let svff_vmm::ExitReason::VcpuFailed { cpu, reason } = &reason {
        eprintln!("svff-vmm: vCPU {cpu} failed: {reason}");
    }
    Ok(reason.exit_code())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SVFF_VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("svff-vmm: error: {e}");
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes_and_garbage_is_refused() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn serial_targets_parse() {
        assert_eq!(parse_serial("stdout"), Ok(SerialArg::Stdout));
        assert_eq!(parse_serial("none"), Ok(SerialArg::Null));
        assert_eq!(
            parse_serial("file:/tmp/x"),
            Ok(SerialArg::File("/tmp/x".into()))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }

    #[test]
    fn vfio_specs_parse_by_bdf_or_sysfs_path_with_an_id() {
        let s = parse_vfio("0000:01:10.0,id=vf0", 0).unwrap();
        assert_eq!(
            (s.host.to_string(), s.id.as_str()),
            ("0000:01:10.0".into(), "vf0")
        );
        let s = parse_vfio("/sys/bus/pci/devices/0000:01:10.2/", 3).unwrap();
        assert_eq!(
            (s.host.to_string(), s.id.as_str()),
            ("0000:01:10.2".into(), "vfio3")
        );
        assert!(parse_vfio("01:10.0", 0).is_err());
        assert!(parse_vfio("0000:01:10.0,bogus=1", 0).is_err());
        assert_eq!(
            parse_vfio("0000:01:10.0,policy=stall", 0).unwrap().policy,
            PausePolicy::Stall
        );
        assert!(parse_vfio("0000:01:10.0,policy=wait", 0).is_err());
        let s = parse_vfio("0000:01:10.0,id=vf0,fd=g0", 0).unwrap();
        assert_eq!(s.fd.as_deref(), Some("g0"));
        assert_eq!(parse_vfio("0000:01:10.0", 0).unwrap().fd, None);
        assert!(parse_vfio("0000:01:10.0", 0).unwrap().mmap);
        assert!(!parse_vfio("0000:01:10.0,mmap=off", 0).unwrap().mmap);
        assert!(parse_vfio("0000:01:10.0,mmap=maybe", 0).is_err());
        assert!(parse_vfio("0000:01:10.0,fd=", 0).is_err());
        assert!(
            parse_vfio("0000:01:10.0,fd=3", 0).is_err(),
            "names, not numbers"
        );
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
