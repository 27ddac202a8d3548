#!/usr/bin/env bash
# weft demo: 3 hosts x 2 containers in network namespaces on this machine,
# one netd per host on a shared embedded store, containers attached by the
# CNI plugin; shows blocks, addresses, cross-host ping, the encrypted
# underlay and a 5-second throughput figure. Needs root.
#
#   scripts/demo.sh            build, bring the mesh up, show it, wait for Ctrl-C
#   scripts/demo.sh down       tear everything down (from another terminal)
#   scripts/demo.sh check      bring it up, show it, tear it down (used by CI)
#
# Environment: WEFT_BACKEND=wireguard|vxlan (default wireguard),
# WEFT_DEMO_PROFILE=release|debug (default release).
set -euo pipefail
cd "$(dirname "$0")/.."

P=wdemo                       # namespace prefix
STATE=/run/weft-demo
BACKEND=${WEFT_BACKEND:-wireguard}
PROFILE=${WEFT_DEMO_PROFILE:-release}
HOSTS=3
CTRS=2
UNDERLAY=192.168.90

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

down() {
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$P-" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  done
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$P-" | sort -r || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$STATE"
}

if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: needs root (network namespaces): sudo $0 $*" >&2
  exit 1
fi

case "${1:-up}" in
  down) down; echo "demo: torn down"; exit 0 ;;
  up|check) ;;
  *) echo "usage: $0 [up|down|check]" >&2; exit 2 ;;
esac
MODE=${1:-up}

scripts/install-deps.sh
if [ "$PROFILE" = release ]; then
  cargo build --release -q -p weft-netd -p weft-cni
else
  cargo build -q -p weft-netd -p weft-cni
fi
BIN=$(pwd)/target/$PROFILE
down
mkdir -p "$STATE"
trap 'echo; say "tearing down"; down' EXIT

say "underlay: a switch namespace and $HOSTS hosts on $UNDERLAY.0/24"
ip netns add $P-ul
ip -n $P-ul link set lo up
ip -n $P-ul link add br0 type bridge
ip -n $P-ul addr add $UNDERLAY.1/24 dev br0
ip -n $P-ul link set br0 up
for h in $(seq 0 $((HOSTS - 1))); do
  ip netns add $P-h$h
  ip -n $P-h$h link set lo up
  ip -n $P-h$h link add eth0 type veth peer name h$h netns $P-ul
  ip -n $P-ul link set h$h master br0 up
  ip -n $P-h$h addr add $UNDERLAY.$((10 + h))/24 dev eth0
  ip -n $P-h$h link set eth0 up
  ip -n $P-h$h route add default via $UNDERLAY.1
done

say "netd on every host (backend $BACKEND, store sqlite:$STATE/store.db)"
for h in $(seq 0 $((HOSTS - 1))); do
  mkdir -p $STATE/h$h
  ip netns exec $P-h$h "$BIN/netd" run --host-id demo-h$h --state-dir $STATE/h$h \
    --socket $STATE/h$h/netd.sock --store sqlite:$STATE/store.db --backend "$BACKEND" \
    --host-ttl-secs 5 >$STATE/h$h/netd.log 2>&1 &
  disown
done
for h in $(seq 0 $((HOSTS - 1))); do
  for _ in $(seq 100); do
    "$BIN/netd" status --socket $STATE/h$h/netd.sock >/dev/null 2>&1 && break
    sleep 0.1
  done
  ip netns exec $P-h$h "$BIN/netd" status --socket $STATE/h$h/netd.sock | sed "s/^/  h$h  /"
  echo
done

say "containers, attached through the CNI plugin"
declare -A IP
for h in $(seq 0 $((HOSTS - 1))); do
  for c in $(seq 0 $((CTRS - 1))); do
    ns=$P-h$h-c$c
    ip netns add $ns
    out=$(echo "{\"cniVersion\":\"1.0.0\",\"name\":\"weft\",\"type\":\"weft\",\"socket\":\"$STATE/h$h/netd.sock\"}" |
      CNI_COMMAND=ADD CNI_CONTAINERID=demo-h$h-c$c CNI_NETNS=/var/run/netns/$ns CNI_IFNAME=eth0 \
      CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=web-$h$c;WEFT_SERVICE=web;WEFT_STACK=demo" CNI_PATH=$BIN \
      ip netns exec $P-h$h "$BIN/weft")
    IP[$h$c]=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ips"][0]["address"].split("/")[0])')
  done
  ip netns exec $P-h$h "$BIN/netd" endpoints --socket $STATE/h$h/netd.sock | sed "s/^/  h$h  /"
done

say "cross-host ping (every container to the first container of every other host)"
sleep 1
for h in $(seq 0 $((HOSTS - 1))); do
  for t in $(seq 0 $((HOSTS - 1))); do
    [ "$h" = "$t" ] && continue
    if ip netns exec $P-h$h-c0 ping -c1 -W2 -q "${IP[${t}0]}" >/dev/null; then
      echo "  h$h/c0 ${IP[${h}0]} -> h$t/c0 ${IP[${t}0]}: ok"
    else
      echo "  h$h/c0 ${IP[${h}0]} -> h$t/c0 ${IP[${t}0]}: FAILED"; exit 1
    fi
  done
done

say "what the underlay sees while containers talk (tcpdump on the switch)"
ip netns exec $P-ul tcpdump -i br0 -nn -c 20 -w $STATE/underlay.pcap ip >/dev/null 2>&1 &
CAP=$!
sleep 0.5
ip netns exec $P-h0-c0 ping -c5 -i0.2 -p 5745465444454d4f "${IP[10]}" >/dev/null || true   # "WEFTDEMO"
wait $CAP 2>/dev/null || true
ip netns exec $P-ul tcpdump -nn -r $STATE/underlay.pcap 2>/dev/null | head -6 | sed 's/^/  /'
if ip netns exec $P-ul tcpdump -nn -A -r $STATE/underlay.pcap 2>/dev/null | grep -q WEFTDEMO; then
  echo "  the marker WEFTDEMO is visible on the underlay (plaintext backend: $BACKEND)"
else
  echo "  the marker WEFTDEMO does not appear on the underlay: the overlay is encrypted"
fi

say "5-second TCP throughput, h0/c0 -> h1/c0 (iperf3)"
ip netns exec $P-h1-c0 iperf3 -s -1 -D
sleep 0.5
ip netns exec $P-h0-c0 iperf3 -c "${IP[10]}" -t 5 -f g | grep -E "sender|receiver" | sed 's/^/  /'

if [ "$MODE" = check ]; then
  say "demo check passed"
  exit 0
fi
say "the mesh is up: try  ip netns exec $P-h0-c0 ping ${IP[21]}   (Ctrl-C, or '$0 down', to tear down)"
trap 'echo; say "tearing down"; down; exit 0' INT TERM
trap - EXIT
while true; do sleep 3600; done
