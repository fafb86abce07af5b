//! Cost of pause/unpause bookkeeping with the fake backend (no FLR, no sysfs):
//! prints numbers, asserts nothing about time.
//!
//! `cargo bench -p vfio-pause --bench bookkeeping` (or `cargo run --release`-like
//! via `cargo bench`); `VFIO_PAUSE_BENCH_ITERS` sets the iteration count.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_pause::{
    irq, Container, DeviceOptions, FakeBackend, FakeVf, PausableDevice, PciAddress, Phase, Timings,
    TrapAllBars, VfSource,
};
use vmm_sys_util::eventfd::EventFd;

fn stats(name: &str, v: &mut [Duration]) {
    v.sort();
    let n = v.len();
    let sum: Duration = v.iter().sum();
    println!(
        "{name:<28} n={n:<6} avg {:>9.3} us  p50 {:>9.3} us  p99 {:>9.3} us  max {:>9.3} us",
        sum.as_secs_f64() * 1e6 / n as f64,
        v[n / 2].as_secs_f64() * 1e6,
        v[(n * 99) / 100].as_secs_f64() * 1e6,
        v[n - 1].as_secs_f64() * 1e6,
    );
}

fn phase_avgs(name: &str, runs: &[Timings]) {
    let mut line = format!("  {name} phases (avg us):");
    for p in Phase::ALL {
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|t| t.get(p))
            .map(|d| d.as_secs_f64() * 1e6)
            .collect();
        if !v.is_empty() {
            line += &format!(
                " {} {:.3}",
                p.name(),
                v.iter().sum::<f64>() / v.len() as f64
            );
        }
    }
    println!("{line}");
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // special, so keep the default small enough for a test run.
    let iters: usize = std::env::var("VFIO_PAUSE_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::args().any(|a| a == "--bench") {
            10_000
        } else {
            100
        });
    let addr: PciAddress = "0000:02:00.1".parse().unwrap();
    let fake = FakeBackend::new();
    fake.add_vf(&addr, FakeVf::nvme());
    let container = Container::new(Box::new(fake.clone()));
    let mut ram = vec![0u8; 1 << 20];
    // SAFETY: the fake backend never touches the memory; `ram` outlives the container.
    unsafe { container.register_dma(0, ram.len() as u64, ram.as_mut_ptr()) }.unwrap();
    let dev = PausableDevice::open(
        "bench0",
        container.clone(),
        VfSource::Sysfs(addr),
        DeviceOptions {
            mmap_bars: true,
            ..DeviceOptions::default()
        },
        Arc::new(TrapAllBars),
    )
    .unwrap();
    let fds: Vec<EventFd> = (0..8).map(|_| EventFd::new(0).unwrap()).collect();
    dev.set_irqs(irq::MSIX, fds).unwrap();
    dev.set_request_irq(Some(EventFd::new(0).unwrap())).unwrap();

    let (mut p, mut u, mut pt, mut ut) = (vec![], vec![], vec![], vec![]);
    for _ in 0..iters {
        fake.clear_calls();
        let t = Instant::now();
        pt.push(black_box(dev.pause().unwrap()));
        p.push(t.elapsed());
        let t = Instant::now();
        ut.push(black_box(dev.unpause(VfSource::Sysfs(addr)).unwrap()));
        u.push(t.elapsed());
    }
    let mut noop = vec![];
    for _ in 0..iters {
        let t = Instant::now();
        black_box(dev.unpause(VfSource::Sysfs(addr)).unwrap());
        noop.push(t.elapsed());
    }
    dev.pause().unwrap();
    let mut shadow = vec![];
    let mut b = [0u8; 4];
    for _ in 0..iters {
        let t = Instant::now();
        dev.config_read(0x10, &mut b).unwrap();
        shadow.push(t.elapsed());
    }
    println!("vfio-pause bookkeeping with the fake backend (MSI-X 8 vectors, request IRQ, BAR mmap, 1 DMA region):");
    stats("pause", &mut p);
    phase_avgs("pause", &pt);
    stats("unpause (with dma remap)", &mut u);
    phase_avgs("unpause", &ut);
    stats("unpause no-op", &mut noop);
    stats("paused config read", &mut shadow);
    drop(dev);
    drop(ram);
}
