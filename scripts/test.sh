#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then runs the checks and
# the whole test suite with one shared build.
#   - Debian packages: prometheus, prometheus-node-exporter, victoria-metrics (real peers)
#   - kubectl (renders deploy/ offline with `kubectl kustomize`), script (bsdutils: a pty for
#     the installer's spinner test)
#   - Python: kubernetes-validate, jsonschema, PyYAML (scripts/validate-manifests.py) and
#     helm-python-sdk, Helm v4 as a library (scripts/helm-chart-check.py)
#   - cargo-nextest
#   - iproute2 and iputils-ping (network namespaces and traffic for the eBPF tests), and the
#     eBPF toolchain with the agent's programs (scripts/build-ebpf.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
# Real peers, plus what the tests use to drive them: openssl (TLS certificates), python3 (TLS
# test servers), procps (kill), util-linux (mount, for the full-disk test on a tmpfs).
for pair in prometheus:prometheus prometheus-node-exporter:prometheus-node-exporter vmagent:victoria-metrics \
            openssl:openssl python3:python3 kill:procps mount:util-linux kubectl:kubectl \
            script:bsdutils pip3:python3-pip ip:iproute2 ping:iputils-ping; do
  bin=${pair%%:*}; pkg=${pair##*:}
  command -v "$bin" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "==> installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
# The flows tests (and the agent's drop counting) read the skb:kfree_skb tracepoint's format
# from tracefs; a machine booted without it mounted gets it mounted here (root only).
if [ ! -e /sys/kernel/tracing/events ] && [ "$(id -u)" = 0 ]; then
  echo "==> mounting tracefs on /sys/kernel/tracing"
  mount -t tracefs nodev /sys/kernel/tracing || echo "   (could not mount tracefs: the drop tests will fail)"
fi
# Debian's packages may start services through their postinst on machines with an init
# system; the tests start their own instances on free ports, so nothing else is needed.

if ! python3 -c 'import kubernetes_validate, jsonschema, yaml, helm_python' >/dev/null 2>&1; then
  echo "==> installing kubernetes-validate, jsonschema, PyYAML, helm-python-sdk (Helm v4's engine)"
  python3 -m pip install --quiet --break-system-packages kubernetes-validate jsonschema pyyaml \
    helm-python-sdk==0.2.2
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "==> installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

./scripts/build-ebpf.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> build (one shared build for all tests)"
cargo build --workspace --bins
echo "==> tests"
cargo nextest run --workspace --no-fail-fast "$@"
