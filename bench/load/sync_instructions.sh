#!/usr/bin/env bash
# Instructions per sync request, counted by callgrind: a figure that does not move with the
# machine's load, for comparing two builds of hookyard on a shared machine. For each binary
# given (default: target/release/hookyard), runs it under callgrind with instrumentation off, warms it
# up, then counts user-space instructions over a fixed wrk load of 1 KiB POSTs through a sync
# rule to a HAProxy upstream that answers every request itself, and prints instructions per
# request. SHA-256 runs in software under valgrind (it hides SHA-NI), so the count includes it.
#   bench/load/sync_instructions.sh before/hookyard target/release/hookyard
# Knobs: CONNS [16]  DURATION [8] (seconds of wrk load while counting)
#   MODE [sync]: `async` routes the same POSTs through an async rule to the same upstream, so
#   the count covers the whole async path (accept, durable enqueue, claim, delivery, result)
#   per event; the queue keeps up under callgrind, so accepts and deliveries match.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

CONNS=${CONNS:-16}
DURATION=${DURATION:-8}
MODE=${MODE:-sync}
[[ $MODE == sync || $MODE == async ]] || die "MODE is sync or async"
need valgrind
need wrk
need haproxy
(($# > 0)) || set -- "$HOOKYARD"

UP_PORT=$(free_port)
cat >"$WORK/upstream.cfg" <<CFG
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
frontend upstream
  bind 127.0.0.1:$UP_PORT
  http-request return status 200 content-type application/json string '{"ok":true}'
CFG
start_bg UP_PID upstream haproxy -db -f "$WORK/upstream.cfg"
wait_http "http://127.0.0.1:$UP_PORT/" 15 "$UP_PID"

json_body 1024 >"$WORK/body.json"
cat >"$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.body = [[$(cat "$WORK/body.json")]]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format("RESULT requests=%d non2xx=%d\n", summary.requests, summary.errors.status))
end
LUA

for binary in "$@"; do
    [[ -x $binary ]] || die "$binary is not an executable"
    HY_PORT=$(free_port)
    HY_ADMIN_PORT=$(free_port)
    rm -f "$WORK"/hookyard.db*
    cat >"$WORK/hookyard.yaml" <<CFG
listen: 127.0.0.1:$HY_PORT
admin_listen: 127.0.0.1:$HY_ADMIN_PORT
store: { kind: sqlite, path: $WORK/hookyard.db }
signing:
  secrets: ["$BENCH_SECRET"]
ingress: { threads: 1 }
hosts:
  default: { max_connections: 256, shed_at: 1.0 }
routing_rules:
  - event_type: "payment.authorize"
    mode: $MODE
    target: http://127.0.0.1:$UP_PORT/webhooks/payments
    timeout_ms: 5000
$([[ $MODE == sync ]] && echo "    fallback: none")
CFG
    out="$WORK/callgrind.out"
    rm -f "$out"*
    RUST_LOG=warn start_bg HY_PID hookyard valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file="$out" "$binary" serve --config "$WORK/hookyard.yaml"
    wait_http "http://127.0.0.1:$HY_ADMIN_PORT/readyz" 120 "$HY_PID"
    url="http://127.0.0.1:$HY_PORT/v1/events/payment.authorize"
    wrk -t1 -c"$CONNS" -d3s --timeout 10s -s "$WORK/post.lua" "$url" >/dev/null
    callgrind_control -i on "$HY_PID" >/dev/null
    result=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --timeout 10s -s "$WORK/post.lua" "$url" | grep '^RESULT')
    callgrind_control -i off "$HY_PID" >/dev/null
    kill -TERM "$HY_PID"
    wait "$HY_PID" 2>/dev/null || true
    requests=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$result")
    non2xx=$(sed -E 's/.*non2xx=([0-9]+).*/\1/' <<<"$result")
    ((non2xx == 0)) || die "$binary answered $non2xx non-2xx"
    total=$(cat "$out"* | awk '/^summary:/ {s += $2} /^totals:/ {t += $2} END {print (s > 0 ? s : t)}')
    printf '%s\t%s\t%d requests\t%d instructions per request\n' "$binary" "$MODE" "$requests" $((total / requests))
done
