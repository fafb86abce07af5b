#!/usr/bin/env bash
# Bounded fuzzing of qmp-ext's QMP input parser, for CI (`make test`).
#
# Installs cargo-fuzz if missing, then runs the `input_parser` target for
# QMP_FUZZ_SECONDS (default 60) seconds. Exits non-zero if the target crashes
# (panic, failed property, or sanitizer report); the crashing input is then
# in qmp-ext/fuzz/artifacts/input_parser/.
#
# cargo-fuzz passes nightly-only flags (-Z...) to rustc. On a stable
# toolchain RUSTC_BOOTSTRAP=1 makes rustc accept them; we set it for this
# build only (its own target directory), never for the workspace.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
secs="${QMP_FUZZ_SECONDS:-60}"
cargo_fuzz_version="0.13.2"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "qmp-ext fuzz: installing cargo-fuzz ${cargo_fuzz_version}"
    cargo install cargo-fuzz --locked --version "=${cargo_fuzz_version}"
fi

cd "$here"
# Fresh writable corpus per run (seeds are read-only inputs next to it).
corpus="$here/corpus/input_parser"
mkdir -p "$corpus"

export RUSTC_BOOTSTRAP=1
echo "qmp-ext fuzz: input_parser for ${secs}s"
start=$(date +%s)
cargo fuzz run input_parser \
    --target-dir "$here/../../target/fuzz" \
    --debug-assertions \
    "$corpus" "$here/seeds" \
    -- -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
echo "qmp-ext fuzz: no crash in ${secs}s of fuzzing ($(( $(date +%s) - start ))s with build)"
