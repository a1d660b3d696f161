#!/usr/bin/env python3
"""Where redis-server's CPU went, from a `perf record -g` file: each sample is put in one
bucket by its stack (the kernel half of the stack is reliable; Debian's redis-server has no
frame pointers, so of its own code only the sampled function is known), then the shares and
the hottest redis-server functions are printed.

    bench/load/redis_profile.py redis.data [REDIS_PID]

Samples of another process than REDIS_PID (default: the process with the most samples) are the
forked child that rewrites the AOF or saves a snapshot; they are counted apart, since that
CPU is not in the parent's /proc figures but still competes for the machine.
"""
import bisect
import subprocess
import sys
from collections import Counter
from functools import lru_cache

# First match wins; checked against every kernel frame of the sample.
KERNEL_BUCKETS = [
    ("AOF fsync (kernel)", ("do_fsync", "ext4_sync_file")),
    ("AOF write (kernel)", ("ext4_file_write_iter", "ext4_buffered_write_iter")),
    ("socket send (kernel, loopback delivery included)", ("sock_write_iter", "tcp_sendmsg")),
    ("socket receive (kernel)", ("sock_read_iter", "tcp_recvmsg")),
    ("epoll (kernel)", ("do_epoll_wait",)),
]


@lru_cache(maxsize=None)
def exported(dso):
    """The dso's exported functions, sorted by address: a stripped redis-server still exports
    its own and Lua's public functions, so an unnamed address is placed after the nearest one
    (the Lua VM's internal functions sit after lua_close, lua_yield, lua_getinfo)."""
    out = subprocess.run(["nm", "-D", "--defined-only", dso], capture_output=True, text=True)
    syms = sorted(
        (int(f[0], 16), f[2]) for f in (l.split() for l in out.stdout.splitlines())
        if len(f) == 3 and f[1] in "Tt"
    )
    return [a for a, _ in syms], [n for _, n in syms]


def name_of(ip, sym, dso):
    if sym != "[unknown]" or not dso.startswith("/"):
        return sym
    addrs, names = exported(dso)
    i = bisect.bisect_right(addrs, int(ip, 16)) - 1
    return f"~{names[i]}" if i >= 0 else sym


def bucket(frames):
    """frames: (symbol, dso) from leaf to root; an unnamed function is `~<nearest export>`."""
    for name, marks in KERNEL_BUCKETS:
        if any(sym.startswith(m) for sym, dso in frames for m in marks):
            return name
    sym, dso = frames[0]
    if dso == "[kernel.kallsyms]":
        return "kernel, other"
    if "jemalloc" in dso or sym.startswith("je_"):
        return "malloc/free (jemalloc)"
    if "redis" in dso:
        # The Lua interpreter and the script glue (argument and reply conversion between Lua
        # and Redis) are linked into redis-server; their functions carry these prefixes.
        if sym.lstrip("~").startswith(("lua", "Lua")):
            return "Lua VM and script glue"
        return "redis-server, other (commands, parsing, AOF encoding, replies)"
    if "libc" in dso:
        return "libc, other"
    return "other"


def samples(path):
    """(pid, frames) per sample."""
    out = subprocess.run(
        ["perf", "script", "-i", path, "-F", "pid,ip,sym,dso"],
        capture_output=True, text=True, check=True,
    ).stdout
    pid, frames = None, []
    for line in out.splitlines():
        if line and not line[0].isspace():
            if frames:
                yield pid, frames
            pid, frames = line.split()[0], []
            continue
        line = line.strip()
        if not line:
            continue
        parts = line.split(None, 1)
        rest = parts[1] if len(parts) > 1 else ""
        if rest.endswith(")") and " (" in rest:
            sym, dso = rest.rsplit(" (", 1)
            dso = dso[:-1]
        else:
            sym, dso = rest, ""
        frames.append((name_of(parts[0], sym.split("+")[0], dso), dso))
    if frames:
        yield pid, frames


def main():
    buckets, leaves = Counter(), Counter()
    all_samples = list(samples(sys.argv[1]))
    if len(sys.argv) > 2:
        main_pid = sys.argv[2]
    else:
        main_pid = Counter(pid for pid, _ in all_samples).most_common(1)[0][0] if all_samples else None
    total = 0
    for pid, frames in all_samples:
        total += 1
        if pid != main_pid:
            buckets["AOF rewrite / snapshot (forked child process)"] += 1
            continue
        buckets[bucket(frames)] += 1
        sym, dso = frames[0]
        if "redis" in dso:
            leaves[sym] += 1
    if not total:
        print("no samples")
        return
    print(f"redis-server profile: {total} samples")
    for name, n in buckets.most_common():
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("  hottest functions of the main process (self; ~name: an unexported one after name):")
    for sym, n in leaves.most_common(10):
        print(f"    {100 * n / total:5.1f}%  {sym}")


if __name__ == "__main__":
    main()
