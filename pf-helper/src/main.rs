//! `svff`: the command-line interface of svff's privileged helper.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use svff_pf_helper::{
    bind_socket, listener_from_systemd, request, AssignRequest, Config, Daemon, DriverName, Error,
    FpgaStatus, Mode, NvmeResources, OpReport, Orchestrator, PciAddress, QmpConnector, RealSysfs,
    Request, SriovManager, Status, VfsSetOptions, VfsSetReport, DEFAULT_CONFIG_PATH,
    DEFAULT_SOCKET_PATH,
};

/// Manage SR-IOV virtual functions of FPGA (and other) PFs for svff.
///
/// Without --direct, commands go to the svff helper daemon over its unix
/// socket; with --direct they run in this process, which must be root.
#[derive(Debug, Parser)]
#[command(name = "svff", version, about, long_about)]
struct Cli {
    /// The helper daemon's socket.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET_PATH)]
    socket: PathBuf,
    /// Do the work in this process on /sys instead of asking the daemon (needs root).
    #[arg(long, global = true)]
    direct: bool,
    /// The TOML config (root-owned, not group/world writable): read by
    /// `helper`, and by init/reconf/recover/status with --direct.
    #[arg(long = "config", global = true, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    config_path: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the SR-IOV PFs, their VF counts, and each VF's driver, IOMMU group and holder.
    ///
    /// Through the daemon: the PFs of its allow-list. With --direct: every
    /// SR-IOV capable device in /sys/bus/pci/devices. For functions of the svff
    /// FPGA design (Xilinx 0x10ee, device 0x903f..0x933f / 0xa03f..0xa33f), the
    /// ID, VERSION and FUNC_INFO registers read through BAR2 (needs root).
    Status(StatusArgs),
    /// Manage a PF's virtual functions.
    #[command(subcommand)]
    Vfs(VfsCommand),
    /// Bring every configured PF up: bitstream, VFs, vfio-pci, each VF into its VM.
    ///
    /// Journaled; running it again on a system in that state changes nothing
    /// and says so. Exits 1 when a device could not be attached.
    Init {
        /// Print the result as JSON (format in the svff-pf-helper crate docs, `format_version` 1).
        #[arg(long)]
        json: bool,
    },
    /// Change a PF's VF count across running VMs.
    ///
    /// Pause mode (default): VMMs holding the PF's VFs pause them in parallel,
    /// the count changes, surviving VFs are unpaused onto the re-created VFs,
    /// VFs that are gone are removed from their guests. Detach mode:
    /// device_del, count change, device_add (works with stock QEMU).
    Reconf {
        /// The PF, e.g. 0000:01:00.0.
        #[arg(long, value_name = "BDF")]
        pf: PciAddress,
        /// The new VF count (not for a PF in pool mode).
        #[arg(
            long,
            value_name = "N",
            required_unless_present = "resources",
            conflicts_with = "resources"
        )]
        vfs: Option<u16>,
        /// Pool mode: new NVMe resources of some VFs, INDEX=vq:N,vi:N,...;
        /// only those VFs are paused, the VF count stays.
        #[arg(long, value_name = "VF=vq:N,vi:N,...", value_parser = parse_resources)]
        resources: Option<NvmeResources>,
        /// pause or detach.
        #[arg(long, value_enum, default_value = "pause")]
        mode: ModeArg,
        /// New VFs for VMs: VM=COUNT,... (the lowest free indices).
        #[arg(long, value_name = "VM=COUNT,...")]
        assign: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Finish an operation the journal shows as interrupted (the helper died).
    Recover {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Program the bitstream configured for a PF (through the daemon only).
    Program {
        /// The PF, e.g. 0000:81:00.0.
        #[arg(long, value_name = "BDF")]
        pf: PciAddress,
    },
    /// Measure reconfiguration times: the paper's Table I and II beside the kernel floor.
    ///
    /// Each run is one reconf of the assigned VFs (N -> 0 -> N+1 or back);
    /// modes pause, detach (through the orchestration, in this process) and
    /// floor (no VMM). Without --config it starts one svff-vmm test guest per
    /// VF itself. Prints Table I, Table II and the guests' view; the format of
    /// --json is in the svff-pf-helper crate docs (`format_version` 1). Needs root.
    Bench(BenchArgs),
    /// Run the privileged helper daemon (as root, normally from systemd).
    ///
    /// Listens on the config's socket (or the one passed by systemd socket
    /// activation), checks each peer's uid/gid with SO_PEERCRED, and serves the
    /// JSON-line protocol described in the svff-pf-helper crate docs.
    Helper,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Pause,
    Detach,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Assigned VF counts to measure, e.g. 1,4,10.
    #[arg(long, value_name = "N,...", default_value = "1,4,10")]
    vfs: String,
    /// Counted runs per mode and VF count (one more warm-up run is not counted).
    #[arg(long, value_name = "N", default_value_t = 100)]
    runs: usize,
    /// Modes: pause, detach, floor, pool.
    #[arg(long, value_name = "MODE,...", default_value = "floor,pause,detach")]
    mode: String,
    /// VMMs: svff-vmm, qemu (patched), qemu-stock (Debian's): without --config,
    /// svff bench starts the guests of each kind itself, one kind after another;
    /// libvirt: the running domains of --config (required).
    #[arg(long, value_name = "VMM,...", default_value = "svff-vmm")]
    vmm: String,
    /// The PF (default: the --config's only PF).
    #[arg(long, value_name = "BDF")]
    pf: Option<PciAddress>,
    /// Write the results (raw runs and summary) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw total time against VF count (SVG) to this file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// PF profile of the self-managed set-up: pci-pf-stub or nvme.
    #[arg(long, value_enum, default_value = "pci-pf-stub")]
    profile: BenchProfile,
    /// Test guests' RAM and each floor container's DMA mapping, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(2..=4096))]
    guest_memory: u64,
    /// Test guest rounds between two counter lines (the guest view's resolution).
    #[arg(long, value_name = "ROUNDS", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    report_every: u32,
    /// The test guests' load: idle (they spin under SCHED_IDLE), busy (spin at
    /// normal priority) or stopped (QMP `stop`: no guest load, no guest view).
    #[arg(long, value_enum, default_value = "idle")]
    guests: GuestsArg,
    /// The svff-vmm binary (default: $SVFF_VMM, else beside this executable).
    #[arg(long, value_name = "PATH")]
    svff_vmm: Option<PathBuf>,
    /// svff's patched QEMU for --vmm qemu (default: $SVFF_QEMU, else
    /// target/svff-qemu/qemu-system-x86_64 beside this build, where `make qemu` puts it).
    #[arg(long, value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// Debian's QEMU for --vmm qemu-stock.
    #[arg(long, value_name = "PATH")]
    qemu_stock: Option<PathBuf>,
    /// The QEMU guests' Linux kernel (default: `/boot/vmlinuz-<running release>`).
    #[arg(long, value_name = "PATH")]
    l2_kernel: Option<PathBuf>,
    /// Deadline for a QEMU guest to boot, seconds.
    #[arg(long, value_name = "S", default_value_t = 300)]
    l2_boot_deadline: u64,
    /// QMP connections of svff bench's own set-up: kept (open across the runs)
    /// or per-operation (connect in every reconf, as `svff reconf` does).
    #[arg(long, value_enum, default_value = "kept")]
    qmp: QmpArg,
    /// Measure nothing: print the tables of this --json document again (and --plot it).
    #[arg(long, value_name = "FILE.json", conflicts_with_all = ["json", "pf"])]
    report: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum QmpArg {
    Kept,
    PerOperation,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum GuestsArg {
    Idle,
    Busy,
    Stopped,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BenchProfile {
    PciPfStub,
    Nvme,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Print JSON (format documented in the svff-pf-helper crate docs; `format_version` 1).
    #[arg(long)]
    json: bool,
    /// Only this PF (repeatable).
    #[arg(long, value_name = "BDF")]
    pf: Vec<PciAddress>,
}

#[derive(Debug, Subcommand)]
enum VfsCommand {
    /// Set a PF's VF count (through 0 when VFs exist; a no-op when equal).
    Set {
        /// The PF, e.g. 0000:01:00.0.
        #[arg(long, value_name = "BDF")]
        pf: PciAddress,
        /// The number of VFs (0 removes them all).
        count: u16,
        /// Bind every VF to this driver afterwards, e.g. vfio-pci.
        #[arg(long, value_name = "DRIVER")]
        bind: Option<DriverName>,
        /// With --direct: first bind the PF to this driver (e.g. igb, pci-pf-stub,
        /// qdma-pf). The daemon takes it from its config instead.
        #[arg(long, value_name = "DRIVER")]
        pf_driver: Option<DriverName>,
        /// Print the report (steps with timings, resulting PF status) as JSON.
        #[arg(long)]
        json: bool,
        /// NVMe profile (PF on the nvme driver): per-VF resources, e.g.
        /// 0=vq:2,vi:1,1=vq:4,vi:2 (VF index = N of virtfnN). Each VF is set
        /// offline, given its VQ then VI resources and set online, before
        /// binding. vq:0,vi:0 leaves a VF offline.
        #[arg(long, value_name = "SPEC", value_parser = parse_resources)]
        resources: Option<NvmeResources>,
        /// NVMe profile: VQ resources of every VF not in --resources (with --vi).
        #[arg(long, value_name = "N", requires = "vi")]
        vq: Option<u16>,
        /// NVMe profile: VI resources of every VF not in --resources (with --vq).
        #[arg(long, value_name = "N", requires = "vq")]
        vi: Option<u16>,
    },
}

fn parse_resources(s: &str) -> Result<NvmeResources, String> {
    NvmeResources::parse_spec(s)
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SVFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn require_root() -> Result<(), Error> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::Usage(
            "--direct needs root (or use the helper daemon without --direct)".into(),
        ))
    }
}

/// One line about a function's svff register window.
fn fpga_line(indent: &str, fpga: &FpgaStatus) {
    match (&fpga.error, &fpga.id, &fpga.version, fpga.function) {
        (None, Some(id), Some(version), Some(function)) => {
            let kind = if fpga.is_pf == Some(true) { "PF" } else { "VF" };
            let v = u32::from_str_radix(version.trim_start_matches("0x"), 16).unwrap_or(0);
            println!(
                "{indent}fpga: svff ID {id} version {}.{} ({version}) function {function} ({kind}) via BAR{}",
                v >> 16,
                v & 0xffff,
                fpga.bar
            );
        }
        (Some(error), _, _, _) => println!("{indent}fpga: {error}"),
        _ => println!("{indent}fpga: BAR{}: incomplete answer", fpga.bar),
    }
}

fn print_status(status: &Status) {
    if status.pfs.is_empty() {
        println!("no SR-IOV PFs");
    }
    for pf in &status.pfs {
        println!(
            "PF {} [{}:{}] driver {} VFs {}/{} autoprobe {}",
            pf.bdf,
            pf.vendor,
            pf.device,
            pf.driver.as_deref().unwrap_or("-"),
            pf.numvfs,
            pf.totalvfs,
            if pf.drivers_autoprobe { "on" } else { "off" },
        );
        if let Some(fpga) = &pf.fpga {
            fpga_line("  ", fpga);
        }
        if let Some(n) = &pf.nvme {
            match (&n.error, &n.controller) {
                (Some(e), _) => println!("  nvme: {e}"),
                (None, c) => println!(
                    "  nvme: {} VQ {}/{} assigned (primary {}, max {} per VF) VI {}/{} assigned (primary {}, max {} per VF)",
                    c.as_deref().unwrap_or("-"),
                    n.vq_assigned.unwrap_or(0),
                    n.vq_total.unwrap_or(0),
                    n.vq_primary.unwrap_or(0),
                    n.vq_max_per_vf.unwrap_or(0),
                    n.vi_assigned.unwrap_or(0),
                    n.vi_total.unwrap_or(0),
                    n.vi_primary.unwrap_or(0),
                    n.vi_max_per_vf.unwrap_or(0),
                ),
            }
        }
        for vf in &pf.vfs {
            println!(
                "  VF {:<3} {} [{}:{}] driver {} group {} holder {} held by {}",
                vf.index,
                vf.bdf,
                vf.vendor,
                vf.device,
                vf.driver.as_deref().unwrap_or("-"),
                vf.iommu_group.map_or("-".to_owned(), |g| g.to_string()),
                vf.holder.as_deref().unwrap_or("-"),
                vf.held_by
                    .as_ref()
                    .map_or("-".to_owned(), |h| format!("{} (pid {})", h.comm, h.pid)),
            );
            if let Some(fpga) = &vf.fpga {
                fpga_line("    ", fpga);
            }
            if let Some(n) = &vf.nvme {
                println!(
                    "    nvme: secondary controller {} {} vq {} vi {}",
                    n.scid,
                    if n.online { "online" } else { "offline" },
                    n.vq,
                    n.vi
                );
            }
        }
    }
}

fn print_vms(status: &Status) {
    if status.vms.is_empty() {
        return;
    }
    println!("vms:");
    for v in &status.vms {
        let process = match (&v.process, v.pid) {
            (Some(p), Some(pid)) => format!("svff-vmm {p} (pid {pid})"),
            (Some(p), None) => format!("svff-vmm {p}"),
            _ => "qmp".to_string(),
        };
        println!("  {:<12} {:<32} qmp {}", v.name, process, v.qmp.display());
    }
}

fn print_assignments(status: &Status) {
    if status.assignments.is_empty() {
        return;
    }
    println!("assignments:");
    for a in &status.assignments {
        let e = &a.entry;
        println!(
            "  PF {} VF {:<3} {} -> VM {} as {} guest {} {:?}{}",
            e.pf,
            e.vf,
            e.host,
            e.vm,
            e.id,
            e.guest.as_deref().unwrap_or("-"),
            e.state,
            match (&a.vmm_state, &a.vmm_note) {
                (Some(s), _) => format!(" (VMM: {})", s.name()),
                (None, Some(n)) => format!(" (VMM: {n})"),
                _ => String::new(),
            }
        );
    }
}

fn print_op(r: &OpReport) {
    for c in &r.changes {
        println!("{c}");
    }
    for s in &r.steps {
        println!(
            "  {:<14} {:<10} {:>10.3} ms",
            s.name,
            s.vm.as_deref().unwrap_or("-"),
            s.ms
        );
    }
    for f in &r.failures {
        println!("FAILED: {f}");
    }
}

fn op_out(r: &OpReport, json: bool) -> Result<(), Error> {
    if json {
        json_out(r)?;
    } else {
        print_op(r);
    }
    if r.failures.is_empty() {
        Ok(())
    } else {
        Err(Error::Plan(format!(
            "{} device(s) could not be restored: {}",
            r.failures.len(),
            r.failures.join("; ")
        )))
    }
}

/// Runs `f` on an orchestrator in this process (--direct).
fn direct_orch(
    cli: &Cli,
    f: impl FnOnce(&Orchestrator<'_, RealSysfs>) -> Result<OpReport, Error>,
) -> Result<OpReport, Error> {
    require_root()?;
    let config = Config::load(&cli.config_path)?;
    let mgr = SriovManager::new(RealSysfs::new());
    let orch = Orchestrator::new(&config, &mgr, &QmpConnector)?;
    f(&orch)
}

fn print_report(r: &VfsSetReport) {
    if r.changed {
        println!("PF {}: VFs {} -> {}", r.pf, r.from, r.to);
    } else {
        println!("PF {}: already {} VFs", r.pf, r.to);
    }
    for s in &r.steps {
        println!("  {:<14} {:>10.3} ms", s.name, s.ms);
    }
}

fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, Error> {
    serde_json::from_value(v).map_err(|e| Error::Protocol(format!("unexpected result: {e}")))
}

fn json_out<T: serde::Serialize>(v: &T) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Protocol(e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Status(args) => {
            let status: Status = if cli.direct {
                let mgr = SriovManager::new(RealSysfs::new());
                let mut s = mgr.status((!args.pf.is_empty()).then_some(&args.pf[..]))?;
                // The table needs the config; without one the status is the kernel's alone.
                if let Ok(config) = Config::load(&cli.config_path) {
                    let orch = Orchestrator::new(&config, &mgr, &QmpConnector)?;
                    let pfs: Vec<PciAddress> = s.pfs.iter().map(|p| p.bdf).collect();
                    s.assignments = orch.status_assignments(&pfs)?;
                    s.vms = orch.vm_status();
                    svff_pf_helper::fill_holders(&mut s);
                }
                s
            } else if args.pf.len() == 1 {
                decode(request(
                    &cli.socket,
                    &Request::Status {
                        pf: Some(args.pf[0]),
                    },
                )?)?
            } else {
                let mut s: Status = decode(request(&cli.socket, &Request::Status { pf: None })?)?;
                if !args.pf.is_empty() {
                    s.pfs.retain(|p| args.pf.contains(&p.bdf));
                }
                s
            };
            if args.json {
                json_out(&status)
            } else {
                print_status(&status);
                print_assignments(&status);
                print_vms(&status);
                Ok(())
            }
        }
        Command::Vfs(VfsCommand::Set {
            pf,
            count,
            bind,
            pf_driver,
            json,
            resources,
            vq,
            vi,
        }) => {
            let resources = match (resources, vq.zip(vi)) {
                (None, None) => None,
                (r, uniform) => {
                    let mut r = r.unwrap_or_default();
                    if let Some((vq, vi)) = uniform {
                        r.default = Some(svff_pf_helper::VfResources { vq, vi });
                    }
                    Some(r)
                }
            };
            let report: VfsSetReport = if cli.direct {
                require_root()?;
                let mgr = SriovManager::new(RealSysfs::new());
                let opts = VfsSetOptions {
                    pf_driver,
                    bind,
                    qdma: None,
                };
                mgr.set_vf_count_with(pf, count, &opts, resources.as_ref())?
            } else {
                if pf_driver.is_some() {
                    return Err(Error::Usage(
                        "--pf-driver needs --direct; the daemon takes the PF driver from its config".into(),
                    ));
                }
                decode(request(
                    &cli.socket,
                    &Request::VfsSet {
                        pf,
                        count,
                        bind,
                        resources,
                    },
                )?)?
            };
            if json {
                json_out(&report)
            } else {
                print_report(&report);
                Ok(())
            }
        }
        Command::Init { json } => {
            let r = if cli.direct {
                direct_orch(&cli, |o| o.init())?
            } else {
                decode(request(&cli.socket, &Request::Init {})?)?
            };
            op_out(&r, json)
        }
        Command::Reconf {
            pf,
            vfs,
            ref resources,
            mode,
            ref assign,
            json,
        } => {
            let mode = match mode {
                ModeArg::Pause => Mode::Pause,
                ModeArg::Detach => Mode::Detach,
            };
            let assign = assign
                .as_deref()
                .map(AssignRequest::parse_list)
                .transpose()?
                .unwrap_or_default();
            let vfs = match (vfs, resources) {
                (Some(vfs), None) => vfs,
                (None, Some(resources)) => {
                    let resources = resources.clone();
                    let r = if cli.direct {
                        direct_orch(&cli, |o| o.reconf_pool(pf, &resources, &assign))?
                    } else {
                        decode(request(
                            &cli.socket,
                            &Request::PoolReconf {
                                pf,
                                resources,
                                assign,
                            },
                        )?)?
                    };
                    return op_out(&r, json);
                }
                _ => return Err(Error::Usage("give --vfs N or --resources SPEC".into())),
            };
            let r = if cli.direct {
                direct_orch(&cli, |o| o.reconf(pf, vfs, mode, &assign))?
            } else {
                decode(request(
                    &cli.socket,
                    &Request::Reconf {
                        pf,
                        vfs,
                        mode,
                        assign,
                    },
                )?)?
            };
            op_out(&r, json)
        }
        Command::Recover { json } => {
            let r = if cli.direct {
                direct_orch(&cli, |o| o.recover())?
            } else {
                decode(request(&cli.socket, &Request::Recover {})?)?
            };
            op_out(&r, json)
        }
        Command::Program { pf } => {
            if cli.direct {
                return Err(Error::Usage(
                    "program uses the daemon's per-PF bitstream config; run it without --direct"
                        .into(),
                ));
            }
            let v = request(&cli.socket, &Request::Program { pf })?;
            json_out(&v)
        }
        Command::Bench(ref args) => bench(&cli, args),
        Command::Helper => {
            let config = Config::load(&cli.config_path)?;
            // Tell a supervisor (or a test) that the socket is ready.
            let listener = match listener_from_systemd()? {
                Some(l) => {
                    println!("svff helper listening on the socket passed by systemd");
                    l
                }
                None => {
                    let l = bind_socket(&config.socket, config.socket_group.as_deref())?;
                    println!("svff helper listening on {}", config.socket.display());
                    l
                }
            };
            let daemon = Arc::new(Daemon::new(config, SriovManager::new(RealSysfs::new())));
            // An operation the previous helper left unfinished is finished first.
            match daemon.recover_at_start() {
                Ok(None) => {}
                Ok(Some(r)) => {
                    tracing::info!(changes = ?r.changes, failures = ?r.failures, "recovered at start-up")
                }
                Err(e) => {
                    tracing::error!(error = %e.chain(), "recovery at start-up failed; `svff recover` retries")
                }
            }
            daemon.serve(listener)
        }
    }
}

fn bench(cli: &Cli, args: &BenchArgs) -> Result<(), Error> {
    use svff_pf_helper::BenchReport;
    if let Some(path) = &args.report {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Bench {
            what: format!("reading {}", path.display()),
            source: Some(Box::new(e)),
        })?;
        let mut report: BenchReport = serde_json::from_str(&text).map_err(|e| Error::Bench {
            what: format!("{}: not an svff bench document", path.display()),
            source: Some(Box::new(e)),
        })?;
        if report.format_version != svff_pf_helper::BENCH_FORMAT_VERSION {
            return Err(Error::Usage(format!(
                "{}: format_version {} (this svff reads {})",
                path.display(),
                report.format_version,
                svff_pf_helper::BENCH_FORMAT_VERSION
            )));
        }
        svff_pf_helper::bench_finish(&mut report);
        print!("{}", svff_pf_helper::render_all(&report));
        if let Some(plot) = &args.plot {
            svff_pf_helper::draw_plot(&report, plot)?;
        }
        return Ok(());
    }
    let opts = svff_pf_helper::BenchOptions {
        vfs: svff_pf_helper::parse_vf_counts(&args.vfs)?,
        runs: args.runs,
        warmup: 1,
        modes: svff_pf_helper::parse_modes(&args.mode)?,
        vmms: svff_pf_helper::parse_vmms(&args.vmm)?,
        pf: args.pf,
        json: args.json.clone(),
        plot: args.plot.clone(),
        // --config is global with a default path: it names the VMs only when given.
        config: std::env::args_os()
            .any(|a| a == "--config" || a.to_string_lossy().starts_with("--config="))
            .then(|| cli.config_path.clone()),
        profile: match args.profile {
            BenchProfile::PciPfStub => svff_pf_helper::PfProfile::PciPfStub,
            BenchProfile::Nvme => svff_pf_helper::PfProfile::Nvme,
        },
        guest_memory_mib: args.guest_memory,
        report_every: args.report_every,
        guests: match args.guests {
            GuestsArg::Idle => svff_pf_helper::GuestLoad::Idle,
            GuestsArg::Busy => svff_pf_helper::GuestLoad::Busy,
            GuestsArg::Stopped => svff_pf_helper::GuestLoad::Stopped,
        },
        svff_vmm: args.svff_vmm.clone(),
        qemu: args.qemu.clone(),
        qemu_stock: args.qemu_stock.clone(),
        l2_kernel: args.l2_kernel.clone(),
        l2_boot_deadline_s: args.l2_boot_deadline,
        keep_qmp: matches!(args.qmp, QmpArg::Kept),
    };
    let report = svff_pf_helper::bench_run(&opts)?;
    print!("{}", svff_pf_helper::render_all(&report));
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(if matches!(cli.command, Command::Helper) {
        "info"
    } else {
        "warn"
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svff: error: {}", e.chain());
            ExitCode::FAILURE
        }
    }
}
