#!/bin/sh
# The sre-lab sample app: a tiny workload that proves the agent's paths end to end.
# Every second it counts one "request", rewrites /www/metrics (Prometheus text format, served by
# busybox httpd on :8080 and scraped by the agent through the pod's prometheus.io annotations)
# and prints a logfmt line to stdout (shipped by the agent's logs path). Every 10th request is
# also logged as a warning.
set -eu

www=${WWW_DIR:-/www}
port=${PORT:-8080}
n=0

write_metrics() {
  # Write a temporary file and rename it, so a scrape never reads a half-written file.
  cat >"$www/.metrics.tmp" <<METRICS
# HELP sample_app_requests_total Requests handled by the sample app, by path.
# TYPE sample_app_requests_total counter
sample_app_requests_total{path="/"} $n
sample_app_requests_total{path="/slow"} $((n / 10))
# HELP sample_app_up Whether the sample app is running.
# TYPE sample_app_up gauge
sample_app_up 1
# HELP sample_app_in_flight_requests Requests in progress (a made-up gauge that moves).
# TYPE sample_app_in_flight_requests gauge
sample_app_in_flight_requests $((n % 7))
METRICS
  mv -f "$www/.metrics.tmp" "$www/metrics"
}

write_metrics
httpd -f -p "$port" -h "$www" &
httpd_pid=$!
trap 'kill "$httpd_pid" 2>/dev/null; exit 0' TERM INT
echo "level=info msg=\"sample app started\" port=$port"

while :; do
  if ! kill -0 "$httpd_pid" 2>/dev/null; then
    echo "level=error msg=\"httpd exited\""
    exit 1
  fi
  n=$((n + 1))
  write_metrics
  echo "level=info msg=\"handled request\" n=$n"
  if [ $((n % 10)) -eq 0 ]; then
    echo "level=warn msg=\"slow request\" n=$n"
  fi
  sleep 1
done
