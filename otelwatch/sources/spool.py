"""The event spool: one JSON-lines file per session under `<state_dir>/events/`.

Producers (`otelwatch hook`, `otelwatch event`, `otelwatch exec`) append one
record per event with `append_records`: a single O_APPEND write, so records of
concurrent producers never interleave. The daemon reads every file with
`SpoolSource`, which yields the events per session and a `SessionSpec` for
each session whose records name its agent's PID.

A record is `{"otelwatch": 1, "session_id", "pid", "agent", "time", ...}` plus
the fields of `Event.to_json()`. Session ids are data: they are sanitised into
file names (`safe_name`) and never reach a shell.

Provenance: spool records are *observed* events (DESIGN "Trust boundaries"). They
are read after the fact, from a file any process of otelwatch's user may append
to, so nothing can show that the writer ran inside the session's process tree; a
record's own claims (its pid, its ancestry) are the writer's word. The one
exception is decided by the daemon, not here: a file that a registry entry names
as its session's events file (the exec wrapper's) is that session's own stream.

Trust: a spool record can open a turn or name a PID, so the reader takes
records only from files that are trusted by `sources.trust` (a regular file
of otelwatch's own user, not group- or world-writable) in a directory and a
state directory that are trusted by the same rule. Anything else is dropped
with one log line per file version. This module must stay cheap
to import (hooks run on every tool call): no psutil, no logging setup, no
other sources.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otelwatch.events.lines import parse_object
from otelwatch.model import Event, Mode, SessionSpec
from otelwatch.probe.proctable import create_time_of, record_start_ticks
from otelwatch.sources.hookpath import MAX_RECORD_BYTES, safe_name
from otelwatch.sources.hookpath import append_records as _append_records
from otelwatch.sources.hookpath import make_record as _make_record
from otelwatch.sources.trust import untrusted_dir, untrusted_file

if TYPE_CHECKING:  # the reader's import (it pulls in logging) stays off the hook's path
    from otelwatch.sources.tail import FileTail

__all__ = ["MAX_RECORD_BYTES", "SpoolSource", "append_records", "make_record", "safe_name", "spool_path"]


def spool_path(spool_dir: Path, session_id: str) -> Path:
    return Path(spool_dir) / f"{safe_name(session_id)}.jsonl"


def make_record(event: Event, session_id: str, *, pid: int | None = None, agent: str | None = None,
                create_time: float | None = None, start_ticks: int | None = None) -> dict[str, Any]:
    return _make_record(event.to_json(), session_id, pid=pid, agent=agent, create_time=create_time,
                        start_ticks=start_ticks)


def append_records(spool_dir: Path, session_id: str, records: Iterable[Mapping[str, Any]]) -> Path:
    """Append records to the session's spool file in one write (`hookpath.append_records`). Raises OSError."""
    return Path(_append_records(spool_dir, session_id, records))


RETENTION_S = 7 * 86400.0  # files of sessions untouched this long are removed
PRUNE_EVERY_S = 3600.0


def remove_older_than(directory: Path, suffix: str, age: float, now: float) -> int:
    """Remove the files ending in `suffix` in `directory` not written for `age` seconds
    (ended sessions' spools and stderr rings: nothing reads them any more, and without
    this they would pile up for ever). Returns how many were removed; errors are skipped."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.endswith(suffix) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > age:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


class SpoolSource:
    """Reads every spool file in `dir`; `poll` returns what is new since the last poll.

    Files not written for `stale_after` seconds are not read (old sessions'
    spools would otherwise come back as sessions after every daemon restart).
    A file is read only when it changed, and no descriptor is held between
    polls: a day of hook sessions is a day of files.
    """

    def __init__(self, dir: Path, *, stale_after: float = 86400.0, retention: float = RETENTION_S,
                 uid: int | None = None, log: Callable[[str], None] | None = None,
                 boot_time: float | None = None) -> None:
        self.dir = Path(dir)
        self.boot_time = boot_time  # the daemon's, for records' start_ticks
        self.uid = os.geteuid() if uid is None else uid
        self._log = log or (lambda message: None)
        self.refused = ""  # why the spool (or its state directory) is not read; "" when it is
        self.untrusted: dict[str, str] = {}  # file name -> why its records are dropped
        self.stale_after = stale_after
        self.retention = max(retention, stale_after)
        self._pruned_at = -math.inf
        self.errors = 0  # directory listing failures
        # file name -> (its reader, (inode, size, mtime_ns) when it was last read)
        self._tails: dict[str, tuple[FileTail, tuple[int, int, int]]] = {}
        # session_id -> (pid, agent, create_time, time of the record) from its latest record that had a pid
        self._meta: dict[str, tuple[int, str, float | None, float]] = {}
        self._files_of: dict[str, set[str]] = {}  # file name -> session ids seen in it

    def poll(self, now: float) -> tuple[list[SessionSpec], dict[str, list[Event]], int]:
        """(specs of sessions with a pid, new events per session_id, malformed lines)."""
        from otelwatch.sources.tail import FileTail

        events: dict[str, list[Event]] = {}
        malformed = 0
        present: set[str] = set()
        refused = untrusted_dir(self.dir.parent, self.uid, "state directory") or untrusted_dir(
            self.dir, self.uid, "spool directory")
        if refused:
            if refused != self.refused:
                self._log(f"event spool not read: {refused}")
            self.refused = refused
            return [], {}, 0
        self.refused = ""
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            remove_older_than(self.dir, ".jsonl", self.retention, now)
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            entries = []
        except OSError:
            self.errors += 1
            entries = []
        for entry in entries:
            name = entry.name
            if not name.endswith(".jsonl") or name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            why = untrusted_file(st, self.uid, entry.path)
            if why:
                if self.untrusted.get(name) != why:
                    self._log(f"spool file dropped: {why}")
                    self.untrusted[name] = why
                continue
            self.untrusted.pop(name, None)
            if now - st.st_mtime > self.stale_after:
                continue
            present.add(name)
            sig = (st.st_ino, st.st_size, st.st_mtime_ns)
            known = self._tails.get(name)
            if known is not None and known[1] == sig and known[0].offset >= st.st_size:
                continue  # unchanged and read to its end
            tail = known[0] if known is not None else FileTail(entry.path, source="hook", owners=(self.uid,))
            self._tails[name] = (tail, sig)
            lines, bad = tail.poll_lines(now)
            tail.release()
            malformed += bad
            for raw, t in lines:
                malformed += self._take(name, raw, t, events)
        for name in [n for n in self.untrusted if n not in present and not (self.dir / n).exists()]:
            del self.untrusted[name]
        for name in list(self._tails):
            if name not in present:
                self._tails.pop(name)[0].close()
                for sid in self._files_of.pop(name, ()):
                    if not any(sid in ids for ids in self._files_of.values()):
                        self._meta.pop(sid, None)
        specs = [
            # Hooks carry the turn boundaries (UserPromptSubmit ... Stop, fired by
            # `claude -p` too), so a hook session is judged turn by turn: between
            # turns it waits for its user and must never look stuck.
            SessionSpec(session_id=sid, pid=pid, agent=agent, source="hook", create_time=ct,
                        mode=Mode.INTERACTIVE, registered_at=written)
            for sid, (pid, agent, ct, written) in self._meta.items()
        ]
        return specs, events, malformed

    def close(self) -> None:
        for tail, _ in self._tails.values():
            tail.close()
        self._tails.clear()

    def _take(self, name: str, raw: bytes, t: float, events: dict[str, list[Event]]) -> int:
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError):
            return 1
        if not isinstance(rec, dict) or rec.get("otelwatch") != 1:
            return 1
        sid = rec.get("session_id")
        if not isinstance(sid, str) or not sid or name != spool_path(self.dir, sid).name:
            return 1  # producers write each session's records to its own file: this is not one
        if rec.get("delivered") is not True:  # else the hook socket took its event: only its pid counts here
            events.setdefault(sid, []).extend(parse_object(rec, t, "hook"))
        self._files_of.setdefault(name, set()).add(sid)
        pid = rec.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
            agent = rec.get("agent") if isinstance(rec.get("agent"), str) else None
            ct = rec.get("create_time")
            ct = float(ct) if isinstance(ct, (int, float)) and not isinstance(ct, bool) else None
            ticks = record_start_ticks(rec.get("start_ticks"))
            if ticks is not None and self.boot_time is not None:
                ct = create_time_of(ticks, self.boot_time)  # the daemon's clock, never a stepped btime
            # When the record was written: its own time (the writer's clock) if it is
            # not later than when we saw it. A PID is bound to a process that existed then.
            written = rec.get("time")
            written = float(written) if isinstance(written, (int, float)) and not isinstance(written, bool) else t
            old = self._meta.get(sid)
            self._meta[sid] = (pid, agent or (old[1] if old else "unknown"), ct, min(written, t))
        return 0
