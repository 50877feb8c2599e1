"""TmuxSource against a real tmux server on a private socket (always killed at teardown)."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otelwatch.probe.proctable import ProcessTableReader
from otelwatch.sources.tmux import TmuxSource, default_sockets
from tests.support.procs import require_binary, wait_for
from tests.support.tmux_support import AGENT, Server


@pytest.fixture
def server(tmux_server: Server) -> Server:
    """The shared real tmux server (conftest.py, tmux_support.py)."""
    return tmux_server


def agent_in(pane_pid: int, word: str = "fake-agent") -> int:
    """PID of the fake agent under the pane's shell, once it runs."""
    def find() -> int | None:
        table = ProcessTableReader().read()
        for pid in table.descendants(pane_pid):
            if word in table.cmdline(pid):
                return pid
        return None
    return int(wait_for(find))  # type: ignore[arg-type]


def test_discovers_server_and_maps_agent_to_pane(server: Server) -> None:
    base = str(Path(server.sock).parent.parent)
    assert default_sockets(environ={"TMUX_TMPDIR": base}) == [server.sock]
    pane_pid = int(server.run("display-message", "-p", "-t", "w:0.0", "#{pane_pid}"))
    agent = agent_in(pane_pid)
    src = TmuxSource(timeout=5.0, sockets=[server.sock])
    panes = src.scan(ProcessTableReader().read(), [agent, 999_999_999])
    assert len(panes) == 1
    pane = panes[0]
    assert (pane.target, pane.pane_pid, pane.agent_pid, pane.socket) == ("w:0.0", pane_pid, agent, server.sock)
    assert not pane.agent_gone and not pane.pane_dead
    assert src.pane_of(agent) == pane and src.pane_alive("w:0.0")


def test_pane_outlives_its_agent(server: Server) -> None:
    pane_pid = int(server.run("display-message", "-p", "-t", "w:0.0", "#{pane_pid}"))
    agent = agent_in(pane_pid)
    src = TmuxSource(timeout=5.0, sockets=[server.sock])
    src.scan(ProcessTableReader().read(), [agent])
    os.kill(agent, signal.SIGKILL)
    wait_for(lambda: agent not in ProcessTableReader().read())
    panes = src.scan(ProcessTableReader().read(), [])
    assert len(panes) == 1
    pane = panes[0]
    assert pane.agent_pid is None and pane.last_agent_pid == agent and pane.agent_gone
    # This is what lets the daemon say runtime_alive_process_dead for the old session.
    assert src.pane_alive("w:0.0", server.sock) and src.pane_of(agent) == pane

    server.run("kill-pane", "-t", "w:0.0")  # last pane: the server goes away with it
    assert src.scan(ProcessTableReader().read(), []) == []
    assert not src.pane_alive("w:0.0") and src.pane_of(agent) is None


def test_hung_server_times_out_without_stalling(server: Server) -> None:
    pid = int(server.run("display-message", "-p", "#{pid}"))
    os.kill(pid, signal.SIGSTOP)
    try:
        src = TmuxSource(timeout=0.5, sockets=[server.sock])
        start = time.monotonic()
        assert src.scan(ProcessTableReader().read(), []) == []
        assert time.monotonic() - start < 3.0
        assert src.timeouts == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    assert len(src.scan(ProcessTableReader().read(), [])) == 1


def test_stale_socket_and_missing_binary_are_quiet(tmp_path: Path) -> None:
    require_binary("tmux")
    import socket

    stale = tmp_path / "stale"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: a server that died
    src = TmuxSource(timeout=2.0, sockets=[str(stale)])
    assert src.scan(ProcessTableReader().read(), []) == [] and src.errors == 0 and src.timeouts == 0
    missing = TmuxSource(tmux=str(tmp_path / "no-tmux"), sockets=[str(stale)])
    assert missing.scan(ProcessTableReader().read(), []) == [] and not missing.available


@pytest.fixture
def two_servers() -> Iterator[tuple[Server, Server]]:
    """Two private tmux servers laid out like tmux's default directory ($TMUX_TMPDIR/tmux-UID/)."""
    tmux = require_binary("tmux")
    base = tempfile.mkdtemp(prefix="owt-tmux-")
    sockdir = Path(base) / f"tmux-{os.geteuid()}"
    sockdir.mkdir(mode=0o700)
    servers = (Server(tmux, str(sockdir / "shell")), Server(tmux, str(sockdir / "bare")))
    try:
        yield servers
    finally:
        for srv in servers:
            subprocess.run([tmux, "-S", srv.sock, "kill-server"], capture_output=True, timeout=10, check=False)
        shutil.rmtree(base, ignore_errors=True)


def pane_pid(server: Server, target: str) -> int:
    return int(server.run("display-message", "-p", "-t", target, "#{pane_pid}"))


def test_recheck_tells_a_pane_left_behind_from_one_gone_with_its_agent(two_servers: tuple[Server, Server]) -> None:
    """`recheck`, asked when an agent is found dead: a pane whose shell outlives the agent
    lives on; a pane that ran the agent itself closed with it, and so did its server."""
    shell, bare = two_servers
    shell.run("-f", "/dev/null", "new-session", "-d", "-s", "s", f"sh -c \"{AGENT}; sleep 300\"")
    bare.run("-f", "/dev/null", "new-session", "-d", "-s", "b", AGENT)
    src = TmuxSource(timeout=5.0, sockets=[shell.sock, bare.sock])
    shell_agent = agent_in(pane_pid(shell, "s:0.0"))
    bare_agent = pane_pid(bare, "b:0.0")  # the pane's own process is the agent
    src.scan(ProcessTableReader().read(), [shell_agent, bare_agent])
    in_shell, in_bare = src.pane_of(shell_agent), src.pane_of(bare_agent)
    assert in_shell is not None and in_bare is not None and in_bare.agent_pid == bare_agent
    for pid in (shell_agent, bare_agent):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: shell_agent not in ProcessTableReader().read())
    assert src.recheck(in_shell, shell_agent) is True
    wait_for(lambda: src.recheck(in_bare, bare_agent) is False)
    gone = subprocess.run([bare.tmux, "-S", bare.sock, "list-sessions"], capture_output=True, timeout=10)
    assert gone.returncode != 0  # its last pane closed: the server went with it

    # A pane kept by remain-on-exit shows its dead agent: that runtime lives on.
    shell.run("set-option", "-g", "remain-on-exit", "on")
    shell.run("new-window", "-d", "-t", "s:1", AGENT)
    kept_agent = pane_pid(shell, "s:1.0")
    src.scan(ProcessTableReader().read(), [kept_agent])
    kept = src.pane_of(kept_agent)
    assert kept is not None
    os.kill(kept_agent, signal.SIGKILL)
    wait_for(lambda: shell.run("display-message", "-p", "-t", "s:1.0", "#{pane_dead}") == "1")
    assert src.recheck(kept, kept_agent) is True

    # A server that does not answer: unknown, never "gone".
    server_pid = int(shell.run("display-message", "-p", "#{pid}"))
    os.kill(server_pid, signal.SIGSTOP)
    try:
        assert TmuxSource(timeout=0.3, sockets=[shell.sock]).recheck(in_shell, shell_agent) is None
    finally:
        os.kill(server_pid, signal.SIGCONT)


def test_daemon_names_the_pane_and_rechecks_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               two_servers: tuple[Server, Server]) -> None:
    """Zero config: an agent found by name in a pane is listed with that pane as its runtime;
    one whose pane outlives it is runtime_alive_process_dead; one that took its pane and
    its tmux server with it is process_exited."""
    from otelwatch.config import parse_config
    from otelwatch.daemon import Watcher

    shell, bare = two_servers
    monkeypatch.setenv("TMUX_TMPDIR", str(Path(shell.sock).parent.parent))
    mark = f"owt-{os.getpid()}-pane"
    agent = f"{sys.executable} -c 'import time; time.sleep(300)' {mark}"
    shell.run("-f", "/dev/null", "new-session", "-d", "-s", "work", f"sh -c \"{agent}; sleep 300\"")
    bare.run("-f", "/dev/null", "new-session", "-d", "-s", "solo", agent)
    in_shell, solo = agent_in(pane_pid(shell, "work:0.0"), mark), pane_pid(bare, "solo:0.0")
    cfg = parse_config({"interval": 1, "probe_timeout": 0.5, "state_dir": str(tmp_path / "state"),
                        "classify": {"startup_grace": 0, "stall_after": 30},
                        "sources": {"registry": {"enabled": False}, "transcripts": {"enabled": False},
                                    # the agent, not the tmux server whose argv names it too
                                    "processes": {"match": [f"cmdline:^{re.escape(sys.executable)} -c .*{mark}"]},
                                    "tmux": {"timeout": 2}}})
    w = Watcher(cfg, log_stream=io.StringIO())

    def ours() -> dict[int, Any]:
        w.tick()
        return {s.pid: s for s in w.sessions() if s.pid in (in_shell, solo)}

    try:
        named = wait_for(lambda: (m := ours()) and len(m) == 2 and all(s.runtime for s in m.values()) and m)
        assert {p: (s.runtime.kind, s.runtime.target) for p, s in named.items()} == {  # type: ignore[union-attr]
            in_shell: ("tmux", "work:0.0"), solo: ("tmux", "solo:0.0")}
        assert named[in_shell].to_json()["runtime"] == {  # type: ignore[index]
            "kind": "tmux", "target": "work:0.0", "socket": shell.sock,
            "attach": f"tmux -S {shell.sock} attach -t work:0.0"}
        for pid in (in_shell, solo):
            os.kill(pid, signal.SIGKILL)
        ended = wait_for(lambda: (m := ours()) and all(s.state.value == "exited" for s in m.values()) and m)
        assert ended[in_shell].reason.value == "runtime_alive_process_dead"  # type: ignore[index]
        assert ended[solo].reason.value == "process_exited"  # type: ignore[index]
    finally:
        w.stop()
