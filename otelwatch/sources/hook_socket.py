"""The hook socket: how `otelwatch hook` delivers a session's *own* events to a running daemon.

Why a socket: an event may open a turn that recovery counts on only when it comes
from the session itself (DESIGN "Trust boundaries"). A hook's word alone proves
nothing (any process can run `otelwatch hook claude` with any payload), and a
spool line is read after its writer is gone. On a unix socket the kernel tells
the daemon who is connected (SO_PEERCRED: pid and uid, translated into the
daemon's PID namespace), and the hook is still alive, blocked on the answer, while
the daemon walks its ancestry in /proc. So the check happens when the event
arrives, on the kernel's word, not the client's.

The walk (`ancestry`) reads /proc/PID/stat of the peer and each parent in turn.
Each step must be a process that started no later than its child (a parent
always does): a PID that was freed and reused by a newer process ends the walk,
so a dying intermediate can only make the chain shorter (observed), never make a
stranger an ancestor. The peer itself is read again after the walk: the same
process, so its PID was not reused meanwhile. The session table makes the event
own only for a session whose root process is in that chain (the hook runs inside
its tree: Claude Code may run hooks from any of its processes, through a shell or
not), and applies it only to sessions of the peer's user (root: any).

Protocol: one JSON object (at most MAX_MESSAGE bytes) then end of writing; the
daemon answers `ok\\n` once the event is queued, or closes without answering. The
client (`send`) gives up within its timeout and the hook falls back to the spool
(observed). The socket lives in otelwatch's state directory (which only its user
may write), with mode 0666 when the daemon runs as root so every user's hooks can
reach it, 0600 otherwise. A client only talks to a socket owned by itself or root.

One thread serves it, one connection at a time, each bounded by CONN_TIMEOUT_S;
nothing here touches the session table (events go through the inbox).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from otelwatch.model import ProcessIdentity
from otelwatch.probe.proctable import read_proc
from otelwatch.sources.hookpath import MAX_MESSAGE, send, socket_paths

__all__ = ["CONN_TIMEOUT_S", "MAX_MESSAGE", "HookSocket", "ancestry", "send", "socket_paths"]

CONN_TIMEOUT_S = 0.5
LOG_EVERY_S = 60.0
MAX_DEPTH = 64


def ancestry(pid: int, boot_time: float, proc_root: str = "/proc") -> list[tuple[ProcessIdentity, str]]:
    """(identity, comm) of `pid` and its ancestors, nearest first, as far as the chain is
    sound (each parent started no later than its child); [] when `pid` is gone."""
    out: list[tuple[ProcessIdentity, str]] = []
    info = read_proc(pid, proc_root, boot_time)
    if info is None:
        return out
    first = info
    while info is not None and len(out) < MAX_DEPTH:
        out.append((info.identity, info.comm))
        if info.ppid <= 0:
            break
        parent = read_proc(info.ppid, proc_root, boot_time)
        if parent is None or parent.create_time > info.create_time:
            break  # gone, or a newer process reusing the parent's PID: not an ancestor
        info = parent
    again = read_proc(pid, proc_root, boot_time)
    if again is None or again.identity != first.identity:
        return []  # the peer is gone: nothing can be said of what it was
    return out


class HookSocket:
    """Listens at `path`; hands each message to `deliver(payload, ancestry, peer_uid)`
    (on this thread: it must only queue). `boot_time`: the daemon's one boot time, so
    that identities compare exactly with the probe's."""

    def __init__(self, path: Path, boot_time: float,
                 deliver: Callable[[Any, tuple[ProcessIdentity, ...], int], bool],
                 log: Callable[[str, dict[str, Any], str], None], proc_root: str = "/proc") -> None:
        self.path = Path(path)
        self._boot = boot_time
        self._deliver = deliver
        self._log = log
        self._proc_root = proc_root
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.served = 0
        self.refused = 0
        self._logged_at = -LOG_EVERY_S

    def start(self) -> HookSocket:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
                raise OSError(f"{self.path} exists and is not this user's socket")
            os.unlink(self.path)  # a previous daemon's (one daemon per state directory: the lock)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o666 if os.geteuid() == 0 else 0o600)
            sock.listen(64)
            sock.settimeout(0.5)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="otelwatch-hook-socket", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            with conn:
                try:
                    self._one(conn)
                except Exception as exc:  # one bad client never stops the listener
                    self.refused += 1
                    now = time.monotonic()
                    if now - self._logged_at >= LOG_EVERY_S:  # a flood of junk is one line a minute
                        self._logged_at = now
                        self._log("hook_socket.error", {"error": repr(exc)[:200], "refused": self.refused},
                                  "warning")

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(CONN_TIMEOUT_S)
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
        data = bytearray()
        while len(data) <= MAX_MESSAGE:
            chunk = conn.recv(MAX_MESSAGE + 1 - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) > MAX_MESSAGE:
            self.refused += 1
            return
        payload = json.loads(data)
        # Checked now, while the hook waits for our answer (so it is alive and its PID its own).
        chain = tuple(i for i, _ in ancestry(pid, self._boot, self._proc_root)) if pid > 0 else ()
        if self._deliver(payload, chain, uid):
            self.served += 1
            conn.sendall(b"ok\n")
        else:
            self.refused += 1
