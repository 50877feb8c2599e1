"""The portable probe backend: the /proc probe's ProcessTable and TreeSamples, read through psutil.

For hosts without /proc (macOS, the BSDs) and for Linux with `[probe] backend =
"psutil"`. This module owns `PsutilTableReader` (the host's process table),
`PsutilProber` (which keeps `Prober`'s worker pool, deadlines, CPU history and
tree totals and replaces only the read of one process), and `read_info`, the
one-process read the recovery actuator re-identifies with.

Every psutil exception ends here: NoSuchProcess becomes an absent process or
ProcessGone, ZombieProcess a zombie, AccessDenied None (unknown), never zero.
It never uses psutil's process_iter cache (a cached Process keeps its first
create time after its PID is reused, so history would merge across owners),
and never reports a TCP count it has not proved: a process whose FDs it cannot
read, or (Linux) that lives in another network namespace, has TCP None, which
keeps the recovery gate closed.

What psutil cannot give stays None: wchan (no such call), I/O counters where
psutil has none (macOS), TCP of processes in other network namespaces (psutil
reads its own namespace's table only), CPU demand off Linux (the run-queue wait
has no psutil call; on Linux it is read from /proc/PID/schedstat).

Run and tested on Linux only. The branches only macOS takes are small: the
per-process TCP read (`_process_sockets`, also tested on Linux by forcing it),
the zero boot offset, and the missing io_counters; they are untested on macOS.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from typing import Any, TypeVar

import psutil

from otelwatch.model import FOREIGN_CREATE_TIME_SKEW_S, ProcessIdentity, TreeSample, same_process
from otelwatch.probe import procfs
from otelwatch.probe.prober import Prober, _RawProc, _RawTree, _tally, _Tick
from otelwatch.probe.procfs import ProcessGone, TcpSocket
from otelwatch.probe.proctable import ProcessTable, ProcessTableReader, ProcInfo

__all__ = ["STATUS_LETTERS", "PsutilProber", "PsutilProcessTable", "PsutilTableReader", "boot_offset",
           "effective_uid", "read_info"]

LINUX = sys.platform.startswith("linux")
HAS_IO_COUNTERS = hasattr(psutil.Process, "io_counters")  # not on macOS

# psutil's status names back to the kernel letters ProcessSample.status holds (ps(1) letters).
STATUS_LETTERS: dict[str, str] = {
    "running": "R",
    "sleeping": "S",
    "disk-sleep": "D",
    "stopped": "T",
    "tracing-stop": "t",
    "zombie": "Z",
    "dead": "X",
    "wake-kill": "K",
    "waking": "W",
    "idle": "I",
    "parked": "P",
}

T = TypeVar("T")


def boot_offset(boot_time: float) -> float:
    """What to add to psutil's create times so that they are computed with `boot_time`,
    as the /proc reader's are. On Linux psutil adds /proc/stat's btime as it is now, and
    btime (now - uptime, in whole seconds) moves by a second now and then; identities the
    daemon compares must not. Elsewhere psutil's create times hold no boot time of ours: 0."""
    if not LINUX:
        return 0.0
    try:
        return boot_time - psutil.boot_time()
    except (psutil.Error, OSError, RuntimeError):
        return 0.0


def _comm(name: str, pid: int, ppid: int) -> str:
    """The kernel's name of a process, as procfs's ProcInfo.comm holds it: psutil lengthens a
    name that fills the kernel's field from argv[0]; cut it back. Linux gives its kernel
    threads (children of kthreadd, PID 2) whole names, which psutil leaves alone."""
    if not LINUX:
        return name[:16]  # MAXCOMLEN of the BSDs and macOS
    return name if pid == 2 or ppid == 2 else name[:15]


def _os_id(fn: Callable[[int], int], pid: int) -> int:
    """getpgid/getsid of pid; 0 (unknown, and never a group recovery signals) on error."""
    try:
        return fn(pid)
    except OSError:
        return 0


def read_info(pid: int, offset: float = 0.0) -> tuple[ProcInfo, bool] | None:
    """pid's ProcInfo read now, and whether its usage (CPU time, RSS, threads) was readable
    (False: those are placeholder zeros). None when it does not exist (any more) or its
    identity cannot be read. `offset`: see boot_offset."""
    if pid <= 0:
        return None  # macOS lists the kernel as PID 0; /proc never does
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            ppid = proc.ppid()
            status = proc.status()
            name = proc.name()
            create_time = proc.create_time() + offset
            usage_known = True
            try:
                cpu = proc.cpu_times()
                cpu_seconds = cpu.user + cpu.system
                threads = proc.num_threads()
                rss = proc.memory_info().rss
            except psutil.ZombieProcess:
                # macOS cannot read a zombie's task info; it runs nothing and holds nothing.
                cpu_seconds, threads, rss, status = 0.0, 0, 0, "zombie"
            except psutil.AccessDenied:
                cpu_seconds, threads, rss, usage_known = 0.0, 0, 0, False
    except (psutil.Error, OSError, ValueError):
        return None  # gone (NoSuchProcess), or not even its identity is readable
    info = ProcInfo(
        pid=pid,
        ppid=ppid,
        pgid=_os_id(os.getpgid, pid),
        sid=_os_id(os.getsid, pid),
        state=STATUS_LETTERS.get(status, "?"),
        comm=_comm(name, pid, ppid),
        cpu_seconds=cpu_seconds,
        threads=threads,
        create_time=create_time,
        rss_bytes=rss,
    )
    return info, usage_known


def effective_uid(pid: int) -> int | None:
    """pid's effective uid (what the probe reports as its owner); None when gone or unreadable."""
    try:
        uid: int = psutil.Process(pid).uids().effective
        return uid
    except (psutil.Error, OSError):
        return None


# --------------------------------------------------------------------------- the process table


class PsutilProcessTable(ProcessTable):
    """A ProcessTable that also knows whose usage it could not read (another user's
    processes on macOS): their zero CPU time is a placeholder, reported as unknown."""

    def __init__(self, procs: dict[int, ProcInfo], reader: ProcessTableReader, time: float,
                 monotonic: float, unreadable: frozenset[int], boot_shift: float = 0.0) -> None:
        super().__init__(procs, reader, time=time, monotonic=monotonic, boot_shift=boot_shift)
        self.unreadable = unreadable


class PsutilTableReader(ProcessTableReader):
    """Reads ProcessTables through psutil: one fresh psutil.Process per PID per read."""

    def __init__(self, clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 *, boot_time: float | None = None) -> None:
        # proc_root is unused here ("" says so); boot_time is the one every identity of this
        # reader (and of the actuator handed it) is computed with.
        super().__init__("", clock, monotonic, boot_time=psutil.boot_time() if boot_time is None else boot_time)

    def read(self) -> PsutilProcessTable:
        procs: dict[int, ProcInfo] = {}
        unreadable: set[int] = set()
        t0, m0 = self._clock(), self._monotonic()
        offset = boot_offset(self.boot_time)
        try:
            pids = psutil.pids()
        except (psutil.Error, OSError):
            pids = []  # an empty table: every session reads as "no such process" this tick
        for pid in pids:
            got = read_info(pid, offset)
            if got is None:
                continue  # vanished between the listing and the read, or unreadable
            info, usage_known = got
            procs[pid] = info
            if not usage_known:
                unreadable.add(pid)
        t, m = self._stamp(procs, t0, m0)
        return PsutilProcessTable(procs, self, t, m, frozenset(unreadable), self.boot_shift())

    def _read_argv(self, info: ProcInfo) -> tuple[str, ...]:
        try:
            proc = psutil.Process(info.pid)
            if not _same_by_psutil(info.identity, proc.create_time()):
                return ()  # its PID was reused since the table was read
            argv = proc.cmdline()
        except (psutil.Error, OSError):
            return ()
        return tuple(a for a in argv if a)


# --------------------------------------------------------------------------- the prober


def _endpoint(family: int, addr: Any) -> str:
    """"127.0.0.1:5555" / "[::1]:5555" as procfs writes them; psutil gives () for "none"."""
    v6 = family == socket.AF_INET6
    ip, port = (addr[0], addr[1]) if addr else ("::" if v6 else "0.0.0.0", 0)
    return f"[{ip}]:{port}" if v6 else f"{ip}:{port}"


def _sockets(conns: Iterable[Any]) -> dict[Hashable, TcpSocket]:
    """psutil's TCP connections keyed by what they are. psutil gives no socket inode, so
    one socket shared by parent and child is recognised by its addresses and state: two
    connected sockets never share both addresses; two listeners on one port
    (SO_REUSEPORT) count as one, which only the LISTEN count can see."""
    out: dict[Hashable, TcpSocket] = {}
    for c in conns:
        sock = TcpSocket(str(c.status), _endpoint(c.family, c.laddr), _endpoint(c.family, c.raddr))
        out[sock] = sock
    return out


# Linux, auto: join one host-wide TCP table when the watched trees hold at least this many
# processes; below it, read each one's own sockets (see PsutilProber). Measured on a 2-core VM
# with 900-1,200 processes and 1,600-4,300 TCP sockets: one host-wide read (110-180 ms) cost
# as much as 7-10 per-process reads of processes holding sockets (13-20 ms each).
HOST_TCP_MIN_PROCESSES = 16


class PsutilProber(Prober):
    """A Prober reading each process through psutil; the rest (pool, deadlines, problems,
    CPU rates, tree totals, `sample`'s contract) is Prober's.

    TCP, two ways. Per process: psutil's Process.net_connections(); on Linux each call
    for a process holding any socket re-reads and parses the namespace's whole TCP table,
    so N such processes cost N parses (100 watched processes holding 2 connections each:
    1.1 s per tick). Host-wide (Linux): one psutil.net_connections() per tick, shared by
    every session and joined by pid; it reads the FDs of every process on the host (the
    same 100: 45 ms), and costs more than a few per-process reads on a big host.
    `host_tcp` None (auto) joins host-wide when the watched trees hold at least
    HOST_TCP_MIN_PROCESSES processes, True always, False never.

    The host-wide table names one owner per socket (the last PID found holding it), so a
    socket shared by several processes is missing from the others: a tree whose joined
    TCP count is zero is read again per process before that zero is reported
    (`_prove_zero`); a nonzero count stays as joined (per process, a shared socket shows
    under one holder only).
    Elsewhere always per process: on macOS that call reads only the process's own
    sockets, and the host-wide one needs root (and is a loop over every process)."""

    def __init__(self, max_workers: int = 1, clock: Callable[[], float] = time.time, *,
                 host_tcp: bool | None = None, proc_root: str = "/proc",
                 _before_sample: Callable[[str], None] | None = None) -> None:
        # proc_root: on Linux, where network namespaces are compared (see _same_netns).
        super().__init__(proc_root=proc_root, max_workers=max_workers, clock=clock, _before_sample=_before_sample)
        self.netlink_ok = False
        # CPU demand: psutil has no call for a process's run-queue wait. On Linux it is
        # read from /proc/PID/schedstat as the /proc backend does (Prober found out whether
        # the kernel has it), and the voluntary sleeps from /proc/PID/status: without them
        # a spinner starved by other work reads as whatever its usage says (46% under CI
        # load: tool_call_without_progress, not cpu_spin). Elsewhere samples carry no
        # demand and the spin rule reads usage.
        self.schedstat = LINUX and self.schedstat
        self.host_tcp = host_tcp
        self._host_allowed = LINUX or host_tcp is True  # False once the host-wide read was denied
        self._use_host = False  # this tick's choice

    def sample(self, table: ProcessTable, targets: Mapping[str, ProcessIdentity | int], timeout: float, *,
               with_wchan: bool = False, steady: Collection[str] = ()) -> dict[str, TreeSample]:
        if not self._host_allowed or self.host_tcp is False:
            self._use_host = False
        elif self.host_tcp:
            self._use_host = True
        else:
            watched = sum(1 + len(table.descendants(t.pid if isinstance(t, ProcessIdentity) else t))
                          for t in targets.values())
            self._use_host = watched >= HOST_TCP_MIN_PROCESSES
        return super().sample(table, targets, timeout, with_wchan=with_wchan, steady=steady)

    def wchan(self, pid: int) -> str | None:
        return None  # psutil has no wait channel

    def cwd(self, pid: int) -> str | None:
        try:
            return psutil.Process(pid).cwd() or None
        except (psutil.Error, OSError):
            return None

    def _read_tree(self, sid: str, target: ProcessIdentity | int, table: ProcessTable, tick: _Tick,
                   with_wchan: bool, steady: bool = False) -> _RawTree:
        raw = super()._read_tree(sid, target, table, tick, with_wchan, steady)
        if raw.tcp == {} and self._use_host:
            self._prove_zero(raw)
        return raw

    def _prove_zero(self, raw: _RawTree) -> None:
        """Re-read per process the TCP sockets of a tree the host-wide join found without
        connections: only a zero proven this way may reach the recovery gate."""
        tree: dict[Hashable, TcpSocket] = {}
        known = True
        for rp in raw.procs:
            if rp.num_fds and rp.info.state != "Z" and rp.sockets is not None:
                try:
                    proc = psutil.Process(rp.info.pid)
                    if _same_by_psutil(rp.info.identity, proc.create_time()):
                        rp.sockets = self._process_sockets(proc)
                except (psutil.NoSuchProcess, ProcessGone):
                    pass  # it ended since: its sockets are closed, what was read stands
                except (psutil.Error, OSError):
                    rp.sockets = None
            if rp.sockets is None:
                known = False
            else:
                tree.update(rp.sockets)
        tcp, raw.listen = _tally(tree.values())
        raw.tcp = tcp if known else None

    def _read_proc(self, p: ProcInfo, table: ProcessTable, tick: _Tick, with_wchan: bool,
                   steady: bool = False, wait: bool = False) -> _RawProc:
        """One process; raises ProcessGone if it ended (or its PID was reused) meanwhile.
        Always read in full: psutil gives no cheap sign that a process's FDs changed."""
        pid = p.pid
        proc = self._convert(lambda: psutil.Process(pid), "fd")
        if proc is None:
            raise ProcessGone(pid)
        created = self._convert(proc.create_time, "fd")
        if created is not None and not _same_by_psutil(p.identity, created):
            raise ProcessGone(pid)  # its PID belongs to another process now
        with proc.oneshot():
            uids = self._convert(proc.uids, "fd")
            num_fds: int | None
            sockets: dict[Hashable, TcpSocket] | None
            if p.state == "Z":
                num_fds, sockets = 0, {}  # a zombie holds no files
            else:
                num_fds, sockets = self._files(proc, tick)
            io = self._convert(proc.io_counters, "io") if HAS_IO_COUNTERS else None
        return _RawProc(
            info=p,
            uid=None if uids is None else uids.effective,
            num_fds=num_fds,
            sockets=sockets,
            read_bytes=None if io is None else io.read_bytes,
            write_bytes=None if io is None else io.write_bytes,
            cmdline=table.cmdline(pid),
            wchan=None,
            cpu_known=pid not in getattr(table, "unreadable", ()),
            run_wait=procfs.read_run_wait(pid, self.proc_root) if wait else None,
            sleeps=procfs.read_voluntary_switches(pid, self.proc_root) if wait else None,
        )

    def _convert(self, fn: Callable[[], T], kind: str) -> T | None:
        """fn() with psutil's errors made otelwatch's: gone raises ProcessGone; denied and
        zombie (nothing to read) are None; anything else is None and a counted problem."""
        try:
            return fn()
        except psutil.ZombieProcess:  # before NoSuchProcess: it is one
            return None
        except psutil.NoSuchProcess:
            raise ProcessGone from None
        except psutil.AccessDenied:
            return None
        except (psutil.Error, OSError, ValueError):  # psutil raises ValueError on odd /proc contents
            self._problem(kind, "error")
            return None

    def _files(self, proc: psutil.Process, tick: _Tick) -> tuple[int | None, dict[Hashable, TcpSocket] | None]:
        """(FD count, TCP sockets) of a live process; None where unknown."""
        try:
            num_fds = proc.num_fds()
        except psutil.ZombieProcess:
            return 0, {}  # it died during the sample: a zombie holds no files
        except psutil.NoSuchProcess:
            raise ProcessGone from None
        except psutil.AccessDenied:
            return None, None
        except (psutil.Error, OSError):
            self._problem("fd", "error")
            return None, None
        if num_fds == 0:
            return 0, {}
        if LINUX and not self._same_netns(proc.pid):
            # psutil reads our namespace's socket table only: another namespace's sockets
            # would be missing from it, an unproven zero.
            return num_fds, None
        if self._use_host:
            by_pid = tick.shared("psutil_tcp", self._host_sockets)
            if by_pid is not None:
                return num_fds, dict(by_pid.get(proc.pid, {}))
        return num_fds, self._process_sockets(proc)

    def _same_netns(self, pid: int) -> bool:
        """Whether pid shares our network namespace (False when either is unreadable)."""
        if self._own_ns is None:
            return False
        try:
            return procfs.net_namespace(pid, self.proc_root) == self._own_ns
        except OSError:
            return False

    def _host_sockets(self) -> dict[int, dict[Hashable, TcpSocket]] | None:
        """Every TCP socket of our namespace by owner pid, in one call; None: not readable."""
        try:
            conns = psutil.net_connections(kind="tcp")
        except psutil.AccessDenied:
            self._host_allowed = False  # needs root here: per process from now on
            return None
        except (psutil.Error, OSError):
            self._problem("tcp_table", "error")
            return None
        owned: dict[int, list[Any]] = {}
        for c in conns:
            if c.pid is not None:  # None: an owner whose FDs we cannot read (also None for us)
                owned.setdefault(c.pid, []).append(c)
        return {pid: _sockets(cs) for pid, cs in owned.items()}

    def _process_sockets(self, proc: psutil.Process) -> dict[Hashable, TcpSocket] | None:
        try:
            return _sockets(proc.net_connections(kind="tcp"))
        except psutil.ZombieProcess:
            return {}
        except psutil.NoSuchProcess:
            raise ProcessGone from None
        except psutil.AccessDenied:
            return None
        except (psutil.Error, OSError):
            self._problem("tcp_table", "error")
            return None


def _same_by_psutil(ident: ProcessIdentity, create_time: float) -> bool:
    """The one identity rule (`model.same_process`) for a create time psutil computed
    from its own read of btime: a foreign reader's, so within its skew."""
    return same_process(ident, ProcessIdentity(ident.pid, create_time), tolerance=FOREIGN_CREATE_TIME_SKEW_S)
