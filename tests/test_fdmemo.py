"""Carried-over FD scans (otelwatch/fdmemo.py) on real processes: a quiet process of a
steady session skips the readlink pass, anything that may have changed its FD table
is read in full, and sessions that are not steady always are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from procs import TcpServer

from otelwatch import procfs
from otelwatch.fdmemo import MAX_CARRIED
from otelwatch.probe import Prober
from otelwatch.proctable import ProcessTableReader

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
    not procfs.fd_count(os.getpid()),
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
        time.sleep(0.05)  # let the interpreter settle back to sleep in read(2)

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
