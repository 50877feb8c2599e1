"""`otelwatch status --watch`: redrawn in place on a terminal (a real pty), appended as
plain text into a pipe; a daemon lost after it answered is shown and retried."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from otelwatch.commands.status import LiveScreen, clip, use_color
from tests.support.procs import REPO, free_port
from tests.support.pty_support import read_pty

SESSION = {"session_id": "s1", "agent": "claude-code", "pid": 42, "state": "stuck", "reason": "no_activity",
           "state_since": time.time() - 60, "silence_s": 70.0, "cpu_percent": 0.0, "rss_bytes": 1 << 20,
           "tcp": {}, "open_fds": 5}


class FakeApi:
    """A real loopback server answering /api/sessions like the daemon (the shape is the contract)."""

    def __init__(self, sessions: list[dict[str, Any]] | None = None) -> None:
        listing = json.dumps([SESSION] if sessions is None else sessions).encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = listing
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.up = True

    def close(self) -> None:
        if self.up:
            self.up = False
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def api() -> Iterator[FakeApi]:
    a = FakeApi()
    try:
        yield a
    finally:
        a.close()


def _status(url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "otelwatch", "status", "--url", url, "--watch", "--interval", "0.2", *extra]


def test_pipe_gets_plain_frames_appended(api: FakeApi) -> None:
    env = {**os.environ}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(_status(api.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO), env=env)
    try:
        out = b""
        deadline = time.monotonic() + 10
        while out.count(b"SESSION") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                out += os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
        api.close()  # the daemon goes away: the pipe gets a message on stderr, the command keeps going
        time.sleep(0.5)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert out.count(b"SESSION") >= 3 and b"\x1b" not in out  # no escapes, no colours, each frame kept
    assert b"stuck" in out and b"cannot reach the daemon" in err and b"retrying" in err


def test_terminal_gets_frames_in_place(api: FakeApi) -> None:
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "100", "LINES": "30"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(_status(api.url), stdin=slave, stdout=slave, stderr=slave, cwd=str(REPO), env=env,
                            start_new_session=True)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 10
        while out.count(b"SESSION") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                out += os.read(master, 65536)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        out += read_pty(master, timeout=2, poll=0.1, until_quiet=True)
        os.close(master)
    assert proc.returncode == 0
    assert out.count(b"\x1b[2J") == 1  # the screen is cleared once, then every frame overwrites in place
    assert out.count(b"\x1b[H") >= 3 and b"\x1b[J" in out
    assert b"\x1b[31;1m" in out  # stuck in red on a terminal
    assert out.rstrip().endswith(b"\x1b[?25h") or b"\x1b[?25h" in out[-200:]  # cursor shown again


def test_unreachable_daemon_is_an_error_when_never_reached() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run(_status(url), capture_output=True, text=True, timeout=20, cwd=str(REPO))
    assert out.returncode == 1 and "cannot reach the daemon" in out.stderr


def test_live_screen_clips_to_the_window_and_keeps_colours_closed() -> None:
    buf = io.StringIO()
    screen = LiveScreen(buf, tty=True, size=lambda: os.terminal_size((20, 5)))
    with screen:
        screen.show("\n".join(f"\x1b[31mline {n} " + "x" * 30 + "\x1b[0m" for n in range(10)))
        screen.show("short")
    text = buf.getvalue()
    first = text.split("\x1b[H")[1]
    assert "more lines" in first and "line 2" in first and "line 3" not in first  # 5 rows: 3 lines + notice
    assert all(len(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line)) <= 19 for line in first.split("\n"))
    assert text.endswith("\x1b[?25h") and text.count("\x1b[2J") == 1
    assert clip("\x1b[31mhello world\x1b[0m", 5) == "\x1b[31mhello\x1b[0m"
    plain = io.StringIO()
    LiveScreen(plain, tty=False).show("a\nb")
    assert plain.getvalue() == "a\nb\n"


def test_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert use_color(Tty()) and not use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(Tty())





# --------------------------------------------------------------------------- order, pipes, width


def _row(sid: str, state: str, reason: str, silence: float, **kw: Any) -> dict[str, Any]:
    return {**SESSION, "session_id": sid, "state": state, "reason": reason, "silence_s": silence, **kw}


MIXED = [_row("e-1", "exited", "process_exited", 0), _row("a-1", "active", "recent_progress", 1),
         _row("s-short", "stalled", "waiting_on_network", 30), _row("k-1", "stuck", "no_activity", 90),
         _row("s-long", "stalled", "cpu_spin", 300), _row("i-1", "idle", "no_open_turn", 500),
         _row("l-1", "long_running", "tool_running", 50)]


def test_status_and_watch_are_sorted_by_severity_like_top() -> None:
    from otelwatch.commands.top.data import sort_sessions

    api = FakeApi(MIXED)
    try:
        plain = subprocess.run([sys.executable, "-m", "otelwatch", "status", "--url", api.url],
                               capture_output=True, text=True, timeout=30, cwd=str(REPO))
        watch = subprocess.Popen(_status(api.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
        try:
            first = b""
            deadline = time.monotonic() + 15
            while first.count(b"\n") < len(MIXED) + 1 and time.monotonic() < deadline:
                ready, _, _ = select.select([watch.stdout], [], [], 0.5)
                if ready:
                    first += os.read(watch.stdout.fileno(), 65536)  # type: ignore[union-attr]
        finally:
            watch.send_signal(signal.SIGINT)
            watch.communicate(timeout=10)
    finally:
        api.close()
    want = [s["session_id"] for s in sort_sessions(MIXED)]
    assert want[:4] == ["k-1", "s-long", "s-short", "l-1"] and want[-1] == "e-1"
    for text in (plain.stdout, first.decode()):
        ids = [line.split()[0] for line in text.splitlines()[1:len(MIXED) + 1]]
        assert ids == want, text


def test_status_into_a_closed_pipe_ends_quietly() -> None:
    many = [_row(f"session-{n:05d}-{'x' * 40}", "active", "recent_progress", n) for n in range(3000)]
    api = FakeApi(many)
    try:
        for extra in ("", "--watch --interval 0.2"):
            cmd = f"{sys.executable} -m otelwatch status --url {api.url} {extra} | head -n 3"
            out = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}; echo rc=$?"],
                                 capture_output=True, text=True, timeout=60, cwd=str(REPO))
            assert len(out.stdout.splitlines()) == 4 and out.stdout.splitlines()[0].startswith("SESSION")
            assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
            assert out.stdout.rstrip().endswith("rc=0"), out.stdout[-200:]
    finally:
        api.close()


def test_columns_give_way_by_priority_at_80() -> None:
    from otelwatch.commands.status import COLUMNS, format_table

    rows = [_row("claude-code-20892-1796609719", "long_running", "tool_call_without_progress", 75,
                 name="work-0b", user="alice", cwd="/home/alice/src/app", tcp={"ESTABLISHED": 1}),
            *MIXED]
    wide = format_table(rows, time.time(), width=None)
    assert wide.splitlines()[0].split() == list(COLUMNS)
    for width in (80, 100, 120):
        text = format_table(rows, time.time(), width=width)
        header = text.splitlines()[0].split()
        assert all(len(line) <= width for line in text.splitlines()), text
        assert header[:1] == ["SESSION"] and "STATE" in header and "REASON" in header and "SILENCE" in header
        assert "claude-code-20892-1796609719" in text  # never cut
        assert "FDS" not in header or "SILENCE" in header  # SILENCE stays longer than FDS
    assert format_table(rows, time.time(), width=80).splitlines()[0].split() == [
        "SESSION", "STATE", "REASON", "SILENCE"]
    assert format_table(rows, time.time(), width=100).splitlines()[0].split() == [
        "SESSION", "NAME", "STATE", "REASON", "SILENCE", "CPU%", "TCP"]
    # Nobody has a name: that empty column gives way first (CPU%, TCP and FOR show instead).
    nameless = format_table(MIXED, time.time(), width=80).splitlines()[0].split()
    assert "NAME" not in nameless and {"SILENCE", "CPU%"} <= set(nameless), nameless
    assert "NAME" in format_table(MIXED, time.time(), width=None).splitlines()[0].split()
    # Too narrow even for the essentials: they stay whole (the terminal wraps), nothing else shows.
    assert format_table(rows, time.time(), width=10).splitlines()[0].split() == ["SESSION", "STATE", "REASON"]


def test_status_on_an_80_column_terminal_fits_it() -> None:
    api = FakeApi([_row("claude-code-20892-1796609719", "stalled", "tool_call_without_progress", 75,
                        name="work-0b", user="alice", cwd="/home/alice/src/app"), *MIXED])
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "80", "LINES": "24", "NO_COLOR": "1"}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "otelwatch", "status", "--url", api.url], stdin=slave,
                                stdout=slave, stderr=slave, cwd=str(REPO), env=env, start_new_session=True)
        os.close(slave)
        out = read_pty(master, proc, timeout=20, poll=0.5)
        proc.wait(timeout=10)
    finally:
        os.close(master)
        api.close()
    lines = out.decode().replace("\r", "").splitlines()
    assert lines[0].split() == ["SESSION", "STATE", "REASON", "SILENCE"], lines  # all that fits 80
    assert all(len(line) <= 80 for line in lines), lines
    assert any(line.startswith("claude-code-20892-1796609719 ") for line in lines)
