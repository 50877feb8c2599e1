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

Trust: a directory named by a process's environment is followed only when it is
owned by that process's own user (root's only for root's processes). Otherwise
another local user could point their agent at someone else's directory, root's
included, and have otelwatch show that person's session as theirs. What cannot be read or trusted falls back to the
default home (`sources.transcripts.home`, or the home of the user otelwatch runs
as), as before. A configured `sources.transcripts.home` wins over any environment.

Reads /proc/PID/environ and stats directories; never writes, never runs anything.
"""

from __future__ import annotations

import os
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
    claude: Path  # Claude Code's config directory (sessions/, projects/)
    codex: Path  # Codex's home (sessions/YYYY/MM/DD/rollout-*.jsonl)
    # Gemini CLI's directory (tmp/<project>/chats/), opencode's data directory (opencode.db),
    # aider's history file as its environment names it (relative to its cwd), and the
    # process's user (None: any, when not known). Not compared: derived from the same home.
    gemini: Path | None = field(default=None, compare=False)
    opencode: Path | None = field(default=None, compare=False)
    aider_history: str | None = field(default=None, compare=False)
    uid: int | None = field(default=None, compare=False)


def dirs_from(env: Mapping[str, str], default_home: Path,
              trusted: Callable[[Path], bool] | None = None, uid: int | None = None) -> AgentDirs:
    """The agent's directories from its environment, each variable used only when
    `trusted(path)` says so (all are, without a check). Pure but for `trusted`."""
    def ok(value: str | None) -> Path | None:
        if not value or not os.path.isabs(value):
            return None
        path = Path(value)
        return path if trusted is None or trusted(path) else None

    home = ok(env.get("HOME")) or default_home
    history = env.get("AIDER_CHAT_HISTORY_FILE") or None
    return AgentDirs(claude=ok(env.get("CLAUDE_CONFIG_DIR")) or home / ".claude",
                     codex=ok(env.get("CODEX_HOME")) or home / ".codex",
                     gemini=(ok(env.get("GEMINI_CLI_HOME")) or home) / ".gemini",
                     opencode=(ok(env.get("XDG_DATA_HOME")) or home / ".local" / "share") / "opencode",
                     aider_history=history[:4096] if history else None, uid=uid)


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

    def __call__(self, pid: int) -> AgentDirs:
        if self.configured:
            return self._default
        cached = self._cache.get(pid)
        if cached is None:
            cached = self._resolve(pid)
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[pid] = cached
        return cached

    def forget(self, pid: int) -> None:
        self._cache.pop(pid, None)

    def _resolve(self, pid: int) -> AgentDirs:
        env = read_environ(pid, self.proc_root)
        if not env:
            return self._default
        try:
            uid = os.stat(f"{self.proc_root}/{pid}").st_uid
        except OSError:
            return self._default
        return dirs_from(env, self.default_home, _Trust(uid), uid)


def read_environ(pid: int, proc_root: str = "/proc") -> dict[str, str]:
    """The variables in `_WANTED` from pid's initial environment; {} when
    it cannot be read (another user's process, gone, a kernel thread)."""
    try:
        with open(f"{proc_root}/{pid}/environ", "rb") as fh:
            raw = fh.read(_ENVIRON_MAX)
    except OSError:
        return {}
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in _WANTED:
            out[key.decode()] = os.fsdecode(value)
    return out
