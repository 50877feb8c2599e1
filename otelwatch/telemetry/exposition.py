"""The per-session gauge families of GET /metrics, rendered straight from the last tick's snapshots.

Why not through the OpenTelemetry SDK like the counters: a scrape through the
SDK aggregates and translates every session's observations again (about 9
series per session), which cost more than the whole tick at 100 sessions and
180 ms at 1,000. Here a scrape formats the snapshots the loop already
published, once per tick and format (later scrapes of the same tick reuse the
bytes), and the SDK keeps serving everything else (counters, histograms,
target_info). The names, labels, HELP and UNIT lines are the ones the SDK's
Prometheus translation gives for the same instruments (instruments.py owns
them); tests/unit/telemetry/test_telemetry_exposition.py compares both renderings on the same
snapshots. Never touches /proc, never does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client.utils import floatToGoString

from otelwatch.model import SessionSnapshot
from otelwatch.telemetry.instruments import (
    ALWAYS_TCP_STATES,
    SESSION_CPU,
    SESSION_FDS,
    SESSION_LAST_EVENT_AGE,
    SESSION_LAST_EVENT_TIME,
    SESSION_RSS,
    SESSION_STATUS,
    SESSION_TCP,
    SESSION_THREADS,
    SessionGauges,
)

# The SDK's Prometheus translation: dots become underscores; unit "s" adds `_seconds` and
# "By" `_bytes` (and an OpenMetrics UNIT line); "1" and "{...}" units add nothing.
_UNIT_SUFFIX = {"s": "seconds", "By": "bytes"}


def _family(instrument: str) -> tuple[str, str, str]:
    """(Prometheus name, OpenMetrics unit or "", HELP text) of a per-session gauge."""
    unit, description = SessionGauges.PER_SESSION[instrument]
    suffix = _UNIT_SUFFIX.get(unit, "")
    name = instrument.replace(".", "_") + (f"_{suffix}" if suffix else "")
    return name, suffix, description


def _label(value: str) -> str:
    """A label value as the exposition formats escape it (backslash, newline, quote)."""
    if "\\" in value or "\n" in value or '"' in value:
        value = value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


class SessionExposition:
    """The snapshots of the last tick and, per exposition format, their rendering.

    `update` runs on the loop thread, `render` on HTTP threads. Every field is
    replaced, never mutated (except the ended set, only added to), and `update`
    replaces the cache last while `render` reads it first, so a render of the
    previous tick can never be cached as this tick's.
    """

    def __init__(self) -> None:
        self._snapshots: tuple[SessionSnapshot, ...] = ()
        # Sessions ended since the last update: left out until then (see SessionGauges.forget).
        self._ended: set[str] = set()
        self._cache: dict[bool, bytes] = {}

    def update(self, snapshots: Sequence[SessionSnapshot]) -> None:
        self._snapshots = tuple(snapshots)
        self._ended = set()
        self._cache = {}

    def forget(self, session_id: str) -> None:
        self._ended.add(session_id)
        self._cache = {}

    def render(self, openmetrics: bool) -> bytes:
        cache = self._cache
        body = cache.get(openmetrics)
        if body is None:
            body = cache[openmetrics] = render_sessions(self._snapshots, self._ended, openmetrics)
        return body


def render_sessions(snapshots: Sequence[SessionSnapshot], ended: set[str] | frozenset[str],
                    openmetrics: bool) -> bytes:
    """Every per-session gauge family for `snapshots` (the per-state count stays the SDK's)."""
    fmt = floatToGoString
    status: list[str] = []
    age: list[str] = []
    when: list[str] = []
    cpu: list[str] = []
    rss: list[str] = []
    fds: list[str] = []
    threads: list[str] = []
    tcp: list[str] = []
    for snap in snapshots:
        if not snap.live or snap.session_id in ended:
            continue
        base = f'agent="{_label(snap.agent)}",session_id="{_label(snap.session_id)}"'
        status.append(f'{{agent="{_label(snap.agent)}",reason="{snap.reason.value}",'
                      f'session_id="{_label(snap.session_id)}",state="{snap.state.value}"}} 1.0\n')
        if snap.last_event_age_s is not None:
            age.append(f"{{{base}}} {fmt(snap.last_event_age_s)}\n")
        if snap.last_event_time is not None:
            when.append(f"{{{base}}} {fmt(snap.last_event_time)}\n")
        if snap.cpu_percent is not None:
            cpu.append(f"{{{base}}} {fmt(snap.cpu_percent / 100.0)}\n")
        rss.append(f"{{{base}}} {fmt(snap.rss_bytes)}\n")
        if snap.open_fds is not None:
            fds.append(f"{{{base}}} {fmt(snap.open_fds)}\n")
        threads.append(f"{{{base}}} {fmt(snap.threads)}\n")
        counts = {} if snap.tcp is None else dict.fromkeys(ALWAYS_TCP_STATES, 0)  # unknown: no series
        counts.update(snap.tcp or {})
        for tcp_state in sorted(counts):
            tcp.append(f'{{{base},tcp_state="{_label(tcp_state)}"}} {fmt(counts[tcp_state])}\n')
    rows: dict[str, list[str]] = {
        SESSION_STATUS: status, SESSION_LAST_EVENT_AGE: age, SESSION_LAST_EVENT_TIME: when,
        SESSION_CPU: cpu, SESSION_RSS: rss, SESSION_FDS: fds, SESSION_THREADS: threads, SESSION_TCP: tcp,
    }
    out: list[str] = []
    for instrument in SessionGauges.PER_SESSION:  # in the order the SDK created them
        lines = rows[instrument]
        if not lines:  # as the SDK: a family without a sample is not announced
            continue
        name, unit, description = _family(instrument)
        out.append(f"# HELP {name} {_help(description)}\n# TYPE {name} gauge\n")
        if openmetrics and unit:
            out.append(f"# UNIT {name} {unit}\n")
        out.extend(name + line for line in lines)
    return "".join(out).encode()
