#!/usr/bin/env python3
"""Hostile clients against a running `hookyard serve` on 127.0.0.1:8080, as in the edge tests
but against a real process you started yourself (for example under `prlimit --nofile=256:256`).

  bench/load/slow_clients.py stall 300 [PID]    N clients send headers and part of a body, then
                                                stall; a real request is then timed (retried on
                                                a refused or closed connection, as HTTP clients do)
  bench/load/slow_clients.py bodies 200 PID     N clients each declare a 2 MB body, send 1.9 MB of
                                                it and stall; prints the answers and hookyard's
                                                peak RSS (VmHWM) before and after

The event type posted is `user.x`: route it (the shipped config's `user.*` rule does).
"""
import http.client
import socket
import sys
import threading
import time

ADDR = ("127.0.0.1", 8080)
HEAD = b"POST /v1/events/user.x HTTP/1.1\r\nhost: hookyard\r\ncontent-length: %d\r\n\r\n"


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return -1


def stall(n, pid):
    held = []
    for _ in range(n):
        try:
            s = socket.create_connection(ADDR, timeout=2)
            s.sendall(HEAD % 1000 + b'{"partial":')
            held.append(s)
        except OSError:
            pass
    started, status = time.time(), None
    while time.time() - started < 60:
        try:
            c = http.client.HTTPConnection(*ADDR, timeout=60)
            c.request("POST", "/v1/events/user.x", body=b"{}")
            status = c.getresponse().status
            break
        except OSError:
            time.sleep(0.05)
    print(f"{n} stalled connections ({len(held)} connected): real request {status} "
          f"after {time.time() - started:.2f} s")
    if pid:
        print(f"hookyard peak RSS {peak_rss_mib(pid)} MiB")


def bodies(n, pid):
    before = peak_rss_mib(pid)
    answers, lock, held = {}, threading.Lock(), []

    def client():
        s = socket.create_connection(ADDR)
        held.append(s)
        s.sendall(HEAD % 2_000_000)
        chunk, sent = b"x" * 65536, 0
        s.settimeout(5)
        try:
            while sent < 1_900_000:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        try:
            s.settimeout(1)
            answer = s.recv(64).split(b" ")[1].decode()
        except (OSError, IndexError):
            answer = "stalled"
        with lock:
            answers[answer] = answers.get(answer, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{n} clients x 2 MB: answers {answers}; peak RSS {before} -> {peak_rss_mib(pid)} MiB")


if __name__ == "__main__":
    mode, n = sys.argv[1], int(sys.argv[2])
    pid = int(sys.argv[3]) if len(sys.argv) > 3 else None
    {"stall": stall, "bodies": bodies}[mode](n, pid)
