#!/usr/bin/env python3
"""Time per hookyard script, from Redis's slow log (the bench sets its threshold to 0, so every
command is logged with its duration). Reads `redis-cli --json slowlog get -1` on stdin and
prints, per script (and per command sent outside scripts), its calls, its total and mean time, and the mean number of events per
call; a script is told apart by the keys it declares (`keys.rs`).

    redis-cli -p PORT --json slowlog get -1 | bench/load/redis_script_times.py EVENTS
"""
import json
import sys
from collections import defaultdict


def script_of(args):
    """The script an EVALSHA runs, from its declared keys; None for other commands."""
    if not args or args[0].lower() != "evalsha":
        return None
    n = int(args[2])
    keys = args[3:3 + n]
    first = keys[0] if keys else ""
    if first.endswith(":depth"):
        return "enqueue"
    if first.endswith(":ready"):
        return {8: "claim", 3: "next_due", 5: "stats"}.get(n, "claim-like")
    # `att:` for builds from before attempts moved into the event hash.
    if any(":att:" in k for k in keys) or (
            ":ev:" in first and any(k.endswith(":delivered") for k in keys)):
        return "complete"
    if any(k.endswith(":dlq") for k in keys) and any(":ev:" in k for k in keys):
        return "replay"
    if all(":ev:" in k for k in keys):
        return "release"
    if first.endswith(":dlq"):
        return "purge"
    if ":bd:" in first:
        return "undefer"
    return "other script"


def main():
    events = float(sys.argv[1]) if len(sys.argv) > 1 else 0
    log = json.load(sys.stdin)
    calls, usec = defaultdict(int), defaultdict(int)
    for entry in log:
        if entry[4] == "?:0":
            # A command a script ran: already inside the script's own time.
            continue
        name = script_of(entry[3]) or entry[3][0].lower()
        calls[name] += 1
        usec[name] += entry[2]
    total = sum(usec.values())
    for name in sorted(usec, key=usec.get, reverse=True)[:10]:
        line = f"     {name:<12} calls={calls[name]:<7} ms={usec[name] / 1000:8.1f} us/call={usec[name] / calls[name]:8.1f}"
        if events:
            line += f" us/event={usec[name] / events:6.1f}"
        print(line)
    if events:
        print(f"     {'all':<12} ms={total / 1000:8.1f} us/event={total / events:6.1f}")


if __name__ == "__main__":
    main()
