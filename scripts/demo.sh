#!/usr/bin/env bash
# weft demo: 3 hosts x 2 containers in network namespaces on this machine,
# one netd per host on a shared embedded store, containers attached by the
# CNI plugin; shows blocks, addresses, cross-host ping, service discovery,
# the encrypted underlay and a 5-second throughput figure. Needs root.
#
#   scripts/demo.sh            build, bring the mesh up, show it, wait for Ctrl-C
#   scripts/demo.sh down       tear everything down, and stop a running `up`
#                              (from another terminal)
#   scripts/demo.sh check      bring it up, show it, tear it down; exit 0 only if
#                              every step passed (CI and scripts/fresh-check.sh)
#
# Environment: WEFT_BACKEND=wireguard|vxlan (default wireguard),
# WEFT_DEMO_PROFILE=release|debug (default release).
#
# Everything it makes is named wdemo-* (namespaces) or lives under
# /run/weft-demo; `down` removes all of it. A failed step prints the netd logs
# before tearing down, so a failure explains itself.
set -euo pipefail
cd "$(dirname "$0")/.."

P=wdemo                       # namespace prefix
STATE=/run/weft-demo
PIDFILE=/run/weft-demo.pid    # the running `up`, for `down` from another terminal
BACKEND=${WEFT_BACKEND:-wireguard}
PROFILE=${WEFT_DEMO_PROFILE:-release}
HOSTS=3
CTRS=2
UNDERLAY=192.168.90
T0=$SECONDS
STEP="starting"
SLEEPER=""

# One line per step, with the elapsed time, so a newcomer sees what is
# happening and how long it takes.
say() {
  STEP=$1
  printf '\n\033[1m== [%3ds] %s\033[0m\n' "$((SECONDS - T0))" "$*"
}

# Remove every namespace and file the demo made. Safe to run at any time.
down() {
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$P-" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  done
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$P-" | sort -r || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$STATE"
}

# `down` from another terminal: ask the running `up` to tear down and exit
# (its TERM trap does the work); if it does not within 10 s, kill it.
stop_running_up() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 0
  rm -f "$PIDFILE"
  [ -n "$pid" ] && [ "$pid" != "$$" ] && kill -0 "$pid" 2>/dev/null || return 0
  echo "demo: stopping the running demo (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
}

# On failure: say which step failed and show the end of every netd log.
explain_failure() {
  printf '\n\033[1;31m== demo FAILED in step: %s\033[0m\n' "$STEP" >&2
  for log in "$STATE"/h*/netd.log; do
    [ -s "$log" ] || continue
    echo "-- last lines of $log:" >&2
    tail -n 15 "$log" | sed 's/^/   /' >&2
  done
}

on_exit() {
  local rc=$?
  [ "$rc" -ne 0 ] && explain_failure
  [ -n "$SLEEPER" ] && kill "$SLEEPER" 2>/dev/null
  echo
  say "tearing down"
  down
  rm -f "$PIDFILE"
  exit "$rc"
}

fail() { echo "  $*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: needs root (network namespaces): sudo $0 $*" >&2
  exit 1
fi

case "${1:-up}" in
  down) stop_running_up; down; echo "demo: torn down"; exit 0 ;;
  up|check) ;;
  *) echo "usage: $0 [up|down|check]" >&2; exit 2 ;;
esac
MODE=${1:-up}

say "system packages (scripts/install-deps.sh; first run about 30 s to 1 min, then instant)"
scripts/install-deps.sh

say "building netd, dnsd and the CNI plugin ($PROFILE; first build about 5 min on 2 cores, seconds when nothing changed)"
if [ "$PROFILE" = release ]; then
  cargo build --release -p weft-netd -p weft-dnsd -p weft-cni
else
  cargo build -p weft-netd -p weft-dnsd -p weft-cni
fi
BIN=$(pwd)/target/$PROFILE

stop_running_up
down
mkdir -p "$STATE"
echo $$ >"$PIDFILE"
trap on_exit EXIT

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

say "netd on every host, all at once (backend $BACKEND, store sqlite:$STATE/store.db)"
for h in $(seq 0 $((HOSTS - 1))); do
  mkdir -p $STATE/h$h
  ip netns exec $P-h$h "$BIN/netd" run --host-id demo-h$h --state-dir $STATE/h$h \
    --socket $STATE/h$h/netd.sock --store sqlite:$STATE/store.db --backend "$BACKEND" \
    --host-ttl-secs 5 >$STATE/h$h/netd.log 2>&1 &
  disown
done
for h in $(seq 0 $((HOSTS - 1))); do
  up=0
  for _ in $(seq 100); do
    if "$BIN/netd" status --socket $STATE/h$h/netd.sock >/dev/null 2>&1; then up=1; break; fi
    sleep 0.1
  done
  [ "$up" = 1 ] || fail "netd on h$h did not answer on $STATE/h$h/netd.sock within 10 s"
  ip netns exec $P-h$h "$BIN/netd" status --socket $STATE/h$h/netd.sock | sed "s/^/  h$h  /"
  echo
done

say "containers, attached through the CNI plugin (service web, stack demo)"
declare -A IP NAME
for h in $(seq 0 $((HOSTS - 1))); do
  for c in $(seq 0 $((CTRS - 1))); do
    ns=$P-h$h-c$c
    ip netns add $ns
    NAME[$h$c]=web-$h$c
    out=$(echo "{\"cniVersion\":\"1.0.0\",\"name\":\"weft\",\"type\":\"weft\",\"socket\":\"$STATE/h$h/netd.sock\"}" |
      CNI_COMMAND=ADD CNI_CONTAINERID=demo-h$h-c$c CNI_NETNS=/var/run/netns/$ns CNI_IFNAME=eth0 \
      CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=${NAME[$h$c]};WEFT_SERVICE=web;WEFT_STACK=demo" CNI_PATH=$BIN \
      ip netns exec $P-h$h "$BIN/weft") || fail "CNI ADD of $ns failed: $out"
    IP[$h$c]=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ips"][0]["address"].split("/")[0])')
  done
  ip netns exec $P-h$h "$BIN/netd" endpoints --socket $STATE/h$h/netd.sock | sed "s/^/  h$h  /"
done

say "cross-host ping (every host's first container to every other host's)"
for h in $(seq 0 $((HOSTS - 1))); do
  for t in $(seq 0 $((HOSTS - 1))); do
    [ "$h" = "$t" ] && continue
    # The first packets may wait for a handshake: up to 5 tries.
    if ip netns exec $P-h$h-c0 ping -c1 -w5 -q "${IP[${t}0]}" >/dev/null; then
      echo "  h$h/c0 ${IP[${h}0]} -> h$t/c0 ${IP[${t}0]}: ok"
    else
      fail "h$h/c0 ${IP[${h}0]} -> h$t/c0 ${IP[${t}0]}: no answer"
    fi
  done
done

say "service discovery: dig from h0/c0 at 169.254.169.250"
DNS=169.254.169.250
dig_show() {   # LABEL, then dig's arguments
  local label=$1 out status answers
  shift
  out=$(ip netns exec $P-h0-c0 dig @$DNS +time=2 +tries=2 "$@") || fail "dig $* failed: $out"
  status=$(echo "$out" | sed -n 's/.*status: \([A-Z]*\),.*/\1/p')
  answers=$(echo "$out" | awk '/^;; ANSWER SECTION/{a=1;next} /^$/{a=0} a{print $NF}' | sort | tr '\n' ' ')
  printf '  %-44s %-9s %s\n' "$label" "$status" "${answers:-(no records)}"
}
dig_show "web          (service, own stack: its VIP)" web A
dig_show "web.demo     (service.stack: its VIP)" web.demo A
dig_show "tasks.web.demo (the service's containers)" tasks.web.demo A
dig_show "${NAME[21]}       (a container on h2)" "${NAME[21]}" A
dig_show "-x ${IP[10]} (PTR)" -x "${IP[10]}"
dig_show "nothing.demo (no such name in a known stack)" nothing.demo A
VIP=$(ip netns exec $P-h0-c0 dig @$DNS +short web.demo A)
case "$VIP" in
  10.43.*) ;;
  *) fail "web.demo does not answer one virtual IP in 10.43.0.0/16: '$VIP'" ;;
esac
[ "$(ip netns exec $P-h0-c0 dig @$DNS +short tasks.web.demo A | sort)" = "$(printf '%s\n' "${IP[@]}" | sort)" ] ||
  fail "tasks.web.demo does not answer the $((HOSTS * CTRS)) container addresses"
dig_show "-x $VIP (PTR of the VIP)" -x "$VIP"
ip netns exec $P-h0-c0 ping -c 3 -i 0.2 -W 2 "$VIP" >/dev/null ||
  fail "ping to the VIP $VIP (balanced in the kernel to a container) got no answer"
echo "  ping $VIP (the VIP, balanced in the kernel to one of the 6 containers): ok"
[ "$(ip netns exec $P-h0-c0 dig @$DNS +short "${NAME[21]}" A)" = "${IP[21]}" ] ||
  fail "${NAME[21]} does not answer ${IP[21]}"
ip netns exec $P-h0-c0 dig @$DNS nothing.demo A | grep -q 'status: NXDOMAIN' ||
  fail "a missing name does not answer NXDOMAIN"

say "what the underlay sees while containers talk (tcpdump on the switch, 5 pings)"
# The tunnel's own packets: 5 pings are 10 encapsulated datagrams; tcpdump
# stops as soon as it has them (timeout is only a safety net).
if [ "$BACKEND" = vxlan ]; then TUNNEL="udp port 4789"; else TUNNEL="udp port 51820"; fi
timeout 10 ip netns exec $P-ul tcpdump -i br0 -nn --immediate-mode -c 10 \
  -w $STATE/underlay.pcap "$TUNNEL" 2>$STATE/tcpdump.err &
CAP=$!
for _ in $(seq 50); do grep -q listening $STATE/tcpdump.err 2>/dev/null && break; sleep 0.1; done
ip netns exec $P-h0-c0 ping -c5 -i0.2 -p 5745465444454d4f "${IP[10]}" >/dev/null ||
  fail "ping h0/c0 -> h1/c0 with the marker failed"   # the pattern is "WEFTDEMO"
wait $CAP 2>/dev/null || true
seen=$(tcpdump -nn -r $STATE/underlay.pcap 2>/dev/null | grep -c '^[0-9]' || true)
[ "$seen" -ge 10 ] || fail "the capture saw $seen tunnel packets, expected 10 ($(tail -n 3 $STATE/tcpdump.err))"
tcpdump -nn -r $STATE/underlay.pcap 2>/dev/null | head -4 | sed 's/^/  /'
if tcpdump -nn -A -r $STATE/underlay.pcap 2>/dev/null | grep -q WEFTDEMO; then
  echo "  the marker WEFTDEMO is readable on the underlay: plaintext backend ($BACKEND)"
else
  echo "  the marker WEFTDEMO appears in none of the $seen packets: the overlay is encrypted"
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
trap 'exit 0' INT TERM
# Sleep in the background and wait for it: bash runs a trap only between
# commands, and `wait` returns at once on a signal (a foreground sleep would not).
while true; do
  sleep 3600 &
  SLEEPER=$!
  wait "$SLEEPER" || true
done
