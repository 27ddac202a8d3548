#!/usr/bin/env bash
# Installs the system packages weft's build and tests need (Debian/Ubuntu).
# Idempotent: installs only what is missing. Needs root.
set -euo pipefail

# command -> Debian package
declare -A need=(
  [ip]=iproute2
  [iptables]=iptables
  [etcd]=etcd-server
  [protoc]=protobuf-compiler
  [iperf3]=iperf3
  [dig]=dnsutils
  [tcpdump]=tcpdump
  [ping]=iputils-ping
  [conntrack]=conntrack
  [setpriv]=util-linux
  [pkill]=procps
  [ss]=iproute2
  [python3]=python3
  [podman]=podman
  [runc]=runc
  [busybox]=busybox-static
  [dnsmasq]=dnsmasq-base
  [dnsperf]=dnsperf
  [unbound]=unbound
  [wireguard-go]=wireguard-go
  [wg]=wireguard-tools
)

missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done

# The reference CNI plugins (bridge, host-local, portmap) for chaining tests
# and the CNI benchmark.
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: everything is installed"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]}; run as root: sudo $0" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's etcd-server package starts a system etcd on 2379; weft's tests
# start their own on free ports and do not need it.
# The same for unbound: the tests and benches run their own instances.
if command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now etcd unbound >/dev/null 2>&1 || true
fi
pkill -x unbound 2>/dev/null || true
echo "install-deps: done"
