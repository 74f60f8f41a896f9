#!/usr/bin/env bash
# The flows path's cost (issue 10), measured on this kernel with real packets:
#
#   1. TCP throughput with iperf3 between two network namespaces routed through this one (the
#      host side of two "pods"), without and with the agent's tc program on both host-side
#      interfaces: the median of RUNS runs of SECS seconds each.
#   2. The program's own run time per packet from the kernel's BPF statistics
#      (kernel.bpf_stats_enabled=1, bpftool prog show): run_time_ns / run_cnt.
#   3. The agent's CPU (collector included) while FLOWS distinct UDP 5-tuples stay active.
#
#   scripts/flows-bench.sh            (root; needs iperf3, bpftool, python3, iproute2)
#   RUNS=5 SECS=5 FLOWS=10000 WINDOW=60 AGENT=target/release/agent scripts/flows-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
SECS=${SECS:-5}
FLOWS=${FLOWS:-10000}
WINDOW=${WINDOW:-60}
AGENT=${AGENT:-target/release/agent}
for t in iperf3 bpftool python3 ip; do
  command -v "$t" >/dev/null || { echo "flows-bench: $t is missing (apt-get install iperf3 bpftool iproute2)" >&2; exit 1; }
done
[ -x "$AGENT" ] || { echo "flows-bench: $AGENT missing (cargo build --release -p sre-lab-agent, after scripts/build-ebpf.sh)" >&2; exit 1; }

tmp=$(mktemp -d)
pids=()
stats_before=$(sysctl -n kernel.bpf_stats_enabled)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip link del srbA 2>/dev/null || true
  ip link del srbB 2>/dev/null || true
  ip netns del srb-a 2>/dev/null || true
  ip netns del srb-b 2>/dev/null || true
  sysctl -qw kernel.bpf_stats_enabled="$stats_before" || true
  rm -rf "$tmp"
}
trap cleanup EXIT
cleanup_quiet() { ip link del srbA 2>/dev/null || true; ip link del srbB 2>/dev/null || true; ip netns del srb-a 2>/dev/null || true; ip netns del srb-b 2>/dev/null || true; }
cleanup_quiet

# Two "pods": srb-a (10.214.1.2) and srb-b (10.214.2.2), each behind a veth whose host side
# (srbA, srbB) is where the agent attaches, routed through this namespace.
for x in a b; do
  X=${x^^}; n=$([ $x = a ] && echo 1 || echo 2)
  ip netns add srb-$x
  ip link add srb$X type veth peer name eth0 netns srb-$x
  ip addr add 10.214.$n.1/24 dev srb$X
  ip link set srb$X up
  ip -n srb-$x addr add 10.214.$n.2/24 dev eth0
  ip -n srb-$x link set eth0 up
  ip -n srb-$x link set lo up
  ip -n srb-$x route add default via 10.214.$n.1
done
sysctl -qw net.ipv4.ip_forward=1

ip netns exec srb-b iperf3 -s -B 10.214.2.2 >"$tmp/iperf3-server.log" 2>&1 &
pids+=($!)
sleep 0.5

median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
iperf_runs() {
  local out=()
  for _ in $(seq "$RUNS"); do
    out+=("$(ip netns exec srb-a iperf3 -c 10.214.2.2 -t "$SECS" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')")
  done
  echo "${out[@]}"
}


# A receiver that accepts every remote write (the collector's series leave as in production).
cat >"$tmp/sink.py" <<'EOF'
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
EOF
sink_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 "$tmp/sink.py" "$sink_port" &
pids+=($!)
agent_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$tmp/agent.yml" <<EOF
remote_write:
  - url: http://127.0.0.1:$sink_port/api/v1/write
flows:
  enabled: true
  interfaces: [srbA, srbB]
  interval: 5s
  max_flows: 65536
  source_context: [ip]
  destination_context: [ip]
  max_label_sets: 100000
EOF
"$AGENT" --config "$tmp/agent.yml" --listen-address "127.0.0.1:$agent_port" --storage-path "$tmp/data" >"$tmp/agent.log" 2>&1 &
agent_pid=$!
pids+=($agent_pid)
for _ in $(seq 100); do
  if curl -fs "http://127.0.0.1:$agent_port/metrics" 2>/dev/null | grep -q '^sre_agent_flows_interfaces 2'; then break; fi
  sleep 0.2
done
curl -fs "http://127.0.0.1:$agent_port/metrics" | grep -q '^sre_agent_flows_interfaces 2' || { cat "$tmp/agent.log"; echo "flows-bench: the agent did not attach" >&2; exit 1; }

# Throughput: runs with and without the programs alternate (the agent's flows switched off
# and on by a reload), so that drift of the machine does not land on one side.
flows_on() { sed -i "s/enabled: .*/enabled: $1/" "$tmp/agent.yml"; curl -fs -XPOST "http://127.0.0.1:$agent_port/-/reload" >/dev/null;
  want=$([ "$1" = true ] && echo 2 || echo 0)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$agent_port/metrics" | grep -q "^sre_agent_flows_interfaces $want" && return 0; sleep 0.1; done
  echo "flows-bench: flows did not switch to $1" >&2; exit 1; }
echo "==> iperf3 without and with the agent's tc program on both host sides, alternating ($RUNS x 2 x ${SECS}s)"
without=(); with=()
for _ in $(seq "$RUNS"); do
  flows_on false; without+=("$(RUNS=1 iperf_runs)")
  flows_on true;  with+=("$(RUNS=1 iperf_runs)")
done
without="${without[*]}"; with="${with[*]}"
echo "    without, Gbit/s: $without"
echo "    with,    Gbit/s: $with"
# The program's own time per run, from the kernel's BPF statistics (enabled only for this
# extra run: they add two clock reads per run).
prog_stats() { bpftool prog show -j | python3 -c 'import json,sys; p=[x for x in json.load(sys.stdin) if x.get("name","").startswith("flows_tc_")]; print(sum(x.get("run_time_ns",0) for x in p), sum(x.get("run_cnt",0) for x in p))'; }
sysctl -qw kernel.bpf_stats_enabled=1
read -r t0 c0 < <(prog_stats)
if [ -n "${PERF_OUT:-}" ]; then perf record -a -g -o "$PERF_OUT" -- sleep "$SECS" >/dev/null 2>&1 & perf_pid=$!; fi
RUNS=1 iperf_runs >/dev/null
[ -n "${PERF_OUT:-}" ] && wait "$perf_pid"
read -r t1 c1 < <(prog_stats)
sysctl -qw kernel.bpf_stats_enabled="$stats_before"

# The program alone, without traffic or the statistics' clock reads: BPF_PROG_TEST_RUN on a
# 1 KiB TCP segment of a flow already in the table (bpftool prog run; the median of 3 runs
# of 2M repetitions; the harness itself costs ~18 ns here, see BENCHMARKS.md).
python3 - "$tmp/pkt.bin" <<'EOF'
import struct, sys
tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
payload = b"x" * 1000
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6, 0, bytes([10, 214, 1, 2]), bytes([10, 214, 2, 2]))
open(sys.argv[1], "wb").write(b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", 0x0800) + ip + tcp + payload)
EOF
prog_id=$(bpftool prog show -j | python3 -c 'import json,sys; print([x["id"] for x in json.load(sys.stdin) if x.get("name","").startswith("flows_tc_")][0])')
tr=()
for _ in 1 2 3; do
  tr+=("$(bpftool prog run id "$prog_id" data_in "$tmp/pkt.bin" repeat 2000000 2>&1 | sed -n 's/.*duration (average): \([0-9]*\)ns.*/\1/p')")
done
test_run=$(median "${tr[@]}")
echo "    flows_tc under BPF_PROG_TEST_RUN: ${tr[*]} ns per run (median $test_run)"

m0=$(median $without); m1=$(median $with)
loss=$(python3 -c "print(round((1-$m1/$m0)*100,2))")
ns=$(python3 -c "print(round(($t1-$t0)/max(1,$c1-$c0),1))")
echo "    median without: $m0 Gbit/s, with: $m1 Gbit/s, loss: $loss %"
echo "    flows_tc_in + flows_tc_out: $((c1-c0)) runs, $ns ns per packet (bpf_stats)"

echo "==> $FLOWS active UDP flows for ${WINDOW}s: the agent's CPU"
# FLOWS distinct 5-tuples (100 source sockets x FLOWS/100 destination ports), each sent to
# about once a second, so every flow stays active (each is seen on both host sides).
cat >"$tmp/flows.py" <<'EOF'
import socket, sys, time
n = int(sys.argv[1]); socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(100)]
ports = n // 100
while True:
    t = time.time()
    for s in socks:
        for p in range(ports):
            s.sendto(b"x", ("10.214.2.2", 20000 + p))
    time.sleep(max(0, 1 - (time.time() - t)))
EOF
ip netns exec srb-b python3 -c 'import socket,time
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
time.sleep(1e9)' &
pids+=($!)
ip netns exec srb-a python3 "$tmp/flows.py" "$FLOWS" &
pids+=($!)
sleep 12
ticks() { awk '{print $14+$15}' "/proc/$agent_pid/stat"; }
# The collector is the agent's thread named "flows".
flows_tid=$(grep -l '^flows$' /proc/$agent_pid/task/*/comm | head -1 | awk -F/ '{print $5}')
cticks() { sed 's/.*) //' "/proc/$agent_pid/task/$flows_tid/stat" | awk '{print $12+$13}'; }
hz=$(getconf CLK_TCK)
k0=$(ticks); c0=$(cticks); s0=$(date +%s.%N)
if [ -n "${PERF_AGENT_OUT:-}" ]; then perf record -g -p "$agent_pid" -o "$PERF_AGENT_OUT" -- sleep "$WINDOW" >/dev/null 2>&1; else sleep "$WINDOW"; fi
k1=$(ticks); c1=$(cticks); s1=$(date +%s.%N)
entries=$(curl -fs "http://127.0.0.1:$agent_port/metrics" | awk '/^sre_agent_flows_table_entries /{print $2}')
sets=$(curl -fs "http://127.0.0.1:$agent_port/metrics" | awk '/^sre_agent_flows_label_sets /{print $2}')
cpu=$(python3 -c "print(round(($k1-$k0)/$hz/($s1-$s0)*100,2))")
ccpu=$(python3 -c "print(round(($c1-$c0)/$hz/($s1-$s0)*100,2))")
echo "    table entries: $entries, label sets: $sets, collector thread CPU: $ccpu % of a core, whole agent: $cpu %"
echo
echo "RESULT runs=$RUNS secs=$SECS without_gbps=[$without] with_gbps=[$with] median_without=$m0 median_with=$m1 loss_pct=$loss ns_per_packet=$ns test_run_ns=$test_run flows=$FLOWS table_entries=$entries label_sets=$sets collector_cpu_pct=$ccpu agent_cpu_pct=$cpu"
