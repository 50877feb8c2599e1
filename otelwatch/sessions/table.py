"""The session table: every tracked session, merged from all sources, with its aliases.

`SessionTable` owns merging what the sources say about a session (source priority,
re-keying, binding a registration to its process), events that arrive before
their session, ended registrations and lookups; `Tracked` is one session's
loop-side record and `snapshot_of` what the outside sees of it.

Two small bounded maps serve it: `AliasMap` (other ids of a
session, such as a transcript uuid or a hook's session id, pointing at its key)
and `EndedRegistrations` (registrations whose process is gone, so that a stale
registry file or spool record is not turned into a new session again and again,
and never adopts whatever process reuses its PID).

Both are fed by inputs other programs write (hooks, POST /api/events, registry
files), so both are bounded: a flood of ids costs a fixed amount of memory, and
forgetting a session costs O(its aliases), not O(all aliases).

Must never do I/O or read a clock: time comes in as `now`, process facts in a ProcessTable.
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from otelwatch.events.activity import Activity
from otelwatch.model import (
    CPU_TICK_SECONDS,
    FOREIGN_CREATE_TIME_SKEW_S,
    Event,
    EventKind,
    Mode,
    ProcessIdentity,
    Reason,
    RecoveryStep,
    Runtime,
    SampleStatus,
    SessionSnapshot,
    SessionSpec,
    SourceKind,
    State,
    TreeSample,
    Verdict,
    same_process,
)
from otelwatch.sessions.report import children_detail
from otelwatch.sessions.visibility import owner_uid, user_name, visibility_of

if TYPE_CHECKING:
    from otelwatch.classify.backoff import ReportSchedule
    from otelwatch.probe.proctable import ProcessTable
    from otelwatch.sources.feeds import EventFeed
    from otelwatch.sources.tmux import PaneInfo
    from otelwatch.sources.transcripts import ClaudeSession

__all__ = [
    "ALIASES_PER_SESSION",
    "ENDED_MAX",
    "PENDING_EVENTS_MAX_SESSIONS",
    "PENDING_EVENTS_PER_SESSION",
    "REGISTRATION_SKEW_S",
    "SOURCE_PRIORITY",
    "AliasMap",
    "EndedRegistrations",
    "SessionTable",
    "Tracked",
    "reaction_seen",
    "session_uid",
    "snapshot_of",
]

# A session has a handful of other names (its transcript's uuid, a hook session id,
# an id a stronger source gave it). More than this is someone minting ids.
ALIASES_PER_SESSION = 16
ENDED_MAX = 10_000
# Lower wins when two sources describe the same process: an explicit registration
# (exec wrapper, registry file, API) names the session better than discovery.
# Which description of a session wins when several sources describe one process: the
# ones a program wrote on purpose, then hooks, then what discovery inferred.
SOURCE_PRIORITY: dict[str, int] = {SourceKind.EXEC: 0, SourceKind.REGISTRY: 0, SourceKind.API: 0, SourceKind.HOOK: 1,
                                   SourceKind.TMUX: 2, SourceKind.PROCESS: 3}
PENDING_EVENTS_MAX_SESSIONS = 1000
PENDING_EVENTS_PER_SESSION = 50
# A process's start (ProcessTable.started_at, to a clock tick) against a file's mtime
# (coarse by a jiffy): margin for those and a little wall-clock slew. It was 1.5 s on
# top of an uncorrected whole-second boot time, so a PID reused 2.5 s after its
# registration could be adopted.
REGISTRATION_SKEW_S = 0.5


class AliasMap:
    """alias -> session key, with a reverse index and a per-session cap (oldest dropped)."""

    def __init__(self, per_session: int = ALIASES_PER_SESSION) -> None:
        self._key_of: dict[str, str] = {}
        self._of_key: dict[str, OrderedDict[str, None]] = {}
        self._per_session = per_session

    def __len__(self) -> int:
        return len(self._key_of)

    def __contains__(self, alias: object) -> bool:
        return alias in self._key_of

    def resolve(self, session_id: str) -> str:
        """The key `session_id` stands for (itself when it is no alias)."""
        return self._key_of.get(session_id, session_id)

    def get(self, alias: str) -> str | None:
        return self._key_of.get(alias)

    def add(self, alias: str, key: str) -> None:
        if alias == key:
            return
        self.discard(alias)
        names = self._of_key.setdefault(key, OrderedDict())
        names[alias] = None
        self._key_of[alias] = key
        while len(names) > self._per_session:
            oldest, _ = names.popitem(last=False)
            del self._key_of[oldest]

    def discard(self, alias: str) -> None:
        key = self._key_of.pop(alias, None)
        if key is not None:
            names = self._of_key.get(key)
            if names is not None:
                names.pop(alias, None)
                if not names:
                    del self._of_key[key]

    def aliases_of(self, key: str) -> tuple[str, ...]:
        return tuple(self._of_key.get(key, ()))

    def rekey(self, old: str, new: str) -> None:
        """Every alias of `old` now points at `new`, and `old` itself becomes one."""
        for alias in self.aliases_of(old):
            self.add(alias, new)
        self._of_key.pop(old, None)
        self.add(old, new)

    def forget(self, key: str) -> None:
        """Drop every alias of `key` (the session is gone)."""
        for alias in self._of_key.pop(key, ()):
            self._key_of.pop(alias, None)


class EndedRegistrations:
    """Registrations (session id, pid, when written) whose session has ended.

    A registry file or spool record outlives its process. Once its session ended,
    the same registration must stay ended: not come back as a new session after
    `exited_retention`, and never bind to a later process that reuses its PID. A
    registration that changes (new pid, or rewritten later) is a new one.
    """

    def __init__(self, limit: int = ENDED_MAX) -> None:
        self._ended: OrderedDict[str, tuple[int | None, float | None]] = OrderedDict()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._ended)

    def add(self, session_id: str, pid: int | None, registered_at: float | None) -> None:
        self._ended[session_id] = (pid, registered_at)
        self._ended.move_to_end(session_id)
        while len(self._ended) > self._limit:
            self._ended.popitem(last=False)

    def ended(self, session_id: str, pid: int | None, registered_at: float | None) -> bool:
        """Whether this exact registration already ended."""
        return self._ended.get(session_id) == (pid, registered_at)

    def discard(self, session_id: str) -> None:
        self._ended.pop(session_id, None)


@dataclass
class Tracked:
    """Everything the loop knows about one session. Mutated only by the loop thread."""

    key: str
    spec: SessionSpec
    started_at: float
    identity: ProcessIdentity | None = None
    samples: deque[TreeSample] = field(default_factory=deque)
    activity: Activity = field(default_factory=Activity)
    tail: EventFeed | None = None  # its events file, transcript or agent database
    verdict: Verdict | None = None
    state_since: float = 0.0
    schedule: ReportSchedule | None = None
    stalls: int = 0
    longest_silence: float = 0.0
    recoveries: list[RecoveryStep] = field(default_factory=list)
    ended_at: float | None = None
    snapshot: SessionSnapshot | None = None
    transcript_checked_at: float = 0.0
    # Claude Code's session file for this process, as read this tick and the tick before:
    # the CLI's own word on its turn (idle, busy, waiting on its user) and its transcript.
    claude: ClaudeSession | None = None
    claude_before: ClaudeSession | None = None
    # turn_opened_at of the turn after which the session's own processes (or its own
    # output) showed work: until then a turn-based session is not recoverable, since
    # an event alone (a forged or stray turn start) must never open the recovery gate.
    reacted_turn: float | None = None
    # Names a person recognises (names.py): the agent's own name for the session, its
    # working directory, its owner; shown, never metric labels.
    name: str | None = None
    cwd: str | None = None
    user: str | None = None
    names_read_at: float = 0.0
    untracked: bool = False  # its registration was removed: ends once the process is gone or at once
    usage: Mapping[str, Any] | None = None  # tokens and cost from the agent's own OTLP (sources/otlp.py)
    dropped: bool = False  # no longer listed at all (untracked while alive)
    # Whether its turn information could be read: "ok", "denied", "disabled" or "none"
    # (sessions/visibility.py); set by the sources each tick.
    turns: str = "none"

    @property
    def latest(self) -> TreeSample | None:
        return self.samples[-1] if self.samples else None

    def own_turn(self) -> bool:
        """Whether recovery may count on this session's turn: headless sessions process
        from start to exit; a turn-based one only inside a turn the session itself opened
        (`Activity.turn_own`: an own event, never an observed one)."""
        if self.spec.mode is not Mode.INTERACTIVE:
            return True
        return self.activity.turn_open and self.activity.turn_own

    def reacted(self, work_percent: float) -> bool:
        """Whether a turn-based session's own processes showed work since its turn opened.

        A headless session processes from start to exit; no event moves it into
        processing, so there is nothing to prove. A turn-based one is processing only
        because a turn-opening event arrived: it is recoverable only once its processes
        (CPU, TCP, a new child) or its own output (a progress event that is not a turn
        start and did not come over HTTP) reacted after that."""
        if self.spec.mode is not Mode.INTERACTIVE:
            return True
        activity = self.activity
        opened = activity.turn_opened_at
        if not activity.turn_open or opened is None:
            return False
        if self.reacted_turn != opened and reaction_seen(tuple(self.samples), activity, opened, work_percent):
            self.reacted_turn = opened
        return self.reacted_turn == opened


class SessionTable:
    """Every tracked session by key, with the other ids that lead to it.

    Owns merging what the sources say about a session (source priority, re-keying a
    discovered session when a stronger source names it, aliases), binding a new
    session to its process (`_bind_identity`), events that arrive before their
    session (pending, bounded), ended registrations, and lookups. Mutated by the
    collector loop's thread only. Side effects of a session ending (telemetry,
    recovery, the probe's history) are the daemon's: `on_end` and `on_rekey`.
    """

    def __init__(self, *, on_end: Callable[[Tracked, float], None], on_rekey: Callable[[str], None],
                 log: Callable[[str, Mapping[str, Any], str], None]) -> None:
        self._tracked: dict[str, Tracked] = {}
        self.forgotten: list[Tracked] = []  # forgotten with their feeds open (see forget)
        self._aliases = AliasMap()  # other ids of a session (transcript uuid, hook id) -> key
        self._ended_registrations = EndedRegistrations()
        # session id -> when its pid was first missing from the tick's process table
        self._absent_since: dict[str, float] = {}
        self._pending: dict[str, deque[Event]] = {}
        self._end = on_end
        self._on_rekey = on_rekey
        self._log = log

    # ------------------------------------------------------------------ lookups

    def __len__(self) -> int:
        return len(self._tracked)

    def __contains__(self, key: object) -> bool:
        return key in self._tracked

    def values(self) -> list[Tracked]:
        """The sessions, as a list: callers may end or forget sessions while iterating."""
        return list(self._tracked.values())

    def get(self, key: str) -> Tracked | None:
        return self._tracked.get(key)

    def resolve(self, session_id: str) -> str:
        """The key `session_id` stands for (itself when it is no alias)."""
        return self._aliases.resolve(session_id)

    def find(self, session_id: str) -> Tracked | None:
        """The session `session_id` or one of its aliases names."""
        return self._tracked.get(self._aliases.resolve(session_id))

    def agent_pids(self) -> set[int]:
        return {t.spec.pid for t in self._tracked.values() if t.spec.pid is not None and t.ended_at is None}

    def snapshots(self) -> tuple[SessionSnapshot, ...]:
        return tuple(t.snapshot for t in self._tracked.values() if t.snapshot is not None)

    # ------------------------------------------------------------------ merging

    def merge(self, specs: Iterable[SessionSpec], table: ProcessTable, now: float, *, registry_ok: bool) -> None:
        """One tick's descriptions from every source; strongest source first.

        `registry_ok`: the registry scan worked this tick, so a registration missing
        from it was removed (a failed read is not a removal)."""
        seen_registered: set[str] = set()
        ordered = sorted(specs, key=lambda s: SOURCE_PRIORITY.get(s.source, 9))
        for spec in ordered:
            if spec.source in ("registry", "exec", "api"):
                seen_registered.add(spec.session_id)
            self._merge_spec(spec, table, now)
        if self._absent_since:  # only ids still described this tick may wait (bounded)
            described = {spec.session_id for spec in ordered}
            self._absent_since = {k: t for k, t in self._absent_since.items() if k in described}
        # A removed registration ends tracking (DESIGN: "Removing the file ends tracking"),
        # judged only on a registry scan that worked: a failed read is not a removal.
        for tracked in self._tracked.values():
            source = tracked.spec.source
            judged = source == "api" or (source in ("registry", "exec") and registry_ok)
            if judged and tracked.key not in seen_registered and tracked.ended_at is None:
                tracked.untracked = True

    def apply_panes(self, found: Mapping[int, PaneInfo] | None) -> None:
        """The tmux scan's agent pid -> pane; None when tmux is off or its scan failed."""
        # The runtime axis, re-checked every tick (not remembered): each agent names the tmux
        # pane it runs in (or ran in, while the pane outlives it); one no scan finds any more
        # is unknown again, and asked afresh if its agent dies (see _classify).
        panes = found or {}  # empty: tmux off, or its scan failed this tick
        for tracked in self._tracked.values() if found is not None else ():
            spec = tracked.spec
            if tracked.ended_at is not None or spec.pid is None:
                continue
            pane = panes.get(spec.pid)
            if pane is not None:
                runtime = Runtime("tmux", pane.target, pane.socket)
                if spec.runtime != runtime or spec.runtime_alive is not True:
                    tracked.spec = replace(spec, runtime=runtime, runtime_alive=True)
            elif spec.runtime is not None and spec.runtime.socket:
                # A pane the scans found (it names its server) and no scan finds any more: its
                # server is gone (tmux kill-server) or the pane closed. No runtime now.
                tracked.spec = replace(spec, runtime=None, runtime_alive=None)
            elif spec.runtime_alive is True:
                tracked.spec = replace(spec, runtime_alive=None)

    def _merge_spec(self, spec: SessionSpec, table: ProcessTable, now: float) -> None:
        tracked = self._tracked.get(spec.session_id)
        if tracked is None:
            key = self._aliases.get(spec.session_id)
            aliased = self._tracked.get(key) if key is not None else None
            # An alias only joins descriptions of the same process. One naming another
            # pid is stale or forged: it must never end or re-key the session it points at.
            if aliased is not None and (spec.pid is None or spec.pid == aliased.spec.pid):
                tracked = aliased
            elif aliased is not None:
                self._aliases.discard(spec.session_id)
        if tracked is not None and _replaces_process(spec, tracked.spec) and tracked.key == spec.session_id:
            # Re-registered under the same id with another process (an orchestrator
            # restarted its agent): the old one ends here, the new one starts clean,
            # never inheriting the old history (or its recovery window).
            if tracked.ended_at is None:
                self._end(tracked, now)
            self.forget(tracked.key)
            tracked = None
        if tracked is not None:
            if tracked.ended_at is None or spec.pid == tracked.spec.pid:
                stronger = SOURCE_PRIORITY.get(spec.source, 9) <= SOURCE_PRIORITY.get(tracked.spec.source, 9)
                tracked.spec = _merged(spec, tracked.spec) if stronger else _merged(tracked.spec, spec)
                tracked.untracked = False
            return
        if spec.pid is not None:
            for other in self._tracked.values():
                if other.spec.pid == spec.pid and other.ended_at is None and _may_be_same_process(other, spec):
                    if SOURCE_PRIORITY.get(spec.source, 9) < SOURCE_PRIORITY.get(other.spec.source, 9):
                        self._rekey(other, spec)
                    else:
                        self._aliases.add(spec.session_id, other.key)
                        other.spec = _merged(other.spec, spec)
                    return
        if spec.pid is None:
            return  # nothing to probe yet; its events wait in _pending
        if self._ended_registrations.ended(spec.session_id, spec.pid, spec.registered_at):
            return  # a registration whose process is gone stays ended (no summary every retention)
        if spec.pid not in table:
            # This tick's process table was read before the sources were scanned: a
            # process started (and registered) in between is not in it yet and would be
            # probed as vanished. Wait one tick; absent from a table read after the
            # registration was seen, it really is gone.
            first = self._absent_since.setdefault(spec.session_id, now)
            if first == now:
                return
        self._absent_since.pop(spec.session_id, None)
        tracked = Tracked(key=spec.session_id, spec=spec, started_at=now, state_since=now)
        identity, reused = _bind_identity(spec, table)
        tracked.identity = identity
        if identity is not None and not reused:
            # Durations and silence count from the process's own start, not from when this
            # daemon (perhaps just restarted) first saw it.
            tracked.started_at = min(now, identity.create_time)
        self._tracked[tracked.key] = tracked
        if reused:
            # The registered process is gone and its PID belongs to a process started
            # after the registration was written: never adopt it, never signal it.
            self._log("session.pid_reused", {"session_id": spec.session_id, "pid": spec.pid,
                                             "registered_at": spec.registered_at}, "warning")
            tracked.verdict = Verdict(State.EXITED, Reason.PROCESS_EXITED, 0.0,
                                      {"detail": f"pid {spec.pid} was reused after the registration was written"})
            tracked.snapshot = snapshot_of(tracked, now)
            self._end(tracked, now)
            return
        for event in self._pending.pop(spec.session_id, ()):
            self._apply(tracked, event)

    def _rekey(self, tracked: Tracked, spec: SessionSpec) -> None:
        """A stronger source named a session we had discovered: take its id, keep its history."""
        old_key = tracked.key
        del self._tracked[old_key]
        tracked.key = spec.session_id
        tracked.spec = _merged(spec, tracked.spec)
        self._tracked[tracked.key] = tracked
        self._aliases.rekey(old_key, tracked.key)
        self._on_rekey(old_key)

    def adopt(self, alias: str, tracked: Tracked) -> None:
        """`alias` (a transcript's own id) names `tracked`; its waiting events apply now."""
        self._aliases.add(alias, tracked.key)
        for event in self._pending.pop(alias, ()):
            self._apply(tracked, event)

    # ------------------------------------------------------------------ events

    def deliver(self, session_id: str, event: Event, pid: int | None) -> None:
        """Apply an event to its session; one whose session is not known yet waits, bounded."""
        key = self._aliases.resolve(session_id)
        tracked = self._tracked.get(key)
        if tracked is None and pid is not None:
            tracked = next((t for t in self._tracked.values() if t.spec.pid == pid and t.ended_at is None), None)
            if tracked is not None:
                self._aliases.add(session_id, tracked.key)
        if tracked is None and event.tree:
            # A hook's id not known yet: the nearest session whose root the hook ran under.
            tracked = self._rooted_in(event.tree)
            if tracked is not None:
                self._aliases.add(session_id, tracked.key)
        if tracked is None:
            # Not known yet (e.g. a hook fired before discovery matched its transcript):
            # keep a few, bounded, for when the session appears.
            if session_id not in self._pending and len(self._pending) >= PENDING_EVENTS_MAX_SESSIONS:
                self._pending.pop(next(iter(self._pending)))
            self._pending.setdefault(session_id, deque(maxlen=PENDING_EVENTS_PER_SESSION)).append(event)
            return
        self._apply(tracked, event)

    def _rooted_in(self, tree: Sequence[ProcessIdentity]) -> Tracked | None:
        live = [t for t in self._tracked.values() if t.ended_at is None and t.identity is not None]
        for proc in tree:
            found = next((t for t in live if same_process(proc, t.identity)), None)
            if found is not None:
                return found
        return None

    @staticmethod
    def _apply(tracked: Tracked, event: Event) -> None:
        settled = _settled(tracked, event)
        if settled is not None:
            tracked.activity = tracked.activity.apply(settled)

    def count_malformed(self, session_id: str) -> None:
        tracked = self._tracked.get(self._aliases.resolve(session_id))
        if tracked is not None:
            tracked.activity = tracked.activity.count_malformed()

    # ------------------------------------------------------------------ ending

    def record_end(self, tracked: Tracked) -> None:
        """Its session ended: a registration (registry, hook) that names it stays ended."""
        if tracked.spec.source in ("registry", "hook"):
            spec = tracked.spec
            self._ended_registrations.add(spec.session_id, spec.pid, spec.registered_at)

    def expire(self, now: float, retention: float) -> None:
        """Forget sessions untracked while alive, and ended ones past `retention`."""
        gone = [k for k, t in self._tracked.items()
                if t.dropped or (t.ended_at is not None and now - t.ended_at >= retention)]
        for key in gone:
            self.forget(key)

    def forget(self, key: str) -> None:
        """Drop a session and every id that led to it. Its event feed is not closed here
        (the table does no I/O): it waits in `forgotten` for the sources to close it."""
        tracked = self._tracked.pop(key, None)
        if tracked is not None and tracked.tail is not None:
            self.forgotten.append(tracked)
        self._aliases.forget(key)

    def take_forgotten(self) -> list[Tracked]:
        """The sessions forgotten since the last call, whose feeds are still open."""
        out, self.forgotten = self.forgotten, []
        return out


def snapshot_of(tracked: Tracked, now: float) -> SessionSnapshot:
    """What the outside sees of a session now (listed, exported, reported)."""
    sample = tracked.latest
    verdict = tracked.verdict
    activity = tracked.activity
    last_event = activity.last_event_time
    live = sample is not None and sample.alive
    uid = owner_uid(sample) if live else None
    if uid is None and tracked.snapshot is not None:
        uid = tracked.snapshot.uid  # an exited session keeps its owner
    return SessionSnapshot(
        session_id=tracked.key,
        agent=tracked.spec.agent,
        pid=tracked.spec.pid,
        state=verdict.state if verdict else State.STARTING,
        reason=verdict.reason if verdict else Reason.STARTUP_GRACE,
        state_since=tracked.state_since,
        last_event_time=last_event,
        last_event_age_s=None if last_event is None else max(0.0, now - last_event),
        silence_s=verdict.silence_s if verdict else 0.0,
        cpu_percent=sample.cpu_percent if live and sample else None,
        rss_bytes=sample.rss_bytes if live and sample else 0,
        open_fds=sample.num_fds if live and sample else None,
        threads=sample.threads if live and sample else 0,
        # Unreadable (another user's FDs without CAP_SYS_PTRACE) is None, never {}: 0 would lie.
        tcp=(None if sample.tcp is None else dict(sample.tcp)) if live and sample else {},
        mode=tracked.spec.mode,
        source=tracked.spec.source,
        create_time=tracked.identity.create_time if tracked.identity else None,
        started_at=tracked.started_at,
        events=activity.events,
        malformed=activity.malformed,
        labels=tracked.spec.labels,
        runtime=tracked.spec.runtime,
        children=tuple(children_detail(sample)) if live else (),
        recent_events=activity.recent,
        recoveries=tuple(tracked.recoveries),
        evidence=verdict.evidence if verdict else {},
        sample_status=sample.status if sample else SampleStatus.OK,
        last_report=tracked.snapshot.last_report if tracked.snapshot else None,
        visibility=_visibility(tracked, sample if live else None),
        uid=uid,
        user=tracked.user or user_name(uid),
        name=tracked.name,
        cwd=tracked.cwd,
        usage=tracked.usage,
    )


def _visibility(tracked: Tracked, sample: TreeSample | None) -> Mapping[str, str | None]:
    """visibility.py's, keeping the last known word on sockets through a probe timeout."""
    vis = visibility_of(tracked.turns, sample)
    before = tracked.snapshot.visibility.get("sockets") if tracked.snapshot is not None else None
    if vis["sockets"] is None and before is not None and sample is not None:
        return {**vis, "sockets": before}
    return vis


def _replaces_process(spec: SessionSpec, current: SessionSpec) -> bool:
    """An explicit registration (registry, exec, API) naming another pid for the same id."""
    return (spec.source in ("registry", "exec", "api") and spec.pid is not None
            and current.pid is not None and spec.pid != current.pid)


def _bind_identity(spec: SessionSpec, table: ProcessTable) -> tuple[ProcessIdentity | None, bool]:
    """The process a new session's pid names: (identity or None when not known yet, reused).

    A source that knows create_time names the process exactly. Otherwise the pid is
    bound to the process that holds it now only if that process already existed when
    the registration was written (`registered_at`); a process started later merely
    reuses the PID (`reused` is True): it is never this session and never signalled
    on its behalf.
    """
    assert spec.pid is not None
    if spec.create_time is not None:
        return ProcessIdentity(spec.pid, spec.create_time), False
    info = table.get(spec.pid)
    if info is None:
        return None, False  # gone already: the probe will say vanished
    if spec.registered_at is not None and table.started_at(info) > spec.registered_at + REGISTRATION_SKEW_S:
        return None, True
    return info.identity, False


def reaction_seen(samples: Sequence[TreeSample], activity: Activity, since: float, work_percent: float) -> bool:
    """Whether anything after `since` shows the session itself working: a sample with
    CPU at the work bar (and above one clock tick's noise for its interval), a TCP
    connection that was not open before, or a child that was not there before; or one
    of its own progress events (not a turn start; own: see DESIGN "Trust boundaries").

    The bars are those of work, not of the stuck gate: an idle sleeper is charged a
    stray 10 ms clock tick now and then (2% of a 0.5 s interval), and an interactive
    CLI may hold an old keep-alive connection across turns; neither is a reaction to a
    turn, and taking one for it would let a forged turn start open the recovery gate."""
    before_children: frozenset[tuple[int, float]] | None = None
    before_conns: frozenset[tuple[str, str]] | None = None
    prev: TreeSample | None = None
    for s in samples:
        if s.status is not SampleStatus.OK:
            continue
        children = frozenset((p.pid, p.create_time) for p in s.processes[1:])
        conns = frozenset((c.local, c.remote) for p in s.processes for c in p.connections)
        if s.time <= since:
            before_children, before_conns, prev = children, conns, s
            continue
        floor = 0.0 if prev is None or s.time <= prev.time else 150.0 * CPU_TICK_SECONDS / (s.time - prev.time)
        prev = s
        if s.cpu_percent is not None and s.cpu_percent >= max(work_percent, floor):
            return True
        if before_conns is None:
            if (s.tcp_total or 0) > 0:
                return True
        elif conns - before_conns:
            return True
        if before_children is not None and children - before_children:
            return True
        if before_children is None:
            before_children = children
    return any(e.time > since and e.kind is EventKind.PROGRESS and e.turn != "open" and e.own
               for e in activity.recent)


def _settled(tracked: Tracked, event: Event) -> Event | None:
    """A hook's event (one with a `tree`) is own exactly for a session whose root process
    the hook ran under (checked on arrival), observed for every other; a posted or
    hooked event applies only to a session of the user who sent it (root: any), else
    to none (DESIGN "Trust boundaries")."""
    if event.poster_uid is not None:
        if event.poster_uid != 0 and session_uid(tracked) != event.poster_uid:
            return None
        event = replace(event, poster_uid=None)
    if not event.tree:
        return event
    own = tracked.identity is not None and any(same_process(p, tracked.identity) for p in event.tree)
    return replace(event, own=own, tree=())


def session_uid(tracked: Tracked) -> int | None:
    """The user of a session's process: its latest sample's, else /proc's; None: unknown."""
    sample = tracked.latest
    if sample is not None and sample.processes and sample.processes[0].uid is not None:
        return sample.processes[0].uid
    if tracked.spec.pid is None:
        return None
    try:
        return os.stat(f"/proc/{tracked.spec.pid}").st_uid
    except OSError:
        return None


def _may_be_same_process(tracked: Tracked, spec: SessionSpec) -> bool:
    """Whether a spec for the tracked pid can be the tracked process: unknown identities
    are given the benefit of the doubt, known ones compared as the probe does."""
    if spec.create_time is None or tracked.identity is None:
        return True
    # Another program's reading of the create time: the lenient comparison (model.py says why).
    return same_process(tracked.identity, ProcessIdentity(tracked.identity.pid, spec.create_time),
                        tolerance=FOREIGN_CREATE_TIME_SKEW_S)


def _merged(primary: SessionSpec, other: SessionSpec) -> SessionSpec:
    """`primary` with the blanks filled from `other` (a weaker or later description)."""
    if primary == other:  # the usual tick: a source describes its session as it did before
        return primary
    return replace(
        primary,
        agent=primary.agent if primary.agent != "unknown" else other.agent,
        events_path=primary.events_path or other.events_path,
        labels={**other.labels, **primary.labels},
        runtime=primary.runtime or other.runtime,
        runtime_alive=primary.runtime_alive if primary.runtime_alive is not None else other.runtime_alive,
        create_time=primary.create_time if primary.create_time is not None else other.create_time,
        stderr_path=primary.stderr_path or other.stderr_path,
    )
