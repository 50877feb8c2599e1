"""Recovery against REAL processes: what must be recovered is, what must survive does.

Views are built from samples of the project's own `Prober` (`RealProbe` below), with
the probe backend the suite runs with.
The verdict is what the test says the classifier would say; several "must survive"
cases deliberately pass STUCK (a classifier bug) to show the recovery gates alone
keep the process alive.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from otelwatch.config import ClassifyConfig, Config, ProbeConfig, RecoveryConfig
from otelwatch.model import ProcessIdentity, Reason, RecoveryStatus, RecoveryStep, State, TreeSample, Verdict
from otelwatch.probe.backends import probe_backend
from otelwatch.probe.prober import Prober
from otelwatch.probe.proctable import ProcessTableReader, read_proc
from otelwatch.recovery import Recovery, SessionView
from otelwatch.recovery.actuator import Guard, ProcView, StateStore, send_signal, substitute
from tests.support.procs import PROBE_BACKEND, Spawner, TcpServer, wait_for

TICK = 0.2
RECOVER_AFTER = 1.0
GRACE = 0.5
STUCK = Verdict(State.STUCK, Reason.NO_ACTIVITY, silence_s=60.0)
# A survival check needs a minimum observation time: a signal sent by the escalation
# (its worker thread runs on after `completed`) lands well within this.
SURVIVAL_S = 0.2
PROBE_TIMEOUT = 5.0  # generous: a loaded CI host must not turn a sample into probe_timeout


def config(**recovery: object) -> Config:
    base: dict[str, object] = {"enabled": True, "recover_after": RECOVER_AFTER, "grace": GRACE,
                               "max_per_hour": 100}
    base.update(recovery)
    return Config(interval=1.0, probe_timeout=0.5, probe=ProbeConfig(backend=PROBE_BACKEND),
                  classify=ClassifyConfig(stall_after=RECOVER_AFTER, cpu_idle_percent=1.0),
                  recovery=RecoveryConfig(**base))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- views from the real probe


class RealProbe:
    """SessionViews of a real process tree, sampled by the project's own `Prober` (through
    `probe_backend`, so the psutil run of the suite uses the psutil prober). One instance
    per session: CPU rates need the previous sample of the same tree."""

    live: list[Prober] = []  # shut down after each test (autouse fixture below)

    def __init__(self) -> None:
        self.reader, self.prober = probe_backend(PROBE_BACKEND)
        RealProbe.live.append(self.prober)

    def sample(self, pid: int) -> TreeSample:
        key = str(pid)  # the prober keeps CPU history per key: one per tree
        return self.prober.sample(self.reader.read(), {key: pid}, PROBE_TIMEOUT)[key]

    def view(self, pid: int, session_id: str, *, verdict: Verdict = STUCK, events: int = 0,
             shift_create_time: float = 0.0) -> SessionView | None:
        s = self.sample(pid)
        if s.root is None or not s.processes:
            return None
        if shift_create_time:
            # Simulated PID reuse: everything the probe saw says "another start time".
            root = s.processes[0]
            fake = replace(root, create_time=root.create_time + shift_create_time)
            s = replace(s, root=fake.identity, processes=(fake, *s.processes[1:]))
        root = s.processes[0]
        return SessionView(session_id, "fake", root.identity, root.pgid, root.uid, root.cmdline,
                           verdict, s, events)


Driver = Callable[[], None]


def drive(rec: Recovery, tick: Driver, until: Callable[[], bool], timeout: float) -> bool:
    """Tick every TICK seconds until `until()` or `timeout`; bounded in time and count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / TICK) + 2):
        tick()
        if until():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(TICK)
    return until()


def completed(rec: Recovery, sid: str) -> RecoveryStep | None:
    return next((s for s in rec.history(sid) if s.step == "completed"), None)


def steps(rec: Recovery, sid: str) -> list[str]:
    return [s.step for s in rec.history(sid)]


def gone(pid: int, proc: subprocess.Popen[bytes] | None = None) -> bool:
    if proc is not None:
        proc.poll()  # reap our own child so it does not linger as a zombie
    info = read_proc(pid)
    return info is None or info.state in ("Z", "X")


def survives(proc: subprocess.Popen[bytes], observe_s: float) -> bool:
    """True when `proc` stays alive for all of `observe_s`; False as soon as it dies."""
    deadline = time.monotonic() + observe_s
    for _ in range(int(observe_s / 0.02) + 2):
        if proc.poll() is not None:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(0.02, left))
    return proc.poll() is None


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "recovery.json"


@pytest.fixture
def recoveries() -> Iterator[list[Recovery]]:
    made: list[Recovery] = []
    yield made
    for rec in made:
        rec.shutdown(2.0)


@pytest.fixture(autouse=True)
def _shut_probers() -> Iterator[None]:
    yield
    while RealProbe.live:
        RealProbe.live.pop().shutdown(1.0)


def new_recovery(made: list[Recovery], cfg: Config, path: Path, **kw: object) -> Recovery:
    rec = Recovery(cfg, path, **kw)  # type: ignore[arg-type]
    made.append(rec)
    return rec


def observer(rec: Recovery, probe: RealProbe, sessions: dict[str, tuple[int, Callable[[], dict[str, object]]]]
             ) -> Driver:
    """A tick function observing each session: sid -> (pid, kwargs for probe.view).
    Each session gets its own probe: two samples of one process a millisecond apart
    would make a meaningless CPU rate."""
    probes = {sid: RealProbe() for sid in sessions}
    probes[next(iter(sessions))] = probe

    def tick() -> None:
        for sid, (pid, kwargs) in sessions.items():
            v = probes[sid].view(pid, sid, **kwargs())  # type: ignore[arg-type]
            if v is not None:
                rec.observe(v, v.sample.time)
    return tick


# --------------------------------------------------------------------------- must be recovered


def test_hung_sleeper_is_terminated(spawn: Spawner, state_path: Path, recoveries: list[Recovery]) -> None:
    proc = spawn("sleeper")
    rec = new_recovery(recoveries, config(), state_path)
    started = time.time()
    tick = observer(rec, RealProbe(), {"s": (proc.pid, dict)})
    assert drive(rec, tick, lambda: completed(rec, "s") is not None, timeout=15)
    done = completed(rec, "s")
    assert done is not None and done.status is RecoveryStatus.TERMINATED, rec.history("s")
    assert steps(rec, "s") == ["requested", "sigterm", "completed"]
    requested = rec.history("s")[0]
    assert requested.reason == "no_activity" and requested.pid == proc.pid
    assert requested.time - started >= RECOVER_AFTER  # a whole window first
    assert proc.wait(timeout=5) == -signal.SIGTERM
    drained = rec.drain()
    assert [s.step for s in drained] == ["requested", "sigterm", "completed"]
    assert rec.drain() == []
    # The state file no longer holds the escalation, and keeps the rate-limit record.
    data = json.loads(state_path.read_text())
    assert data["escalations"] == [] and len(data["recoveries"]) == 1


def test_process_ignoring_sigterm_is_killed(spawn: Spawner, state_path: Path,
                                            recoveries: list[Recovery]) -> None:
    proc = spawn("ignore-term", ready=True)
    rec = new_recovery(recoveries, config(), state_path)
    tick = observer(rec, RealProbe(), {"s": (proc.pid, dict)})
    assert drive(rec, tick, lambda: completed(rec, "s") is not None, timeout=15)
    done = completed(rec, "s")
    assert done is not None and done.status is RecoveryStatus.KILLED, rec.history("s")
    assert steps(rec, "s") == ["requested", "sigterm", "sigkill", "completed"]
    assert done.duration_s is not None and done.duration_s >= GRACE
    assert proc.wait(timeout=5) == -signal.SIGKILL


def test_hung_tree_root_and_child_are_both_gone(spawn: Spawner, state_path: Path,
                                                recoveries: list[Recovery]) -> None:
    proc = spawn("tree", "--depth", "2", "--count", "1", ready=True)
    table = ProcessTableReader().read()
    children = table.descendants(proc.pid)
    assert len(children) == 1
    child = table.get(children[0])
    assert child is not None
    rec = new_recovery(recoveries, config(), state_path)
    tick = observer(rec, RealProbe(), {"s": (proc.pid, dict)})
    assert drive(rec, tick, lambda: completed(rec, "s") is not None, timeout=15)
    done = completed(rec, "s")
    assert done is not None and done.status is RecoveryStatus.TERMINATED, rec.history("s")
    sigterm = next(s for s in rec.history("s") if s.step == "sigterm")
    assert f"group {proc.pid}" in sigterm.detail  # the root leads its own group
    assert wait_for(lambda: gone(proc.pid, proc) and not ProcView(backend=PROBE_BACKEND).alive(child.identity),
                    timeout=5)


def test_child_ignoring_sigterm_is_killed_after_its_root_exited(
        spawn: Spawner, state_path: Path, recoveries: list[Recovery]) -> None:
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-m', 'otelwatch.fake_agents', 'ignore-term',"
              " '--lifetime', '60'])\n"
              "time.sleep(60)\n")
    root = spawn(sys.executable, "-c", script, fake=False, ready=True)  # ready: the child's line
    (child_pid,) = ProcessTableReader().read().descendants(root.pid)
    child = read_proc(child_pid)
    assert child is not None
    rec = new_recovery(recoveries, config(), state_path)
    probe = RealProbe()
    ended: list[bool] = []

    def tick() -> None:
        if gone(root.pid, root):
            if not ended:  # as the daemon does once the root has exited
                rec.session_ended("s")
                ended.append(True)
            return
        v = probe.view(root.pid, "s")
        if v is not None:
            rec.observe(v, v.sample.time)

    assert drive(rec, tick, lambda: completed(rec, "s") is not None, timeout=15)
    done = completed(rec, "s")
    assert done is not None and done.status is RecoveryStatus.KILLED, rec.history("s")
    sigkill = next(s for s in rec.history("s") if s.step == "sigkill")
    assert f"pids [{child_pid}]" in sigkill.detail
    assert ended and not ProcView(backend=PROBE_BACKEND).alive(child.identity)


def test_session_in_otelwatchs_own_group_is_signalled_one_by_one(
        state_path: Path, recoveries: list[Recovery]) -> None:
    # Not via Spawner: this process must share our (pytest's = "otelwatch's") process group.
    proc = subprocess.Popen([sys.executable, "-m", "otelwatch.fake_agents", "sleeper", "--lifetime", "60"],
                            stdout=subprocess.DEVNULL)
    try:
        assert os.getpgid(proc.pid) == os.getpgid(0)
        rec = new_recovery(recoveries, config(), state_path)
        tick = observer(rec, RealProbe(), {"s": (proc.pid, dict)})
        assert drive(rec, tick, lambda: completed(rec, "s") is not None, timeout=15)
        done = completed(rec, "s")
        assert done is not None and done.status is RecoveryStatus.TERMINATED, rec.history("s")
        sigterm = next(s for s in rec.history("s") if s.step == "sigterm")
        assert "group not signalled" in sigterm.detail and f"pids [{proc.pid}]" in sigterm.detail
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


# --------------------------------------------------------------------------- must survive


def test_working_sessions_survive_while_a_hung_one_is_recovered(
        spawn: Spawner, tcp_server: TcpServer, state_path: Path, recoveries: list[Recovery]) -> None:
    """One Recovery, like the daemon's, over a mixed fleet. The hung control proves the
    run was long enough for every window; each survivor is held by the gate named."""
    hung = spawn("sleeper")
    busy = spawn("busy")
    conn = spawn("tcp", "--host", tcp_server.host, "--port", str(tcp_server.port), "--count", "1",
                 ready=True)
    tool_events = Path(os.environ.get("TMPDIR", "/tmp")) / f"otelwatch-tool-{os.getpid()}.jsonl"
    tool = spawn("tool", "--events", str(tool_events))
    idle = spawn("idle", "--events", os.devnull)
    protected = spawn("files", ready=True)
    wait_for(lambda: ProcessTableReader().read().descendants(tool.pid), timeout=10)
    cases: dict[str, tuple[int, dict[str, object], str]] = {
        # sid: (pid, view kwargs, the gate that must hold it back)
        "busy": (busy.pid, {}, "cpu"),
        "tcp": (conn.pid, {}, "tcp"),
        "tool": (tool.pid, {"verdict": Verdict(State.LONG_RUNNING, Reason.TOOL_RUNNING, 60.0)}, "verdict"),
        "tool-misclassified": (tool.pid, {}, "cpu"),
        "idle": (idle.pid, {"verdict": Verdict(State.IDLE, Reason.NO_OPEN_TURN, 60.0)}, "verdict"),
        "protected": (protected.pid, {}, "not_protected"),
    }
    rec = new_recovery(recoveries, config(protect=(r"fake_agents files\b",)), state_path)
    probe = RealProbe()
    sessions: dict[str, tuple[int, Callable[[], dict[str, object]]]] = {
        sid: (pid, kw.copy) for sid, (pid, kw, _) in cases.items()}
    sessions["hung"] = (hung.pid, dict)
    tick = observer(rec, probe, sessions)
    assert drive(rec, tick, lambda: completed(rec, "hung") is not None, timeout=20)
    # One more whole window with everyone still observed.
    end = time.monotonic() + RECOVER_AFTER + 0.5
    drive(rec, tick, lambda: time.monotonic() > end, timeout=RECOVER_AFTER + 1)
    done = completed(rec, "hung")
    assert done is not None and done.status is RecoveryStatus.TERMINATED
    for sid, (pid, _, gate) in cases.items():
        assert rec.history(sid) == [], (sid, rec.history(sid))
        assert not gone(pid), sid
        decision = rec.last_decision(sid)
        assert decision is not None and not decision.act
        failing = {g.name for g in decision.failed}
        assert gate in failing, (sid, decision.summary())
    assert len(tcp_server.accepted) == 1


def test_an_event_just_before_the_window_ends_starts_it_again(
        spawn: Spawner, state_path: Path, recoveries: list[Recovery]) -> None:
    proc = spawn("sleeper")
    rec = new_recovery(recoveries, config(), state_path)
    probe = RealProbe()
    events = {"n": 0}
    bumped_at: list[float] = []

    def tick() -> None:
        v = probe.view(proc.pid, "s", events=events["n"])
        assert v is not None
        d = rec.last_decision("s")
        if not bumped_at and d is not None and d.window is not None \
                and d.window.duration >= RECOVER_AFTER - 2 * TICK:
            events["n"] += 1  # one event, just before the window would have completed
            v = probe.view(proc.pid, "s", events=events["n"])
            assert v is not None
            bumped_at.append(v.sample.time)
        rec.observe(v, v.sample.time)

    assert drive(rec, tick, lambda: completed(rec, "s") is not None, timeout=20)
    assert bumped_at, "the window never got close to completing"
    requested = rec.history("s")[0]
    assert requested.step == "requested"
    # Recovered only a whole window after the event, never on the old window.
    assert requested.time >= bumped_at[0] + RECOVER_AFTER - 1e-6


def test_pid_reuse_before_the_first_signal_signals_nothing(
        spawn: Spawner, state_path: Path, recoveries: list[Recovery]) -> None:
    # Real PID reuse cannot be arranged reliably in a test, so it is simulated: every view
    # during the window saw the PID with another start time; /proc now says otherwise.
    proc = spawn("sleeper")
    rec = new_recovery(recoveries, config(), state_path)
    tick = observer(rec, RealProbe(), {"s": (proc.pid, lambda: {"shift_create_time": 5.0})})
    assert drive(rec, tick, lambda: completed(rec, "s") is not None, timeout=15)
    done = completed(rec, "s")
    assert done is not None and done.status is RecoveryStatus.IDENTITY_CHANGED, rec.history("s")
    assert steps(rec, "s") == ["requested", "completed"]
    assert survives(proc, SURVIVAL_S)


def test_process_of_a_disallowed_user_survives(spawn: Spawner, state_path: Path,
                                               recoveries: list[Recovery]) -> None:
    if os.geteuid() == 0:
        # Real: a process of another user ("nobody"); allowed is otelwatch's own uid.
        proc = spawn("/usr/bin/sleep", "60", fake=False, user=65534)
        rec = new_recovery(recoveries, config(), state_path)
    else:
        proc = spawn("sleeper")
        rec = new_recovery(recoveries, config(), state_path, allowed_uids={os.getuid() + 1})
    tick = observer(rec, RealProbe(), {"s": (proc.pid, dict)})
    end = time.monotonic() + RECOVER_AFTER + 0.8  # the first sample has no CPU rate yet
    drive(rec, tick, lambda: time.monotonic() > end, timeout=RECOVER_AFTER + 1.5)
    assert rec.history("s") == []
    decision = rec.last_decision("s")
    assert decision is not None and {g.name for g in decision.failed} == {"owner_allowed"}, decision
    assert proc.poll() is None


def test_pid1_self_and_ancestor_are_never_recovered(state_path: Path, recoveries: list[Recovery]) -> None:
    # dry_run, so that even a broken gate could not signal init or pytest.
    rec = new_recovery(recoveries, config(dry_run=True), state_path)
    probe = RealProbe()
    targets = {"init": 1, "self": os.getpid(), "parent": os.getppid()}
    for i in range(12):  # fake "now": 12 ticks a quarter second apart, no sleeping
        for sid, pid in targets.items():
            s = probe.sample(pid)
            root = s.root
            assert root is not None
            if not s.processes:  # this tick's probe did not finish (a loaded host): nothing to judge
                continue
            procs = tuple(replace(p, cpu_percent=0.0, tcp={}) for p in s.processes[:1])
            s = replace(s, processes=procs, cpu_percent=0.0, tcp={})
            v = SessionView(sid, "fake", root, procs[0].pgid, os.getuid(), ("agent",), STUCK, s, 0)
            rec.observe(v, 1000.0 + 0.25 * i)
    assert rec.drain() == []
    expect = {"init": "not_pid1", "self": "not_self", "parent": "not_ancestor"}
    for sid, gate in expect.items():
        d = rec.last_decision(sid)
        assert d is not None and gate in {g.name for g in d.failed}, (sid, d)


def test_guard_refuses_init_self_and_ancestors_before_any_kill(tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    procs = ProcView(backend=PROBE_BACKEND)
    guard = Guard(os.getpid(), frozenset({os.getppid()}), frozenset({os.getuid()}))
    init = read_proc(1)
    me = read_proc(os.getpid())
    assert init is not None and me is not None
    for info in (init, me):
        # The real os.kill is replaced only to record: these must never be signalled at all.
        res = send_signal(0, info.identity, info.pgid, [info.identity], procs, guard,
                          kill=lambda p, s: calls.append(("kill", p, s)),
                          killpg=lambda p, s: calls.append(("killpg", p, s)))
        assert res.refused and not res.signalled and res.group is None
    assert calls == []


def test_untracked_mid_escalation_gets_no_sigkill(spawn: Spawner, state_path: Path,
                                                  recoveries: list[Recovery]) -> None:
    proc = spawn("ignore-term", ready=True)
    rec = new_recovery(recoveries, config(grace=1.0), state_path)
    tick = observer(rec, RealProbe(), {"s": (proc.pid, dict)})
    assert drive(rec, tick, lambda: "sigterm" in steps(rec, "s"), timeout=15)
    rec.session_ended("s")  # e.g. its registry file was removed while it still runs
    wait_for(lambda: completed(rec, "s") is not None, timeout=5)
    done = completed(rec, "s")
    assert done is not None and done.status is RecoveryStatus.FAILED
    assert "no longer tracked" in done.detail and "sigkill" not in steps(rec, "s")
    assert proc.poll() is None


def test_send_signal_reidentifies_every_target(spawn: Spawner) -> None:
    proc = spawn("sleeper")
    info = read_proc(proc.pid)
    assert info is not None
    procs = ProcView(backend=PROBE_BACKEND)
    guard = Guard(os.getpid(), frozenset({os.getppid()}), frozenset({os.getuid()}))
    calls: list[tuple[int, int]] = []
    stale = ProcessIdentity(proc.pid, info.create_time + 5.0)  # "the PID was reused"
    res = send_signal(0, stale, info.pgid, [stale], procs, guard,
                      kill=lambda p, s: calls.append((p, s)), killpg=lambda p, s: calls.append((-p, s)))
    assert calls == [] and res.group is None and res.gone == [proc.pid]
    # Control: the right identity is signalled (signal 0, through the real pidfd path).
    res = send_signal(0, info.identity, info.pgid, [info.identity], procs, guard)
    assert res.group == proc.pid and res.signalled == [proc.pid]


# --------------------------------------------------------------------------- modes and limits


def test_dry_run_signals_nothing_and_reports(spawn: Spawner, state_path: Path,
                                             recoveries: list[Recovery]) -> None:
    proc = spawn("sleeper")
    rec = new_recovery(recoveries, config(dry_run=True), state_path)
    tick = observer(rec, RealProbe(), {"s": (proc.pid, dict)})
    assert drive(rec, tick, lambda: completed(rec, "s") is not None, timeout=15)
    done = completed(rec, "s")
    assert done is not None and done.status is RecoveryStatus.DRY_RUN
    assert f"would signal pgid {proc.pid}" in done.detail and "gates:" in done.detail
    assert steps(rec, "s") == ["requested", "completed"]
    assert survives(proc, SURVIVAL_S)


def test_restart_windows_starts_every_window_again(spawn: Spawner, state_path: Path,
                                                   recoveries: list[Recovery]) -> None:
    proc = spawn("sleeper")
    rec = new_recovery(recoveries, config(dry_run=True), state_path)
    probe = RealProbe()
    restarted: list[float] = []

    def tick() -> None:
        v = probe.view(proc.pid, "s")
        assert v is not None
        d = rec.last_decision("s")
        if not restarted and d is not None and d.window is not None \
                and d.window.duration >= RECOVER_AFTER - 2 * TICK:
            rec.restart_windows(v.sample.time)
            restarted.append(v.sample.time)
        rec.observe(v, v.sample.time)

    assert drive(rec, tick, lambda: completed(rec, "s") is not None, timeout=20)
    assert restarted
    assert rec.history("s")[0].time >= restarted[0] + RECOVER_AFTER - 1e-6


def test_max_per_hour_stops_the_next_one_and_survives_a_restart(
        spawn: Spawner, state_path: Path, recoveries: list[Recovery]) -> None:
    procs = {f"s{i}": spawn("sleeper") for i in range(3)}
    rec = new_recovery(recoveries, config(max_per_hour=2), state_path)
    tick = observer(rec, RealProbe(), {sid: (p.pid, dict) for sid, p in procs.items()})
    assert drive(rec, tick, lambda: sum(completed(rec, s) is not None for s in procs) >= 2, timeout=20)
    end = time.monotonic() + RECOVER_AFTER + 0.5
    drive(rec, tick, lambda: time.monotonic() > end, timeout=RECOVER_AFTER + 1)
    done = [sid for sid in procs if completed(rec, sid) is not None]
    assert len(done) == 2
    (left,) = set(procs) - set(done)
    assert procs[left].poll() is None
    d = rec.last_decision(left)
    assert d is not None and {g.name for g in d.failed} == {"rate_limit"}
    rec.shutdown()
    # A new daemon on the same state file remembers the hour.
    rec2 = new_recovery(recoveries, config(max_per_hour=2), state_path)
    tick2 = observer(rec2, RealProbe(), {left: (procs[left].pid, dict)})
    end = time.monotonic() + RECOVER_AFTER + 0.5
    drive(rec2, tick2, lambda: time.monotonic() > end, timeout=RECOVER_AFTER + 1)
    assert rec2.history(left) == [] and procs[left].poll() is None
    d = rec2.last_decision(left)
    assert d is not None and "rate_limit" in {g.name for g in d.failed}


# --------------------------------------------------------------------------- restarts and state


def test_restart_mid_escalation_continues_only_after_the_gates_hold_again(
        spawn: Spawner, state_path: Path, recoveries: list[Recovery]) -> None:
    proc = spawn("ignore-term", ready=True)
    rec = new_recovery(recoveries, config(grace=60.0), state_path)
    tick = observer(rec, RealProbe(), {"s": (proc.pid, dict)})
    assert drive(rec, tick, lambda: "sigterm" in steps(rec, "s"), timeout=15)
    rec.shutdown(2.0)  # the daemon stops mid-grace
    saved = json.loads(state_path.read_text())
    (entry,) = saved["escalations"]
    assert entry["step"] == "sigterm" and entry["pid"] == proc.pid
    assert proc.poll() is None

    rec2 = new_recovery(recoveries, config(grace=0.3), state_path)
    assert rec2.history("s") == []  # nothing happens before observe() shows it stuck again
    probe = RealProbe()
    tick2 = observer(rec2, probe, {"s": (proc.pid, dict)})
    assert drive(rec2, tick2, lambda: completed(rec2, "s") is not None, timeout=15)
    done = completed(rec2, "s")
    assert done is not None and done.status is RecoveryStatus.KILLED, rec2.history("s")
    assert steps(rec2, "s") == ["sigkill", "completed"]  # no second request, no second SIGTERM
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert json.loads(state_path.read_text())["escalations"] == []
    assert len(json.loads(state_path.read_text())["recoveries"]) == 1


def test_restart_never_signals_a_replaced_pid(spawn: Spawner, state_path: Path,
                                              recoveries: list[Recovery]) -> None:
    # A state file from "before the restart": one escalation whose PID now belongs to
    # another process (simulated: the live sleeper with a different start time), and
    # one whose process is gone.
    other = spawn("sleeper")
    info = read_proc(other.pid)
    assert info is not None
    dead = subprocess.Popen(["/bin/true"])
    dead.wait()
    now = time.time()

    def entry(sid: str, pid: int, ct: float) -> dict[str, object]:
        return {"session_id": sid, "agent": "fake", "action": "signal", "reason": "no_activity",
                "kind": "stuck", "pid": pid, "create_time": ct, "pgid": pid, "snapshot": [[pid, ct]],
                "step": "sigterm", "time": now - 100, "requested_at": now - 101, "events": 3}

    StateStore(state_path).save({"version": 1, "recoveries": [now - 101], "given_up": [],
                                 "escalations": [entry("reused", other.pid, info.create_time - 50),
                                                 entry("gone", dead.pid, 1.0)]})
    rec = new_recovery(recoveries, config(grace=0.1), state_path)
    closed = {s.session_id: s for s in rec.drain()}
    assert set(closed) == {"reused", "gone"}
    assert all(s.step == "completed" for s in closed.values())
    assert "reused" in closed["reused"].detail and "nothing signalled" in closed["reused"].detail
    assert json.loads(state_path.read_text())["escalations"] == []
    # The new process on that PID is judged from scratch: no signal before a whole window.
    tick = observer(rec, RealProbe(), {"reused": (other.pid, dict)})
    end = time.monotonic() + RECOVER_AFTER * 0.6
    drive(rec, tick, lambda: time.monotonic() > end, timeout=RECOVER_AFTER)
    assert rec.history("reused")[1:] == [] and other.poll() is None


def test_corrupt_state_file_is_moved_aside(state_path: Path, caplog: pytest.LogCaptureFixture,
                                           recoveries: list[Recovery]) -> None:
    state_path.parent.mkdir(parents=True)
    state_path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="otelwatch.recovery"):
        rec = new_recovery(recoveries, config(), state_path)
    assert any("moved aside" in r.getMessage() for r in caplog.records)
    assert list(state_path.parent.glob("recovery.json.corrupt-*"))
    assert not state_path.exists()
    rec.shutdown()
    assert json.loads(state_path.read_text())["version"] == 1
    rec.shutdown()  # idempotent


def test_disabled_recovery_touches_nothing(spawn: Spawner, state_path: Path,
                                           recoveries: list[Recovery]) -> None:
    proc = spawn("sleeper")
    rec = new_recovery(recoveries, config(enabled=False), state_path)
    tick = observer(rec, RealProbe(), {"s": (proc.pid, dict)})
    for _ in range(3):
        tick()
    rec.shutdown()
    assert rec.last_decision("s") is None and rec.history("s") == []
    assert not state_path.exists() and proc.poll() is None


# --------------------------------------------------------------------------- command action


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_command_action_terminates(spawn: Spawner, state_path: Path, recoveries: list[Recovery]) -> None:
    proc = spawn("sleeper")
    cmd = (*_python("import os, signal, sys; os.kill(int(sys.argv[1]), signal.SIGTERM)"), "{pid}")
    rec = new_recovery(recoveries, config(action="command", command=cmd), state_path)
    tick = observer(rec, RealProbe(), {"s": (proc.pid, dict)})
    assert drive(rec, tick, lambda: completed(rec, "s") is not None, timeout=15)
    done = completed(rec, "s")
    assert done is not None and done.status is RecoveryStatus.TERMINATED, rec.history("s")
    assert steps(rec, "s") == ["requested", "command", "completed"]
    assert done.action == "command"
    assert proc.wait(timeout=5) == -signal.SIGTERM


def test_command_gets_placeholders_as_argv_never_a_shell(
        spawn: Spawner, tmp_path: Path, state_path: Path, recoveries: list[Recovery]) -> None:
    proc = spawn("sleeper")
    out = tmp_path / "argv.json"
    marker = tmp_path / "pwned"
    sid = f"x; touch {marker} $(touch {marker}) {{pid}}"
    cmd = (*_python("import json, sys; json.dump(sys.argv[1:], open(sys.argv[1], 'w'))"),
           str(out), "{pid}", "pg={pgid}", "{session_id}")
    rec = new_recovery(recoveries, config(action="command", command=cmd, grace=0.2), state_path)
    tick = observer(rec, RealProbe(), {sid: (proc.pid, dict)})
    assert drive(rec, tick, lambda: completed(rec, sid) is not None, timeout=15)
    assert json.loads(out.read_text()) == [str(out), str(proc.pid), f"pg={proc.pid}", sid]
    assert not marker.exists()
    done = completed(rec, sid)
    # Exit 0 but the session is still running: the recovery did not recover it.
    assert done is not None and done.status is RecoveryStatus.FAILED and "still running" in done.detail
    assert proc.poll() is None


@pytest.mark.parametrize(("code", "timeout", "expect"),
                         [("import sys; sys.exit(3)", 5.0, "exit 3"),
                          ("import time; time.sleep(30)", 0.5, "timed out")])
def test_failing_or_hanging_command_is_failed(spawn: Spawner, state_path: Path, recoveries: list[Recovery],
                                              code: str, timeout: float, expect: str) -> None:
    proc = spawn("sleeper")
    rec = new_recovery(recoveries, config(action="command", command=_python(code), command_timeout=timeout),
                       state_path)
    tick = observer(rec, RealProbe(), {"s": (proc.pid, dict)})
    assert drive(rec, tick, lambda: completed(rec, "s") is not None, timeout=15)
    done = completed(rec, "s")
    assert done is not None and done.status is RecoveryStatus.FAILED and expect in done.detail
    assert proc.poll() is None


def test_substitute_is_one_pass() -> None:
    assert substitute(["{session_id}", "a{pid}b", "{unknown}"],
                      {"pid": "7", "pgid": "7", "session_id": "{pid}"}) == ["{pid}", "a7b", "{unknown}"]
