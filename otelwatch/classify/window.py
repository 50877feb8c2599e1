"""The sample window: what a session's recent tree samples prove, kept incrementally.

Owns: which samples fall in the window, the facts read over it (spin, network,
work, I/O, children, unknown samples) with their counts updated as samples
enter and leave, and the time the tree last showed work. Pure: no I/O, no
clock; times are passed in.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from otelwatch.config import ClassifyConfig
from otelwatch.model import CPU_TICK_SECONDS, Reason, SampleStatus, TreeSample

__all__ = [
    "MAX_LISTED",
    "MIN_WINDOW_SAMPLES",
    "WORK_CPU_PERCENT",
    "SampleWindow",
    "WindowFacts",
    "child_ids",
    "last_ok_before",
    "or_zero",
    "rounded",
    "stopped_root",
    "tick_floor",
    "tree_progress_time",
    "window_samples",
    "work_cpu_percent",
]

# A stuck verdict needs at least this many fully known samples in its window:
# one sample is a snapshot, not a history.
MIN_WINDOW_SAMPLES = 2


# Work, for a session with no event source (its progress clock is its tree's activity):
# CPU at or above this percent of one core. Measured idle noise of healthy waiting CLIs
# is 0-3% in single samples (timers, GC) and 2-4% for an interactive TUI's spinner; a
# model response being parsed or a build runs at 80-110%. 5% is clearly above the
# noise and far below any real work. Never under cpu_idle_percent, never over the spin bar.
WORK_CPU_PERCENT = 5.0


# Process states that mean "doing something": R is on (or queued for) a CPU,
# D is blocked inside the kernel (disk, NFS, FUSE). Neither is provable idleness.
_RUNNING = "R"
_BLOCKED = "D"
_STOPPED = frozenset({"T", "t"})  # job-control stop / tracing stop


# Keep evidence small: it goes into every report, span and /api/sessions entry.
MAX_LISTED = 10


# Reasons read from the window of samples, in the order they win when several hold over
# the window: a busy process is spinning even with a socket open; what we could read
# says more than what we could not.
_WINDOW_REASONS = (
    Reason.CPU_SPIN,
    Reason.WAITING_ON_NETWORK,
    Reason.TOOL_CALL_WITHOUT_PROGRESS,
    Reason.PROBE_TIMEOUT,
    Reason.ACCESS_DENIED,
)


def work_cpu_percent(cfg: ClassifyConfig) -> float:
    """The CPU percent that counts as work on the no-event-source progress clock."""
    return min(max(WORK_CPU_PERCENT, cfg.cpu_idle_percent), max(cfg.cpu_spin_percent, cfg.cpu_idle_percent))


def window_samples(samples: Sequence[TreeSample], start: float) -> tuple[TreeSample, ...]:
    """The samples at or after `start` (the later of now - stall_after and watch_since)."""
    return tuple(s for s in samples if s.time >= start)


def tree_progress_time(samples: Sequence[TreeSample], work_percent: float) -> float | None:
    """For a session with no event source: when its tree last showed work.

    Work is CPU at/above `work_percent` (see WORK_CPU_PERCENT: idle noise of a
    waiting CLI is not work) and more than one clock tick's worth, read/write
    byte counters changing, or the set of child processes changing. TCP alone is
    not work (a hung socket is exactly what we want to see as silence). Byte
    counters and child sets are compared only between consecutive fully readable
    (OK) samples: a partial read is not a change.
    """
    last: float | None = None
    prev_ok: TreeSample | None = None
    prev_children: frozenset[tuple[int, float]] = frozenset()
    prev_time: float | None = None
    for s in samples:
        floor = tick_floor(prev_time, s.time)
        worked = s.cpu_percent is not None and s.cpu_percent >= work_percent and s.cpu_percent > floor
        if s.status is SampleStatus.OK:
            children = child_ids(s)
            if prev_ok is not None and (_io_changed(prev_ok, s) or prev_children != children):
                worked = True
            prev_ok, prev_children = s, children
        if worked:
            last = s.time if last is None else max(last, s.time)
        prev_time = s.time
    return last


def last_ok_before(samples: Sequence[TreeSample], start: float) -> list[TreeSample]:
    for s in reversed(samples):
        if s.time < start and s.status is SampleStatus.OK:
            return [s]
    return []


@dataclass(frozen=True)
class WindowFacts:
    """What the window of samples proves, computed once in one pass over it.

    `support` counts, per window reason, the samples of the window that show its
    evidence: a probe timeout, unreadable data, CPU at the spin bar, an open socket,
    work (any CPU at or above cpu_idle_percent, a process on a CPU or blocked in
    the kernel, I/O moving, children coming or going). A reason holds over the
    window when most of its samples support it (spinning also needs the window's
    mean CPU at the bar): one sample never does, in a window of three or more.
    """

    size: int
    known: int  # OK samples with known CPU rate and TCP
    earliest_known: float | None
    first_sight_in_window: bool
    support: Mapping[Reason, int]
    spin_mean: bool  # the window's mean CPU demand is at or above the spin bar
    cpu_latest: float | None
    cpu_max: float | None
    cpu_mean: float | None
    tcp_max: int | None
    running_pids: tuple[int, ...]
    blocked_pids: tuple[int, ...]
    working_children: tuple[int, ...]
    io_changed: bool
    children_changed: bool
    tree_alive: bool  # for an open tool: children alive, CPU or TCP in the window
    demand_mean: float | None = None  # the window's mean CPU demand (usage where unknown)
    starved: bool = False  # a loop starved by other work: spinning reads its demand, not usage

    @staticmethod
    def of(
        window: Sequence[TreeSample],
        before: Sequence[TreeSample],
        latest: TreeSample | None,
        thr: float,
        spin: float,
        first_sight: TreeSample | None,
    ) -> WindowFacts:
        # One clock tick of CPU accounting in a short interval reads as a rate at or
        # above the threshold (10 ms in 0.5 s = 2%): a single sample counts as CPU
        # work only when it holds more than one tick's worth, unless the window's
        # mean says the process keeps using that little all the time.
        cpus = [s.cpu_percent for s in window if s.cpu_percent is not None]
        cpu_mean = math.fsum(cpus) / len(cpus) if cpus else None
        raw = [d for s in window if (d := s.cpu_demand_percent) is not None]
        raw_mean = math.fsum(raw) / len(raw) if raw else None
        last_ok = next((s for s in reversed(window) if s.status is SampleStatus.OK), None)
        starved = _starved(raw_mean, last_ok, window[0].time if window else None)
        mean_busy = cpu_mean is not None and cpu_mean >= thr
        timeouts = denied = spins = starved_spins = nets = works = known = 0
        earliest_known: float | None = None
        tcp_max: int | None = None
        running: dict[int, None] = {}
        blocked: dict[int, None] = {}
        working_children: dict[int, None] = {}
        io_changed = children_changed = cpu_busy_any = False
        prev_ok = before[-1] if before else None
        prev_children = child_ids(prev_ok) if prev_ok is not None else frozenset()
        prev_time = prev_ok.time if prev_ok is not None else None
        for s in window:
            floor = tick_floor(prev_time, s.time)
            prev_time = s.time
            if s.status is SampleStatus.PROBE_TIMEOUT:
                timeouts += 1
                continue
            if s.status not in (SampleStatus.OK, SampleStatus.ACCESS_DENIED):
                continue  # vanished / zombie: only ever the latest, handled before the window
            cpu = s.cpu_percent
            # The first sight of a process has no CPU rate yet: not unreadable, just not
            # evidence (it never counts as known, so it can never prove idleness).
            no_rate_yet = cpu is None and s is first_sight
            if s.status is SampleStatus.ACCESS_DENIED or s.tcp is None or (cpu is None and not no_rate_yet):
                denied += 1
            elif cpu is not None:
                known += 1
                if earliest_known is None:
                    earliest_known = s.time
            busy_cpu = cpu is not None and cpu >= thr and (cpu > floor or mean_busy)
            worked = busy_cpu
            cpu_busy_any = cpu_busy_any or busy_cpu
            if cpu is not None and cpu >= spin and cpu > floor:
                spins += 1
            if s.cpu_demand_percent is not None:
                starved_spins += 1
            tcp = s.tcp_total
            if tcp is not None:
                tcp_max = tcp if tcp_max is None else max(tcp_max, tcp)
                if tcp > 0:
                    nets += 1
            root_pid = s.root.pid if s.root is not None else None
            for p in s.processes:
                busy = p.cpu_percent is not None and p.cpu_percent >= thr and p.cpu_percent > floor
                if p.status == _RUNNING or busy:
                    running[p.pid] = None
                    worked = True
                if p.status == _BLOCKED:
                    blocked[p.pid] = None
                    worked = True
                if (p.status in (_RUNNING, _BLOCKED) or busy) and p.pid != root_pid:
                    working_children[p.pid] = None
            if s.status is SampleStatus.OK:
                children = child_ids(s)
                if prev_ok is not None:
                    if _io_changed(prev_ok, s):
                        io_changed = worked = True
                    if children != prev_children:
                        children_changed = worked = True
                prev_ok, prev_children = s, children
            if worked:
                works += 1
        tcp_seen = nets > 0
        children_now = latest is not None and latest.alive and latest.children > 0
        return WindowFacts(
            size=len(window),
            known=known,
            earliest_known=earliest_known,
            first_sight_in_window=first_sight is not None and any(s is first_sight for s in window),
            support={
                Reason.CPU_SPIN: starved_spins if starved else spins,
                Reason.WAITING_ON_NETWORK: nets,
                Reason.TOOL_CALL_WITHOUT_PROGRESS: works,
                Reason.PROBE_TIMEOUT: timeouts,
                Reason.ACCESS_DENIED: denied,
            },
            spin_mean=_spin_mean(starved, raw_mean, cpu_mean, spin),
            cpu_latest=latest.cpu_percent if latest is not None else None,
            cpu_max=max(cpus) if cpus else None,
            cpu_mean=cpu_mean,
            demand_mean=raw_mean if raw_mean is not None else cpu_mean,
            starved=starved,
            tcp_max=tcp_max,
            running_pids=tuple(running),
            blocked_pids=tuple(blocked),
            working_children=tuple(working_children),
            io_changed=io_changed,
            children_changed=children_changed,
            tree_alive=children_now or cpu_busy_any or tcp_seen,
        )

    def holds(self, reason: Reason) -> bool:
        """Whether `reason`'s evidence holds over the window: most of its samples."""
        if reason is Reason.CPU_SPIN and not self.spin_mean:
            return False
        return 2 * self.support[reason] > self.size

    def reason(self, held: Reason | None) -> Reason | None:
        """The stalled reason the window shows; None when it shows nothing but idleness.

        With hysteresis: the reason `held` (the session's stalled reason at the tick
        before) stays while any of its evidence is in the window, unless a reason
        ahead of it holds over the window. So a reason changes only when the new
        evidence holds over the window or the old evidence has left it entirely,
        never on one sample. Without a held reason: the first reason that holds
        over the window, else the one with the most evidence (spinning only ever
        when it holds: one busy sample is not a loop).
        """
        if held is not None and self.support.get(held, 0) == 0:
            held = None
        for r in _WINDOW_REASONS:
            if r is held or self.holds(r):
                return r
        weak = [r for r in _WINDOW_REASONS if r is not Reason.CPU_SPIN]
        best = max(weak, key=lambda r: self.support[r])  # the first of equals wins
        return best if self.support[best] > 0 else None

    def enough(self, now: float, stall_after: float) -> bool:
        """Whether the known samples can prove idleness over the window: at least
        MIN_WINDOW_SAMPLES of them, the earliest covering at least half of it (a
        history that starts a tick ago proves nothing about the last five minutes),
        and no first sight of the process in it (whose CPU before it is unknown)."""
        return (
            self.known >= MIN_WINDOW_SAMPLES
            and self.earliest_known is not None
            and self.earliest_known <= now - stall_after / 2.0
            and not self.first_sight_in_window
        )

    def missing(self, now: float, stall_after: float) -> str:
        """What `enough` lacks, for a person: how many known samples cover how much of
        the window, against what proving idleness needs."""
        need = f"need at least {MIN_WINDOW_SAMPLES} covering {_secs(stall_after / 2.0)}"
        if self.known == 0 or self.earliest_known is None:
            text = f"no known samples in the {_secs(stall_after)} window: {need}"
        else:
            covered = max(0.0, now - self.earliest_known)
            text = (f"{self.known} known sample{'s' if self.known != 1 else ''} cover {_secs(covered)} "
                    f"of the {_secs(stall_after)} window: {need}")
        if self.first_sight_in_window:
            text += "; the process was first seen inside the window (its CPU before that is unknown)"
        return text

    def detail(self, reason: Reason) -> str:
        """What a person reads next to the reason: the evidence behind it."""
        n = self.support[reason]
        if reason is Reason.PROBE_TIMEOUT:
            return f"{n} probe timeouts in window"
        if reason is Reason.ACCESS_DENIED:
            return f"{n} unreadable samples in window"
        if reason is Reason.CPU_SPIN:
            if self.starved:
                return (f"CPU demand (on a CPU or waiting for one) at the spin bar in {n} of {self.size} "
                        f"samples, window mean {rounded(self.demand_mean, 1)}% (got {rounded(self.cpu_mean, 1)}%); "
                        f"a process that never went to sleep in the window")
            return f"CPU at the spin bar in {n} of {self.size} samples, window mean {rounded(self.cpu_mean, 1)}%"
        if reason is Reason.WAITING_ON_NETWORK:
            return f"TCP open in {n} of {self.size} samples"
        parts = []
        if self.blocked_pids:
            parts.append(f"blocked in kernel (D): {_pids(self.blocked_pids)}")
        if self.working_children:
            parts.append(f"working children: {_pids(self.working_children)}")
        elif self.running_pids:
            parts.append(f"on CPU (R): {_pids(self.running_pids)}")
        if self.io_changed:
            parts.append("read/write bytes changed")
        if self.children_changed:
            parts.append("child processes changed")
        if self.cpu_max is not None and not self.working_children:
            # The agent's own process is awake but not spinning: timers, GC, or a tool
            # it runs in-process. Work outside its event stream, like a silent tool call.
            parts.append(f"CPU up to {rounded(self.cpu_max, 1)}%, "
                         f"window mean {rounded(self.cpu_mean, 1)}% (not spinning)")
        return "; ".join(parts)


def _secs(x: float) -> str:
    return f"{round(x, 1):g} s"


# A loop starved by other work is runnable all the time: its demand (on a CPU or waiting
# on a run queue) is a whole core whatever CPU it got (98-101% measured at 2-9% usage).
# Judged over the window, not per sample: the kernel credits run-queue wait when the task
# gets a CPU, so a loop that gets a slice every few hundred milliseconds reads 20% one tick
# and 180% the next (measured at 2-4% usage on CI, 100-101% on average).
# A timer-driven process on a busy host waits on the run queue each time it wakes, and
# when every wake-up waits long it is runnable nearly all the time too: the real Gemini
# CLI and opencode TUIs, each drawing a spinner while a request hangs, read 90-137% demand
# at 15-25% usage with two burners on 2 cores. What tells them apart is sleep: those TUIs
# went to sleep of their own accord 1-120 times a second and in every 4-second window,
# a loop never does (0 voluntary context switches). So a window is starved when its mean
# demand is at this level and one of the tree's processes has not slept since the
# window's first sample; then every sample of it with a demand counts as spinning.
STARVED_DEMAND_PERCENT = 90.0


def _starved(demand_mean: float | None, last_ok: TreeSample | None, first_time: float | None) -> bool:
    """Whether the window is one loop starved by other work (see STARVED_DEMAND_PERCENT):
    its mean CPU demand at the level, and its latest readable sample says a process has
    not gone to sleep since the window's first sample."""
    return (demand_mean is not None and demand_mean >= STARVED_DEMAND_PERCENT
            and last_ok is not None and last_ok.awake_since is not None and first_time is not None
            and last_ok.awake_since <= first_time)


def _spin_mean(starved: bool, demand_mean: float | None, cpu_mean: float | None, spin: float) -> bool:
    """The window's mean at the spin bar: its demand for a starved loop, else its usage."""
    mean = demand_mean if starved else cpu_mean
    return mean is not None and mean >= spin


def _pids(pids: Sequence[int]) -> str:
    return ",".join(map(str, pids[:MAX_LISTED]))


def tick_floor(prev_time: float | None, t: float) -> float:
    """The CPU percent that 1.5 clock ticks make over the interval since the previous
    sample. A rate at or under it may be one tick of accounting noise. A sample with no
    predecessor gets no floor (counted as work: the safe side)."""
    if prev_time is None or t <= prev_time:
        return 0.0
    return 150.0 * CPU_TICK_SECONDS / (t - prev_time)


def stopped_root(s: TreeSample | None) -> bool:
    if s is None or s.status is not SampleStatus.OK or not s.processes:
        return False
    root = s.processes[0]
    return root.identity == s.root and root.status in _STOPPED


def or_zero(t: float | None) -> float:
    return -math.inf if t is None else t


def _io_changed(a: TreeSample, b: TreeSample) -> bool:
    def moved(x: int | None, y: int | None) -> bool:
        return x is not None and y is not None and x != y

    return moved(a.read_bytes, b.read_bytes) or moved(a.write_bytes, b.write_bytes)


def child_ids(s: TreeSample) -> frozenset[tuple[int, float]]:
    """(pid, create_time) of every process of the tree but the root. Plain tuples: this
    runs for every sample of every window, and building identities cost more than the rest."""
    root_pid = s.root.pid if s.root is not None else None
    return frozenset((p.pid, p.create_time) for p in s.processes if p.pid != root_pid)


def rounded(x: float | None, digits: int = 2) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, digits)


# Every finite double is an integer multiple of 2**-1074: CPU rates summed as integers
# in that unit are exact, so the running mean is the same float as math.fsum's.
_EXACT_SHIFT = 1074


_EXACT_UNIT = 1 << _EXACT_SHIFT


def _exact(x: float) -> int:
    n, d = x.as_integer_ratio()
    return n << (_EXACT_SHIFT - d.bit_length() + 1)


class _Mark:
    """What one sample adds to `WindowFacts`, given the sample before it (its tick floor)
    and the readable sample before it (I/O and child-set changes)."""

    __slots__ = ("blocked", "busy", "busy_mean", "children", "denied", "io", "net", "running", "spin",
                 "spin_starved", "timeout", "work", "work_mean", "working")

    def __init__(self) -> None:
        self.timeout = self.denied = self.spin = self.spin_starved = self.net = 0
        self.busy = self.busy_mean = self.work = self.work_mean = self.io = self.children = 0
        # (pid, position in the sample): the window lists pids in order of first sight
        self.running: tuple[tuple[int, int], ...] = ()
        self.blocked: tuple[tuple[int, int], ...] = ()
        self.working: tuple[tuple[int, int], ...] = ()


_COUNTS = ("timeout", "denied", "spin", "spin_starved", "net", "busy", "busy_mean", "work", "work_mean", "io",
           "children")


_NO_MARK = _Mark()


def _same_mark(a: _Mark, b: _Mark) -> bool:
    # Spelled out: a generator over __slots__ cost more than the rest of _push.
    return (a.timeout == b.timeout and a.denied == b.denied and a.spin == b.spin
            and a.spin_starved == b.spin_starved and a.net == b.net
            and a.busy == b.busy and a.busy_mean == b.busy_mean and a.work == b.work
            and a.work_mean == b.work_mean and a.io == b.io and a.children == b.children
            and a.running == b.running and a.blocked == b.blocked and a.working == b.working)


def _mark(
    s: TreeSample,
    prev_time: float | None,
    prev_ok: TreeSample | None,
    prev_children: frozenset[tuple[int, float]],
    children: frozenset[tuple[int, float]] | None,
    first_sight: bool,
    thr: float,
    spin: float,
) -> _Mark:
    """One sample's share of `WindowFacts.of`, the same rules sample by sample. "_mean"
    variants hold when the window's mean CPU is at the threshold (known only later)."""
    m = _Mark()
    if s.status is SampleStatus.PROBE_TIMEOUT:
        m.timeout = 1
        return m
    if s.status not in (SampleStatus.OK, SampleStatus.ACCESS_DENIED):
        return m
    floor = tick_floor(prev_time, s.time)
    cpu = s.cpu_percent
    no_rate_yet = cpu is None and first_sight
    if s.status is SampleStatus.ACCESS_DENIED or s.tcp is None or (cpu is None and not no_rate_yet):
        m.denied = 1
    over = cpu is not None and cpu >= thr
    m.busy_mean = int(over)
    m.busy = int(over and cpu is not None and cpu > floor)
    if cpu is not None and cpu >= spin and cpu > floor:
        m.spin = 1
    if s.cpu_demand_percent is not None:
        m.spin_starved = 1
    tcp = s.tcp_total
    if tcp is not None and tcp > 0:
        m.net = 1
    worked = False
    root_pid = s.root.pid if s.root is not None else None
    running: list[tuple[int, int]] = []
    blocked: list[tuple[int, int]] = []
    working: list[tuple[int, int]] = []
    for i, p in enumerate(s.processes):
        busy = p.cpu_percent is not None and p.cpu_percent >= thr and p.cpu_percent > floor
        if p.status == _RUNNING or busy:
            running.append((p.pid, i))
            worked = True
        if p.status == _BLOCKED:
            blocked.append((p.pid, i))
            worked = True
        if (p.status in (_RUNNING, _BLOCKED) or busy) and p.pid != root_pid:
            working.append((p.pid, i))
    m.running, m.blocked, m.working = tuple(running), tuple(blocked), tuple(working)
    if s.status is SampleStatus.OK and prev_ok is not None:
        if _io_changed(prev_ok, s):
            m.io = 1
            worked = True
        if children != prev_children:
            m.children = 1
            worked = True
    m.work = int(worked or bool(m.busy))
    m.work_mean = int(worked or bool(m.busy_mean))
    return m


def _progress_mark(
    s: TreeSample,
    prev_time: float | None,
    prev_ok: TreeSample | None,
    prev_children: frozenset[tuple[int, float]],
    children: frozenset[tuple[int, float]] | None,
    work_percent: float,
) -> bool:
    """One sample's share of `tree_progress_time`: whether it shows work."""
    floor = tick_floor(prev_time, s.time)
    cpu = s.cpu_percent
    if cpu is not None and cpu >= work_percent and cpu > floor:
        return True
    return s.status is SampleStatus.OK and prev_ok is not None and (
        _io_changed(prev_ok, s) or prev_children != children
    )


class _Rec:
    __slots__ = ("children", "inverted", "mark", "odd", "progress", "sample", "seq", "time")

    def __init__(self, seq: int, sample: TreeSample, children: frozenset[tuple[int, float]] | None,
                 mark: _Mark, progress: bool, inverted: bool, odd: bool) -> None:
        self.seq, self.sample, self.time, self.children = seq, sample, sample.time, children
        self.mark, self.progress, self.inverted, self.odd = mark, progress, inverted, odd


_NO_CHILDREN: frozenset[tuple[int, float]] = frozenset()


class SampleWindow:
    """One session's window aggregates, kept up to date one sample at a time.

    `classify(..., window=w)` gives the same verdict as without it (the property test
    `test_classify_incremental` compares them on random streams), at a per-tick cost
    of the samples added and dropped since the last tick instead of the whole window:
    running counts per window reason, an exact running CPU sum, expiring maxima,
    the earliest known sample, the samples whose work is already known.

    Mutable, on purpose: an immutable value handed back each tick would copy the
    window's state every tick, which is the cost this exists to remove. One per
    session, owned by the caller's loop thread; pass it the same history `classify`
    gets (the caller only appends samples and drops the oldest; anything else, or a
    history out of time order or with non-finite numbers, makes `classify` fall back
    to the full recomputation, which stays the reference).

    Every sample's share is computed once, against the sample before it. Only two
    samples of a window see something else: its first (whose tick floor and readable
    predecessor are the last readable sample before the window) and its first
    readable one (whose predecessor is that same sample); both are recomputed each
    tick, as are the history's first and first readable samples for the progress clock.
    """

    def __init__(self) -> None:
        self._params: tuple[float, float, float] | None = None
        self._reset()

    def _reset(self) -> None:
        self._recs: deque[_Rec] = deque()
        self._next = 0
        self._inverted = 0  # samples older than the one before them
        self._odd = 0  # samples with a non-finite time or CPU rate
        self._last_ok: _Rec | None = None
        self._ok: deque[_Rec] = deque()  # readable samples of the history
        self._progress: deque[_Rec] = deque()  # samples that showed work (progress clock)
        self._clear_window()

    def _clear_window(self) -> None:
        self._lo = self._recs[0].seq if self._recs else self._next
        self._start = -math.inf
        self._before: _Rec | None = None
        self._counts = dict.fromkeys(_COUNTS, 0)
        self._cpu_sum = 0
        self._cpu_n = 0
        self._raw_sum = 0  # of cpu_demand_percent, for STARVED_DEMAND_PERCENT over the window
        self._raw_n = 0
        self._cpu_max: deque[tuple[int, float]] = deque()
        self._tcp_max: deque[tuple[int, int]] = deque()
        self._known: deque[_Rec] = deque()
        self._ok_in: deque[_Rec] = deque()
        self._pids: tuple[dict[int, deque[tuple[int, int]]], ...] = ({}, {}, {})

    # ------------------------------------------------------------------ feeding

    def sync_for(self, cfg: ClassifyConfig, samples: Sequence[TreeSample]) -> None:
        """Catch up with the caller's history under `cfg`'s CPU bars: the caller does this
        before `classify`, which only reads the window."""
        thr = cfg.cpu_idle_percent
        self.sync(samples, thr, max(cfg.cpu_spin_percent, thr), work_cpu_percent(cfg))

    def sync(self, samples: Sequence[TreeSample], thr: float, spin: float, work: float) -> None:
        """Catch up with the caller's history: drop what it dropped, add what it added."""
        if self._params != (thr, spin, work):
            self._params = (thr, spin, work)
            self._reset()
        recs = self._recs
        n = len(samples)
        if recs and n and recs[0].sample is not samples[0]:
            while recs and recs[0].sample is not samples[0]:
                self._drop()
        k = len(recs)
        if k > n or (k and recs[-1].sample is not samples[k - 1]):
            self._reset()
            k = 0
        for i in range(k, n):
            self._push(samples[i])

    def _push(self, s: TreeSample) -> None:
        thr, spin, work = self._params or (0.0, 0.0, 0.0)
        recs = self._recs
        prev = recs[-1] if recs else None
        prev_time = prev.time if prev is not None else None
        ok = s.status is SampleStatus.OK
        children = child_ids(s) if ok else None
        last_ok = self._last_ok
        prev_ok = last_ok.sample if last_ok is not None else None
        prev_children = last_ok.children or _NO_CHILDREN if last_ok is not None else _NO_CHILDREN
        mark = _mark(s, prev_time, prev_ok, prev_children, children, False, thr, spin)
        progress = _progress_mark(s, prev_time, prev_ok, prev_children, children, work)
        # A quiet tree gives the same share and child set tick after tick: keep one object
        # (marks are never changed once made), not one per sample of the window.
        if last_ok is not None and children is not None and children == last_ok.children:
            children = last_ok.children
        if prev is not None and _same_mark(prev.mark, mark):
            mark = prev.mark
        inverted = prev is not None and not s.time >= prev.time
        odd = not math.isfinite(s.time) or (s.cpu_percent is not None and not math.isfinite(s.cpu_percent)) or (
            s.cpu_demand_percent is not None and not math.isfinite(s.cpu_demand_percent))
        rec = _Rec(self._next, s, children, mark, progress, inverted, odd)
        self._next += 1
        recs.append(rec)
        self._inverted += inverted
        self._odd += odd
        if ok:
            self._last_ok = rec
            self._ok.append(rec)
        if progress:
            self._progress.append(rec)
        self._enter(rec)

    def _drop(self) -> None:
        rec = self._recs.popleft()
        if rec.seq >= self._lo:
            self._leave(rec)
        if rec is self._before:
            self._before = None
        if rec is self._last_ok:
            self._last_ok = None
        if self._ok and self._ok[0] is rec:
            self._ok.popleft()
        if self._progress and self._progress[0] is rec:
            self._progress.popleft()
        self._inverted -= rec.inverted
        self._odd -= rec.odd
        if self._recs and self._recs[0].inverted:
            # the new first sample has no predecessor any more: no inversion to count
            self._recs[0].inverted = False
            self._inverted -= 1

    def _enter(self, rec: _Rec) -> None:
        m, c = rec.mark, self._counts
        for k in _COUNTS:
            c[k] += getattr(m, k)
        s = rec.sample
        cpu = s.cpu_percent
        raw = s.cpu_demand_percent
        if raw is not None and math.isfinite(raw):
            self._raw_sum += _exact(raw)
            self._raw_n += 1
        if cpu is not None and math.isfinite(cpu):
            self._cpu_sum += _exact(cpu)
            self._cpu_n += 1
            q = self._cpu_max
            while q and q[-1][1] <= cpu:
                q.pop()
            q.append((rec.seq, cpu))
        if s.status in (SampleStatus.OK, SampleStatus.ACCESS_DENIED):
            tcp = s.tcp_total
            if tcp is not None:
                t = self._tcp_max
                while t and t[-1][1] <= tcp:
                    t.pop()
                t.append((rec.seq, tcp))
            if s.status is SampleStatus.OK:
                self._ok_in.append(rec)
            if _is_known(s):
                self._known.append(rec)
        for index, pids in zip(self._pids, (m.running, m.blocked, m.working), strict=True):
            for pid, pos in pids:
                occ = index.get(pid)
                if occ is None:
                    occ = index[pid] = deque()
                occ.append((rec.seq, pos))

    def _leave(self, rec: _Rec) -> None:
        """`rec` (the window's first sample) leaves the window."""
        m, c = rec.mark, self._counts
        for k in _COUNTS:
            c[k] -= getattr(m, k)
        cpu = rec.sample.cpu_percent
        raw = rec.sample.cpu_demand_percent
        if raw is not None and math.isfinite(raw):
            self._raw_sum -= _exact(raw)
            self._raw_n -= 1
        if cpu is not None and math.isfinite(cpu):
            self._cpu_sum -= _exact(cpu)
            self._cpu_n -= 1
        for q in (self._cpu_max, self._tcp_max):
            if q and q[0][0] == rec.seq:
                q.popleft()
        for d in (self._known, self._ok_in):
            if d and d[0] is rec:
                d.popleft()
        for index, pids in zip(self._pids, (m.running, m.blocked, m.working), strict=True):
            for pid, _ in pids:
                occ = index[pid]
                occ.popleft()
                if not occ:
                    del index[pid]
        self._lo = rec.seq + 1

    def _rec(self, seq: int) -> _Rec:
        return self._recs[seq - self._recs[0].seq]

    # ------------------------------------------------------------------ reading

    @property
    def usable(self) -> bool:
        """False: the history is out of time order or holds non-finite numbers, and
        only the full recomputation is known to read it right."""
        return not self._inverted and not self._odd

    def facts(self, start: float, latest: TreeSample | None) -> WindowFacts:
        """`WindowFacts.of` for the window of samples at or after `start` (after `sync`)."""
        thr, spin, _ = self._params or (0.0, 0.0, 0.0)
        if start < self._start:  # the window grew back (clock stepped back): start over
            self._clear_window()
            for rec in self._recs:
                self._enter(rec)
        self._start = start
        while self._lo < self._next:
            rec = self._rec(self._lo)
            if rec.time >= start:
                break
            if rec.sample.status is SampleStatus.OK:
                self._before = rec
            self._leave(rec)
        size = self._next - self._lo
        before = self._before
        counts = dict(self._counts)
        first_marks: tuple[_Mark, _Mark] = (_NO_MARK, _NO_MARK)
        first = self._rec(self._lo) if size else None
        if first is not None:
            # The window's first sample: its floor and readable predecessor are `before`'s.
            b_sample = before.sample if before is not None else None
            b_children = (before.children or _NO_CHILDREN) if before is not None else _NO_CHILDREN
            sight = first is self._recs[0] and first.sample.cpu_percent is None
            new1 = _mark(first.sample, before.time if before is not None else None, b_sample, b_children,
                         first.children, sight, thr, spin)
            _swap(counts, first.mark, new1)
            first_marks = (first.mark, new1)
            ok1 = self._ok_in[0] if self._ok_in else None
            if ok1 is not None and ok1 is not first:
                new2 = _mark(ok1.sample, self._rec(ok1.seq - 1).time, b_sample, b_children,
                             ok1.children, False, thr, spin)
                _swap(counts, ok1.mark, new2)
        cpu_mean = (self._cpu_sum / _EXACT_UNIT) / self._cpu_n if self._cpu_n else None
        raw_mean = (self._raw_sum / _EXACT_UNIT) / self._raw_n if self._raw_n else None
        starved = _starved(raw_mean, self._ok_in[-1].sample if self._ok_in else None,
                           first.time if first is not None else None)
        mean_busy = cpu_mean is not None and cpu_mean >= thr
        works = counts["work_mean"] if mean_busy else counts["work"]
        busy_any = (counts["busy_mean"] if mean_busy else counts["busy"]) > 0
        children_now = latest is not None and latest.alive and latest.children > 0
        new = first_marks[1]
        running, blocked, working = (
            _first_seen(index, self._lo, new_pids)
            for index, new_pids in zip(self._pids, (new.running, new.blocked, new.working), strict=True)
        )
        return WindowFacts(
            size=size,
            known=len(self._known),
            earliest_known=self._known[0].time if self._known else None,
            first_sight_in_window=first is not None and first is self._recs[0] and first.sample.cpu_percent is None,
            support={
                Reason.CPU_SPIN: counts["spin_starved"] if starved else counts["spin"],
                Reason.WAITING_ON_NETWORK: counts["net"],
                Reason.TOOL_CALL_WITHOUT_PROGRESS: works,
                Reason.PROBE_TIMEOUT: counts["timeout"],
                Reason.ACCESS_DENIED: counts["denied"],
            },
            spin_mean=_spin_mean(starved, raw_mean, cpu_mean, spin),
            cpu_latest=latest.cpu_percent if latest is not None else None,
            cpu_max=self._cpu_max[0][1] if self._cpu_max else None,
            cpu_mean=cpu_mean,
            demand_mean=raw_mean if raw_mean is not None else cpu_mean,
            starved=starved,
            tcp_max=self._tcp_max[0][1] if self._tcp_max else None,
            running_pids=running,
            blocked_pids=blocked,
            working_children=working,
            io_changed=counts["io"] > 0,
            children_changed=counts["children"] > 0,
            tree_alive=children_now or busy_any or counts["net"] > 0,
        )

    def progress_time(self) -> float | None:
        """`tree_progress_time` of the whole history (after `sync`)."""
        if not self._recs:
            return None
        work = self._params[2] if self._params else 0.0
        head = self._recs[0]
        ok1 = self._ok[0] if self._ok else None
        last: float | None = None
        for rec in reversed(self._progress):
            if rec is not head and rec is not ok1:
                last = rec.time
                break
        # The history's first sample has no predecessor; its first readable one none readable.
        if _progress_mark(head.sample, None, None, _NO_CHILDREN, head.children, work):
            last = head.time if last is None else max(last, head.time)
        if ok1 is not None and ok1 is not head:
            prev_time = self._rec(ok1.seq - 1).time
            if _progress_mark(ok1.sample, prev_time, None, _NO_CHILDREN, ok1.children, work):
                last = ok1.time if last is None else max(last, ok1.time)
        return last


def _is_known(s: TreeSample) -> bool:
    """`WindowFacts.of`'s known sample: readable (OK), with a CPU rate and TCP counts."""
    return s.status is SampleStatus.OK and s.tcp is not None and s.cpu_percent is not None


def _swap(counts: dict[str, int], old: _Mark, new: _Mark) -> None:
    for k in _COUNTS:
        counts[k] += getattr(new, k) - getattr(old, k)


def _first_seen(
    index: Mapping[int, deque[tuple[int, int]]], lo: int, first: tuple[tuple[int, int], ...]
) -> tuple[int, ...]:
    """The pids of the window in order of first sight, the window's first sample
    contributing `first` (its recomputed share) instead of what it stored."""
    if not index and not first:
        return ()
    keyed = [((lo, pos), pid) for pid, pos in first]
    mine = {pid for pid, _ in first}
    for pid, occ in index.items():
        if pid in mine:
            continue
        at = occ[0]
        if at[0] == lo:  # listed by the first sample's stored share only
            if len(occ) < 2:
                continue
            at = occ[1]
        keyed.append((at, pid))
    keyed.sort()
    return tuple(pid for _, pid in keyed)
