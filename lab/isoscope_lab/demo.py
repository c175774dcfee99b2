"""``isoscope demo``: the daemon, a three-hop chain with a throttled middle hop, load, and the verdict.

What it does, in under two minutes:

1. starts ``isoscope run`` on its default configuration, its OTLP receivers
   on the node's addresses at the default ports (where a DaemonSet's
   ``hostPort`` answers; free ports if those are taken), exporting to
   ``./isoscope-data/traces.jsonl``;
2. builds ``frontend → checkout → payments``: each service in its own
   network, PID, mount and UTS namespaces and a pod-like cgroup, joined by
   veth pairs, instrumented with the OpenTelemetry SDK and exporting from its
   own namespace to its node address (``frontend`` is an asyncio service,
   ``checkout`` a pool of four worker threads); ``checkout`` gets a CFS quota
   of 20 % of one CPU, and ``payments`` shares its CPU with two busy processes
   of a sibling cgroup (a noisy neighbour the table names);
3. sends requests for ``--duration`` seconds with a progress bar;
4. stops the chain and the daemon (SIGTERM: it drains), then prints the
   per-hop × per-layer table of the slowest traces and writes
   ``./isoscope-data/report.png``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import Counter
from typing import Sequence

from isoscope_lab.faults import Fault
from isoscope_lab.launcher import DaemonError, IsoscopeDaemon
from isoscope_lab.net import port_in_use, split_hostport
from isoscope_lab.scenario import NODE_LISTEN, Chain, HopSpec, LoadResult, daemon_for_lab, node_endpoint, send_load
from isoscope_lab.service import RUN_ATTR
from isoscope_lab.topology import LabError
from isoscope.report import ReportError, load_spans, make_console, report

logger = logging.getLogger(__name__)

_ANY = NODE_LISTEN.rsplit(":", 1)[0]
DEFAULT_LISTENERS = {"otlp_grpc": f"{_ANY}:4317", "otlp_http": f"{_ANY}:4318", "metrics": "127.0.0.1:9464"}
SERVICES = ("frontend", "checkout", "payments")
NEIGHBOR_CPU = 1 if (os.cpu_count() or 1) > 1 else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="isoscope demo", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=35.0, help="seconds of load (default 35)")
    p.add_argument("--out-dir", default="./isoscope-data", help="traces.jsonl and report.png go here")
    p.add_argument("--top", type=int, default=3, help="slowest traces to show (default 3)")
    p.add_argument("--quota-pct", type=int, default=20, help="checkout's CPU quota, %% of one CPU (default 20)")
    return p


def _daemon(traces: str) -> IsoscopeDaemon:
    taken = [addr for addr in DEFAULT_LISTENERS.values() if port_in_use(*split_hostport(addr))]
    listen = DEFAULT_LISTENERS
    if taken:
        logger.warning("default listener(s) %s in use; the demo daemon uses free ports", ", ".join(taken))
        listen = {}
    # The operator's ISOSCOPE_* settings (kernel headers, …) apply to the demo's daemon too.
    return daemon_for_lab(traces, listen=listen, inherit_env_overrides=True)


def _rotate(path: str) -> None:
    # The report reads the whole file: keep the previous run's traces aside instead of mixing them in.
    if os.path.exists(path):
        os.replace(path, path + ".1")


def run_demo(args: argparse.Namespace) -> int:
    """The demo; returns the exit code."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = make_console()
    if os.geteuid() != 0:
        console.print("isoscope demo needs root: it creates network namespaces, cgroups and eBPF probes.")
        return 1
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    traces = os.path.join(out_dir, "traces.jsonl")
    png = os.path.join(out_dir, "report.png")
    _rotate(traces)
    t0 = time.monotonic()
    daemon = _daemon(traces)
    hops = [HopSpec(server="asyncio"),
            HopSpec([Fault("cpu_throttle", quota_pct=args.quota_pct)], work_ms=15, server="pool", workers=4),
            # The neighbour: two busy processes in their own cgroup, pinned to payments' CPU.
            HopSpec([Fault("cpu_contention", hogs=2, cpu=NEIGHBOR_CPU)], work_ms=5, cpus={NEIGHBOR_CPU})]
    try:
        with console.status("starting isoscope run (loading eBPF probes)…"):
            daemon.start()
        console.print(f"[green]✓[/] daemon ready in {time.monotonic() - t0:.1f} s "
                      f"(OTLP/HTTP {daemon.http_url}, metrics {daemon.metrics_url})")
        with Chain(hops, otlp_endpoint=node_endpoint(daemon), names=SERVICES) as chain:
            console.print(f"[green]✓[/] chain {' → '.join(SERVICES)} up: own net/pid/mount/uts namespaces, "
                          f"cgroups, veth pairs; faults: CFS quota {args.quota_pct} % of a CPU on "
                          f"[bold]checkout[/], two CPU hogs of a sibling cgroup on [bold]payments[/]' CPU")
            with Progress(TextColumn("[bold]load"), BarColumn(), TextColumn("{task.fields[info]}"),
                          TimeRemainingColumn(), console=console) as progress:
                task = progress.add_task("load", total=args.duration, info="")

                def tick(elapsed: float, res: LoadResult) -> None:
                    progress.update(task, completed=elapsed, info=f"{res.requests} requests, {res.errors} errors")

                load = send_load(chain.entry_url, args.duration, progress=tick)
            run_id = chain.run_id
        with console.status("stopping the daemon (it drains what it holds)…"):
            code = daemon.stop()
        if code not in (0, None):
            console.print(f"[yellow]isoscope run exited with {code}; its log: {daemon.log_path}[/]")
    except (LabError, DaemonError) as exc:
        daemon.stop()
        console.print(f"[red]demo failed:[/] {exc}", markup=True, highlight=False)
        return 1
    except KeyboardInterrupt:
        daemon.stop()
        return 130
    try:
        spans = [s for s in load_spans(traces) if s.resource.get(RUN_ATTR) == run_id and not s.is_stall_child]
    except ReportError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    console.print(f"{load.requests} requests in {load.seconds:.0f} s; {len(spans)} spans exported to {traces}")
    blames = Counter(str(s.attrs.get("isolation.blame", "")) for s in spans if s.service == "checkout")
    checkout = sum(blames.values())
    if checkout:
        top, n = max(((b, c) for b, c in blames.items() if b), key=lambda x: x[1], default=("none", 0))
        console.print(f"checkout: [bold]{top}[/] blamed on {n} of {checkout} spans ({n / checkout:.0%})")
    held_by = Counter(str(s.attrs.get("isolation.l3.runqueue.neighbor", "")) for s in spans
                      if s.service == "payments" and s.attrs.get("isolation.l3.runqueue.neighbor"))
    if held_by:
        who, n = held_by.most_common(1)[0]
        console.print(f"payments: while it waited for a CPU, [bold]{who}[/] held it longest on {n} spans")
    rc = report(traces, top=args.top, png=png, console=console)
    console.print(f"total {time.monotonic() - t0:.0f} s · open the picture: {png} · "
                  f"again any time: isoscope report {os.path.relpath(traces)} --png report.png")
    return rc


def main_demo(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``isoscope demo``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return run_demo(build_parser().parse_args(argv))
