"""PromQL found in the shipped dashboards and alert rules, ready to run or to check.

Owns: the list of contract metric names (DESIGN.md "Telemetry", Prometheus side),
extracting the metric names an expression refers to, and turning a Grafana
dashboard into runnable (panel title, PromQL) pairs. Pure text handling: it
never talks to Prometheus or Grafana itself.

Use from a test that runs the queries against a real Prometheus:

    from tests.support.dashboard_queries import iter_panel_queries
    for title, expr in iter_panel_queries(json.loads(path.read_text())):
        ...  # GET /api/v1/query?query=expr
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

# Prometheus names of DESIGN.md's instruments. Histograms are listed by their
# base name; _bucket/_sum/_count of them are accepted by `is_contract_metric`.
CONTRACT_COUNTERS = frozenset({
    "otelwatch_session_state_total",
    "otelwatch_session_stalled_total",
    "otelwatch_session_stuck_total",
    "otelwatch_recovery_requested_total",
    "otelwatch_recovery_completed_total",
    "otelwatch_probe_timeouts_total",
    "otelwatch_probe_errors_total",
    "otelwatch_export_failures_total",  # optional: present only when the exporter counts failures
    # optional: present only once the agents' own OpenTelemetry reported them ([sources.otlp])
    "otelwatch_agent_tokens_total",
    "otelwatch_agent_cost_usd_total",
    "otelwatch_agent_api_requests_total",
    "otelwatch_agent_api_errors_total",
})
CONTRACT_HISTOGRAMS = frozenset({
    "otelwatch_session_stalled_age_seconds",
    "otelwatch_session_stuck_age_seconds",
    "otelwatch_recovery_duration_seconds",
    "otelwatch_collector_tick_duration_seconds",
})
CONTRACT_GAUGES = frozenset({
    "otelwatch_sessions",
    "otelwatch_session_status",
    "otelwatch_session_last_event_age_seconds",
    "otelwatch_session_last_event_time_seconds",
    "otelwatch_session_cpu_utilization",
    "otelwatch_session_memory_rss_bytes",
    "otelwatch_session_open_fds",
    "otelwatch_session_threads",
    "otelwatch_session_tcp_connections",
})
CONTRACT_METRICS = CONTRACT_COUNTERS | CONTRACT_HISTOGRAMS | CONTRACT_GAUGES

# What Grafana would put in place of its built-in variables, for running a
# panel's query by hand over a short test run (5 s scrape interval assumed).
BUILTIN_SUBSTITUTIONS = {
    "$__rate_interval": "30s",
    "${__rate_interval}": "30s",
    "$__interval": "5s",
    "${__interval}": "5s",
    "$__range": "5m",
    "${__range}": "5m",
}

_PROMQL_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "inf", "nan", "atan2",
})
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES_RE = re.compile(r"\{[^{}]*\}")
_BRACKETS_RE = re.compile(r"\[[^\[\]]*\]")
_GROUPING_RE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT_RE = re.compile(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(\s*\()?")
_NAME_MATCHER_RE = re.compile(r'__name__\s*=~?\s*"([^"]*)"')
_VARIABLE_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")


def is_contract_metric(name: str) -> bool:
    """True for a contract metric or a histogram's _bucket/_sum/_count series."""
    if name in CONTRACT_METRICS:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in CONTRACT_HISTOGRAMS:
            return True
    return False


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords or labels)."""
    names = set(_NAME_MATCHER_RE.findall(expr))
    text = _STRING_RE.sub('""', expr)
    # Nested braces do not occur in PromQL; brackets hold ranges/subquery steps.
    text = _BRACES_RE.sub(" ", text)
    text = _BRACKETS_RE.sub(" ", text)
    text = _GROUPING_RE.sub(" ", text)
    for m in _IDENT_RE.finditer(text):
        word, call = m.group(1), m.group(2)
        if call or word in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """`expr` with Grafana's built-ins replaced as in BUILTIN_SUBSTITUTIONS and every
    dashboard variable replaced by `variables[name]` (default `.*`, which matches any
    label value: all the dashboards use variables only inside `=~` matchers)."""
    for key, value in BUILTIN_SUBSTITUTIONS.items():
        expr = expr.replace(key, value)
    values = dict(variables or {})

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return values.get(name, ".*")

    return _VARIABLE_RE.sub(repl, expr)


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def raw_panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) exactly as written in the JSON, variables unsubstituted."""
    out = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((str(panel.get("title", "")), str(target["expr"])))
    return out


def iter_panel_queries(
    dashboard: Mapping[str, Any], variables: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """(panel title, runnable PromQL) for every panel target of a dashboard.

    Template variables become `.*` (or `variables[name]`), `$__rate_interval` 30s,
    `$__interval` 5s, `$__range` 5m. A panel with several targets yields several pairs
    with the same title.
    """
    return [(title, substitute(expr, variables)) for title, expr in raw_panel_queries(dashboard)]


def iter_annotation_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(annotation name, raw expr) of the Prometheus annotation queries."""
    out = []
    for ann in dashboard.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            out.append((str(ann.get("name", "")), str(ann["expr"])))
    return out


def iter_variable_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(variable name, query) of query-type template variables, e.g. label_values(...)."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, Mapping):
            query = query.get("query", "")
        out.append((str(var["name"]), str(query)))
    return out
