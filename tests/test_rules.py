"""Prometheus rules: promtool check + promtool unit tests, and that the unit tests bite."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "isoscope-rules.yml"
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"))
RUNBOOKS = ROOT / "deploy" / "prometheus" / "runbooks.md"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def alert_rules(path: Path = RULES) -> list[dict]:
    doc = yaml.safe_load(path.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules():
    res = promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout and "WARNING" not in res.stdout + res.stderr


def test_promtool_unit_tests_pass():
    assert RULE_TESTS, "no promtool test files"
    res = promtool("test", "rules", *map(str, RULE_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FAILED" not in res.stdout


def test_every_alert_is_documented():
    anchors = {m.group(1).lower() for m in re.finditer(r"^## (\w+)", RUNBOOKS.read_text(), re.M)}
    rules = alert_rules()
    assert len(rules) >= 7
    for rule in rules:
        ann = rule.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), rule["alert"]
        assert ann.get("runbook_url", "").endswith("runbooks.md#" + rule["alert"].lower()), rule["alert"]
        assert rule["alert"].lower() in anchors, f"no runbook section for {rule['alert']}"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, rule["alert"]


def test_every_alert_has_a_firing_and_a_quiet_case():
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts without a case that must fire"
    assert names - quiet == set(), "alerts without a case that must not fire"


@pytest.mark.parametrize("alert", [r["alert"] for r in alert_rules()])
def test_unit_tests_fail_when_an_alert_never_fires(alert: str, tmp_path: Path):
    """Mutation check: silencing one alert must make its promtool tests fail."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = f"({rule['expr'].strip()}) and on () vector(0) > 1"
    (tmp_path / "isoscope-rules.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (tmp_path / "tests").mkdir()
    for path in RULE_TESTS:
        shutil.copy(path, tmp_path / "tests" / path.name)
    assert promtool("check", "rules", str(tmp_path / "isoscope-rules.yml")).returncode == 0
    res = promtool("test", "rules", *[str(tmp_path / "tests" / p.name) for p in RULE_TESTS])
    out = res.stdout + res.stderr
    assert res.returncode != 0 and f'alertname: {alert}' in out, out


def test_budget_change_changes_the_alert(tmp_path: Path):
    """The L-3 budget is a recording rule: raising it to 10 % silences the 5 % case."""
    doc = yaml.safe_load(RULES.read_text())
    budgets = [r for g in doc["groups"] for r in g["rules"]
               if r.get("record") == "isoscope:layer_overhead_budget:ratio"]
    assert {b["labels"]["layer"] for b in budgets} == {"L-0", "L-1", "L-2", "L-3", "L-4"}
    for b in budgets:
        if b["labels"]["layer"] == "L-3":
            b["expr"] = "vector(0.10)"
    (tmp_path / "isoscope-rules.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (tmp_path / "tests").mkdir()
    test_file = ROOT / "deploy" / "prometheus" / "tests" / "layer_overhead_test.yml"
    shutil.copy(test_file, tmp_path / "tests" / test_file.name)
    res = promtool("test", "rules", str(tmp_path / "tests" / test_file.name))
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "alertname: IsoscopeLayerOverheadAboveBudget" in out and "got:[]" in out.replace(" ", ""), out
