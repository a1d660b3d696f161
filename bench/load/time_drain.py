#!/usr/bin/env python3
"""Times a drain: replays the whole DLQ through an admin API, then waits until a receiver
counts `want` successful deliveries, and prints the seconds between the two.

Usage: time_drain.py <admin_port> <receiver_port> <want>

One process that keeps its connection open and polls every 10 ms. The shell loop it replaces
started curl and a Python interpreter per poll (about 130 ms of CPU each on the 2-core bench
machine), so the measuring took most of a core away from what it measured.
"""

import http.client
import json
import sys
import time

# A drain that stalls (a store down, a bug) fails the run instead of hanging it.
DEADLINE_S = 600


def main() -> None:
    admin, receiver, want = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    admin_conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    stats_conn = http.client.HTTPConnection("127.0.0.1", receiver, timeout=10)
    start = time.monotonic()
    admin_conn.request("POST", "/v1/dlq/replay", body=b'{"all":true}',
                       headers={"content-type": "application/json"})
    reply = admin_conn.getresponse()
    reply.read()
    if reply.status >= 300:
        sys.exit(f"replay answered {reply.status}")
    while True:
        stats_conn.request("GET", "/stats")
        delivered = json.loads(stats_conn.getresponse().read())["delivered_ok"]
        if delivered >= want:
            break
        if time.monotonic() - start > DEADLINE_S:
            sys.exit(f"only {delivered} of {want} delivered after {DEADLINE_S} s")
        time.sleep(0.01)
    print(f"{time.monotonic() - start:.3f}")


if __name__ == "__main__":
    main()
