"""opencode's own record: its SQLite event log, read as a session's event stream.

opencode 1.18.33 keeps everything in `<data>/opencode/opencode.db` (`<data>` is
`$XDG_DATA_HOME`, default `~/.local/share`), in WAL mode. Its `event` table is
an ordered log per session (`aggregate_id` = session id, `seq` = 0, 1, 2 ...,
`type`, `data` JSON), written as the session works (measured):

- `message.updated.1` with `info.role` "user": a prompt, opening a turn; with
  "assistant": the model's answer, which ends the turn once `info.time.completed`
  is set, unless it asks for tools (`finish` "tool-calls");
- `message.part.updated.1`: a part of a message; a `tool` part is written when the
  tool starts (`state.status` pending/running) and again when it ends
  (completed/error), so an open tool call is seen at its start; `step-start` is an
  API call beginning (not progress by itself), text/reasoning/step-finish are output;
- retries (`*retry*` types, with `attempt` and the next attempt's time `at`/`next`):
  heartbeats with their schedule; `session.updated.1` and the like: state.

1.18.33 writes no row for a failed attempt: its logfmt log (`<data>/opencode/log/
opencode.log`, shared by all runs) has one `message="stream error"` line per failed
attempt with `session.id=`: those of the session's main call are retry heartbeats.

Reading it never slows the agent: only a database in WAL mode is opened (its
header says so; in WAL mode readers never block the writer), read-only
(`file:...?mode=ro`, `PRAGMA query_only`), with no busy timeout (a lock we would
have to wait for skips this tick instead), one short query per tick, never a
write and never a checkpoint (a read-only connection cannot checkpoint, and
closing it deletes nothing). `immutable=1` is wrong for a live database: it
ignores the WAL, where opencode keeps all of its recent data (measured: on a
running opencode's database `immutable=1` saw no tables at all, `mode=ro` read
the 16 events of the session in 2 ms).

`parse_event_row` is pure; `find_session` and `OpencodeFeed` read the database.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import stat
from collections.abc import Callable, Collection
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from otelwatch.model import Event, EventKind
from otelwatch.sources.tail import FileTail

__all__ = ["DB_NAME", "SEPARATOR", "NotWal", "OpencodeFeed", "feed_path", "find_session", "in_wal_mode",
           "parse_event_row", "parse_log_line", "split_path"]

DB_NAME = "opencode.db"
SEPARATOR = "#session="  # events_path of an opencode session: "<db>#session=<id>"
_ROWS_PER_POLL = 500
_SLACK_MS = 5000
_TOOL_OPEN = frozenset({"pending", "running"})
_TOOL_CLOSE = frozenset({"completed", "error"})
_OUTPUT_PARTS = frozenset({"text", "reasoning", "step-finish", "patch", "file", "snapshot", "agent", "subtask"})


def feed_path(db: Path, session_id: str) -> str:
    return f"{db}{SEPARATOR}{session_id}"


def split_path(path: str) -> tuple[str, str] | None:
    """(database, session id) of an opencode events path; None for any other path."""
    db, sep, sid = path.partition(SEPARATOR)
    return (db, sid) if sep and db and sid else None


class NotWal(sqlite3.Error):
    """The database is not (yet) in WAL mode: a reader's lock could delay the agent's writes."""


def in_wal_mode(db: str) -> bool:
    """Whether the database file's header says WAL (bytes 18 and 19 are 2), read with a
    plain read that takes no lock. opencode creates its database and switches it to WAL at
    start; until then (and for any other journal mode) a reader's shared lock would make
    the agent's commits wait, so it is not opened."""
    try:
        with open(db, "rb") as fh:
            header = fh.read(20)
    except OSError:
        return False
    if not (len(header) == 20 and header[:16] == b"SQLite format 3\x00" and header[18] == 2 and header[19] == 2):
        return False
    # A reader opening a WAL database whose -wal and -shm are gone would create them: leave it.
    return os.path.isfile(db + "-wal") and os.path.isfile(db + "-shm")


def _connect(db: str) -> sqlite3.Connection:
    if not in_wal_mode(db):
        raise NotWal(f"{db}: not in WAL mode")
    uri = "file:" + db.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=0.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only = 1")
    return conn


def find_session(data_dir: Path, cwd: str | None, started_at: float, free: Callable[[Path], bool],
                 owned: Callable[[os.stat_result], bool]) -> tuple[str, Path] | None:
    """(session id, events path as a Path) of an opencode process: the newest top-level
    session of its working directory updated since it started, that `free` says is not
    another process's; None when there is none yet (the TUI creates its session at
    the first prompt)."""
    if cwd is None:
        return None
    db = data_dir / DB_NAME
    try:
        st = db.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or not owned(st):
        return None
    try:
        conn = _connect(str(db))
    except sqlite3.Error:
        return None
    try:
        rows = conn.execute(
            "SELECT id, directory FROM session WHERE parent_id IS NULL AND time_updated >= ? "
            "ORDER BY time_updated DESC LIMIT 50", (int(started_at * 1000) - _SLACK_MS,)).fetchall()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    want = os.path.normpath(cwd)
    for sid, directory in rows:
        if not isinstance(sid, str) or not isinstance(directory, str) or os.path.normpath(directory) != want:
            continue
        path = Path(feed_path(db, sid))
        if free(path):
            return sid, path
    return None


def parse_event_row(typ: str, data: Any, seen_at: float, source: str) -> Event:
    """The event of one row of opencode's event table (`type`, decoded `data`)."""
    d = _dict(data)
    if typ.startswith("message.updated"):
        info = _dict(d.get("info"))
        times = _dict(info.get("time"))
        role = info.get("role")
        if role == "user":
            return Event(time=_ms(times.get("created"), seen_at), type="prompt", turn="open",
                         awaiting_input=False, source=source)
        completed = times.get("completed")
        if role == "assistant" and completed is not None:
            t = _ms(completed, seen_at)
            if info.get("finish") == "tool-calls":
                return Event(time=t, type="assistant", source=source, detail="tool-calls")
            if info.get("error"):
                # Given up (retries exhausted, aborted): the turn ends, no work moved.
                return Event(time=t, type="assistant", kind=EventKind.STATE, turn="close", source=source,
                             detail="error")
            return Event(time=t, type="assistant", turn="close", source=source, detail=str(info.get("finish"))[:60])
        if role == "assistant" and info.get("error"):
            # A failed attempt of an answer still under way: opencode retries it.
            return Event(time=seen_at, type="api_error", kind=EventKind.HEARTBEAT, retry=True, source=source)
        # An answer begun (an API call under way) or its bookkeeping: where it stands, not work.
        return Event(time=_ms(times.get("created"), seen_at), type="message", kind=EventKind.STATE, source=source)
    if typ.startswith("message.part"):
        part = _dict(d.get("part"))
        t = _ms(d.get("time"), seen_at)
        ptype = part.get("type")
        if ptype == "tool":
            state = _dict(part.get("state"))
            status = state.get("status")
            tool = part.get("tool") if isinstance(part.get("tool"), str) else None
            tool_id = part.get("callID") or part.get("id")
            tool_id = tool_id[:200] if isinstance(tool_id, str) else None
            if status in _TOOL_OPEN:
                return Event(time=t, type="tool", tool=tool, tool_id=tool_id, tool_call="open", source=source,
                             detail=str(status))
            if status in _TOOL_CLOSE:
                return Event(time=t, type="tool", tool=tool, tool_id=tool_id, tool_call="close", source=source,
                             detail=str(status))
            return Event(time=t, type="tool", tool=tool, tool_id=tool_id, source=source, detail=str(status)[:40])
        if ptype == "retry":
            return _retry(d, part, t, seen_at, source)
        if ptype == "step-start":
            return Event(time=t, type="step-start", kind=EventKind.STATE, source=source)
        if ptype in _OUTPUT_PARTS:
            return Event(time=t, type=f"part/{ptype}", source=source)
        return Event(time=t, type="part", kind=EventKind.STATE, source=source, detail=str(ptype)[:40])
    if "retry" in typ:
        return _retry(d, d, seen_at, seen_at, source)
    if typ.startswith(("session.execution.interrupted", "session.failed", "session.aborted")):
        return Event(time=seen_at, type=typ[:64], turn="close", source=source)
    if "error" in typ:
        return Event(time=seen_at, type=typ[:64], kind=EventKind.HEARTBEAT, retry=True, source=source)
    return Event(time=seen_at, type=typ[:64] or "event", kind=EventKind.STATE, source=source)


def _retry(d: dict[str, Any], inner: dict[str, Any], t: float, seen_at: float, source: str) -> Event:
    attempt = inner.get("attempt", d.get("attempt"))
    nxt = inner.get("next", d.get("at", d.get("next")))
    delay = None
    if isinstance(nxt, (int, float)) and not isinstance(nxt, bool):
        delay = max(0.0, min(nxt / 1000.0 - t, 3600.0))
    return Event(time=t, type="api_retry", kind=EventKind.HEARTBEAT, retry=True,
                 retry_attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
                 retry_delay_s=delay, source=source)


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


_LOG_STREAM_ERROR = re.compile(rb'message="stream error"')
_LOG_TIME = re.compile(rb"^timestamp=(\S+)")


def parse_log_line(raw: bytes, seen_at: float, source: str, session_id: str) -> list[Event]:
    """A retry heartbeat for a `message="stream error"` line of `session_id`'s main model call
    in opencode's logfmt log (opencode retries it: ~2, 2, 3, 9, 18, 30 s apart); nothing for
    any other line (the small title call, other sessions, other messages)."""
    if _LOG_STREAM_ERROR.search(raw) is None or f"session.id={session_id}".encode() not in raw \
            or b"small=true" in raw:
        return []
    t = seen_at
    m = _LOG_TIME.match(raw)
    if m is not None:
        try:
            t = min(datetime.fromisoformat(m.group(1).decode().replace("Z", "+00:00")).timestamp(), seen_at)
        except ValueError:
            t = seen_at
    return [Event(time=t, type="api_retry", kind=EventKind.HEARTBEAT, retry=True, source=source,
                  detail="stream error")]


def _ms(value: object, seen_at: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return min(value / 1000.0, seen_at)
    return seen_at


def _regular_of(path: str, owners: frozenset[int] | None) -> bool:
    """`path` is a regular file (not a symlink, FIFO or device) owned by one of `owners`
    (any owner when None): the only kind of database opened, so that nothing planted
    there can block the loop or speak for another user."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (owners is None or st.st_uid in owners)


class OpencodeFeed:
    """Follows one opencode session's rows of the event table: `poll(now)` returns the
    events of rows added since the last poll (like `FileTail.poll`). The rows there at
    first sight are history: dated by their own times, else by the database's last write."""

    def __init__(self, path: str, source: str = "transcript", *, owners: Collection[int] | None = None,
                 own: bool = False) -> None:
        self.path = path
        self.source = source
        # Users are walls: the database is opened only while it is a regular file (no
        # symlink, no FIFO) owned by one of `owners` (checked before every connect).
        self.owners = None if owners is None else frozenset(owners)
        self.own = own
        where = split_path(path)
        self._db, self._sid = where if where is not None else ("", "")
        self._conn: sqlite3.Connection | None = None
        self._seq = -1
        self._first = True
        self._prompts: set[str] = set()  # user messages seen: a prompt opens its turn once
        # Its API errors are only in the log: `<data>/opencode/log/opencode.log`, one for all runs.
        self._log: FileTail | None = None
        if self._db:
            sid = self._sid
            log = os.path.join(os.path.dirname(self._db), "log", "opencode.log")
            self._log = FileTail(log, source=source, json_only=False, owners=owners, own=own,
                                 parser=lambda raw, t, src: parse_log_line(raw, t, src, sid))
        self.errors = 0
        self.last_error = ""

    def poll(self, now: float) -> tuple[list[Event], int]:
        if not self._db:
            return [], 0
        events, malformed = self._poll_db(now)
        if self._log is not None and _owned_like(self._log.path, self._db):
            log_events, _ = self._log.poll(now)
            events.extend(log_events)
        return events, malformed

    def _poll_db(self, now: float) -> tuple[list[Event], int]:
        try:
            if self._conn is None:
                if not _regular_of(self._db, self.owners):
                    return [], 0
                self._conn = _connect(self._db)
            rows = self._conn.execute(
                "SELECT seq, type, data FROM event WHERE aggregate_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (self._sid, self._seq, _ROWS_PER_POLL)).fetchall()
        except sqlite3.Error as exc:
            # Busy (never waited for), not there yet, or a schema we do not know: next tick.
            self.errors += 1
            self.last_error = f"{self._db}: {exc}"
            self.close()
            return [], 0
        seen_at = now
        if self._first:
            seen_at = min(now, _last_write(self._db) or now)
            self._first = False
        events: list[Event] = []
        malformed = 0
        for seq, typ, data in rows:
            if isinstance(seq, int):
                self._seq = max(self._seq, seq)
            try:
                obj = json.loads(data) if isinstance(data, (str, bytes)) else None
            except (ValueError, RecursionError):
                malformed += 1
                continue
            event = parse_event_row(typ if isinstance(typ, str) else "", obj, seen_at, self.source)
            if event.turn == "open":
                # A prompt's message is written again later (its summary): only its first
                # row is the prompt; reopening the turn would undo the answer's end.
                mid = _message_id(obj)
                if mid in self._prompts:
                    event = Event(time=seen_at, type="message", kind=EventKind.STATE, source=self.source)
                elif mid is not None:
                    if len(self._prompts) >= 4096:
                        self._prompts.clear()
                    self._prompts.add(mid)
            events.append(replace(event, own=True) if self.own else event)
        return events, malformed

    def close(self) -> None:
        if self._log is not None:
            self._log.release()
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    release = close


def _owned_like(path: str, db: str) -> bool:
    """A regular file (not a symlink) of the database's owner."""
    try:
        st, ref = os.lstat(path), os.stat(db)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == ref.st_uid


def _message_id(obj: Any) -> str | None:
    info = obj.get("info") if isinstance(obj, dict) else None
    mid = info.get("id") if isinstance(info, dict) else None
    return mid if isinstance(mid, str) else None


def _last_write(db: str) -> float | None:
    times = []
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            times.append(os.stat(db + suffix).st_mtime)
    return max(times) if times else None
