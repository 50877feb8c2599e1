"""`otelwatch top`, its data: what it polls from the daemon and keeps between polls.

The HTTP client (/api/sessions, /healthz, /metrics), the poller thread that keeps
a daemon that never answers from freezing the keys, the history of CPU and state
changes `top` keeps across polls, sorting and filtering. Pure but for the client
and the poller; never touches /proc.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from otelwatch.commands.status import (
    own_first,
    sessions_path,
    severity_key,
)

__all__ = ["CPU_POINTS", "SORTS", "Client", "History", "Poll", "Poller", "matches", "num", "parse_metrics",
           "sort_sessions"]

SORTS = ("severity", "silence", "cpu", "rss", "agent", "session")


CPU_POINTS = 8  # sparkline width: 8 polls


TRANSITIONS_KEPT = 30


METRICS_EVERY_S = 10.0  # /metrics can be large (per-session series): read it now and then


def num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


@dataclass
class Poll:
    """One round of reads from the daemon; `error` set when /api/sessions failed."""

    time: float
    sessions: list[dict[str, Any]] | None = None
    health: dict[str, Any] | None = None
    health_status: int | None = None
    metrics: dict[str, float] | None = None  # None: not read this round (or /metrics off)
    error: str | None = None


class History:
    """What top remembers across polls: each session's recent CPU (for the sparkline)
    and the state transitions it saw (the incident history of the drill-down)."""

    def __init__(self, points: int = CPU_POINTS, kept: int = TRANSITIONS_KEPT) -> None:
        self.points = points
        self.kept = kept
        self.cpu: dict[str, deque[float | None]] = {}
        self.transitions: dict[str, deque[tuple[float, str | None, str]]] = {}
        self._last: dict[str, str] = {}

    def update(self, sessions: Iterable[Mapping[str, Any]], now: float) -> None:
        seen = set()
        for s in sessions:
            sid = str(s.get("session_id", ""))
            seen.add(sid)
            cpu = s.get("cpu_percent")
            self.cpu.setdefault(sid, deque(maxlen=self.points)).append(
                float(cpu) if isinstance(cpu, (int, float)) else None)
            label = f"{s.get('state')}/{s.get('reason')}"
            before = self._last.get(sid)
            if before != label:
                since = s.get("state_since")
                # First sight: the daemon knows when the state began; later changes are
                # dated by the poll that saw them (within one interval).
                at = float(since) if before is None and isinstance(since, (int, float)) else now
                self.transitions.setdefault(sid, deque(maxlen=self.kept)).append((at, before, label))
                self._last[sid] = label
        for sid in [k for k in self._last if k not in seen]:  # left the daemon's listing
            self._last.pop(sid, None)
            self.cpu.pop(sid, None)
            self.transitions.pop(sid, None)


def parse_metrics(text: str) -> dict[str, float]:
    """The few series the header shows, summed over labels."""
    wanted = {"otelwatch_probe_timeouts_total": "probe_timeouts",
              "otelwatch_collector_tick_duration_seconds_sum": "tick_sum",
              "otelwatch_collector_tick_duration_seconds_count": "tick_count",
              "otelwatch_export_failures_total": "export_failures"}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("otelwatch_"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        key = wanted.get(name)
        if key is None:
            continue
        with contextlib.suppress(ValueError, IndexError):
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def sort_sessions(sessions: Iterable[Mapping[str, Any]], key: str = "severity") -> list[Mapping[str, Any]]:
    """Most severe first (stuck, stalled, long_running, active, idle, starting, exited),
    longest silence first within a state; other keys put the largest first."""
    sev = severity_key  # the same order as `otelwatch status`

    keys: dict[str, Callable[[Mapping[str, Any]], tuple[Any, ...]]] = {
        "severity": sev,
        "silence": lambda s: (s.get("state") == "exited", -num(s.get("silence_s")), *sev(s)),
        "cpu": lambda s: (-num(s.get("cpu_percent")), *sev(s)),
        "rss": lambda s: (-num(s.get("rss_bytes")), *sev(s)),
        "agent": lambda s: (str(s.get("agent")), *sev(s)),
        "session": lambda s: (str(s.get("session_id")),),
    }
    return sorted(sessions, key=keys.get(key, sev))


def matches(session: Mapping[str, Any], text: str) -> bool:
    """Filter terms, all must hold: `agent:X` (substring of the agent), `state:X` (state
    starts with X), `user:X` (the owner is X), or a bare word found in the agent,
    state, reason, session id, name, working directory or owner."""
    for term in text.lower().split():
        agent, state = str(session.get("agent", "")).lower(), str(session.get("state", "")).lower()
        if term.startswith("agent:"):
            ok = term[6:] in agent
        elif term.startswith("state:"):
            ok = state.startswith(term[6:])
        elif term.startswith("user:"):
            ok = str(session.get("user") or "").lower() == term[5:]
        else:
            ok = any(term in str(session.get(k) or "").lower()
                     for k in ("agent", "state", "reason", "session_id", "name", "cwd", "user"))
        if not ok:
            return False
    return True


class Client:
    """GETs against the daemon's API with short timeouts; errors become Poll.error."""

    def __init__(self, url: str, timeout: float = 2.0, user: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.user = user
        self._metrics_at = -math.inf
        self._metrics_off = False

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=self.timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:  # /healthz answers 503 with a body
            return int(exc.code), exc.read()

    def poll(self, now: float) -> Poll:
        poll = Poll(time=now)
        try:
            status, body = self._get(sessions_path(self.user))
            data = json.loads(body)
            if status != 200 or not isinstance(data, list):
                raise ValueError(f"/api/sessions answered {status}")
            poll.sessions = [dict(s) for s in own_first([s for s in data if isinstance(s, dict)])]
        except (urllib.error.URLError, OSError, ValueError) as exc:
            poll.error = str(getattr(exc, "reason", exc))
            return poll
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
            status, body = self._get("/healthz")
            health = json.loads(body)
            if isinstance(health, dict):
                poll.health, poll.health_status = health, status
        if not self._metrics_off and time.monotonic() - self._metrics_at >= METRICS_EVERY_S:
            self._metrics_at = time.monotonic()
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                status, body = self._get("/metrics")
                if status == 404:
                    self._metrics_off = True  # the daemon runs without its Prometheus endpoint
                elif status == 200:
                    poll.metrics = parse_metrics(body.decode("utf-8", "replace"))
        return poll


class Poller:
    """Polls on its own thread; the key loop picks up `latest` when `version` moves."""

    def __init__(self, client: Client, interval: float, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.interval = interval
        self.clock = clock
        self.latest: Poll | None = None
        self.version = 0
        self.paused = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otelwatch-top-poll", daemon=True)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.paused:
                poll = self.client.poll(self.clock())
                with self._lock:
                    self.latest, self.version = poll, self.version + 1
            self._wake.wait(self.interval)
            self._wake.clear()

    def take(self, seen: int) -> tuple[Poll | None, int]:
        with self._lock:
            return (self.latest, self.version) if self.version != seen else (None, seen)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
