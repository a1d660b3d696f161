#!/usr/bin/env bash
# Durable accepts/s on Redis vs SQLite (1 KiB bodies, 64 connections, wrk), deliveries/s on
# SQLite vs Redis, and one vs two hookyard instances sharing one Redis; each phase also prints
# the CPU time per event of hookyard and of redis-server (utime+stime deltas from /proc), which
# a shared machine disturbs far less than the rates.
#
#   cargo build --release --bin hookyard && bench/load/redis_vs_sqlite.sh
#
# Env: HOOKYARD_BIN (default target/release/hookyard), DURATION (wrk, default 10s),
# APPENDFSYNC (redis, default always), DRAIN_EVENTS (deliveries phase, default 20000),
# SKIP_ACCEPTS / SKIP_DELIVERIES (skip a phase), DRAIN_STORES (default "sqlite redis1 redis2"),
# REDIS_ARGS (more redis-server options, e.g. "--rdbcompression no"),
# PIN=1 (redis-server alone on CPU 0, everything else on CPU 1: Redis with a core of its own, as
# on a separate server, and hookyard with one core for both stores),
# PERF_DIR (record redis-server with `perf record -g` during each Redis phase and print where its
# CPU goes: the top symbols, and the shares of the Lua VM, the commands, the AOF and networking).
# Needs redis-server, wrk and curl on PATH. Everything runs on loopback in a temp dir.
set -euo pipefail

BIN=${HOOKYARD_BIN:-target/release/hookyard}
DURATION=${DURATION:-10s}
APPENDFSYNC=${APPENDFSYNC:-always}
DRAIN_EVENTS=${DRAIN_EVENTS:-20000}
SECRET='whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'
work=$(mktemp -d)
pids=()
redis_cpu=()
if [ -n "${PIN:-}" ]; then
  # Children inherit the script's CPU; Redis is started on the other one.
  taskset -cp 1 $$ >/dev/null
  redis_cpu=(taskset -c 0)
fi

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP_LOG:-}" ] && tail -20 "$work/log" >&2
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_http() { # url
  for _ in $(seq 1 200); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done
  echo "timeout waiting for $1" >&2; return 1
}

start_bg() { "$@" >>"$work/log" 2>&1 & pids+=($!); }

# User+system CPU time of a process, in microseconds (0 once it is gone).
cpu_us() {
  local stat rest f
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  rest=${stat##*) }
  read -r -a f <<<"$rest"
  echo $(((f[11] + f[12]) * 1000000 / $(getconf CLK_TCK)))
}
# With REDIS_STATS=1, Redis's per-command counters (calls, µs per call; commands run inside
# scripts are counted too) and the time of each hookyard script (from the slow log, logging
# every command meanwhile) for the phase: where redis-server's time goes.
redis_stats_reset() {
  [ -z "${REDIS_STATS:-}" ] && return 0
  redis-cli -p "$REDIS" config resetstat >/dev/null
  redis-cli -p "$REDIS" config set slowlog-max-len 1000000 >/dev/null
  redis-cli -p "$REDIS" config set slowlog-log-slower-than 0 >/dev/null
  redis-cli -p "$REDIS" slowlog reset >/dev/null
}
redis_stats() { # events
  [ -z "${REDIS_STATS:-}" ] && return 0
  redis-cli -p "$REDIS" config set slowlog-log-slower-than 10000 >/dev/null
  echo "   time per script (slow log):"
  redis-cli -p "$REDIS" --json slowlog get -1 | python3 "$(dirname "$0")/redis_script_times.py" "$1"
  echo "   commands, scripts' own included (commandstats):"
  redis-cli -p "$REDIS" info commandstats | tr -d '\r' | grep -E '^cmdstat_' |
    sed -E 's/^cmdstat_([^:]*):calls=([0-9]*),usec=([0-9]*),usec_per_call=([0-9.]*).*/     \1 calls=\2 usec=\3 per_call=\4/' |
    sort -t= -k3 -n -r | head -12
}
# With PERF_DIR set, a profile of redis-server for one phase: perf_start <name> ... perf_stop.
perf_start() {
  [ -z "${PERF_DIR:-}" ] && return 0
  mkdir -p "$PERF_DIR"
  perf record -q -g -F 2000 -p "$REDIS_PID" -o "$PERF_DIR/$1.data" 2>>"$work/log" & PERF_PID=$!
  PERF_NAME=$1
  sleep 0.2
}
perf_stop() {
  [ -z "${PERF_DIR:-}" ] && return 0
  kill -INT "$PERF_PID"; wait "$PERF_PID" 2>/dev/null || true
  perf report -i "$PERF_DIR/$PERF_NAME.data" --no-children --sort symbol --stdio 2>/dev/null \
    >"$PERF_DIR/$PERF_NAME.txt" || true
  python3 "$(dirname "$0")/redis_profile.py" "$PERF_DIR/$PERF_NAME.data" "$REDIS_PID" | sed 's/^/   /'
}
# Sum of cpu_us over pids.
cpu_sum() { local t=0 p; for p in "$@"; do t=$((t + $(cpu_us "$p"))); done; echo $t; }
# "hookyard X µs, redis-server Y µs per event" from CPU deltas and an event count.
per_event() { # hookyard_us redis_us events
  python3 -c "import sys; h,r,n=map(float,sys.argv[1:]); print('   cpu per event: hookyard %.1f us, redis-server %.1f us' % (h/n, r/n))" "$@"
}

# One receiver for the whole run; accepts anything, answers 200 at once.
RX=$(free_port)
start_bg "$BIN" receive --listen "127.0.0.1:$RX"
wait_http "http://127.0.0.1:$RX/stats"

REDIS=$(free_port)
mkdir -p "$work/redis"
"${redis_cpu[@]}" redis-server --port "$REDIS" --bind 127.0.0.1 --dir "$work/redis" \
  --appendonly yes --appendfsync "$APPENDFSYNC" --save '' ${REDIS_ARGS:-} >>"$work/log" 2>&1 &
REDIS_PID=$!; pids+=($REDIS_PID)
until redis-cli -p "$REDIS" ping >/dev/null 2>&1; do sleep 0.05; done

config() { # name store-yaml concurrency target-port -> path
  local ingress admin
  ingress=$(free_port); admin=$(free_port)
  cat >"$work/$1.yaml" <<YAML
listen: 127.0.0.1:$ingress
admin_listen: 127.0.0.1:$admin
store:
$2
signing:
  secrets: ["$SECRET"]
hosts:
  default:
    max_connections: 256
    circuit_breaker: { consecutive_failures: 1000000, recovery_ms: 100 }
queues:
  default: { concurrency: $3 }
routing_rules:
  - event_type: bench.event
    mode: async
    target: http://127.0.0.1:$4/hook
    timeout_ms: 2000
    retry_matrix: [100]
YAML
  echo "$work/$1.yaml"
}
ports_of() { sed -n 's/^listen: 127.0.0.1:\([0-9]*\)$/\1/p;s/^admin_listen: 127.0.0.1:\([0-9]*\)$/\1/p' "$1"; }

head -c 1024 /dev/zero | tr '\0' 'x' >"$work/body"
cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = io.open("$work/body"):read("*a")
wrk.headers["Content-Type"] = "application/octet-stream"
done = function(summary, latency, requests)
  io.write(string.format("non-2xx: %d\n", summary.errors.status))
end
LUA

accepts() { # name store-yaml
  local cfg pid ports
  # Delivery throttled to one worker so the measurement is the accept path, not delivery.
  cfg=$(config "$1" "$2" 1 "$RX")
  mapfile -t ports < <(ports_of "$cfg")
  "$BIN" serve --config "$cfg" >>"$work/log" 2>&1 & pid=$!; pids+=($pid)
  wait_http "http://127.0.0.1:${ports[1]}/readyz"
  echo "== durable accepts/s, $1 (1 KiB bodies, 64 connections, $DURATION)"
  local h0 r0 out n
  h0=$(cpu_us "$pid"); r0=$(cpu_us "$REDIS_PID"); redis_stats_reset
  [ "$1" = sqlite ] || perf_start "accepts-$1"
  out=$(wrk -t2 -c64 -d"$DURATION" --latency -s "$work/post.lua" \
    "http://127.0.0.1:${ports[0]}/v1/events/bench.event")
  grep -E "Requests/sec|non-2xx|50%|99%" <<<"$out"
  n=$(sed -n 's/^ *\([0-9]*\) requests in .*/\1/p' <<<"$out")
  # SQLite's redis delta is the idle server's; it is printed so the two lines read alike.
  per_event $(($(cpu_us "$pid") - h0)) $(($(cpu_us "$REDIS_PID") - r0)) "$n"
  [ "$1" = sqlite ] || perf_stop
  [ "$1" = sqlite ] || redis_stats "$n"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

[ -n "${SKIP_ACCEPTS:-}" ] || accepts sqlite "  kind: sqlite
  path: $work/sqlite/hookyard.db"
[ -n "${SKIP_ACCEPTS:-}" ] || accepts redis "  kind: redis
  url: redis://127.0.0.1:$REDIS
  key_prefix: accepts"

# Deliveries: fill a dead-letter queue (the receiver on DEAD answers 400, a permanent
# failure), then replay it all at once and time how fast the instance(s) drain it.
deliveries() { # sqlite | redis <instances>
  local kind=$1 n=${2:-1} cfgs=() ports store
  case $kind in
    sqlite) store="  kind: sqlite
  path: $work/drain-sqlite/hookyard.db" ;;
    redis) store="  kind: redis
  url: redis://127.0.0.1:$REDIS
  key_prefix: drain$n" ;;
  esac
  local dead; dead=$(free_port)
  "$BIN" receive --listen "127.0.0.1:$dead" --status 400 >>"$work/log" 2>&1 & local dead_pid=$!
  wait_http "http://127.0.0.1:$dead/stats"
  local fill; fill=$(config "fill$kind$n" "$store" 64 "$dead")
  mapfile -t ports < <(ports_of "$fill")
  "$BIN" serve --config "$fill" >>"$work/log" 2>&1 & local fill_pid=$!
  wait_http "http://127.0.0.1:${ports[1]}/readyz"
  seq 1 "$DRAIN_EVENTS" | xargs -P 64 -I{} curl -fs -o /dev/null -X POST \
    --data-binary @"$work/body" "http://127.0.0.1:${ports[0]}/v1/events/bench.event"
  until [ "$(curl -fs "http://127.0.0.1:$dead/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["received"])')" -ge "$DRAIN_EVENTS" ]; do sleep 0.2; done
  # Wait for the last results to be recorded: the receiver counts a request before its answer.
  sleep 1
  kill "$fill_pid" "$dead_pid"; wait "$fill_pid" "$dead_pid" 2>/dev/null || true
  # Events keep the target they were accepted with: the healthy receiver takes over its port.
  local live=$dead
  start_bg "$BIN" receive --listen "127.0.0.1:$live"
  wait_http "http://127.0.0.1:$live/stats"

  local admins=()
  for i in $(seq 1 "$n"); do
    local cfg; cfg=$(config "drain$kind$n-$i" "$store" 64 "$RX")
    mapfile -t ports < <(ports_of "$cfg")
    RUST_LOG=warn "$BIN" serve --config "$cfg" >>"$work/log" 2>&1 & pids+=($!); cfgs+=($!)
    wait_http "http://127.0.0.1:${ports[1]}/readyz"
    admins+=("${ports[1]}")
  done
  local h0 r0 took
  h0=$(cpu_sum "${cfgs[@]}"); r0=$(cpu_us "$REDIS_PID"); redis_stats_reset
  [ "$kind" = sqlite ] || perf_start "deliveries-redis$n"
  # One long-lived poller: a curl and a Python start per poll cost a core's worth of CPU.
  took=$(python3 "$(dirname "$0")/time_drain.py" "${admins[0]}" "$live" "$DRAIN_EVENTS")
  python3 -c "print('== deliveries/s, $n instance(s) on $kind: %.0f ($DRAIN_EVENTS events in %.2f s, replay included)' % ($DRAIN_EVENTS/$took, $took))"
  per_event $(($(cpu_sum "${cfgs[@]}") - h0)) $(($(cpu_us "$REDIS_PID") - r0)) "$DRAIN_EVENTS"
  [ "$kind" = sqlite ] || perf_stop
  [ "$kind" = sqlite ] || redis_stats "$DRAIN_EVENTS"
  for p in "${cfgs[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
}

if [ -z "${SKIP_DELIVERIES:-}" ]; then
  for d in ${DRAIN_STORES:-sqlite redis1 redis2}; do
    case $d in
      sqlite) deliveries sqlite ;;
      redis*) deliveries redis "${d#redis}" ;;
    esac
  done
fi
