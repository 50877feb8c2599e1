"""The session table's bookkeeping that must stay bounded: aliases and ended registrations.

Owns two small maps the daemon's session table needs: `AliasMap` (other ids of a
session, such as a transcript uuid or a hook's session id, pointing at its key)
and `EndedRegistrations` (registrations whose process is gone, so that a stale
registry file or spool record is not turned into a new session again and again,
and never adopts whatever process reuses its PID).

Both are fed by inputs other programs write (hooks, POST /api/events, registry
files), so both are bounded: a flood of ids costs a fixed amount of memory, and
forgetting a session costs O(its aliases), not O(all aliases).

Must never do I/O or read a clock.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["ALIASES_PER_SESSION", "ENDED_MAX", "AliasMap", "EndedRegistrations"]

# A session has a handful of other names (its transcript's uuid, a hook session id,
# an id a stronger source gave it). More than this is someone minting ids.
ALIASES_PER_SESSION = 16
ENDED_MAX = 10_000


class AliasMap:
    """alias -> session key, with a reverse index and a per-session cap (oldest dropped)."""

    def __init__(self, per_session: int = ALIASES_PER_SESSION) -> None:
        self._key_of: dict[str, str] = {}
        self._of_key: dict[str, OrderedDict[str, None]] = {}
        self._per_session = per_session

    def __len__(self) -> int:
        return len(self._key_of)

    def __contains__(self, alias: object) -> bool:
        return alias in self._key_of

    def resolve(self, session_id: str) -> str:
        """The key `session_id` stands for (itself when it is no alias)."""
        return self._key_of.get(session_id, session_id)

    def get(self, alias: str) -> str | None:
        return self._key_of.get(alias)

    def add(self, alias: str, key: str) -> None:
        if alias == key:
            return
        self.discard(alias)
        names = self._of_key.setdefault(key, OrderedDict())
        names[alias] = None
        self._key_of[alias] = key
        while len(names) > self._per_session:
            oldest, _ = names.popitem(last=False)
            del self._key_of[oldest]

    def discard(self, alias: str) -> None:
        key = self._key_of.pop(alias, None)
        if key is not None:
            names = self._of_key.get(key)
            if names is not None:
                names.pop(alias, None)
                if not names:
                    del self._of_key[key]

    def aliases_of(self, key: str) -> tuple[str, ...]:
        return tuple(self._of_key.get(key, ()))

    def rekey(self, old: str, new: str) -> None:
        """Every alias of `old` now points at `new`, and `old` itself becomes one."""
        for alias in self.aliases_of(old):
            self.add(alias, new)
        self._of_key.pop(old, None)
        self.add(old, new)

    def forget(self, key: str) -> None:
        """Drop every alias of `key` (the session is gone)."""
        for alias in self._of_key.pop(key, ()):
            self._key_of.pop(alias, None)


class EndedRegistrations:
    """Registrations (session id, pid, when written) whose session has ended.

    A registry file or spool record outlives its process. Once its session ended,
    the same registration must stay ended: not come back as a new session after
    `exited_retention`, and never bind to a later process that reuses its PID. A
    registration that changes (new pid, or rewritten later) is a new one.
    """

    def __init__(self, limit: int = ENDED_MAX) -> None:
        self._ended: OrderedDict[str, tuple[int | None, float | None]] = OrderedDict()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._ended)

    def add(self, session_id: str, pid: int | None, registered_at: float | None) -> None:
        self._ended[session_id] = (pid, registered_at)
        self._ended.move_to_end(session_id)
        while len(self._ended) > self._limit:
            self._ended.popitem(last=False)

    def ended(self, session_id: str, pid: int | None, registered_at: float | None) -> bool:
        """Whether this exact registration already ended."""
        return self._ended.get(session_id) == (pid, registered_at)

    def discard(self, session_id: str) -> None:
        self._ended.pop(session_id, None)
