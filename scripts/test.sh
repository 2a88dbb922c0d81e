#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property and end-to-end tests.
# README's second command; .ci/run calls exactly this after installing deps.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test"
cargo test --workspace --locked
