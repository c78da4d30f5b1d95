#!/usr/bin/env bash
# A bounded schemathesis run against a local kabao (loopback only): every generated request must
# answer a documented status, with a body matching its schema, and never a 5xx.
#
#   scripts/schemathesis.sh [MAX_EXAMPLES]     (default 200 per operation)
#   KABAO_BIN=target/debug/kabao scripts/schemathesis.sh 50    (an existing binary, no release build)
#
# Checks: no 5xx, every status documented, bodies and content types as the schema says. Exits
# non-zero on any finding.
#
# Needs Python 3 and network access to PyPI once (schemathesis is installed into a venv under
# target/). Not part of scripts/test.sh: it takes minutes and a download.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXAMPLES="${1:-200}"
VENV=target/schemathesis-venv
if [ ! -x "$VENV/bin/schemathesis" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "schemathesis>=4,<5"
fi

if [ -z "${KABAO_BIN:-}" ]; then
    cargo build --release --bin kabao
    KABAO_BIN=target/release/kabao
fi
ADMIN="schemathesis-admin-token"
LOG=$(mktemp)
# Rate limits off: schemathesis sends far more than a phone would, and a 429 tells nothing here.
"$KABAO_BIN" serve --ephemeral --listen 127.0.0.1:0 --admin-token "$ADMIN" \
    --rate-limit-requests-per-user-per-s 0 --rate-limit-requests-per-ip-per-s 0 --rate-limit-redeems-per-user-per-min 0 >"$LOG" 2>/dev/null &
PID=$!
trap 'kill $PID 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 100); do
    grep -q "listening on http://" "$LOG" && break
    sleep 0.1
done
BASE=$(grep -o "http://[0-9.:]*" "$LOG" | head -1)
[ -n "$BASE" ] || { echo "kabao did not start" >&2; exit 1; }

timeout 900 "$VENV/bin/schemathesis" run "$BASE/openapi.json" \
    --url "$BASE" \
    --header "Authorization: Bearer $ADMIN" \
    --checks not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance \
    --max-examples "$MAX_EXAMPLES" \
    --request-timeout 10
