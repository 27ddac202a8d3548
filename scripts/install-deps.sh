#!/usr/bin/env bash
# Installs the Debian packages that weft's build, tests, benchmark and demo
# need, on Debian 12 (bookworm) and alike, starting from a bare system (the
# minbase variant plus a Rust toolchain). Every package is named here: none
# is relied on from Recommends (we install without them) or from being
# already present. scripts/fresh-check.sh proves the list on a clean root.
#
# Idempotent: checks each package's dpkg status (one dpkg-query, well under
# a second) and installs only what is missing. Needs root to install.
# Starts no service and stops none: while it installs, a temporary
# /usr/sbin/policy-rc.d (only if the host has none) keeps the packages'
# daemons (etcd-server's etcd, unbound) from being started; weft's tests and
# benchmark start their own instances on free ports.
set -euo pipefail

# package|why. Build first, then what the tests, bench/run, scripts/demo.sh
# and deploy/build-rootfs.sh run.
list='
gcc|cc: the linker for rustc, and the C compiler for ring (boringtun) and the bundled SQLite (rusqlite)
libc6-dev|C headers and crt files that gcc links against
protobuf-compiler|protoc, run by etcd-client'"'"'s build script (prost/tonic build)
libprotobuf-dev|google/protobuf/*.proto (descriptor.proto, ...) imported by the etcd protos protoc compiles
ca-certificates|cargo fetches crates from crates.io over HTTPS
iproute2|ip (netns, links, routes), ss, bridge, tc: tests, bench, demo
iptables|iptables-{nft,legacy}{,-save,-restore}: netd'"'"'s NAT rules and their tests
nftables|nft: the leftover check after the tests lists nf_tables chains (scripts/leftovers.py skips it without nft)
conntrack|conntrack: netd flushes stale NAT entries; tests
etcd-server|etcd: the store contract and IPAM tests on a real etcd
iperf3|throughput: demo, tests, bench
bind9-dnsutils|dig: the DNS end-to-end tests
tcpdump|captures the underlay: demo, tests
iputils-ping|ping: demo, tests, bench
procps|pkill, kill, sysctl: tests
util-linux|setpriv, nsenter, unshare, flock: tests, this script (Essential)
mount|mount --bind: the deploy test
coreutils|timeout and the usual tools (Essential)
mawk|awk: demo.sh, deploy/build-rootfs.sh
python3|demo.sh (reads the CNI result), the deploy and anti-spoofing tests (HTTP GETs), scripts/leftovers.py
podman|a real CNI client: the podman and deploy tests (CNI backend)
runc|the OCI runtime those tests configure (crun refuses the cgroup layout here)
busybox-static|the root filesystem of the containers in those tests; arping (gratuitous ARP) in the anti-spoofing tests
dnsmasq-base|dnsmasq: the DNS benchmark reference
dnsperf|dnsperf: the DNS benchmark load generator
unbound|unbound: the DNS benchmark reference
wireguard-go|the userspace WireGuard reference in the tunnel benchmark
wireguard-tools|wg: tunnel tests and benchmark
git|bench/run records the commit it measured
containernetworking-plugins|the reference CNI plugins (bridge, host-local, portmap): chaining tests, CNI benchmark
'

# Roughly what a first install of everything costs on a bare Debian 12
# (measured by scripts/fresh-check.sh on 2 cores: 17-28 s, 147 packages).
FIRST_RUN_ESTIMATE="about 30 s to 1 min (about 150 packages with their dependencies, 130 MB to download; longer on a slow link)"

pkgs=() why=()
while IFS='|' read -r p w; do
  [ -n "$p" ] || continue
  pkgs+=("$p")
  why+=("$w")
done <<<"$list"

# The packages of $pkgs that are not fully installed ("install ok installed";
# half-configured ones count as missing).
find_missing() {
  local status p i
  status=$(dpkg-query -W -f='${Package} ${Status}\n' "${pkgs[@]}" 2>/dev/null || true)
  missing=() missing_why=()
  for i in "${!pkgs[@]}"; do
    p=${pkgs[$i]}
    if ! grep -qxF "$p install ok installed" <<<"$status"; then
      # The reference CNI plugins may come from elsewhere: what counts is
      # that the plugins are there.
      if [ "$p" = containernetworking-plugins ] &&
         [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/portmap ]; then
        continue
      fi
      missing+=("$p")
      missing_why+=("${why[$i]}")
    fi
  done
}

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "install-deps: this is not a Debian-like system (no dpkg-query); install by hand:" >&2
  printf '  %s\n' "${pkgs[@]}" >&2
  exit 1
fi

find_missing
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: everything is installed (${#pkgs[@]} packages)"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]}; run as root: sudo $0" >&2
  exit 1
fi

# One install at a time (two of these at once would race on policy-rc.d);
# look again once we hold the lock.
mkdir -p /run/lock
exec 9>/run/lock/weft-install-deps.lock
flock 9
find_missing
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: everything is installed (${#pkgs[@]} packages)"
  exit 0
fi

echo "install-deps: installing ${#missing[@]} of ${#pkgs[@]} packages (without Recommends):"
for i in "${!missing[@]}"; do
  printf '  %-28s %s\n' "${missing[$i]}" "${missing_why[$i]}"
done
echo "install-deps: a first install of everything usually takes $FIRST_RUN_ESTIMATE"

# Keep the daemons of the packages we install (etcd, unbound) from being
# started, during this install only: a policy-rc.d that refuses every start
# (honoured by invoke-rc.d and deb-systemd-invoke). Only if the host has none
# of its own; removed on every exit path. Their units stay enabled as the
# packages ship them: we do not touch services we did not start.
POLICY=/usr/sbin/policy-rc.d
MARK='# weft install-deps: temporary, removed when it ends'
policy_ours=0
cleanup() {
  if [ "$policy_ours" = 1 ] && grep -qxF "$MARK" "$POLICY" 2>/dev/null; then
    rm -f "$POLICY"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [ ! -e "$POLICY" ]; then
  policy_ours=1
  printf '#!/bin/sh\n%s\nexit 101\n' "$MARK" >"$POLICY"
  chmod 0755 "$POLICY"
fi

start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
# Wait for another apt/dpkg (up to 10 min) instead of failing on its lock.
apt_opts=(-o DPkg::Lock::Timeout=600)
apt-get "${apt_opts[@]}" update -qq
apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
find_missing
if [ ${#missing[@]} -ne 0 ]; then
  echo "install-deps: still not installed after apt-get: ${missing[*]}" >&2
  exit 1
fi
echo "install-deps: done in $(( $(date +%s) - start )) s"
