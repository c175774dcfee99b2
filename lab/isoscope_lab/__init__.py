"""The truth lab: real namespaces, cgroups and instrumented services with injected faults.

Every span a lab service emits carries its own kernel oracle (``test.truth.*``),
so the daemon's per-layer verdict can be checked span by span.

Public API::

    from isoscope_lab import Chain, Fault, HopSpec, IsoscopeDaemon, daemon_for_lab, scenarios, run_scenario, score
"""

from isoscope_lab.faults import EXPECTED_BLAME, FAULT_KINDS, Fault
from isoscope_lab.launcher import DaemonError, IsoscopeDaemon, daemon_available
from isoscope_lab.net import free_port, port_in_use
from isoscope_lab.scenario import (NODE, Chain, HopScore, HopSpec, Scenario, ScenarioRun, daemon_for_lab,
                                   expected_blame, node_endpoint, run_scenario, scenarios, score, send_load,
                                   wait_for_spans, within_tolerance)
from isoscope_lab.topology import LabCgroup, LabError

__all__ = ["NODE", "Chain", "DaemonError", "EXPECTED_BLAME", "FAULT_KINDS", "Fault", "HopScore", "HopSpec",
           "IsoscopeDaemon", "LabCgroup", "LabError", "Scenario", "ScenarioRun", "daemon_available", "daemon_for_lab",
           "expected_blame", "free_port", "node_endpoint", "port_in_use", "run_scenario", "scenarios", "score",
           "send_load", "wait_for_spans", "within_tolerance"]
