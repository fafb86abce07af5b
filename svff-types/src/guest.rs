//! The counter lines svff-vmm's built-in test guest prints on its serial port, and their
//! parser: shared by svff-vmm (which prints them) and the helper's benchmark (which reads
//! them) without the helper linking the VMM.
//!
//! Format (one line, numbers decimal unless said otherwise):
//! `svff-guest: dev=00:DD.F round=R reads=N ok=N ones=N gone=N back=N max_tsc=N irqs=N win_ktsc=N id=XXXXXXXX st=XXXXXXXX`
//! (`max_tsc`: longest single BAR read in TSC ticks; `win_ktsc`: longest guest-observed
//! disruption in units of 1024 TSC ticks; `id`, `st`: last BAR0+0 and BAR0+8 values, hex).

/// One counter line of the test guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCounters {
    /// The function, `00:DD.F`.
    pub dev: String,
    /// Rounds completed when printed.
    pub round: u64,
    /// BAR reads so far.
    pub reads: u64,
    /// Reads that were not all-ones.
    pub ok: u64,
    /// All-ones reads.
    pub ones: u64,
    /// Times the function disappeared from config space.
    pub gone: u64,
    /// Times it came back.
    pub back: u64,
    /// Longest single BAR read, TSC ticks.
    pub max_tsc: u64,
    /// MSI-X interrupts taken.
    pub irqs: u64,
    /// Longest guest-observed window (all-ones run or single slow read), 1024-tick units.
    pub win_ktsc: u64,
    /// Last value of BAR0+0.
    pub id: u32,
    /// Last value of BAR0+8.
    pub st: u32,
}

/// Parses a `svff-guest: dev=... round=...` counter line (None for any other line).
pub fn parse_counters(line: &str) -> Option<GuestCounters> {
    let rest = line.trim().strip_prefix("svff-guest: dev=")?;
    let mut it = rest.split(' ');
    let dev = it.next()?.to_string();
    let mut c = GuestCounters {
        dev,
        round: 0,
        reads: 0,
        ok: 0,
        ones: 0,
        gone: 0,
        back: 0,
        max_tsc: 0,
        irqs: 0,
        win_ktsc: 0,
        id: 0,
        st: 0,
    };
    let mut seen = 0;
    for kv in it {
        let (k, v) = kv.split_once('=')?;
        match k {
            "id" => c.id = u32::from_str_radix(v, 16).ok()?,
            "st" => c.st = u32::from_str_radix(v, 16).ok()?,
            _ => {
                let n: u64 = v.parse().ok()?;
                match k {
                    "round" => c.round = n,
                    "reads" => c.reads = n,
                    "ok" => c.ok = n,
                    "ones" => c.ones = n,
                    "gone" => c.gone = n,
                    "back" => c.back = n,
                    "max_tsc" => c.max_tsc = n,
                    "irqs" => c.irqs = n,
                    "win_ktsc" => c.win_ktsc = n,
                    _ => return None,
                }
            }
        }
        seen += 1;
    }
    (seen == 11).then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_lines_parse_and_other_lines_do_not() {
        let c = parse_counters(
            "svff-guest: dev=00:01.0 round=10 reads=20 ok=19 ones=1 gone=0 back=0 max_tsc=1234 irqs=10 win_ktsc=77 id=53564646 st=00010400",
        )
        .unwrap();
        assert_eq!(c.dev, "00:01.0");
        assert_eq!((c.round, c.reads, c.ok, c.ones), (10, 20, 19, 1));
        assert_eq!((c.max_tsc, c.irqs, c.id), (1234, 10, 0x5356_4646));
        assert_eq!((c.win_ktsc, c.st), (77, 0x0001_0400));
        assert!(parse_counters("svff-guest: dev=00:01.0 event=gone").is_none());
        assert!(parse_counters("svff-guest: start").is_none());
    }

    #[test]
    fn a_counter_line_missing_a_field_does_not_parse() {
        assert!(parse_counters(
            "svff-guest: dev=00:01.0 round=10 reads=20 ok=19 ones=1 gone=0 back=0 max_tsc=1234 irqs=10 id=53564646 st=00010400"
        )
        .is_none());
    }
}
