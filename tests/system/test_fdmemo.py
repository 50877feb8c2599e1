"""Carried-over FD scans (otelwatch/probe/fdmemo.py) on real processes: a quiet process of a
steady session skips the readlink pass, anything that may have changed its FD table
is read in full, and sessions that are not steady always are.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otelwatch.config import parse_config
from otelwatch.daemon import Watcher
from otelwatch.model import State
from otelwatch.probe import procfs
from otelwatch.probe.fdmemo import MAX_CARRIED
from otelwatch.probe.prober import Prober
from otelwatch.probe.proctable import ProcessTableReader, read_proc
from tests.support.procs import TcpServer

# A process with 8 files and 2 connections that changes its FD table on command (one
# line on stdin, answered with "ok" once done): no CPU otherwise.
AGENT = r"""
import socket, sys
port = int(sys.argv[1])
files = [open("/dev/null") for _ in range(8)]
conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
print("ok", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "connect":  # one more FD: the count moves
        conns.append(socket.create_connection(("127.0.0.1", port)))
    elif cmd == "swap":  # a file closed, a connection opened: same count
        files.pop().close()
        conns.append(socket.create_connection(("127.0.0.1", port)))
    elif cmd == "close_tcp":  # a connection closed, a file opened: same count
        conns.pop().close()
        files.append(open("/dev/null"))
    print("ok", flush=True)
"""

pytestmark = pytest.mark.skipif(
    not getattr(procfs.fd_dir_stat(os.getpid()), "st_size", 0),
    reason="this kernel does not count FDs in /proc/PID/fd's size (Linux < 6.2): nothing is carried")


class Agent:
    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", AGENT, str(port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self._answer()

    def do(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        self._answer()

    def _answer(self) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ok"
        for _ in range(100):  # until it is back asleep in read(2)
            info = read_proc(self.proc.pid)
            if info is not None and info.state == "S":
                break
            time.sleep(0.01)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def agent(tcp_server: TcpServer) -> Iterator[Agent]:
    a = Agent(tcp_server.port)
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids scan_fds really read (the real function, counted)."""
    seen: list[int] = []
    real = procfs.scan_fds

    def counted(pid: int, proc_root: str = "/proc") -> Any:
        seen.append(pid)
        return real(pid, proc_root)

    monkeypatch.setattr(procfs, "scan_fds", counted)
    return seen


def sample(prober: Prober, reader: ProcessTableReader, pid: int, *, steady: bool) -> tuple[int, int | None]:
    s = prober.sample(reader.read(), {"s": pid}, 2.0, steady={"s"} if steady else ())["s"]
    return s.tcp_total or 0, s.num_fds


def test_a_quiet_process_is_carried_at_most_max_carried_ticks(agent: Agent, scans: list[int]) -> None:
    prober, reader = Prober(), ProcessTableReader()
    try:
        seen = [sample(prober, reader, agent.proc.pid, steady=True) for _ in range(2 * (MAX_CARRIED + 1))]
    finally:
        prober.shutdown()
    assert {tcp for tcp, _ in seen} == {2}
    assert len({fds for _, fds in seen}) == 1
    # A full scan, then MAX_CARRIED carried, then the next full scan.
    assert len(scans) == 2, scans


def test_sessions_that_are_not_steady_are_always_read_in_full(agent: Agent, scans: list[int]) -> None:
    prober, reader = Prober(), ProcessTableReader()
    try:
        for _ in range(4):
            assert sample(prober, reader, agent.proc.pid, steady=False)[0] == 2
    finally:
        prober.shutdown()
    assert len(scans) == 4


@pytest.mark.parametrize(("cmd", "tcp_after"), [("connect", 3), ("close_tcp", 1), ("swap", 3)])
def test_a_changed_fd_table_is_seen(agent: Agent, scans: list[int], cmd: str, tcp_after: int) -> None:
    """A new FD (count), a closed TCP socket (gone from the table): read in full on the
    next tick. A file swapped for a connection (same count) may hide behind the CPU
    time it took, but never for more than MAX_CARRIED ticks."""
    prober, reader = Prober(), ProcessTableReader()
    try:
        assert sample(prober, reader, agent.proc.pid, steady=True)[0] == 2
        assert sample(prober, reader, agent.proc.pid, steady=True)[0] == 2
        assert len(scans) == 1  # the second was carried
        agent.do(cmd)
        after = [sample(prober, reader, agent.proc.pid, steady=True)[0] for _ in range(MAX_CARRIED + 1)]
    finally:
        prober.shutdown()
    if cmd == "swap":
        assert after[-1] == tcp_after, after
    else:
        assert after == [tcp_after] * len(after), after


def test_the_daemon_reads_a_session_judged_on_its_sockets_in_full(
        agent: Agent, scans: list[int], tmp_path: Path) -> None:
    """Only active, idle and long_running sessions may be carried: once the agent's
    verdict is stalled (waiting_on_network: its sockets are the evidence), and so for
    every stuck verdict and recovery decision, each tick reads its FDs again."""
    cfg = parse_config({
        "interval": 0.25, "probe_timeout": 0.25, "state_dir": str(tmp_path / "state"),
        "classify": {"startup_grace": 0, "stall_after": 1},
        "sources": {"registry": {"enabled": False}, "processes": {"enabled": False},
                    "tmux": {"enabled": False}, "transcripts": {"enabled": False}},
        "export": {"prometheus": {"enabled": False}},
    })
    w = Watcher(cfg, log_stream=io.StringIO())
    states: list[tuple[State, bool]] = []
    try:
        sid = w.track(agent.proc.pid, agent="fake")
        for i in range(16):  # about 4 s: active for the first second, then stalled
            if i < 4:  # its progress: active while it lasts (silence counts from the process start)
                w.feed(sid, b'{"type": "assistant"}')
            before = len(scans)
            snap = {s.session_id: s for s in w.tick()}[sid]
            states.append((snap.state, len(scans) > before))
            time.sleep(0.25)
    finally:
        w.stop()
    assert any(state is State.ACTIVE for state, _ in states), states
    stalled_at = next(i for i, (state, _) in enumerate(states) if state is State.STALLED)
    assert {s for s, _ in states[stalled_at:]} == {State.STALLED}, states
    # The tick after the verdict turned stalled, and every one after it, scanned.
    assert all(scanned for _, scanned in states[stalled_at + 1:]), states
    # While active, most ticks were carried.
    assert sum(not scanned for state, scanned in states[:stalled_at] if state is State.ACTIVE) >= 1, states
