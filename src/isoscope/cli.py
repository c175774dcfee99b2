"""``isoscope`` command line: run, probes, stack, demo, report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from isoscope import __version__
from isoscope.config import ConfigError, load_config


def _run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.otlp_grpc_listen:
        overrides["receivers.otlp_grpc.listen"] = args.otlp_grpc_listen
    if args.otlp_http_listen:
        overrides["receivers.otlp_http.listen"] = args.otlp_http_listen
    if args.metrics_listen:
        overrides["metrics.listen"] = args.metrics_listen
    if args.forward:
        overrides["exporters.forward"] = list(args.forward)
    if args.file_export:
        overrides["exporters.file.path"] = args.file_export
        overrides["exporters.file.enabled"] = True
    if args.host_proc:
        overrides["kernel.host_proc"] = args.host_proc
    if args.host_sys:
        overrides["kernel.host_sys"] = args.host_sys
    try:
        cfg = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"isoscope: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")
        return 0
    from isoscope.daemon import run
    return run(cfg, load_probes=not args.no_probes,
               reload_config=lambda: load_config(args.config, overrides=overrides))


def _probes(args: argparse.Namespace) -> int:
    """Load every declared probe once, report, detach."""
    from isoscope.kernel import env as kernelenv
    from isoscope.model import ProbeStatus, Stats
    from isoscope.probes import catalog
    from isoscope.probes.loader import ProbeManager

    env = kernelenv.prepare(args.headers_dir)
    mgr = ProbeManager(catalog.ALL_PROBES, env.features, lambda ev: None, Stats())
    try:
        # Copies: detaching at the end marks the live statuses as detached.
        statuses = [ProbeStatus(**s.to_dict()) for s in mgr.load()]
    finally:
        mgr.shutdown()
    # A preflight (an init container, a CI step) needs the answer in the exit code.
    missing = [s.name for s in statuses if s.required and not s.attached]
    if args.json:
        print(json.dumps({"kernel": env.to_dict(), "probes": [s.to_dict() for s in statuses]}, indent=2))
        return 1 if missing else 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for msg in env.messages:
        console.print(f"[dim]kernel:[/dim] {msg}")
    table = Table(title="isoscope probes", show_lines=False)
    table.add_column("probe")
    table.add_column("state")
    table.add_column("required")
    table.add_column("attach points / reason", overflow="fold")
    for s in statuses:
        state = "[green]attached[/green]" if s.attached else "[red]not attached[/red]"
        detail = ", ".join(s.attach_points) if s.attached else s.reason
        table.add_row(s.name, state, "yes" if s.required else "no", detail)
    console.print(table)
    if missing:
        console.print(f"[red]required probes not attached: {', '.join(missing)}[/red]")
        return 1
    return 0


def _stack(args: argparse.Namespace) -> int:
    from isoscope.host.stack import detect_host_stack, detect_process_stack

    host = detect_host_stack(args.proc_root, args.sys_root)
    if args.pid is not None:
        if not os.path.isdir(os.path.join(args.proc_root, str(args.pid))):
            print(f"isoscope: no process with pid {args.pid} under {args.proc_root}", file=sys.stderr)
            return 2
        stack = detect_process_stack(args.pid, args.proc_root, args.sys_root, host=host)
    else:
        stack = host
    doc = stack.to_dict()
    if args.pid is not None:
        doc["pid"] = args.pid
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = f"isolation stack of pid {args.pid}" if args.pid is not None else "isolation stack of this host"
    table = Table(title=title)
    table.add_column("layer")
    table.add_column("present")
    table.add_column("evidence", overflow="fold")
    for layer in ("L-0", "L-1", "L-2", "L-3", "L-4"):
        present = layer in stack.layers
        table.add_row(layer, "[green]yes[/green]" if present else "no", "; ".join(stack.evidence.get(layer, [])))
    console.print(table)
    console.print(f"hypervisor: [bold]{stack.hypervisor}[/bold]   runtime: [bold]{stack.runtime}[/bold]"
                  + (f"   sandbox: [bold]{stack.sandbox}[/bold]" if stack.sandbox else "")
                  + (f"   container: {stack.container_id[:12]}" if stack.container_id else "")
                  + (f"   pod: {stack.pod_uid} ({stack.qos_class})" if stack.pod_uid else ""))
    if stack.namespaces:
        console.print("namespaces differing from the host: " + ", ".join(stack.namespaces))
    return 0


def _demo(argv: list[str]) -> int:
    """The demo lives in the truth lab, a separate package found through its entry point."""
    from importlib.metadata import entry_points

    found = entry_points(group="isoscope.commands", name="demo")
    if not found:
        print("isoscope: the demo needs the truth lab: pip install 'isoscope[lab]'", file=sys.stderr)
        return 2
    try:
        main_demo = next(iter(found)).load()
    except ImportError as exc:
        print(f"isoscope: the demo needs the truth lab's dependencies ({exc}): pip install 'isoscope[lab]'",
              file=sys.stderr)
        return 2
    return int(main_demo(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="isoscope", description="Which isolation layer stole the time of a request?")
    p.add_argument("--version", action="version", version=f"isoscope {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the node daemon")
    r.add_argument("--config", help="YAML configuration file (default: $ISOSCOPE_CONFIG)")
    r.add_argument("--otlp-grpc-listen", metavar="HOST:PORT",
                   help="OTLP/gRPC receiver address (default 127.0.0.1:4317)")
    r.add_argument("--otlp-http-listen", metavar="HOST:PORT",
                   help="OTLP/HTTP receiver address (default 127.0.0.1:4318)")
    r.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="/metrics, /healthz and /readyz address (default 127.0.0.1:9464)")
    r.add_argument("--file-export", metavar="PATH", help="also write OTLP/JSON lines here")
    r.add_argument("--forward", metavar="URL", action="append",
                   help="grpc://, grpcs://, http(s)://host:port; may be repeated "
                        "(headers, TLS: exporters.targets or OTEL_EXPORTER_OTLP_*)")
    r.add_argument("--host-proc", metavar="DIR", help="the host's /proc (e.g. /host/proc in a pod)")
    r.add_argument("--host-sys", metavar="DIR", help="the host's /sys")
    r.add_argument("--no-probes", action="store_true", help="do not load kernel probes (pass-through)")
    r.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    r.set_defaults(func=_run)

    pr = sub.add_parser("probes", help="load every probe once and say which attach, and why not "
                                       "(exit status 1 when a required probe is unavailable)")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pr.add_argument("--headers-dir", help="kernel headers to use if the host has none")
    pr.set_defaults(func=_probes)

    st = sub.add_parser("stack", help="the isolation stack of the host or of one process")
    st.add_argument("--pid", type=int, help="a process (host pid); default: the host itself")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.add_argument("--proc-root", default="/proc", help="procfs root (e.g. /host/proc in a pod)")
    st.add_argument("--sys-root", default="/sys", help="sysfs root (e.g. /host/sys in a pod)")
    st.set_defaults(func=_stack)

    # Listed for --help; main() hands their arguments to their own parsers.
    sub.add_parser("demo", help="a self-contained scenario on this machine (isoscope demo --help)")
    sub.add_parser("report", help="per-hop x per-layer breakdown of the slowest traces in a file "
                                  "(isoscope report --help)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # demo and report own their options (argparse's REMAINDER would not pass a leading --flag on).
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    if argv and argv[0] == "report":
        from isoscope.report import main_report
        return int(main_report(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
