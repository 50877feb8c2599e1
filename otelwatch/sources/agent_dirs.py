"""Where one agent process keeps its transcripts: its own config directories, from its environment.

Claude Code writes under `$CLAUDE_CONFIG_DIR` (default `~/.claude`), Codex under
`$CODEX_HOME` (default `~/.codex`), Gemini CLI under `$GEMINI_CLI_HOME/.gemini`
(default `~/.gemini`), opencode under `$XDG_DATA_HOME/opencode` (default
`~/.local/share/opencode`), aider where `AIDER_CHAT_HISTORY_FILE` says (default:
its project), and `~` is the agent's `$HOME`, not
otelwatch's: a daemon running as a service user, or agents started with another
HOME, would otherwise look in the wrong place and follow no transcript at all.
So the directories are read from the process's initial environment
(/proc/PID/environ), once per process.

Trust (DESIGN "Users are walls"): a directory named by a process's environment is
followed only when it is owned by that process's own user (root's only for root's
processes). Otherwise another local user could point their agent at someone else's
directory, root's included, and have otelwatch show that person's session as theirs.
A directory that is named but not trusted is not looked for anywhere else: that
agent has no such directory (None), and in particular never otelwatch's own home. A
process whose environment cannot be read gets otelwatch's default home only when it
runs as otelwatch's own user. A configured `sources.transcripts.home` wins over any
environment. `AgentDirs.uid` is the agent's user: every file found under these
directories is read only when that user owns it (`tail.open_owned`).

Reads /proc/PID/environ and stats directories; never writes, never runs anything.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["AgentDirResolver", "AgentDirs", "dirs_from", "read_environ"]

# The variables that say where an agent keeps its files; the rest of the environment
# (secrets among it) is never kept.
_WANTED = (b"HOME", b"CLAUDE_CONFIG_DIR", b"CODEX_HOME", b"GEMINI_CLI_HOME", b"XDG_DATA_HOME",
           b"AIDER_CHAT_HISTORY_FILE")
_ENVIRON_MAX = 1 << 20  # an environment is at most a few hundred KiB; read no more


@dataclass(frozen=True)
class AgentDirs:
    claude: Path | None  # Claude Code's config directory (sessions/, projects/); None: none to look in
    codex: Path | None  # Codex's home (sessions/YYYY/MM/DD/rollout-*.jsonl); None: none to look in
    uid: int | None = None  # the agent's user, who must own every file read there; None: unknown
    # Gemini CLI's directory (tmp/<project>/chats/), opencode's data directory (opencode.db),
    # aider's history file as its environment names it (relative to its cwd). Not compared:
    # derived from the same home.
    gemini: Path | None = field(default=None, compare=False)
    opencode: Path | None = field(default=None, compare=False)
    aider_history: str | None = field(default=None, compare=False)


def dirs_from(env: Mapping[str, str], default_home: Path | None,
              trusted: Callable[[Path], bool] | None = None, uid: int | None = None) -> AgentDirs:
    """The agent's directories from its environment, each variable used only when
    `trusted(path)` says so (all are, without a check). A variable that is set but not
    trusted leaves that directory unknown (None): never another place instead. Only an
    unset (or relative) variable falls back: CLAUDE_CONFIG_DIR and CODEX_HOME to HOME,
    HOME to `default_home`. Pure but for `trusted`."""
    def pick(value: str | None, fallback: Path | None) -> Path | None:
        if not value or not os.path.isabs(value):
            return fallback
        path = Path(value)
        return path if trusted is None or trusted(path) else None

    home = pick(env.get("HOME"), default_home)
    gemini_base = pick(env.get("GEMINI_CLI_HOME"), home)
    data = pick(env.get("XDG_DATA_HOME"), home / ".local" / "share" if home else None)
    history = env.get("AIDER_CHAT_HISTORY_FILE") or None
    return AgentDirs(claude=pick(env.get("CLAUDE_CONFIG_DIR"), home / ".claude" if home else None),
                     codex=pick(env.get("CODEX_HOME"), home / ".codex" if home else None), uid=uid,
                     gemini=gemini_base / ".gemini" if gemini_base else None,
                     opencode=data / "opencode" if data else None,
                     aider_history=history[:4096] if history else None)


class _Trust:
    """Whether a directory may be followed for a process of `uid`: owned by that uid."""

    def __init__(self, uid: int) -> None:
        self.uid = uid

    def __call__(self, path: Path) -> bool:
        try:
            return path.stat().st_uid == self.uid
        except OSError:
            return False


class AgentDirResolver:
    """`resolver(pid)`: the AgentDirs of a running process, read once per process and
    kept until `forget(pid)`. `configured`: `sources.transcripts.home` was set, and
    every process's directories are under it."""

    def __init__(self, default_home: Path, *, configured: bool = False, proc_root: str = "/proc") -> None:
        self.default_home = Path(default_home)
        self.configured = configured
        self.proc_root = proc_root
        self._cache: dict[int, AgentDirs] = {}
        self._default = dirs_from({}, self.default_home)
        self.denied: set[int] = set()  # pids whose environment we may not read (another user's)

    def __call__(self, pid: int) -> AgentDirs:
        cached = self._cache.get(pid)
        if cached is None:
            cached, final = self._resolve(pid)
            if not final:
                return cached
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[pid] = cached
        return cached

    def forget(self, pid: int) -> None:
        self._cache.pop(pid, None)
        self.denied.discard(pid)

    def _resolve(self, pid: int) -> tuple[AgentDirs, bool]:
        """(dirs, final). Not final while the environment reads empty, which is what the
        kernel shows of a process in the middle of exec (its new memory is there, its
        environment not yet): asked again next time, never cached. An environment we
        may not read (another user's, without CAP_SYS_PTRACE) is remembered in `denied`:
        that session is blind, and says so."""
        try:
            uid: int | None = os.stat(f"{self.proc_root}/{pid}").st_uid
        except OSError:
            uid = None
        if self.configured:
            return dirs_from({}, self.default_home, uid=uid), True
        if uid is None:
            return AgentDirs(None, None, None), True  # gone, or no /proc: nothing is known of it
        try:
            raw: bytes | None = read_raw_environ(pid, self.proc_root)
        except PermissionError:
            if len(self.denied) >= 4096:
                self.denied.clear()
            self.denied.add(pid)
            raw = None
        except OSError:
            raw = None
        env = _wanted(raw or b"", _WANTED)
        if not env:
            # Unreadable (or empty): otelwatch's own home only for its own user's agents.
            home = self.default_home if uid == os.geteuid() else _passwd_home(uid)
            dirs = dirs_from({}, home, _Trust(uid), uid=uid) if home is not None else AgentDirs(None, None, uid)
            return dirs, raw != b""
        trust = _Trust(uid)
        fallback = _passwd_home(uid) if "HOME" not in env else None
        if fallback is not None and not trust(fallback):
            fallback = None
        return dirs_from(env, fallback, trust, uid=uid), True


def _passwd_home(uid: int) -> Path | None:
    """The home directory the user database gives `uid`; None when there is none."""
    try:
        home = pwd.getpwuid(uid).pw_dir
    except (KeyError, OSError):
        return None
    return Path(home) if home and os.path.isabs(home) else None


def read_environ(pid: int, proc_root: str = "/proc", *, strict: bool = False,
                 wanted: tuple[bytes, ...] = _WANTED) -> dict[str, str]:
    """The variables in `_WANTED` (or the `wanted` names) from pid's initial
    environment; {} when it cannot be read (another user's process, gone, a kernel
    thread, mid-exec), or with `strict` the OSError (PermissionError: another user's,
    without CAP_SYS_PTRACE)."""
    try:
        return _wanted(read_raw_environ(pid, proc_root), wanted)
    except OSError:
        if strict:
            raise
        return {}


def read_raw_environ(pid: int, proc_root: str = "/proc") -> bytes:
    """The bytes of /proc/PID/environ, bounded; raises OSError when it cannot be read."""
    with open(f"{proc_root}/{pid}/environ", "rb") as fh:
        return fh.read(_ENVIRON_MAX)


def _wanted(raw: bytes, wanted: tuple[bytes, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in wanted:
            out[key.decode()] = os.fsdecode(value)
    return out
