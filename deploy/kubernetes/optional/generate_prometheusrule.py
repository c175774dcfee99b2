#!/usr/bin/env python3
"""Generate ``prometheusrule.yaml`` from the plain Prometheus rules file.

The alert and recording rules live once, in ``deploy/prometheus/isoscope-rules.yml``
(where ``promtool test rules`` exercises them). Clusters running the Prometheus
Operator load rules from a ``PrometheusRule`` object instead; this script wraps
the same groups into one so the two never drift apart.

Usage::

    python deploy/kubernetes/optional/generate_prometheusrule.py          # rewrite
    python deploy/kubernetes/optional/generate_prometheusrule.py --check  # exit 1 if stale
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
DEFAULT_RULES = ROOT / "deploy" / "prometheus" / "isoscope-rules.yml"
DEFAULT_OUTPUT = HERE / "prometheusrule.yaml"

HEADER = (
    "# GENERATED from deploy/prometheus/isoscope-rules.yml by\n"
    "# deploy/kubernetes/optional/generate_prometheusrule.py; edit the rules file, then rerun.\n"
)


def build_prometheusrule(rules: dict[str, Any], name: str = "isoscope",
                         namespace: str = "isoscope") -> dict[str, Any]:
    """Wrap a Prometheus rules document into a ``PrometheusRule`` object.

    Args:
        rules: the parsed rules file (``{"groups": [...]}``).
        name: object name.
        namespace: object namespace.

    Returns:
        The ``monitoring.coreos.com/v1`` ``PrometheusRule`` as a dict.

    Raises:
        ValueError: the rules document has no non-empty ``groups`` list.
    """
    groups = rules.get("groups") if isinstance(rules, dict) else None
    if not isinstance(groups, list) or not groups:
        raise ValueError("rules file has no 'groups' list")
    for group in groups:
        if not isinstance(group, dict) or "name" not in group or not isinstance(group.get("rules"), list):
            raise ValueError(f"malformed rule group: {group!r}")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "isoscope",
                # The Prometheus Operator picks rules up through its ruleSelector;
                # this label is what kube-prometheus-stack selects by default.
                "role": "alert-rules",
            },
        },
        "spec": {"groups": groups},
    }


def render(rules_path: Path) -> str:
    """Return the YAML text of the PrometheusRule generated from ``rules_path``."""
    rules = yaml.safe_load(rules_path.read_text())
    obj = build_prometheusrule(rules)
    return HEADER + yaml.safe_dump(obj, sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=Path, default=DEFAULT_RULES)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 when the output is out of date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = render(args.rules)
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            logger.error("%s is out of date; rerun %s", args.output, Path(__file__).name)
            return 1
        return 0
    args.output.write_text(text)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
