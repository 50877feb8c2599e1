"""Sampling each session's process tree once per tick, with deadlines and PID-reuse safety.

The Prober owns: turning one ProcessTable plus the raw /proc readers of
procfs.py into one TreeSample per session, concurrently in a small pool of
daemon threads, within a deadline; CPU rates from each session's previous
sample; the per-tick sharing of TCP tables (one read per network namespace);
and a count of its own problems for the daemon to export.

It must never raise for one process or one session (the OS's errors become
SampleStatus values or counted problems), never let one hung read delay the
tick past its deadline, never merge the history of a reused PID, and never
signal or change anything: it only reads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from otelwatch.model import (
    FOREIGN_CREATE_TIME_SKEW_S,
    ProcessIdentity,
    ProcessSample,
    SampleStatus,
    TcpConnection,
    TreeSample,
    same_process,
)
from otelwatch.probe import procfs
from otelwatch.probe.fdmemo import Carried, FdMemo
from otelwatch.probe.pool import CANCELLED, DONE, RUNNING, Batch, Job, Pool
from otelwatch.probe.procfs import ProcessGone, TcpSocket, TcpTable
from otelwatch.probe.proctable import ProcessTable, ProcInfo

__all__ = ["Prober"]

# --------------------------------------------------------------------------- raw results


@dataclass
class _RawProc:
    """One process as read by a worker; the coordinator adds the CPU rate."""

    info: ProcInfo
    uid: int | None
    num_fds: int | None
    # Its TCP sockets by a key that is the same for one socket shared by several processes
    # (the inode here; the addresses where the inode is not known); None: unknown.
    sockets: dict[Hashable, TcpSocket] | None
    read_bytes: int | None
    write_bytes: int | None
    cmdline: tuple[str, ...]
    wchan: str | None
    cpu_known: bool = True  # False: info.cpu_seconds is a placeholder (not readable)
    run_wait: float | None = None  # seconds on a run queue since start (main thread); None: unknown
    sleeps: int | None = None  # voluntary context switches since start (main thread); None: unknown


@dataclass
class _RawTree:
    status: SampleStatus
    root: ProcessIdentity | None
    error: str = ""
    procs: list[_RawProc] = field(default_factory=list)
    tcp: dict[str, int] | None = None  # tree totals, counted once per socket inode
    listen: int = 0


# One TcpConnection per distinct socket (state and endpoints), shared by every sample
# that shows it, like procfs' formatted sockets. Bounded; cleared when full.
_CONNECTIONS: dict[TcpSocket, TcpConnection] = {}


def _connection(sock: TcpSocket) -> TcpConnection:
    conn = _CONNECTIONS.get(sock)
    if conn is None:
        if len(_CONNECTIONS) >= 65536:
            _CONNECTIONS.clear()
        conn = _CONNECTIONS[sock] = TcpConnection(sock.state, sock.local, sock.remote)
    return conn


def _tally(sockets: Iterable[TcpSocket]) -> tuple[dict[str, int], int]:
    """(count per non-LISTEN state, LISTEN count) of some TCP sockets."""
    tcp: dict[str, int] = {}
    listen = 0
    for sock in sockets:
        if sock.state == "LISTEN":
            listen += 1
        else:
            tcp[sock.state] = tcp.get(sock.state, 0) + 1
    return tcp, listen


@dataclass
class _History:
    monotonic: float
    wall: float
    # The previous sample: its processes' CPU seconds give this tick's rates, and its
    # unchanged parts are reused, not copied (a session holds a window of samples; most
    # of a quiet tree never changes).
    last: TreeSample
    # pid -> its run-queue wait (seconds) in `last`: kept here, not in the samples, as it
    # moves with every wake-up and would end the sharing of quiet processes' samples.
    waits: dict[int, float] = field(default_factory=dict)
    # pid -> its voluntary context switches in `last`, and since when it has not slept
    # (read at every sample since then with the count unchanged): what tells a loop from
    # a timer-driven process that a busy host keeps on a run queue between its sleeps.
    sleeps: dict[int, int] = field(default_factory=dict)
    awake: dict[int, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- per-tick sharing


class _Tick:
    """What all sessions of one tick share: TCP tables, read at most once per namespace."""

    def __init__(self, prober: Prober) -> None:
        self._prober = prober
        self._lock = threading.Lock()
        self._ns_locks: dict[str, threading.Lock] = {}
        self._tables: dict[str, TcpTable | None] = {}
        self._shared: dict[str, Any] = {}
        self._shared_locks: dict[str, threading.Lock] = {}

    def tcp_table(self, ns: str, pid: int) -> TcpTable | None:
        """The TCP table of namespace ns (read through pid, a process in it); None: unknown."""
        tables = self._tables
        if ns in tables:
            return tables[ns]
        with self._lock:
            ns_lock = self._ns_locks.setdefault(ns, threading.Lock())
        with ns_lock:
            if ns in tables:
                return tables[ns]
            try:
                table = self._prober._read_tcp_table(ns, pid)
            except ProcessGone:
                return None  # pid went away; another process of the namespace will try again
            tables[ns] = table
            return table

    def shared(self, key: str, read: Callable[[], Any]) -> Any:
        """read() at most once per tick for `key`, whichever worker asks first (for
        backends whose host-wide reads are not per network namespace)."""
        with self._lock:
            if key in self._shared:
                return self._shared[key]
            key_lock = self._shared_locks.setdefault(key, threading.Lock())
        with key_lock:
            if key not in self._shared:
                self._shared[key] = read()
            return self._shared[key]


# --------------------------------------------------------------------------- the prober


class Prober:
    """Samples sessions' process trees. `sample` is called from one thread (the collector
    loop); the reads themselves run in a pool of `max_workers` daemon threads.

    One worker by default: the reads are short and hold the GIL, so more threads only
    add hand-offs (measured: 6-9 ms per tick for 100 trees with one worker, 10-18 ms
    with two to eight). Isolation does not need more: a worker stuck in one session's
    read past a small budget is retired and replaced (see `Pool.unblock`)."""

    def __init__(
        self,
        proc_root: str = "/proc",
        max_workers: int = 1,
        clock: Callable[[], float] = time.time,
        *,
        _before_sample: Callable[[str], None] | None = None,
    ) -> None:
        self.proc_root = proc_root
        self._clock = clock
        # Test hook, called in the worker before a session is read. A real hang (a read
        # of /proc blocked in the kernel, e.g. a process in D state on a dead NFS or FUSE
        # mount) cannot be produced reliably and without privileges in a test, so tests
        # make this block for one session instead.
        self._before_sample = _before_sample
        self._pool = Pool(max_workers, "otelwatch-probe")
        self._history: dict[str, _History] = {}
        self._fds = FdMemo()
        self._inflight: dict[str, Job] = {}
        self._ticks = 0
        self._read_at: dict[str, int] = {}  # session -> the tick whose probe of it last finished
        self._problems: list[tuple[str, str]] = []
        self._problems_lock = threading.Lock()
        self._closed = False
        try:
            self._own_ns: str | None = procfs.net_namespace("self", proc_root)
        except (OSError, ProcessGone):
            self._own_ns = None
        # Netlink sees only our own namespace; once it has failed, do not try it again.
        self.netlink_ok = self._own_ns is not None
        # CPU demand (usage + run-queue wait) needs /proc/PID/schedstat; without it the
        # samples carry no demand and the spin rule reads usage.
        self.schedstat = procfs.read_run_wait("self", proc_root) is not None

    # ------------------------------------------------------------------ public

    def sample(
        self,
        table: ProcessTable,
        targets: Mapping[str, ProcessIdentity | int],
        timeout: float,
        *,
        with_wchan: bool = False,
        steady: Collection[str] = (),
    ) -> dict[str, TreeSample]:
        """One TreeSample for every target (session_id -> root identity or bare pid),
        returned within `timeout` plus a small margin whatever the reads do.

        Status per session: OK; VANISHED (root gone, or error "pid reused" when the
        root's create time differs from the target's); ZOMBIE (root exited, not
        reaped); ACCESS_DENIED (FDs/TCP of some process unreadable: those fields are
        None, the rest is filled); PROBE_TIMEOUT (overran `timeout`, or its previous
        probe still hangs, or the probe failed unexpectedly: see `error`).
        CPU rates need a previous sample of the same session: None until then.
        `with_wchan` also reads each process's kernel wait channel (for reports).
        `steady`: sessions whose verdict does not hinge on their sockets this tick (active,
        idle, long_running); their quiet processes may reuse the last FD scan (fdmemo.py).
        Everything else is read in full.
        """
        now = self._clock()
        deadline = time.monotonic() + max(0.0, timeout)
        results: dict[str, TreeSample] = {}
        if self._closed:
            for sid, target in targets.items():
                results[sid] = self._timeout_sample(now, target, table, "prober is shut down")
            return results

        runnable: dict[str, ProcessIdentity | int] = {}
        for sid, target in targets.items():
            job = self._inflight.get(sid)
            if job is not None:
                if job.state not in (DONE, CANCELLED):
                    # Its previous probe still hangs: do not pile another thread on it.
                    self._problem("tree", "timeout")
                    results[sid] = self._timeout_sample(now, target, table, "previous probe still running")
                    continue
                del self._inflight[sid]
            runnable[sid] = target
        self._ticks += 1
        batch = Batch(len(runnable))
        tick = _Tick(self)
        # Least recently read first: when the deadline cuts a tick short (a loaded host), the
        # sessions it cut go first next tick, so none stays unread tick after tick behind the
        # same others (measured: sessions of a dozen unread 26-38 ticks in a row).
        order = sorted(runnable, key=lambda sid: self._read_at.get(sid, 0))
        to_run = {sid: Job(self._read_tree, (sid, runnable[sid], table, tick, with_wchan, sid in steady), batch)
                  for sid in order}
        if to_run:
            self._pool.submit(to_run.values())
            # A tree's probe takes well under a millisecond per process; one that runs
            # past this budget is probably hung in the kernel, and the sessions queued
            # behind it must not pay for it: its worker is set aside and replaced.
            budget = max(0.05, timeout / 10)
            while not batch.wait(min(budget / 2, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    break
                self._pool.unblock(budget)

        for sid, job in to_run.items():
            state = job.state if job.state == DONE else self._pool.abandon(job)
            target = targets[sid]
            if state == DONE:
                self._read_at[sid] = self._ticks
            if state != DONE:
                if state == RUNNING:
                    self._inflight[sid] = job
                self._problem("tree", "timeout")
                results[sid] = self._timeout_sample(now, target, table, f"probe overran {timeout:g} s")
            elif job.error is not None:
                self._problem("tree", "error")
                # No status means "could not say"; a timeout is the closest and is never read
                # as idle or stuck by the classifier.
                results[sid] = self._timeout_sample(
                    now, target, table, f"probe error: {type(job.error).__name__}: {job.error}")
            else:
                results[sid], history = _tree_sample(job.result, self._history.get(sid), table, now,
                                                     self.schedstat)
                if history is not None:
                    self._history[sid] = history
        if len(self._fds) > 64 and len(self._fds) > 2 * sum(len(s.processes) for s in results.values()):
            self._fds.keep_only(table)
        return results

    def forget(self, session_id: str) -> None:
        """The session ended: drop its CPU history (and stop tracking a hung probe of it)."""
        self._history.pop(session_id, None)
        self._inflight.pop(session_id, None)
        self._read_at.pop(session_id, None)

    def take_problems(self) -> list[tuple[str, str]]:
        """(kind, "timeout" | "error") for each probe problem since the last call.
        Kinds: "tree" (a session's probe), "tcp_table", "fd", "io"."""
        with self._problems_lock:
            out, self._problems = self._problems, []
        return out

    def wchan(self, pid: int) -> str | None:
        """pid's kernel wait channel now, for reports; None when unknown or gone."""
        try:
            return procfs.read_wchan(pid, self.proc_root)
        except ProcessGone:
            return None

    def cwd(self, pid: int) -> str | None:
        """pid's working directory now; None when unknown or gone."""
        try:
            return os.readlink(f"{self.proc_root}/{pid}/cwd")
        except OSError:
            return None

    @property
    def hung_threads(self) -> int:
        """Worker threads still stuck in a probe that overran its deadline."""
        return self._pool.hung_threads()

    def shutdown(self, timeout: float = 2.0) -> None:
        """Stop the workers; idempotent. Threads hung in the kernel are daemons and are left."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(timeout)

    # ------------------------------------------------------------------ internals

    def _problem(self, kind: str, what: str) -> None:
        with self._problems_lock:
            self._problems.append((kind, what))
            if len(self._problems) > 10000:  # nobody is taking them: stay bounded
                del self._problems[:5000]

    def _timeout_sample(self, now: float, target: ProcessIdentity | int, table: ProcessTable,
                        error: str) -> TreeSample:
        if isinstance(target, ProcessIdentity):
            root: ProcessIdentity | None = target
        else:
            info = table.get(target)
            root = None if info is None else info.identity
        return TreeSample(time=now, status=SampleStatus.PROBE_TIMEOUT, root=root, error=error)

    def _read_tcp_table(self, ns: str, pid: int) -> TcpTable | None:
        """One namespace's TCP table; None when it cannot be read (counted as a problem)."""
        if ns == self._own_ns and self.netlink_ok:
            try:
                return procfs.netlink_tcp_table()
            except procfs.NetlinkUnsupported:
                self.netlink_ok = False
                self._problem("tcp_table", "error")
            except OSError:
                self._problem("tcp_table", "error")
        try:
            return procfs.proc_tcp_table(pid, self.proc_root)  # ProcessGone goes to the caller
        except OSError:
            self._problem("tcp_table", "error")
            return None

    def _read_tree(self, sid: str, target: ProcessIdentity | int, table: ProcessTable, tick: _Tick,
                   with_wchan: bool, steady: bool = False) -> _RawTree:
        """Runs in a worker: everything but the CPU rates (the coordinator owns history)."""
        if self._before_sample is not None:
            self._before_sample(sid)
        pid = target.pid if isinstance(target, ProcessIdentity) else int(target)
        info = table.get(pid)
        if info is None:
            root = target if isinstance(target, ProcessIdentity) else None
            return _RawTree(SampleStatus.VANISHED, root, "no such process")
        if isinstance(target, ProcessIdentity) and not same_process(target, info.identity):
            return _RawTree(SampleStatus.VANISHED, target, "pid reused")

        raw = _RawTree(SampleStatus.OK, info.identity)
        # The run-queue wait and the count of voluntary sleeps are read for processes that
        # ran or wanted to: on a CPU or a run queue now, or CPU time moved since the last
        # sample. One that slept through the interval without a tick of CPU is no loop,
        # and most processes of most trees do; they cost no read (their wait counts as
        # none, and they count as having slept).
        hist = self._history.get(sid) if self.schedstat else None
        quiet = {(q.pid, q.create_time): q.cpu_seconds for q in hist.last.processes} if hist is not None else {}
        denied: list[str] = []
        # Per inode: a socket shared by parent and child is one connection.
        tree_sockets: dict[Hashable, TcpSocket] = {}
        tcp_known = True
        for i, p in enumerate((info, *(table.get(c) for c in table.descendants(pid)))):
            if p is None:
                continue
            try:
                wait = self.schedstat and (p.state == "R" or quiet.get((p.pid, p.create_time)) != p.cpu_seconds)
                proc = self._read_proc(p, table, tick, with_wchan, steady, wait)
            except ProcessGone:
                if i == 0:
                    return _RawTree(SampleStatus.VANISHED, info.identity, "exited")
                continue  # a child that ended mid-sample is simply not in the tree
            if proc.num_fds is None:
                denied.append(str(p.pid))
            if proc.sockets is None:
                tcp_known = False
            else:
                tree_sockets.update(proc.sockets)
            raw.procs.append(proc)

        tcp, raw.listen = _tally(tree_sockets.values())  # LISTEN: what could be read
        raw.tcp = tcp if tcp_known else None
        if info.state == "Z":
            raw.status, raw.error = SampleStatus.ZOMBIE, "exited, not yet reaped"
        elif denied:
            raw.status = SampleStatus.ACCESS_DENIED
            raw.error = "file descriptors not readable for pid " + ",".join(denied[:5])
        return raw

    def _read_proc(self, p: ProcInfo, table: ProcessTable, tick: _Tick, with_wchan: bool,
                   steady: bool = False, wait: bool = False) -> _RawProc:
        """One process; raises ProcessGone if it ended while being read."""
        root = self.proc_root
        pid = p.pid
        # A steady session's process: one stat says both who owns it and whether its FD
        # table may be carried over (fdmemo.py).
        fd_dir = procfs.fd_dir_stat(pid, root) if steady and p.state != "Z" else None
        uid: int | None = None
        if fd_dir is not None:
            uid = fd_dir.st_uid
        else:
            try:
                uid = procfs.owner_uid(pid, root)
            except OSError:
                uid = None
        num_fds: int | None = None
        sockets: dict[Hashable, TcpSocket] | None = None
        carried: Carried | None = None
        io: procfs.IoCounters | None = None
        scan: procfs.FdScan | None = None
        if p.state == "Z":
            num_fds, sockets = 0, {}  # a zombie holds no files
        else:
            tcp_table: TcpTable | None = None
            if fd_dir is not None:
                if self._fds.has_tcp(pid):
                    tcp_table = self._table_for(pid, tick)
                carried = self._fds.carry(p, fd_dir.st_size, tcp_table)
                if carried is not None:
                    scan, io = carried.scan, carried.io
            if scan is None:
                try:
                    scan = procfs.scan_fds(pid, root)
                except OSError:
                    self._problem("fd", "error")
                    scan = None
            if scan is not None:
                num_fds = scan.num_fds
                if not scan.sockets:
                    sockets = {}
                else:
                    if tcp_table is None:  # not fetched yet (no carried scan checked it)
                        tcp_table = self._table_for(pid, tick)
                    if tcp_table is not None:
                        # Inodes not in the table are UDP or unix sockets.
                        sockets = {i: s for i in scan.sockets if (s := tcp_table.get(i)) is not None}
        if carried is None:
            try:
                io = procfs.read_io(pid, root)
            except OSError:
                self._problem("io", "error")
                io = None
            if scan is not None and sockets is not None and p.state != "Z":
                self._fds.remember(p, scan, frozenset(k for k in sockets if isinstance(k, int)), io)
        return _RawProc(
            info=p,
            uid=uid,
            num_fds=num_fds,
            sockets=sockets,
            read_bytes=None if io is None else io.read_bytes,
            write_bytes=None if io is None else io.write_bytes,
            cmdline=table.cmdline(pid),
            wchan=procfs.read_wchan(pid, root) if with_wchan else None,
            run_wait=procfs.read_run_wait(pid, root) if wait else None,
            sleeps=procfs.read_voluntary_switches(pid, root) if wait else None,
        )

    def _table_for(self, pid: int, tick: _Tick) -> TcpTable | None:
        try:
            ns = procfs.net_namespace(pid, self.proc_root)
        except OSError:
            ns = None
        if ns is None:
            return None
        return tick.tcp_table(ns, pid)


def _tree_sample(raw: _RawTree, prev: _History | None, table: ProcessTable,
                 now: float, schedstat: bool = False) -> tuple[TreeSample, _History | None]:
    """Coordinator side: CPU rates from the session's history, then the TreeSample and
    the history the next tick's rates start from (None: keep the one there was)."""
    if not raw.procs:
        return TreeSample(time=now, status=raw.status, root=raw.root, error=raw.error), None
    dt = 0.0 if prev is None else table.monotonic - prev.monotonic
    last = prev.last if prev is not None else None
    before_by_pid = {s.pid: s for s in last.processes} if last is not None else {}
    samples: list[ProcessSample] = []
    waits: dict[int, float] = {}
    before_waits = prev.waits if prev is not None else {}
    sleeps: dict[int, int] = {}
    awake: dict[int, float] = {}
    before_sleeps = prev.sleeps if prev is not None else {}
    wait_rate = 0.0  # run-queue wait of the tree, percent of one core (a process without a reading: none)
    tree_rate = 0.0
    root_rate: float | None = None
    cpu_unknown = False
    rss = threads = 0
    cpu_seconds = 0.0
    fds: int | None = 0
    read_b: int | None = 0
    write_b: int | None = 0
    for i, rp in enumerate(raw.procs):
        p = rp.info
        before_sample = before_by_pid.get(p.pid)
        rate: float | None = None
        wait = rp.run_wait
        waited: float | None = None  # seconds of run-queue wait in this interval
        if wait is not None:
            waits[p.pid] = wait
        if rp.sleeps is not None:
            sleeps[p.pid] = rp.sleeps
        if prev is not None and dt > 0:
            before_ident = None if before_sample is None else ProcessIdentity(p.pid, before_sample.create_time)
            if before_sample is not None and same_process(before_ident, p.identity):
                rate = max(0.0, p.cpu_seconds - before_sample.cpu_seconds) / dt * 100.0
                w0 = before_waits.get(p.pid)
                waited = None if wait is None or w0 is None else max(0.0, wait - w0)
                if rp.sleeps is not None and before_sleeps.get(p.pid) == rp.sleeps:
                    awake[p.pid] = prev.awake.get(p.pid, prev.last.time)  # not asleep once since
            elif p.create_time > prev.wall - FOREIGN_CREATE_TIME_SKEW_S:
                # Born since the previous sample: all its CPU time is new. (A create time
                # against the wall clock: btime's whole seconds make it up to a second early.)
                rate = p.cpu_seconds / dt * 100.0
                waited = wait
                if rp.sleeps == 0:
                    awake[p.pid] = prev.last.time
        if not rp.cpu_known:
            rate, cpu_unknown = None, True
        if rate is not None:
            tree_rate += rate
            if waited is not None:
                wait_rate += waited / dt * 100.0
        if i == 0:
            root_rate = rate
        tcp: Mapping[str, int] | None = None
        listen = 0
        conns: tuple[TcpConnection, ...] = ()
        if rp.sockets is not None:
            tcp, listen = _tally(rp.sockets.values())
            conns = tuple(_connection(s) for s in rp.sockets.values() if s.state != "LISTEN")
            if before_sample is not None:
                tcp = before_sample.tcp if before_sample.tcp == tcp else tcp
                conns = before_sample.connections if before_sample.connections == conns else conns
        b = before_sample
        if (b is not None and b.cpu_seconds == p.cpu_seconds and b.cpu_percent == rate
                and b.rss_bytes == p.rss_bytes and b.status == p.state and b.threads == p.threads
                and b.num_fds == rp.num_fds and b.tcp is tcp and b.connections is conns and b.listen == listen
                and b.read_bytes == rp.read_bytes and b.write_bytes == rp.write_bytes and b.uid == rp.uid
                and b.wchan == rp.wchan and b.create_time == p.create_time and b.ppid == p.ppid
                and b.pgid == p.pgid and b.name == p.comm and b.cmdline == rp.cmdline):
            samples.append(b)  # unchanged (the usual quiet process): the same object again
        else:
            samples.append(ProcessSample(
                pid=p.pid, ppid=p.ppid, create_time=p.create_time, name=p.comm, status=p.state,
                cpu_seconds=p.cpu_seconds, cpu_percent=rate, rss_bytes=p.rss_bytes,
                threads=p.threads, pgid=p.pgid, uid=rp.uid, num_fds=rp.num_fds, tcp=tcp,
                listen=listen, connections=conns, read_bytes=rp.read_bytes,
                write_bytes=rp.write_bytes, cmdline=rp.cmdline, wchan=rp.wchan,
            ))
        rss += p.rss_bytes
        threads += p.threads
        cpu_seconds += p.cpu_seconds
        fds = None if fds is None or rp.num_fds is None else fds + rp.num_fds
        read_b = None if read_b is None or rp.read_bytes is None else read_b + rp.read_bytes
        write_b = None if write_b is None or rp.write_bytes is None else write_b + rp.write_bytes
    processes = tuple(samples)
    if last is not None and len(last.processes) == len(processes) and all(
            a is b for a, b in zip(last.processes, processes, strict=True)):
        processes = last.processes
    cpu_percent = None if root_rate is None or cpu_unknown else tree_rate
    tree = TreeSample(
        time=now,
        status=raw.status,
        root=_reuse(raw.root, last and last.root),
        processes=processes,
        cpu_percent=_reuse(cpu_percent, last and last.cpu_percent),
        cpu_seconds=_reuse(cpu_seconds, last and last.cpu_seconds),
        rss_bytes=_reuse(rss, last and last.rss_bytes),
        threads=threads,
        num_fds=fds,
        tcp=_reuse(raw.tcp, last and last.tcp),
        listen=raw.listen,
        children=len(samples) - 1,
        read_bytes=_reuse(read_b, last and last.read_bytes),
        write_bytes=_reuse(write_b, last and last.write_bytes),
        error=raw.error,
        cpu_demand_percent=None if cpu_percent is None or not schedstat else cpu_percent + wait_rate,
        awake_since=min(awake.values()) if awake else None,
    )
    return tree, _History(table.monotonic, table.time, tree, waits, sleeps, awake)


_T = TypeVar("_T")


def _reuse(new: _T, old: object) -> _T:
    """`old` when it equals `new` (and is of its type: 0 is not 0.0): the object a
    previous sample already holds, instead of one more copy of the same number."""
    if old is not None and type(old) is type(new) and old == new:
        return old
    return new
