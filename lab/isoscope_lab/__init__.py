"""The truth lab: real namespaces, cgroups and instrumented services with injected faults.

Every span a lab service emits carries its own kernel oracle (``test.truth.*``),
so the daemon's per-layer verdict can be checked span by span.

Public API::

    from isoscope_lab import Chain, Daemon, Fault, HopSpec, scenarios, run_scenario, score
"""

from isoscope_lab.faults import EXPECTED_BLAME, FAULT_KINDS, Fault
from isoscope_lab.scenario import (Chain, Daemon, HopScore, HopSpec, Scenario, ScenarioRun, daemon_available,
                                    run_scenario, scenarios, score, send_load, wait_for_spans, within_tolerance)
from isoscope_lab.topology import LabCgroup, LabError

__all__ = ["Chain", "Daemon", "EXPECTED_BLAME", "FAULT_KINDS", "Fault", "HopScore", "HopSpec", "LabCgroup",
           "LabError", "Scenario", "ScenarioRun", "daemon_available", "run_scenario", "scenarios", "score",
           "send_load", "wait_for_spans", "within_tolerance"]
