"""Soak: sustained OTLP load through the real daemon with the kernel probes on.

Sends ``--rate`` spans/s (half over OTLP/gRPC, half over OTLP/HTTP, in batches)
to an ``isoscope run`` subprocess that forwards to a real recording OTLP
backend, for ``--minutes``. Every span id is unique; at the end the script
checks that every acknowledged id reached the backend, and reports the
daemon's RSS and CPU, the export-call latency the daemon adds to senders, the
end-to-end delivery latency, and the daemon's own drop / loss counters.

Exit status 0 only when nothing was lost and every ceiling held.

    .venv/bin/python bench/soak.py              # 10 minutes, 5,000 spans/s
    .venv/bin/python bench/soak.py --quick      # 20 seconds, same rate
    .venv/bin/python bench/soak.py --minutes 2 --out bench/results/soak.md
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from isoscope_lab.launcher import IsoscopeDaemon  # noqa: E402
from probe_harness import provenance, provenance_lines  # noqa: E402  (this folder is on sys.path)
from tests.otlp_backend import OtlpBackend, make_payload, span_hex  # noqa: E402
from tests.reliability.clients import GrpcClient, http_post  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class Sender:
    """One paced sending loop and what it saw."""

    protocol: str
    first_id: int
    batch: int
    requests_per_s: float
    sent: list[int] = field(default_factory=list)
    refused: int = 0
    errors: int = 0
    latencies_s: list[float] = field(default_factory=list)
    send_times: dict[str, float] = field(default_factory=dict)  # first span hex of a batch -> monotonic

    def run(self, daemon: IsoscopeDaemon, stop: threading.Event) -> None:
        client = GrpcClient(daemon.grpc_endpoint) if self.protocol == "grpc" else None
        interval = 1.0 / self.requests_per_s
        next_at = time.monotonic()
        next_id = self.first_id
        try:
            while not stop.is_set():
                ids = list(range(next_id, next_id + self.batch))
                next_id += self.batch
                payload = make_payload(ids, service=f"soak-{self.protocol}")
                t0 = time.monotonic()
                try:
                    if client is not None:
                        code, _details, _ = client.export(payload, timeout_s=10)
                        ok = code is grpc.StatusCode.OK
                    else:
                        status, _, _ = http_post(daemon.http_traces_url, payload, timeout_s=10)
                        ok = status == 200
                except OSError:
                    ok = False
                    self.errors += 1
                t1 = time.monotonic()
                if ok:
                    self.sent.extend(ids)
                    self.latencies_s.append(t1 - t0)
                    self.send_times[span_hex(ids[0])] = t0
                else:
                    self.refused += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    stop.wait(delay)
                elif delay < -1.0:
                    next_at = time.monotonic()  # fell behind by more than a second: do not burst
        finally:
            if client is not None:
                client.close()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="20 s run (smoke test of the soak itself)")
    ap.add_argument("--rate", type=int, default=5000, help="spans per second, split over gRPC and HTTP")
    ap.add_argument("--batch", type=int, default=100, help="spans per request")
    ap.add_argument("--no-probes", action="store_true", help="run the daemon without kernel probes")
    ap.add_argument("--max-rss-mib", type=float, default=400.0)
    ap.add_argument("--max-cpu-cores", type=float, default=1.0, help="ceiling of the daemon's average CPU")
    ap.add_argument("--max-p99-ms", type=float, default=100.0, help="ceiling of p99 export-call latency")
    ap.add_argument("--out", help="write a markdown report here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    duration_s = 20.0 if args.quick else args.minutes * 60

    backend = OtlpBackend()
    work = Path(tempfile.mkdtemp(prefix="isoscope-soak-"))
    # Short backoff, as in the reliability tests: a refused batch is retried promptly.
    daemon = IsoscopeDaemon(work, forward=[backend.grpc_url], probes=not args.no_probes,
                            config={"exporters": {"queue": {"initial_backoff_s": 0.1, "max_backoff_s": 1.0}}})
    rss: list[int] = []
    try:
        t_start = time.monotonic()
        daemon.start(timeout_s=180)
        startup_s = time.monotonic() - t_start
        probes = [p["name"] for p in daemon.status()["probes"] if p["attached"]]
        logger.info("daemon ready in %.1f s; probes attached: %s", startup_s, ", ".join(probes) or "none")
        rps = args.rate / args.batch / 2
        senders = [Sender("grpc", 1, args.batch, rps), Sender("http", 10**12, args.batch, rps)]
        stop = threading.Event()
        threads = [threading.Thread(target=s.run, args=(daemon, stop), daemon=True) for s in senders]
        cpu0 = daemon.cpu_seconds()
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - t0 < duration_s:
            time.sleep(min(5.0, max(0.1, duration_s - (time.monotonic() - t0))))
            rss.append(daemon.rss_bytes())
            sent_now = sum(len(s.sent) for s in senders)
            logger.info("%5.0f s: %d spans acknowledged, RSS %.0f MiB", time.monotonic() - t0, sent_now,
                        rss[-1] / 2**20)
        stop.set()
        elapsed = time.monotonic() - t0
        cpu_s = daemon.cpu_seconds() - cpu0
        for t in threads:
            t.join(15)
        sent = {span_hex(i) for s in senders for i in s.sent}
        # Wait for the backlog to drain: as long as the backend keeps receiving, a span
        # not there yet is late, not lost; it is lost when delivery stops without it.
        backlog_at_stop = len(sent - set(backend.span_ids()))
        drain_t0 = time.monotonic()
        last_count, last_progress = -1, time.monotonic()
        while not sent <= set(backend.span_ids()) and time.monotonic() - last_progress < 15 \
                and time.monotonic() - drain_t0 < 600:
            count = len(backend.span_ids())
            if count != last_count:
                last_count, last_progress = count, time.monotonic()
            time.sleep(0.5)
        drain_s = time.monotonic() - drain_t0
        received = backend.span_id_counts()
        lost = sent - set(received)
        duplicates = sum(n - 1 for h, n in received.items() if h in sent and n > 1)
        # Delivery latency: acknowledgement of a batch at the sender → its arrival at the backend.
        arrival: dict[str, float] = {}
        for a in backend.attempts:
            if a.failure is None and a.span_ids:
                arrival.setdefault(a.span_ids[0], a.at)
        delivery = [arrival[h] - t for s in senders for h, t in s.send_times.items() if h in arrival]
        lat = [x for s in senders for x in s.latencies_s]
        dropped = daemon.metric("isoscope_spans_dropped_total")
        kernel_lost = daemon.metric("isoscope_kernel_events_lost_total")
        enriched = daemon.metric("isoscope_spans_enriched_total")
        refused = sum(s.refused for s in senders)
        errors = sum(s.errors for s in senders)
        alive = daemon.alive()
    finally:
        daemon.stop()
        backend.stop(graceful=False)

    rate = len(sent) / elapsed if elapsed else 0.0
    cores = cpu_s / elapsed if elapsed else 0.0
    peak_rss = max(rss) / 2**20 if rss else float("nan")
    p99_ms = pct(lat, 0.99) * 1e3
    checks = {
        "no acknowledged span lost": not lost,
        f"peak RSS ≤ {args.max_rss_mib:g} MiB": peak_rss <= args.max_rss_mib,
        f"daemon CPU ≤ {args.max_cpu_cores:g} cores": cores <= args.max_cpu_cores,
        f"p99 export latency ≤ {args.max_p99_ms:g} ms": p99_ms <= args.max_p99_ms,
        "load held (≥ 95 % of the target rate)": rate >= 0.95 * args.rate,
        "daemon alive at the end": alive,
    }
    lines = [
        f"# Soak: {args.rate:,} spans/s for {elapsed / 60:.1f} min "
        f"({'probes on' if not args.no_probes else 'probes off'})",
        "",
        *provenance_lines(provenance(None if argv is None else ["bench/soak.py", *argv])),
        "",
        f"On {os.cpu_count()} cores. Daemon ready after {startup_s:.1f} s; probes attached: "
        f"{', '.join(probes) or 'none'}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| spans acknowledged (gRPC + HTTP) | {len(sent):,} ({rate:,.0f}/s) |",
        f"| requests refused / transport errors | {refused} / {errors} |",
        f"| backlog when the load stopped / time to drain it | {backlog_at_stop:,} spans / {drain_s:.0f} s |",
        f"| spans lost (acknowledged, never received) | {len(lost)} |",
        f"| duplicates at the backend | {duplicates} |",
        f"| spans_dropped_total | {dropped:g} |",
        f"| spans_enriched_total | {enriched:g} |",
        f"| kernel_events_lost_total | {kernel_lost:g} |",
        f"| daemon RSS: first / last / peak sample | {rss[0] / 2**20:.0f} / {rss[-1] / 2**20:.0f} / "
        f"{peak_rss:.0f} MiB |" if rss else "| daemon RSS | n/a |",
        f"| daemon CPU (average) | {cores:.2f} cores ({cpu_s:.0f} s over {elapsed:.0f} s) |",
        f"| export-call latency p50 / p99 / max | {pct(lat, 0.5) * 1e3:.1f} / {p99_ms:.1f} / "
        f"{max(lat, default=float('nan')) * 1e3:.1f} ms |",
        f"| delivery latency (ack → backend) p50 / p99 | {pct(delivery, 0.5) * 1e3:.0f} / "
        f"{pct(delivery, 0.99) * 1e3:.0f} ms |",
        "",
        "| check | result |",
        "|---|---|",
        *[f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in checks.items()],
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
