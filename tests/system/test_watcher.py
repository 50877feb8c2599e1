"""The Watcher in-process (the Python API): real processes, a fake clock where the
test is about time itself (a suspended host)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from otelwatch.config import parse_config
from otelwatch.daemon import Watcher
from otelwatch.model import Reason, State
from tests.support.procs import PROBE_BACKEND, REPO, wait_for


def _cfg(tmp_path: Path, **classify: Any) -> Any:
    return parse_config({
        "probe": {"backend": PROBE_BACKEND},
        "interval": 1, "probe_timeout": 0.5, "state_dir": str(tmp_path / "state"),
        "classify": {"startup_grace": 0, "stall_after": 3, **classify},
        "sources": {"registry": {"enabled": False}, "processes": {"enabled": False},
                    "tmux": {"enabled": False}, "transcripts": {"enabled": False}},
    })


class FakeClocks:
    """Wall and boot clocks that the test moves; a suspend moves both, not the probe."""

    def __init__(self) -> None:
        import time

        self.wall = time.time()  # files written by the test carry real mtimes
        self.boot = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.boot += seconds


def test_a_suspended_host_restarts_the_windows_not_the_silence(tmp_path: Path, spawn: Any) -> None:
    """Issue #20: after a pause the agent's silence is its true silence (never active with
    silence 0), but nothing is stuck until the daemon has watched a whole stall_after again."""
    clocks = FakeClocks()
    logs: list[str] = []
    w = Watcher(_cfg(tmp_path), clock=lambda: clocks.wall, boottime=lambda: clocks.boot,
                log_stream=_ListStream(logs))
    try:
        sleeper = spawn("sleeper")
        sid = w.track(sleeper.pid, "s1")
        w.feed(sid, '{"type":"assistant","message":{"content":[{"type":"text","text":"hi"}]}}')
        w.tick()
        clocks.advance(1)
        assert w.tick()[0].state is State.ACTIVE
        clocks.advance(600)  # the laptop lid was closed for ten minutes
        snap = w.tick()[0]
        # Never active, never stuck on a window that restarted one tick ago (the reason is the
        # one sample's: the fake clocks make the sleeper's start-up CPU a rate).
        assert snap.state is State.STALLED and snap.reason is not Reason.RECENT_PROGRESS
        assert snap.silence_s >= 600
        assert snap.last_event_age_s is not None and snap.last_event_age_s > 600
        assert any('"tick.late"' in line for line in logs)
        # Watched again for stall_after with nothing happening: stuck, with the whole silence.
        for _ in range(5):
            clocks.advance(1)
            snap = w.tick()[0]
        assert snap.state in (State.STALLED, State.STUCK) and 603 <= snap.silence_s <= 607
    finally:
        w.stop()


def test_a_failing_subscriber_and_garbage_lines_do_not_stop_the_loop(tmp_path: Path, spawn: Any) -> None:
    w = Watcher(_cfg(tmp_path), log_stream=_ListStream([]))
    try:
        seen: list[str] = []

        def explode(report: Any) -> None:
            seen.append(str(report.get("event")))
            raise RuntimeError("subscriber bug")

        w.subscribe(explode)
        sid = w.track(spawn("sleeper").pid, "s2", agent="fake")
        w.feed(sid, b"{not json")
        w.feed(sid, b"\xff\xfe\x00\x01")
        w.feed(sid, "plain text output", json_only=False)
        snap = w.tick()[0]
        assert (snap.events, snap.malformed) == (1, 2)
        assert "session.state" in seen  # it was called, raised, and the tick went on
        assert w.tick()[0].session_id == "s2"
    finally:
        w.stop()
        w.stop()  # idempotent


def test_health_turns_503_worthy_when_the_loop_stops(tmp_path: Path) -> None:
    w = Watcher(_cfg(tmp_path), log_stream=_ListStream([]))
    assert w.health()["ok"] is False  # never ticked
    w.start()
    try:
        wait_for(lambda: w.health()["ok"], timeout=5)
    finally:
        w.stop()
    assert w.health()["ok"] is False


def test_untracked_session_ends_with_a_summary(tmp_path: Path, spawn: Any) -> None:
    w = Watcher(_cfg(tmp_path), log_stream=_ListStream([]))
    try:
        reports: list[dict[str, Any]] = []
        w.subscribe(lambda r: reports.append(dict(r)))
        pid = spawn("sleeper").pid
        w.track(pid, "s3")
        w.tick()
        w.untrack("s3")
        assert w.tick() == []
        summary = [r for r in reports if r["event"] == "session.end"]
        assert len(summary) == 1 and summary[0]["session_id"] == "s3" and summary[0]["pid"] == pid
    finally:
        w.stop()


def test_the_readme_python_api_example_runs() -> None:
    out = subprocess.run([sys.executable, str(REPO / "examples" / "embed_watcher.py")], capture_output=True,
                         text=True, timeout=60, cwd=str(REPO))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "job-quiet: stuck/no_activity" in out.stdout and "job-working: active" in out.stdout


class _ListStream:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def write(self, text: str) -> int:
        self.lines.extend(t for t in text.splitlines() if t)
        return len(text)

    def flush(self) -> None:
        pass


def test_re_registration_with_another_pid_starts_a_new_session(tmp_path: Path, spawn: Any) -> None:
    w = Watcher(_cfg(tmp_path), log_stream=_ListStream([]))
    try:
        reports: list[dict[str, Any]] = []
        w.subscribe(lambda r: reports.append(dict(r)))
        first, second = spawn("sleeper"), spawn("sleeper")
        w.track(first.pid, "job")
        w.feed("job", '{"type":"assistant"}')
        assert w.tick()[0].events == 1
        w.track(second.pid, "job")  # the orchestrator restarted its agent under the same id
        snap = w.tick()[0]
        assert (snap.pid, snap.events) == (second.pid, 0)  # nothing inherited
        ends = [r for r in reports if r["event"] == "session.end"]
        assert [e["pid"] for e in ends] == [first.pid]
    finally:
        w.stop()


def test_a_hook_session_between_turns_is_idle_never_stuck(tmp_path: Path, spawn: Any) -> None:
    """Hooks recorded by the real `otelwatch event` CLI: after Stop, an agent waiting
    for its user for far longer than stall_after is idle, whatever the process does."""
    import os

    clocks = FakeClocks()
    cfg = _cfg(tmp_path)
    w = Watcher(cfg, clock=lambda: clocks.wall, boottime=lambda: clocks.boot, log_stream=_ListStream([]))
    agent = spawn("sleeper")
    env = {**os.environ, "OTELWATCH_STATE_DIR": cfg.state_dir}

    def hook(event_type: str) -> None:
        subprocess.run([sys.executable, "-m", "otelwatch", "event", "claude-uuid-1", event_type,
                        "--pid", str(agent.pid), "--agent", "claude-code"], env=env, check=True, timeout=20,
                       cwd=str(REPO))

    try:
        hook("UserPromptSubmit")
        snap = w.tick()[0]
        assert (snap.session_id, snap.pid, snap.mode.value) == ("claude-uuid-1", agent.pid, "interactive")
        assert snap.state is State.ACTIVE
        hook("Stop")
        for _ in range(8):  # eight silent seconds, stall_after is 3
            clocks.advance(1)
            snap = w.tick()[0]
        assert (snap.state, snap.reason.value) == (State.IDLE, "no_open_turn")
    finally:
        w.stop()


def test_a_hung_tmux_server_is_counted_as_a_probe_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           tmux_server: Any) -> None:
    """A real tmux server, frozen with SIGSTOP: the tick goes on within the tmux timeout
    and the timeout reaches otelwatch_probe_timeouts_total{kind="tmux"}."""
    import signal
    import time

    from otelwatch.config import parse_config

    server = tmux_server
    monkeypatch.setenv("TMUX_TMPDIR", str(Path(server.sock).parent.parent))
    cfg = parse_config({"interval": 1, "probe_timeout": 0.5, "state_dir": str(tmp_path / "state"),
                        "sources": {"registry": {"enabled": False}, "processes": {"enabled": False},
                                    "transcripts": {"enabled": False}, "tmux": {"timeout": 0.5}}})
    w = Watcher(cfg, log_stream=_ListStream([]))
    pid = int(server.run("display-message", "-p", "#{pid}"))
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        w.tick()
        assert time.monotonic() - t0 < 3
        body = w.telemetry.prometheus_exposition()[0].decode()
        assert 'otelwatch_probe_timeouts_total{kind="tmux"} 1.0' in body
    finally:
        os.kill(pid, signal.SIGCONT)
        w.stop()


def test_a_failing_telemetry_call_is_counted_and_logged_never_raised(tmp_path: Path, spawn: Any) -> None:
    """Telemetry's meter provider is passed in, so the count is read through the public SDK."""
    import io
    import json

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otelwatch.telemetry import Telemetry

    class Broken(Telemetry):
        def on_transition(self, *args: Any) -> None:
            raise RuntimeError("exporter bug")

    reader = InMemoryMetricReader()
    stream = io.StringIO()
    cfg = _cfg(tmp_path)
    w = Watcher(cfg, telemetry=Broken(cfg, environ={}, log_stream=stream,
                                      meter_provider=MeterProvider(metric_readers=[reader])))
    try:
        w.track(spawn("sleeper").pid, "s1")
        assert w.tick()[0].state is State.ACTIVE  # the tick went on past the failure
        data = reader.get_metrics_data()
        assert data is not None
        errors = {dict(p.attributes or {}).get("kind"): p.value
                  for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                  if m.name == "otelwatch.probe.errors" for p in m.data.data_points}
        assert errors == {"telemetry": 1}
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [(r["call"], r["level"]) for r in lines if r["event"] == "telemetry.error"] == [
            ("on_transition", "error")]
    finally:
        w.stop()
