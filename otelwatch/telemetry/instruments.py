"""otelwatch's OTel instruments: names, units, buckets, and the per-session gauges.

Owns the metric contract of DESIGN.md ("Telemetry"): every instrument name,
kind, unit and attribute key is defined here and nowhere else. Gauges are
observable and read only the observations pre-built by `SessionGauges.update`
from the last tick's snapshots; their callbacks run once per reader per
collection, so they only hand out lists that already exist. This module must
never read /proc or do any I/O.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

from otelwatch.model import SessionSnapshot, State

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- contract names

SESSION_STATE = "otelwatch.session.state"
SESSION_STALLED = "otelwatch.session.stalled"
SESSION_STUCK = "otelwatch.session.stuck"
SESSION_STALLED_AGE = "otelwatch.session.stalled.age"
SESSION_STUCK_AGE = "otelwatch.session.stuck.age"
RECOVERY_REQUESTED = "otelwatch.recovery.requested"
RECOVERY_COMPLETED = "otelwatch.recovery.completed"
RECOVERY_DURATION = "otelwatch.recovery.duration"
SESSIONS = "otelwatch.sessions"
SESSION_STATUS = "otelwatch.session.status"
SESSION_LAST_EVENT_AGE = "otelwatch.session.last_event.age"
SESSION_LAST_EVENT_TIME = "otelwatch.session.last_event.time"
SESSION_CPU = "otelwatch.session.cpu.utilization"
SESSION_RSS = "otelwatch.session.memory.rss"
SESSION_FDS = "otelwatch.session.open_fds"
SESSION_THREADS = "otelwatch.session.threads"
SESSION_TCP = "otelwatch.session.tcp.connections"
TICK_DURATION = "otelwatch.collector.tick.duration"
PROBE_TIMEOUTS = "otelwatch.probe.timeouts"
PROBE_ERRORS = "otelwatch.probe.errors"
EXPORT_FAILURES = "otelwatch.export.failures"

# Attribute keys (Prometheus labels: dots become underscores).
A_SESSION_ID = "session.id"
A_AGENT = "agent"
A_STATE = "state"
A_REASON = "reason"
A_TCP_STATE = "tcp.state"

# Silences run from seconds (a short stall_after in tests) to many hours.
SILENCE_BUCKETS: tuple[float, ...] = (
    1, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 86400,
)
RECOVERY_BUCKETS: tuple[float, ...] = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
# A tick is milliseconds when healthy and up to probe_timeout (seconds) when not.
TICK_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)

# The TCP state every session reports even at zero, so `== 0` alert rules match.
ALWAYS_TCP_STATES = ("ESTABLISHED",)


def views() -> list[View]:
    """Explicit histogram buckets; the SDK's defaults top out at 10 000 and start at 0."""
    return [
        View(instrument_name=SESSION_STALLED_AGE,
             aggregation=ExplicitBucketHistogramAggregation(SILENCE_BUCKETS)),
        View(instrument_name=SESSION_STUCK_AGE,
             aggregation=ExplicitBucketHistogramAggregation(SILENCE_BUCKETS)),
        View(instrument_name=RECOVERY_DURATION,
             aggregation=ExplicitBucketHistogramAggregation(RECOVERY_BUCKETS)),
        View(instrument_name=TICK_DURATION,
             aggregation=ExplicitBucketHistogramAggregation(TICK_BUCKETS)),
    ]


# --------------------------------------------------------------------------- gauges

_Attrs = dict[str, str]
_AttrKey = frozenset[tuple[str, Any]]


def _key(attrs: Any) -> _AttrKey:
    return frozenset((attrs or {}).items())


class SessionGauges:
    """Observations for the observable gauges, rebuilt once per tick by `update`.

    The callbacks return the lists built here; a list is replaced, never
    mutated, so a collection on another thread sees one whole tick.
    """

    # instrument name -> (unit, description)
    PER_SESSION: dict[str, tuple[str, str]] = {
        SESSION_STATUS: ("{session}", "1 per live session, labelled with its state and reason"),
        SESSION_LAST_EVENT_AGE: ("s", "Seconds since the session's last event of any kind"),
        SESSION_LAST_EVENT_TIME: ("s", "Unix time of the session's last event"),
        SESSION_CPU: ("1", "CPU of the session's process tree, 1.0 = one core"),
        SESSION_RSS: ("By", "Resident memory of the session's process tree"),
        SESSION_FDS: ("{file_descriptor}", "Open file descriptors of the session's tree"),
        SESSION_THREADS: ("{thread}", "Threads of the session's process tree"),
        SESSION_TCP: ("{connection}", "TCP connections of the session's tree by state"),
    }

    def __init__(self, meter: Meter) -> None:
        self._obs: dict[str, list[Observation]] = {name: [] for name in (SESSIONS, *self.PER_SESSION)}
        self._obs[SESSIONS] = [Observation(0, {A_STATE: s.value}) for s in State]
        self._keys: dict[str, frozenset[_AttrKey]] = {name: frozenset() for name in self.PER_SESSION}
        self.instruments: dict[str, Any] = {}
        self.instruments[SESSIONS] = meter.create_observable_gauge(
            SESSIONS, [self._callback(SESSIONS)], unit="{session}",
            description="Tracked sessions per state")
        for name, (unit, description) in self.PER_SESSION.items():
            self.instruments[name] = meter.create_observable_gauge(
                name, [self._callback(name)], unit=unit, description=description)

    def _callback(self, name: str) -> Any:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return self._obs[name]

        return observe

    def update(self, snapshots: Sequence[SessionSnapshot]) -> bool:
        """Rebuild every observation from `snapshots`; True when the set of
        per-session series changed (so stale SDK state is worth pruning)."""
        per_state = dict.fromkeys(State, 0)
        obs: dict[str, list[Observation]] = {name: [] for name in self.PER_SESSION}
        for snap in snapshots:
            per_state[snap.state] = per_state.get(snap.state, 0) + 1
            if snap.live:
                _observe_session(obs, snap)
        new = {SESSIONS: [Observation(n, {A_STATE: s.value}) for s, n in per_state.items()], **obs}
        changed = False
        for name in self.PER_SESSION:
            keys = frozenset(_key(o.attributes) for o in obs[name])
            if keys != self._keys[name]:
                changed = True
                self._keys[name] = keys
        self._obs = new
        return changed

    def forget(self, session_id: str) -> None:
        """Drop one session's series now (it ended); the next update confirms it."""
        obs = dict(self._obs)
        for name in self.PER_SESSION:
            obs[name] = [o for o in obs[name] if (o.attributes or {}).get(A_SESSION_ID) != session_id]
        self._obs = obs

    def live_keys(self, name: str) -> frozenset[_AttrKey]:
        return frozenset(_key(o.attributes) for o in self._obs.get(name, ()))

    def series_count(self) -> int:
        return sum(len(v) for v in self._obs.values())


def _observe_session(obs: dict[str, list[Observation]], snap: SessionSnapshot) -> None:
    base = {A_SESSION_ID: snap.session_id, A_AGENT: snap.agent}
    obs[SESSION_STATUS].append(
        Observation(1, {**base, A_STATE: snap.state.value, A_REASON: snap.reason.value}))
    if snap.last_event_age_s is not None:
        obs[SESSION_LAST_EVENT_AGE].append(Observation(float(snap.last_event_age_s), base))
    if snap.last_event_time is not None:
        obs[SESSION_LAST_EVENT_TIME].append(Observation(float(snap.last_event_time), base))
    if snap.cpu_percent is not None:
        obs[SESSION_CPU].append(Observation(snap.cpu_percent / 100.0, base))
    obs[SESSION_RSS].append(Observation(int(snap.rss_bytes), base))
    if snap.open_fds is not None:
        obs[SESSION_FDS].append(Observation(int(snap.open_fds), base))
    obs[SESSION_THREADS].append(Observation(int(snap.threads), base))
    tcp = dict.fromkeys(ALWAYS_TCP_STATES, 0)
    tcp.update(snap.tcp)
    for tcp_state, count in sorted(tcp.items()):
        obs[SESSION_TCP].append(Observation(int(count), {**base, A_TCP_STATE: tcp_state}))


# --------------------------------------------------------------------------- SDK state pruning


class AsyncStatePruner:
    """Frees the SDK's per-attribute-set state of series that are gone.

    Why: the OTel Python SDK (checked with 1.45) keeps one aggregation per
    attribute set ever observed by an asynchronous instrument, for the life of
    the MeterProvider, in every reader. Stale sets are not exported, but they
    are never freed, and after 2 000 of them (the default cardinality limit)
    every new session's series is folded into `otel.metric.overflow`. Session
    ids are unbounded over a daemon's life, so we drop the sets no longer
    observed. This reaches into SDK internals; if they change shape the
    pruner disables itself with one warning (tests/test_telemetry.py checks
    that 2 000 sessions stay bounded with the real SDK, so an upgrade that
    breaks it fails loudly there).
    """

    def __init__(self, provider: MeterProvider) -> None:
        self._provider = provider
        self._broken = False

    @property
    def working(self) -> bool:
        return not self._broken

    def prune(self, live: dict[Any, frozenset[_AttrKey]]) -> int:
        """Keep, for each instrument in `live`, only the attribute sets listed; returns
        how many were dropped."""
        if self._broken:
            return 0
        try:
            return self._prune(live)
        except Exception as exc:  # SDK internals changed: degrade, never crash the tick
            self._broken = True
            _log.warning("cannot prune OTel SDK state (%s); per-session series may overflow", exc)
            return 0

    def _prune(self, live: dict[Any, frozenset[_AttrKey]]) -> int:
        consumer: Any = getattr(self._provider, "_measurement_consumer")  # noqa: B009 - SDK internal
        dropped = 0
        # The consumer's lock is held by every collection while callbacks run and
        # measurements are stored, so no collection re-adds what we drop mid-way.
        lock = getattr(consumer, "_lock", None) or threading.Lock()
        with lock:
            for storage in list(consumer._reader_storages.values()):
                matches_by_instrument = storage._instrument_view_instrument_matches
                for instrument, matches in list(matches_by_instrument.items()):
                    keep = live.get(instrument)
                    if keep is None:
                        continue
                    for match in matches:
                        with match._lock:
                            current = match._attributes_aggregation
                            kept = {k: agg for k, agg in current.items() if _key(agg._attributes) in keep}
                            if len(kept) != len(current):
                                dropped += len(current) - len(kept)
                                match._attributes_aggregation = kept
        return dropped
