#!/usr/bin/env bash
# BENCHMARKS.md "Side by side": the same fences and the same pings through kabao in process,
# kabao over HTTP (`kabao loadgen`, batched and single), the rstar baseline, PostGIS and Redis GEO.
#
#   scripts/compare.sh
#
# Installs `postgresql-15-postgis-3` and `redis-server` from Debian when they are missing (as
# root), starts its OWN PostgreSQL cluster (initdb into a temporary directory, as the `postgres`
# user when run as root) and its OWN redis-server, each on a free port of 127.0.0.1 — never the
# machine's 5432 / 6379 — and stops them on exit. Then: `kabao serve --ephemeral` with the
# fences registered by `kabao loadgen --create-fences`, `kabao loadgen` with batches and with
# single pings, and `cargo bench --bench compare`, which first checks that every system finds
# the same matches and then times each. The table goes into BENCHMARKS.md's "Side by side"
# section with the date, commit and load: only between its two `scripts/compare.sh writes`
# markers when they are there (the section is appended when they are not).
#
# Env: CIRCLES (90000), POLYGONS (10000), SECONDS_MEASURED (10, per form), CONNECTIONS (8),
# BATCH (500), CHECK (pings checked, 20000), OUT (/tmp/kabao-compare), TIME_LIMIT (1800 s, the
# whole run), BENCHMARKS (BENCHMARKS.md; empty to leave it alone).
set -euo pipefail
cd "$(dirname "$0")/.."

CIRCLES=${CIRCLES:-90000}
POLYGONS=${POLYGONS:-10000}
MEASURE=${SECONDS_MEASURED:-10}
CONNECTIONS=${CONNECTIONS:-8}
BATCH=${BATCH:-500}
CHECK=${CHECK:-20000}
OUT=${OUT:-/tmp/kabao-compare}
TIME_LIMIT=${TIME_LIMIT:-1800}
BENCHMARKS=${BENCHMARKS-BENCHMARKS.md}
PGBIN=/usr/lib/postgresql/15/bin
KABAO=target/release/kabao
mkdir -p "$OUT"

# Bounded in time: the whole run, services included, is killed past TIME_LIMIT.
if [ -z "${KABAO_COMPARE_BOUNDED:-}" ]; then
    export KABAO_COMPARE_BOUNDED=1
    exec timeout --kill-after=30 "$TIME_LIMIT" "$0" "$@"
fi

log() { echo "compare: $*" >&2; }

# --- packages ---
missing=()
for pkg in postgresql-15-postgis-3 redis-server; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { log "missing ${missing[*]}; run as root to install them"; exit 1; }
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >"$OUT/apt.log" 2>&1 ||
        { apt-get update >>"$OUT/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >>"$OUT/apt.log" 2>&1; }
fi

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- our own services, stopped on exit ---
WORK=$(mktemp -d /tmp/kabao-compare-services.XXXXXX)
PGDATA=$WORK/pg
SERVER=""
REDIS=""
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    set +e
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    [ -n "$REDIS" ] && kill "$REDIS" 2>/dev/null && wait "$REDIS" 2>/dev/null
    [ -f "$PGDATA/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PGPORT=$(free_port)
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
log "PostgreSQL on 127.0.0.1:$PGPORT ($PGDATA)"
as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust --no-sync >"$OUT/initdb.log" 2>&1
# A throwaway cluster: no durability needed; memory enough to hold the tables and indexes.
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/pg.log" -w -t 60 start -o \
    "-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
     -c full_page_writes=off -c shared_buffers=512MB -c max_connections=50 -c jit=off" >/dev/null

RPORT=$(free_port)
log "Redis on 127.0.0.1:$RPORT"
redis-server --bind 127.0.0.1 --port "$RPORT" --save '' --appendonly no --dir "$WORK" \
    --logfile "$WORK/redis.log" &
REDIS=$!
for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$RPORT" ping >/dev/null

# --- kabao over HTTP ---
log "building (release)"
cargo build --release --locked --bin kabao >"$OUT/build.log" 2>&1
KPORT=$(free_port)
URL=http://127.0.0.1:$KPORT
"$KABAO" serve --ephemeral --listen "127.0.0.1:$KPORT" --admin-token compare-admin \
    --rate-limit-requests-per-user-per-s 0 >"$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 100); do curl -sf "$URL/healthz" >/dev/null && break; sleep 0.2; done
curl -sf "$URL/healthz" >/dev/null

cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
loadgen() { "$KABAO" loadgen --url "$URL" --admin-token compare-admin --area country --seed 1 --quiet "$@"; }
log "registering $CIRCLES circles and $POLYGONS polygons"
loadgen --create-fences "$CIRCLES" --shape circle --duration 0s --warmup 0s >/dev/null
loadgen --create-fences "$POLYGONS" --shape polygon --duration 0s --warmup 0s >/dev/null
# The index is rebuilt in the background after the writes return: wait until the server idles.
for _ in $(seq 120); do
    a=$(cpu_s "$SERVER"); sleep 1; b=$(cpu_s "$SERVER")
    [ "$(echo "$b - $a < 0.05" | bc)" = 1 ] && break
done
HTTP_CONNECTIONS=4
log "kabao loadgen: batches of $BATCH"
loadgen --connections "$HTTP_CONNECTIONS" --batch "$BATCH" --rate max --duration "${MEASURE}s" --warmup 3s \
    --json "$OUT/http-batch.json" | tee "$OUT/http-batch.txt"
log "kabao loadgen: single pings"
loadgen --connections "$HTTP_CONNECTIONS" --batch 1 --rate max --duration "${MEASURE}s" --warmup 3s \
    --json "$OUT/http-single.json" | tee "$OUT/http-single.txt"
kill "$SERVER"; wait "$SERVER" 2>/dev/null || true
SERVER=""

# --- the bench: check, then time ---
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "cargo bench --bench compare (load $LOAD_BEFORE)"
KABAO_COMPARE_PG="host=127.0.0.1 port=$PGPORT user=postgres dbname=postgres" \
KABAO_COMPARE_REDIS="redis://127.0.0.1:$RPORT/" \
KABAO_COMPARE_CIRCLES=$CIRCLES KABAO_COMPARE_POLYGONS=$POLYGONS KABAO_COMPARE_CHECK=$CHECK \
KABAO_COMPARE_SECONDS=$MEASURE KABAO_COMPARE_CONNECTIONS=$CONNECTIONS KABAO_COMPARE_BATCH=$BATCH \
KABAO_COMPARE_HTTP_BATCH=$OUT/http-batch.json KABAO_COMPARE_HTTP_SINGLE=$OUT/http-single.json \
KABAO_COMPARE_TABLE=$OUT/table.md \
    cargo bench --locked --bench compare 2>"$OUT/bench.stderr" | tee "$OUT/bench.txt"
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

[ -n "$BENCHMARKS" ] || exit 0
COMMIT=$(git rev-parse --short HEAD)
DIRTY=$(git diff --quiet HEAD -- src benches Cargo.toml Cargo.lock || echo ", with uncommitted changes")
{
    echo "<!-- scripts/compare.sh writes from here -->"
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit \`$COMMIT\`$DIRTY, $(nproc) cores shared with other work;"
    echo "load average (1, 5, 15 min) $LOAD_BEFORE before the bench, $LOAD_AFTER after."
    echo "Command: \`scripts/compare.sh\` (CIRCLES=$CIRCLES POLYGONS=$POLYGONS SECONDS_MEASURED=$MEASURE"
    echo "CONNECTIONS=$CONNECTIONS BATCH=$BATCH CHECK=$CHECK), $MEASURE s measured a form after 2 s of warm-up;"
    echo "kabao over HTTP with $HTTP_CONNECTIONS loadgen connections, server and generator on the same cores."
    echo
    cat "$OUT/table.md"
    echo "<!-- scripts/compare.sh writes up to here -->"
} >"$OUT/section.md"
# Only the part between the markers is replaced: the reading of it written around them stays.
python3 - "$BENCHMARKS" "$OUT/section.md" <<'EOF'
import re, sys
path, part = sys.argv[1], open(sys.argv[2]).read().rstrip("\n")
text = open(path).read()
m = re.search(r"^<!-- scripts/compare.sh writes from here -->.*?^<!-- scripts/compare.sh writes up to here -->", text, flags=re.S | re.M)
if m:
    text = text[: m.start()] + part + text[m.end():]
else:
    head = "## Side by side (`scripts/compare.sh`, `benches/compare.rs`)\n\n"
    text = text.rstrip("\n") + "\n\n" + head + part + "\n"
open(path, "w").write(text)
EOF
log "wrote the Side by side section of $BENCHMARKS"
