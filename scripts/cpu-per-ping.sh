#!/usr/bin/env bash
# Server CPU per ping (BENCHMARKS.md "Profile of the batch load"): starts `BINARY serve` in memory
# on PORT, creates 1 M circle fences over the country area, waits for the index rebuild to end,
# then runs 20 s of open-loop batches of 500 pings at 20 requests/s and prints the server's
# utime + stime divided by the pings sent. CPU time, not a rate, so two builds can be compared
# on a machine whose other load changes the rates.
#
#   scripts/cpu-per-ping.sh target/release/kabao 18081
set -euo pipefail
B=${1:?binary}; P=${2:-18081}; OUT=$(mktemp)
$B serve --ephemeral --listen 127.0.0.1:$P --admin-token bench-admin --client-secret bench-secret --rate-limit-requests-per-user-per-s 0 >/dev/null 2>&1 &
S=$!
trap "kill $S 2>/dev/null || true" EXIT
sleep 1
$B loadgen --url http://127.0.0.1:$P --admin-token bench-admin --create-fences 1000000 --shape circle --area country --duration 0s --warmup 0s --quiet >/dev/null
for i in $(seq 60); do a=$(awk '{print $14+$15}' /proc/$S/stat); sleep 1; b=$(awk '{print $14+$15}' /proc/$S/stat); [ $((b-a)) -lt 5 ] && break; done
a=$(awk '{print $14+$15}' /proc/$S/stat)
$B loadgen --url http://127.0.0.1:$P --admin-token bench-admin --connections 4 --duration 20s --warmup 0s --batch 500 --rate 20 --quiet > "$OUT" 2>&1
b=$(awk '{print $14+$15}' /proc/$S/stat)
pings=$(grep -o "[0-9]* accepted" "$OUT" | head -1 | cut -d' ' -f1)
echo "$B: server cpu $(( (b-a) )) ticks for $pings pings: $(echo "scale=2; ($b-$a)*10000/$pings" | bc) us/ping"
grep latency "$OUT"

