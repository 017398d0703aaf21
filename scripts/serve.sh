#!/usr/bin/env bash
# The one command that starts the daemon with the default config and runtimes.toml:
# installs bubblewrap if missing, builds in release mode, and serves on 127.0.0.1:8000.
# Extra arguments go to the daemon (e.g. --config my.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --minimal
exec cargo run --release --locked -- "$@"
