"""What the daemon remembers of each live session across a restart: `SessionMemory`.

A restarted daemon reads turns and open tools back from the sessions' own files
(transcripts, Claude Code's session file). What only the daemon knew is kept here,
in a small JSON file in its state directory (`sessions.json`): per process
identity (pid, create_time), when the session's silence began (its last progress,
also for sessions whose progress clock is their tree's CPU), its last heartbeat
and event, its state, reason and since when, its stall count and longest silence.
So a session that was stalled before a restart is stalled after it with its true
silence, and one that had no progress is never `active/recent_progress` again.

The file is written atomically (temp file + rename, mode 0600), at most every
`SAVE_EVERY_S` and at stop, holds live sessions only (at most `MAX_ENTRIES`), and
is read only when it is a regular file (never through a symlink) owned by the
user otelwatch runs as and not group- or world-writable, in a directory that
passes the same check; a value of the wrong type drops that entry, never the loop.
An entry is applied only to the process with the same identity (PID reuse never
inherits it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from otelwatch.model import ProcessIdentity, Reason, State, Verdict, same_process
from otelwatch.sessions.table import Tracked
from otelwatch.sources.trust import untrusted_dir, untrusted_file

__all__ = ["MAX_BYTES", "MAX_ENTRIES", "SAVE_EVERY_S", "Remembered", "SessionMemory"]

MAX_ENTRIES = 2000
MAX_BYTES = 1 << 20
SAVE_EVERY_S = 2.0
KEEP_S = 7 * 86400.0  # an entry older than this is of a process long gone
_VERSION = 1


@dataclass(frozen=True)
class Remembered:
    identity: ProcessIdentity
    key: str
    silence_since: float  # when its silence began (last progress, or its start)
    last_heartbeat: float | None
    last_event: float | None
    state: State
    reason: Reason
    state_since: float
    stalls: int
    longest_silence: float
    saved_at: float

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.identity.pid, "create_time": self.identity.create_time, "key": self.key,
                "silence_since": self.silence_since, "last_heartbeat": self.last_heartbeat,
                "last_event": self.last_event, "state": self.state.value, "reason": self.reason.value,
                "state_since": self.state_since, "stalls": self.stalls,
                "longest_silence": self.longest_silence, "saved_at": self.saved_at}

    @classmethod
    def from_json(cls, d: Any, now: float) -> Remembered | None:
        """The entry, or None when any value is missing, of the wrong type or out of range."""
        try:
            if not isinstance(d, dict):
                return None
            pid = d["pid"]
            if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 1 << 22:
                return None
            times = [_time(d[k], now) for k in ("create_time", "silence_since", "state_since", "saved_at")]
            hb, ev = (None if d.get(k) is None else _time(d[k], now) for k in ("last_heartbeat", "last_event"))
            stalls = d["stalls"]
            if isinstance(stalls, bool) or not isinstance(stalls, int) or not 0 <= stalls < 1 << 31:
                return None
            key = d["key"]
            if not isinstance(key, str) or not 0 < len(key) <= 4096:
                return None
            longest = _time(d["longest_silence"], now)
            state, reason = State(d["state"]), Reason(d["reason"])
        except (KeyError, ValueError, TypeError):
            return None
        create_time, silence_since, state_since, saved_at = times
        if now - saved_at > KEEP_S:
            return None
        return cls(ProcessIdentity(pid, create_time), key, silence_since, hb, ev, state, reason, state_since,
                   stalls, longest, saved_at)


def _time(value: Any, now: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("not a number")
    v = float(value)
    if not math.isfinite(v) or not 0.0 <= v <= now + 86400.0:
        raise ValueError("out of range")
    return v


class SessionMemory:
    """The state directory's `sessions.json`: `load` once at start, `restore` each new
    session from it, `save` the live sessions every SAVE_EVERY_S (and at stop)."""

    def __init__(self, path: Path, uid: int | None = None) -> None:
        self.path = Path(path)
        self.uid = os.geteuid() if uid is None else uid
        self._entries: dict[int, Remembered] = {}  # by pid
        self._applied: set[int] = set()  # id() of the Tracked records already restored
        self._saved_at = -math.inf
        self.problem = ""  # why the file was not read or written ("" when it was fine)

    def load(self, now: float) -> int:
        """Read the file; returns how many entries were taken. Never raises."""
        self._entries = {}
        why = untrusted_dir(self.path.parent, self.uid, "state directory")
        if why:
            self.problem = why
            return 0
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            self.problem = f"{self.path}: {exc.strerror or exc}"
            return 0
        try:
            why = untrusted_file(os.fstat(fd), self.uid, self.path)
            if why:
                self.problem = why
                return 0
            raw = os.read(fd, MAX_BYTES + 1)
        except OSError as exc:
            self.problem = f"{self.path}: {exc.strerror or exc}"
            return 0
        finally:
            os.close(fd)
        if len(raw) > MAX_BYTES:
            self.problem = f"{self.path} is larger than {MAX_BYTES} bytes"
            return 0
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            self.problem = f"{self.path} is not JSON"
            return 0
        items = data.get("sessions") if isinstance(data, dict) and data.get("version") == _VERSION else None
        if not isinstance(items, list):
            return 0
        for item in items[:MAX_ENTRIES]:
            entry = Remembered.from_json(item, now)
            if entry is not None:
                self._entries[entry.identity.pid] = entry
        return len(self._entries)

    def restore(self, sessions: Iterable[Tracked]) -> list[Tracked]:
        """Give each session seen for the first time what was remembered of its process."""
        restored = []
        for tracked in sessions:
            if id(tracked) in self._applied or tracked.identity is None:
                continue
            self._applied.add(id(tracked))
            entry = self._entries.pop(tracked.identity.pid, None)
            if entry is None or not same_process(entry.identity, tracked.identity):
                continue
            a = tracked.activity
            tracked.activity = replace(
                a,
                last_progress_time=_later(a.last_progress_time, entry.silence_since),
                last_heartbeat_time=_later(a.last_heartbeat_time, entry.last_heartbeat),
                last_event_time=_later(a.last_event_time, entry.last_event),
            )
            tracked.stalls = max(tracked.stalls, entry.stalls)
            tracked.longest_silence = max(tracked.longest_silence, entry.longest_silence)
            if tracked.verdict is None:
                # The verdict before the restart: no new transition into the same state, its
                # state_since kept, and a stalled reason held as the window refills.
                tracked.verdict = Verdict(entry.state, entry.reason, 0.0)
                tracked.state_since = entry.state_since
            restored.append(tracked)
        if len(self._applied) > 4 * MAX_ENTRIES:
            self._applied = {id(t) for t in sessions}
        return restored

    def save(self, sessions: Iterable[Tracked], now: float, *, force: bool = False) -> bool:
        """Write the live sessions (atomically); at most every SAVE_EVERY_S unless `force`."""
        if not force and now - self._saved_at < SAVE_EVERY_S:
            return False
        self._saved_at = now
        entries = [e.to_json() for t in sessions if (e := _entry(t, now)) is not None][:MAX_ENTRIES]
        body = json.dumps({"version": _VERSION, "saved_at": now, "sessions": entries},
                          separators=(",", ":")).encode()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            self.problem = f"{self.path}: {exc.strerror or exc}"
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
        return True


def _later(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def _entry(t: Tracked, now: float) -> Remembered | None:
    v = t.verdict
    if t.ended_at is not None or t.identity is None or v is None or v.state is State.EXITED:
        return None
    a = t.activity
    return Remembered(t.identity, t.key, max(0.0, now - v.silence_s), a.last_heartbeat_time, a.last_event_time,
                      v.state, v.reason, t.state_since, t.stalls, t.longest_silence, now)

