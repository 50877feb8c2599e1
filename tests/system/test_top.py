"""`otelwatch top`: the pure view (sorting, filtering, columns at 80x24, the drill-down
text) and the real thing in a real tmux pane against a real daemon watching real
fake agents: rows in severity order, a drill-down with a wait channel and a TCP
remote, and a clean terminal after q, Ctrl-C or an unreachable daemon."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from otelwatch.commands.top.data import History, Poll, matches, parse_metrics, sort_sessions
from otelwatch.commands.top.render import COLUMNS, View, layout, render_detail, render_list, row_cells, sparkline, wrap
from otelwatch.commands.top.screen import _handle_key
from tests.support.e2e_support import Daemon, start_daemon
from tests.support.procs import REPO, TcpServer, free_port, require_binary, wait_for


def _s(sid: str, state: str, reason: str = "r", **kw: Any) -> dict[str, Any]:
    return {"session_id": sid, "agent": kw.pop("agent", "claude-code"), "pid": 100, "state": state,
            "reason": reason, "silence_s": kw.pop("silence_s", 10.0), "cpu_percent": 0.0, "rss_bytes": 10 << 20,
            "tcp": {}, "children": [], "state_since": 1000.0, **kw}


def _text(lines: list[list[tuple[str, str]]]) -> list[str]:
    return ["".join(t for t, _ in line) for line in lines]


# --------------------------------------------------------------------------- pure


def test_severity_order_then_longest_silence() -> None:
    rows = [_s("a", "active"), _s("x", "exited"), _s("k", "stuck", silence_s=5), _s("k2", "stuck", silence_s=50),
            _s("i", "idle"), _s("st", "starting"), _s("l", "long_running"), _s("w", "stalled")]
    assert [r["session_id"] for r in sort_sessions(rows)] == ["k2", "k", "w", "l", "a", "i", "st", "x"]
    by_cpu = sort_sessions([_s("a", "active", cpu_percent=1.0), _s("b", "idle", cpu_percent=90.0)], "cpu")
    assert by_cpu[0]["session_id"] == "b"


def test_filter_terms() -> None:
    s = _s("job-7", "stalled", "waiting_on_network", agent="codex")
    assert matches(s, "") and matches(s, "codex") and matches(s, "state:stall") and matches(s, "agent:cod network")
    assert not matches(s, "state:stuck") and not matches(s, "agent:claude") and not matches(s, "codex idle")


def test_columns_fit_80_by_priority_and_all_show_when_wide() -> None:
    history = History()
    rows = [_s("a-rather-long-session-id-0123456789", "stalled", "waiting_on_network",
               runtime={"kind": "tmux", "target": "work:0.1"}, tcp={"ESTABLISHED": 1}, agent="claude-code")]
    history.update(rows, 1000.0)
    cells = [row_cells(r, history) for r in rows]
    narrow = [COLUMNS[i].name for i, _ in layout(cells, 80)]
    assert sum(w for _, w in layout(cells, 80)) + len(narrow) - 1 <= 80
    assert narrow == ["SESSION", "STATE/REASON", "SILENT", "CPU%", "TCP"] and "WHERE" not in narrow  # no names
    named = [row_cells({**rows[0], "name": "work-0b"}, history)]
    assert [COLUMNS[i].name for i, _ in layout(named, 80)] == ["SESSION", "NAME", "STATE/REASON", "SILENT"]
    assert dict(layout(cells, 80))[0] == len("a-rather-long-session-id-0123456789")  # the id is not cut
    wide = [COLUMNS[i].name for i, _ in layout(cells, 200)]
    assert wide == [c.name for c in COLUMNS]
    assert len(_text(render_list(View(url="http://x", interval=1, sessions=rows, poll=Poll(0.0, rows)),
                                 80, 24, 1000.0))) == 24
    for line in _text(render_list(View(url="http://x", interval=1, sessions=rows, poll=Poll(0.0, rows)),
                                  80, 24, 1000.0))[2:]:
        assert len(line) <= 80, line


def test_sparkline_and_history() -> None:
    assert sparkline([0, 50, 100, None], width=4) == "▁▅█ "
    assert sparkline([0, 100], width=4, unicode=False) == "  _#"
    h = History(points=3)
    h.update([_s("a", "active", cpu_percent=5.0)], 1000.0)
    h.update([_s("a", "stuck", "no_activity", cpu_percent=0.0)], 1002.0)
    h.update([_s("a", "stuck", "no_activity", cpu_percent=0.0)], 1004.0)
    assert list(h.cpu["a"]) == [5.0, 0.0, 0.0]
    assert list(h.transitions["a"]) == [(1000.0, None, "active/r"), (1002.0, "active/r", "stuck/no_activity")]
    h.update([], 1006.0)  # gone from the daemon's listing: forgotten
    assert "a" not in h.cpu


def test_detail_with_and_without_a_report() -> None:
    report = {"time": 1000.0, "state": "stalled", "reason": "waiting_on_network", "repeat": 1,
              "summary": "sleeping in ep_poll with 1 ESTABLISHED connection to 10.0.0.7:443",
              "root": {"status": "S", "wchan": "ep_poll", "cmdline": "claude -p"},
              "children": [{"pid": 101, "status": "S", "wchan": "pipe_read", "cmdline": "bash -c make",
                            "cpu_percent": 0.0}],
              "connections": ["ESTABLISHED 10.0.0.2:5000 -> 10.0.0.7:443"], "stderr_tail": "boom\n"}
    s = _s("s1", "stalled", "waiting_on_network", last_report=report,
           recoveries=[{"step": "requested", "action": "signal", "time": 1001.0, "reason": "no_activity"}])
    text = "\n".join(_text(render_detail(s, History(), 1010.0)))
    for want in ("ep_poll", "pipe_read", "10.0.0.7:443", "boom", "requested", "repeat 1"):
        assert want in text, want
    bare = "\n".join(_text(render_detail(_s("s2", "active", children=[
        {"pid": 7, "name": "sh", "status": "S", "cmdline": "sh", "cpu_percent": 0.0}]), History(), 1010.0)))
    assert "No report yet" in bare and "(no report yet)" in bare and "top never starts one" in bare
    assert "no longer listed" in _text(render_detail(None, History(), 0.0))[0]
    wrapped = wrap([[("x" * 25, "bold")]], 10)
    assert _text(wrapped) == ["x" * 10, "    " + "x" * 6, "    " + "x" * 6, "    " + "xxx"]


def test_cursor_stays_on_top_until_moved_then_follows_its_session() -> None:
    class NoPoller:
        paused = False

        def wake(self) -> None:
            pass

    rows = [_s("a", "active"), _s("b", "stuck")]
    view = View(url="http://x", interval=1, sessions=rows, poll=Poll(0.0, rows))
    render_list(view, 80, 24, 0.0)
    assert view.selected == "b"  # the most severe row
    view.sessions = [_s("a", "stuck", silence_s=99), _s("b", "stuck")]
    render_list(view, 80, 24, 0.0)
    assert view.selected == "a"  # not moved yet: still the top row
    _handle_key(view, "j", view.rows(), 10, NoPoller())  # type: ignore[arg-type]
    assert view.selected == "b" and view.pinned
    view.sessions = [_s("a", "idle"), _s("b", "stuck")]
    render_list(view, 80, 24, 0.0)
    assert view.selected == "b"  # moved: it follows its session
    _handle_key(view, "\n", view.rows(), 10, NoPoller())  # type: ignore[arg-type]
    assert view.detail == "b"
    assert _handle_key(view, "q", view.rows(), 10, NoPoller()) is False  # type: ignore[arg-type]


class _NoPoller:
    paused = False

    def wake(self) -> None:
        pass


def test_header_keeps_filter_and_paused_at_80_columns() -> None:
    rows = [_s(f"s{n}", state) for n, state in enumerate(
        ["stuck", "stalled", "long_running", "active", "idle", "starting", "exited"] * 3)]
    view = View(url="http://127.0.0.1:9464", interval=1, sessions=rows, poll=Poll(0.0, rows),
                filter="agent:claude state:st", paused=True)
    for width in (80, 60):
        lines = _text(render_list(view, width, 24, 1000.0))
        assert all(len(line) <= width for line in lines), lines
        assert "filter: agent:claude state:st" in lines[1] and "PAUSED" in lines[1], lines[1]
    wide = _text(render_list(view, 160, 24, 1000.0))[1]
    assert "3 stuck" in wide and "sort: severity" in wide and "PAUSED (p resumes)" in wide


def test_f_starts_a_fresh_filter_and_esc_keeps_the_old_one() -> None:
    rows = [_s("a", "active", agent="codex"), _s("b", "stuck", name="work-0b", cwd="/home/alice/app", user="alice")]
    view = View(url="http://x", interval=1, sessions=rows, poll=Poll(0.0, rows))
    for key in ("f", *"codex", "\n"):
        _handle_key(view, key, view.rows(), 10, _NoPoller())  # type: ignore[arg-type]
    assert view.filter == "codex" and [r["session_id"] for r in view.rows()] == ["a"]
    _handle_key(view, "/", view.rows(), 10, _NoPoller())  # type: ignore[arg-type]
    assert view.editing == ""  # cleared, not the old text to append to
    assert "(was: codex)" in "".join(t for t, _ in render_list(view, 120, 10, 0.0)[1])
    for key in ("w", "o", "r", "k"):
        _handle_key(view, key, view.rows(), 10, _NoPoller())  # type: ignore[arg-type]
    _handle_key(view, "\x1b", view.rows(), 10, _NoPoller())  # type: ignore[arg-type]
    assert view.filter == "codex" and view.editing is None  # Esc: the old filter stays
    for key in ("f", *"work-0b", "\n"):
        _handle_key(view, key, view.rows(), 10, _NoPoller())
    assert view.filter == "work-0b" and [r["session_id"] for r in view.rows()] == ["b"]  # names match
    assert matches(rows[1], "user:alice") and matches(rows[1], "/home/alice") and not matches(rows[0], "user:alice")


def test_names_and_the_attach_command_in_list_and_drilldown() -> None:
    attach = "tmux -S /tmp/tmux-1000/default attach -t work:0.1"
    s = _s("claude-code-20892-1796609719", "stalled", "waiting_on_network", name="work-0b", user="alice",
           cwd="/home/alice/src/app", runtime={"kind": "tmux", "target": "work:0.1", "attach": attach})
    history = History()
    history.update([s], 1000.0)
    cells = row_cells(s, history)
    assert cells[COLUMNS.index(next(c for c in COLUMNS if c.name == "NAME"))] == "work-0b"
    text = "\n".join(_text(render_detail(s, history, 1010.0)))
    assert 'name "work-0b"' in text and "user alice" in text and "dir /home/alice/src/app" in text
    assert f"attach: {attach}" in text
    # Without an attach command (another user's server, or an older daemon): the pane itself.
    plain = {**s, "runtime": {"kind": "tmux", "target": "work:0.1"}, "name": None}
    text = "\n".join(_text(render_detail(plain, history, 1010.0)))
    assert "pane: tmux work:0.1" in text and "no name of its own" in text
    # Nothing a process wrote reaches the terminal as an escape sequence.
    evil = _s("x\x1b[2J", "active", name="\x1b]0;pwned\x07")
    assert all("\x1b" not in cell for cell in row_cells(evil, history))
    assert "\x1b" not in "".join(_text(render_detail(evil, history, 1010.0)))


def test_parse_metrics_sums_over_labels() -> None:
    text = ('otelwatch_probe_timeouts_total{kind="proc"} 2.0\notelwatch_probe_timeouts_total{kind="tmux"} 1.0\n'
            "otelwatch_collector_tick_duration_seconds_sum 0.5\notelwatch_collector_tick_duration_seconds_count 10\n"
            "# HELP x\n")
    assert parse_metrics(text) == {"probe_timeouts": 3.0, "tick_sum": 0.5, "tick_count": 10.0}


# --------------------------------------------------------------------------- tmux, end to end


class Pane:
    """A real tmux server on a private socket with one 80x24 pane running a shell."""

    def __init__(self, tmux: str, base: str) -> None:
        self.tmux, self.sock = tmux, os.path.join(base, "s")
        self.run("-f", "/dev/null", "new-session", "-d", "-x", "80", "-y", "24", "-c", str(REPO), self.SHELL)
        self.wait(lambda text: "owt$" in text)

    SHELL = "env PS1='owt$ ' sh"

    def fresh(self) -> Pane:
        """A new shell in the pane (whatever an earlier test left running is killed)."""
        self.run("respawn-pane", "-k", "-t", "0", "-c", str(REPO), self.SHELL)
        self.wait(lambda text: "owt$" in text)
        return self

    def run(self, *args: str) -> str:
        env = {**os.environ, "TERM": "xterm-256color", "LANG": "C.UTF-8"}
        env.pop("NO_COLOR", None)
        out = subprocess.run([self.tmux, "-u", "-S", self.sock, *args], capture_output=True, timeout=10,
                             check=True, env=env)
        return out.stdout.decode()

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "0", *keys)

    def screen(self, escapes: bool = False) -> str:
        return self.run("capture-pane", "-p", "-t", "0", *(["-e"] if escapes else []))

    def alternate(self) -> bool:
        return self.run("display-message", "-p", "-t", "0", "#{alternate_on}").strip() == "1"

    def wait(self, check: Callable[[str], object], timeout: float = 10.0) -> str:
        last = [""]

        def ok() -> object:
            last[0] = self.screen()
            return check(last[0])

        try:
            wait_for(ok, timeout=timeout, interval=0.1)
        except AssertionError:
            raise AssertionError(f"pane never showed what was expected; it shows:\n{last[0]}") from None
        return last[0]

    def exit_code(self) -> str:
        """After top exits: the shell is back and printed top's exit code (see `_top`)."""
        return self.wait(lambda t: "top-exit-" in t and t.rstrip().endswith("owt$"), timeout=5)

    def close(self) -> None:
        subprocess.run([self.tmux, "-S", self.sock, "kill-server"], capture_output=True, timeout=10, check=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, TcpServer, Pane]]:
    tmux = require_binary("tmux")
    server = TcpServer("127.0.0.1")
    daemon = start_daemon(tmp_path_factory.mktemp("top"),
                          {"classify": {"startup_grace": 0.5, "stall_after": 2}})
    base = tempfile.mkdtemp(prefix="owt-top-")  # short: unix socket paths are limited
    pane = None
    try:
        for sid, kind, extra in (("t-hung", "hung", ()), ("t-socket", "socket", ("--port", str(server.port))),
                                 ("t-active", "active", ("--period", "0.3"))):
            proc, events = daemon.agent(kind, *extra)
            daemon.register(sid, proc.pid, agent=f"fake-{kind}", events_path=str(events))
        pane = Pane(tmux, base)
        yield daemon, server, pane
    finally:
        if pane is not None:
            pane.close()
        daemon.cleanup()
        server.close()
        shutil.rmtree(base, ignore_errors=True)


def _top(pane: Pane, url: str, env: str = "") -> None:
    pane.keys(f"clear; {env}{sys.executable} -m otelwatch top --url {url} --interval 0.5; echo top-exit-$?", "Enter")


def _sgr_params(screen: str) -> set[int]:
    """Every attribute the pane's escapes set: tmux merges them as it likes ("\x1b[0;7m", "\x1b[1;31m")."""
    return {int(p) for group in re.findall(r"\x1b\[([0-9;]*)m", screen) for p in group.split(";") if p}


@pytest.mark.e2e
def test_top_rows_drilldown_and_clean_exit(world: tuple[Daemon, TcpServer, Pane]) -> None:
    daemon, server, pane = world
    pane.fresh()
    daemon.wait_state("t-hung", "stuck", timeout=12)
    sock = daemon.wait_state("t-socket", "stalled", "waiting_on_network", timeout=12)
    wait_for(lambda: (daemon.session("t-socket") or {}).get("last_report"), timeout=5)
    report = daemon.session("t-socket")["last_report"]  # type: ignore[index]
    assert sock["tcp"] == {"ESTABLISHED": 1} and report["connections"] and report["root"]["wchan"]

    _top(pane, daemon.url)
    screen = pane.wait(lambda t: "t-hung" in t and "t-socket" in t and "t-active" in t and "last tick" in t)
    assert pane.alternate()
    rows = [line for line in screen.splitlines() if line.startswith("t-")]
    assert [r.split()[0] for r in rows] == ["t-hung", "t-socket", "t-active"], screen  # severity order
    assert "stuck/no_activity" in rows[0] and "stalled/waiting_on_network" in rows[1] and "active/" in rows[2]
    assert "1EST" in rows[1]
    assert all(len(line) <= 80 for line in screen.splitlines())
    assert 31 in _sgr_params(pane.screen(escapes=True))  # stuck is red where colours work

    pane.keys("j", "Enter")  # second row: the session asleep on a socket
    detail = pane.wait(lambda t: "PROCESSES" in t and "TCP REMOTES" in t)
    assert "t-socket" in detail and report["root"]["wchan"] in detail, detail
    assert f"127.0.0.1:{server.port}" in detail, detail  # the remote it waits on

    pane.keys("Escape")
    pane.wait(lambda t: "STATE/REASON" in t)
    pane.keys("/")
    pane.keys("-l", "hung")
    pane.keys("Enter")
    filtered = pane.wait(lambda t: "filter: hung" in t)
    assert "t-hung" in filtered and "t-socket" not in filtered

    pane.keys("q")
    after = pane.exit_code()
    assert not pane.alternate() and "top-exit-0" in after and "STATE/REASON" not in after


@pytest.mark.e2e
def test_top_without_colours_and_ctrl_c_restores_the_terminal(world: tuple[Daemon, TcpServer, Pane]) -> None:
    daemon, _, pane = world
    _top(pane.fresh(), daemon.url, env="NO_COLOR=1 ")
    pane.wait(lambda t: "t-hung" in t)
    coloured = pane.screen(escapes=True)
    # Reverse video marks the selection, bold the severe states; no state colour anywhere
    # (tmux writes the default pair as 37/40).
    params = _sgr_params(coloured)
    assert 7 in params and not params & set(range(31, 37)), coloured
    pane.keys("C-c")
    after = pane.exit_code()
    assert not pane.alternate() and "top-exit-0" in after and "Traceback" not in after


@pytest.mark.e2e
def test_top_against_an_unreachable_daemon_says_so_and_keeps_trying(world: tuple[Daemon, TcpServer, Pane]) -> None:
    _, _, pane = world
    _top(pane.fresh(), f"http://127.0.0.1:{free_port()}")
    screen = pane.wait(lambda t: "daemon unreachable" in t)
    assert "retrying every 0.5s" in screen and "never reached" in screen
    time.sleep(0.6)  # a retry later it is still up and saying so
    assert "daemon unreachable" in pane.screen()
    pane.keys("q")
    after = pane.exit_code()
    assert not pane.alternate() and "top-exit-0" in after


def test_top_refuses_a_pipe_with_a_clear_message() -> None:
    out = subprocess.run([sys.executable, "-m", "otelwatch", "top", "--url", "http://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=20, cwd=str(REPO), stdin=subprocess.DEVNULL)
    assert out.returncode == 1 and "needs a terminal" in out.stderr and "status --watch" in out.stderr



