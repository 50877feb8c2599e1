"""Who may tell otelwatch about sessions: the ownership and mode rules for its inputs.

Owns one rule, applied to the registry directory, the state directory, the
event spool and every file in them: a path is trusted only when it belongs
to the user otelwatch runs as and no one else can write it (not group- or
world-writable), and a file only when it is a regular file, not a symlink
that could point anywhere. Anything that can write there could otherwise
make a session look processing (a turn opened) and so steer recovery.

Must never follow a symlink when judging a file, and never raise for an
untrusted path: callers get a reason string ("" means trusted) and decide.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
from collections.abc import Iterable

__all__ = ["resolve_users", "untrusted_dir", "untrusted_file", "untrusted_stat"]

log = logging.getLogger("otelwatch.sources.trust")


def untrusted_stat(st: os.stat_result, uid: int, what: str, path: object) -> str:
    """Why a stat result may not be trusted (owner or mode); "" when it may."""
    if st.st_uid != uid:
        return f"{what} {path} belongs to uid {st.st_uid}, not to uid {uid} that otelwatch runs as"
    if st.st_mode & 0o022:
        return f"{what} {path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def untrusted_dir(path: str | os.PathLike[str], uid: int, what: str = "directory") -> str:
    """Why the directory at `path` may not be trusted; "" when it may. A missing
    directory is trusted (nothing in it can be read); an unreadable one is not."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"{what} {os.fspath(path)}: {exc.strerror or exc}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{what} {os.fspath(path)} is not a directory"
    return untrusted_stat(st, uid, what, os.fspath(path))


def untrusted_file(st: os.stat_result, uid: int, path: object) -> str:
    """Why a file (stat taken without following symlinks) may not be trusted; "" when it may."""
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    return untrusted_stat(st, uid, "file", path)


def resolve_users(names: Iterable[str]) -> frozenset[int]:
    """`recovery.users` as uids (the owners recovery may act on, and the users whose
    processes may post events); empty means the user otelwatch runs as. Unknown names
    are dropped with a warning (an empty result allows nobody: fail closed)."""
    names = list(names)
    if not names:
        return frozenset({os.getuid()})
    out: set[int] = set()
    for name in names:
        if name.isdigit():
            out.add(int(name))
            continue
        try:
            out.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            log.warning("recovery.users: no such user %r; it is ignored", name)
    return frozenset(out)
