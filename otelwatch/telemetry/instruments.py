"""otelwatch's OTel instruments: names, units, buckets, and the per-session gauges.

Owns the metric contract of DESIGN.md ("Telemetry"): every instrument name,
kind, unit and attribute key is defined here and nowhere else. Gauges are
observable and read only the observations pre-built by `SessionGauges.update`
from the last tick's snapshots; their callbacks run once per reader per
collection, so they only hand out lists that already exist. This module must
never read /proc or do any I/O.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
# What the agents' own OpenTelemetry reports (sources/otlp.py), by agent and model.
AGENT_TOKENS = "otelwatch.agent.tokens"
AGENT_COST = "otelwatch.agent.cost.usd"
AGENT_API_REQUESTS = "otelwatch.agent.api.requests"
AGENT_API_ERRORS = "otelwatch.agent.api.errors"

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


# The most sessions one daemon exports without an `otel.metric.overflow` series. The
# SDK's default cardinality limit (2 000 attribute sets per instrument and collection)
# would fold the TCP gauge (one series per session and TCP state) into an overflow
# series past a few hundred sessions. A limit only caps the SDK's per-set state (sets
# otelwatch stops observing are pruned, see AsyncStatePruner); nothing is preallocated.
MAX_EXPORTED_SESSIONS = 10_000
# Non-LISTEN TCP states a session can report (ESTABLISHED ... CLOSING, NEW_SYN_RECV).
_TCP_STATES_MAX = 11


def views() -> list[View]:
    """Explicit histogram buckets (the SDK's defaults top out at 10 000 and start at 0),
    and per-session gauges sized for MAX_EXPORTED_SESSIONS sessions."""
    per_session = [
        View(instrument_name=name, aggregation_cardinality_limit=MAX_EXPORTED_SESSIONS * (
            _TCP_STATES_MAX if name == SESSION_TCP else 1) + 1)
        for name in SessionGauges.PER_SESSION
    ]
    return [
        *per_session,
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
    mutated, so a collection on another thread sees one whole tick. Sessions
    that ended since the last update (`forget`) are left out by the callbacks
    until that update, so ending N sessions costs O(N), not N list rebuilds.
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
        self._obs: dict[str, list[Observation]] = {name: [] for name in self.PER_SESSION}
        self._obs[SESSIONS] = [Observation(0, {A_STATE: s.value}) for s in State]
        # The attribute sets observed per instrument, recomputed only when the
        # sessions' shapes (see `_observe_session`) change.
        self._shapes: tuple[Any, ...] = ()
        self._keys: dict[str, frozenset[_AttrKey]] = {name: frozenset() for name in self.PER_SESSION}
        # Session ids ended since the last update; replaced (never cleared) by update.
        self._forgotten: set[str] = set()
        # Set on a thread while it collects for a reader that renders the per-session
        # families itself (the Prometheus endpoint, see exposition.py): their callbacks
        # then hand that reader nothing. The per-state count is the SDK's everywhere.
        self._muted = threading.local()
        self.instruments: dict[str, Any] = {}
        self.instruments[SESSIONS] = meter.create_observable_gauge(
            SESSIONS, [self._callback(SESSIONS)], unit="{session}",
            description="Tracked sessions per state")
        for name, (unit, description) in self.PER_SESSION.items():
            self.instruments[name] = meter.create_observable_gauge(
                name, [self._callback(name)], unit=unit, description=description)

    def _callback(self, name: str) -> Any:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            if name != SESSIONS and getattr(self._muted, "on", False):
                return ()
            # The set before the lists: `update` replaces the lists first, so a set read
            # here is never newer than the lists it filters.
            forgotten = self._forgotten
            obs = self._obs[name]
            if not forgotten or name == SESSIONS:  # the usual collection: no copy
                return obs
            return [o for o in obs if (o.attributes or {}).get(A_SESSION_ID) not in forgotten]

        return observe

    def update(self, snapshots: Sequence[SessionSnapshot], *,
               per_session: bool = True) -> dict[str, frozenset[_AttrKey]]:
        """Rebuild every observation from `snapshots`; returns, per instrument name,
        the attribute sets observed last time and no longer (empty when none).
        `per_session=False`: only the per-state counts (no reader wants the rest)."""
        per_state = dict.fromkeys(State, 0)
        obs: dict[str, list[Observation]] = {name: [] for name in self.PER_SESSION}
        shapes = []
        for snap in snapshots:
            per_state[snap.state] += 1
            if snap.live and per_session:
                shapes.append(_observe_session(obs, snap))
        self._obs = {SESSIONS: [Observation(n, {A_STATE: s.value}) for s, n in per_state.items()], **obs}
        self._forgotten = set()  # after the lists: see `observe`
        shape = tuple(shapes)
        if shape == self._shapes:  # the usual tick: same series, new values
            return {}
        self._shapes = shape
        stale: dict[str, frozenset[_AttrKey]] = {}
        for name in self.PER_SESSION:
            keys = frozenset(_key(o.attributes) for o in obs[name])
            gone = self._keys[name] - keys
            if gone:
                stale[name] = gone
            self._keys[name] = keys
        return stale

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Collections on this thread, inside the block, get no per-session observation
        (the per-state count still). Callbacks run synchronously on the collecting
        thread (SDK MeasurementConsumer.collect), so no other reader is affected."""
        self._muted.on = True
        try:
            yield
        finally:
            self._muted.on = False

    def forget(self, session_id: str) -> None:
        """Drop one session's series now (it ended); the next update confirms it. O(1):
        collections filter the ended sessions out until then."""
        self._forgotten.add(session_id)


def _observe_session(obs: dict[str, list[Observation]], snap: SessionSnapshot) -> tuple[Any, ...]:
    """Append the session's observations; returns its shape: everything that
    decides which attribute sets it has (not their values)."""
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
    # Unknown TCP (another user's FDs, unreadable) has no series, like unknown FDs: never 0.
    tcp = {} if snap.tcp is None else dict.fromkeys(ALWAYS_TCP_STATES, 0)
    tcp.update(snap.tcp or {})
    tcp_states = tuple(sorted(tcp))
    for tcp_state in tcp_states:
        obs[SESSION_TCP].append(Observation(int(tcp[tcp_state]), {**base, A_TCP_STATE: tcp_state}))
    return (snap.session_id, snap.agent, snap.state, snap.reason, snap.last_event_age_s is None,
            snap.last_event_time is None, snap.cpu_percent is None, snap.open_fds is None, tcp_states)


# --------------------------------------------------------------------------- SDK state pruning


class AsyncStatePruner:
    """Frees the SDK's per-attribute-set state of series otelwatch stopped observing.

    Why: the OTel Python SDK (checked with 1.45) keeps one aggregation per
    attribute set ever observed by an asynchronous instrument, for the life of
    the MeterProvider, in every reader. Stale sets are not exported, but they
    are never freed, and after 2 000 of them (the default cardinality limit)
    every new session's series is folded into `otel.metric.overflow`. Session
    ids are unbounded over a daemon's life, so we drop the sets no longer
    observed.

    Kept narrow: it runs only when a gauge's series went away, touches only the
    instruments named, and drops only the attribute sets named. It holds the
    SDK's collection lock, under which every collection runs the callbacks and
    stores what they return, so a collection that read the previous tick's
    observations cannot re-add a set after it was dropped. This reaches into SDK
    internals; if any of them (the lock included) is missing, the pruner
    disables itself with one warning rather than prune unguarded
    (tests/system/test_telemetry_instruments.py checks with the real SDK that 2 000 sessions stay
    bounded, so an upgrade that breaks it fails loudly there).
    """

    def __init__(self, provider: MeterProvider) -> None:
        self._provider = provider
        self._broken = False

    def prune(self, stale: Mapping[Any, frozenset[_AttrKey]]) -> int:
        """Drop, for each instrument in `stale`, the attribute sets listed; returns
        how many aggregations were dropped."""
        if self._broken or not stale:
            return 0
        try:
            return self._prune(stale)
        except Exception as exc:  # SDK internals changed: degrade, never crash the tick
            self._broken = True
            _log.warning("cannot prune OTel SDK state (%r); per-session series may overflow", exc)
            return 0

    def _prune(self, stale: Mapping[Any, frozenset[_AttrKey]]) -> int:
        consumer: Any = self._provider._measurement_consumer  # SDK internal, see the class docstring
        dropped = 0
        with consumer._lock:
            for storage in consumer._reader_storages.values():
                for instrument, gone in stale.items():
                    for match in storage._instrument_view_instrument_matches.get(instrument, ()):
                        with match._lock:
                            current = match._attributes_aggregation
                            kept = {k: agg for k, agg in current.items() if _key(agg._attributes) not in gone}
                            if len(kept) != len(current):
                                dropped += len(current) - len(kept)
                                match._attributes_aggregation = kept
        return dropped
