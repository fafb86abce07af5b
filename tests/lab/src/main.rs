//! `svff-lab`: boot the emulated SR-IOV lab and run things in it.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use svff_lab::proto::Stream;
use svff_lab::{Lab, LabConfig, LabError};

/// The svff lab: an emulated SR-IOV host (L1) under QEMU TCG with an igb PF (0000:01:00.0) and an
/// nvme PF with 64 VFs (0000:02:00.0), a vIOMMU and nested KVM, running on the real Linux kernel.
/// L1's root is this machine's root, read-only, so freshly built binaries run there as they are.
#[derive(Debug, Parser)]
#[command(name = "svff-lab", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot L1, run CMD there as root (this directory as cwd, the workspace's binaries on PATH),
    /// print its output and exit with its status.
    Run {
        /// Kill L1 and fail if CMD runs longer than this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Boot L1 with a root shell on this terminal (exit the shell, or Ctrl-A X, to stop).
    Shell,
    /// Build the workspace's lab tests (test targets named `lab_*`), boot one L1 and run them
    /// all in it, one binary after another, with `--include-ignored --test-threads=1`.
    Test {
        /// Run only test binaries whose name contains this (repeatable).
        #[arg(long)]
        filter: Vec<String>,
        /// Kill L1 and fail if one test binary runs longer than this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        /// Extra arguments for every test binary (e.g. a test-name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the L1 initramfs (if not cached) and print its path.
    Initramfs,
    /// Internal: the agent that runs inside L1.
    #[command(hide = true)]
    Agent,
}

/// How often `svff-lab test` runs a binary whose L1 stalled (each time on a fresh boot).
const STALL_ATTEMPTS: u32 = 3;

fn boot(cfg: &LabConfig) -> Result<Lab, LabError> {
    eprintln!(
        "svff-lab: booting L1 ({}, kernel {}, {} vCPU, tcg thread={}) ...",
        cfg.qemu.display(),
        cfg.kernel_version,
        cfg.cpus,
        cfg.tcg_thread.as_str()
    );
    let lab = match Lab::boot(cfg) {
        // A boot that never reached the agent is retried once (a rare TCG stall); anything
        // missing on the host fails at once.
        Err(e @ (LabError::Timeout { .. } | LabError::Vm(_))) => {
            eprintln!("svff-lab: {e}\nsvff-lab: booting L1 again");
            Lab::boot(cfg)?
        }
        other => other?,
    };
    eprintln!("svff-lab: L1 up in {:.1} s", lab.boot_time.as_secs_f64());
    Ok(lab)
}

fn print_chunk(stream: Stream, data: &str) {
    // Output is best effort: a closed pipe on our side must not abort the run in L1.
    let _ = match stream {
        Stream::Stdout => std::io::stdout()
            .write_all(data.as_bytes())
            .and_then(|()| std::io::stdout().flush()),
        Stream::Stderr => std::io::stderr().write_all(data.as_bytes()),
    };
}

fn exit_status(code: Option<i32>, signal: Option<i32>) -> u8 {
    match (code, signal) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(255),
        _ => 255,
    }
}

fn cmd_run(timeout: u64, cmd: &[String]) -> Result<u8, LabError> {
    let cfg = LabConfig::detect()?;
    let mut lab = boot(&cfg)?;
    let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let (code, signal) =
        lab.run_streaming(&argv, &[], Duration::from_secs(timeout), print_chunk)?;
    Ok(exit_status(code, signal))
}

/// Builds the workspace's test targets and returns `(name, executable)` of every `lab_*` one.
fn lab_test_binaries() -> Result<Vec<(String, PathBuf)>, LabError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("svff-lab: building the workspace's test targets ...");
    // Optional cargo features for the build (`make test` sets
    // `svff-pf-helper/libvirt`, which brings in the lab_libvirt binary).
    let features: Vec<String> = std::env::var("SVFF_LAB_FEATURES")
        .ok()
        .filter(|f| !f.trim().is_empty())
        .map(|f| vec!["--features".to_owned(), f])
        .unwrap_or_default();
    let out = Command::new(&cargo)
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .args(&features)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| LabError::Missing {
            what: format!("cargo ({cargo})"),
            detail: e.to_string(),
            install: "https://rustup.rs".into(),
        })?;
    if !out.status.success() {
        return Err(LabError::Invalid(
            "building the test targets failed (see cargo's messages above)".into(),
        ));
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let name = v["target"]["name"].as_str().unwrap_or_default();
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|x| x == "test"));
        if let (true, true, Some(exe)) =
            (is_test, name.starts_with("lab_"), v["executable"].as_str())
        {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    found.sort();
    Ok(found)
}

fn cmd_test(filters: &[String], timeout: u64, args: &[String]) -> Result<u8, LabError> {
    let cfg = LabConfig::detect()?;
    let mut bins = lab_test_binaries()?;
    bins.retain(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())));
    if bins.is_empty() {
        return Err(LabError::Invalid(format!(
            "no lab test binaries (test targets named lab_*) match {filters:?}"
        )));
    }
    eprintln!(
        "svff-lab: {} lab test binaries: {}",
        bins.len(),
        bins.iter()
            .map(|b| b.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut lab = boot(&cfg)?;
    let mut failed = Vec::new();
    let mut passed = 0;
    let mut stalls = 0;
    'bins: for (name, exe) in &bins {
        let exe = exe.display().to_string();
        let mut argv = vec![exe.as_str(), "--include-ignored", "--test-threads=1"];
        argv.extend(args.iter().map(String::as_str));
        // A stalled L1 (TCG, rarely: its timers stop) is not the test's failure: reboot and run
        // the binary again, saying so, up to STALL_ATTEMPTS times in all.
        for attempt in 1..=STALL_ATTEMPTS {
            let again = if attempt > 1 {
                format!(", attempt {attempt} after a stall")
            } else {
                String::new()
            };
            eprintln!("\nsvff-lab: ==> {name} (in L1{again})");
            let t = Instant::now();
            let result = lab.run_streaming(
                &argv,
                &[("RUST_BACKTRACE", "1")],
                Duration::from_secs(timeout),
                print_chunk,
            );
            eprintln!(
                "svff-lab: <== {name} took {:.1} s",
                t.elapsed().as_secs_f64()
            );
            match result {
                Ok((Some(0), _)) => passed += 1,
                Ok((code, signal)) => {
                    failed.push(format!("{name} (exit {code:?}, signal {signal:?})"))
                }
                Err(e @ LabError::Stalled { .. }) if attempt < STALL_ATTEMPTS => {
                    stalls += 1;
                    eprintln!("svff-lab: {e}\nsvff-lab: rebooting L1 to run {name} again");
                    lab = boot(&cfg)?;
                    continue;
                }
                Err(e) => {
                    let fatal = matches!(
                        e,
                        LabError::Timeout { .. } | LabError::Vm(_) | LabError::Stalled { .. }
                    );
                    failed.push(format!("{name}: {e}"));
                    if fatal {
                        eprintln!("svff-lab: L1 is gone ({e}); the remaining binaries cannot run");
                        break 'bins;
                    }
                }
            }
            break;
        }
    }
    if stalls > 0 {
        eprintln!(
            "svff-lab: L1 stalled {stalls} time(s) during this run and was rebooted (see above)"
        );
    }
    let not_run = bins.len() - passed - failed.len();
    eprintln!(
        "\nsvff-lab: {passed} lab test binaries ok, {} failed, {not_run} not run",
        failed.len()
    );
    for f in &failed {
        eprintln!("svff-lab: FAILED {f}");
    }
    Ok(if failed.is_empty() && not_run == 0 {
        0
    } else {
        1
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A signal must not leave the session directory or QEMU behind (see svff_lab's signals).
    if matches!(cli.cmd, Cmd::Run { .. } | Cmd::Test { .. }) {
        if let Err(e) = svff_lab::exit_cleanly_on_signals() {
            eprintln!("svff-lab: error: cannot install the signal cleanup: {e}");
            return ExitCode::from(2);
        }
    }
    let result = match cli.cmd {
        Cmd::Run { timeout, cmd } => cmd_run(timeout, &cmd),
        Cmd::Shell => LabConfig::detect()
            .and_then(|cfg| svff_lab::shell(&cfg))
            .map(|s| u8::from(!s.success())),
        Cmd::Test {
            filter,
            timeout,
            args,
        } => cmd_test(&filter, timeout, &args),
        Cmd::Initramfs => LabConfig::detect()
            .and_then(|cfg| svff_lab::ensure_initramfs(&cfg.kernel_version, &cfg.cache_dir))
            .map(|p| {
                println!("{}", p.display());
                0
            }),
        Cmd::Agent => svff_lab::serve_agent().map(|()| 0),
    };
    svff_lab::await_signal_cleanup();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("svff-lab: error: {e}");
            ExitCode::from(2)
        }
    }
}
