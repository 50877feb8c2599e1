"""The session table's bounded bookkeeping: aliases and ended registrations."""

from __future__ import annotations

import tracemalloc

from otelwatch.sessions.table import ALIASES_PER_SESSION, AliasMap, EndedRegistrations


def test_aliases_resolve_rekey_and_forget() -> None:
    m = AliasMap()
    m.add("uuid-1", "job")
    m.add("hook-1", "job")
    assert m.resolve("uuid-1") == "job" and m.resolve("job") == "job" and m.resolve("other") == "other"
    m.rekey("job", "job-2")
    assert {m.resolve(a) for a in ("uuid-1", "hook-1", "job")} == {"job-2"}
    m.forget("job-2")
    assert len(m) == 0 and m.resolve("uuid-1") == "uuid-1"


def test_an_alias_moves_rather_than_duplicates() -> None:
    m = AliasMap()
    m.add("x", "a")
    m.add("x", "b")
    assert m.resolve("x") == "b" and m.aliases_of("a") == () and m.aliases_of("b") == ("x",)


def test_minting_ids_for_one_session_costs_a_fixed_amount() -> None:
    """2.5M POSTs with new session ids and a tracked pid once cost +228 MB."""
    m = AliasMap()
    tracemalloc.start()
    for i in range(30_000):
        m.add(f"minted-{i}", "victim")
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(m) == ALIASES_PER_SESSION
    assert m.resolve("minted-29999") == "victim" and m.resolve("minted-0") == "minted-0"
    assert current < 100_000  # bytes: bounded, not proportional to the flood


def test_forget_costs_only_the_sessions_own_aliases() -> None:
    m = AliasMap()
    for s in range(5_000):
        m.add(f"alias-{s}", f"session-{s}")
    for s in range(5_000):
        m.forget(f"session-{s}")  # was a scan of every alias per forget: quadratic
    assert len(m) == 0


def test_ended_registrations_are_exact_and_bounded() -> None:
    ended = EndedRegistrations(limit=3)
    ended.add("a", 10, 100.0)
    assert ended.ended("a", 10, 100.0)
    assert not ended.ended("a", 11, 100.0)  # another pid: a new registration
    assert not ended.ended("a", 10, 200.0)  # written again later: a new registration
    for sid in ("b", "c", "d"):
        ended.add(sid, 1, 1.0)
    assert len(ended) == 3 and not ended.ended("a", 10, 100.0)


# ---------------------------------------------------------------------- the session table
# Pure: a ProcessTable built from ProcInfo values, time passed in, no processes.

from otelwatch.model import Event, EventKind, ProcessIdentity, SessionSpec, State  # noqa: E402
from otelwatch.probe.proctable import ProcessTable, ProcInfo  # noqa: E402
from otelwatch.sessions.table import PENDING_EVENTS_PER_SESSION, SessionTable, Tracked  # noqa: E402


def _table(*procs: tuple[int, float], boot_shift: float = 0.0) -> ProcessTable:
    infos = {pid: ProcInfo(pid, 1, pid, pid, "S", "agent", 0.0, 1, created, 0) for pid, created in procs}
    return ProcessTable(infos, reader=None, time=1000.0, monotonic=1.0,  # type: ignore[arg-type]
                        boot_shift=boot_shift)


class _Recorder:
    def __init__(self) -> None:
        self.ended: list[str] = []
        self.rekeyed: list[str] = []
        self.logged: list[str] = []

    def table(self) -> SessionTable:
        def on_end(tracked: Tracked, now: float) -> None:
            tracked.ended_at = now
            self.ended.append(tracked.key)

        return SessionTable(on_end=on_end, on_rekey=self.rekeyed.append,
                            log=lambda event, fields, level: self.logged.append(event))


def _event(t: float) -> Event:
    return Event(time=t, type="assistant", kind=EventKind.PROGRESS, source="api")


def test_a_stronger_source_rekeys_a_discovered_session_and_keeps_its_history() -> None:
    rec = _Recorder()
    sessions = rec.table()
    procs = _table((42, 900.0))
    sessions.merge([SessionSpec("proc-42", 42, agent="claude", source="process")], procs, 1000.0, registry_ok=True)
    found = sessions.get("proc-42")
    assert found is not None
    sessions.deliver("proc-42", _event(1001.0), None)
    sessions.merge([SessionSpec("job-7", 42, source="registry", registered_at=950.0)], procs, 1002.0, registry_ok=True)
    assert "proc-42" not in sessions and sessions.get("job-7") is found
    assert found.spec.agent == "claude"  # the blanks filled from the weaker description
    assert found.activity.events == 1 and rec.rekeyed == ["proc-42"]
    assert sessions.find("proc-42") is found and sessions.resolve("proc-42") == "job-7"


def test_events_before_their_session_wait_bounded_then_apply() -> None:
    sessions = _Recorder().table()
    for i in range(PENDING_EVENTS_PER_SESSION + 10):
        sessions.deliver("hook-1", _event(float(i)), None)
    sessions.merge([SessionSpec("hook-1", 50, source="hook")], _table((50, 1.0)), 100.0, registry_ok=True)
    tracked = sessions.get("hook-1")
    assert tracked is not None and tracked.activity.events == PENDING_EVENTS_PER_SESSION


def test_an_alias_naming_another_pid_never_joins_the_session() -> None:
    sessions = _Recorder().table()
    procs = _table((10, 1.0), (11, 1.0))
    sessions.merge([SessionSpec("a", 10, source="registry")], procs, 5.0, registry_ok=True)
    tracked = sessions.get("a")
    assert tracked is not None
    sessions.adopt("transcript-uuid", tracked)
    # A stale or forged description under the alias, naming another process.
    sessions.merge([SessionSpec("a", 10, source="registry"), SessionSpec("transcript-uuid", 11, source="tmux")],
                   procs, 6.0, registry_ok=True)
    assert sessions.get("a") is tracked and tracked.spec.pid == 10
    assert sessions.resolve("transcript-uuid") == "transcript-uuid"


def test_a_pid_reused_after_the_registration_is_never_adopted() -> None:
    rec = _Recorder()
    sessions = rec.table()
    # The process holding pid 77 started 10 s after the registration was written.
    sessions.merge([SessionSpec("job", 77, source="registry", registered_at=100.0)], _table((77, 110.0)), 120.0,
                   registry_ok=True)
    tracked = sessions.get("job")
    assert tracked is not None and tracked.identity is None
    assert tracked.verdict is not None and tracked.verdict.state is State.EXITED
    assert rec.ended == ["job"] and rec.logged == ["session.pid_reused"]


def test_a_reuse_is_judged_on_the_real_start_not_the_whole_second_boot_time() -> None:
    """create_time counts from /proc/stat's btime, whole seconds: up to a second early. A
    process started 0.9 s after the registration looked to have started with it (a fresh
    machine whose boot fell late in its second adopted every such reuse)."""
    rec = _Recorder()
    sessions = rec.table()
    sessions.merge([SessionSpec("job", 77, source="registry", registered_at=100.0)],
                   _table((77, 100.05), boot_shift=0.85), 120.0, registry_ok=True)
    assert rec.ended == ["job"] and rec.logged == ["session.pid_reused"]
    # The identity keeps the create_time every reader computes the same way.
    rec = _Recorder()
    sessions = rec.table()
    sessions.merge([SessionSpec("job", 77, source="registry", registered_at=100.0)],
                   _table((77, 99.05), boot_shift=0.85), 120.0, registry_ok=True)
    tracked = sessions.get("job")
    assert tracked is not None and tracked.identity == ProcessIdentity(77, 99.05) and rec.ended == []


def test_a_process_that_existed_at_registration_is_bound_by_identity() -> None:
    sessions = _Recorder().table()
    sessions.merge([SessionSpec("job", 77, source="registry", registered_at=100.0)], _table((77, 90.0)), 120.0,
                   registry_ok=True)
    tracked = sessions.get("job")
    assert tracked is not None and tracked.identity == ProcessIdentity(77, 90.0)


def test_an_ended_registration_stays_ended_and_a_removed_one_is_untracked() -> None:
    rec = _Recorder()
    sessions = rec.table()
    procs = _table((5, 1.0), (6, 1.0))
    spec = SessionSpec("gone", 5, source="registry", registered_at=2.0)
    sessions.merge([spec, SessionSpec("kept", 6, source="registry")], procs, 3.0, registry_ok=True)
    tracked = sessions.get("gone")
    assert tracked is not None
    tracked.ended_at = 4.0
    sessions.record_end(tracked)
    sessions.expire(now=100.0, retention=10.0)
    assert "gone" not in sessions
    sessions.merge([spec], procs, 101.0, registry_ok=True)  # the same file, still on disk
    assert "gone" not in sessions
    kept = sessions.get("kept")
    assert kept is not None and kept.untracked  # its file was removed: a registry scan that worked
    kept.untracked = False
    sessions.merge([spec], procs, 102.0, registry_ok=False)  # a failed scan is no removal
    assert not kept.untracked


def test_a_process_born_after_the_tick_read_its_table_waits_one_tick() -> None:
    """Tables are read before sources are scanned: an agent started and registered in
    between is missing from that table. Probing it then would call it vanished, and its
    registration would stay ended for good (the agent then runs unwatched)."""
    rec = _Recorder()
    sessions = rec.table()
    spec = SessionSpec("new", 88, source="registry", registered_at=99.0)
    sessions.merge([spec], _table(), 100.0, registry_ok=True)
    assert "new" not in sessions
    sessions.merge([spec], _table((88, 99.5)), 101.0, registry_ok=True)
    tracked = sessions.get("new")
    assert tracked is not None and tracked.identity == ProcessIdentity(88, 99.5) and rec.ended == []
    # A pid missing from a table read after the registration was seen is gone: tracked
    # (so that it shows as exited once), not deferred for ever.
    gone = SessionSpec("dead", 89, source="registry", registered_at=99.0)
    sessions.merge([gone], _table(), 102.0, registry_ok=True)
    sessions.merge([gone], _table(), 103.0, registry_ok=True)
    assert sessions.get("dead") is not None


# ---------------------------------------------------------------------- the reaction gate

from otelwatch.events.activity import Activity  # noqa: E402
from otelwatch.model import ProcessSample, SampleStatus, TcpConnection, TreeSample  # noqa: E402
from otelwatch.sessions.table import reaction_seen  # noqa: E402

KEEPALIVE = TcpConnection("ESTABLISHED", "127.0.0.1:40000", "10.0.0.7:443")


def _sample(t: float, cpu: float, conns: tuple[TcpConnection, ...] = (), children: int = 0) -> TreeSample:
    root = ProcessSample(pid=10, ppid=1, create_time=1.0, name="claude", status="S", cpu_seconds=0.0,
                         cpu_percent=cpu, rss_bytes=1, threads=1, tcp={"ESTABLISHED": len(conns)}, connections=conns)
    kids = tuple(ProcessSample(pid=100 + i, ppid=10, create_time=t, name="bash", status="S", cpu_seconds=0.0,
                               cpu_percent=0.0, rss_bytes=1, threads=1, tcp={}) for i in range(children))
    return TreeSample(time=t, status=SampleStatus.OK, root=ProcessIdentity(10, 1.0), processes=(root, *kids),
                      cpu_percent=cpu, tcp={"ESTABLISHED": len(conns)} if conns else {}, children=children)


def test_stray_clock_ticks_and_an_old_keepalive_are_no_reaction() -> None:
    """An idle sleeper is charged a 10 ms tick now and then (2% of a 0.5 s interval), and
    an interactive CLI may keep a keep-alive connection across turns: a forged turn start
    must not find either and take it for the session reacting."""
    since = 10.0
    quiet = [_sample(9.5, 0.0, (KEEPALIVE,))] + [_sample(10.0 + 0.5 * i, 2.0 if i % 3 == 0 else 0.0, (KEEPALIVE,))
                                                 for i in range(1, 40)]
    assert not reaction_seen(quiet, Activity(), since, 5.0)


def test_work_a_new_connection_or_a_new_child_after_the_turn_is_a_reaction() -> None:
    since = 10.0
    base = [_sample(9.5, 0.0, (KEEPALIVE,)), _sample(10.5, 0.0, (KEEPALIVE,))]
    assert reaction_seen([*base, _sample(11.0, 80.0, (KEEPALIVE,))], Activity(), since, 5.0)
    fresh = TcpConnection("ESTABLISHED", "127.0.0.1:40001", "10.0.0.7:443")
    assert reaction_seen([*base, _sample(11.0, 0.0, (KEEPALIVE, fresh))], Activity(), since, 5.0)
    assert reaction_seen([*base, _sample(11.0, 0.0, (KEEPALIVE,), children=1)], Activity(), since, 5.0)
