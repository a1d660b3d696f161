#!/usr/bin/env python3
"""Posts N async events to hookyard from 32 threads over keep-alive connections; prints status counts."""
import collections, http.client, sys, threading
N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
counts = collections.Counter(); lock = threading.Lock(); nxt = iter(range(N))
def worker():
    c = http.client.HTTPConnection("127.0.0.1", 18080)
    while True:
        with lock:
            i = next(nxt, None)
        if i is None:
            return
        c.request("POST", "/v1/events/challenge.order", body=b'{"n":%d}' % i,
                  headers={"content-type": "application/json"})
        r = c.getresponse(); r.read()
        with lock:
            counts[r.status] += 1
ts = [threading.Thread(target=worker) for _ in range(32)]
[t.start() for t in ts]; [t.join() for t in ts]
print(dict(counts))
