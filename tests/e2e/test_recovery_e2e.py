"""Recovery end to end: the real daemon, recovery enabled (not a dry run), short
thresholds. The hung agents must be recovered; every working agent in the same
run must survive. A false kill is the worst bug this project can have."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.e2e_support import start_daemon
from tests.support.procs import TcpServer, wait_for

pytestmark = pytest.mark.e2e


def test_recovers_the_hung_and_spares_the_working(tmp_path: Path) -> None:
    server = TcpServer("127.0.0.1")
    daemon = start_daemon(tmp_path, {"recovery": {"enabled": True, "recover_after": 2, "grace": 0.5,
                                                  "max_per_hour": 10}})
    try:
        must_die = {}
        must_live = {}
        for sid, kind, extra, mode in (
            ("hung", "hung", (), "headless"),
            ("deaf", "ignore-term", (), "headless"),  # ignores SIGTERM: needs SIGKILL
        ):
            proc, events = daemon.agent(kind, *extra, events=(kind == "hung"))
            fields = {"events_path": str(events)} if kind == "hung" else {}
            daemon.register(sid, proc.pid, mode=mode, **fields)
            must_die[sid] = proc
        for sid, kind, extra, mode in (
            ("spin", "spin", (), "headless"),
            ("socket", "socket", ("--port", str(server.port)), "headless"),
            ("tool", "tool", ("--tool-child", "sleeper"), "headless"),
            ("idle", "idle", (), "interactive"),
            ("active", "active", ("--period", "0.3"), "headless"),
        ):
            proc, events = daemon.agent(kind, *extra)
            daemon.register(sid, proc.pid, events_path=str(events), mode=mode)
            must_live[sid] = proc

        def completed(sid: str) -> dict | None:
            snap = daemon.session(sid)
            done = [r for r in (snap or {}).get("recoveries", []) if r["step"] == "completed"]
            return done[-1] if done else None

        assert wait_for(lambda: completed("hung"), timeout=25)["status"] == "terminated"  # type: ignore[index]
        assert wait_for(lambda: completed("deaf"), timeout=25)["status"] == "killed"  # type: ignore[index]
        for proc in must_die.values():
            wait_for(lambda p=proc: p.poll() is not None, timeout=5)
        steps = [r["step"] for r in daemon.session("deaf")["recoveries"]]
        assert steps[0] == "requested" and "sigterm" in steps and "sigkill" in steps and steps[-1] == "completed"
        daemon.wait_state("hung", "exited", timeout=5)

        # The working agents were watched through the same windows and are untouched.
        for sid, proc in must_live.items():
            assert proc.poll() is None, f"{sid} was killed"
            assert daemon.session(sid)["recoveries"] == [], sid
        assert 'otelwatch_recovery_completed_total{action="signal",agent="unknown",status="killed"} 1.0' \
            in daemon.metrics()
    finally:
        daemon.cleanup()
        server.close()
