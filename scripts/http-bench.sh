#!/usr/bin/env bash
# BENCHMARKS.md "The HTTP path": kabao serve (in memory, no per-user rate limit) with 1 M circle
# fences over the country workload, measured from outside with kabao loadgen on the same machine:
# batches of 500 and single pings, each first flat out (closed loop) and then open loop at 70 %
# of the rate found. Prints each run's summary and the CPU seconds the server and the generator
# used; leaves the JSON results and HTML reports in $OUT.
#
#   cargo build --release && scripts/http-bench.sh
#
# Env: KABAO (binary, default target/release/kabao), PORT (18080), OUT (/tmp/kabao-http-bench),
# SECONDS_MEASURED (20), CONNECTIONS (4).
set -euo pipefail

KABAO=${KABAO:-target/release/kabao}
PORT=${PORT:-18080}
OUT=${OUT:-/tmp/kabao-http-bench}
MEASURE=${SECONDS_MEASURED:-20}
CONNECTIONS=${CONNECTIONS:-4}
URL=http://127.0.0.1:$PORT
mkdir -p "$OUT"

"$KABAO" serve --ephemeral --listen "127.0.0.1:$PORT" --admin-token bench-admin --client-secret bench-secret \
    --rate-limit-requests-per-user-per-s 0 >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "$URL/healthz" >/dev/null && break; sleep 0.2; done

# utime + stime of a process, in seconds.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }

load() { # name, loadgen args...
    local name=$1; shift
    local before; before=$(cpu_s $SERVER)
    local t0; t0=$(date +%s.%N)
    /usr/bin/env time -f "%U %S" -o "$OUT/$name.time" "$KABAO" loadgen --url "$URL" --admin-token bench-admin \
        --connections "$CONNECTIONS" --duration "${MEASURE}s" --warmup 5s --quiet \
        --json "$OUT/$name.json" --report "$OUT/$name.html" "$@" | tee "$OUT/$name.txt"
    local after; after=$(cpu_s $SERVER)
    local wall; wall=$(echo "$(date +%s.%N) - $t0" | bc)
    echo "cpu: server $(echo "$after - $before" | bc) s, loadgen $(awk '{print $1 + $2}' "$OUT/$name.time") s over ${wall%.*} s wall; load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
}

rate_of() { # 70 % of the requests/s a JSON result measured
    python3 -c "import json,sys; print(max(1, round(json.load(open(sys.argv[1]))['requests_per_s'] * 0.7)))" "$1"
}

echo "== fences: 1 000 000 circles, country"
"$KABAO" loadgen --url "$URL" --admin-token bench-admin --create-fences 1000000 --shape circle --area country \
    --duration 0s --warmup 0s --quiet >/dev/null
# The index is rebuilt in the background after the writes return: wait until the server idles,
# so the first run is not charged for it.
for _ in $(seq 120); do
    a=$(cpu_s $SERVER); sleep 1; b=$(cpu_s $SERVER)
    [ "$(echo "$b - $a < 0.05" | bc)" = 1 ] && break
done
echo "server RSS after the fences: $(( $(awk '/VmRSS/ {print $2}' /proc/$SERVER/status) / 1024 )) MB"
echo

echo "== batches of 500, flat out"
load batch-max --batch 500 --rate max
echo "== batches of 500, open loop at 70 % of that"
load batch-70 --batch 500 --rate "$(rate_of "$OUT/batch-max.json")"
echo "== single pings, flat out"
load single-max --batch 1 --rate max
echo "== single pings, open loop at 70 % of that"
load single-70 --batch 1 --rate "$(rate_of "$OUT/single-max.json")"
echo "server RSS at the end: $(( $(awk '/VmRSS/ {print $2}' /proc/$SERVER/status) / 1024 )) MB"
