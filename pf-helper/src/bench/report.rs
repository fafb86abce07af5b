//! The benchmark's results: raw runs, their summary (Table I, Table II, the
//! guest view), the JSON document and the aligned text tables. Pure logic,
//! unit-tested on the host.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::guest::{GuestRunView, L2RunView};

/// Version of the `svff bench --json` document.
pub const BENCH_FORMAT_VERSION: u32 = 1;

/// The paper's Table I (CITS 2023), total ms per reconfiguration: `(mode, VFs, ms)`.
pub const PAPER_TABLE_I: [(&str, u16, f64); 4] = [
    ("detach", 1, 4151.0),
    ("detach", 10, 31129.0),
    ("pause", 1, 4068.0),
    ("pause", 10, 30285.0),
];

/// One measured run: one reconfiguration of `vfs` assigned VFs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// VF count before (`vfs` or `vfs + 1`; pool mode: the pool's size, as `to`).
    pub from: u16,
    /// VF count after.
    pub to: u16,
    /// Wall time of the whole reconfiguration, ms.
    pub total_ms: f64,
    /// Per-step wall time, ms (per-VM steps: the longest VM, as they run in parallel).
    pub steps: BTreeMap<String, f64>,
    /// What each test guest saw during the run (empty without svff-vmm test guests).
    pub guest: Vec<GuestRunView>,
    /// What the QEMU L2 Linux guest saw (its VFs, the driver's hold on
    /// them, its recoveries); None without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2: Option<L2RunView>,
}

/// All runs of one mode and VMM at one VF count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// `pause`, `detach`, `pool` or `floor`.
    pub mode: String,
    /// `svff-vmm`, `qemu`, `qemu-stock`, or `none` (floor).
    pub vmm: String,
    /// Assigned VFs.
    pub vfs: u16,
    /// The counted runs (the warm-up run is not among them).
    pub runs: Vec<Run>,
    /// Their summary.
    pub summary: Summary,
}

/// Summary of one series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Mean total, ms.
    pub avg_ms: f64,
    /// Sample standard deviation of the total, ms (0 for one run).
    pub sigma_ms: f64,
    /// Fastest run, ms.
    pub min_ms: f64,
    /// Slowest run, ms.
    pub max_ms: f64,
    /// Mean of each step, ms.
    pub steps: BTreeMap<String, f64>,
    /// Mean guest-observed pause window per VF, ms (None: no guest view).
    pub guest_window_avg_ms: Option<f64>,
    /// Longest guest-observed window, ms.
    pub guest_window_max_ms: Option<f64>,
    /// Surviving devices that disappeared from their guest (runs x VFs).
    pub guest_disappeared: Option<u64>,
    /// Mean of the guests' own TSC-timed windows (`tsc_window_ms`) over the
    /// VF runs that raised their guest's running maximum, ms.
    #[serde(default)]
    pub guest_tsc_window_avg_ms: Option<f64>,
    /// Longest of those, ms.
    #[serde(default)]
    pub guest_tsc_window_max_ms: Option<f64>,
    /// How many VF runs carry a TSC-timed window (the others' windows were no
    /// longer than an earlier one of the same guest).
    #[serde(default)]
    pub guest_tsc_windows: Option<u64>,
    /// The QEMU L2 guest's driver for the VFs (`nvme`, `none`; None: no L2 guest).
    #[serde(default)]
    pub l2_driver: Option<String>,
    /// Runs in which a VF vanished from the L2 guest.
    #[serde(default)]
    pub l2_vanished: Option<u64>,
    /// Runs in which the driver let go of a VF (`bound` below the VF count) or a
    /// controller left `live`.
    #[serde(default)]
    pub l2_driver_disturbed: Option<u64>,
    /// Mean time from a run's end until the L2 guest had every VF back
    /// (bound and live with a driver), over the runs in which it did, ms.
    #[serde(default)]
    pub l2_back_avg_ms: Option<f64>,
    /// Longest of those, ms.
    #[serde(default)]
    pub l2_back_max_ms: Option<f64>,
    /// Runs after which the L2 guest did not have every VF back within the deadline.
    #[serde(default)]
    pub l2_not_back: Option<u64>,
    /// AER recoveries the L2 guest logged, summed over the runs.
    #[serde(default)]
    pub l2_aer_recoveries: Option<u64>,
}

/// One row of Table I.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableIRow {
    /// Mode.
    pub mode: String,
    /// VMM.
    pub vmm: String,
    /// Assigned VFs.
    pub vfs: u16,
    /// Mean, ms.
    pub avg_ms: f64,
    /// Standard deviation, ms.
    pub sigma_ms: f64,
    /// `(avg - detach) / detach * 100` against the reference detach series (None: no detach).
    pub overhead_pct: Option<f64>,
    /// `(avg - detach) / vfs`, ms per VF.
    pub overhead_ms_per_vf: Option<f64>,
    /// `avg / floor` (None: no floor series).
    pub floor_ratio: Option<f64>,
}

/// The whole `svff bench --json` document (format [`BENCH_FORMAT_VERSION`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// [`BENCH_FORMAT_VERSION`].
    pub format_version: u32,
    /// Start, seconds since the epoch.
    pub started_unix_s: u64,
    /// `uname -r` of the machine measured.
    pub kernel: String,
    /// The PF.
    pub pf: String,
    /// Its PF profile (`pci-pf-stub`, `nvme`, ...).
    pub profile: String,
    /// VF counts measured.
    pub vf_counts: Vec<u16>,
    /// Counted runs per series.
    pub runs: usize,
    /// Uncounted warm-up runs per series.
    pub warmup: usize,
    /// Guest RAM of each test guest and of each floor container's DMA mapping, MiB.
    pub guest_memory_mib: u64,
    /// Which VMs: `svff-vmm test guests (one per VF, started by svff bench)` or the config's.
    pub vms: String,
    /// The detach series Table I's overhead is computed against (`detach/<vmm>`).
    pub reference: Option<String>,
    /// Every series.
    pub series: Vec<Series>,
    /// Table I, row per series.
    pub table_i: Vec<TableIRow>,
    /// The paper's Table I, for reference.
    pub paper_table_i: Vec<PaperPoint>,
}

/// One number of the paper's Table I.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaperPoint {
    /// `pause` or `detach`.
    pub mode: String,
    /// VFs.
    pub vfs: u16,
    /// Total, ms.
    pub ms: f64,
}

/// The paper's Table I as [`PaperPoint`]s.
pub fn paper_points() -> Vec<PaperPoint> {
    PAPER_TABLE_I
        .iter()
        .map(|&(mode, vfs, ms)| PaperPoint {
            mode: mode.into(),
            vfs,
            ms,
        })
        .collect()
}

/// Mean and sample standard deviation (n - 1; 0 for fewer than two values).
pub fn mean_sigma(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Summarises `runs`.
pub fn summarize(runs: &[Run]) -> Summary {
    let totals: Vec<f64> = runs.iter().map(|r| r.total_ms).collect();
    let (avg_ms, sigma_ms) = mean_sigma(&totals);
    let mut names: Vec<&String> = runs.iter().flat_map(|r| r.steps.keys()).collect();
    names.sort();
    names.dedup();
    let steps = names
        .into_iter()
        .map(|name| {
            // A step missing from a run took no time in it.
            let xs: Vec<f64> = runs
                .iter()
                .map(|r| r.steps.get(name).copied().unwrap_or(0.0))
                .collect();
            (name.clone(), mean_sigma(&xs).0)
        })
        .collect();
    let windows: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.guest.iter().filter_map(|g| g.window_ms))
        .collect();
    let has_guest = runs.iter().any(|r| !r.guest.is_empty());
    let tsc: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.guest.iter().filter_map(|g| g.tsc_window_ms))
        .collect();
    Summary {
        avg_ms,
        sigma_ms,
        min_ms: totals
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .min(avg_ms),
        max_ms: totals.iter().copied().fold(0.0, f64::max),
        steps,
        guest_window_avg_ms: (!windows.is_empty()).then(|| mean_sigma(&windows).0),
        guest_window_max_ms: windows.iter().copied().reduce(f64::max),
        guest_disappeared: has_guest.then(|| {
            runs.iter()
                .flat_map(|r| &r.guest)
                .filter(|g| g.disappeared)
                .count() as u64
        }),
        guest_tsc_window_avg_ms: (!tsc.is_empty()).then(|| mean_sigma(&tsc).0),
        guest_tsc_window_max_ms: tsc.iter().copied().reduce(f64::max),
        guest_tsc_windows: has_guest.then_some(tsc.len() as u64),
        ..l2_summary(runs)
    }
}

/// The L2 parts of a summary (the others left empty).
fn l2_summary(runs: &[Run]) -> Summary {
    let views: Vec<&L2RunView> = runs.iter().filter_map(|r| r.l2.as_ref()).collect();
    let any = !views.is_empty();
    let back: Vec<f64> = views.iter().filter_map(|v| v.back_ms).collect();
    let count =
        |f: &dyn Fn(&L2RunView) -> bool| any.then(|| views.iter().filter(|v| f(v)).count() as u64);
    Summary {
        avg_ms: 0.0,
        sigma_ms: 0.0,
        min_ms: 0.0,
        max_ms: 0.0,
        steps: BTreeMap::new(),
        guest_window_avg_ms: None,
        guest_window_max_ms: None,
        guest_disappeared: None,
        guest_tsc_window_avg_ms: None,
        guest_tsc_window_max_ms: None,
        guest_tsc_windows: None,
        l2_driver: views
            .first()
            .map(|v| v.driver.clone().unwrap_or_else(|| "none".into())),
        l2_vanished: count(&|v| v.vanished),
        l2_driver_disturbed: count(&|v| {
            v.bound_min.is_some_and(|b| b < v.vfs) || v.live_min.is_some_and(|l| l < v.vfs)
        }),
        l2_back_avg_ms: (!back.is_empty()).then(|| mean_sigma(&back).0),
        l2_back_max_ms: back.iter().copied().reduce(f64::max),
        l2_not_back: count(&|v| v.back_ms.is_none()),
        l2_aer_recoveries: any.then(|| {
            views
                .iter()
                .filter_map(|v| v.aer_recoveries)
                .map(u64::from)
                .sum()
        }),
    }
}

/// The detach series overhead is measured against: stock QEMU's if measured
/// (the peer a user would pick), else the first detach VMM.
pub fn reference_vmm(series: &[Series]) -> Option<String> {
    let detach: Vec<&Series> = series.iter().filter(|s| s.mode == "detach").collect();
    detach
        .iter()
        .find(|s| s.vmm == "qemu-stock")
        .or(detach.first())
        .map(|s| s.vmm.clone())
}

/// Table I from the series.
pub fn table_i(series: &[Series]) -> Vec<TableIRow> {
    let reference = reference_vmm(series);
    let find = |mode: &str, vmm: Option<&str>, vfs: u16| {
        series
            .iter()
            .find(|s| s.mode == mode && s.vfs == vfs && vmm.is_none_or(|v| s.vmm == v))
            .map(|s| s.summary.avg_ms)
    };
    series
        .iter()
        .map(|s| {
            let detach = find("detach", reference.as_deref(), s.vfs);
            let floor = find("floor", None, s.vfs);
            let avg = s.summary.avg_ms;
            TableIRow {
                mode: s.mode.clone(),
                vmm: s.vmm.clone(),
                vfs: s.vfs,
                avg_ms: avg,
                sigma_ms: s.summary.sigma_ms,
                overhead_pct: detach.filter(|d| *d > 0.0).map(|d| (avg - d) / d * 100.0),
                overhead_ms_per_vf: detach.map(|d| (avg - d) / f64::from(s.vfs.max(1))),
                floor_ratio: floor.filter(|f| *f > 0.0).map(|f| avg / f),
            }
        })
        .collect()
}

/// Growth per extra VF of each mode: the slope between the smallest and
/// largest VF count, `(mode/vmm, ms per VF)`.
pub fn per_extra_vf(series: &[Series]) -> Vec<(String, f64)> {
    let mut keys: Vec<(String, String)> = series
        .iter()
        .map(|s| (s.mode.clone(), s.vmm.clone()))
        .collect();
    // Unique, in order of first appearance (series come per VF count, modes interleaved).
    let mut seen = Vec::new();
    keys.retain(|k| {
        let new = !seen.contains(k);
        if new {
            seen.push(k.clone());
        }
        new
    });
    let mut out = Vec::new();
    for (mode, vmm) in keys {
        let mut pts: Vec<(u16, f64)> = series
            .iter()
            .filter(|s| s.mode == mode && s.vmm == vmm)
            .map(|s| (s.vfs, s.summary.avg_ms))
            .collect();
        pts.sort_by_key(|p| p.0);
        if let (Some(a), Some(b)) = (pts.first(), pts.last()) {
            if b.0 > a.0 {
                out.push((label(&mode, &vmm), (b.1 - a.1) / f64::from(b.0 - a.0)));
            }
        }
    }
    out
}

/// `pause/svff-vmm`, `floor`.
pub fn label(mode: &str, vmm: &str) -> String {
    if vmm == "none" {
        mode.to_owned()
    } else {
        format!("{mode}/{vmm}")
    }
}

fn opt(v: Option<f64>, prec: usize, suffix: &str) -> String {
    v.map_or("-".into(), |x| format!("{x:.prec$}{suffix}"))
}

/// Aligned text: `rows[0]` is the header; numeric columns right-aligned.
fn align(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c == 0 {
                let _ = write!(line, "{cell:<w$}", w = widths[c]);
            } else {
                let _ = write!(line, "  {cell:>w$}", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Table I as aligned text.
pub fn render_table_i(report: &BenchReport) -> String {
    let mut rows = vec![vec![
        "mode".to_owned(),
        "VFs".into(),
        "avg ms".into(),
        "sigma ms".into(),
        "vs detach %".into(),
        "ms/VF vs detach".into(),
        "x floor".into(),
    ]];
    for r in &report.table_i {
        rows.push(vec![
            label(&r.mode, &r.vmm),
            r.vfs.to_string(),
            format!("{:.1}", r.avg_ms),
            format!("{:.1}", r.sigma_ms),
            opt(r.overhead_pct, 1, ""),
            opt(r.overhead_ms_per_vf, 1, ""),
            opt(r.floor_ratio, 3, ""),
        ]);
    }
    let mut out = format!(
        "Table I: total time of one reconfiguration ({} runs each, warm-up not counted; detach reference: {})\n",
        report.runs,
        report.reference.as_deref().map_or("none".into(), |v| format!("detach/{v}"))
    );
    out.push_str(&align(&rows));
    let slopes = per_extra_vf(&report.series);
    if !slopes.is_empty() {
        out.push_str("growth per extra VF:");
        for (l, ms) in slopes {
            let _ = write!(out, "  {l} {ms:.1} ms");
        }
        out.push('\n');
    }
    out.push_str("paper (CITS 2023, Table I):");
    for p in &report.paper_table_i {
        let _ = write!(out, "  {} {} VF {:.0} ms", p.mode, p.vfs, p.ms);
    }
    out.push('\n');
    out
}

/// Table II (per-step averages) as aligned text.
pub fn render_table_ii(report: &BenchReport) -> String {
    let order = [
        "connect",
        "remove_vf",
        "pause",
        "change_numvfs",
        "resources",
        "bind_vfs",
        "unpause",
        "add_vf",
        "table",
    ];
    let mut names: Vec<String> = order.iter().map(|s| (*s).to_owned()).collect();
    for s in &report.series {
        for k in s.summary.steps.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    names.retain(|n| {
        report
            .series
            .iter()
            .any(|s| s.summary.steps.contains_key(n))
    });
    let (main, sub): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| !n.contains('.'));
    let mut out = step_table(
        report,
        &main,
        true,
        "Table II: average per step (per-VM steps: the slowest VM of each run)\n",
    );
    if !sub.is_empty() {
        out.push('\n');
        out.push_str(&step_table(
            report,
            &sub,
            false,
            "Table II, VMM side: per VM and device, `.qmp` the command's round trip seen by \
             svff, `.vmm` the VMM's own time, then its timed phases (each the slowest VM of \
             each run)\n",
        ));
    }
    out
}

fn step_table(report: &BenchReport, names: &[String], total: bool, title: &str) -> String {
    let mut header = vec!["mode".to_owned(), "VFs".into()];
    header.extend(names.iter().map(|n| format!("{n} ms")));
    if total {
        header.push("total ms".into());
    }
    let mut rows = vec![header];
    for s in &report.series {
        if !total && !names.iter().any(|n| s.summary.steps.contains_key(n)) {
            continue;
        }
        let mut row = vec![label(&s.mode, &s.vmm), s.vfs.to_string()];
        row.extend(
            names
                .iter()
                .map(|n| opt(s.summary.steps.get(n).copied(), 1, "")),
        );
        if total {
            row.push(format!("{:.1}", s.summary.avg_ms));
        }
        rows.push(row);
    }
    let mut out = title.to_owned();
    out.push_str(&align(&rows));
    out
}

/// The guest view per series as aligned text.
pub fn render_guest_view(report: &BenchReport) -> String {
    let mut rows = vec![vec![
        "mode".to_owned(),
        "VFs".into(),
        "window avg ms".into(),
        "window max ms".into(),
        "sample ms".into(),
        "guest TSC window avg ms".into(),
        "max ms".into(),
        "TSC-timed".into(),
        "failed reads".into(),
        "disappeared".into(),
    ]];
    let mut any = false;
    for s in &report.series {
        let Some(gone) = s.summary.guest_disappeared else {
            continue;
        };
        any = true;
        let views: Vec<&GuestRunView> = s.runs.iter().flat_map(|r| &r.guest).collect();
        let sample: Vec<f64> = views.iter().filter_map(|g| g.sample_ms).collect();
        let failed: u64 = views.iter().map(|g| g.failed_reads).sum();
        rows.push(vec![
            label(&s.mode, &s.vmm),
            s.vfs.to_string(),
            opt(s.summary.guest_window_avg_ms, 1, ""),
            opt(s.summary.guest_window_max_ms, 1, ""),
            opt((!sample.is_empty()).then(|| mean_sigma(&sample).0), 1, ""),
            opt(s.summary.guest_tsc_window_avg_ms, 2, ""),
            opt(s.summary.guest_tsc_window_max_ms, 2, ""),
            format!(
                "{} of {}",
                s.summary.guest_tsc_windows.unwrap_or(0),
                views.len()
            ),
            failed.to_string(),
            format!("{gone} of {}", views.len()),
        ]);
    }
    if !any {
        return String::new();
    }
    let mut out = "Guest view (svff-vmm test guests; window: first to last failed access per VF, \
                   host-sampled upper bound, resolution one sample; guest TSC window: the longest \
                   window the guest timed itself (win_ktsc), over the VF runs that raised its \
                   running maximum (TSC-timed); disappeared: VF runs in which the guest saw the \
                   device vanish)\n"
        .to_owned();
    out.push_str(&align(&rows));
    out
}

/// The QEMU L2 guests' view per series as aligned text (empty without one).
pub fn render_l2_view(report: &BenchReport) -> String {
    let mut rows = vec![vec![
        "mode".to_owned(),
        "VFs".into(),
        "driver".into(),
        "runs".into(),
        "VF vanished".into(),
        "driver let go".into(),
        "AER recoveries".into(),
        "back avg ms".into(),
        "back max ms".into(),
        "not back".into(),
    ]];
    for s in &report.series {
        let Some(driver) = &s.summary.l2_driver else {
            continue;
        };
        let runs = s.runs.iter().filter(|r| r.l2.is_some()).count();
        let c = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
        rows.push(vec![
            label(&s.mode, &s.vmm),
            s.vfs.to_string(),
            driver.clone(),
            runs.to_string(),
            c(s.summary.l2_vanished),
            if driver == "none" {
                "-".into()
            } else {
                c(s.summary.l2_driver_disturbed)
            },
            if driver == "none" {
                "-".into()
            } else {
                c(s.summary.l2_aer_recoveries)
            },
            opt(s.summary.l2_back_avg_ms, 1, ""),
            opt(s.summary.l2_back_max_ms, 1, ""),
            c(s.summary.l2_not_back),
        ]);
    }
    if rows.len() == 1 {
        return String::new();
    }
    let mut out = "L2 guest view (QEMU guests' L2 Linux, sampled 4 times a second: runs in which \
                   a VF vanished from the guest, in which its driver let go of a VF or a \
                   controller left `live`, the AER recoveries it logged, and the time from the \
                   reconf's end until every VF was back, bound and live; not counted in the \
                   totals)\n"
        .to_owned();
    out.push_str(&align(&rows));
    out
}

/// Every table, one after another.
pub fn render_all(report: &BenchReport) -> String {
    let mut out = format!(
        "svff bench: PF {} ({}), VMs: {}, guest memory {} MiB, kernel {}\n\n",
        report.pf, report.profile, report.vms, report.guest_memory_mib, report.kernel
    );
    out.push_str(&render_table_i(report));
    out.push('\n');
    out.push_str(&render_table_ii(report));
    for g in [render_guest_view(report), render_l2_view(report)] {
        if !g.is_empty() {
            out.push('\n');
            out.push_str(&g);
        }
    }
    out
}

/// Fills the derived parts (`summary` of each series, `table_i`,
/// `reference`) from the raw runs.
pub fn finish(report: &mut BenchReport) {
    for s in &mut report.series {
        s.summary = summarize(&s.runs);
    }
    report.reference = reference_vmm(&report.series);
    report.table_i = table_i(&report.series);
}
