#!/usr/bin/env bash
# weft's whole test suite: formatting, lints, unit tests, the store contract
# on SQLite and a real etcd, IPAM concurrency, and the network-namespace
# tests (these need root; as root they never skip).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

if [ "$(id -u)" -eq 0 ]; then
  # Root tests must run, never skip silently.
  export WEFT_REQUIRE_ROOT_TESTS=1
else
  echo "test.sh: not root: tests that build network namespaces will be skipped" >&2
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
# Unit and component tests in parallel; the end-to-end tests in network
# namespaces one at a time (they measure traffic and timing, and 2 cores
# shared by several labs make those figures meaningless).
cargo test --workspace --all-features --exclude weft-tests
cargo test -p weft-tests --all-features -- --test-threads=1
