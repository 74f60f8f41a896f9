#!/usr/bin/env bash
# Builds the release agent, then compares it end to end with vmagent and Prometheus (agent
# mode) on the same synthetic targets. Arguments go to scripts/compare.py, e.g.
#   scripts/compare.sh --targets 10 --series 10000 --interval 1s --duration 60 --warmup 10
# Needs the Debian packages victoria-metrics (vmagent + receiver) and prometheus.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p sre-lab-agent
exec python3 scripts/compare.py "$@"
