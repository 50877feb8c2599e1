"""What otelwatch could read of a session, and the warning that names the fix ("blind is not idle").

A daemon that runs as a service user, or with `[sources.transcripts] enabled =
false`, can see that another user's agent runs (its /proc/PID/stat is
world-readable) without seeing its turn (the agent's environment, session file
and transcript) or its sockets (/proc/PID/fd). Such a session says so in
`/api/sessions` as `visibility`:

- `turns`: `"ok"` (its turn information is read: a transcript, the CLI's session
  file, an events file, the exec wrapper or hooks), `"denied"` (it keeps turn
  information otelwatch may not read: another user's environment or files without
  CAP_SYS_PTRACE / CAP_DAC_READ_SEARCH), `"disabled"` (it keeps turn information
  but `[sources.transcripts]` is off), `"none"` (nothing known to read: an agent
  whose files otelwatch does not follow, or none written yet).
- `sockets`: `"ok"` (its FDs and TCP sockets were read), `"denied"` (not
  readable: the TCP and FD numbers are null, never 0), null before the first sample.

The classifier never calls a session with turns "denied" or "disabled" idle for
want of an open turn, nor stuck (model.SessionInfo.turns_visible).

Reads /proc/self/status (capabilities) and the password database; nothing else.
"""

from __future__ import annotations

import pwd
from collections.abc import Mapping
from functools import lru_cache

from otelwatch.model import SampleStatus, TreeSample

__all__ = ["BLIND_TURNS", "FIX", "TURNS", "capability_gaps", "owner_uid", "user_name", "visibility_of"]

TURNS = ("ok", "denied", "disabled", "none")
BLIND_TURNS = frozenset({"denied", "disabled"})  # turn information exists but was not read
FIX = ("run otelwatch as root, or grant it CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE "
       "(deploy/systemd/otelwatch.service: AmbientCapabilities), and keep [sources.transcripts] enabled")
# Capability numbers (linux/capability.h).
CAP_DAC_READ_SEARCH = 2
CAP_SYS_PTRACE = 19
_NEEDED = {"CAP_DAC_READ_SEARCH": CAP_DAC_READ_SEARCH, "CAP_SYS_PTRACE": CAP_SYS_PTRACE}


def sockets_visibility(sample: TreeSample | None) -> str | None:
    if sample is None or not sample.alive:
        return None
    if sample.status is SampleStatus.ACCESS_DENIED:
        return "denied"
    if sample.status is SampleStatus.OK:
        return "ok"
    return None  # a probe timeout says nothing about permissions (the caller keeps the last word)


def visibility_of(turns: str, sample: TreeSample | None) -> Mapping[str, str | None]:
    return {"turns": turns, "sockets": sockets_visibility(sample)}


def owner_uid(sample: TreeSample | None) -> int | None:
    """The uid of the session's root process, from its sample."""
    if sample is None or not sample.processes:
        return None
    return sample.processes[0].uid


@lru_cache(maxsize=1024)
def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


def user_name(uid: int | None) -> str | None:
    return None if uid is None else _name(uid)


def capability_gaps(status_path: str = "/proc/self/status") -> list[str]:
    """The read capabilities otelwatch lacks to see other users' sessions ([] as root
    with a full set, or with both granted). Unknown (no /proc) counts as none lacking."""
    try:
        with open(status_path, encoding="ascii", errors="replace") as fh:
            line = next((ln for ln in fh if ln.startswith("CapEff:")), "")
        eff = int(line.split()[1], 16) if line else None
    except (OSError, ValueError, IndexError):
        return []
    if eff is None:
        return []
    return [name for name, bit in _NEEDED.items() if not eff >> bit & 1]
