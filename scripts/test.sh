#!/usr/bin/env bash
# weft's whole test suite: formatting, lints, unit tests, the store contract
# on SQLite and a real etcd, IPAM concurrency, and the network-namespace
# tests (these need root; as root they never skip).
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$SECONDS
# One line per step with the elapsed time and how long the step usually takes
# on 2 cores (first figure: cold build; second: warm).
step() { printf '\n\033[1m== test.sh [%4ds] %s\033[0m\n' "$((SECONDS - T0))" "$*"; }

step "system packages (scripts/install-deps.sh; first run about 30 s to 1 min, then instant)"

scripts/install-deps.sh

if [ "$(id -u)" -eq 0 ]; then
  # Root tests must run, never skip silently.
  export WEFT_REQUIRE_ROOT_TESTS=1
else
  echo "test.sh: not root: tests that build network namespaces will be skipped" >&2
fi

# What the machine has before the tests: at the end, anything new (namespaces,
# links, mounts, iptables/nft rules, files under /run and /var, processes the
# run started) fails the suite.
before=$(mktemp /tmp/weft-leftovers.XXXXXX)
trap 'rm -f "$before"' EXIT
WEFT_LEFTOVER_TAG="test-$$-$RANDOM"
export WEFT_LEFTOVER_TAG
scripts/leftovers.py snapshot "$before"

step "rustfmt and clippy (cold about 4 min, warm seconds)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
# Unit and component tests in parallel; the end-to-end tests in network
# namespaces one at a time (they measure traffic and timing, and 2 cores
# shared by several labs make those figures meaningless).
step "unit and component tests, store contract on SQLite and etcd (cold build about 4 min, then about 2 min)"
cargo test --workspace --all-features --exclude weft-tests
step "end-to-end tests in network namespaces, one at a time (about 6 min)"
cargo test -p weft-tests --all-features -- --test-threads=1

step "leftover check: nothing may remain on the machine"
scripts/leftovers.py check "$before"
step "all tests passed in $((SECONDS - T0)) s"
