"""The shipped Prometheus alert rules: promtool accepts them, their unit tests pass,
every alert is tested both firing and silent, and they follow the conventions
(severity, summary/description/runbook_url, contract metric names only)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dashboard_queries import is_contract_metric, metric_names
from tests.support.procs import REPO, require_binary

ROOT = REPO
RULES = ROOT / "deploy" / "prometheus" / "otelwatch-alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "otelwatch-alerts.test.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"
REQUIRED_ALERTS = {
    "OtelwatchSessionStuck", "OtelwatchSessionStalledLong", "OtelwatchRecoveryFailing",
    "OtelwatchRecoveryStorm", "OtelwatchSessionCpuSpin", "OtelwatchDown", "OtelwatchProbeTimeouts",
}


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("promtool"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_promtool_check_rules() -> None:
    proc = promtool("check", "rules", str(RULES), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = len(alert_rules())
    assert n >= len(REQUIRED_ALERTS)  # "SUCCESS: 0 rules found" is a success too
    assert f"SUCCESS: {n} rules found" in proc.stdout


def test_promtool_unit_tests_pass() -> None:
    proc = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize("index", range(len(alert_rules())),
                         ids=[f"{i}-{r['alert']}" for i, r in enumerate(alert_rules())])
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, index: int) -> None:
    """The unit tests are not vacuous: make any one rule never fire and they fail on it.
    Per rule, not per name: two rules share the name OtelwatchRecoveryFailing."""
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
    rules[index]["expr"] = "vector(1) < 0"  # valid PromQL, never any result
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc))
    proc = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert proc.returncode != 0
    assert rules[index]["alert"] in proc.stdout + proc.stderr


def test_required_alerts_present() -> None:
    names = {r["alert"] for r in alert_rules()}
    assert names >= REQUIRED_ALERTS, REQUIRED_ALERTS - names
    assert all(re.fullmatch(r"Otelwatch[A-Z][A-Za-z]+", n) for n in names)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_rule_conventions(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"info", "warning", "critical"}
    ann = rule["annotations"]
    assert ann["summary"] and ann["description"]
    url = ann["runbook_url"]
    # Absolute: Alertmanager and Grafana show it as a link outside this repository.
    assert re.fullmatch(r"https://[^/\s]+/\S*/docs/runbook\.md#[a-z]+", url), url
    assert url.split("#", 1)[1] == rule["alert"].lower()


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_rule_uses_only_contract_metrics(rule: dict[str, Any]) -> None:
    names = metric_names(rule["expr"])
    assert names
    assert {n for n in names if not is_contract_metric(n)} == set()


def test_runbook_has_a_section_per_alert() -> None:
    text = RUNBOOK.read_text()
    # GitHub makes a heading's anchor from its lowercased text.
    headings = {h.strip().lower() for h in re.findall(r"^#{2,3} (.+)$", text, flags=re.M)}
    names = {r["alert"] for r in alert_rules()}
    assert names >= REQUIRED_ALERTS  # an empty rule list has every section it needs
    for name in names:
        assert name.lower() in headings, f"docs/runbook.md has no section {name}"


def test_every_alert_tested_firing_and_silent() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    assert doc["rule_files"] == [RULES.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for group in doc["tests"]:
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names >= REQUIRED_ALERTS  # an empty rule list has every alert tested
    assert names - fires == set(), f"never tested firing: {names - fires}"
    assert names - silent == set(), f"never tested silent: {names - silent}"
    assert (fires | silent) - names == set(), f"tests of alerts that do not exist: {(fires | silent) - names}"
