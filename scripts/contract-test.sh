#!/usr/bin/env bash
# The contract test: a property-based run of the committed spec (openapi/openapi.json)
# against a live daemon with schemathesis, checking that no answer is a server error, and
# that every status code, content type and response body is one the spec declares.
# Installs schemathesis (pinned) into target/contract-venv on first use. Needs the debug
# binary (`cargo build`), which `scripts/test.sh` builds before calling this.
set -euo pipefail
cd "$(dirname "$0")/.."
SCHEMATHESIS_VERSION=4.32.5
venv=target/contract-venv
if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  # Debian's interpreter, not whichever python3 is first on PATH (a pyenv 3.11.7 here broke
  # hypothesis with "AST constructor recursion depth mismatch").
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
MDE_SERVER__PORT=$port MDE_SANDBOX__UID_BASE=64400 MDE_EXECUTION__MAX_CONCURRENT=2 \
  MDE_LIMITS__WALL_TIME_MS=2000 MDE_RUNTIMES__WATCH=false \
  target/debug/mixed-docker-executor >"$log" 2>&1 &
daemon=$!
stop() { kill -TERM "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; rm -f "$log"; }
trap stop EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || { cat "$log"; echo "the daemon did not start" >&2; exit 1; }
  sleep 0.2
done
timeout 600 "$venv/bin/st" run openapi/openapi.json --url "http://127.0.0.1:$port" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing --max-examples 50 --workers 2 --seed 1
