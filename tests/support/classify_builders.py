"""Builders for the pure classifier's tests: tree samples, histories, events and
session info around one fixed time, `NOW`. Shared by test_classify*.py and
test_backoff.py so that no test file imports another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from otelwatch.config import ClassifyConfig
from otelwatch.events.activity import Activity
from otelwatch.model import (
    Event,
    EventKind,
    Mode,
    ProcessIdentity,
    ProcessSample,
    SampleStatus,
    SessionInfo,
    TreeSample,
)

CFG = ClassifyConfig(
    startup_grace=30.0,
    stall_after=300.0,
    tool_stall_after=1800.0,
    cpu_idle_percent=1.0,
    repeat_base=60.0,
    repeat_max=3600.0,
)
NOW = 1_700_000_000.0
STARTED = NOW - 4 * 3600.0  # seen four hours ago
WATCH = STARTED  # the daemon has watched all along
ROOT_PID = 4242
ROOT = ProcessIdentity(ROOT_PID, 1_699_990_000.0)
INTERVAL = 10.0


def proc(
    pid: int,
    *,
    status: str = "S",
    cpu: float | None = 0.0,
    tcp: dict[str, int] | None = None,
    create: float | None = None,
    name: str = "child",
) -> ProcessSample:
    return ProcessSample(
        pid=pid,
        ppid=ROOT_PID if pid != ROOT_PID else 1,
        create_time=create if create is not None else (ROOT.create_time if pid == ROOT_PID else 1_699_999_000.0 + pid),
        name="agent" if pid == ROOT_PID else name,
        status=status,
        cpu_seconds=12.0,
        cpu_percent=cpu,
        rss_bytes=50_000_000,
        threads=4,
        tcp={} if tcp is None else tcp,
    )


def tree(
    t: float,
    *,
    status: SampleStatus = SampleStatus.OK,
    cpu: float | None = 0.0,
    tcp: dict[str, int] | None = None,
    unknown_tcp: bool = False,
    root_status: str = "S",
    children: Sequence[ProcessSample] = (),
    read: int | None = None,
    write: int | None = None,
    demand: float | None = None,
    awake_since: float | None = None,
) -> TreeSample:
    """One tree sample: the root agent process plus `children`; `demand`: its CPU demand
    (usage plus run-queue wait), None as from a backend that does not read it;
    `awake_since`: since when a process of it has not gone to sleep (None: it slept)."""
    if status in (SampleStatus.VANISHED, SampleStatus.PROBE_TIMEOUT):
        return TreeSample(time=t, status=status, root=ROOT, error=str(status))
    tcp_map = None if unknown_tcp else ({} if tcp is None else dict(tcp))
    root = proc(ROOT_PID, status="Z" if status is SampleStatus.ZOMBIE else root_status, cpu=cpu)
    return TreeSample(
        time=t,
        status=status,
        root=ROOT,
        processes=(root, *children),
        cpu_percent=cpu,
        cpu_seconds=12.0,
        rss_bytes=50_000_000,
        threads=4 + len(children),
        num_fds=20,
        tcp=tcp_map,
        children=len(children),
        read_bytes=read,
        write_bytes=write,
        cpu_demand_percent=demand,
        awake_since=awake_since,
    )


def history(
    span: float = 900.0,
    *,
    now: float = NOW,
    interval: float = INTERVAL,
    at: Callable[[float], dict[str, Any]] | None = None,
    **kw: Any,
) -> list[TreeSample]:
    """Samples every `interval` over the last `span` seconds up to `now`. `kw` applies
    to all of them; `at(t)` returns overrides for the sample at time t."""
    n = int(span // interval)
    out = []
    for i in range(n, -1, -1):
        t = now - i * interval
        args = dict(kw)
        if at is not None:
            args.update(at(t))
        out.append(tree(t, **args))
    return out


def ev(t: float, type_: str = "assistant", **kw: Any) -> Event:
    return Event(time=t, type=type_, **kw)


def hb(t: float, type_: str = "tool_progress", **kw: Any) -> Event:
    return Event(time=t, type=type_, kind=EventKind.HEARTBEAT, **kw)


def acts(*events: Event) -> Activity:
    a = Activity()
    for e in events:
        a = a.apply(e)
    return a


def info(
    mode: Mode = Mode.HEADLESS,
    *,
    started_at: float = STARTED,
    events: bool = True,
    runtime_alive: bool | None = None,
) -> SessionInfo:
    return SessionInfo(mode=mode, started_at=started_at, has_event_source=events, runtime_alive=runtime_alive)


# A headless run whose last progress was 20 minutes ago (well past stall_after).
SILENT = acts(ev(NOW - 3000, "system", turn="open"), ev(NOW - 1200, "assistant"))
