#!/usr/bin/env bash
# Validate the Prometheus configuration, the alerting rules and their unit tests.
# Requires promtool (Debian/Ubuntu package "prometheus", or a Prometheus release tarball).
set -euo pipefail
cd "$(dirname "$0")"

promtool check config prometheus.yml
promtool check config prometheus-compose.yml
promtool check rules alerts.yml
promtool test rules alerts.test.yml
