"""Events handed to the loop by other threads: a bounded queue the API and HTTP fill and one tick drains.

The Python API (`Watcher.feed`, `Watcher.add_event`) and `POST /api/events`
(`Watcher.post_event`) run on their callers' threads; only the loop thread may
touch the session table. So they queue here and the next tick delivers
(`drain`). The queue is bounded, and so is the work one tick takes from it (the
rest waits for the next tick). POST is refused (queue.Full) well before the
Python API's events are dropped, so a flood on the listener cannot crowd them
out. Every refusal or drop is reported through `refused` (counted by the daemon).

Must never block a caller or touch the session table from a caller's thread.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from queue import Full
from typing import TYPE_CHECKING, Any

from otelwatch.events.lines import parse_line
from otelwatch.model import Event, ProcessIdentity
from otelwatch.sources.payloads import payload_to_event

if TYPE_CHECKING:
    from otelwatch.sessions.table import SessionTable

__all__ = ["INBOX_DRAIN_PER_TICK", "INBOX_MAX", "INBOX_MAX_HTTP", "Inbox", "pid_owner"]

INBOX_MAX = 50_000
INBOX_MAX_HTTP = 20_000
INBOX_DRAIN_PER_TICK = 10_000


def pid_owner(pid: int, proc_root: str = "/proc") -> int | None:
    """The user of process `pid` (its /proc directory's owner); None when there is none."""
    try:
        return os.stat(f"{proc_root}/{pid}").st_uid
    except OSError:
        return None


class Inbox:
    """(session id, an Event or a raw line, pid, json_only) waiting for the loop.
    Filled from any thread (deque appends are atomic), drained by the loop's."""

    def __init__(self, clock: Callable[[], float], refused: Callable[[], None], proc_root: str = "/proc") -> None:
        self._clock = clock
        self._proc_root = proc_root
        self._refused = refused
        # (session id, event or raw line, pid, json_only, own): own for the Python API (the
        # embedding program is otelwatch itself), observed for POST /api/events.
        self._items: deque[tuple[str, Event | bytes, int | None, bool, bool]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def feed(self, session_id: str, line: bytes | str, json_only: bool) -> None:
        """One event line, parsed on the next tick; dropped (and reported) when INBOX_MAX
        items are already queued."""
        if len(self._items) >= INBOX_MAX:
            self._refused()
            return
        raw = line.encode() if isinstance(line, str) else line
        self._items.append((session_id, raw, None, json_only, True))

    def add_event(self, session_id: str, event: Event, pid: int | None) -> None:
        if len(self._items) >= INBOX_MAX:  # as feed(): dropped and reported
            self._refused()
            return
        self._items.append((session_id, event, pid, True, True))

    def post(self, payload: Any, uid: int | None = None) -> list[str]:
        """Hook payloads or `{"session_id", "type", "tool"}` objects: one object or a list
        of them, queued all or none. Returns their session ids. Their events are observed
        (DESIGN "Trust boundaries"): they never open a turn recovery counts on.

        `uid`: the user who sent them (None: not known to be anyone, e.g. a test double;
        -1: nobody can tell). Users are walls: an event naming a PID whose process is not
        `uid`'s is refused with PermissionError, whatever recovery.users says (root, uid
        0, may speak for any).

        Raises ValueError naming what is wrong (and which item of a list), and
        queue.Full (reported) when queuing them would take the inbox past INBOX_MAX_HTTP."""
        items = payload if isinstance(payload, list) else [payload]
        if len(self._items) + len(items) > INBOX_MAX_HTTP:
            self._refused()
            raise Full(f"the event inbox is full ({INBOX_MAX_HTTP} events queued); retry after the next tick")
        now = self._clock()
        queued: list[tuple[str, Event, int | None, bool, bool]] = []
        for n, item in enumerate(items):
            where = f"event {n}: " if isinstance(payload, list) else ""
            if not isinstance(item, dict):
                raise ValueError(f"{where}each event must be a JSON object")
            session_id = item.get("session_id")
            if not isinstance(session_id, str) or not session_id:
                raise ValueError(f"{where}event needs a non-empty string 'session_id'")
            try:
                # Dated when received, never by the payload: a backdated event could make a
                # session look silent for longer than it is, or date a turn before the work
                # that the recovery gate takes as the session's reaction to it.
                event = replace(payload_to_event(item, now, "http"), time=now)
            except ValueError as exc:
                raise ValueError(f"{where}{exc}") from None
            pid = item.get("pid")
            ok_pid = isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
            if ok_pid and isinstance(pid, int) and uid is not None and uid != 0:
                owner = pid_owner(pid, self._proc_root)
                if owner != uid:
                    who = "no process" if owner is None else f"a process of uid {owner}"
                    raise PermissionError(f"{where}pid {pid} is {who}; uid {uid} may only speak for its own")
            if uid is not None and uid >= 0:  # a remote listener's posters cannot be told apart
                event = replace(event, poster_uid=uid)
            queued.append((session_id, event, pid if ok_pid else None, True, False))
        self._items.extend(queued)
        return [item[0] for item in queued]

    def hook(self, payload: Any, tree: Sequence[ProcessIdentity], uid: int) -> bool:
        """One hook payload from the hook socket (`sources.hook_socket`): `tree` is the
        hook process and its ancestors as checked when it arrived, `uid` the hook's user.
        The event is own only for a session whose root is in `tree`, and applies only to
        sessions of `uid` (root: any). Returns whether it was queued."""
        if not isinstance(payload, dict) or len(self._items) >= INBOX_MAX_HTTP:
            self._refused()
            return False
        session_id = payload.get("session_id")
        if not isinstance(session_id, str) or not session_id:
            return False
        now = self._clock()
        try:
            event = replace(payload_to_event(payload, now, "hook"), time=now)
        except ValueError:
            return False
        self._items.append((session_id, replace(event, tree=tuple(tree), poster_uid=uid), None, True, False))
        return True

    def drain(self, sessions: SessionTable, now: float) -> None:
        """Deliver at most INBOX_DRAIN_PER_TICK items: a flood waits for the next ticks
        instead of stretching this one (events from POST carry their own arrival time)."""
        for _ in range(min(len(self._items), INBOX_DRAIN_PER_TICK)):
            sid, item, pid, json_only, own = self._items.popleft()
            if isinstance(item, Event):
                sessions.deliver(sid, replace(item, own=own) if item.own != own else item, pid)
                continue
            event = parse_line(item, now, "api", json_only=json_only)
            if event is None:
                sessions.count_malformed(sid)
                continue
            sessions.deliver(sid, replace(event, own=own) if own else event, pid)
