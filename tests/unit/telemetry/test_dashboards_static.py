"""Static checks of the shipped Grafana dashboards (dashboards/*.json).

The queries themselves are run against a real Prometheus elsewhere (see
tests/support/dashboard_queries.py); here: the JSON is a loadable classic dashboard,
datasources are the `${datasource}` variable only, every metric is a contract
name, rates use $__rate_interval, and the variables the panels use exist.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dashboard_queries import (
    BUILTIN_SUBSTITUTIONS,
    iter_annotation_queries,
    iter_panel_queries,
    iter_panels,
    iter_variable_queries,
    metric_names,
    raw_panel_queries,
    substitute,
)
from tests.support.dashboard_queries import is_contract_metric as contract
from tests.support.procs import REPO, require_binary

ROOT = REPO
DASHBOARDS = sorted((ROOT / "dashboards").glob("otelwatch-*.json"))
DS_REFS = ("${datasource}", "$datasource")
RANGE_FUNCS = ("rate", "irate", "increase")


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_both_dashboards_ship() -> None:
    assert {p.name for p in DASHBOARDS} == {"otelwatch-fleet.json", "otelwatch-session.json"}


@pytest.fixture(params=DASHBOARDS, ids=lambda p: p.name)
def dash(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_classic_model(dash: dict[str, Any]) -> None:
    assert dash["schemaVersion"] >= 36
    assert dash["uid"] and len(dash["uid"]) <= 40
    assert dash["title"].startswith("otelwatch")
    assert isinstance(dash["panels"], list) and dash["panels"]
    for panel in iter_panels(dash):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert grid["h"] > 0 and grid["w"] > 0


def test_unique_uids_across_dashboards() -> None:
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))


def test_panel_ids_unique(dash: dict[str, Any]) -> None:
    ids = [p["id"] for p in iter_panels(dash)]
    assert len(ids) == len(set(ids)), ids


def test_panels_do_not_overlap(dash: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in iter_panels(dash):
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def _no_hardcoded_datasource(ds: Any, where: str) -> None:
    assert isinstance(ds, dict), f"{where}: datasource must be an object using ${{datasource}}"
    assert ds.get("uid") in DS_REFS, f"{where}: datasource uid {ds.get('uid')!r}"
    assert ds.get("type") == "prometheus", where


def test_every_target_uses_datasource_variable(dash: dict[str, Any]) -> None:
    n = 0
    for panel in iter_panels(dash):
        if panel["type"] == "row":
            continue
        _no_hardcoded_datasource(panel.get("datasource"), panel["title"])
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            _no_hardcoded_datasource(target.get("datasource"), panel["title"])
            n += 1
    assert n >= 10
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            _no_hardcoded_datasource(var["datasource"], f"variable {var['name']}")
    for ann in dash["annotations"]["list"]:
        if ann.get("builtIn"):
            continue  # Grafana's own alert/annotation store, not a datasource
        _no_hardcoded_datasource(ann["datasource"], f"annotation {ann['name']}")


def test_datasource_variable_is_prometheus(dash: dict[str, Any]) -> None:
    by_name = {v["name"]: v for v in dash["templating"]["list"]}
    ds = by_name["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    # A saved current value would pin one installation's datasource name.
    assert not ds.get("current")


def test_variables_present_and_used(dash: dict[str, Any]) -> None:
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance", "agent", "session"} <= names
    used: set[str] = set()
    for _, expr in raw_panel_queries(dash) + iter_annotation_queries(dash):
        used |= set(re.findall(r"\$\{?(\w+)", expr))
    used -= {k.strip("${}") for k in BUILTIN_SUBSTITUTIONS}
    assert used <= names, f"undefined variables: {used - names}"
    assert {"instance", "session"} <= used


def test_variable_queries_use_contract_metrics(dash: dict[str, Any]) -> None:
    for name, query in iter_variable_queries(dash):
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert m, f"variable {name}: expected label_values(METRIC{{...}}, LABEL), got {query}"
        assert {n for n in metric_names(m.group(1)) if not contract(n)} == set(), name


def test_every_metric_is_a_contract_name(dash: dict[str, Any]) -> None:
    seen: set[str] = set()
    for title, expr in raw_panel_queries(dash):
        names = metric_names(expr)
        assert names, f"{title}: no metric found in {expr!r}"
        unknown = {n for n in names if not contract(n)}
        assert not unknown, f"{title}: not contract metrics: {unknown}"
        seen |= names
    for name, expr in iter_annotation_queries(dash):
        # ALERTS is Prometheus's own series of firing alerts (from otelwatch-alerts.yaml).
        unknown = {n for n in metric_names(expr) if not contract(n) and n != "ALERTS"}
        assert not unknown, f"annotation {name}: {unknown}"
    assert "otelwatch_session_status" in seen


def test_rates_use_rate_interval(dash: dict[str, Any]) -> None:
    pattern = re.compile(r"\b(" + "|".join(RANGE_FUNCS) + r")\s*\(")
    for title, expr in raw_panel_queries(dash):
        for m in pattern.finditer(expr):
            window = re.search(r"\[([^\]]*)\]", expr[m.end():])
            assert window, f"{title}: {m.group(1)} without a range"
            assert window.group(1) == "$__rate_interval", f"{title}: {m.group(1)}[{window.group(1)}]"


def test_fleet_has_the_promised_panels() -> None:
    fleet = load(ROOT / "dashboards" / "otelwatch-fleet.json")
    types = {p["title"]: p["type"] for p in iter_panels(fleet)}
    assert types["Sessions by state"] == "stat"
    assert types["State per session"] == "state-timeline"
    exprs = " ".join(e for _, e in raw_panel_queries(fleet))
    for metric in ("otelwatch_session_stalled_total", "otelwatch_session_stuck_total",
                   "otelwatch_recovery_requested_total", "otelwatch_recovery_completed_total",
                   "otelwatch_session_last_event_age_seconds", "otelwatch_session_cpu_utilization",
                   "otelwatch_session_memory_rss_bytes", "otelwatch_session_tcp_connections"):
        assert metric in exprs, metric
    assert any("ALERTS" in e for _, e in iter_annotation_queries(fleet))


def test_session_dashboard_covers_one_session() -> None:
    session = load(ROOT / "dashboards" / "otelwatch-session.json")
    var = {v["name"]: v for v in session["templating"]["list"]}["session"]
    assert var["multi"] is False and not var.get("includeAll")
    exprs = " ".join(e for _, e in raw_panel_queries(session))
    for metric in ("otelwatch_session_open_fds", "otelwatch_session_threads",
                   "otelwatch_session_memory_rss_bytes", "otelwatch_session_cpu_utilization",
                   "otelwatch_session_tcp_connections", "otelwatch_session_last_event_age_seconds"):
        assert metric in exprs, metric
    assert any(p["type"] == "state-timeline" for p in iter_panels(session))


def test_state_timeline_maps_every_state() -> None:
    states = {"starting", "active", "idle", "long_running", "stalled", "stuck", "exited"}
    for path in DASHBOARDS:
        for panel in iter_panels(load(path)):
            if panel["type"] != "state-timeline":
                continue
            texts = {o["text"] for m in panel["fieldConfig"]["defaults"]["mappings"]
                     for o in m["options"].values()}
            assert texts == states
            expr = panel["targets"][0]["expr"]
            assert set(re.findall(r'state="(\w+)"', expr)) == states


def test_runnable_queries_have_no_grafana_syntax_left() -> None:
    for path in DASHBOARDS:
        pairs = iter_panel_queries(load(path))
        assert pairs
        for title, expr in pairs:
            assert "$" not in expr and "[[" not in expr, f"{path.name}/{title}: {expr}"


def test_expected_empty_names_real_panels() -> None:
    listed = json.loads((ROOT / "tests" / "support" / "data" / "expected_empty.json").read_text())["panels"]
    titles = {p.name: {q["title"] for q in iter_panels(load(p))} for p in DASHBOARDS}
    assert listed
    for entry in listed:
        assert entry["panel"] in titles[entry["dashboard"]], entry
        assert entry["why"] and entry["empty_unless"]


# --------------------------------------------------------------------------- the helper itself


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a_bucket{x="y z", le=~"1.0"}[5m]))', {"a_bucket"}),
        ("a * on (job, instance) group_left (reason) max by (job) (b) > 3600", {"a", "b"}),
        ('c unless c offset 30m or vector(0) or absent(d{job="e"})', {"c", "d"}),
        ('count_over_time((s{state=~"a|b"} == 1)[$__range:1m])', {"s"}),
        ("histogram_quantile(0.95, sum by (le, status) (rate(h_bucket[1m])))", {"h_bucket"}),
        ('{__name__="direct"}', {"direct"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_substitute_variables() -> None:
    out = substitute('rate(x{a=~"$agent", b=~"${instance}", c=~"[[session]]"}[$__rate_interval])')
    assert out == 'rate(x{a=~".*", b=~".*", c=~".*"}[30s])'
    assert substitute('x{s=~"$session"}', {"session": "abc"}) == 'x{s=~"abc"}'


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses PromQL when it checks rules: wrap each runnable query in a
    recording rule so a syntax error in any panel fails here, without a server."""
    promtool = require_binary("promtool")
    rules: list[dict[str, Any]] = []
    for path in DASHBOARDS:
        dash = load(path)
        for title, expr in iter_panel_queries(dash) + [
            (n, substitute(e)) for n, e in iter_annotation_queries(dash)
        ]:
            rules.append({"record": f"otelwatch_dashboard:check_{len(rules)}", "expr": expr,
                          "labels": {"panel": f"{path.name}/{title}"}})
    rule_file = tmp_path / "dashboard-queries.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(rule_file)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(rules)} rules found" in proc.stdout


def test_panel_titles_unique(dash: dict[str, Any]) -> None:
    """Titles identify panels in expected_empty.json and in query-run failures."""
    titles = [p["title"] for p in iter_panels(dash)]
    assert len(titles) == len(set(titles)), titles


def test_state_timeline_query_evaluates_to_state_codes(tmp_path: Path) -> None:
    """Run the fleet timeline query on synthetic series with promtool's PromQL engine:
    one session goes active -> stalled -> stuck, and the value follows the mapping."""
    promtool = require_binary("promtool")
    fleet = load(ROOT / "dashboards" / "otelwatch-fleet.json")
    (panel,) = [p for p in iter_panels(fleet) if p["type"] == "state-timeline"]
    expr = substitute(panel["targets"][0]["expr"])
    codes = {o["text"]: int(k) for m in panel["fieldConfig"]["defaults"]["mappings"]
             for k, o in m["options"].items()}
    base = 'otelwatch_session_status{job="ow",instance="h1",session_id="s1",agent="codex"'
    series = [
        {"series": base + ',state="active",reason="recent_progress"}', "values": "1 1 stale"},
        {"series": base + ',state="stalled",reason="cpu_spin"}', "values": "_ _ 1 1 stale"},
        {"series": base + ',state="stuck",reason="no_activity"}', "values": "_ _ _ _ 1 1"},
    ]
    tests = [{"interval": "1m", "input_series": series, "promql_expr_test": [
        {"expr": expr, "eval_time": f"{minute}m",
         "exp_samples": [{"labels": '{instance="h1", session_id="s1"}', "value": codes[state]}]}
        for minute, state in ((1, "active"), (3, "stalled"), (5, "stuck"))]}]
    (tmp_path / "rules.yaml").write_text("groups: []\n")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": tests}))
    proc = subprocess.run([promtool, "test", "rules", "t.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
