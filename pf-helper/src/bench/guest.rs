//! The guest's view of a run: svff-vmm's test guest prints counter lines
//! (`svff_types::parse_counters`) on its serial port, which svff-vmm
//! writes to a file; a tailer thread per VM timestamps each line as it
//! arrives, and [`view_of_run`] turns the samples around one run into the
//! guest-observed pause window and whether the device vanished.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use svff_types::{parse_counters, GuestCounters};

/// One counter line and when the host read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// When the tailer read the line.
    pub at: Instant,
    /// The counters.
    pub counters: GuestCounters,
}

/// What one guest saw of one VF during one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestRunView {
    /// The VM.
    pub vm: String,
    /// The function in the guest, `00:DD.F`.
    pub dev: String,
    /// From the last sample before the first failed access to the sample
    /// with the last one, ms: an upper bound of the window in which the
    /// guest's accesses failed (all-ones reads or the device gone), off by at
    /// most one sample interval; a device that vanished counts until it is
    /// back. None: no access failed.
    pub window_ms: Option<f64>,
    /// Median interval between two samples in this run, ms (the resolution).
    pub sample_ms: Option<f64>,
    /// Accesses that failed (all-ones BAR reads) during the run.
    pub failed_reads: u64,
    /// Longest single BAR read since the guest started (its counter is
    /// cumulative), TSC ticks, as of the run's last sample: a stalled access shows here.
    pub max_tsc: u64,
    /// Whether the guest saw the function disappear (config space all-ones) during the run.
    pub disappeared: bool,
    /// Samples the view is built from.
    pub samples: usize,
    /// The guest's own measurement of this run, ms: the longest window it
    /// timed with its TSC (`win_ktsc`: a run of all-ones reads up to the next
    /// valid read, or one stalled read), when this run raised the guest's
    /// running maximum. None when it did not (this run's window was no longer
    /// than an earlier one: at most [`tsc_window_max_ms`](Self::tsc_window_max_ms)),
    /// or the guest's TSC frequency is unknown.
    #[serde(default)]
    pub tsc_window_ms: Option<f64>,
    /// The guest's running maximum of that window at the run's end, ms (since
    /// the guest started; None: TSC frequency unknown).
    #[serde(default)]
    pub tsc_window_max_ms: Option<f64>,
}

/// `win_ktsc` (1024-tick units) at `tsc_khz` kHz, in ms.
pub fn ktsc_ms(win_ktsc: u64, tsc_khz: u32) -> f64 {
    win_ktsc as f64 * 1024.0 / f64::from(tsc_khz)
}

/// The view of `dev` from the samples around one run: `samples` must hold
/// the last sample before the run started, then every sample until one
/// after the run ended (in arrival order); other devices' samples are skipped.
/// `tsc_khz`: the guest's TSC frequency (`x-svff-query-tsc`), None or 0 if unknown.
pub fn view_of_run(vm: &str, dev: &str, samples: &[Sample], tsc_khz: Option<u32>) -> GuestRunView {
    let mine: Vec<&Sample> = samples.iter().filter(|s| s.counters.dev == dev).collect();
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut failed = 0;
    let mut disappeared = false;
    let mut intervals: Vec<f64> = Vec::new();
    let mut max_tsc = 0;
    for w in mine.windows(2) {
        let (a, b) = (&w[0].counters, &w[1].counters);
        intervals.push(ms(w[1].at.saturating_duration_since(w[0].at)));
        max_tsc = max_tsc.max(b.max_tsc);
        let ones = b.ones.saturating_sub(a.ones);
        let gone = b.gone.saturating_sub(a.gone);
        let back = b.back.saturating_sub(a.back);
        // Gone since the previous sample and not back yet: the window is still open.
        let still_gone = b.gone > b.back && first.is_some();
        if ones > 0 || gone > 0 || back > 0 || still_gone {
            failed += ones;
            disappeared |= gone > 0;
            first.get_or_insert(w[0].at);
            last = Some(w[1].at);
        }
    }
    intervals.sort_by(f64::total_cmp);
    let khz = tsc_khz.filter(|k| *k > 0);
    let win_before = mine.first().map(|s| s.counters.win_ktsc);
    let win_after = mine.last().map(|s| s.counters.win_ktsc);
    let tsc_window_ms = khz.and_then(|k| match (win_before, win_after) {
        (Some(b), Some(a)) if a > b => Some(ktsc_ms(a, k)),
        _ => None,
    });
    let tsc_window_max_ms = khz.zip(win_after).map(|(k, a)| ktsc_ms(a, k));
    GuestRunView {
        vm: vm.into(),
        dev: dev.into(),
        window_ms: first
            .zip(last)
            .map(|(f, l)| ms(l.saturating_duration_since(f))),
        sample_ms: intervals.get(intervals.len() / 2).copied(),
        failed_reads: failed,
        max_tsc,
        disappeared,
        samples: mine.len(),
        tsc_window_ms,
        tsc_window_max_ms,
    }
}

/// What a QEMU L2 Linux guest saw of one run, from its `/init`'s lines
/// (`svff-bench-l2 vfs=N bound=B live=L aer=R`, four a second).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct L2RunView {
    /// The VM.
    pub vm: String,
    /// The guest driver loaded for the VFs (`nvme`; None: none).
    pub driver: Option<String>,
    /// The VFs the guest holds.
    pub vfs: u16,
    /// The fewest VFs the guest saw from the run's start until they were back.
    pub vfs_min: u16,
    /// Whether a VF vanished from the guest (`vfs_min` below the VF count).
    pub vanished: bool,
    /// The fewest VFs the driver held in that time (None: no driver).
    pub bound_min: Option<u16>,
    /// The fewest `live` nvme controllers in that time (None: no driver).
    pub live_min: Option<u16>,
    /// Successful AER recoveries the guest logged in that time (None: no driver).
    pub aer_recoveries: Option<u32>,
    /// From the run's end to the guest's first line with every VF there
    /// (bound and live with a driver, and the expected AER recoveries done)
    /// after the last line without, ms; None: not back within the deadline.
    pub back_ms: Option<f64>,
    /// The lines the view is built from.
    pub samples: usize,
}

/// The L2 view of one run of `n` VFs from `lines` (arrival time, line; in
/// order): the run went from `t0` to `t1`; `want_aer`: the AER recoveries
/// the run must bring before the VFs count as back (the patched QEMU's
/// `recover=aer` after an unpause), 0 otherwise. The view ends at the first
/// line after `t1` that is ready and has every later line up to now ready
/// too, or with the last line (then `back_ms` is None).
pub fn l2_view_of_run(
    vm: &str,
    driver: Option<&str>,
    n: u16,
    want_aer: u32,
    lines: &[(Instant, super::qemu::L2Line)],
    t0: Instant,
    t1: Instant,
) -> L2RunView {
    let base_aer = lines
        .iter()
        .rev()
        .find(|(at, _)| *at <= t0)
        .and_then(|(_, l)| l.aer)
        .unwrap_or(0);
    let ok = |l: &super::qemu::L2Line| {
        l.ready(n) && l.aer.unwrap_or(0).saturating_sub(base_aer) >= want_aer
    };
    let from = lines
        .iter()
        .position(|(at, _)| *at >= t0)
        .unwrap_or(lines.len());
    let mine = &lines[from..];
    // The first line after t1 that is ok, after the last one that is not.
    let last_bad = mine.iter().rposition(|(_, l)| !ok(l));
    let back = mine
        .iter()
        .enumerate()
        .skip(last_bad.map_or(0, |i| i + 1))
        .find(|(_, (at, _))| *at > t1)
        .map(|(i, _)| i);
    let upto = back.map_or(mine.len(), |i| i + 1);
    let seen = &mine[..upto];
    let min =
        |f: fn(&super::qemu::L2Line) -> Option<u16>| seen.iter().filter_map(|(_, l)| f(l)).min();
    let vfs_min = seen.iter().map(|(_, l)| l.vfs).min().unwrap_or(n);
    let aer_end = seen.last().and_then(|(_, l)| l.aer);
    L2RunView {
        vm: vm.into(),
        driver: driver.map(str::to_owned),
        vfs: n,
        vfs_min,
        vanished: vfs_min < n,
        bound_min: min(|l| l.bound),
        live_min: min(|l| l.live),
        aer_recoveries: aer_end.map(|a| a.saturating_sub(base_aer)),
        back_ms: back.map(|i| ms(mine[i].0.saturating_duration_since(t1))),
        samples: seen.len(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Follows `path` (waited for until it exists; the file only grows) on a
/// thread, handing each complete line to `line` as it arrives, until `stop`.
pub fn follow(
    path: PathBuf,
    stop: Arc<AtomicBool>,
    mut line_fn: impl FnMut(&str) + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let file = loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match File::open(&path) {
                Ok(f) => break f,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        loop {
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    // At the end of the file for now: poll (the file only grows).
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(_) if buf.ends_with(b"\n") => {
                    line_fn(&String::from_utf8_lossy(&buf));
                    buf.clear();
                }
                // A partial line: the rest comes with the next read.
                Ok(_) => std::thread::sleep(Duration::from_millis(2)),
                Err(_) => return,
            }
        }
    })
}

/// Follows one VM's serial file, keeping every counter sample.
#[derive(Debug)]
pub struct Tailer {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Tailer {
    /// Starts following `path` (which svff-vmm creates; waited for).
    pub fn start(path: PathBuf) -> Tailer {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, stop2) = (samples.clone(), stop.clone());
        let thread = follow(path, stop2, move |line| {
            if let Some(c) = parse_counters(line) {
                s2.lock().unwrap_or_else(|p| p.into_inner()).push(Sample {
                    at: Instant::now(),
                    counters: c,
                });
            }
        });
        Tailer {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Number of samples so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no sample arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sample>> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (bounded by `deadline`) until a sample of every device in
    /// `devs` arrived after `after`; false when the deadline passed.
    pub fn wait_sample_after(&self, after: Instant, devs: &[String], deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        loop {
            {
                let s = self.lock();
                if devs
                    .iter()
                    .all(|d| s.iter().any(|x| x.at > after && &x.counters.dev == d))
                {
                    return true;
                }
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The devices the guest reports on.
    pub fn devices(&self) -> Vec<String> {
        let mut d: Vec<String> = self.lock().iter().map(|s| s.counters.dev.clone()).collect();
        d.sort();
        d.dedup();
        d
    }

    /// The samples of the run between `start` and `end`: per device the last
    /// one before `start`, and everything after it.
    pub fn around(&self, start: Instant) -> Vec<Sample> {
        let s = self.lock();
        let mut devs: Vec<&String> = s.iter().map(|x| &x.counters.dev).collect();
        devs.sort();
        devs.dedup();
        let begin = devs
            .iter()
            .filter_map(|d| {
                s.iter()
                    .rposition(|x| &x.counters.dev == *d && x.at <= start)
            })
            .min()
            .unwrap_or(0);
        s[begin..].to_vec()
    }
}

impl Drop for Tailer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, dev: &str, reads: u64, ones: u64, gone: u64) -> Sample {
        Sample {
            at,
            counters: GuestCounters {
                dev: dev.into(),
                round: reads / 2,
                reads,
                ok: reads - ones,
                ones,
                gone,
                back: gone,
                max_tsc: 100,
                irqs: 0,
                win_ktsc: 0,
                id: 0,
                st: 0,
            },
        }
    }

    #[test]
    fn window_spans_from_the_sample_before_the_first_failed_read_to_the_last() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let s = vec![
            sample(at(0), "00:01.0", 100, 0, 0),
            sample(at(10), "00:01.0", 200, 0, 0),
            sample(at(20), "00:01.0", 300, 40, 0),
            sample(at(30), "00:02.0", 300, 0, 0),
            sample(at(40), "00:01.0", 400, 90, 0),
            sample(at(50), "00:01.0", 500, 90, 0),
        ];
        let v = view_of_run("vm0", "00:01.0", &s, None);
        assert_eq!(v.failed_reads, 90);
        assert_eq!(
            v.window_ms,
            Some(30.0),
            "10 ms (before the first) to 40 ms (the last)"
        );
        assert!(!v.disappeared);
        assert_eq!(v.samples, 5, "the other device's sample is skipped");
        assert_eq!(v.sample_ms, Some(10.0));
    }

    #[test]
    fn a_device_that_vanished_is_reported_and_a_clean_run_has_no_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut gone = vec![
            sample(at(0), "00:01.0", 100, 0, 0),
            sample(at(10), "00:01.0", 150, 0, 1),
            sample(at(20), "00:01.0", 150, 0, 1),
            sample(at(30), "00:01.0", 200, 0, 1),
            sample(at(40), "00:01.0", 300, 0, 1),
        ];
        // Gone at 10 ms (back counter not yet up), back by 30 ms.
        gone[1].counters.back = 0;
        gone[2].counters.back = 0;
        let v = view_of_run("vm0", "00:01.0", &gone, None);
        assert!(v.disappeared);
        assert_eq!(
            v.window_ms,
            Some(30.0),
            "from 0 ms to the sample that saw it back"
        );
        let clean = vec![
            sample(at(0), "00:01.0", 100, 0, 0),
            sample(at(10), "00:01.0", 200, 0, 0),
        ];
        let v = view_of_run("vm0", "00:01.0", &clean, None);
        assert_eq!(
            (v.window_ms, v.failed_reads, v.disappeared),
            (None, 0, false)
        );
    }

    #[test]
    fn the_guests_own_window_is_reported_only_when_the_run_raised_its_running_maximum() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = vec![
            sample(at(0), "00:01.0", 100, 0, 0),
            sample(at(10), "00:01.0", 200, 40, 0),
            sample(at(20), "00:01.0", 300, 40, 0),
        ];
        s[0].counters.win_ktsc = 100;
        s[1].counters.win_ktsc = 2000;
        s[2].counters.win_ktsc = 2000;
        // 2000 * 1024 ticks at 2_048_000 kHz = 1 ms.
        let v = view_of_run("vm0", "00:01.0", &s, Some(2_048_000));
        assert_eq!(v.tsc_window_ms, Some(1.0));
        assert_eq!(v.tsc_window_max_ms, Some(1.0));
        s[0].counters.win_ktsc = 2000;
        let v = view_of_run("vm0", "00:01.0", &s, Some(2_048_000));
        assert_eq!(v.tsc_window_ms, None, "not longer than an earlier window");
        assert_eq!(v.tsc_window_max_ms, Some(1.0));
        let v = view_of_run("vm0", "00:01.0", &s, Some(0));
        assert_eq!((v.tsc_window_ms, v.tsc_window_max_ms), (None, None));
    }
}
