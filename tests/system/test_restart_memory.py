"""Memory across restarts and pauses (issue #20): the real `otelwatch run`, real fake agents.

A restarted daemon (SIGTERM, then a new one on the same state directory) and a
paused one (SIGSTOP for longer than a late tick, then SIGCONT, as a laptop sleeps)
must never show `active/recent_progress` for a session that had no progress: a
stalled session stays stalled with its true silence (counted from its last
progress, across the gap), a hung headless session is never active, and the
session's duration counts from its process's start.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otelwatch.classify.lateness import LATE_TICK_MIN_S
from tests.support.e2e_support import Daemon, start_daemon
from tests.support.procs import TcpServer, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

STALL_AFTER = 3.0
EXTRA = {"classify": {"stall_after": STALL_AFTER, "startup_grace": 1}}


@pytest.fixture()
def agents(tmp_path: Path) -> Iterator[tuple[Daemon, TcpServer, dict[str, int]]]:
    server = TcpServer("127.0.0.1")
    daemon = start_daemon(tmp_path / "d1", EXTRA)
    pids: dict[str, int] = {}
    try:
        for sid, kind in (("r-socket", "socket"), ("r-hung", "hung")):
            proc, events = daemon.agent(kind, "--port", str(server.port))
            daemon.register(sid, proc.pid, agent=f"fake-{kind}", events_path=str(events), mode="headless")
            pids[sid] = proc.pid
        yield daemon, server, pids
    finally:
        daemon.cleanup()
        server.close()


def _never_active(daemon: Daemon, sids: tuple[str, ...], seconds: float) -> list[dict[str, Any]]:
    """Every listing for `seconds`: none of `sids` active. Returns the last listing of each."""
    last: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for s in daemon.sessions():
            if s["session_id"] in sids:
                assert (s["state"], s["reason"]) != ("active", "recent_progress"), s
                last[s["session_id"]] = s
        time.sleep(0.2)
    assert set(last) == set(sids), last
    return [last[sid] for sid in sids]


def test_a_restarted_daemon_keeps_stalled_sessions_stalled_with_their_true_silence(
        agents: tuple[Daemon, TcpServer, dict[str, int]], tmp_path: Path) -> None:
    daemon, _, _ = agents
    before = daemon.wait_state("r-socket", "stalled", "waiting_on_network", timeout=15)
    daemon.wait_state("r-hung", "stuck", "no_activity", timeout=15)
    silence_before = before["silence_s"]
    daemon.stop()
    saved = json.loads((daemon.state_dir / "sessions.json").read_text())
    assert {e["key"] for e in saved["sessions"]} >= {"r-socket", "r-hung"}
    assert os.stat(daemon.state_dir / "sessions.json").st_mode & 0o077 == 0
    time.sleep(1.0)  # the gap a restart takes

    # Same config, same state directory and registry: a restart.
    again = Daemon(*_restart(daemon))
    try:
        sock, hung = _never_active(again, ("r-socket", "r-hung"), STALL_AFTER + 1.5)
        assert (sock["state"], sock["reason"]) == ("stalled", "waiting_on_network")
        # The true silence: at least what it was plus the gap, not counted from the restart.
        assert sock["silence_s"] >= silence_before + 1.0, sock
        assert hung["state"] in ("stalled", "stuck") and hung["silence_s"] >= STALL_AFTER, hung
        # Durations count from the process's start: its create_time, not the restart.
        assert sock["started_at"] == pytest.approx(sock["create_time"], abs=0.01)
        assert any(e.get("event") == "memory_loaded" or e.get("event") == "memory.loaded"
                   for e in again.log_events()), again.log_tail()
    finally:
        again.stop()


def test_a_paused_daemon_resumes_without_resetting_silence(
        agents: tuple[Daemon, TcpServer, dict[str, int]]) -> None:
    daemon, _, _ = agents
    daemon.wait_state("r-socket", "stalled", "waiting_on_network", timeout=15)
    daemon.wait_state("r-hung", "stuck", "no_activity", timeout=15)
    paused = LATE_TICK_MIN_S + 2.0  # longer than any late-tick floor: the windows restart
    t_stop = time.time()
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(paused)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    # The first listing after the pause may still be the snapshot made before it: wait
    # for a tick after it, then check every listing for a while.
    wait_for(lambda: (s := daemon.session("r-socket")) and s["silence_s"] > paused, timeout=10, interval=0.2)
    sock, hung = _never_active(daemon, ("r-socket", "r-hung"), STALL_AFTER + 1.5)
    assert (sock["state"], sock["reason"]) == ("stalled", "waiting_on_network"), sock
    assert sock["silence_s"] >= time.time() - t_stop - 0.5
    assert hung["state"] in ("stalled", "stuck"), hung
    assert any(e.get("event") in ("tick_late", "tick.late") for e in daemon.log_events()), daemon.log_tail()


def _restart(old: Daemon) -> tuple[Any, ...]:
    """A new `otelwatch run` with the old one's config file, state directory and registry."""
    import subprocess
    import sys

    from tests.support.e2e_support import http_get
    from tests.support.procs import REPO

    log_path = old.log_path.with_name("daemon2.log")
    env = {**os.environ, "OTELWATCH_STATE_DIR": str(old.state_dir)}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "otelwatch", "run", "--config", str(old.config_path)],
                                cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, env=env)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"restarted daemon exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            return http_get(old.url + "/healthz", timeout=1)[0] == 200
        except OSError:
            return False

    wait_for(up, timeout=15, interval=0.1)
    return proc, old.url, old.state_dir, old.registry, old.config_path, log_path
