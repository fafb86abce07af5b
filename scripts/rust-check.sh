#!/usr/bin/env bash
# svff builds with the stable Rust toolchain (rustup). Say clearly what is missing.
set -euo pipefail
if ! command -v cargo >/dev/null; then
    echo "rust: cargo not found. Install Rust (https://rustup.rs) or: apt-get install cargo rustc" >&2
    exit 1
fi
for c in fmt clippy; do
    if ! cargo "$c" --version >/dev/null 2>&1; then
        echo "rust: cargo $c missing; run: rustup component add ${c/fmt/rustfmt}" >&2
        exit 1
    fi
done
