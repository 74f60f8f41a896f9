#!/usr/bin/env python3
"""End-to-end comparison of scrape-and-remote-write agents on the same synthetic targets.

Runs our agent, vmagent and Prometheus (agent mode) ONE AFTER ANOTHER against the same
synthetic targets and the same remote_write receiver (a single-node victoria-metrics), and
prints for each one:

  * CPU-seconds (utime+stime of the contender's process) per million samples delivered,
  * peak RSS (VmHWM) in MiB,
  * samples/s delivered to the receiver (delta of its rows-inserted counter over the window),
  * errors: failed scrapes (``up == 0`` samples in the window, read back from the receiver) +
    samples/requests the contender itself reports as failed or dropped + write requests the
    receiver rejected.

Only the contender's own process is measured: the targets run in a child Python process and
the receiver in its own process. Everything binds to 127.0.0.1 on free ports; temporary
directories are removed at the end. Python 3.11 standard library only.

    scripts/compare.py --targets 10 --series 10000 --interval 1s --duration 60 --warmup 10
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import itertools
import json
import os
import platform
import random
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTENDERS = ("agent", "vmagent", "prometheus")
# Series every contender adds per scrape: up, scrape_duration_seconds, scrape_samples_scraped,
# scrape_samples_post_metric_relabeling, scrape_series_added.
AUTO_SERIES = 5
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOADAVG = "?"


# --------------------------------------------------------------------------------------------
# Synthetic targets (run in a child process: `compare.py --serve-targets N --series S`)
# --------------------------------------------------------------------------------------------

BUCKETS = ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf")

# name, type, help, label names; the value pools of the first labels are fixed, the last
# label of each family is open-ended so that every label set is unique.
FAMILIES = [
    ("http_requests_total", "counter", "HTTP requests served.",
     ("service", "method", "code", "handler")),
    ("http_request_duration_seconds", "histogram", "HTTP request latency.",
     ("service", "method", "handler")),
    ("http_response_size_bytes", "histogram", "HTTP response size.",
     ("service", "zone", "handler")),
    ("rpc_client_calls_total", "counter", "Outgoing RPC calls.",
     ("service", "zone", "peer", "result", "rpc_method")),
    ("db_query_duration_seconds", "histogram", "Database query latency.",
     ("db", "operation", "table")),
    ("work_queue_depth", "gauge", "Items waiting in the work queue.",
     ("service", "queue", "shard")),
    ("cache_requests_total", "counter", "Cache look-ups.",
     ("cache", "tier", "outcome", "key_prefix")),
    ("cache_entries", "gauge", "Entries held in the cache.",
     ("cache", "tier", "node")),
    ("container_memory_working_set_bytes", "gauge", "Working-set memory of a container.",
     ("namespace", "container", "pod")),
    ("net_connections_open", "gauge", "Open network connections.",
     ("service", "pool", "state", "peer_addr")),
]
GAUGE_SCALE = {"work_queue_depth": 2000, "cache_entries": 5e6,
               "container_memory_working_set_bytes": 4e9, "net_connections_open": 800}
# share of the series budget per family (histograms dominate real pages)
WEIGHTS = [14, 22, 10, 10, 12, 6, 8, 6, 7, 5]

POOLS = {
    "service": ["checkout", "cart", "catalog", "payments", "search", "users", "shipping", "auth"],
    "method": ["GET", "POST", "PUT", "DELETE"],
    "code": ["200", "201", "204", "301", "400", "404", "429", "500", "503"],
    "zone": ["eu-west-1a", "eu-west-1b", "eu-west-1c"],
    "peer": ["inventory", "pricing", "ledger", "notifier", "geo", "fraud"],
    "result": ["ok", "error", "timeout", "cancelled"],
    "db": ["orders", "accounts", "events"],
    "operation": ["select", "insert", "update", "delete"],
    "tier": ["l1", "l2"],
    "outcome": ["hit", "miss", "expired"],
    "cache": ["sessions", "products", "prices", "tokens"],
    "namespace": ["shop", "platform", "observability", "ingress"],
    "state": ["active", "idle", "closing"],
    "pool": ["primary", "replica", "batch"],
    "queue": ["ingest", "render", "email", "billing", "reindex"],
    "container": ["app", "sidecar", "init-db"],
}
OPEN_ENDED = {
    "handler": lambda i: f"/api/v{1 + i % 3}/resource{i}",
    "rpc_method": lambda i: f"Service{i % 17}/Method{i}",
    "table": lambda i: f"table_{i}",
    "shard": lambda i: f"{i}",
    "key_prefix": lambda i: f"prefix:{i:05d}",
    "node": lambda i: f"node-{i:04d}",
    "peer_addr": lambda i: f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:443",
    "pod": lambda i: f"pod-{i:05d}-{(i * 2654435761) % 99991:05x}",
}


def _label_sets(names, count):
    """`count` distinct label sets: fixed pools in mixed radix, the last label open-ended."""
    fixed = names[:-1]
    sizes = [len(POOLS[n]) for n in fixed]
    out = []
    for i in range(count):
        rest, parts = i, []
        for n, size in zip(fixed, sizes):
            parts.append(f'{n}="{POOLS[n][rest % size]}"')
            rest //= size
        last = names[-1]
        value = OPEN_ENDED[last](rest) if last in OPEN_ENDED else f"{last}-{rest}"
        parts.append(f'{last}="{value}"')
        out.append(",".join(parts))
    return out


def build_pages(target, series):
    """Two variants (A, B) of one target's page, each exactly `series` series."""
    rng = random.Random(1000 + target)
    total_w = sum(WEIGHTS)
    budget = [series * w // total_w for w in WEIGHTS]
    per_set = [len(BUCKETS) + 2 if f[1] == "histogram" else 1 for f in FAMILIES]
    # round histogram budgets down to whole label sets; give the remainder to the last gauge
    sets = [max(1, b // p) for b, p in zip(budget, per_set)]
    used = sum(s * p for s, p in zip(sets, per_set))
    while used > series and any(s > 1 for s in sets):  # tiny --series: shrink
        j = max(range(len(sets)), key=lambda k: sets[k] * per_set[k])
        sets[j] -= 1
        used -= per_set[j]
    sets[-1] += max(0, series - used)
    a, b = [], []
    for (name, typ, help_, labels), n in zip(FAMILIES, sets):
        header = f"# HELP {name} {help_}\n# TYPE {name} {typ}\n"
        a.append(header)
        b.append(header)
        for ls in _label_sets(labels, n):
            if typ == "counter":
                v = rng.randrange(1, 10_000_000)
                a.append(f"{name}{{{ls}}} {v}\n")
                b.append(f"{name}{{{ls}}} {v + rng.randrange(1, 500)}\n")
            elif typ == "gauge":
                v = rng.uniform(0, GAUGE_SCALE[name])
                a.append(f"{name}{{{ls}}} {round(v)}\n")
                b.append(f"{name}{{{ls}}} {round(v * rng.uniform(0.9, 1.1))}\n")
            else:
                cum_a = cum_b = 0
                for le in BUCKETS:
                    step = rng.randrange(0, 5000)
                    cum_a += step
                    cum_b += step + rng.randrange(0, 50)
                    a.append(f'{name}_bucket{{{ls},le="{le}"}} {cum_a}\n')
                    b.append(f'{name}_bucket{{{ls},le="{le}"}} {cum_b}\n')
                s = rng.uniform(1, 1e6)
                a.append(f"{name}_sum{{{ls}}} {s:.6f}\n{name}_count{{{ls}}} {cum_a}\n")
                b.append(f"{name}_sum{{{ls}}} {s * 1.001:.6f}\n{name}_count{{{ls}}} {cum_b}\n")
    return "".join(a).encode(), "".join(b).encode()


def serve_targets(counts):
    """Child process: one listener thread per port (one per entry of `counts`, the series of
    each target); prints the ports as one JSON line."""
    pages = []
    n = len(counts)
    for t, series in enumerate(counts):
        variants = build_pages(t, series)
        pages.append([(raw, gzip.compress(raw, compresslevel=6)) for raw in variants])

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real exporters
        server_version = "compare-target"

        def do_GET(self):  # noqa: N802
            srv = self.server
            raw, gz = srv.variants[next(srv.hits) % 2]
            use_gz = "gzip" in self.headers.get("Accept-Encoding", "")
            body = gz if use_gz else raw
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            if use_gz:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    servers = []
    for t in range(n):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        srv.variants = pages[t]
        srv.hits = itertools.count()
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    sizes = [(len(p[0][0]), len(p[0][1])) for p in pages]
    print(json.dumps({"ports": [s.server_address[1] for s in servers], "sizes": sizes}),
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1):
        if os.getppid() == 1:  # parent gone
            break
    for s in servers:
        s.shutdown()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def parse_duration(s):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {s!r} (e.g. 500ms, 1s, 1m)")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def prom_duration(seconds):
    ms = int(round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8", "replace")


def wait_http(url, proc, timeout, what):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            http_get(url, timeout=2)
            return
        except (OSError, urllib.error.URLError) as e:
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready at {url} after {timeout}s ({last})")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text):
    """{(name, '{labels}'): value} of a Prometheus text page (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out[(m.group(1), m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after "pid (comm)": state is fields[0]; utime=14th, stime=15th field overall
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def stop_process(proc, grace=30.0):
    """SIGTERM, wait, then SIGKILL — by PID only."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def run_version(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        text = (r.stdout + r.stderr).strip()
        return text.splitlines()[0].strip() if text else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def deb_version(pkg):
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                           text=True, timeout=20)
        return r.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------
# receiver
# --------------------------------------------------------------------------------------------

class Receiver:
    """Single-node victoria-metrics taking Prometheus remote_write on /api/v1/write."""

    ROWS = ("vm_rows_inserted_total", '{type="promremotewrite"}')

    def __init__(self, workdir):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.data = os.path.join(workdir, "receiver-data")
        self.log_path = os.path.join(workdir, "receiver.log")
        self.proc = None

    def start(self):
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            ["victoria-metrics", f"-httpListenAddr=127.0.0.1:{self.port}",
             f"-storageDataPath={self.data}", "-retentionPeriod=1d",
             "-search.latencyOffset=0s", "-loggerLevel=WARN"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_http(self.base + "/metrics", self.proc, 30, "victoria-metrics")
        if self.ROWS not in parse_metrics(http_get(self.base + "/metrics")):
            raise RuntimeError("victoria-metrics exposes no "
                               'vm_rows_inserted_total{type="promremotewrite"}')

    def counters(self):
        m = parse_metrics(http_get(self.base + "/metrics"))
        errs = sum(v for (n, l), v in m.items()
                   if n in ("vm_http_request_errors_total",) and "/api/v1/write" in l)
        errs += sum(v for (n, l), v in m.items()
                    if n in ("vm_protoparser_unmarshal_errors_total",
                             "vm_protoparser_read_errors_total") and "promremotewrite" in l)
        return {"rows": m.get(self.ROWS, 0.0), "write_errors": errs}

    def cpu(self):
        return proc_cpu_seconds(self.proc.pid)

    def export(self, selector, start_ms, end_ms):
        """Raw samples [(labels, [values])] of `selector` with timestamps in [start, end]."""
        try:
            urllib.request.urlopen(self.base + "/internal/force_flush", timeout=10).read()
        except (OSError, urllib.error.URLError):
            pass
        q = urllib.parse.urlencode({"match[]": selector, "start": f"{start_ms / 1000:.3f}",
                                    "end": f"{end_ms / 1000:.3f}"})
        out = []
        for line in http_get(f"{self.base}/api/v1/export?{q}", timeout=60).splitlines():
            if line.strip():
                d = json.loads(line)
                out.append((d["metric"], d["values"], d["timestamps"]))
        return out

    def stop(self):
        stop_process(self.proc)
        if self.proc is not None:
            self.log.close()


# --------------------------------------------------------------------------------------------
# contenders
# --------------------------------------------------------------------------------------------

def scrape_config_yaml(ports, interval_s):
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in ports)
    iv = prom_duration(interval_s)
    timeout = prom_duration(min(interval_s, 10.0))
    return (f"global:\n  scrape_interval: {iv}\n  scrape_timeout: {timeout}\n"
            f"scrape_configs:\n  - job_name: compare\n    static_configs:\n"
            f"      - targets: [{targets}]\n")


def remote_write_yaml(url):
    return f"remote_write:\n  - url: {url}\n"


def error_counters(name, metrics):
    """{counter: value} a contender reports about its own failures/drops (all summed)."""
    out = {}
    for (n, labels), v in metrics.items():
        key = n + labels
        if name == "agent":
            if not n.startswith("sre_agent_"):
                continue
            if re.search(r"(fail|error|dropped|evicted|rejected|timeout|corrupt)", n) and \
                    not n.endswith(("_bucket", "_sum", "_count")):
                out[key] = v
        elif name == "vmagent":
            if n in ("vm_promscrape_scrapes_failed_total", "vm_promscrape_scrapes_timed_out_total",
                     "vm_promscrape_scrapes_gunzip_failed_total",
                     "vmagent_remotewrite_packets_dropped_total",
                     "vmagent_remotewrite_samples_dropped_total",
                     "vm_persistentqueue_bytes_dropped_total",
                     "vmagent_remotewrite_errors_total"):
                out[key] = v
            elif n == "vmagent_remotewrite_requests_total" and \
                    not re.search(r'status_code="2(\d\d|XX)"', labels, re.I):
                out[key] = v
        elif name == "prometheus":
            if n in ("prometheus_remote_storage_samples_failed_total",
                     "prometheus_remote_storage_samples_dropped_total",
                     "prometheus_target_scrapes_exceeded_sample_limit_total",
                     "prometheus_target_scrapes_exceeded_body_size_limit_total",
                     "prometheus_target_scrapes_sample_out_of_order_total",
                     "prometheus_target_scrapes_sample_duplicate_timestamp_total",
                     "prometheus_target_scrapes_sample_out_of_bounds_total",
                     "prometheus_agent_out_of_order_samples_total"):
                out[key] = v
    return out


def info_counters(name, metrics):
    """Counters shown for context (retries, queue sizes) — not counted as errors."""
    pats = {
        "agent": r"^sre_agent_",
        "vmagent": r"^(vmagent_remotewrite_(retries_count_total|pending_data_bytes|"
                   r"blocks_sent_total|requests_total)|vm_promscrape_scrapes_total)$",
        "prometheus": r"^prometheus_remote_storage_(samples_retried_total|samples_pending|"
                      r"samples_total|shards)$",
    }[name]
    return {n + l: v for (n, l), v in metrics.items()
            if re.search(pats, n) and not n.endswith(("_bucket", "_sum"))}


LOG_LEVEL = re.compile(
    r"(?:\blevel=(warn|error)\b|\t(warn|error|fatal|panic)\t|\s(WARN|ERROR)\s"
    r"|\"level\":\"(WARN|ERROR|warn|error)\")")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log_problems(path, start=0, end=None):
    """warn/error lines of a log, from byte offset `start` to `end`."""
    lines = []
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
            for raw in data.splitlines():
                line = ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
                if LOG_LEVEL.search(line):
                    lines.append(line)
    except OSError:
        pass
    return lines


class Contender:
    def __init__(self, name, args, workdir, ports, receiver):
        self.name = name
        self.args = args
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir)
        self.port = free_port()
        self.log_path = os.path.join(self.dir, "log.txt")
        self.proc = None
        scrape = scrape_config_yaml(ports, args.interval_s)
        rw_url = receiver.base + "/api/v1/write"
        data = os.path.join(self.dir, "data")
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            # vmagent takes remote_write from flags; its -promscrape.config is the same scrape part
            f.write(scrape if name == "vmagent" else scrape + remote_write_yaml(rw_url))
        listen = f"127.0.0.1:{self.port}"
        if name == "agent":
            self.cmd = [args.agent_bin, "--config", cfg, "--storage-path", data,
                        "--listen-address", listen]
        elif name == "vmagent":
            # graphite/influx/opentsdb listeners are off unless set; no other network use.
            # -promscrape.maxScrapeSize: its default (16 MiB) would refuse a large target's
            # page, which our agent (no body_size_limit by default) and Prometheus take.
            self.cmd = ["vmagent", f"-promscrape.config={cfg}", f"-remoteWrite.url={rw_url}",
                        f"-remoteWrite.tmpDataPath={data}", f"-httpListenAddr={listen}",
                        "-promscrape.maxScrapeSize=1GB"]
        else:
            self.cmd = ["prometheus", "--enable-feature=agent", f"--config.file={cfg}",
                        f"--storage.agent.path={data}", f"--web.listen-address={listen}"]
        self.metrics_url = f"http://{listen}/metrics"

    def start(self):
        self.log = open(self.log_path, "wb")
        env = dict(os.environ, NO_COLOR="1")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.dir, env=env)
        wait_http(self.metrics_url, self.proc, 60, self.name)

    def metrics(self):
        return parse_metrics(http_get(self.metrics_url, timeout=10))

    def stop(self):
        stop_process(self.proc, grace=30)
        if self.proc is not None:
            self.log.close()


class RssSampler:
    """VmRSS of a process every 250 ms, in a thread."""

    def __init__(self, pid):
        self.pid = pid
        self.samples = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.done.wait(0.25):
            try:
                kib = proc_status_kib(self.pid, "VmRSS")
            except OSError:
                return
            with self.lock:
                self.samples.append(kib)

    def reset(self):
        with self.lock:
            self.samples = []

    def peak_mib(self):
        with self.lock:
            return max(self.samples, default=0) / 1024.0

    def median_mib(self):
        with self.lock:
            s = sorted(self.samples)
        return s[len(s) // 2] / 1024.0 if s else 0.0

    def stop(self):
        self.done.set()


def measure(name, args, workdir, ports, receiver):
    c = Contender(name, args, workdir, ports, receiver)
    res = {"name": name, "cmd": c.cmd}
    try:
        print(f"==> {name}: {shlex.join(c.cmd)}", file=sys.stderr, flush=True)
        rows_before = receiver.counters()["rows"]
        t_start = time.monotonic()
        c.start()
        rss = RssSampler(c.proc.pid)
        # the warm-up starts with the first sample delivered (Prometheus, for one, applies
        # its targets only after ~5 s), so that every contender is measured in steady state
        while receiver.counters()["rows"] == rows_before:
            if c.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {c.proc.returncode}")
            if time.monotonic() - t_start > 120:
                raise RuntimeError(f"{name} delivered nothing within 120 s")
            time.sleep(0.1)
        res["first_delivery_s"] = time.monotonic() - t_start
        time.sleep(args.warmup)
        if c.proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {c.proc.returncode} during warm-up")
        res["rss_startup_peak_mib"] = rss.peak_mib()
        rss.reset()
        pid = c.proc.pid
        m0, r0 = c.metrics(), receiver.counters()
        c.log.flush()
        log0 = os.path.getsize(c.log_path)
        cpu0, rcpu0, t0, wall0 = proc_cpu_seconds(pid), receiver.cpu(), time.monotonic(), \
            time.time()
        time.sleep(args.duration)
        cpu1, rcpu1, t1, wall1 = proc_cpu_seconds(pid), receiver.cpu(), time.monotonic(), \
            time.time()
        r1, m1 = receiver.counters(), c.metrics()
        hwm = proc_status_kib(pid, "VmHWM")
        res["rss_steady_mib"] = rss.median_mib()
        rss.stop()
        log1 = os.path.getsize(c.log_path)
        res["rss_parts"] = {k: proc_status_kib(pid, k) / 1024.0
                            for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
        if c.proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {c.proc.returncode} while measured")
        elapsed = t1 - t0
        e0, e1 = error_counters(name, m0), error_counters(name, m1)
        err_deltas = {k: v - e0.get(k, 0.0) for k, v in e1.items() if v - e0.get(k, 0.0) > 0}
        i0, i1 = info_counters(name, m0), info_counters(name, m1)
        res.update(
            cpu=cpu1 - cpu0, elapsed=elapsed, rss_mib=hwm / 1024.0,
            delivered=r1["rows"] - r0["rows"],
            receiver_errors=r1["write_errors"] - r0["write_errors"],
            receiver_cpu=rcpu1 - rcpu0, own_errors=err_deltas,
            info_end={k: v for k, v in i1.items()},
            info_delta={k: v - i0.get(k, 0.0) for k, v in i1.items()},
            window_ms=(int(wall0 * 1000), int(wall1 * 1000)), log_window=(log0, log1),
        )
    except Exception as e:  # noqa: BLE001 — report and go on with the next contender
        res["failure"] = f"{type(e).__name__}: {e}"
    finally:
        t_stop = time.monotonic()
        c.stop()
        res["stop_s"] = time.monotonic() - t_stop
        res["exit"] = c.proc.returncode if c.proc is not None else None
        lw = res.get("log_window")
        res["log_problems"] = log_problems(c.log_path)
        res["log_window_problems"] = log_problems(c.log_path, *lw) if lw else None
        if "failure" in res:
            try:
                with open(c.log_path, "rb") as f:
                    res["log_tail"] = f.read().decode("utf-8", "replace").splitlines()[-15:]
            except OSError:
                res["log_tail"] = []
    if "window_ms" in res:
        # failed scrapes / scrapes seen, from the `up` series this contender wrote
        time.sleep(2)
        w0, w1 = res["window_ms"]
        try:
            ups = receiver.export('{__name__="up",job="compare"}', w0, w1)
            vals = [v for _, vs, _ in ups for v in vs]
            res["scrapes"] = len(vals)
            res["scrapes_failed"] = sum(1 for v in vals if v == 0)
            sc = receiver.export('{__name__="scrape_samples_scraped",job="compare"}', w0, w1)
            res["scraped"] = sum(v for _, vs, _ in sc for v in vs)
        except Exception as e:  # noqa: BLE001
            res["scrapes_note"] = f"export failed: {e}"
    return res


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

def n_targets(args):
    return args.targets + (1 if args.big_target else 0) + (1 if args.node_exporter else 0)


def total_series(args):
    """Series per scrape round, auto series included."""
    return (args.targets * args.series + args.big_target + args.node_exporter_series
            + n_targets(args) * AUTO_SERIES)


def fmt_row(r, args):
    expected_scrapes = n_targets(args) * args.duration / args.interval_s
    expected_rate = total_series(args) / args.interval_s
    if "failure" in r and "delivered" not in r:
        return [r["name"]] + ["-"] * 9 + ["FAILED", "-"]
    rate = r["delivered"] / r["elapsed"]
    per_m = r["cpu"] / (r["delivered"] / 1e6) if r["delivered"] > 0 else float("inf")
    errors = (r.get("scrapes_failed", 0) + int(sum(r["own_errors"].values()))
              + int(r["receiver_errors"]))
    scrapes = r.get("scrapes")
    steady = r.get("rss_steady_mib", 0.0)
    return [
        r["name"],
        f"{per_m:.2f}",
        f"{r['cpu'] / r['elapsed'] * 100:.1f}%",
        f"{steady:.1f}",
        f"{r.get('rss_startup_peak_mib', 0.0):.1f}",
        f"{r['rss_mib']:.1f}",
        f"{steady * 1048576 / total_series(args):.0f}",
        f"{rate:,.0f}",
        f"{rate / expected_rate * 100:.1f}%",
        f"{scrapes}/{expected_scrapes:.0f}" if scrapes is not None else "?",
        str(errors) + (" (FAILED)" if "failure" in r else ""),
        str(len(r["log_window_problems"])) if r.get("log_window_problems") is not None else "?",
    ]


HEADERS = ["contender", "CPU s / M samples", "CPU (of 1 core)", "steady RSS MiB",
           "start-up peak RSS MiB", "peak RSS MiB", "bytes/series (steady RSS)",
           "samples/s delivered", "of expected", "scrapes seen/expected", "errors",
           "warn/error log lines"]


def print_plain(rows):
    widths = [max(len(str(x)) for x in col) for col in zip(HEADERS, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(HEADERS, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(x).rjust(w) if i else str(x).ljust(w)
                        for i, (x, w) in enumerate(zip(row, widths))))


def print_markdown(rows, args, versions, sizes):
    print("```")
    print("$ " + shlex.join(["scripts/compare.py"] + sys.argv[1:]))
    print("```")
    print()
    print(f"- machine: {os.cpu_count()} CPUs (`nproc` {nproc()}), {cpu_model()}, "
          f"Linux {platform.release()}, load average at start {LOADAVG}")
    for k, v in versions.items():
        print(f"- {k}: `{v}`")
    raw, gz = sizes
    extra = ""
    if args.big_target:
        braw, bgz = args.big_sizes
        extra += (f" + one target × {args.big_target} series (page {braw / 1048576:.1f} MiB, "
                  f"{bgz / 1048576:.1f} MiB gzip)")
    if args.node_exporter:
        extra += f" + prometheus-node-exporter ({args.node_exporter_series} series)"
    print(f"- workload: {args.targets} targets × {args.series} series{extra} (+{AUTO_SERIES} "
          f"auto series each; {total_series(args):,} series in all) every "
          f"{prom_duration(args.interval_s)}; page {raw / 1024:.0f} KiB "
          f"({gz / 1024:.0f} KiB gzip); expected "
          f"{total_series(args) / args.interval_s:,.0f} samples/s; "
          f"warm-up {args.warmup:g} s after the first delivered sample, measured {args.duration:g} s, one contender at a time; "
          f"receiver: victoria-metrics single node")
    print()
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(HEADERS))) + "|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    print()
    print("CPU = utime+stime of the contender's process over the measured window; "
          "samples = rows the receiver inserted from remote_write in that window; "
          "errors = failed scrapes (`up == 0`) + failures/drops the contender reports + "
          "write requests the receiver rejected; warn/error log lines are counted in the "
          "measured window only. Steady RSS = median VmRSS (sampled every 250 ms) over the "
          "measured window; start-up peak = highest VmRSS from start to the end of the "
          "warm-up; peak = VmHWM over the whole run; bytes/series = steady RSS / series "
          "per scrape round.")


def nproc():
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return str(os.cpu_count())


def print_details(results):
    print("\nDetails", file=sys.stdout)
    for r in results:
        fd = r.get("first_delivery_s")
        print(f"\n[{r['name']}] exit code {r.get('exit')}, stopped in {r.get('stop_s', 0):.1f} s"
              + (f", first sample delivered {fd:.1f} s after start" if fd is not None else ""))
        if "failure" in r:
            print(f"  FAILURE: {r['failure']}")
            for line in r.get("log_tail", []):
                print(f"    | {line}")
        if "cpu" in r:
            print(f"  cpu {r['cpu']:.2f} s over {r['elapsed']:.1f} s; receiver cpu "
                  f"{r['receiver_cpu']:.2f} s; delivered {r['delivered']:,.0f} samples; "
                  f"scraped (sum of scrape_samples_scraped) {r.get('scraped', 0):,.0f}; "
                  f"failed scrapes {r.get('scrapes_failed', '?')}; "
                  f"receiver write errors {r['receiver_errors']:.0f}")
        if r.get("rss_parts"):
            print("  memory at the end (MiB): " + ", ".join(
                f"{k} {v:.1f}" for k, v in r["rss_parts"].items())
                + f"; peak VmHWM {r['rss_mib']:.1f}")
        if r.get("scrapes_note"):
            print(f"  {r['scrapes_note']}")
        for k, v in sorted(r.get("own_errors", {}).items()):
            print(f"  error counter +{v:,.0f}  {k}")
        if r["name"] == "agent" and r.get("info_end"):
            for k, v in sorted(r["info_end"].items()):
                d = r["info_delta"].get(k, 0.0)
                if v or d:
                    print(f"  {k} = {v:,.6g} (window +{d:,.6g})")
        probs = r.get("log_problems", [])
        inwin = r.get("log_window_problems") or []
        if probs:
            print(f"  {len(probs)} warn/error log lines over the whole run, "
                  f"{len(inwin)} in the measured window")
            shown = inwin[:8] if inwin else probs[:8]
            for line in shown:
                print(f"    | {line[:300]}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-targets":
        serve_targets([int(x) for x in sys.argv[2].split(",")])
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--targets", type=int, default=10, help="synthetic targets (ports)")
    p.add_argument("--series", type=int, default=10000, help="series per target")
    p.add_argument("--interval", default="1s", help="scrape_interval")
    p.add_argument("--duration", type=float, default=60, help="measured seconds per contender")
    p.add_argument("--warmup", type=float, default=10, help="seconds before measuring")
    p.add_argument("--only", default=",".join(CONTENDERS),
                   help="comma-separated subset of " + ",".join(CONTENDERS))
    p.add_argument("--big-target", type=int, default=0,
                   help="series of one extra, large target (0 = none)")
    p.add_argument("--node-exporter", action="store_true",
                   help="also scrape a prometheus-node-exporter started for the run")
    p.add_argument("--agent-bin", default=os.path.join(ROOT, "target/release/agent"),
                   help="our agent binary")
    args = p.parse_args()
    args.interval_s = parse_duration(args.interval)
    args.agent_bin = os.path.abspath(args.agent_bin)  # contenders run in their own directory
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in only if x not in CONTENDERS]
    if bad or not only:
        p.error(f"--only: unknown {bad}; choose from {','.join(CONTENDERS)}")
    if args.targets < 1 or args.series < 50 or args.duration <= 0 or args.warmup < 0:
        p.error("need --targets >= 1, --series >= 50, --duration > 0, --warmup >= 0")

    missing = []
    if "agent" in only and not os.access(args.agent_bin, os.X_OK):
        print(f"error: {args.agent_bin} not found; build it first:\n"
              f"  cargo build --release -p sre-lab-agent", file=sys.stderr)
        return 1
    for tool, pkg in (("vmagent", "victoria-metrics"), ("prometheus", "prometheus")):
        if tool in only and not shutil.which(tool):
            missing.append(pkg)
    if not shutil.which("victoria-metrics"):
        missing.append("victoria-metrics")
    if missing:
        print(f"error: missing {', '.join(sorted(set(missing)))} "
              f"(apt-get install {' '.join(sorted(set(missing)))})", file=sys.stderr)
        return 1

    versions = {}
    if "agent" in only:
        versions["agent"] = run_version([args.agent_bin, "--version"])
    if "vmagent" in only:
        v = run_version(["vmagent", "-version"])
        versions["vmagent"] = v or f"(no -version output) debian victoria-metrics " \
                                   f"{deb_version('victoria-metrics')}"
    if "prometheus" in only:
        versions["prometheus"] = run_version(["prometheus", "--version"])
    versions["receiver"] = (run_version(["victoria-metrics", "-version"])
                            or f"victoria-metrics debian {deb_version('victoria-metrics')}")

    global LOADAVG
    try:
        with open("/proc/loadavg") as f:
            LOADAVG = " ".join(f.read().split()[:3])
    except OSError:
        pass
    workdir = tempfile.mkdtemp(prefix="sre-lab-compare-")
    targets = receiver = node_exporter = None
    args.node_exporter_series = 0
    results = []
    try:
        print(f"==> generating {args.targets} targets × {args.series} series",
              file=sys.stderr, flush=True)
        counts = [args.series] * args.targets + ([args.big_target] if args.big_target else [])
        targets = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-targets",
             ",".join(map(str, counts))], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        ready, _, _ = select.select([targets.stdout], [], [], 300)
        line = targets.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError("the target server did not start")
        info = json.loads(line)
        ports, sizes = info["ports"], info["sizes"][0]
        if args.big_target:
            args.big_sizes = info["sizes"][-1]
        if args.node_exporter:
            ne_port = free_port()
            node_exporter = subprocess.Popen(
                ["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{ne_port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            wait_http(f"http://127.0.0.1:{ne_port}/metrics", node_exporter, 30, "node_exporter")
            args.node_exporter_series = sum(
                1 for line in http_get(f"http://127.0.0.1:{ne_port}/metrics").splitlines()
                if line and not line.startswith("#"))
            ports = ports + [ne_port]
        receiver = Receiver(workdir)
        receiver.start()
        for name in only:
            results.append(measure(name, args, workdir, ports, receiver))
            time.sleep(2)  # let the receiver settle between contenders
    finally:
        if receiver is not None:
            receiver.stop()
        stop_process(targets, grace=10)
        stop_process(node_exporter, grace=10)
        shutil.rmtree(workdir, ignore_errors=True)

    rows = [fmt_row(r, args) for r in results]
    print()
    print_plain(rows)
    print_details(results)
    print("\n--- Markdown (for BENCHMARKS.md) ---\n")
    print_markdown(rows, args, versions, sizes)
    return 0 if all("failure" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
