"""The recovery actuator's OS side: identities, guarded signals, the command, the state file.

This module owns every side effect of recovery: reading a process's identity
fresh (from /proc, or through psutil with that probe backend) just before it is
signalled, sending SIGTERM/SIGKILL to a
process group or to single processes, running the configured command (an argv,
never a shell), and the JSON state file (atomic write under an fcntl lock).

It never decides whether to recover (policy.py does) and never signals a
process it has not just re-identified: PID 1, otelwatch itself, its ancestors,
and processes of users that are not allowed are refused here a second time,
whatever the caller asked for. OS errors are returned as results, not raised.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otelwatch.model import ProcessIdentity, same_process
from otelwatch.probe.backends import resolve, table_reader
from otelwatch.probe.procfs import ProcessGone, owner_uid
from otelwatch.probe.proctable import ProcessTable, ProcInfo, read_boot_time, read_proc
from otelwatch.sources.trust import resolve_users

log = logging.getLogger("otelwatch.recovery")

__all__ = [
    "GONE_STATES",
    "Guard",
    "ProcView",
    "SignalResult",
    "StateStore",
    "ancestors_of",
    "resolve_users",
    "run_command",
    "send_signal",
    "substitute",
]

GONE_STATES = frozenset({"Z", "X", "x"})  # exited: a zombie does no work and holds nothing


# --------------------------------------------------------------------------- who is who


def ancestors_of(pid: int, proc_root: str = "/proc", backend: str = "auto") -> frozenset[int]:
    """pid's ancestors (parent, grandparent, ...), read now."""
    return frozenset(table_reader(backend, proc_root).read().ancestors(pid))


class ProcView:
    """Fresh reads of single processes (never a cached table): identity, state, owner.
    `backend` is the probe's ([probe] backend), so identities are read as the probe read them."""

    def __init__(self, proc_root: str = "/proc", boot_time: float | None = None, backend: str = "auto") -> None:
        self.proc_root = proc_root
        self._psutil = resolve(backend, proc_root) == "psutil"
        # The boot time the daemon's probe computed its identities with: the strict identity
        # comparison is then exact (same float path), whatever btime does later.
        if boot_time is not None:
            self.boot_time = boot_time
        elif self._psutil:
            self.boot_time = table_reader("psutil").boot_time
        else:
            self.boot_time = read_boot_time(proc_root)

    def read(self, pid: int) -> ProcInfo | None:
        if pid <= 0:
            return None
        if self._psutil:
            from otelwatch.probe.psutil_backend import boot_offset, read_info

            got = read_info(pid, boot_offset(self.boot_time))
            return None if got is None else got[0]
        return read_proc(pid, self.proc_root, self.boot_time)

    def alive(self, ident: ProcessIdentity) -> bool:
        """True while that very process (same pid AND create time) exists and has not exited."""
        info = self.read(ident.pid)
        return info is not None and same_process(info.identity, ident) and info.state not in GONE_STATES

    def uid(self, pid: int) -> int | None:
        """The owner as the probe sees it (procfs.owner_uid), so the uid checked before a
        signal is the one the owner gate decided on; None when gone or unreadable."""
        if self._psutil:
            from otelwatch.probe.psutil_backend import effective_uid

            return effective_uid(pid)
        try:
            return owner_uid(pid, self.proc_root)
        except (OSError, ProcessGone):
            return None

    def table(self) -> ProcessTable:
        return table_reader("psutil" if self._psutil else "procfs", self.proc_root,
                            boot_time=self.boot_time).read()


# --------------------------------------------------------------------------- signals


@dataclass
class SignalResult:
    signalled: list[int] = field(default_factory=list)  # pids that were sent the signal
    group: int | None = None  # pgid signalled as a group, if any
    denied: list[int] = field(default_factory=list)  # EPERM
    refused: list[str] = field(default_factory=list)  # our own guards said no
    gone: list[int] = field(default_factory=list)  # vanished or reused before the signal

    def describe(self) -> str:
        parts = []
        if self.group is not None:
            parts.append(f"group {self.group}")
        if self.signalled:
            parts.append(f"pids {self.signalled}")
        if self.denied:
            parts.append(f"denied {self.denied}")
        if self.refused:
            parts.append("refused: " + ", ".join(self.refused))
        if self.gone:
            parts.append(f"already gone {self.gone}")
        return "; ".join(parts) or "nothing to signal"


@dataclass(frozen=True)
class Guard:
    """Processes that are never signalled, whatever a caller asks."""

    self_pid: int
    self_ancestors: frozenset[int]
    allowed_uids: frozenset[int]

    def refuse(self, pid: int) -> str:
        if pid <= 1:
            return f"pid {pid} is init or invalid"
        if pid == self.self_pid:
            return f"pid {pid} is otelwatch"
        if pid in self.self_ancestors:
            return f"pid {pid} is an ancestor of otelwatch"
        return ""


def _group_refusal(pgid: int, root: ProcInfo, snapshot: Collection[ProcessIdentity],
                   members: Sequence[ProcInfo], procs: ProcView, guard: Guard) -> str:
    """Why the process group may NOT be signalled as a whole ("" when it may)."""
    if pgid <= 1:
        return f"pgid {pgid}"
    with contextlib.suppress(OSError):
        if pgid == os.getpgid(0):
            return "otelwatch's own process group"
    if root.pgid != pgid:
        return f"root moved to group {root.pgid}"
    if not members:
        return "group is empty"
    for m in members:
        why = guard.refuse(m.pid)
        if why:
            return f"group has {why}"
        uid = procs.uid(m.pid)
        if uid is None or uid not in guard.allowed_uids:
            return f"group has pid {m.pid} of uid {uid}"
    leader = next((m for m in members if m.pid == pgid), None)
    if leader is not None and same_process(leader.identity, root.identity):
        return ""
    if all(any(same_process(m.identity, s) for s in snapshot) for m in members):
        return ""
    return "group has processes outside the session's tree"


def _pidfd_open(pid: int) -> int | None:
    """A pidfd pins the process: whatever is signalled through it is the process that had
    `pid` when it was opened, never a later one reusing the number. None where unsupported."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None or not hasattr(signal, "pidfd_send_signal"):
        return None
    try:
        fd: int = opener(pid)
        return fd
    except ProcessLookupError:
        raise
    except OSError:
        return None  # kernel without pidfd (ENOSYS), seccomp: fall back to kill(2)


def _signal_one(pid: int, ident: ProcessIdentity, sig: int, procs: ProcView,
                kill: Callable[[int, int], None] | None) -> str:
    """Signal one process after re-identifying it. Returns "sent", "gone" or "denied".

    The pidfd is opened BEFORE /proc is re-read: if the identity still matches then, the
    fd refers to that very process and the signal cannot reach a PID's next owner."""
    fd = None
    if kill is None:
        try:
            fd = _pidfd_open(pid)
        except ProcessLookupError:
            return "gone"
    try:
        info = procs.read(pid)
        if info is None or not same_process(info.identity, ident) or info.state in GONE_STATES:
            return "gone"
        try:
            if kill is not None:
                kill(pid, sig)
            elif fd is not None:
                signal.pidfd_send_signal(fd, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            return "denied"
        return "sent"
    finally:
        if fd is not None:
            os.close(fd)


def send_signal(
    sig: int,
    root: ProcessIdentity,
    pgid: int,
    snapshot: Sequence[ProcessIdentity],
    procs: ProcView,
    guard: Guard,
    kill: Callable[[int, int], None] | None = None,
    killpg: Callable[[int, int], None] = os.killpg,
) -> SignalResult:
    """Send `sig` to the session: its process group when that group is safely its own,
    then each snapshot process not reached through the group, each re-identified
    (pid + create time read fresh from /proc) just before its own signal.

    `kill` replaces the pidfd/kill(2) path (tests record calls with it)."""
    res = SignalResult()
    fresh_root = procs.read(root.pid)
    group_members: set[int] = set()
    if fresh_root is not None and same_process(fresh_root.identity, root) \
            and fresh_root.state not in GONE_STATES:
        members = [p for p in procs.table() if p.pgid == pgid] if pgid > 1 else []
        why = _group_refusal(pgid, fresh_root, snapshot, members, procs, guard)
        if why:
            res.refused.append(f"group not signalled: {why}")
        else:
            # Who was in the group, so that they do not get a second signal below.
            group_members = {p.pid for p in members}
            try:
                killpg(pgid, sig)
                res.group = pgid
            except ProcessLookupError:
                group_members = set()
            except PermissionError:
                res.denied.append(-pgid)
                group_members = set()
    for ident in snapshot:
        info = procs.read(ident.pid)
        if info is None or not same_process(info.identity, ident) or info.state in GONE_STATES:
            res.gone.append(ident.pid)
            continue
        if res.group is not None and ident.pid in group_members and info.pgid == pgid:
            res.signalled.append(ident.pid)
            continue
        why = guard.refuse(ident.pid)
        if not why:
            uid = procs.uid(ident.pid)
            if uid is None or uid not in guard.allowed_uids:
                why = f"pid {ident.pid} owned by uid {uid}"
        if why:
            res.refused.append(why)
            continue
        outcome = _signal_one(ident.pid, ident, sig, procs, kill)
        {"sent": res.signalled, "gone": res.gone, "denied": res.denied}[outcome].append(ident.pid)
    return res


def wait_gone(idents: Sequence[ProcessIdentity], timeout: float, procs: ProcView,
              stop: threading.Event, poll: float = 0.05) -> list[ProcessIdentity]:
    """Poll until every identity is gone or `timeout` passes (or `stop` is set).
    Returns the ones still alive."""
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        left = [i for i in idents if procs.alive(i)]
        remaining = deadline - time.monotonic()
        if not left or remaining <= 0 or stop.is_set():
            return left
        stop.wait(min(poll, remaining))


# --------------------------------------------------------------------------- command

_PLACEHOLDER = re.compile(r"\{(pid|pgid|session_id)\}")


def substitute(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Placeholders replaced per argument in one pass, so a session id that itself
    contains "{pid}" stays literal. The result is an argv, never a shell string."""
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in argv]


@dataclass(frozen=True)
class CommandResult:
    returncode: int | None  # None: did not finish (timeout, interrupted, could not start)
    detail: str


def run_command(argv: Sequence[str], timeout: float, stop: threading.Event) -> CommandResult:
    """Run argv (no shell) in its own session; on timeout its whole group is killed."""
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
    except OSError as exc:
        return CommandResult(None, f"could not start {argv[0]!r}: {exc}")
    deadline = time.monotonic() + timeout
    err = b""
    while True:
        try:
            _, err = proc.communicate(timeout=min(0.2, max(0.01, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() < deadline and not stop.is_set():
                continue
            # Still unreaped, so its pid (= its pgid) cannot have been reused yet.
            with contextlib.suppress(OSError):
                if proc.pid > 1:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            why = "interrupted by shutdown" if stop.is_set() else f"timed out after {timeout:g} s"
            return CommandResult(None, why)
    tail = err.decode("utf-8", "replace").strip()[-200:]
    return CommandResult(proc.returncode, f"exit {proc.returncode}" + (f": {tail}" if tail else ""))


# --------------------------------------------------------------------------- state file

STATE_VERSION = 1
STATE_MAX_BYTES = 16 << 20  # a real state file is a few kB; more is not ours to parse


class StateStore:
    """The recovery state file: JSON written to a temp file and renamed into place,
    every read and write under an exclusive fcntl lock on `<file>.lock`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the lock

    def load(self, check: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
        """The stored state, or an empty one. A corrupt or untrusted file is moved aside
        with a warning: losing the rate-limit record must not stop the daemon. `check`
        names what is wrong with the contents ("" when nothing); its verdict counts as corrupt."""
        empty: dict[str, Any] = {"version": STATE_VERSION, "recoveries": [], "escalations": [],
                                 "given_up": []}
        try:
            return self._load(empty, check)
        except OSError as exc:  # e.g. the state directory cannot be created
            log.warning("could not read recovery state file %s: %s; starting empty", self.path, exc)
            return empty

    def _load(self, empty: dict[str, Any], check: Callable[[dict[str, Any]], str] | None) -> dict[str, Any]:
        with self._locked():
            try:
                st = self.path.stat()
            except FileNotFoundError:
                return empty
            problem = ""
            if st.st_uid != os.geteuid():
                problem = f"owned by uid {st.st_uid}, not {os.geteuid()}"
            elif st.st_mode & 0o022:
                problem = "group- or world-writable"
            elif st.st_size > STATE_MAX_BYTES:
                problem = f"is too large ({st.st_size} bytes, at most {STATE_MAX_BYTES})"
            data: Any = None
            if not problem:
                try:
                    data = json.loads(self.path.read_text(encoding="utf-8"))
                    problem = _validate(data)
                    if not problem and check is not None:
                        problem = check(data)
                except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
                    problem = f"unreadable: {exc}"
            if problem:
                aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
                try:
                    os.replace(self.path, aside)
                    log.warning("recovery state file %s %s; moved aside to %s", self.path, problem, aside)
                except OSError as exc:
                    log.warning("recovery state file %s %s and could not be moved aside: %s",
                                self.path, problem, exc)
                return empty
            assert isinstance(data, dict)
            return data

    def save(self, data: Mapping[str, Any]) -> bool:
        """Write atomically; False (logged) when the disk said no."""
        try:
            with self._locked():
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(data, fh, sort_keys=True)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            return True
        except OSError as exc:
            log.warning("could not write recovery state file %s: %s", self.path, exc)
            return False


def _validate(data: Any) -> str:
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return "has an unknown format"
    if not isinstance(data.get("recoveries"), list) or not all(
            isinstance(t, (int, float)) for t in data["recoveries"]):
        return "has a bad 'recoveries' list"
    if not isinstance(data.get("escalations"), list) or not all(
            isinstance(e, dict) for e in data["escalations"]):
        return "has a bad 'escalations' list"
    if not isinstance(data.get("given_up", []), list):
        return "has a bad 'given_up' list"
    return ""
