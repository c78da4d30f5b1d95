#!/usr/bin/env bash
# BENCHMARKS.md "Soak" (issue 9, point 6): kabao serve (in memory) under single pings at 70 % of
# the rate it sustains flat out, for SOAK_DURATION, while simulated users keep leaving and new
# ones arriving (loadgen --user-churn-per-s). Short --state-ttl-s and --max-ping-age-s make idle
# users' trigger state freeable within the run (after max-ping-age + state-ttl + 60 s, swept
# every 60 s). The fences' campaigns trigger on a dwell no user lasts, so users hold stays but no
# coupon piles up in the store: what grows or does not is trigger state.
#
# Every 10 s the server's RSS (/proc/PID/status VmRSS) and kabao_tracked_users (/metrics) go into
# $OUT/samples.csv. At the end it prints RSS after the warm-up against RSS at the end (pass within
# 10 %), p99 per minute from loadgen's JSON, tracked users, and bytes per tracked user (RSS above
# the idle server's / tracked users, at the peak of tracked users).
#
#   cargo build --release && scripts/soak.sh
#
# Env: KABAO (binary, default target/release/kabao), PORT (18090), OUT (/tmp/kabao-soak),
# SOAK_DURATION (seconds, 600), SOAK_WARMUP (seconds of the soak treated as warm-up, 180),
# SOAK_PROBE (seconds of the flat-out run, 20), SOAK_USERS (20000), SOAK_CHURN (users replaced
# per second, 100), SOAK_FENCES (100000), SOAK_TTL (state-ttl-s and max-ping-age-s, 30),
# CONNECTIONS (4).
set -euo pipefail

KABAO=${KABAO:-target/release/kabao}
PORT=${PORT:-18090}
OUT=${OUT:-/tmp/kabao-soak}
DURATION=${SOAK_DURATION:-600}
WARMUP=${SOAK_WARMUP:-180}
PROBE=${SOAK_PROBE:-20}
USERS=${SOAK_USERS:-20000}
CHURN=${SOAK_CHURN:-100}
FENCES=${SOAK_FENCES:-100000}
TTL=${SOAK_TTL:-30}
CONNECTIONS=${CONNECTIONS:-4}
URL=http://127.0.0.1:$PORT
mkdir -p "$OUT"

"$KABAO" serve --ephemeral --listen "127.0.0.1:$PORT" --admin-token soak-admin --client-secret soak-secret \
    --rate-limit-requests-per-user-per-s 0 --state-ttl-s "$TTL" --max-ping-age-s "$TTL" >"$OUT/server.log" 2>&1 &
SERVER=$!
SAMPLER=
trap 'kill $SERVER 2>/dev/null || true; [ -n "$SAMPLER" ] && kill $SAMPLER 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "$URL/healthz" >/dev/null && break; sleep 0.2; done

cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
tracked() { curl -sf "$URL/metrics" | awk '$1 == "kabao_tracked_users" {print $2}' | tail -1; }
stays() { curl -sf "$URL/metrics" | awk '$1 == "kabao_tracked_stays" {print $2}' | tail -1; }
idle() { # wait until the server's CPU use settles (the index is rebuilt after campaign writes)
    for _ in $(seq 120); do
        a=$(cpu_s $SERVER); sleep 1; b=$(cpu_s $SERVER)
        [ "$(echo "$b - $a < 0.05" | bc)" = 1 ] && break
    done
}
loadgen() { "$KABAO" loadgen --url "$URL" --admin-token soak-admin --connections "$CONNECTIONS" --quiet "$@"; }

echo "== $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'), load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
echo "== fences: $FENCES circles, city area, dwell trigger no user reaches"
loadgen --create-fences "$FENCES" --shape circle --area city --dwell-s 86400 --duration 0s --warmup 0s >/dev/null
idle
RSS_IDLE=$(rss_kb $SERVER)
echo "server RSS with the fences, before any ping: $((RSS_IDLE / 1024)) MB"

echo "== flat out for ${PROBE}s (single pings, $USERS users)"
loadgen --area city --users "$USERS" --rate max --duration "${PROBE}s" --warmup 3s --json "$OUT/probe.json" | tee "$OUT/probe.txt"
RATE=$(python3 -c "import json,sys; print(max(1, round(json.load(open(sys.argv[1]))['requests_per_s'] * 0.7)))" "$OUT/probe.json")
# The probe's users go idle and are freed during the soak like any others.
echo
echo "== soak: ${DURATION}s at $RATE requests/s (70 %), $USERS users, $CHURN replaced per second, state TTL ${TTL}s"
echo "t_s,rss_kb,tracked_users,tracked_stays,server_cpu_s,load1" >"$OUT/samples.csv"
(
    t0=$(date +%s)
    while kill -0 $SERVER 2>/dev/null; do
        echo "$(( $(date +%s) - t0 )),$(rss_kb $SERVER),$(tracked),$(stays),$(cpu_s $SERVER),$(cut -d' ' -f1 /proc/loadavg)" >>"$OUT/samples.csv"
        sleep 10
    done
) &
SAMPLER=$!
loadgen --area city --users "$USERS" --user-churn-per-s "$CHURN" --seed 2 --rate "$RATE" \
    --duration "${DURATION}s" --warmup 5s --json "$OUT/soak.json" --report "$OUT/soak.html" | tee "$OUT/soak.txt"
sleep 1
kill $SAMPLER 2>/dev/null || true
SAMPLER=
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

python3 - "$OUT/samples.csv" "$OUT/soak.json" "$WARMUP" "$RSS_IDLE" <<'EOF'
import csv, json, sys
samples = [r for r in csv.DictReader(open(sys.argv[1])) if r["rss_kb"]]
soak = json.load(open(sys.argv[2]))
warmup, rss_idle = int(sys.argv[3]), int(sys.argv[4])
mb = lambda kb: kb / 1024
after = [r for r in samples if int(r["t_s"]) >= warmup] or samples[-1:]
warm, end = int(after[0]["rss_kb"]), int(samples[-1]["rss_kb"])
drift = (end - warm) / warm * 100
rss_after = [int(r["rss_kb"]) for r in after]
print(f"RSS: idle {mb(rss_idle):.0f} MB; after the {warmup} s warm-up {mb(warm):.0f} MB; at the end {mb(end):.0f} MB "
      f"({drift:+.1f} %); after warm-up min {mb(min(rss_after)):.0f} / max {mb(max(rss_after)):.0f} MB: "
      f"{'PASS' if abs(drift) <= 10 else 'FAIL'} (within 10 %)")
print("p99 per minute (ms): " + ", ".join(f"{m['latency_ms']['p99']:.2f}" for m in soak["minutes"]))
print(f"latency over the run: p50 {soak['latency_ms']['p50']:.2f} ms, p99 {soak['latency_ms']['p99']:.2f} ms, "
      f"p99.9 {soak['latency_ms']['p999']:.2f} ms, max {soak['latency_ms']['max']:.1f} ms; "
      f"{soak['requests_per_s']:.0f} requests/s of {soak['target_rate']:.0f}; errors {soak['errors'] or 'none'}")
tracked = [(int(r["tracked_users"] or 0), int(r["rss_kb"])) for r in samples]
peak_users, peak_rss = max(tracked)
after_users = [int(r["tracked_users"] or 0) for r in after]
print(f"users: {soak['users']} at a time, {soak['users_churned']} replaced; tracked after warm-up "
      f"min {min(after_users)} / max {max(after_users)}")
if peak_users:
    print(f"bytes per tracked user: {(peak_rss - rss_idle) * 1024 / peak_users:.0f} "
          f"(RSS {mb(peak_rss):.0f} MB − idle {mb(rss_idle):.0f} MB, over {peak_users} tracked users at their peak)")
    peak_stays = max(int(r["tracked_stays"] or 0) for r in samples)
    if peak_stays:
        print(f"open stays at their peak: {peak_stays} ({peak_stays / peak_users:.1f} per tracked user); "
              f"bytes per open stay: {(peak_rss - rss_idle) * 1024 / peak_stays:.0f}")
EOF
echo "samples: $OUT/samples.csv; loadgen: $OUT/soak.json, $OUT/soak.html"
