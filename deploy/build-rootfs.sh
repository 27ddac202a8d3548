#!/usr/bin/env bash
# Assembles the weft sidecar's root filesystem from built binaries and this
# (Debian) machine's packages, without pulling any image: netd, dnsd (the DNS
# server netd runs beside it) and the CNI plugin, iptables (legacy and nft) with its extensions, conntrack, nft, the
# reference portmap/tuning plugins if installed, and every shared library
# they load. The result is what the Containerfile builds; run it with
#   podman run --rootfs DEST ... /usr/local/bin/netd sidecar
# (see README.md, "Deploy"), or pack it as an image: tar -C DEST -c . | podman import - weft
#
# Usage: deploy/build-rootfs.sh DEST [BIN_DIR]
#   BIN_DIR holds netd, dnsd and weft (default: target/release of this repository).
# Needs: ldd, iptables, conntrack, nft (scripts/install-deps.sh installs them).
set -euo pipefail

dest=${1:?usage: $0 DEST [BIN_DIR]}
bin_dir=${2:-$(cd "$(dirname "$0")/.." && pwd)/target/release}

for b in netd dnsd weft; do
  [ -x "$bin_dir/$b" ] || { echo "build-rootfs: $bin_dir/$b is missing (cargo build --release)" >&2; exit 1; }
done

mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
# The same /usr merge as the host (Debian 12: /lib -> usr/lib and so on).
for d in bin sbin lib lib64; do
  if [ -L "/$d" ] && [ ! -e "$dest/$d" ]; then
    ln -s "$(readlink "/$d")" "$dest/$d"
    mkdir -p "$dest/$(readlink "/$d" | sed 's#^/##')"
  fi
done
for d in usr/local/bin usr/sbin usr/lib/cni etc proc sys dev tmp run/weft run/netns var/lib/weft \
         opt/cni/bin etc/cni/net.d; do
  mkdir -p "$dest/$d"
done
chmod 1777 "$dest/tmp"
mkdir -p "$dest/var"
[ -e "$dest/var/run" ] || ln -s /run "$dest/var/run"

# Copies a file to the same path under $dest.
put() {
  local src=$1 dst="$dest$1"
  mkdir -p "$(dirname "$dst")"
  [ -e "$dst" ] || cp -p "$src" "$dst"
}

# Copies the shared libraries ELF files load (and the loader), under the
# names the loader looks for.
put_libs() {
  local lib real
  while read -r lib; do
    [ -n "$lib" ] || continue
    real=$(readlink -f "$lib")
    put "$real"
    if [ "$real" != "$lib" ] && [ ! -e "$dest$lib" ]; then
      mkdir -p "$dest$(dirname "$lib")"
      ln -s "$real" "$dest$lib"
    fi
  done < <(ldd "$@" 2>/dev/null | sort -u | awk '/=> \//{print $3} /^[[:space:]]*\/[^ ]+ \(/{print $1}')
}

put_elf() {
  put "$1"
  put_libs "$1"
}

for b in netd dnsd weft; do
  install -m 0755 "$bin_dir/$b" "$dest/usr/local/bin/.$b.new"
  mv -f "$dest/usr/local/bin/.$b.new" "$dest/usr/local/bin/$b"
  put_libs "$bin_dir/$b"
done

# iptables: both backends (netd picks the one the host uses), as the
# multi-call binaries with their applet names.
for multi in xtables-legacy-multi xtables-nft-multi; do
  put_elf "/usr/sbin/$multi"
done
for name in iptables-legacy iptables-legacy-save iptables-legacy-restore \
            iptables-nft iptables-nft-save iptables-nft-restore; do
  target=$(readlink "/usr/sbin/$name")
  ln -sfn "$target" "$dest/usr/sbin/$name"
done
ln -sfn iptables-nft "$dest/usr/sbin/iptables"
xtlib=$(ldd /usr/sbin/xtables-nft-multi | awk '/libxtables/{print $3}')
ext_dir=$(dirname "$(readlink -f "$xtlib")")/xtables
if [ -d "$ext_dir" ]; then
  for so in "$ext_dir"/*.so; do put "$so"; done
  put_libs "$ext_dir"/*.so
fi

put_elf /usr/sbin/conntrack
# nft: netd keeps its anti-spoofing and policy tables with it (one
# `nft -f -` transaction per change).
put_elf /usr/sbin/nft

# Reference plugins for --with-portmap / --with-tuning (optional).
for p in portmap tuning; do
  [ -x "/usr/lib/cni/$p" ] && put "/usr/lib/cni/$p"
done

for f in /etc/protocols /etc/services /etc/ethertypes /etc/nsswitch.conf; do
  [ -f "$f" ] && put "$f"
done
printf 'root:x:0:0:root:/:/usr/sbin/nologin\n' >"$dest/etc/passwd"
printf 'root:x:0:\n' >"$dest/etc/group"
: >"$dest/etc/resolv.conf"
: >"$dest/etc/hosts"
echo "build-rootfs: $dest ($(du -sh "$dest" | cut -f1))"
