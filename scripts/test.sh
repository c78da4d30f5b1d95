#!/usr/bin/env bash
# kabao's whole check, as CI runs it: formatting, lints, then every test.
# Works on a fresh Debian machine with only Rust installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Redis store's tests start their own redis-server (Debian's package; CI runs as root).
command -v redis-server >/dev/null || { apt-get update && apt-get install -y redis-server; }
# tests/deploy.rs parses docker-compose.yml with PyYAML.
python3 -c 'import yaml' 2>/dev/null || { apt-get update && apt-get install -y python3-yaml; }

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
