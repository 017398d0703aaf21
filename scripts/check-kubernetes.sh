#!/usr/bin/env bash
# Validate the Kubernetes base in deploy/kubernetes: render it (kubectl kustomize or
# kustomize where installed), validate every object with kubernetes-validate (strict, recent
# Kubernetes versions), and check what the manifests promise (scripts/check-kubernetes.py),
# then check that config.toml is a config the daemon accepts.
# scripts/install-deps.sh makes the venv (target/k8s-venv, kubernetes-validate from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/k8s-venv
if [[ ! -x $venv/bin/kubernetes-validate ]]; then
  echo "kubernetes-validate is not installed in $venv: run scripts/install-deps.sh" >&2
  exit 1
fi
"$venv/bin/python" scripts/check-kubernetes.py
# The settings file as the pod reads it (its runtimes file at the ConfigMap's path).
bin=target/debug/mixed-docker-executor
[[ -x $bin ]] || cargo build --locked -q
MDE_RUNTIMES__FILE=deploy/kubernetes/runtimes.toml "$bin" check-config \
  --config deploy/kubernetes/config.toml >/dev/null
echo "deploy/kubernetes/config.toml: accepted by check-config"
