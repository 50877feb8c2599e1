"""One person's view on a shared host (issue #20): owners in /api/sessions, `?user=`, own
sessions first, unknown numbers shown as `?`, and short-lived helpers that never become rows."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otelwatch.commands.status import format_table, own_first, sessions_path
from otelwatch.config import parse_config
from otelwatch.daemon import Watcher
from tests.support.e2e_support import http_get, start_daemon
from tests.support.procs import wait_for


def test_unknown_numbers_show_as_question_marks_never_zero() -> None:
    now = time.time()
    live = {"session_id": "blind", "agent": "claude-code", "pid": 1, "state": "stalled", "reason": "access_denied",
            "state_since": now, "silence_s": 9, "cpu_percent": 3.0, "rss_bytes": 1 << 20, "tcp": None,
            "open_fds": None}
    gone = {**live, "session_id": "gone", "state": "exited", "reason": "process_exited"}
    seen = {**live, "session_id": "seen", "state": "active", "tcp": {}, "open_fds": 7}
    lines = format_table([live, gone, seen], now).splitlines()
    header = lines[0].split()
    tcp, fds = header.index("TCP"), header.index("FDS")
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert [rows["blind"][tcp], rows["blind"][fds]] == ["?", "?"]
    assert [rows["gone"][tcp], rows["gone"][fds]] == ["-", "-"]
    assert [rows["seen"][tcp], rows["seen"][fds]] == ["0", "7"]


def test_own_sessions_first_for_a_non_root_caller() -> None:
    sessions = [{"session_id": "a", "uid": 0}, {"session_id": "b", "uid": 1000}, {"session_id": "c", "uid": 1001}]
    assert [s["session_id"] for s in own_first(sessions, uid=1000)] == ["b", "a", "c"]
    assert [s["session_id"] for s in own_first(sessions, uid=0)] == ["a", "b", "c"]  # root: all alike
    assert sessions_path(None) == "/api/sessions"
    assert sessions_path("al ice") == "/api/sessions?user=al+ice"


@pytest.mark.e2e
def test_api_sessions_names_owners_and_filters_by_user(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d")
    try:
        proc, events = daemon.agent("active", "--period", "0.3")
        daemon.register("mine", proc.pid, agent="fake", events_path=str(events))
        snap = wait_for(lambda: daemon.session("mine"), timeout=10, interval=0.2)
        assert snap["user"] == "root" and snap["uid"] == 0  # type: ignore[index]
        for query, n in (("root", 1), ("0", 1), ("hsvc-nobody", 0)):
            status, body = http_get(f"{daemon.url}/api/sessions?user={query}")
            assert status == 200
            assert [s["session_id"] for s in json.loads(body) if s["session_id"] == "mine"] == ["mine"] * n
        out = subprocess.run([sys.executable, "-m", "otelwatch", "status", "--url", daemon.url, "--user",
                              "hsvc-nobody"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "mine" not in out.stdout and "(no sessions)" in out.stdout
        out = subprocess.run([sys.executable, "-m", "otelwatch", "status", "--url", daemon.url, "--user", "root"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "mine" in out.stdout
    finally:
        daemon.cleanup()


def test_helpers_that_live_less_than_startup_grace_never_become_rows(tmp_path: Path) -> None:
    mark = f"hsvc-helper-{tmp_path.name}"
    cfg = parse_config({"interval": 0.2, "probe_timeout": 0.2, "state_dir": str(tmp_path / "state"),
                        "classify": {"startup_grace": 3, "stall_after": 30},
                        "sources": {"registry": {"enabled": False}, "transcripts": {"enabled": False},
                                    "tmux": {"enabled": False},
                                    "processes": {"match": [f"cmdline:^{re.escape(sys.executable)} -c .*{mark}"]}}})
    log = io.StringIO()
    w = Watcher(cfg, log_stream=log)

    def orphan(seconds: float, name: str) -> int:
        """A process that is not the test's child (discovery skips otelwatch's own descendants)."""
        out = subprocess.run(["sh", "-c", f'{sys.executable} -c "import time; time.sleep({seconds})" {mark} {name} '
                              '>/dev/null 2>&1 & echo $!'], capture_output=True, text=True, timeout=10, check=True)
        return int(out.stdout.strip())

    try:
        short, long = orphan(0.8, "short"), orphan(5, "long")
        seen_short = False
        deadline = time.monotonic() + 20
        ended = None
        while time.monotonic() < deadline and ended is None:
            w.tick()
            seen_short = seen_short or any(s.pid == short for s in w.sessions())
            ended = next((s for s in w.sessions() if s.pid == long and s.state.value == "exited"), None)
            time.sleep(0.2)
        assert ended is not None, [(s.pid, s.state.value) for s in w.sessions()]
        assert seen_short  # it was tracked while it lived (starting) ...
        assert not any(s.pid == short for s in w.sessions())  # ... and left no exited row
        summaries = [json.loads(line) for line in log.getvalue().splitlines() if '"session_summary"' in line
                     or '"session.end"' in line]
        assert [s.get("pid") for s in summaries] == [long]  # no summary line for the helper
        assert summaries[0]["duration_s"] >= 4.5  # from the process's start, not from first sight
    finally:
        w.stop()
