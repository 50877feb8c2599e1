"""The host's process table, read once per tick from /proc/*/stat.

Discovery (process matchers, tmux) and the probe share one table per tick, so
each process on the host costs one small read per tick, and cmdlines are read
once per process identity (pid, create_time) and cached. Processes that vanish
or cannot be read while the table is built are simply absent: this module
never raises for one process.
"""

from __future__ import annotations

import os
import time as _time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from otelwatch.model import ProcessIdentity

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str  # kernel state letter
    comm: str  # kernel's 15-char name
    cpu_seconds: float  # utime + stime
    threads: int
    create_time: float  # Unix time, from boot time + starttime ticks
    rss_bytes: int
    # Field 22 of /proc/PID/stat: the start in clock ticks since boot. Unlike btime it never
    # steps with the wall clock, so it is what other programs (hooks, the exec wrapper)
    # record, and the daemon turns it into create_time with its own one boot time.
    start_ticks: int | None = None

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.pid, self.create_time)


def read_boot_time(proc_root: str = "/proc") -> float:
    with open(os.path.join(proc_root, "stat"), "rb") as fh:
        for line in fh:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise OSError(f"no btime in {proc_root}/stat")


def parse_stat(pid: int, data: bytes, boot_time: float) -> ProcInfo:
    """A ProcInfo from the bytes of /proc/PID/stat. The name may hold spaces and
    parentheses, so it is cut at the last ')'."""
    head, _, rest = data.rpartition(b")")
    comm = head.partition(b"(")[2].decode("utf-8", "replace")
    f = rest.split()
    # f[0] is field 3 (state) of proc(5); field N is f[N - 3].
    return ProcInfo(
        pid=pid,
        ppid=int(f[1]),
        pgid=int(f[2]),
        sid=int(f[3]),
        state=f[0].decode(),
        comm=comm,
        cpu_seconds=(int(f[11]) + int(f[12])) / CLK_TCK,
        threads=int(f[17]),
        create_time=boot_time + int(f[19]) / CLK_TCK,
        rss_bytes=int(f[21]) * PAGE_SIZE,
        start_ticks=int(f[19]),
    )


def create_time_of(start_ticks: int, boot_time: float) -> float:
    """The create time of a process that started `start_ticks` after boot, computed as
    `parse_stat` computes it (so the two compare exactly) with `boot_time`."""
    return boot_time + int(start_ticks) / CLK_TCK


def record_start_ticks(value: object) -> int | None:
    """A record's `start_ticks` when it is a plausible one; None otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return None


def read_proc(pid: int, proc_root: str = "/proc", boot_time: float | None = None) -> ProcInfo | None:
    """One process's ProcInfo now, or None when it does not exist (any more)."""
    bt = read_boot_time(proc_root) if boot_time is None else boot_time
    try:
        return parse_stat(pid, read_small(f"{proc_root}/{pid}/stat"), bt)
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def read_small(path: str) -> bytes:
    """The whole of a small /proc file in one read(2): /proc/PID/stat, io, schedstat and
    status are well under 4 KiB, and a buffered file object would cost an fstat and a
    second read. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 4096)
        if len(data) == 4096:  # a name or field longer than expected: read the rest
            while chunk := os.read(fd, 4096):
                data += chunk
        return data
    finally:
        os.close(fd)


class ProcessTable:
    """An immutable view of all processes at one instant, with parent->children links.

    `time` (wall clock) and `monotonic` say when it was read: the CPU seconds in it
    are as of then, so CPU rates divide by the difference of these, not of the
    times the probe happened to look.
    """

    def __init__(self, procs: dict[int, ProcInfo], reader: ProcessTableReader,
                 time: float | None = None, monotonic: float | None = None, *, boot_shift: float = 0.0) -> None:
        self._procs = procs
        self._reader = reader
        self.boot_shift = boot_shift
        self.time = _time.time() if time is None else time
        self.monotonic = _time.monotonic() if monotonic is None else monotonic
        children: dict[int, list[int]] = {}
        for info in procs.values():
            children.setdefault(info.ppid, []).append(info.pid)
        self._children = children

    def __contains__(self, pid: object) -> bool:
        return pid in self._procs

    def __iter__(self) -> Iterator[ProcInfo]:
        return iter(self._procs.values())

    def __len__(self) -> int:
        return len(self._procs)

    def get(self, pid: int) -> ProcInfo | None:
        return self._procs.get(pid)

    def started_at(self, info: ProcInfo) -> float:
        """When `info`'s process started, in today's wall-clock time, to a clock tick.

        Its create_time (the identity) counts from /proc/stat's btime, which is whole
        seconds: up to a second early. To compare a start with a file's mtime (was this
        process there when that file was written?), the fraction is put back."""
        return info.create_time + self.boot_shift

    def children(self, pid: int) -> list[int]:
        return self._children.get(pid, [])

    def descendants(self, pid: int) -> list[int]:
        """All descendants of pid, breadth first (not including pid)."""
        out: list[int] = []
        seen = {pid}
        queue = deque(self._children.get(pid, ()))
        while queue:
            child = queue.popleft()
            if child in seen:  # a PID reused mid-read can make a cycle
                continue
            seen.add(child)
            out.append(child)
            queue.extend(self._children.get(child, ()))
        return out

    def ancestors(self, pid: int) -> list[int]:
        """Parent, grandparent, ... up to (not including) PID 0."""
        out: list[int] = []
        info = self._procs.get(pid)
        while info is not None and info.ppid > 0 and info.ppid not in out and len(out) < 4096:
            out.append(info.ppid)
            info = self._procs.get(info.ppid)
        return out

    def cmdline(self, pid: int) -> tuple[str, ...]:
        """argv of pid (cached per process identity); () for kernel threads or on error."""
        info = self._procs.get(pid)
        return () if info is None else self._reader.cmdline(info)


class ProcessTableReader:
    """Reads ProcessTables; keeps the cmdline cache between ticks."""

    def __init__(self, proc_root: str = "/proc", clock: Callable[[], float] = _time.time,
                 monotonic: Callable[[], float] = _time.monotonic, *, boot_time: float | None = None) -> None:
        self.proc_root = proc_root
        # Create times are boot time + start ticks. /proc/stat's btime can move when the
        # wall clock is stepped, so readers whose identities are compared (the probe's and
        # recovery's) share one value: pass it in.
        self.boot_time = read_boot_time(proc_root) if boot_time is None else boot_time
        self._cmdlines: dict[ProcessIdentity, tuple[str, ...]] = {}
        self._clock = clock
        self._monotonic = monotonic

    def read(self) -> ProcessTable:
        procs: dict[int, ProcInfo] = {}
        root = self.proc_root
        boot_time = self.boot_time
        t0, m0 = self._clock(), self._monotonic()
        read = read_small  # a local name: no global lookup per host process
        for entry in os.listdir(root):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                procs[pid] = parse_stat(pid, read(f"{root}/{entry}/stat"), boot_time)
            except (OSError, IndexError, ValueError):
                continue  # vanished between listdir and open, or unreadable
        t, m = self._stamp(procs, t0, m0)
        return ProcessTable(procs, self, time=t, monotonic=m, boot_shift=self.boot_shift())

    def boot_shift(self) -> float:
        """Seconds to add to a create time for the wall-clock start: the kernel's boot
        instant now (wall clock less CLOCK_BOOTTIME, which start ticks count on) less the
        whole-second boot time create times use. 0 where that clock is not there or the
        table is not this host's /proc (a fixture)."""
        if self.proc_root not in ("/proc", "") or not hasattr(_time, "CLOCK_BOOTTIME"):
            return 0.0
        return _time.time() - _time.clock_gettime(_time.CLOCK_BOOTTIME) - self.boot_time

    def _stamp(self, procs: dict[int, ProcInfo], t0: float, m0: float) -> tuple[float, float]:
        """(wall, monotonic) of a table whose read began at (t0, m0): the middle of the read,
        as each process was read somewhere in it. Also forgets the cmdlines of processes
        that are gone, so the cache stays bounded."""
        t1, m1 = self._clock(), self._monotonic()
        if len(self._cmdlines) > 2 * len(procs) + 64:
            live = {p.identity for p in procs.values()}
            self._cmdlines = {k: v for k, v in self._cmdlines.items() if k in live}
        return (t0 + t1) / 2, (m0 + m1) / 2

    def cmdline(self, info: ProcInfo) -> tuple[str, ...]:
        key = info.identity
        cached = self._cmdlines.get(key)
        if cached is not None:
            return cached
        argv = self._read_argv(info)
        # An empty cmdline can be a process still in exec; do not cache it.
        if argv:
            self._cmdlines[key] = argv
        return argv

    def _read_argv(self, info: ProcInfo) -> tuple[str, ...]:
        """argv read now (the cache misses); () on error. Other backends replace this read."""
        try:
            with open(f"{self.proc_root}/{info.pid}/cmdline", "rb") as fh:
                raw = fh.read()
        except OSError:
            return ()
        return tuple(a.decode("utf-8", "replace") for a in raw.split(b"\0") if a)
