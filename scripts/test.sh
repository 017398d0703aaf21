#!/usr/bin/env bash
# The one command that runs every test: installs missing packages, then the Rust test suite
# (unit, HTTP, sandbox attacks, metrics end to end, the drain, replicas behind HAProxy), the
# contract test of the committed spec (schemathesis against a live daemon), the monitoring/
# checks and the Kubernetes manifests' validation.
# Run as root: the sandbox gives each slot its own uid, cgroup and tmpfs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
python3 scripts/check-structure.py --self-test; python3 scripts/check-structure.py  # `;`: set -e ignores a failure left of `&&`
cargo test --locked --all-targets -- --test-threads="${TEST_THREADS:-4}"
scripts/contract-test.sh
monitoring/check.sh
scripts/check-kubernetes.sh
