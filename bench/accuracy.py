"""Attribution accuracy per lab scenario on the field path: the daemon's verdict against every span's own kernel truth.

Runs each scenario of :func:`isoscope_lab.scenarios` (three-hop chains in real
namespaces and pod-like cgroups; the services export from their own network
namespaces to their node address, as pods reach a DaemonSet's ``hostPort``)
against one daemon on its *default* configuration (nothing followed in
advance), and the ``relay`` scenario against a second daemon that trusts the
lab's relay. Writes the table to ``bench/results/accuracy.md``. Needs root.

    .venv/bin/python bench/accuracy.py [--load-s 15] [--only cpu_throttle,mixed]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from probe_harness import provenance, provenance_lines  # noqa: E402  (this folder is on sys.path)

from isoscope_lab import DaemonError, HopScore, ScenarioRun, daemon_for_lab, run_scenario, scenarios  # noqa: E402
from isoscope_lab import truth as T  # noqa: E402

logger = logging.getLogger(__name__)

OUT = REPO / "bench" / "results" / "accuracy.md"
NOT_VALIDATED = "not validated on this host"


def _pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:.1f} %" if d else "–"


def _has_virtio_disk(sys_root: str = "/sys") -> bool:
    try:
        return any(name.startswith("vd") for name in os.listdir(f"{sys_root}/block"))
    except OSError:
        return False


def _can_run_guests() -> bool:
    """A KVM guest could run here (``/dev/kvm`` and VMX/SVM): only then can KVM exits have an oracle."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return os.path.exists("/dev/kvm") and (" vmx" in flags or " svm" in flags)


def oracle_note(run: ScenarioRun, h: HopScore) -> str:
    """Whether the hop's numbers are checked against an oracle on this host, and if not why."""
    if h.fault == "netns":
        return "no oracle: veth time is invisible to the sender (measured ns shown, blame scored)"
    if h.fault == "steal":
        stolen = sum(int(s.attrs.get(T.STEAL, 0) or 0) for s in run.spans if s.service == h.service)
        if not stolen:
            return f"{NOT_VALIDATED}: the host stole nothing during the run"
        return "oracle: /proc/stat steal (10 ms ticks)"
    if h.fault == "virtio_io" and not _has_virtio_disk():
        return f"{NOT_VALIDATED}: no virtio disk"
    if h.fault == "virtio_io" and h.device_spans:
        return (f"oracle; disk's own read time {h.device_ms:.2f} ms (mean, {h.device_spans} spans with the disk "
                f"to themselves): measured between it and the thread's read time on {h.device_bracketed_pct:.1f} %")
    return "oracle" if h.fault != "none" else ""


def _scope(run: ScenarioRun, h: HopScore) -> str:
    spec = run.scenario.hops[int(h.service.rsplit("hop", 1)[1])]
    if spec.thread_id:
        return f"thread {_pct(h.thread_scope, h.spans)}"
    return f"process {_pct(h.process_scope, h.spans)}"


def _serving(run: ScenarioRun, h: HopScore) -> str:
    spec = run.scenario.hops[int(h.service.rsplit("hop", 1)[1])]
    shape = f"pool×{spec.workers}" if spec.server == "pool" else spec.server
    return shape + ("" if spec.thread_id else ", no thread.id")


def rows(run: ScenarioRun) -> list[str]:
    out = []
    for h in run.scores:
        note = oracle_note(run, h)
        if h.fault == "none":
            tol = truth = meas = stalled = "–"
        else:
            stalled = str(h.stalled)
            tol = _pct(h.within_tol, h.spans) if h.has_truth else "n/a"
            truth = f"{h.truth_ms:.2f}" if h.has_truth else "–"
            meas = f"{h.measured_ms:.2f}"
        out.append(f"| {run.scenario.name} | {h.service} | {_serving(run, h)} | {h.fault} | {h.spans} | "
                   f"{_pct(h.enriched, h.spans)} | {stalled} | "
                   f"{_pct(h.blamed_strict, h.spans)} | {_pct(h.blamed_right, h.spans)} | {tol} | "
                   f"{_pct(h.false_blame_strict, h.spans)} / {_pct(h.false_blame, h.spans)} | "
                   f"{_pct(h.missed, h.spans)} | {_scope(run, h)} | {truth} | {meas} | {note} |")
    return out


def _unvalidated_rows() -> list[str]:
    """Components the lab has no scenario for on this host."""
    if _can_run_guests():
        return []
    why = f"{NOT_VALIDATED}: no guest can run here (no VMX/SVM), so KVM exits never happen"
    return [f"| – | – | – | {comp} | – | – | – | – | – | – | – | – | – | – | – | {why} |"
            for comp in ("ept (L-0)", "vm_exit (L-1)", "pv_exit (L-2)", "sandbox: Firecracker exits (L-4)")]


def _run_all(names: list[str], catalogue: dict, args: argparse.Namespace, tmp: str, relays: bool) -> list[str]:
    lines: list[str] = []
    try:
        daemon = daemon_for_lab(os.path.join(tmp, f"traces-{'relay' if relays else 'default'}.jsonl"),
                                relays=relays, inherit_env_overrides=True)
        daemon.start()
    except DaemonError as exc:
        why = str(exc).strip().splitlines()
        for name in names:
            lines.append(f"| {name} | – | – | – | – | – | – | – | – | – | – | – | – | – | – | not run: the daemon "
                         f"refused its configuration ({why[-1] if why else exc}) |")
            print(f"{name}: not run, the daemon did not start: {why[-1] if why else exc}", flush=True)
        return lines
    with daemon:
        for name in names:
            t0 = time.monotonic()
            run = run_scenario(catalogue[name], daemon, threshold=args.threshold, load_s=args.load_s)
            print(f"{name}: {run.load.requests} requests, {len(run.spans)} spans "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
            lines.extend(rows(run))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load-s", type=float, default=15.0, help="seconds of load per scenario")
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument("--threshold", type=float, default=0.2)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        print("bench/accuracy.py needs root (namespaces, cgroups, eBPF)", file=sys.stderr)
        return 1
    catalogue = scenarios()
    names = [n for n in args.only.split(",") if n] or list(catalogue)
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(catalogue)}", file=sys.stderr)
        return 2
    lines = [
        "# Attribution accuracy per lab scenario (field path, default daemon configuration)",
        "",
        f"Generated by `bench/accuracy.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"kernel {platform.release()}, {os.cpu_count()} CPUs, {args.load_s:.0f} s of sequential load per "
        f"scenario, blame threshold {args.threshold:.0%}.",
        "",
        *provenance_lines(provenance()),
        "",
        "The services export from their own network namespaces to their node address (the root end of their "
        "veth, as pods reach a DaemonSet's `hostPort`); the daemon runs on its default configuration (nothing "
        "followed in advance: it learns of a service from the connection its spans arrive on); the `relay` "
        "scenario goes through an OTLP relay and a daemon configured to trust it (`identity.relays`). "
        "Each span carries its own oracle (`test.truth.*`, read by the service from its thread's schedstat, "
        "its cgroup's cpu.stat and memory.pressure, /proc/stat, timed O_DIRECT reads and the disk's own read time "
        "from its /sys/dev/block stat file). "
        "**Every span is scored.** A span's expected verdict is the component its truth says dominated once the "
        "truth's stalls reach the threshold of its duration, no blame below. "
        "*Strict*: `isolation.blame` is exactly the expected verdict. *Tolerant*: a verdict the oracle cannot "
        "tell from it (a component within ±10 % / ±2 ms of the dominant one, or a span within ±10 % / ±2 ms of "
        "the threshold, blamed or not). *Stalled*: spans the injected fault stalled by ≥ the threshold. "
        "*Within tol.*: the fault's component ns within ±10 % or ±2 ms of the truth. *Wrong blame* "
        "(strict / tolerant): spans blamed on a component that is not the expected verdict, whatever their "
        "stall, on any hop. *Missed*: spans left unblamed although their truth calls for a blame. "
        "*Enriched*: spans that carry the daemon's attributes (an unenriched span is scored like any other: "
        "its missing verdict is wrong wherever its truth calls for a blame). "
        "*Scope*: spans joined at the precision their sender allows.",
        "",
        "| scenario | hop | serving | fault | spans | enriched | stalled | strict | tolerant | within tol. | "
        "wrong blame (strict / tol.) | missed | scope | truth ms (mean) | measured ms (mean) | oracle |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="isoscope-bench-") as tmp:
        plain = [n for n in names if not catalogue[n].relay]
        relayed = [n for n in names if catalogue[n].relay]
        if plain:
            lines += _run_all(plain, catalogue, args, tmp, relays=False)
        if relayed:
            lines += _run_all(relayed, catalogue, args, tmp, relays=True)
    lines += _unvalidated_rows()
    lines += ["", "Scenarios:", ""]
    lines += [f"- `{n}`: {catalogue[n].description}" for n in names]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
