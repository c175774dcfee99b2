"""OTLP path throughput: spans per daemon CPU-second through receive → join → forward.

A gRPC client sends pre-built ``ExportTraceServiceRequest`` messages of 512
spans each (pre-serialized bytes, several calls in flight) to a real
``isoscope run`` subprocess as fast as it acknowledges them; the daemon
forwards to a sink backend (a separate process: a gRPC TraceService that acks
without parsing and notes when each request arrived). The run ends when every
sent request has reached the sink.

Figures:
    * spans/s (wall) and spans per daemon CPU-second (user + sys of the daemon
      process from psutil over the same interval) = "spans/s per core";
    * added latency, send → arrival at the sink, p50/p99 per request, both at
      saturation and in a paced phase at a moderate rate;
    * baseline in the same run: a Python (upb) parse + re-encode loop over the
      same requests, spans per CPU-second.

Each request's first span carries a unique fixed-width marker in its name, so
the sink can tie an arrival to a send time with one regex over the raw bytes.
Spans carry the client's ``process.pid`` and ``thread.id``, so with probes on
every span is resolved and joined (the normal mode). Run as root:

    .venv/bin/python bench/throughput.py [--requests 200] [--inflight 4] [--modes probes,no-probes]
        [--profile] [--write bench/results/throughput.md]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger(__name__)

SPANS_PER_REQUEST = 512
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
MARK_FMT = b"BQMARK%010d"
MARK_RE = re.compile(rb"BQMARK(\d{10})")
TARGET, GOAL = 20_000, 60_000
SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


# -- the sink ------------------------------------------------------------------------------

def _sink_main(conn: Any) -> None:
    """A TraceService that acks raw bytes and records (marker, arrival monotonic ns)."""
    import grpc

    arrivals: list[tuple[int, int]] = []
    lock = threading.Lock()

    def export(raw: bytes, context: Any) -> bytes:
        t = time.monotonic_ns()
        m = MARK_RE.search(raw)
        if m:
            with lock:
                arrivals.append((int(m.group(1)), t))
        return b""  # an empty ExportTraceServiceResponse

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Export": grpc.unary_unary_rpc_method_handler(export, request_deserializer=None, response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    while True:
        cmd = conn.recv()
        if cmd == "arrivals":
            with lock:
                conn.send(list(arrivals))
        elif cmd == "reset":
            with lock:
                arrivals.clear()
            conn.send(True)
        else:
            break
    server.stop(0)


class Sink:
    """The sink backend in its own process (so its CPU and GIL are not the client's)."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_sink_main, args=(child,), daemon=True)
        self._proc.start()
        self.port: int = self._conn.recv()

    def arrivals(self) -> dict[int, int]:
        self._conn.send("arrivals")
        return dict(self._conn.recv())

    def reset(self) -> None:
        self._conn.send("reset")
        self._conn.recv()

    def close(self) -> None:
        try:
            self._conn.send("stop")
        except OSError:
            pass
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)


# -- requests -------------------------------------------------------------------------------

def build_templates(n: int) -> list[bytes]:
    """``n`` distinct serialized requests of 512 spans, each with a marker placeholder in span 0's name."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    now = time.time_ns()
    tid = threading.get_native_id()
    out = []
    for t in range(n):
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        for k, v in (("service.name", "bench-client"), ("telemetry.sdk.language", "python"),
                     ("host.name", "bench")):
            a = rs.resource.attributes.add()
            a.key, a.value.string_value = k, v
        a = rs.resource.attributes.add()
        a.key, a.value.int_value = "process.pid", os.getpid()
        ss = rs.scope_spans.add()
        ss.scope.name = "bench.throughput"
        for i in range(SPANS_PER_REQUEST):
            s = ss.spans.add()
            s.trace_id = os.urandom(16)
            s.span_id = os.urandom(8)
            s.parent_span_id = os.urandom(8)
            s.name = (MARK_FMT % 0).decode() if i == 0 else f"GET /api/items/{i % 17}"
            s.kind = 2
            # Spans that ended in the last few milliseconds before the request was built.
            s.start_time_unix_nano = now - 5_000_000 - i * 1000
            s.end_time_unix_nano = now - i * 1000
            for k, v in (("http.request.method", "GET"), ("url.path", f"/api/items/{i % 17}"),
                         ("http.route", "/api/items/<id>"), ("server.address", "127.0.0.1"),
                         ("user_agent.original", "bench/1.0")):
                kv = s.attributes.add()
                kv.key, kv.value.string_value = k, v
            for k, iv in (("http.response.status_code", 200), ("server.port", 8080), ("thread.id", tid)):
                kv = s.attributes.add()
                kv.key, kv.value.int_value = k, iv
            s.status.code = 1
        out.append(req.SerializeToString())
    return out


def with_marker(template: bytes, seq: int) -> bytes:
    """The template with its marker set to ``seq`` (same length, so the framing stays valid)."""
    return template.replace(MARK_FMT % 0, MARK_FMT % seq, 1)


# -- the client -----------------------------------------------------------------------------

class Client:
    """Sends pre-serialized requests over one gRPC channel; records send times."""

    def __init__(self, endpoint: str) -> None:
        import grpc

        self._grpc = grpc
        self.channel = grpc.insecure_channel(endpoint, options=[("grpc.max_send_message_length", 64 << 20)])
        self.call = self.channel.unary_unary(EXPORT_METHOD, request_serializer=None, response_deserializer=None)
        self.sent: dict[int, int] = {}
        self.rejected = 0

    def send(self, seq: int, payload: bytes) -> None:
        """Send until acknowledged (backpressure answers are retried after a short pause)."""
        while True:
            self.sent[seq] = time.monotonic_ns()
            try:
                self.call(payload, timeout=30)
                return
            except self._grpc.RpcError as exc:
                if exc.code() in (self._grpc.StatusCode.UNAVAILABLE, self._grpc.StatusCode.RESOURCE_EXHAUSTED):
                    self.rejected += 1
                    time.sleep(0.02)
                    continue
                raise

    def close(self) -> None:
        self.channel.close()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_saturated(client: Client, sink: Sink, daemon_pid: int, templates: list[bytes], n: int,
                  inflight: int, first_seq: int) -> dict[str, float]:
    """Send ``n`` requests with ``inflight`` calls outstanding; measure until all reached the sink."""
    import psutil

    proc = psutil.Process(daemon_pid)
    payloads = [with_marker(templates[i % len(templates)], first_seq + i) for i in range(n)]
    sink.reset()
    c0 = proc.cpu_times()
    t0 = time.monotonic_ns()
    with futures.ThreadPoolExecutor(max_workers=inflight) as pool:
        list(pool.map(lambda i: client.send(first_seq + i, payloads[i]), range(n)))
    t_acked = time.monotonic_ns()
    deadline = time.monotonic() + 120
    arrivals: dict[int, int] = {}
    while time.monotonic() < deadline:
        arrivals = sink.arrivals()
        if len(arrivals) >= n:
            break
        time.sleep(0.05)
    t1 = max(arrivals.values()) if arrivals else time.monotonic_ns()
    c1 = proc.cpu_times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    spans = len(arrivals) * SPANS_PER_REQUEST
    lat = [(arrivals[s] - client.sent[s]) / 1e6 for s in arrivals if s in client.sent]
    return {"requests": n, "arrived": len(arrivals), "spans": spans, "wall_s": (t1 - t0) / 1e9,
            "ack_wall_s": (t_acked - t0) / 1e9, "cpu_s": cpu, "spans_per_s": spans / ((t1 - t0) / 1e9),
            "spans_per_cpu_s": spans / cpu if cpu > 0 else float("nan"),
            "lat_p50_ms": _percentile(lat, 0.5), "lat_p99_ms": _percentile(lat, 0.99)}


def run_paced(client: Client, sink: Sink, templates: list[bytes], rate_rps: float, duration_s: float,
              first_seq: int) -> dict[str, float]:
    """Send one request every ``1/rate_rps`` s for ``duration_s``; latency send → sink arrival."""
    sink.reset()
    n = int(rate_rps * duration_s)
    start = time.monotonic()
    for i in range(n):
        target = start + i / rate_rps
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        client.send(first_seq + i, with_marker(templates[i % len(templates)], first_seq + i))
    deadline = time.monotonic() + 60
    arrivals: dict[int, int] = {}
    while time.monotonic() < deadline:
        arrivals = sink.arrivals()
        if len(arrivals) >= n:
            break
        time.sleep(0.05)
    lat = [(arrivals[s] - client.sent[s]) / 1e6 for s in arrivals if s in client.sent]
    return {"requests": n, "arrived": len(arrivals), "rate_spans_per_s": rate_rps * SPANS_PER_REQUEST,
            "lat_p50_ms": _percentile(lat, 0.5), "lat_p99_ms": _percentile(lat, 0.99),
            "lat_max_ms": max(lat) if lat else float("nan")}


def baseline(templates: list[bytes], rounds: int) -> float:
    """Spans per CPU-second of a Python (upb) parse + re-encode of the same requests."""
    from google.protobuf.internal import api_implementation
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    logger.info("protobuf implementation: %s", api_implementation.Type())
    t0 = time.process_time()
    for _ in range(rounds):
        for p in templates:
            ExportTraceServiceRequest.FromString(p).SerializeToString()
    cpu = time.process_time() - t0
    return rounds * len(templates) * SPANS_PER_REQUEST / cpu


def baseline_walk(templates: list[bytes], rounds: int) -> float:
    """Spans per CPU-second of parse + a Python walk over every span's attributes + re-encode.

    The least per-span Python work a join needs (it must read each span's
    times and ``thread.id``), without any enrichment.
    """
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    t0 = time.process_time()
    seen = 0
    for _ in range(rounds):
        for p in templates:
            req = ExportTraceServiceRequest.FromString(p)
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        seen += span.end_time_unix_nano > span.start_time_unix_nano
                        for kv in span.attributes:
                            if kv.key == "thread.id":
                                break
            req.SerializeToString()
    cpu = time.process_time() - t0
    return seen / cpu


def idle_cpu(pid: int, seconds: float) -> float:
    """The daemon's CPU use (cores) while no spans arrive: probes, ring buffers, periodic scans."""
    import psutil

    proc = psutil.Process(pid)
    c0 = proc.cpu_times()
    time.sleep(seconds)
    c1 = proc.cpu_times()
    return ((c1.user - c0.user) + (c1.system - c0.system)) / seconds


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Start ``py-spy record`` (raw collapsed stacks) on the daemon, if py-spy is installed."""
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        logger.warning("py-spy not installed: no profile")
        return None
    return subprocess.Popen([str(exe), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200",
                             "-f", "raw", "-o", str(out), "--threads", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def hot_spots(raw: Path, top: int = 15) -> list[tuple[str, float, float]]:
    """(function, self %, inclusive %) from py-spy raw collapsed stacks, idle waits excluded."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    idle = ("wait (threading.py", "select (selectors.py", "_worker (concurrent", "poll (", "_run_once (asyncio",
            "sleep", "_wait_for_tstate_lock", "get (queue.py", "recv_into", "accept (")
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        if any(k in leaf for k in idle):
            continue
        n = int(count)
        total += n
        self_n[leaf] = self_n.get(leaf, 0) + n
        for f in set(frames[1:]):
            incl_n[f] = incl_n.get(f, 0) + n
    if not total:
        return []
    ranked = sorted(self_n.items(), key=lambda kv: -kv[1])[:top]
    return [(f, 100 * n / total, 100 * incl_n.get(f, 0) / total) for f, n in ranked]


def run_mode(mode: str, templates: list[bytes], args: argparse.Namespace, sink: Sink,
             seq0: int) -> dict[str, Any]:
    from tests.e2e.daemon import IsoscopeDaemon

    no_probes = mode == "no-probes"
    res: dict[str, Any] = {"mode": mode}
    with IsoscopeDaemon(forward=[f"grpc://127.0.0.1:{sink.port}"], no_probes=no_probes,
                        config={"log_level": "info"}) as d:
        client = Client(d.grpc_endpoint)
        try:
            time.sleep(1.0)
            res["idle_cores"] = idle_cpu(d.pid, 3.0)
            # Warm-up: connections, caches, the first resolution of the client process.
            run_saturated(client, sink, d.pid, templates, max(4, args.requests // 10), args.inflight, seq0)
            seq0 += 10_000
            spy = None
            raw = Path(tempfile.mkdtemp(prefix="isoscope-bench-")) / f"profile-{mode}.txt"
            if args.profile:
                spy = profile(d.pid, 8, raw)
                time.sleep(0.5)
            res["saturated"] = s = run_saturated(client, sink, d.pid, templates, args.requests, args.inflight, seq0)
            # What the spans themselves cost: the idle (span-independent) CPU over the same interval removed.
            marginal = s["cpu_s"] - res["idle_cores"] * s["wall_s"]
            s["marginal_spans_per_cpu_s"] = s["spans"] / marginal if marginal > 0 else float("nan")
            seq0 += 10_000
            if spy is not None:
                spy.wait(30)
                res["hot_spots"] = hot_spots(raw) if raw.exists() else []
            shutil.rmtree(raw.parent, ignore_errors=True)
            res["paced"] = run_paced(client, sink, templates, args.paced_rps, args.paced_s, seq0)
            res["rejected"] = client.rejected
            res["enriched"] = d.metric("isoscope_spans_enriched_total")
            res["received"] = d.metric("isoscope_spans_received_total")
            res["dropped"] = d.metric("isoscope_spans_dropped_total")
        finally:
            client.close()
    return res


def render(results: list[dict[str, Any]], base: float, walk: float, args: argparse.Namespace) -> str:
    lines = ["## throughput — OTLP receive → join → forward, 512-span gRPC requests", "",
             f"{args.requests} requests × {SPANS_PER_REQUEST} spans per mode, {args.inflight} calls in flight, "
             f"forwarding over gRPC to a sink that acks without parsing. "
             f"spans/CPU-s = spans delivered ÷ daemon user+sys CPU seconds (psutil). "
             f"Machine: {os.cpu_count()} cores, shared.", "",
             "| mode | spans/s (wall) | spans per daemon CPU-s | same, idle CPU removed | daemon CPU s "
             "| idle daemon CPU (cores) | sat. p50 / p99 ms | "
             f"paced ({args.paced_rps:g} req/s) p50 / p99 ms | enriched / received |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, p = r["saturated"], r["paced"]
        lines.append(f"| {r['mode']} | {s['spans_per_s']:,.0f} | {s['spans_per_cpu_s']:,.0f} "
                     f"| {s['marginal_spans_per_cpu_s']:,.0f} | {s['cpu_s']:.2f} | {r['idle_cores']:.3f} | "
                     f"{s['lat_p50_ms']:.1f} / {s['lat_p99_ms']:.1f} | {p['lat_p50_ms']:.1f} / {p['lat_p99_ms']:.1f} "
                     f"| {r['enriched']:,.0f} / {r['received']:,.0f} |")
    lines += ["", f"Baseline, same run: Python upb parse + re-encode of the same requests: "
                  f"**{base:,.0f} spans per CPU-s**; parse + Python walk over every span's attributes "
                  f"+ re-encode: **{walk:,.0f} spans per CPU-s**.", "",
              f"Target ≥ {TARGET:,} spans/s per core (goal {GOAL:,})."]
    for r in results:
        v = r["saturated"]["spans_per_cpu_s"]
        verdict = "meets the goal" if v >= GOAL else ("meets the target" if v >= TARGET else "BELOW target")
        lines.append(f"- {r['mode']}: {v:,.0f} spans per CPU-s — {verdict} "
                     f"({v / base:.2f}× parse+encode, {v / walk:.2f}× parse+walk+encode); rejected (backpressure) calls: {r['rejected']}; "
                     f"dropped: {r['dropped']:.0f}")
    for r in results:
        if r.get("hot_spots"):
            lines += ["", f"py-spy hot spots, {r['mode']} (self % / inclusive % of non-idle samples):", ""]
            lines += [f"- {self_p:.1f} % / {incl:.1f} %  `{f}`" for f, self_p, incl in r["hot_spots"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200, help="512-span requests per mode")
    p.add_argument("--inflight", type=int, default=4)
    p.add_argument("--modes", default="probes,no-probes")
    p.add_argument("--paced-rps", type=float, default=10.0, help="requests/s in the paced latency phase")
    p.add_argument("--paced-s", type=float, default=5.0)
    p.add_argument("--templates", type=int, default=32)
    p.add_argument("--baseline-rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="py-spy the daemon during the saturated phase")
    p.add_argument("--write", metavar="PATH", help="write the results as markdown")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.geteuid() != 0:
        print("bench/throughput.py needs root (the daemon loads eBPF probes)", file=sys.stderr)
        return 2
    templates = build_templates(args.templates)
    base = baseline(templates, args.baseline_rounds)
    walk = baseline_walk(templates, args.baseline_rounds)
    logger.info("baseline: %.0f spans per CPU-s (upb parse + re-encode), %.0f with a Python walk", base, walk)
    sink = Sink()
    results = []
    try:
        for i, mode in enumerate(m.strip() for m in args.modes.split(",") if m.strip()):
            r = run_mode(mode, templates, args, sink, 1_000_000 * (i + 1))
            s = r["saturated"]
            logger.info("%s: %d/%d requests arrived, %.0f spans/s wall, %.0f spans per daemon CPU-s "
                        "(%.2f CPU s), latency p50 %.1f ms p99 %.1f ms; paced p50 %.1f p99 %.1f ms",
                        mode, s["arrived"], s["requests"], s["spans_per_s"], s["spans_per_cpu_s"], s["cpu_s"],
                        s["lat_p50_ms"], s["lat_p99_ms"], r["paced"]["lat_p50_ms"], r["paced"]["lat_p99_ms"])
            results.append(r)
    finally:
        sink.close()
    text = render(results, base, walk, args)
    print(text)
    if args.write:
        Path(args.write).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
