"""Names a person recognises: each session's own name, working directory and owner.

Owns `refresh_names`, called by the loop once per tick after sampling, which fills
`Tracked.name` (the agent's own name for the session: Claude Code's `name` in its
session file), `Tracked.cwd` (the agent process's working directory) and
`Tracked.user` (the owner of its process). `/api/sessions`, `status`, `top`,
reports and notifications show them; none of them is ever a metric label (one
value per session, and a directory name says more than a dashboard should keep).

Reading is safe by construction:
- the working directory is `readlink("/proc/PID/cwd")`: the link's text, never the
  directory itself, so a hung network mount cannot block the loop; it is read
  only while the pid still belongs to the session's own process (identity from
  the tick's process table), at most once per `CWD_REFRESH_S` per session;
- a process otelwatch may not inspect (another user's, without CAP_SYS_PTRACE)
  falls back to the cwd its own session file gives, which the transcripts source
  only reads when owned by the agent's user;
- every text is cut to a bounded length and stripped of control characters, so
  nothing from a process or a file reaches a terminal as an escape sequence.

Must never raise into the loop: failures leave the previous value in place.
"""

from __future__ import annotations

import pwd
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from otelwatch.model import ProcessIdentity, same_process

if TYPE_CHECKING:
    from otelwatch.probe.proctable import ProcessTable
    from otelwatch.sessions.table import Tracked

__all__ = ["CWD_REFRESH_S", "printable", "refresh_names", "user_name"]

CWD_REFRESH_S = 30.0  # an agent rarely changes directory; its name is read every tick anyway
NAME_MAX = 120
CWD_MAX = 1024
_USERS_MAX = 4096

_users: dict[int, str] = {}


def printable(text: str | None, limit: int) -> str | None:
    """`text` cut to `limit` characters with every control character shown as `?`."""
    if not text:
        return None
    cut = text[:limit]
    if cut.isprintable():
        return cut
    return "".join(c if c.isprintable() else "?" for c in cut)


def user_name(uid: int) -> str:
    """The login name of `uid` (its number when the passwd database has none); cached."""
    name = _users.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except (KeyError, OverflowError):
            name = str(uid)
        if len(_users) >= _USERS_MAX:
            _users.clear()
        _users[uid] = name
    return name


def refresh_names(sessions: Iterable[Tracked], table: ProcessTable, now: float,
                  cwd_of: Callable[[int], str | None]) -> None:
    """This tick's names for every live session (see the module docstring)."""
    for tracked in sessions:
        pid = tracked.spec.pid
        if tracked.ended_at is not None or pid is None:
            continue
        claude = tracked.claude
        if claude is not None and claude.name:
            tracked.name = printable(claude.name, NAME_MAX)
        sample = tracked.latest
        if sample is not None and sample.processes:
            uid = sample.processes[0].uid
            if uid is not None:
                tracked.user = user_name(uid)
        if tracked.cwd is not None and now - tracked.names_read_at < CWD_REFRESH_S:
            continue
        info = table.get(pid)
        bound = tracked.identity
        if info is None or (bound is not None and not same_process(info.identity, ProcessIdentity(
                pid, bound.create_time))):
            continue  # gone, or its pid now names another process: not this session's directory
        tracked.names_read_at = now
        try:
            cwd = cwd_of(pid)
        except Exception:  # a backend's read failing is "unknown", never the tick's failure
            cwd = None
        if not cwd and claude is not None and claude.cwd:
            cwd = claude.cwd  # not ours to inspect: the agent's own session file says where it works
        if cwd:
            tracked.cwd = printable(cwd, CWD_MAX)
