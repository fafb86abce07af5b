//! Prints the round-trip latency of QMP commands through qmp-ext's client
//! and server (no device work behind them): the protocol's share of an svff
//! pause/unpause. Run: `cargo run --release -p qmp-ext --example qmp_latency [N]`.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use qmp_ext::svff::{
    self, PausableDevices, QuerySvffVfio, SvffVfioInfo, SvffVfioPause, SvffVfioTimings,
    SvffVfioUnpause,
};
use qmp_ext::{Client, Handler, QmpError, Server, ServerConfig, Session};
use serde_json::{Map, Value};

struct NoDevices;

impl PausableDevices for NoDevices {
    fn pause(&self, _: SvffVfioPause) -> Result<SvffVfioTimings, QmpError> {
        Ok(SvffVfioTimings::default())
    }
    fn unpause(&self, _: SvffVfioUnpause, _: Option<OwnedFd>) -> Result<SvffVfioTimings, QmpError> {
        Ok(SvffVfioTimings::default())
    }
    fn query(&self) -> Result<Vec<SvffVfioInfo>, QmpError> {
        Ok(Vec::new())
    }
}

struct Vmm;

impl Handler for Vmm {
    fn execute(
        &self,
        s: &mut Session,
        cmd: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        svff::dispatch(&NoDevices, s, cmd, args)
            .unwrap_or_else(|| Err(QmpError::command_not_found(cmd)))
    }
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let n = samples.len();
    let total: Duration = samples.iter().sum();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{what:<28} n={n:<6} avg={:>7.1} us  p50={:>7.1} us  p99={:>7.1} us  max={:>8.1} us",
        us(total / n as u32),
        us(samples[n / 2]),
        us(samples[n * 99 / 100]),
        us(samples[n - 1])
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5000);
    let dir = std::env::temp_dir().join(format!("qmp-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("qmp.sock");
    let server = Server::bind(&path, ServerConfig::default(), Vmm)?;

    let t = Instant::now();
    let mut client = Client::connect(&path, Duration::from_secs(5))?;
    println!(
        "connect + greeting + qmp_capabilities: {:.1} us",
        t.elapsed().as_secs_f64() * 1e6
    );

    let mut run = |what: &str, f: &mut dyn FnMut(&mut Client) -> Result<(), qmp_ext::Error>| {
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            f(&mut client)?;
            samples.push(t.elapsed());
        }
        report(what, samples);
        Ok::<(), qmp_ext::Error>(())
    };
    run("query-version (untyped)", &mut |c| {
        c.execute("query-version", None).map(drop)
    })?;
    run("svff-vfio-pause (typed)", &mut |c| {
        c.call(&SvffVfioPause {
            id: "vf0".into(),
            policy: None,
            stall_ms: None,
        })
        .map(drop)
    })?;
    run("svff-vfio-unpause (typed)", &mut |c| {
        c.call(&SvffVfioUnpause {
            id: "vf0".into(),
            host: None,
            fdname: None,
        })
        .map(drop)
    })?;
    run("query-svff-vfio (typed)", &mut |c| {
        c.call(&QuerySvffVfio {}).map(drop)
    })?;
    drop(server);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
