"""Plain data that flows between otelwatch's stages: probe -> classify -> act -> export.

Everything here is immutable and free of I/O. This module imports nothing from
the package; every other module may import it. The state and reason names are
a contract (dashboards, alert rules and users' scripts match on them).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class StrEnum(str, enum.Enum):
    """The base of otelwatch's named values (states, reasons, sources, steps): each
    compares equal to, prints as and serialises as its string value, which is the
    contract dashboards and scripts match on. (enum.StrEnum needs Python 3.11.)"""

    def __str__(self) -> str:
        return str(self.value)


class State(StrEnum):
    STARTING = "starting"
    ACTIVE = "active"
    IDLE = "idle"
    LONG_RUNNING = "long_running"
    STALLED = "stalled"
    STUCK = "stuck"
    EXITED = "exited"


class Reason(StrEnum):
    STARTUP_GRACE = "startup_grace"
    RECENT_PROGRESS = "recent_progress"
    NO_OPEN_TURN = "no_open_turn"
    AWAITING_INPUT = "awaiting_input"
    TOOL_RUNNING = "tool_running"
    WAITING_ON_NETWORK = "waiting_on_network"
    API_RETRYING = "api_retrying"
    CPU_SPIN = "cpu_spin"
    TOOL_CALL_WITHOUT_PROGRESS = "tool_call_without_progress"
    PROBE_TIMEOUT = "probe_timeout"
    ACCESS_DENIED = "access_denied"
    INSUFFICIENT_SAMPLES = "insufficient_samples"
    NO_ACTIVITY = "no_activity"
    PROCESS_EXITED = "process_exited"
    RUNTIME_ALIVE_PROCESS_DEAD = "runtime_alive_process_dead"


# Which reasons belong to which state; the classifier and its tests use this.
REASONS_BY_STATE: Mapping[State, frozenset[Reason]] = {
    State.STARTING: frozenset({Reason.STARTUP_GRACE}),
    State.ACTIVE: frozenset({Reason.RECENT_PROGRESS}),
    State.IDLE: frozenset({Reason.NO_OPEN_TURN, Reason.AWAITING_INPUT}),
    State.LONG_RUNNING: frozenset({Reason.TOOL_RUNNING}),
    State.STALLED: frozenset(
        {
            Reason.WAITING_ON_NETWORK,
            Reason.API_RETRYING,
            Reason.CPU_SPIN,
            Reason.TOOL_CALL_WITHOUT_PROGRESS,
            Reason.PROBE_TIMEOUT,
            Reason.ACCESS_DENIED,
            Reason.INSUFFICIENT_SAMPLES,
        }
    ),
    State.STUCK: frozenset({Reason.NO_ACTIVITY}),
    State.EXITED: frozenset({Reason.PROCESS_EXITED, Reason.RUNTIME_ALIVE_PROCESS_DEAD}),
}

# State groups, named once: every stage that asks "is this a problem?" asks here.
# Stalled and stuck are reported (backed off), open an incident and are notified.
PROBLEM_STATES: frozenset[State] = frozenset({State.STALLED, State.STUCK})
# Nothing to report and nothing changing fast: the probe may carry their quiet FD scans.
STEADY_STATES: frozenset[State] = frozenset({State.ACTIVE, State.IDLE, State.LONG_RUNNING})
# Most severe first: the order of `top`, `status` and notification thresholds.
SEVERITY: tuple[State, ...] = (State.STUCK, State.STALLED, State.LONG_RUNNING, State.ACTIVE, State.IDLE,
                               State.STARTING, State.EXITED)


class Mode(StrEnum):
    """A headless session processes from start to exit; an interactive one only
    while a turn is open."""

    HEADLESS = "headless"
    INTERACTIVE = "interactive"


# --------------------------------------------------------------------------- probe


# Linux reports CPU time in /proc in clock ticks of 1/USER_HZ s, and USER_HZ is 100
# on every mainstream architecture: one tick landing in a 1 s interval reads as 1%
# CPU. Rates at this resolution are noise, not work (see classify).
CPU_TICK_SECONDS = 0.01


class SourceKind(StrEnum):
    """Which source described a session (`SessionSpec.source`, the `source` label)."""

    REGISTRY = "registry"  # a <registry_dir>/<id>.json file written by any program
    EXEC = "exec"  # `otelwatch exec`
    API = "api"  # Watcher.track() from a host application
    HOOK = "hook"  # agent hooks and `otelwatch event`, through the spool
    TMUX = "tmux"  # an agent found in a tmux pane
    PROCESS = "process"  # an agent found by name in the process table


class EscalationStep(StrEnum):
    """The steps of one recovery, in `RecoveryStep.step` and the recovery state file.
    The order they may follow each other in is `recovery.escalation.transition`."""

    REQUESTED = "requested"  # decided and persisted; nothing done yet
    SIGTERM = "sigterm"
    SIGKILL = "sigkill"
    COMMAND = "command"  # the configured recovery command ran
    COMPLETED = "completed"  # the outcome (RecoveryStatus) is known


class ProcessIdentity(NamedTuple):
    """A process is (pid, create_time): a PID whose create time changed is another
    process (PID reuse) and never inherits the old one's history or signals."""

    pid: int
    create_time: float


# The one comparison of process identities (probe, session table, recovery, actuator).
# Create times read by one reader agree to float precision: the daemon's probe, recovery
# and actuator share one boot time, and two processes on one PID never share a start
# tick, so they are compared within IDENTITY_TOLERANCE_S. A create time written by another
# program (the exec wrapper, a registration) was computed from that program's read of
# /proc/stat's btime, whole seconds that can step by one between reads: it may be up to
# FOREIGN_CREATE_TIME_SKEW_S off. A PID *can* be reused within a second (a busy host
# wrapping pid_max, a small PID namespace), so the lenient skew only ever joins a
# description to a session; every signal is gated by the exact comparison.
IDENTITY_TOLERANCE_S = 0.005
FOREIGN_CREATE_TIME_SKEW_S = 1.1


def same_process(a: ProcessIdentity | None, b: ProcessIdentity | None, *,
                 tolerance: float = IDENTITY_TOLERANCE_S) -> bool:
    """Whether `a` and `b` are one process (not a reuse of its PID); False when either is unknown."""
    if a is None or b is None:
        return False
    return a.pid == b.pid and abs(a.create_time - b.create_time) < tolerance


class SampleStatus(StrEnum):
    OK = "ok"
    VANISHED = "vanished"  # root process gone, or its PID now belongs to another process
    ZOMBIE = "zombie"  # root exited but not yet reaped
    ACCESS_DENIED = "access_denied"  # something the classifier needs could not be read
    PROBE_TIMEOUT = "probe_timeout"  # the probe overran its deadline


@dataclass(frozen=True, slots=True)
class TcpConnection:
    state: str  # "ESTABLISHED", "SYN_SENT", ... (LISTEN kept apart)
    local: str  # "127.0.0.1:5555" / "[::1]:5555"
    remote: str


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One process of a session's tree at one tick. None means unknown (not zero)."""

    pid: int
    ppid: int
    create_time: float
    name: str
    status: str  # kernel state letter: R S D Z T I ...
    cpu_seconds: float  # user + system, cumulative
    cpu_percent: float | None  # of one core since this process's previous sample; None: no rate yet
    rss_bytes: int
    threads: int
    pgid: int = 0
    uid: int | None = None
    num_fds: int | None = None  # None: /proc/PID/fd not readable
    tcp: Mapping[str, int] | None = None  # state -> count, LISTEN excluded; None: unknown
    listen: int = 0
    connections: tuple[TcpConnection, ...] = ()  # non-LISTEN, for diagnostics
    read_bytes: int | None = None
    write_bytes: int | None = None
    cmdline: tuple[str, ...] = ()
    wchan: str | None = None  # only filled for reports (diag), not every tick

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.pid, self.create_time)


@dataclass(frozen=True, slots=True)
class TreeSample:
    """A session's whole process tree (root + descendants) at one tick.

    A session keeps `stall_after / interval` of these (300 at interval 1 s), so they
    are slotted, and the probe shares unchanged parts with the session's previous
    sample (a process that did not change is the same ProcessSample object)."""

    time: float  # wall clock, seconds
    status: SampleStatus
    root: ProcessIdentity | None = None
    processes: tuple[ProcessSample, ...] = ()  # root first
    cpu_percent: float | None = None  # tree total, percent of one core (100.0 = one core)
    cpu_seconds: float = 0.0
    rss_bytes: int = 0
    threads: int = 0
    num_fds: int | None = None
    tcp: Mapping[str, int] | None = None  # non-LISTEN states; None: unknown for some process
    listen: int = 0
    children: int = 0  # descendants of the root
    read_bytes: int | None = None
    write_bytes: int | None = None
    error: str = ""  # human-readable detail for non-OK statuses
    # Tree CPU demand, percent of one core: cpu_percent plus the time its processes' main
    # threads waited on a run queue (/proc/PID/schedstat). What a starved spinner wants,
    # not what it gets; None where schedstat is not read (off Linux, kernels without it).
    cpu_demand_percent: float | None = None
    # Since when one of the tree's processes has not gone to sleep of its own accord (its
    # main thread's voluntary context switches unchanged at every sample since): a loop's
    # mark, which a timer-driven process kept on a run queue by a busy host lacks. None:
    # every process slept in the last interval, or it is not known (no schedstat read).
    awake_since: float | None = None

    @property
    def tcp_total(self) -> int | None:
        """Open non-LISTEN TCP connections of the tree; None when unknown."""
        return None if self.tcp is None else sum(self.tcp.values())

    @property
    def alive(self) -> bool:
        return self.status not in (SampleStatus.VANISHED, SampleStatus.ZOMBIE)


# --------------------------------------------------------------------------- events


class EventKind(StrEnum):
    """Progress moves the agent's work; a heartbeat only shows its loop is alive; a state
    line only records where the agent is (a transcript's untimed bookkeeping, an API call
    logged with the prompt that caused it): written together with the work around it, it
    is neither, and moves neither clock."""

    PROGRESS = "progress"
    HEARTBEAT = "heartbeat"
    STATE = "state"


@dataclass(frozen=True)
class Event:
    time: float  # wall clock when it happened (or was seen)
    type: str  # normalised name: "assistant", "tool_use", "result", "PreToolUse", ...
    kind: EventKind = EventKind.PROGRESS
    tool: str | None = None
    tool_id: str | None = None
    turn: str | None = None  # "open" | "close" | None
    tool_call: str | None = None  # "open" | "close" | None
    awaiting_input: bool | None = None  # True: now waiting on a person; False: no longer
    retry: bool = False  # an API retry heartbeat (api_retrying evidence)
    retry_attempt: int | None = None  # the announced retry: its number,
    retry_max: int | None = None  # out of at most this many,
    retry_delay_s: float | None = None  # starting this long after the event
    # The agent's whole set of background tasks now (Claude Code moves a Bash call past
    # its 120 s timeout to the background and ends the turn while it runs); None: not said.
    background: tuple[str, ...] | None = None
    source: str = ""  # "stream", "transcript", "hook", "http", "exec", ...
    detail: str = ""  # short text for diagnostics
    # Provenance (DESIGN "Trust boundaries"): True only for an event from the session
    # itself (its own transcript or session file, its exec wrapper, its registry entry's
    # events file, a hook checked to run inside its process tree). Set by the reader that
    # checked it, never read from data, and never written out by `to_json`.
    own: bool = False
    # A hook's event: the hook process and its ancestors (nearest first), as checked when
    # it arrived on the hook socket. The session table makes the event own for a session
    # whose root process is among them (the hook ran inside its tree), observed otherwise.
    tree: tuple[ProcessIdentity, ...] = ()
    # The local user who posted it over HTTP (None: not posted). Users are walls: it is
    # applied only to a session of that user (root's posts to any).
    poster_uid: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"time": self.time, "type": self.type, "kind": self.kind.value}
        for key in ("tool", "tool_id", "turn", "tool_call", "awaiting_input", "retry_attempt", "retry_max",
                    "retry_delay_s", "detail"):
            value = getattr(self, key)
            if value not in (None, ""):
                out[key] = value
        if self.retry:
            out["retry"] = True
        if self.background is not None:
            out["background"] = list(self.background)
        if self.source:
            out["source"] = self.source
        return out


# --------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class Runtime:
    kind: str  # "tmux", "exec", ...
    target: str = ""  # e.g. tmux "sess:0.1"
    socket: str = ""  # tmux: the server's socket path (two servers may both have "sess:0.1")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "target": self.target}
        if self.socket:
            out["socket"] = self.socket
            if self.kind == "tmux" and self.target:
                out["attach"] = tmux_attach_command(self.socket, self.target)
        return out


def tmux_attach_command(socket: str, target: str) -> str:
    """The command a person types to look at a pane: `tmux -S SOCKET attach -t TARGET`,
    each argument quoted for a POSIX shell (nothing here is ever run by otelwatch)."""
    return " ".join(_sh_quote(a) for a in ("tmux", "-S", socket, "attach", "-t", target))


def _sh_quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "@%+=:,./-_" for c in arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


@dataclass(frozen=True)
class SessionSpec:
    """A session as a source describes it, before probing. Sources emit these
    every refresh; the daemon merges them by session_id (and root pid)."""

    session_id: str
    pid: int | None  # None: known only from events so far (e.g. a hook)
    agent: str = "unknown"
    source: str = ""  # "registry", "process", "tmux", "exec", "hook", "api"
    mode: Mode = Mode.HEADLESS
    events_path: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    runtime: Runtime | None = None
    runtime_alive: bool | None = None  # e.g. the tmux pane still exists
    create_time: float | None = None  # when the source knows the process identity
    stderr_path: str | None = None  # exec wrapper's stderr ring, for diagnostics
    # When the source wrote this description (a registry file's mtime, a spool record's
    # time). Without create_time, the pid is bound to the process that existed then: a
    # process started later has only reused the PID and is never this session.
    registered_at: float | None = None


@dataclass(frozen=True)
class SessionInfo:
    """What the classifier needs to know about a session besides samples and events."""

    mode: Mode
    started_at: float  # wall clock: the process's start when known, else when we first saw it
    has_event_source: bool
    runtime_alive: bool | None = None
    # False: the session keeps turn information otelwatch could not read (another user's
    # files without the capability, transcripts disabled): never idle for want of a turn.
    turns_visible: bool = True
    # The agent's records may not show a tool while it runs: look for one in the process tree.
    infer_tools: bool = False
    # No turn opened yet (a headless run's startup, before its prompt is written).
    before_first_turn: bool = False


@dataclass(frozen=True)
class Verdict:
    state: State
    reason: Reason
    silence_s: float  # progress silence as the classifier counted it
    evidence: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- act


class RecoveryStatus(StrEnum):
    TERMINATED = "terminated"
    KILLED = "killed"
    UNKILLABLE = "unkillable"
    VANISHED = "vanished"
    IDENTITY_CHANGED = "identity_changed"
    FAILED = "failed"
    DRY_RUN = "dry_run"


@dataclass(frozen=True)
class RecoveryStep:
    """One step of a recovery, recorded as it happens (request, each signal, result)."""

    session_id: str
    agent: str
    action: str  # "signal" | "command"
    step: str  # an EscalationStep value: "requested", "sigterm", "sigkill", "command", "completed"
    time: float
    pid: int
    reason: str = ""
    status: RecoveryStatus | None = None  # set on "completed"
    duration_s: float | None = None  # set on "completed"
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "session_id": self.session_id,
            "agent": self.agent,
            "action": self.action,
            "step": self.step,
            "time": self.time,
            "pid": self.pid,
        }
        if self.reason:
            out["reason"] = self.reason
        if self.status is not None:
            out["status"] = self.status.value
        if self.duration_s is not None:
            out["duration_s"] = round(self.duration_s, 3)
        if self.detail:
            out["detail"] = self.detail
        return out


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class SessionSnapshot:
    """One session as the exporters and `/api/sessions` see it after a tick.

    Scrapes and OTLP exports read these; they never touch /proc.
    """

    session_id: str
    agent: str
    pid: int | None
    state: State
    reason: Reason
    state_since: float  # wall clock
    last_event_time: float | None  # wall clock of the last event of any kind
    last_event_age_s: float | None  # None: no event yet (and no process activity seen)
    silence_s: float  # progress silence as classified
    cpu_percent: float | None  # tree, percent of one core
    rss_bytes: int
    open_fds: int | None
    threads: int
    tcp: Mapping[str, int] | None  # TCP state -> count, non-LISTEN; None: could not be read
    mode: Mode = Mode.HEADLESS
    source: str = ""
    create_time: float | None = None
    started_at: float = 0.0
    events: int = 0
    malformed: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    runtime: Runtime | None = None
    children: tuple[Mapping[str, Any], ...] = ()  # {pid, name, cmdline, status, cpu_percent}
    recent_events: tuple[Event, ...] = ()
    recoveries: tuple[RecoveryStep, ...] = ()
    evidence: Mapping[str, Any] = field(default_factory=dict)
    sample_status: SampleStatus = SampleStatus.OK
    # The last stalled/stuck report's evidence (processes with wait channels, TCP
    # remotes, stderr tail, summary), so /api/sessions can show it without /proc.
    last_report: Mapping[str, Any] | None = None
    # What otelwatch could read of the session: {"turns": "ok" | "denied" | "disabled" |
    # "none", "sockets": "ok" | "denied" | None} (sessions/visibility.py says what each means).
    visibility: Mapping[str, str | None] = field(default_factory=dict)
    uid: int | None = None  # the owner of the session's process
    user: str | None = None  # its name (the uid as text when it has none)
    # Names a person recognises (names.py); never metric labels.
    name: str | None = None  # the agent's own name for the session (Claude Code's `name`)
    cwd: str | None = None  # the agent's working directory
    # Tokens, cost and API calls the agent's own OpenTelemetry reported (sources/otlp.py);
    # None: it reported none.
    usage: Mapping[str, Any] | None = None

    @property
    def live(self) -> bool:
        return self.state is not State.EXITED

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "agent": self.agent,
            "name": self.name,
            "cwd": self.cwd,
            "user": self.user,
            "pid": self.pid,
            "create_time": self.create_time,
            "mode": self.mode.value,
            "source": self.source,
            "state": self.state.value,
            "reason": self.reason.value,
            "state_since": self.state_since,
            "started_at": self.started_at,
            "last_event_time": self.last_event_time,
            "last_event_age_s": _round(self.last_event_age_s),
            "silence_s": _round(self.silence_s),
            "cpu_percent": _round(self.cpu_percent),
            "rss_bytes": self.rss_bytes,
            "open_fds": self.open_fds,
            "threads": self.threads,
            "tcp": None if self.tcp is None else dict(self.tcp),
            "children": [dict(c) for c in self.children],
            "events": self.events,
            "malformed": self.malformed,
            "labels": dict(self.labels),
            "runtime": None if self.runtime is None else self.runtime.to_json(),
            "visibility": dict(self.visibility),
            "uid": self.uid,
            "sample_status": self.sample_status.value,
            "evidence": dict(self.evidence),
            # Provenance shown, never written to spool records: own events are the session's own word.
            "recent_events": [{**e.to_json(), "own": True} if e.own else e.to_json() for e in self.recent_events],
            "recoveries": [r.to_json() for r in self.recoveries],
            "last_report": None if self.last_report is None else dict(self.last_report),
            "usage": None if self.usage is None else dict(self.usage),
        }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)
