#!/usr/bin/env bash
# Runs the fpga-rtl checks (called by the Makefile, from fpga-rtl/).
# Usage: run_tests.sh all | lint | regen-check | tcl-dryrun | <bench name>
# Every check prints one "PASS name" or "FAIL name" line; the run ends with
# "N passed, M failed" and exits non-zero if anything failed.
set -u
cd "$(dirname "$0")/.."
: "${IVERILOG:=iverilog}" "${VVP:=vvp}" "${VERILATOR:=verilator}" "${PYTHON:=python3}"
: "${BUILD:=build}" "${BENCH_TIMEOUT:=60}"
: "${RTL:=rtl/svff_user_top.v rtl/svff_regs.v rtl/svff_loopback.v}"
: "${BENCHES:=tb_regmap tb_isolation tb_stream}"
mkdir -p "$BUILD"
passed=0
failed=0

pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }

run_lint() {
    # the RTL alone, then the Vivado top level against black-box stubs of the IP
    # shellcheck disable=SC2086
    if "$VERILATOR" --lint-only -Wall -Irtl --top-module svff_user_top $RTL \
        >"$BUILD/lint.log" 2>&1; then
        pass "lint (verilator --lint-only -Wall, rtl/)"
    else
        cat "$BUILD/lint.log"
        fail "lint (verilator --lint-only -Wall, rtl/)"
    fi
    # shellcheck disable=SC2086
    if "$VERILATOR" --lint-only -Wall -Irtl --top-module svff_qdma_top vivado/svff_qdma_top.v \
        vivado/stub/*.v $RTL >"$BUILD/lint-top.log" 2>&1; then
        pass "lint (verilator --lint-only -Wall, vivado/svff_qdma_top.v with IP stubs)"
    else
        cat "$BUILD/lint-top.log"
        fail "lint (verilator --lint-only -Wall, vivado/svff_qdma_top.v with IP stubs)"
    fi
}

run_regen_check() {
    if "$PYTHON" scripts/reggen.py --check >"$BUILD/regen-check.log" 2>&1; then
        tail -n 1 "$BUILD/regen-check.log"
        pass "regen-check"
    else
        cat "$BUILD/regen-check.log"
        fail "regen-check"
    fi
}

run_tcl_dryrun() {
    if ! command -v tclsh >/dev/null; then
        fail "vivado-tcl-dryrun (tclsh not installed: run scripts/deps.sh)"
        return
    fi
    if tclsh scripts/vivado_mock.tcl -out "$BUILD/vivado-mock" >"$BUILD/tcl-dryrun.log" 2>&1; then
        tail -n 1 "$BUILD/tcl-dryrun.log"
        pass "vivado-tcl-dryrun"
    else
        cat "$BUILD/tcl-dryrun.log"
        fail "vivado-tcl-dryrun"
    fi
}

run_bench() {
    local tb=$1 log="$BUILD/$1.log" start end rc
    start=$(date +%s%N)
    # shellcheck disable=SC2086
    if ! "$IVERILOG" -g2012 -Wall -Wno-sensitivity-entire-array -Wno-timescale -Irtl -Itb \
        -o "$BUILD/$tb.vvp" "tb/$tb.v" $RTL >"$BUILD/$tb.compile.log" 2>&1; then
        cat "$BUILD/$tb.compile.log"
        fail "$tb (compile)"
        return
    fi
    timeout "$BENCH_TIMEOUT" "$VVP" -n "$BUILD/$tb.vvp" >"$log" 2>&1
    rc=$?
    end=$(date +%s%N)
    sed 's/^/  | /' "$log" | grep -v '^  | \(PASS\|FAIL\) ' || true
    if [ "$rc" -eq 124 ]; then
        fail "$tb (wall-clock timeout ${BENCH_TIMEOUT}s)"
    elif [ "$rc" -ne 0 ]; then
        fail "$tb (vvp exit $rc)"
    elif grep -q "^FAIL " "$log" || ! grep -q "^PASS $tb " "$log"; then
        fail "$(grep -m1 '^FAIL ' "$log" | sed 's/^FAIL //' || echo "$tb (no verdict)")"
    else
        pass "$(grep -m1 "^PASS $tb " "$log" | sed 's/^PASS //') in $(( (end - start) / 1000000 )) ms"
    fi
}

what=${1:-all}
case "$what" in
    all)
        run_lint
        run_regen_check
        run_tcl_dryrun
        for tb in $BENCHES; do run_bench "$tb"; done
        ;;
    lint) run_lint ;;
    regen-check) run_regen_check ;;
    tcl-dryrun) run_tcl_dryrun ;;
    *) run_bench "$what" ;;
esac

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
