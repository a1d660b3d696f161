# Shared helpers of the load scripts. Sourced, not run.
# Everything binds 127.0.0.1; every process started is recorded in PIDS and stopped by cleanup.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HOOKYARD=${HOOKYARD:-$ROOT/target/release/hookyard}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/bench/results}
# Fixed development-style secret: the benches measure signing cost, not secrecy.
BENCH_SECRET=${BENCH_SECRET:-whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}

PIDS=()
USED_PORTS=" "
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hybench.XXXXXX")
# Processes are started through a neutrally named link: on a shared machine another user's
# `pkill -f 'hookyard receive'` would otherwise stop this script's upstream mid-measurement
# (seen while writing these scripts). `check_alive` still catches any other early exit.
mkdir -p "$WORK/bin"
ln -s "$HOOKYARD" "$WORK/bin/hyb"
HYB=$WORK/bin/hyb

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # Give them a moment to exit cleanly, then make sure.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        local alive=0
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [[ $alive == 0 ]] && break
        sleep 0.3
    done
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    [[ -n ${KEEP_WORK:-} ]] && log "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need() {
    command -v "$1" >/dev/null 2>&1 || die "$1 is not installed (${2:-apt-get install -y $1})"
}

# A loopback port no socket uses and this script has not handed out yet, below the kernel's
# ephemeral range. Inside that range the kernel can hand the port to an outgoing connection
# between this check and the bind (about one run in ten failed so), and a client connecting to
# a port of that range with nothing listening can even connect to itself.
free_port() {
    local p low
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range
    ((low > 11000)) || low=32768
    for _ in $(seq 200); do
        p=$((10000 + RANDOM % (low - 10000)))
        [[ $USED_PORTS == *" $p "* ]] && continue
        if ! ss -Htan "sport = :$p" | grep -q .; then
            USED_PORTS+="$p "
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

# Starts a background process, logs to $WORK/<name>.log, remembers its pid in the variable
# named by $1.
start_bg() {
    local var=$1 name=$2
    shift 2
    "$@" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    printf -v "$var" '%s' "$pid"
}

# Waits until URL answers (any HTTP status), at most $2 seconds.
wait_http() {
    local url=$1 limit=${2:-15} pid=${3:-}
    local deadline=$((SECONDS + limit))
    while ((SECONDS < deadline)); do
        if curl -s -o /dev/null --max-time 1 "$url"; then
            return 0
        fi
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            die "process $pid exited before $url answered"
        fi
        sleep 0.1
    done
    die "$url did not answer within ${limit}s"
}

# Dies with a clear message when a process this script started has exited.
check_alive() {
    local name=$1 pid=$2
    kill -0 "$pid" 2>/dev/null && return 0
    die "$name (pid $pid) exited during the run; its log: $(tail -n 5 "$WORK/$name.log" 2>/dev/null)"
}

# User+system CPU time of a process in milliseconds.
cpu_ms() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    # Fields after the ")" of the command name: utime is the 12th, stime the 13th.
    local rest=${stat##*) }
    local -a f
    read -r -a f <<<"$rest"
    echo $(((f[11] + f[12]) * 1000 / $(getconf CLK_TCK)))
}

# Resident set size of a process, KiB.
rss_kib() {
    ps -o rss= -p "$1" 2>/dev/null | tr -d ' ' || echo 0
}

# A JSON body of exactly $1 bytes.
json_body() {
    local len=$1
    local head='{"event":"payment.authorize","amount":1234,"currency":"EUR","pad":"'
    local tail='"}'
    local n=$((len - ${#head} - ${#tail}))
    local pad
    pad=$(head -c "$n" /dev/zero | tr '\0' 'x')
    printf '%s%s%s' "$head" "$pad" "$tail"
}

machine_note() {
    local model
    model=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
    echo "- machine: $(nproc) CPU(s), ${model:-unknown CPU}, $(uname -sr), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) RAM"
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (the 2 cores are shared with other work)"
    echo "- hookyard: $("$HOOKYARD" --version 2>/dev/null), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)')"
}
