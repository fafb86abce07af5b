#!/usr/bin/env bash
# Measurement campaign for the lab's L1 configuration: fresh L1 boots, one after another, each
# running an L2 boot (stock QEMU, time from QEMU start to the guest's ready line) and the
# vfio-pause pause-mode bench (1/4/10 VFs), with the lab's stall detection counting stalls.
#
#   scripts/lab-campaign.sh OUTDIR SCHEDULE
#
# SCHEDULE is a string of candidate letters, run in that order, e.g. "BCBDBABCBDBA" (interleaved
# so that the machine's load drifts over all candidates alike):
#   A  thread=single, 2 vCPUs (the lab's old default)
#   B  thread=single, 1 vCPU  (the default)
#   C  thread=multi,  2 vCPUs
#   D  thread=multi,  2 vCPUs, L1 kernel with nohz=off highres=off: a periodic LAPIC tick, so a
#      lost timer interrupt is followed by the next one (-cpu max under TCG has no TSC-deadline
#      timer, so lapic=notscdeadline would change nothing)
# Per boot: OUTDIR/logs/<n>-<cand>.log and one JSON line in OUTDIR/results.jsonl.
# Summarise with scripts/lab-campaign-summary.py OUTDIR/results.jsonl.
# Environment: CAMPAIGN_END (epoch seconds): start no boot after it. L2_DEADLINE (s, default 200).
# The binaries are copied to OUTDIR/bin first, so rebuilding the workspace meanwhile is safe.
set -euo pipefail
out=${1:?usage: lab-campaign.sh OUTDIR SCHEDULE}
schedule=${2:?usage: lab-campaign.sh OUTDIR SCHEDULE}
root=$(cd "$(dirname "$0")/.." && pwd)
l2_deadline=${L2_DEADLINE:-200}
mkdir -p "$out/logs" "$out/bin"
out=$(cd "$out" && pwd)

exe_of() { # test target name -> executable, from cargo's build messages
    (cd "$root" && cargo test -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null) |
        python3 -c 'import sys, json
for l in sys.stdin:
    try: v = json.loads(l)
    except ValueError: continue
    if v.get("reason") == "compiler-artifact" and v.get("executable") and v["target"]["name"] == sys.argv[1]:
        print(v["executable"])' "$2" | tail -1
}
(cd "$root" && cargo build -p svff-lab --bin svff-lab)
cp "$root/target/debug/svff-lab" "$out/bin/svff-lab"
cp "$(exe_of svff-lab lab_l2)" "$out/bin/lab_l2"
cp "$(exe_of vfio-pause lab_vfio_pause)" "$out/bin/lab_vfio_pause"

workload="nproc; echo tsc_deadline_flags=\$(grep -c tsc_deadline_timer /proc/cpuinfo || true)
echo clockevent=\$(cat /sys/devices/system/clockevents/clockevent0/current_device) mode=\$(grep -m1 -o 'mode:.*' /proc/timer_list | head -1)
SVFF_LAB_L2_BOOT_DEADLINE=$l2_deadline $out/bin/lab_l2 --include-ignored --exact --test-threads=1 --nocapture \
    l2_guest_boots_under_stock_qemu_and_runs_commands_with_output_and_status; echo L2_RC=\$?
$out/bin/lab_vfio_pause --include-ignored --exact --test-threads=1 --nocapture \
    lab_bench_parallel_pause_reconf_of_n_vfs; echo BENCH_RC=\$?"

n=$( (cat "$out/results.jsonl" 2>/dev/null || true) | wc -l)
for ((i = 0; i < ${#schedule}; i++)); do
    c=${schedule:i:1}
    if [ -n "${CAMPAIGN_END:-}" ] && [ "$(date +%s)" -ge "$CAMPAIGN_END" ]; then
        echo "campaign: end time reached, stopping before boot $((n + 1))"
        break
    fi
    case $c in
        A) envs=(SVFF_LAB_CPUS=2 SVFF_LAB_TCG_THREAD=single SVFF_LAB_APPEND=) ;;
        B) envs=(SVFF_LAB_CPUS=1 SVFF_LAB_TCG_THREAD=single SVFF_LAB_APPEND=) ;;
        C) envs=(SVFF_LAB_CPUS=2 SVFF_LAB_TCG_THREAD=multi SVFF_LAB_APPEND=) ;;
        D) envs=(SVFF_LAB_CPUS=2 SVFF_LAB_TCG_THREAD=multi "SVFF_LAB_APPEND=nohz=off highres=off") ;;
        *) echo "unknown candidate $c" >&2; exit 2 ;;
    esac
    n=$((n + 1))
    log="$out/logs/$(printf %03d $n)-$c.log"
    load_before=$(cat /proc/loadavg)
    t0=$(date +%s.%N)
    set +e
    (cd "$out" && env "${envs[@]}" "$out/bin/svff-lab" run --timeout 900 -- bash -c "$workload") >"$log" 2>&1
    rc=$?
    set -e
    t1=$(date +%s.%N)
    load_after=$(cat /proc/loadavg)
    python3 - "$log" "$c" "$n" "$rc" "$t0" "$t1" "$load_before" "$load_after" "${envs[*]}" <<'EOF' >>"$out/results.jsonl"
import json, re, sys
log, cand, n, rc, t0, t1, lb, la, envs = sys.argv[1:]
text = open(log, errors="replace").read()
def num(pat):
    m = re.search(pat, text)
    return float(m.group(1)) if m else None
l2 = num(r"L2 boot: ([0-9.]+) s")
l2_timeout = l2 is None and re.search(r"L2 guest under .* timed out after", text) is not None
bench = {}
for m in re.finditer(r"BENCH pause-mode reconf, (\d+) nvme VFs \((\d+) runs\): total avg ([0-9.]+) ms \(sd ([0-9.]+), min ([0-9.]+)\)", text):
    bench[m.group(1)] = {"runs": int(m.group(2)), "avg_ms": float(m.group(3)), "sd_ms": float(m.group(4)), "min_ms": float(m.group(5))}
stalls = len(re.findall(r"L1 stalled", text))
print(json.dumps({
    "n": int(n), "candidate": cand, "env": envs, "rc": int(rc),
    "wall_s": round(float(t1) - float(t0), 1),
    "l1_boot_s": num(r"L1 up in ([0-9.]+) s"),
    "l1_boot_retried": "booting L1 again" in text,
    "l1_cpus": num(r"\n(\d+)\ntsc_deadline_flags"),
    "tsc_deadline_flags": num(r"tsc_deadline_flags=(\d+)"),
    "clockevent": (re.search(r"clockevent=(.*)", text) or [None, None])[1],
    "l2_boot_s": l2, "l2_deadline_hit": l2_timeout,
    "l2_rc": num(r"L2_RC=(\d+)"), "bench_rc": num(r"BENCH_RC=(\d+)"),
    "bench": bench, "stalled": stalls > 0, "stall_messages": stalls,
    "loadavg_before": lb, "loadavg_after": la,
}))
EOF
    tail -1 "$out/results.jsonl"
done
