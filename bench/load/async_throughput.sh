#!/usr/bin/env bash
# Load measurement of the async path, in three parts:
#   (a) durable accepts/s: 1 KiB bodies, $CONNS concurrent clients, async rule whose receiver
#       is down (events stay queued); once with store fsync on (the default), once with it off;
#   (b) deliveries/s: preload $N events with the receiver down, start `hookyard receive`, time
#       until its GET /stats delivered_ok reaches the number queued (polled every 100 ms);
#   (c) resident memory with a growing backlog: enqueue for $C_DURATION s and sample RSS and
#       queue depth every $C_SAMPLE s, to show memory does not grow with the backlog.
# Writes a markdown report to bench/results/.
#
# Environment knobs (defaults in brackets):
#   CONNS [64]  WRK_THREADS [2]  A_DURATION [10]  WARMUP [2]  N [50000]  B_TIMEOUT [300]
#   C_DURATION [60]  C_SAMPLE [10]  C_FSYNC [false]  PARTS [abc]  HOOKYARD [target/release/hookyard]
#   NO_REPORT=1 to skip writing the markdown file.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

CONNS=${CONNS:-64}
WRK_THREADS=${WRK_THREADS:-2}
A_DURATION=${A_DURATION:-10}
WARMUP=${WARMUP:-2}
N=${N:-50000}
B_TIMEOUT=${B_TIMEOUT:-300}
C_DURATION=${C_DURATION:-60}
C_SAMPLE=${C_SAMPLE:-10}
C_FSYNC=${C_FSYNC:-false}
PARTS=${PARTS:-abc}
BODY_BYTES=1024

need wrk
need curl
need jq
need ss iproute2
[[ -x $HOOKYARD ]] || die "$HOOKYARD not found; run: cargo build --release"

started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
note=$(machine_note)
log "work dir $WORK"

HY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
RECV_PORT=$(free_port) # nothing listens here until part (b) starts the receiver
EVENT_URL="http://127.0.0.1:$HY_PORT/v1/events/order.created"
REPORT="$WORK/report.md"
: >"$REPORT"
say() { echo "$*" | tee -a "$REPORT"; }

json_body "$BODY_BYTES" >"$WORK/body.json"
cat >"$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.body = [[$(cat "$WORK/body.json")]]
wrk.headers["Content-Type"] = "application/json"
-- Preload mode: each thread stops after PER_THREAD answers (0 = run for the duration) and
-- leaves a file in DONE_DIR; wrk itself only exits at the end of -d, so the script
-- interrupts it once every thread is done.
local limit = tonumber(os.getenv("PER_THREAD") or "0")
local answered = 0
response = function(status, headers, body)
  answered = answered + 1
  if limit > 0 and answered == limit then
    local f = io.open(os.getenv("DONE_DIR") .. "/" .. tostring({}):gsub("[^%w]", ""), "w")
    if f then f:close() end
    wrk.thread:stop()
  end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d non2xx=%d sockerr=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
EOF

# write_config FILE DB_DIR FSYNC RECOVERY_MS
# FILE is kept out of DB_DIR, as in the shipped layout (./dispatcher-config.yaml and
# ./data/hookyard.db): the hot-reload watcher watches the config file's directory, and every
# write to a database file in it would wake the watcher (6-8% of CPU in this benchmark).
write_config() {
    mkdir -p "$(dirname "$1")"
    local breaker=""
    [[ -n $4 ]] && breaker="    circuit_breaker: { consecutive_failures: 5, recovery_ms: $4 }"
    cat >"$1" <<EOF
listen: 127.0.0.1:$HY_PORT
admin_listen: 127.0.0.1:$ADMIN_PORT
store: { kind: sqlite, path: $2/hookyard.db, fsync: $3 }
signing:
  secrets: ["$BENCH_SECRET"]
hosts:
  default:
    max_connections: 256
$breaker
queues:
  default: { concurrency: 64, max_depth: 2000000 }
routing_rules:
  - event_type: "order.created"
    mode: async
    target: http://127.0.0.1:$RECV_PORT/webhooks/orders
    # Short delays so the few events attempted while the receiver is down are retried soon
    # after it comes up (11 attempts, so none is dead-lettered during a preload).
    retry_matrix: [100, 100, 100, 100, 100, 100, 100, 100, 100, 100]
EOF
}

HY_PID=""
start_hookyard() { # CONFIG
    RUST_LOG=warn start_bg HY_PID hookyard "$HYB" serve --config "$1"
    wait_http "http://127.0.0.1:$ADMIN_PORT/readyz" 30 "$HY_PID"
    local code
    code=$(curl -s -o "$WORK/probe.out" -w '%{http_code}' --max-time 5 -X POST \
        -H 'content-type: application/json' --data-binary '{"probe":true}' "$EVENT_URL")
    [[ $code == 202 ]] || die "probe answered $code: $(cat "$WORK/probe.out")"
}
stop_hookyard() {
    kill -TERM "$HY_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$HY_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$HY_PID" 2>/dev/null || true
    wait "$HY_PID" 2>/dev/null || true
}

# Pending + in-flight events of the default queue, read from the admin /metrics (the gauges
# are refreshed from the store at scrape time).
queue_depth() {
    curl -s --max-time 30 "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk '/^hookyard_queue_depth\{/ && /queue="default"/ && /state="(ready|delayed|in_flight)"/ {s += $NF} END {printf "%d", s}'
}

# run_wrk SECONDS [extra env] -> sets R[...] from the RESULT line
declare -A R
run_wrk() {
    local secs=$1
    shift
    local out
    out=$(env "$@" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${secs}s" --timeout 10s -s "$WORK/post.lua" "$EVENT_URL")
    echo "$out" >>"$WORK/raw.txt"
    local line
    line=$(grep '^RESULT' <<<"$out") || die "wrk printed no RESULT line"
    R=()
    local kv
    for kv in ${line#RESULT }; do R[${kv%%=*}]=${kv#*=}; done
}
ms() { awk -v us="$1" 'BEGIN {printf "%.2f", us / 1000}'; }

# After a part, with hookyard stopped: how many pending events an open breaker made the workers
# claim and push back (due_at moved > 1 s past arrival), and how many attempts were made.
# Each such event cost the single SQLite writer two extra row writes (claim + defer).
store_note() {
    command -v sqlite3 >/dev/null 2>&1 || return 0
    local db=$1/hookyard.db from="events e JOIN event_payloads p ON p.rid = e.rid"
    # Schema 1 (before the payload split) kept received_at in events.
    if [[ $(sqlite3 -readonly "$db" "PRAGMA user_version" 2>/dev/null) == 1 ]]; then
        from="events e JOIN events p ON p.rid = e.rid"
    fi
    { sqlite3 -readonly "$db" "SELECT count(*), coalesce(sum(e.due_at > p.received_at + 1000), 0) FROM $from WHERE e.state = 0; SELECT count(*) FROM attempts;" 2>/dev/null || true; } |
        paste -sd'|' | awk -F'|' '{printf "%d pending events, %d of them claimed and deferred by the open breaker; %d delivery attempts recorded", $1, $2, $3}'
}

# --- (a) durable accepts/s, fsync on and off --------------------------------------------------
declare -A ACC
NOTES=()
if [[ $PARTS == *a* ]]; then
    say "## (a) durable accepts/s (receiver down, $CONNS clients, 1 KiB bodies, ${A_DURATION}s after ${WARMUP}s warm-up)"
    say ""
    say "| store fsync | accepted/s | p50 ms | p99 ms | non-2xx | socket errors | queue depth after |"
    say "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    for fsync in true false; do
        dir="$WORK/a-$fsync"
        mkdir -p "$dir"
        write_config "$dir/config/hookyard.yaml" "$dir" "$fsync" ""
        start_hookyard "$dir/config/hookyard.yaml"
        log "(a) fsync=$fsync: warm-up ${WARMUP}s"
        run_wrk "$WARMUP"
        log "(a) fsync=$fsync: measuring ${A_DURATION}s"
        run_wrk "$A_DURATION"
        check_alive hookyard "$HY_PID"
        ok=$((R[requests] - R[non2xx]))
        ACC[$fsync]=$(awk -v n="$ok" -v us="${R[duration_us]}" 'BEGIN {printf "%.0f", n / (us / 1e6)}')
        depth=$(queue_depth)
        say "| $fsync | ${ACC[$fsync]} | $(ms "${R[p50_us]}") | $(ms "${R[p99_us]}") | ${R[non2xx]} | ${R[sockerr]} | $depth |"
        stop_hookyard
        NOTES+=("fsync $fsync: $(store_note "$dir")")
    done
    say ""
    for n in "${NOTES[@]}"; do say "- store after the run, $n"; done
    say ""
    say "fsync off / fsync on: **$(awk -v a="${ACC[false]}" -v b="${ACC[true]}" 'BEGIN {printf "%.2f", a / b}')x**"
    say ""
fi

# --- (b) deliveries/s -------------------------------------------------------------------------
if [[ $PARTS == *b* ]]; then
    say "## (b) deliveries/s: $N events preloaded with the receiver down, then the receiver starts"
    say ""
    dir="$WORK/b"
    mkdir -p "$dir"
    # A short breaker recovery (1 s): this measures delivery throughput, not how long an open
    # breaker waits before its first probe (30 s by default). fsync stays on (the default).
    write_config "$dir/config/hookyard.yaml" "$dir" true 1000
    start_hookyard "$dir/config/hookyard.yaml"
    per_thread=$(((N + WRK_THREADS - 1) / WRK_THREADS))
    log "(b) preloading $N events"
    mkdir -p "$WORK/done"
    t0=$(date +%s.%N)
    PER_THREAD=$per_thread DONE_DIR=$WORK/done wrk -t"$WRK_THREADS" -c"$CONNS" -d"${B_TIMEOUT}s" \
        --timeout 10s -s "$WORK/post.lua" "$EVENT_URL" >"$WORK/b-wrk.txt" 2>&1 &
    WRK_PID=$!
    PIDS+=("$WRK_PID")
    while kill -0 "$WRK_PID" 2>/dev/null && (($(ls "$WORK/done" | wc -l) < WRK_THREADS)); do
        sleep 0.1
    done
    t1=$(date +%s.%N)
    kill -INT "$WRK_PID" 2>/dev/null || true
    wait "$WRK_PID" || true
    cat "$WORK/b-wrk.txt" >>"$WORK/raw.txt"
    line=$(grep '^RESULT' "$WORK/b-wrk.txt") || die "preload wrk printed no RESULT line"
    R=()
    for kv in ${line#RESULT }; do R[${kv%%=*}]=${kv#*=}; done
    check_alive hookyard "$HY_PID"
    queued=$(queue_depth)
    preload_rate=$(awk -v n="$((R[requests] - R[non2xx]))" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", n / (b - a)}')
    log "(b) $queued events queued (accepted at $preload_rate/s); starting the receiver"
    RUST_LOG=warn start_bg RECV_PID receiver "$HYB" receive --listen "127.0.0.1:$RECV_PORT" --secret "$BENCH_SECRET"
    wait_http "http://127.0.0.1:$RECV_PORT/stats" 15 "$RECV_PID"
    t_start=$(date +%s.%N)
    t_first=""
    n_first=0
    delivered=0
    deadline=$((SECONDS + B_TIMEOUT))
    # The poll must cost little next to what it measures: a jq process every 100 ms took 12%
    # of the two cores, so the count is read with a bash regex and the time from bash itself.
    while ((SECONDS < deadline)); do
        stats_json=$(curl -s --max-time 2 "http://127.0.0.1:$RECV_PORT/stats") || stats_json=""
        delivered=0
        [[ $stats_json =~ \"delivered_ok\":([0-9]+) ]] && delivered=${BASH_REMATCH[1]}
        now=$EPOCHREALTIME
        if [[ -z $t_first && $delivered -gt 0 ]]; then
            t_first=$now
            n_first=$delivered
        fi
        ((delivered >= queued)) && break
        sleep 0.1
    done
    t_done=$(date +%s.%N)
    check_alive hookyard "$HY_PID"
    stats=$(curl -s --max-time 2 "http://127.0.0.1:$RECV_PORT/stats")
    ((delivered >= queued)) || log "(b) timed out after ${B_TIMEOUT}s with $delivered of $queued delivered"
    total_s=$(awk -v a="$t_start" -v b="$t_done" 'BEGIN {printf "%.2f", b - a}')
    overall=$(awk -v n="$delivered" -v s="$total_s" 'BEGIN {printf "%.0f", n / s}')
    steady=$(awk -v n="$((delivered - n_first))" -v a="${t_first:-$t_start}" -v b="$t_done" 'BEGIN {printf "%.0f", (b > a) ? n / (b - a) : 0}')
    wait_first=$(awk -v a="$t_start" -v b="${t_first:-$t_start}" 'BEGIN {printf "%.2f", b - a}')
    say "| measure | value |"
    say "| --- | ---: |"
    say "| events queued (store depth before the receiver starts) | $queued |"
    say "| preload accept rate (fsync on, breaker open) | $preload_rate/s |"
    say "| delivered_ok at the end | $delivered |"
    say "| time from receiver start to all delivered | ${total_s} s |"
    say "| of which waiting for the first delivery (breaker probe) | ${wait_first} s |"
    say "| **deliveries/s, overall** | **$overall** |"
    say "| deliveries/s, from first delivery on | $steady |"
    say "| receiver: invalid_signature / duplicates_after_success / max_concurrent | $(jq -r '"\(.invalid_signature) / \(.duplicates_after_success) / \(.max_concurrent)"' <<<"$stats") |"
    say ""
    stop_hookyard
    kill -TERM "$RECV_PID" 2>/dev/null || true
fi

# --- (c) RSS with a large backlog -------------------------------------------------------------
if [[ $PARTS == *c* ]]; then
    say "## (c) resident memory while the backlog grows (receiver down, fsync $C_FSYNC, ${C_DURATION}s of load)"
    say ""
    dir="$WORK/c"
    mkdir -p "$dir"
    write_config "$dir/config/hookyard.yaml" "$dir" "$C_FSYNC" ""
    start_hookyard "$dir/config/hookyard.yaml"
    say "| t (s) | queued events | RSS MiB | store file MiB |"
    say "| ---: | ---: | ---: | ---: |"
    sample() {
        local t=$1 depth rss db
        depth=$(queue_depth)
        rss=$(rss_kib "$HY_PID")
        db=$(du -cm "$dir"/hookyard.db* 2>/dev/null | awk 'END {print $1}')
        say "| $t | $depth | $(awk -v k="$rss" 'BEGIN {printf "%.1f", k / 1024}') | $db |"
    }
    sample 0
    wrk -t"$WRK_THREADS" -c"$CONNS" -d"${C_DURATION}s" --timeout 10s -s "$WORK/post.lua" "$EVENT_URL" >"$WORK/c-wrk.txt" 2>&1 &
    WRK_PID=$!
    PIDS+=("$WRK_PID")
    c_start=$SECONDS
    while kill -0 "$WRK_PID" 2>/dev/null; do
        sleep "$C_SAMPLE"
        kill -0 "$WRK_PID" 2>/dev/null || break
        sample $((SECONDS - c_start))
    done
    wait "$WRK_PID" || true
    check_alive hookyard "$HY_PID"
    sample "$((SECONDS - c_start)) (load over)"
    sleep 5
    sample "$((SECONDS - c_start)) (idle)"
    hwm=$(awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$HY_PID/status")
    line=$(grep '^RESULT' "$WORK/c-wrk.txt" || true)
    cat "$WORK/c-wrk.txt" >>"$WORK/raw.txt"
    say ""
    say "Peak RSS (VmHWM): $hwm MiB. wrk: ${line#RESULT }"
    say ""
    stop_hookyard
    say "Store after the run: $(store_note "$dir")."
    say ""
fi

cat "$REPORT" >&2
if [[ -z ${NO_REPORT:-} ]]; then
    mkdir -p "$RESULTS_DIR"
    out="$RESULTS_DIR/async_throughput-$(date -u +%Y%m%dT%H%M%SZ).md"
    {
        echo "# Async path: durable accepts, deliveries, memory"
        echo
        echo "- date: $started_at"
        echo "- command: \`CONNS=$CONNS WRK_THREADS=$WRK_THREADS A_DURATION=$A_DURATION WARMUP=$WARMUP N=$N C_DURATION=$C_DURATION C_FSYNC=$C_FSYNC PARTS=$PARTS bench/load/async_throughput.sh\`"
        echo "$note"
        echo "- load: $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2) -t$WRK_THREADS -c$CONNS, POST of a $BODY_BYTES-byte JSON body to an async rule; loopback; everything shares all cores"
        echo "- queue: concurrency 64, max_depth 2000000; SQLite store on $(df -T "$WORK" | awk 'NR==2 {print $2}') ($WORK)"
        echo
        cat "$REPORT"
        echo "<details><summary>raw wrk output</summary>"
        echo
        echo '```'
        grep -v '^$' "$WORK/raw.txt" || true
        echo '```'
        echo
        echo "</details>"
    } >"$out"
    log "report written to $out"
fi
