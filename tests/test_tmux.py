"""TmuxSource against a real tmux server on a private socket (always killed at teardown)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import require_binary, wait_for

from otelwatch.proctable import ProcessTableReader
from otelwatch.sources.tmux import TmuxSource, default_sockets

AGENT = f"{sys.executable} -c 'import time; time.sleep(300)' fake-agent"


class Server:
    def __init__(self, tmux: str, sock: str) -> None:
        self.tmux = tmux
        self.sock = sock

    def run(self, *args: str) -> str:
        out = subprocess.run([self.tmux, "-S", self.sock, *args], capture_output=True, timeout=10,
                             check=True, env={**os.environ, "TERM": "xterm"})
        return out.stdout.decode().strip()


@pytest.fixture
def server() -> Iterator[Server]:
    tmux = require_binary("tmux")
    # Short path: unix socket paths are limited to ~107 bytes. Laid out like tmux's own
    # default directory so discovery through TMUX_TMPDIR is exercised too.
    base = tempfile.mkdtemp(prefix="owt-tmux-")
    sockdir = Path(base) / f"tmux-{os.geteuid()}"
    sockdir.mkdir(mode=0o700)
    srv = Server(tmux, str(sockdir / "default"))
    pid = None
    try:
        # The pane runs a shell that outlives the agent, like a person's pane does.
        srv.run("-f", "/dev/null", "new-session", "-d", "-s", "w", "-x", "80", "-y", "24",
                f"sh -c \"{AGENT}; sleep 300\"")
        pid = int(srv.run("display-message", "-p", "#{pid}"))
        yield srv
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        subprocess.run([tmux, "-S", srv.sock, "kill-server"], capture_output=True, timeout=10, check=False)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def agent_in(pane_pid: int) -> int:
    """PID of the fake agent under the pane's shell, once it runs."""
    def find() -> int | None:
        table = ProcessTableReader().read()
        for pid in table.descendants(pane_pid):
            if "fake-agent" in table.cmdline(pid):
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
