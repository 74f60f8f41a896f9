#!/usr/bin/env python3
"""Catch-up benchmark of the logs path: N bytes of CRI logs in 20 files under a pod log tree,
shipped by the agent (release build) to a local receiver that reads every push and answers 204.
Lines are ~150 bytes with increasing CRI times, 10k lines per second of log time.
Reports MB/s of log files read and shipped, CPU-seconds per GiB (utime+stime of the agent) and
peak RSS (VmHWM).

    scripts/logs-catchup.py [--gib 1.0] [--agent target/release/agent]
    scripts/logs-catchup.py --steady 20 --seconds 30     a steady stream of 20 MB/s instead:
                                                         the agent's CPU share while it ships it

The clock runs from the agent's start until the receiver has every line (counted from the
request bodies' decompressed size is not possible in Python without snappy, so the agent's
own `sre_agent_remote_samples_sent_total` is polled for the line count)."""
import argparse, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Sink(BaseHTTPRequestHandler):
    received = 0
    lock = threading.Lock()

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        with Sink.lock:
            Sink.received += len(body)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


def metric(url, name):
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name) and not l.startswith("#"))


def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tick
    hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            if l.startswith("VmHWM:"):
                hwm = int(l.split()[1]) / 1024
    return cpu, hwm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--agent", default="target/release/agent")
    ap.add_argument("--steady", type=float, default=0.0, help="MB/s of a steady stream (catch-up when 0)")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--shards", type=int, default=4, help="the client's max_shards")
    a = ap.parse_args()
    if a.steady > 0:
        return steady(a)
    tmp = tempfile.mkdtemp(prefix="logs-catchup-")
    root = os.path.join(tmp, "pods")
    per_file = int(a.gib * (1 << 30) / a.files)
    lines = 0
    t0 = time.time()
    for i in range(a.files):
        d = os.path.join(root, f"bench_app-{i}_uid-{i}", "app")
        os.makedirs(d)
        with open(os.path.join(d, "0.log"), "w") as f:
            written, n, buf = 0, 0, []
            while written < per_file:
                l = f"2026-01-01T{n // 36000000 % 24:02d}:{n // 600000 % 60:02d}:{n // 10000 % 60:02d}.{n % 10000 * 100000:09d}Z stdout F level=info caller=handler.go:{n % 400} msg=\"request served\" path=/api/v1/items/{n} status=200 duration_ms={n % 97}\n"
                buf.append(l)
                written += len(l)
                n += 1
                if len(buf) >= 10000:
                    f.write("".join(buf))
                    buf = []
            f.write("".join(buf))
            lines += n
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(root) for fn in fns)
    print(f"wrote {total / 2**30:.2f} GiB, {lines} lines in {a.files} files ({time.time() - t0:.0f}s)")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = free_port()
    cfg = os.path.join(tmp, "agent.yml")
    with open(cfg, "w") as f:
        f.write(f"""logs:
  clients:
    - url: http://127.0.0.1:{srv.server_address[1]}/loki/api/v1/push
      batchwait: 1s
      max_shards: {a.shards}
  scrape_configs:
    - job_name: bench
      kubernetes_pods: {{root: {root}}}
storage:
  wal_max_size: 512MiB
  wal_fsync: 10s
""")
    log = open(os.path.join(tmp, "agent.log"), "w")
    start = time.time()
    p = subprocess.Popen([a.agent, "--config", cfg, "--listen-address", f"127.0.0.1:{port}", "--storage-path", os.path.join(tmp, "data")], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            time.sleep(0.2)
            try:
                sent = metric(url, "sre_agent_remote_samples_sent_total")
            except Exception:
                continue
            if sent >= lines:
                break
            if time.time() - start > 900:
                raise SystemExit(f"timeout: {sent} of {lines} sent")
        elapsed = time.time() - start
        cpu, hwm = stat(p.pid)
        gib = total / 2**30
        print(f"agent: {total / 1e6 / elapsed:.0f} MB/s, {cpu / gib:.2f} CPU-s/GiB, peak RSS {hwm:.0f} MiB "
              f"({elapsed:.1f}s wall, {cpu:.1f} CPU-s, {Sink.received / 2**20:.0f} MiB compressed pushed)")
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


def start_agent(a, tmp, root):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = free_port()
    cfg = os.path.join(tmp, "agent.yml")
    with open(cfg, "w") as f:
        f.write(f"""logs:
  clients:
    - url: http://127.0.0.1:{srv.server_address[1]}/loki/api/v1/push
      batchwait: 1s
  scrape_configs:
    - job_name: bench
      kubernetes_pods: {{root: {root}}}
storage:
  wal_max_size: 512MiB
""")
    log = open(os.path.join(tmp, "agent.log"), "w")
    p = subprocess.Popen([a.agent, "--config", cfg, "--listen-address", f"127.0.0.1:{port}", "--storage-path", os.path.join(tmp, "data")], stdout=log, stderr=log)
    return p, f"http://127.0.0.1:{port}"


def steady(a):
    """Appends a.steady MB/s of CRI lines to 4 files for a.seconds; reports the agent's CPU."""
    tmp = tempfile.mkdtemp(prefix="logs-steady-")
    root = os.path.join(tmp, "pods")
    files = []
    for i in range(4):
        d = os.path.join(root, f"bench_app-{i}_uid-{i}", "app")
        os.makedirs(d)
        files.append(open(os.path.join(d, "0.log"), "a"))
    p, url = start_agent(a, tmp, root)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/readyz", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        time.sleep(1)
        cpu0, _ = stat(p.pid)
        t0 = time.time()
        n, written = 0, 0
        per_tick = a.steady * 1e6 / 10
        while time.time() - t0 < a.seconds:
            tick = time.time()
            budget = 0
            buf = [[] for _ in files]
            while budget < per_tick:
                l = f"2026-01-01T{n // 36000000 % 24:02d}:{n // 600000 % 60:02d}:{n // 10000 % 60:02d}.{n % 10000 * 100000:09d}Z stdout F level=info caller=handler.go:{n % 400} msg=\"request served\" path=/api/v1/items/{n} status=200 duration_ms={n % 97}\n"
                buf[n % len(files)].append(l)
                budget += len(l)
                n += 1
            for f, b in zip(files, buf):
                f.write("".join(b))
                f.flush()
            written += budget
            time.sleep(max(0.0, 0.1 - (time.time() - tick)))
        elapsed = time.time() - t0
        deadline = time.time() + 60
        while metric(url, "sre_agent_remote_samples_sent_total") < n and time.time() < deadline:
            time.sleep(0.2)
        cpu1, hwm = stat(p.pid)
        print(f"steady {written / 1e6 / elapsed:.1f} MB/s for {elapsed:.0f}s: agent CPU {100 * (cpu1 - cpu0) / elapsed:.1f}% of a core, peak RSS {hwm:.0f} MiB")
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
