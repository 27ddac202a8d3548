#!/usr/bin/env bash
# Proves that scripts/install-deps.sh is complete: on a clean Debian 12 root
# (mmdebstrap --variant=minbase bookworm, nothing else), with this machine's
# Rust toolchain mounted read-only and a copy of this work tree, it runs
# scripts/install-deps.sh (twice: the second must find everything), then
# `cargo build --release --workspace --all-targets --locked` in a fresh
# target dir, then `scripts/demo.sh check` in a network namespace of its own.
# A machine that already has the packages (a developer's, CI's) cannot show
# a missing install step; this can. Needs root; reaches Debian's archive and
# crates.io. Takes about 8 min with warm caches (2 cores), 10-11 min cold.
#
#   sudo scripts/fresh-check.sh             # the check (CI runs this)
#   sudo scripts/fresh-check.sh --refresh   # rebuild the cached minbase root first
#   sudo scripts/fresh-check.sh --no-demo   # install + build only
#   sudo scripts/fresh-check.sh --tests     # also scripts/test.sh and
#                                           #   bench/run --quick in the root (slow)
#
# Cached between runs, outside the repo, in $WEFT_FRESH_CACHE (default
# /var/cache/weft-fresh-check): the PRISTINE minbase root as a tarball
# (rebuilt when older than $WEFT_FRESH_MAX_AGE_DAYS, default 7), cargo's
# registry (a CARGO_HOME) and apt's downloaded .debs. Never build output: the
# target dir is new on every run, so no cached build-script output can hide a
# missing tool. Everything else lives in a mktemp dir under /var/tmp, removed
# at the end; the mounts live in a private mount namespace (and the processes
# in a private PID namespace), so nothing is left behind on any exit path.
# Exit status: non-zero, naming the step, if any step fails.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SELF=$REPO/scripts/fresh-check.sh
CACHE=${WEFT_FRESH_CACHE:-/var/cache/weft-fresh-check}
MAX_AGE_DAYS=${WEFT_FRESH_MAX_AGE_DAYS:-7}
MIRROR=${WEFT_FRESH_MIRROR:-http://deb.debian.org}
SUITE=bookworm
TARBALL=$CACHE/$SUITE-minbase.tar

# The start, kept across the re-run of this script inside the namespaces.
T0=${WEFT_FRESH_T0:-$(date +%s)}
export WEFT_FRESH_T0=$T0
STEP=start
STEP_T=$T0
# step NAME USUAL: announces a step, with what it usually takes.
step() {
  STEP=$1
  STEP_T=$(date +%s)
  printf '\n\033[1m== fresh-check: %s\033[0m  (usually %s; %d s so far)\n' "$1" "$2" $((STEP_T - T0))
}
step_done() {
  printf '   fresh-check: %s: %d s\n' "$STEP" $(( $(date +%s) - STEP_T ))
}
die() {
  echo "fresh-check: $*" >&2
  exit 1
}

# ---------------------------------------------------------------------------
# Inside the private mount + PID namespaces: mount, enter the root, run the steps.
# ---------------------------------------------------------------------------
inner() {
  # Globals, not locals: the EXIT trap needs them after inner() is left.
  WORK=$1 SYSROOT=$2 DEMO=$3 TESTS=$4
  ROOT=$WORK/root
  trap umount_all EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  # The root itself a mount point (`ip netns exec` makes / a slave mount,
  # which fails on a plain directory); under it the kernel file systems, a
  # tmpfs /run, the toolchain read-only, the caches. Each mount exists only in
  # this namespace.
  mount --bind "$ROOT" "$ROOT"
  mount -t proc proc "$ROOT/proc"
  mount --rbind /sys "$ROOT/sys"
  mount --make-rslave "$ROOT/sys"
  mount --rbind /dev "$ROOT/dev"
  mount --make-rslave "$ROOT/dev"
  mount -t tmpfs -o mode=0755 tmpfs "$ROOT/run"
  mkdir -p "$ROOT/run/lock" "$ROOT/opt/rust" "$ROOT/opt/cargo-home" "$ROOT/var/cache/apt/archives"
  mount --bind "$SYSROOT" "$ROOT/opt/rust"
  mount -o remount,bind,ro "$ROOT/opt/rust"
  mount --bind "$CACHE/cargo-home" "$ROOT/opt/cargo-home"
  mount --bind "$CACHE/apt-archives" "$ROOT/var/cache/apt/archives"
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"

  ROOT_ENV=(HOME=/root PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    LANG=C.UTF-8 TERM="${TERM:-dumb}" CI="${CI:-}" CARGO_HOME=/opt/cargo-home
    CARGO_TERM_COLOR=never DEBIAN_FRONTEND=noninteractive)

  step "install-deps in the bare root" "about 30 s"
  in_root scripts/install-deps.sh
  no_daemons "install-deps"
  [ -s "$ROOT/etc/ssl/certs/ca-certificates.crt" ] ||
    die "no CA bundle in the root after install-deps: cargo cannot reach crates.io (ca-certificates)"
  step_done

  step "install-deps again: must find everything, in well under a second" "0 s"
  local t1 t2 out ms
  t1=$(date +%s%N)
  out=$(in_root scripts/install-deps.sh)
  t2=$(date +%s%N)
  ms=$(( (t2 - t1) / 1000000 ))
  echo "$out"
  echo "   took $ms ms"
  grep -q 'everything is installed' <<<"$out" || die "the second install-deps run still found something missing"
  [ "$ms" -lt 1000 ] || die "the second install-deps run took a second or more"
  step_done

  step "cargo build --release --workspace --all-targets --locked (fresh target dir)" \
    "about 5 min on 2 cores, 6.5 min with a cold crate cache"
  echo "   $(in_root cargo --version), toolchain $SYSROOT (read-only)"
  # A machine whose way out needs a CA of its own (a TLS-inspecting proxy)
  # has it in its bundle, not in Debian's: cargo then trusts the host's
  # bundle (read-only). apt needs no TLS. On an ordinary machine the two
  # bundles are the same and the root's own is used.
  if ! cmp -s /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"; then
    : >"$ROOT/opt/host-ca-certificates.crt"
    mount --bind /etc/ssl/certs/ca-certificates.crt "$ROOT/opt/host-ca-certificates.crt"
    mount -o remount,bind,ro "$ROOT/opt/host-ca-certificates.crt"
    ROOT_ENV+=(CARGO_HTTP_CAINFO=/opt/host-ca-certificates.crt)
    echo "   note: this machine's CA bundle differs from Debian's; cargo uses the host's (read-only)"
  fi
  in_root cargo build --release --workspace --all-targets --locked
  step_done

  # The demo and the tests need no network beyond this machine (and get
  # none: see in_root --own-netns); cargo has what it needs.
  ROOT_ENV+=(CARGO_NET_OFFLINE=true)
  if [ "$DEMO" = 1 ]; then
    step "scripts/demo.sh check in the root (own network namespace)" \
      "about 2-3 min: its own build of netd and the plugin (other features), then 20 s"
    in_root --own-netns scripts/demo.sh check
    no_daemons "demo.sh check"
    step_done
  fi
  if [ "$TESTS" = 1 ]; then
    step "scripts/test.sh and bench/run --quick in the root (own network namespace)" "about 15 min"
    in_root --own-netns sh -c 'scripts/test.sh && bench/run --quick'
    step_done
  fi
}

# in_root [--own-netns] CMD...: CMD in the root, in /src, with a clean
# environment. The root becomes the root of a mount namespace of the step's
# own (pivot_root), not merely a chroot: `podman exec` (runc) enters the
# container's mount namespace at that namespace's root, which in a chroot is
# still the host's /. With --own-netns, in a network namespace of its own
# with only a loopback (the demo and the tests need nothing else).
in_root() {
  local pre=() lo=
  if [ "$1" = --own-netns ]; then
    shift
    pre=(unshare --net --)
    lo='ip link set lo up && '
  fi
  # In the background, then wait: a signal to this script interrupts `wait`
  # (it would wait for a foreground child), and its trap stops everything.
  "${pre[@]}" unshare --mount -- /bin/sh -c \
    'cd "$0" && pivot_root . . && umount -l . && exec /usr/bin/env -i "$@"' "$ROOT" \
    "${ROOT_ENV[@]}" /bin/sh -c "${lo}cd /src && exec \"\$@\"" sh "$@" <&0 &
  wait $!
}

# Fails if a daemon was left running in the root (the PID namespace holds
# only this script and what the steps started).
no_daemons() {
  local f c left=()
  for f in "$ROOT"/proc/[0-9]*/comm; do
    c=$(cat "$f" 2>/dev/null) || continue
    case $c in
      etcd | unbound | dnsmasq | netd | dnsd | iperf3 | wireguard-go) left+=("$c") ;;
    esac
  done
  [ ${#left[@]} -eq 0 ] || die "$1 left daemons running: ${left[*]}"
}

# The EXIT trap inside the namespaces: report, stop what is left, unmount.
umount_all() {
  local status=$? p
  trap - EXIT
  if [ "$status" -ne 0 ]; then
    echo "fresh-check: FAILED at step '$STEP' after $(( $(date +%s) - STEP_T )) s (exit status $status)" >&2
  fi
  # Everything else in this PID namespace (this script is its PID 1).
  if [ -n "${ROOT:-}" ] && [ -d "$ROOT/proc/1" ]; then
    for p in "$ROOT"/proc/[0-9]*; do
      p=${p##*/}
      [ "$p" = 1 ] || kill -9 "$p" 2>/dev/null || true
    done
  fi
  # Every mount under the root, innermost first; lazily if busy.
  if [ -n "${ROOT:-}" ]; then
    local m
    for m in $(awk -v r="$ROOT" '$5 == r || index($5, r "/") == 1 {print $5}' /proc/self/mountinfo | sort -r); do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  fi
  exit "$status"
}

if [ "${1:-}" = --inner ]; then
  shift
  inner "$@"
  exit 0
fi

# ---------------------------------------------------------------------------
# Outside: arguments, host tools, the cached root, the work dir.
# ---------------------------------------------------------------------------
refresh=0 demo=1 tests=0
for a in "$@"; do
  case $a in
    --refresh) refresh=1 ;;
    --no-demo) demo=0 ;;
    --tests) tests=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $a (see --help)" ;;
  esac
done
[ "$(id -u)" -eq 0 ] || die "needs root (mounts, namespaces, pivot_root): sudo $0 $*"

work= inner_pid=
cleanup() {
  local status=$? child i
  trap - EXIT
  # Interrupted while the namespaces run: stop them (their PID 1 cleans up;
  # unshare itself ignores SIGTERM) and wait until they are gone.
  if [ -n "$inner_pid" ] && kill -0 "$inner_pid" 2>/dev/null; then
    for child in $(cat "/proc/$inner_pid/task/$inner_pid/children" 2>/dev/null); do
      kill -TERM "$child" 2>/dev/null || true
    done
    for i in $(seq 60); do kill -0 "$inner_pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$inner_pid" 2>/dev/null || true
    wait "$inner_pid" 2>/dev/null || true
  fi
  if [ -n "$work" ] && [ -d "$work" ]; then
    # The mounts lived in the namespace, which is gone; never delete through
    # a mount that is somehow still there.
    if grep -qF " $work/" /proc/self/mountinfo; then
      echo "fresh-check: mounts under $work remain; not removing it:" >&2
      grep -F " $work/" /proc/self/mountinfo >&2
      status=1
    else
      rm -rf --one-file-system "$work"
    fi
  fi
  if [ "$status" -eq 0 ]; then
    echo "fresh-check: passed in $(( $(date +%s) - T0 )) s"
  elif [ "$STEP" != inner ]; then
    echo "fresh-check: FAILED at step '$STEP' (exit status $status) after $(( $(date +%s) - T0 )) s" >&2
  else
    echo "fresh-check: FAILED (see the step named above) after $(( $(date +%s) - T0 )) s" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "host tools (mmdebstrap)" "0 s; about 15 s the first time"
if ! command -v mmdebstrap >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends mmdebstrap >/dev/null
fi
for t in unshare pivot_root git tar flock; do
  command -v "$t" >/dev/null 2>&1 || die "$t is missing on this machine"
done
# The Rust toolchain: the sysroot of the rustc that `cargo` here runs (a
# rustup toolchain under $RUSTUP_HOME, default ~/.rustup, reached through
# ~/.cargo/bin; or a standalone install). Mounted read-only.
command -v cargo >/dev/null 2>&1 || die "no cargo on PATH (install a Rust toolchain, e.g. rustup)"
sysroot=$(rustc --print sysroot 2>/dev/null) ||
  die "cannot find the Rust toolchain (rustc --print sysroot failed)"
[ -x "$sysroot/bin/cargo" ] && [ -x "$sysroot/bin/rustc" ] ||
  die "the toolchain at $sysroot has no bin/cargo and bin/rustc"
case $sysroot in
  / | /usr | /usr/local) die "the toolchain is installed into $sysroot, which cannot be mounted on its own; use rustup" ;;
esac
echo "   toolchain: $sysroot ($("$sysroot/bin/rustc" --version))"
step_done

mkdir -p "$CACHE/cargo-home" "$CACHE/apt-archives"
step "the pristine minbase root ($TARBALL)" "0 s cached; about 1-2 min to build"
(
  # One builder at a time; the tarball is only ever replaced whole.
  flock 9
  if [ "$refresh" = 1 ] || [ ! -s "$TARBALL" ] ||
     [ -n "$(find "$TARBALL" -mtime +"$MAX_AGE_DAYS" 2>/dev/null)" ]; then
    echo "   building it (mmdebstrap --variant=minbase $SUITE)"
    tmp=$CACHE/.building-$$.tar
    rm -rf "$tmp"
    if ! mmdebstrap --quiet --mode=root --format=tar --variant=minbase "$SUITE" "$tmp" \
        "deb $MIRROR/debian $SUITE main" \
        "deb $MIRROR/debian $SUITE-updates main" \
        "deb $MIRROR/debian-security $SUITE-security main"; then
      rm -rf "$tmp"
      exit 1
    fi
    mv -f "$tmp" "$TARBALL"
  else
    echo "   cached, built $(date -r "$TARBALL" '+%F %H:%M') (rebuilt after $MAX_AGE_DAYS days or with --refresh)"
  fi
) 9>"$CACHE/lock"
echo "   $(du -h "$TARBALL" | cut -f1)"
step_done

step "unpack the root and copy the work tree into /src" "about 5 s"
work=$(mktemp -d /var/tmp/weft-fresh-check.XXXXXX)
root=$work/root
mkdir "$root"
tar -C "$root" --numeric-owner -xpf "$TARBALL"
# Pristine: nothing that install-deps installs may be there yet.
for p in gcc libc6-dev protobuf-compiler libprotobuf-dev ca-certificates iproute2 python3; do
  if grep -qx "Package: $p" "$root/var/lib/dpkg/status"; then
    die "the cached root is not a bare minbase ($p is installed): rerun with --refresh"
  fi
done
echo "   root: $(grep -c '^Package:' "$root/var/lib/dpkg/status") packages (minbase)"
mkdir "$root/src"
# The work tree as it is (tracked and untracked files, minus ignored ones
# such as target/), not the host's build output.
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
      if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
    done | tar --null -T - -cf -) | tar -C "$root/src" -xf -
else
  tar -C "$REPO" --exclude=./target --exclude=./.git -cf - . | tar -C "$root/src" -xf -
fi
echo "   /src: $(find "$root/src" -type f | wc -l) files, $(du -sh "$root/src" | cut -f1)"
step_done

# The rest in a private mount namespace and PID namespace: the mounts and
# any process a step leaves behind end with it, whatever the exit path.
STEP=inner
unshare --mount --propagation private --pid --fork --kill-child=TERM -- \
  bash "$SELF" --inner "$work" "$sysroot" "$demo" "$tests" <&0 &
inner_pid=$!
wait "$inner_pid"
