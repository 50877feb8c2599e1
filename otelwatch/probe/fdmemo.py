"""When a quiet process's socket list and I/O counters can be carried over from its last full read.

A full scan reads every link in /proc/PID/fd (one readlink per FD, about 3 us each
here, 20 and more per agent process) and was the largest single cost of a tick.
Most processes of a healthy session do not touch their FD table from one second
to the next, and the kernel tells cheaply when they might have: the FD count
(stat of /proc/PID/fd, Linux 6.2 and later), the CPU time and thread count the
process table already read, and whether every TCP socket of the last scan is
still open. A scan is carried over only when none of these moved, for at most
MAX_CARRIED ticks in a row, and only for sessions the caller names as steady
(active, idle, long_running): a session whose verdict may hinge on its sockets
(starting, stalled, stuck, and so every recovery decision) is always read in
full. What a carried scan can miss is a process that closed one FD and opened a
TCP connection within one tick without using a clock tick of CPU; it is seen at
the latest MAX_CARRIED ticks later. The I/O counters are carried with the scan: a
process that did not run for a clock tick did next to no I/O, and the counters
are cumulative, so what it did is seen whole at the next full read (at the
latest MAX_CARRIED ticks later), not lost.

Pure bookkeeping; the reads are the probe's.
"""

from __future__ import annotations

from dataclasses import dataclass

from otelwatch.probe.procfs import FdScan, IoCounters, TcpTable
from otelwatch.probe.proctable import ProcessTable, ProcInfo

__all__ = ["MAX_CARRIED", "Carried", "FdMemo"]

# Ticks in a row a scan may be carried over before the next full one.
MAX_CARRIED = 4
# Sessions in these states may have their quiet processes carried: none of them is
# judged on its sockets (a recovery only ever follows `stuck`, read in full from the
# tick after the verdict, and its decision always is).


@dataclass(slots=True)
class Carried:
    """What a full read of one process found, reused while nothing says it changed."""

    create_time: float
    cpu_seconds: float
    threads: int
    scan: FdScan
    tcp: frozenset[int]  # the socket inodes that were in that tick's TCP table
    io: IoCounters | None
    carried: int = 0


class FdMemo:
    """The last full FD scan of each process read, by pid. Used from the probe's worker
    threads one process at a time (dict operations only) and pruned by the coordinator."""

    def __init__(self) -> None:
        self._memos: dict[int, Carried] = {}

    def __len__(self) -> int:
        return len(self._memos)

    def has_tcp(self, pid: int) -> bool:
        """Whether carrying pid's scan needs this tick's TCP table to check against."""
        memo = self._memos.get(pid)
        return memo is not None and bool(memo.tcp)

    def carry(self, p: ProcInfo, fd_count: int | None, tcp_table: TcpTable | None) -> Carried | None:
        """The last full read of `p` when nothing says its FD table changed since; None:
        read it. `fd_count`: the kernel's count now (None or 0: unknown, as before 6.2)."""
        memo = self._memos.get(p.pid)
        if (memo is None or memo.carried >= MAX_CARRIED or not fd_count or fd_count != memo.scan.num_fds
                or memo.create_time != p.create_time or memo.cpu_seconds != p.cpu_seconds
                or memo.threads != p.threads):
            return None
        if memo.tcp and (tcp_table is None or not all(i in tcp_table for i in memo.tcp)):
            return None  # a TCP socket of the last scan closed: the table changed
        memo.carried += 1
        return memo

    def remember(self, p: ProcInfo, scan: FdScan, tcp: frozenset[int], io: IoCounters | None) -> None:
        """A full read of `p`: its FD scan, the inodes of it that were TCP sockets this
        tick, its I/O counters."""
        self._memos[p.pid] = Carried(p.create_time, p.cpu_seconds, p.threads, scan, tcp, io)

    def forget(self, pid: int) -> None:
        self._memos.pop(pid, None)

    def keep_only(self, table: ProcessTable) -> None:
        """Drop the memos of processes that are gone (or whose pid was reused: one table
        reader computes both create times, so they compare exactly)."""
        self._memos = {pid: memo for pid, memo in self._memos.items()
                       if (info := table.get(pid)) is not None and info.create_time == memo.create_time}
