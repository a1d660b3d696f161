#!/usr/bin/env bash
# Sync throughput with and without a config reload every second, in one run.
#
#   cargo build --release && bench/load/reload_under_load.sh
#
# Env: HOOKYARD (default target/release/hookyard), DURATION (seconds per phase, default 8),
# ROUNDS (default 2). Loopback only; everything started here is stopped on exit.
set -euo pipefail
HOOKYARD=${HOOKYARD:-target/release/hookyard}
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-2}
[[ -x $HOOKYARD ]] || { echo "$HOOKYARD not found; run: cargo build --release" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(free_port); in=$(free_port); adm=$(free_port)
cat > "$work/cfg.yaml" <<YAML
listen: 127.0.0.1:$in
admin_listen: 127.0.0.1:$adm
store: { path: $work/db }
signing: { secrets: ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"] }
hosts: { default: { max_connections: 256, shed_at: 1.0 } }
routing_rules:
  - event_type: pay
    mode: sync
    target: http://127.0.0.1:$up/p
    timeout_ms: 1500
YAML
printf 'wrk.method="POST"\nwrk.body=string.rep("a",1024)\nwrk.headers["Content-Type"]="application/json"\n' > "$work/post.lua"

RUST_LOG=warn "$HOOKYARD" receive --listen "127.0.0.1:$up" > "$work/rx.log" 2>&1 & pids+=($!)
RUST_LOG=warn "$HOOKYARD" serve --config "$work/cfg.yaml" > "$work/hy.log" 2>&1 & pids+=($!)
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$adm/healthz" >/dev/null && break; sleep 0.1; done
url="http://127.0.0.1:$in/v1/events/pay"
wrk -t2 -c64 -d2s -s "$work/post.lua" "$url" > /dev/null

rps() { wrk -t2 -c64 -d"${DURATION}s" -s "$work/post.lua" "$url" | awk '/Requests\/sec/ {print $2} /Non-2xx/ {print "NON2XX " $0 > "/dev/stderr"}'; }
echo "| round | no reloads req/s | reload every 1 s req/s | ratio |"
echo "| ---: | ---: | ---: | ---: |"
for r in $(seq "$ROUNDS"); do
  quiet=$(rps)
  ( for i in $(seq "$DURATION"); do sleep 1; sed -i "s/timeout_ms: 1[0-9]*/timeout_ms: 15$((i % 10))0/" "$work/cfg.yaml"; done ) &
  busy=$(rps); wait $!
  echo "| $r | $quiet | $busy | $(python3 -c "print(f'{$busy/$quiet:.3f}')") |"
done
echo
curl -s "http://127.0.0.1:$adm/metrics" | grep '^hookyard_config_reload_total'
