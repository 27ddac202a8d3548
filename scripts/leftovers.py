#!/usr/bin/env python3
"""Checks that a run of the tests (or a bench, or the demo) left nothing on the machine.

    scripts/leftovers.py snapshot FILE   record what the machine has now
    scripts/leftovers.py check FILE      compare with FILE; list anything new; exit 1 if so

What is compared (root namespace only; tests make their own namespaces):
  - network namespaces (`ip netns list`) and mount points (/proc/self/mountinfo)
  - links (`ip -o link`)
  - iptables rules and chains, legacy and nft backends (counters ignored)
  - nf_tables tables and chains (`nft list chains`)
  - files and directories under /run and /var (3 levels; caches and logs excepted)
  - processes: any still carrying the tag in WEFT_LEFTOVER_TAG in their
    environment (every process the run started inherits it), and any new
    process of a program the tests start (netd, etcd, iperf3, ...)

Things a run may legitimately change are not counted: /run/xtables.lock
(iptables' own lock), /run/netns itself (iproute2 makes it once and keeps it),
/run/mount (util-linux's mount makes it on its first run after boot),
apt/dpkg state (install-deps runs before the snapshot), caches and logs.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

# Programs the tests, benches and demo start; a new one still running is a leak.
WATCHED = {
    "netd", "weft", "dnsd", "weft-bench", "etcd", "iperf3", "tcpdump", "conmon",
    "podman", "dnsmasq", "unbound", "wireguard-go", "dnsperf", "runc",
    "busybox", "nc", "socat",
}
FILE_ROOTS = ["/run", "/var"]
FILE_DEPTH = 3
FILE_IGNORE = (
    "/run/xtables.lock", "/run/netns", "/run/mount", "/run/lock", "/run/user", "/run/systemd",
    "/run/utmp", "/var/cache", "/var/log", "/var/lib/apt", "/var/lib/dpkg",
    "/var/lib/ucf", "/var/backups", "/var/mail", "/var/spool", "/var/lib/systemd",
    "/var/lib/man-db",
)
MOUNT_IGNORE = ("/run/netns",)
COUNTERS = re.compile(r"^\[\d+:\d+\] ")


def run(argv):
    if shutil.which(argv[0]) is None:
        return ""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def netns():
    return sorted(line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip())


def links():
    out = []
    for line in run(["ip", "-o", "link", "show"]).splitlines():
        parts = line.split(": ")
        if len(parts) > 1:
            out.append(parts[1].split("@")[0])
    return sorted(out)


def mounts():
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    out.append(fields[4])
    except OSError:
        pass
    return sorted(set(m for m in out if not m.startswith(MOUNT_IGNORE)))


def iptables():
    out = []
    for tool in ("iptables-legacy-save", "iptables-nft-save"):
        table = ""
        for line in run([tool]).splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                out.append(f"{tool} {table} chain {line[1:].split()[0]}")
            elif line.startswith("-A"):
                out.append(f"{tool} {table} {COUNTERS.sub('', line)}")
    return sorted(out)


def nft_chains():
    out = []
    table = ""
    for line in run(["nft", "list", "chains"]).splitlines():
        line = line.strip()
        if line.startswith("table "):
            table = line.rstrip(" {")
        elif line.startswith("chain "):
            out.append(f"{table} {line.rstrip(' {')}")
    return sorted(out)


def files():
    out = []
    for root in FILE_ROOTS:
        base = root.rstrip("/").count("/")
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath.startswith(FILE_IGNORE):
                dirnames[:] = []
                continue
            depth = dirpath.rstrip("/").count("/") - base
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                if not path.startswith(FILE_IGNORE):
                    out.append(path)
            if depth + 1 >= FILE_DEPTH:
                dirnames[:] = []
            else:
                # Do not follow symlinks (/var/run -> /run) or other file systems.
                dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return sorted(out)


def procs():
    """pid -> program name, for the watched programs."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in WATCHED:
            out[pid] = comm
    return out


def ancestors():
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def tagged():
    """Processes (other than this one and its parents) carrying the run's tag."""
    tag = os.environ.get("WEFT_LEFTOVER_TAG", "")
    if not tag:
        return {}
    needle = f"WEFT_LEFTOVER_TAG={tag}".encode()
    mine, out = ancestors(), {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in mine:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        out[pid] = c.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return out


def snapshot():
    return {
        "netns": netns(), "links": links(), "mounts": mounts(), "iptables": iptables(),
        "nft": nft_chains(), "files": files(), "procs": procs(),
    }


def compare(before, now):
    found = []
    for kind in ("netns", "links", "mounts", "iptables", "nft", "files"):
        new = sorted(set(now[kind]) - set(before.get(kind, [])))
        found += [f"{kind}: {item}" for item in new]
    for pid, comm in sorted(now["procs"].items()):
        if pid not in before.get("procs", {}):
            found.append(f"process: {pid} {comm}")
    for pid, cmd in sorted(tagged().items()):
        if not any(f.startswith(f"process: {pid} ") for f in found):
            found.append(f"process: {pid} (started by this run) {cmd[:200]}")
    return found


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("snapshot", "check"):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    what, path = sys.argv[1], sys.argv[2]
    now = snapshot()
    if what == "snapshot":
        with open(path, "w") as f:
            json.dump(now, f)
        return 0
    with open(path) as f:
        before = json.load(f)
    # A process killed a moment ago may still be exiting, a namespace still
    # being released: look again for up to 5 s before calling it a leftover.
    for _ in range(10):
        found = compare(before, now)
        if not found:
            break
        time.sleep(0.5)
        now = snapshot()
    if found:
        print(f"leftovers: the run left {len(found)} thing(s) on the machine:", file=sys.stderr)
        for item in found:
            print(f"  {item}", file=sys.stderr)
        return 1
    print("leftovers: nothing left on the machine (namespaces, links, mounts, rules, files under /run and /var, processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
