#!/usr/bin/env bash
# Install what the daemon and its tests need from Debian's packages (run as root).
#   bubblewrap      the default sandbox
#   prometheus      promtool and the server, for the monitoring checks and end-to-end test
#   python3-venv curl   the contract test's schemathesis venv and its readiness probe
#   ruby php-cli lua5.4 golang-go rustc   toolchains for the shipped runtimes (python3, node, bash,
#                   perl, gcc, g++ and java are on the base image; missing ones are reported
#                   as unavailable, and their tests are skipped with a message)
#   haproxy         the load balancer of the replica test (tests/replicas.rs)
#   and, where node and npm are installed, tests/piston-client's node modules (npm ci);
#   and target/k8s-venv with kubernetes-validate (PyPI), for scripts/check-kubernetes.sh
# Pass --minimal to install only bubblewrap (enough to start the daemon).
set -euo pipefail

packages=(bubblewrap)
if [[ "${1:-}" != "--minimal" ]]; then
  packages+=(prometheus ruby php-cli lua5.4 golang-go rustc python3 python3-venv curl bash perl gcc g++ haproxy)
fi

# The Piston-compatibility test drives the daemon with the real `piston-client` npm package,
# pinned in tests/piston-client/package-lock.json. Only where node and npm are installed
# (without them that test is skipped); again only when the lock file changed.
client=$(cd "$(dirname "$0")/.." && pwd)/tests/piston-client
if [[ "${1:-}" != "--minimal" ]] && command -v node >/dev/null && command -v npm >/dev/null \
  && ! [[ "$client/node_modules/.package-lock.json" -nt "$client/package-lock.json" ]]; then
  npm ci --prefix "$client" --no-audit --no-fund --loglevel=error
fi

# The Kubernetes manifests' schema validator, pinned, in a venv of its own under target/
# (again only when missing; python3-venv comes from the packages below, so a first run on a
# bare machine makes the venv after installing them: see the end of this script).
repo=$(cd "$(dirname "$0")/.." && pwd)
k8s_venv() {
  [[ "${1:-}" == "--minimal" ]] && return 0
  [[ -x "$repo/target/k8s-venv/bin/kubernetes-validate" ]] && return 0
  python3 -m venv "$repo/target/k8s-venv"
  "$repo/target/k8s-venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==1.37.0"
}

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  k8s_venv "${1:-}"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "missing packages: ${missing[*]}; run this script as root (or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
k8s_venv "${1:-}"
