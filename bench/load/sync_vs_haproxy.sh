#!/usr/bin/env bash
# Load measurement of the sync hop: the same 1 KiB JSON POST sent, in one run,
#   1. directly to a fast loopback upstream,
#   2. through HAProxy (plain http mode, keep-alive to the backend, http-reuse always),
#   3. through a hookyard sync rule (pooled, signed, deadline 1500 ms),
#   4. through examples/bare_proxy, if it is built: the same tokio + hyper stack as hookyard doing
#      nothing but forwarding, which splits hookyard's gap to HAProxy into the stack's share and
#      the share of hookyard's own work (cargo build --release --example bare_proxy),
# each at $CONNS connections for $DURATION s after a $WARMUP s warm-up, with wrk.
# Prints throughput, p50, p99 and the ratios hookyard/HAProxy and hookyard/direct, and writes
# a markdown report to bench/results/.
#
# Environment knobs (defaults in brackets):
#   CONNS [64]  DURATION [10]  WARMUP [2]  WRK_THREADS [2]  ROUNDS [1]
#   HAPROXY_NBTHREAD [2]  UPSTREAM [haproxy|receive]  HOOKYARD [target/release/hookyard]
#   BARE_PROXY [target/release/examples/bare_proxy; a path that does not exist skips it]
#   NO_REPORT=1 to skip writing the markdown file.
# ROUNDS > 1 repeats the measurements in turn, every other round in reverse order (direct,
# haproxy, hookyard, bare, then bare, hookyard, haproxy, direct, ...), and takes the median of
# each, which evens out load drift from other work on the machine; it also reports the median
# of the per-round hookyard/HAProxy ratios.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

CONNS=${CONNS:-64}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
WRK_THREADS=${WRK_THREADS:-2}
ROUNDS=${ROUNDS:-1}
HAPROXY_NBTHREAD=${HAPROXY_NBTHREAD:-2}
# The default upstream is a C one that does the same work for every request, whichever headers
# it carries. `hookyard receive` keeps a set of every webhook-id it answered (duplicate
# counting), so it does more per request when hookyard is in front (HAProxy's requests carry no
# webhook-id) and pauses while that set grows; UPSTREAM=receive measures that on purpose.
UPSTREAM=${UPSTREAM:-haproxy}
BODY_BYTES=1024

need wrk
need haproxy
need curl
need ss iproute2
[[ -x $HOOKYARD ]] || die "$HOOKYARD not found; run: cargo build --release"
BARE_PROXY=${BARE_PROXY:-$ROOT/target/release/examples/bare_proxy}
PATHS="direct haproxy hookyard"
if [[ -x $BARE_PROXY ]]; then
    PATHS+=" bare"
else
    log "$BARE_PROXY not found: measuring without the bare-stack reference (cargo build --release --example bare_proxy)"
fi

started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
note=$(machine_note)
log "work dir $WORK"

UP_PORT=$(free_port)
HAP_PORT=$(free_port)
HY_PORT=$(free_port)
HY_ADMIN_PORT=$(free_port)
BARE_PORT=$(free_port)
STATS_PORT=$(free_port)

# --- upstream ---------------------------------------------------------------------------------
case $UPSTREAM in
receive)
    # hookyard's own test receiver: answers 200 {"ok":true}; no --secret, so nothing is verified.
    RUST_LOG=warn start_bg UP_PID upstream "$HYB" receive --listen "127.0.0.1:$UP_PORT"
    ;;
haproxy)
    # A tiny, fast C upstream: HAProxy answering every request itself.
    cat >"$WORK/upstream.cfg" <<EOF
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
EOF
    start_bg UP_PID upstream haproxy -db -f "$WORK/upstream.cfg"
    ;;
*) die "UPSTREAM must be receive or haproxy" ;;
esac
wait_http "http://127.0.0.1:$UP_PORT/" 15 "$UP_PID"

# --- HAProxy ----------------------------------------------------------------------------------
# nbthread $HAPROXY_NBTHREAD: one thread per core like hookyard's runtime; see bench/README.md.
cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread $HAPROXY_NBTHREAD
  maxconn 4096
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 30s
frontend fe
  bind 127.0.0.1:$HAP_PORT
  default_backend be
backend be
  server upstream 127.0.0.1:$UP_PORT maxconn 256
EOF
start_bg HAP_PID haproxy haproxy -db -f "$WORK/haproxy.cfg"
wait_http "http://127.0.0.1:$HAP_PORT/" 15 "$HAP_PID"

# --- hookyard ---------------------------------------------------------------------------------
cat >"$WORK/hookyard.yaml" <<EOF
listen: 127.0.0.1:$HY_PORT
admin_listen: 127.0.0.1:$HY_ADMIN_PORT
store: { kind: sqlite, path: $WORK/hookyard.db }
signing:
  secrets: ["$BENCH_SECRET"]
hosts:
  default:
    max_connections: 256
    shed_at: 1.0
    connect_timeout_ms: 500
routing_rules:
  # No fallback: a failed sync call shows up as a non-2xx in the table instead of being
  # quietly queued, and the measurement stays a pure sync hop (no store writes).
  - event_type: "payment.authorize"
    mode: sync
    target: http://127.0.0.1:$UP_PORT/webhooks/payments
    timeout_ms: 1500
    fallback: none
EOF
RUST_LOG=warn start_bg HY_PID hookyard "$HYB" serve --config "$WORK/hookyard.yaml"
wait_http "http://127.0.0.1:$HY_ADMIN_PORT/readyz" 20 "$HY_PID"
BARE_PID=""
if [[ $PATHS == *bare* ]]; then
    start_bg BARE_PID bare_proxy "$BARE_PROXY" "127.0.0.1:$BARE_PORT" "127.0.0.1:$UP_PORT"
    wait_http "http://127.0.0.1:$BARE_PORT/" 15 "$BARE_PID"
fi
# One request each to fail fast on a broken path instead of measuring errors.
probe() {
    local code
    code=$(curl -s -o "$WORK/probe.out" -w '%{http_code}' --max-time 3 -X POST \
        -H 'content-type: application/json' --data-binary '{"probe":true}' "$1")
    [[ $code == 200 ]] || die "probe of $1 answered $code: $(cat "$WORK/probe.out")"
}

# --- load -------------------------------------------------------------------------------------
json_body "$BODY_BYTES" >"$WORK/body.json"
[[ $(wc -c <"$WORK/body.json") == "$BODY_BYTES" ]] || die "body is not $BODY_BYTES bytes"
cat >"$WORK/post.lua" <<EOF
wrk.method = "POST"
wrk.body = [[$(cat "$WORK/body.json")]]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d non2xx=%d sockerr=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
EOF

declare -A URL=(
    [direct]="http://127.0.0.1:$UP_PORT/webhooks/payments"
    [haproxy]="http://127.0.0.1:$HAP_PORT/webhooks/payments"
    [hookyard]="http://127.0.0.1:$HY_PORT/v1/events/payment.authorize"
    [bare]="http://127.0.0.1:$BARE_PORT/webhooks/payments"
)
declare -A PROXY_PID=([direct]="" [haproxy]=$HAP_PID [hookyard]=$HY_PID [bare]=$BARE_PID)
for path in $PATHS; do probe "${URL[$path]}"; done
HY_RSS0=$(rss_kib "$HY_PID")
HY_REQS=0

RAW="$WORK/raw.txt"
: >"$RAW"
declare -A RPS P50 P99 ERRS PCPU UCPU
declare -A ROUND_RPS ROUND_P99
for round in $(seq "$ROUNDS"); do
    # Every other round runs in reverse order, so a load drift during a round does not always
    # favour the same path; HAProxy and hookyard stay next to each other either way.
    order=$PATHS
    ((round % 2 == 0)) && order=$(tr ' ' '\n' <<<"$PATHS" | tac | tr '\n' ' ')
    for path in $order; do
        url=${URL[$path]}
        log "round $round/$ROUNDS $path: warm-up ${WARMUP}s"
        wrk -t"$WRK_THREADS" -c"$CONNS" -d"${WARMUP}s" --timeout 5s -s "$WORK/post.lua" "$url" >/dev/null
        log "round $round/$ROUNDS $path: measuring ${DURATION}s at $CONNS connections"
        pp=${PROXY_PID[$path]}
        up0=$(cpu_ms "$UP_PID")
        pp0=0; [[ -n $pp ]] && pp0=$(cpu_ms "$pp")
        out=$(wrk -t"$WRK_THREADS" -c"$CONNS" -d"${DURATION}s" --timeout 5s --latency -s "$WORK/post.lua" "$url")
        up1=$(cpu_ms "$UP_PID")
        pp1=0; [[ -n $pp ]] && pp1=$(cpu_ms "$pp")
        check_alive upstream "$UP_PID"
        check_alive haproxy "$HAP_PID"
        check_alive hookyard "$HY_PID"
        [[ -n $BARE_PID ]] && check_alive bare_proxy "$BARE_PID"
        { echo "### round $round: $path ($url)"; echo "$out"; echo; } >>"$RAW"
        line=$(grep '^RESULT' <<<"$out") || die "wrk printed no RESULT line for $path"
        declare -A r=()
        for kv in ${line#RESULT }; do r[${kv%%=*}]=${kv#*=}; done
        rps=$(awk -v n="${r[requests]}" -v us="${r[duration_us]}" 'BEGIN {printf "%.0f", n / (us / 1e6)}')
        RPS[$path]+="$rps "
        ROUND_RPS[$round.$path]=$rps
        ROUND_P99[$round.$path]=${r[p99_us]}
        P50[$path]+="${r[p50_us]} "
        P99[$path]+="${r[p99_us]} "
        ERRS[$path]=$(( ${ERRS[$path]:-0} + r[non2xx] + r[sockerr] ))
        [[ $path == hookyard ]] && HY_REQS=$((HY_REQS + r[requests]))
        # CPU milliseconds per 1000 requests, of the proxy and of the upstream.
        PCPU[$path]+="$(awk -v c=$((pp1 - pp0)) -v n="${r[requests]}" 'BEGIN {printf "%.0f", c * 1000 / n}') "
        UCPU[$path]+="$(awk -v c=$((up1 - up0)) -v n="${r[requests]}" 'BEGIN {printf "%.0f", c * 1000 / n}') "
        log "  $path: $rps req/s, p50 ${r[p50_us]} us, p99 ${r[p99_us]} us, errors $((r[non2xx] + r[sockerr]))"
    done
done

median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : int((a[NR/2] + a[NR/2+1]) / 2)}'; }
ms() { awk -v us="$1" 'BEGIN {printf "%.2f", us / 1000}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }

# The ratio within each round, where both measurements are a few seconds apart: less exposed
# to load that other work puts on the shared cores over the whole run than the ratio of medians.
PAIRED_RPS="" PAIRED_P99=""
for round in $(seq "$ROUNDS"); do
    PAIRED_RPS+="$(ratio "${ROUND_RPS[$round.hookyard]}" "${ROUND_RPS[$round.haproxy]}") "
    PAIRED_P99+="$(ratio "${ROUND_P99[$round.hookyard]}" "${ROUND_P99[$round.haproxy]}") "
done
median_ratio() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{a[NR]=$1} END {printf "%.2f", (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

declare -A M50 M99 MRPS MP MU
for path in $PATHS; do
    MRPS[$path]=$(median "${RPS[$path]}")
    M50[$path]=$(median "${P50[$path]}")
    M99[$path]=$(median "${P99[$path]}")
    MP[$path]=$(median "${PCPU[$path]}")
    MU[$path]=$(median "${UCPU[$path]}")
done

table=$(
    echo "| path | req/s | p50 ms | p99 ms | errors | proxy CPU ms / 1k req | upstream CPU ms / 1k req |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    for path in $PATHS; do
        pc=${MP[$path]}; [[ $path == direct ]] && pc="-"
        echo "| $path | ${MRPS[$path]} | $(ms "${M50[$path]}") | $(ms "${M99[$path]}") | ${ERRS[$path]} | $pc | ${MU[$path]} |"
    done
    echo
    echo "| ratio | value | target |"
    echo "| --- | ---: | --- |"
    echo "| HAProxy / direct throughput | $(ratio "${MRPS[haproxy]}" "${MRPS[direct]}") | (issue: about 0.45) |"
    echo "| hookyard / direct throughput | $(ratio "${MRPS[hookyard]}" "${MRPS[direct]}") | |"
    echo "| **hookyard / HAProxy throughput** | **$(ratio "${MRPS[hookyard]}" "${MRPS[haproxy]}")** | >= 0.80 |"
    echo "| **hookyard / HAProxy p99** | **$(ratio "${M99[hookyard]}" "${M99[haproxy]}")** | <= 1.5 |"
    echo "| hookyard / direct p99 | $(ratio "${M99[hookyard]}" "${M99[direct]}") | |"
    echo "| hookyard / HAProxy throughput, median of per-round ratios ($(echo $PAIRED_RPS | tr ' ' '/')) | $(median_ratio "$PAIRED_RPS") | |"
    echo "| hookyard / HAProxy p99, median of per-round ratios ($(echo $PAIRED_P99 | tr ' ' '/')) | $(median_ratio "$PAIRED_P99") | |"
    if [[ $PATHS == *bare* ]]; then
        echo "| bare stack / HAProxy throughput (the stack's share of the gap) | $(ratio "${MRPS[bare]}" "${MRPS[haproxy]}") | |"
        echo "| hookyard / bare stack throughput (hookyard's own work) | $(ratio "${MRPS[hookyard]}" "${MRPS[bare]}") | |"
        echo "| hookyard / bare stack proxy CPU per request | $(ratio "${MP[hookyard]}" "${MP[bare]}") | |"
    fi
)
HY_RSS1=$(rss_kib "$HY_PID")
rss_note="hookyard RSS: $((HY_RSS0 / 1024)) MiB before the load, $((HY_RSS1 / 1024)) MiB after ~$HY_REQS measured requests (plus warm-ups), with no /metrics scrape in between."
verdict="MEETS"
awk -v t="$(ratio "${MRPS[hookyard]}" "${MRPS[haproxy]}")" -v p="$(ratio "${M99[hookyard]}" "${M99[haproxy]}")" \
    'BEGIN {exit !(t >= 0.80 && p <= 1.5)}' || verdict="MISSES"

echo
echo "$table"
echo
echo "hookyard $verdict the target (>= 80% of HAProxy throughput, p99 <= 1.5x HAProxy)."
echo "$rss_note"

if [[ -z ${NO_REPORT:-} ]]; then
    mkdir -p "$RESULTS_DIR"
    report="$RESULTS_DIR/sync_vs_haproxy-$(date -u +%Y%m%dT%H%M%SZ).md"
    {
        echo "# Sync hop: direct vs HAProxy vs hookyard${BARE_PID:+ vs the bare stack}"
        echo
        echo "- date: $started_at"
        echo "- command: \`CONNS=$CONNS DURATION=$DURATION WARMUP=$WARMUP WRK_THREADS=$WRK_THREADS ROUNDS=$ROUNDS HAPROXY_NBTHREAD=$HAPROXY_NBTHREAD UPSTREAM=$UPSTREAM bench/load/sync_vs_haproxy.sh\`"
        echo "$note"
        echo "- $(haproxy -v | head -1 | cut -d' ' -f1-3); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2); upstream: $UPSTREAM"
        echo "- load: wrk -t$WRK_THREADS -c$CONNS, ${WARMUP}s warm-up then ${DURATION}s, POST of a $BODY_BYTES-byte JSON body; loopback; wrk, proxy and upstream share all cores"
        echo "- medians over $ROUNDS round(s); latency is wrk's (closed loop, 64 in flight)"
        echo
        echo "$table"
        echo
        echo "Verdict: hookyard $verdict the target."
        echo
        echo "$rss_note"
        echo
        echo "<details><summary>raw wrk output</summary>"
        echo
        echo '```'
        cat "$RAW"
        echo '```'
        echo
        echo "</details>"
    } >"$report"
    log "report written to $report"
fi
