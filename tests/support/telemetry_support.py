"""Builders for the telemetry tests: a session snapshot, Prometheus samples of an
exposition, the JSON log lines a `Telemetry` wrote. The `tel` and `spans`
fixtures are in conftest.py.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from otelwatch.model import Reason, SessionSnapshot, State
from otelwatch.telemetry import Telemetry

NOW = time.time()


def snap(sid: str = "s1", state: State = State.ACTIVE, reason: Reason = Reason.RECENT_PROGRESS,
         **kw: Any) -> SessionSnapshot:
    fields: dict[str, Any] = dict(
        session_id=sid, agent="claude-code", pid=4242, state=state, reason=reason,
        state_since=NOW - 30, last_event_time=NOW - 20, last_event_age_s=20.0, silence_s=20.0,
        cpu_percent=50.0, rss_bytes=123456, open_fds=9, threads=4, tcp={"ESTABLISHED": 1})
    fields.update(kw)
    return SessionSnapshot(**fields)


def samples(body: bytes) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value)
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]


def find(body: bytes, name: str, **labels: str) -> list[float]:
    return [v for n, lab, v in samples(body)
            if n == name and all(lab.get(k) == val for k, val in labels.items())]


def logs_of(t: Telemetry) -> list[dict[str, Any]]:
    stream = t._log._stream
    assert isinstance(stream, io.StringIO)
    return [json.loads(line) for line in stream.getvalue().splitlines()]
