"""Finding a discovered agent process's own transcript: `TranscriptLocator`.

Owns the mapping (agent, pid, cwd, start time) -> (session id, transcript
file), so a process found by name gets a real event stream without any
change to the agent. Read-only: it lists and stats files under the home
directory and reads at most the first line of a Codex rollout.

What is known and what is heuristic:

- Claude Code writes `~/.claude/projects/<project>/<session-uuid>.jsonl`,
  where <project> is the working directory with every character other than
  letters and digits replaced by "-" (so "/" and "." become "-"). Recent
  versions also write `~/.claude/sessions/<pid>.json` with `sessionId` and
  `cwd`; when that file names a transcript that exists, it is used (known).
  It can go stale (`/clear` starts a new transcript without updating it),
  so a newer transcript of the same project that nobody else holds wins
  over it (heuristic).
- Otherwise, and for Codex (`~/.codex/sessions/YYYY/MM/DD/rollout-*.jsonl`,
  whose first line `session_meta` records `id` and `cwd`), the transcript is
  the most recently modified one of that working directory that was written
  after the process started and is not already handed to another process
  (heuristic: two agents started in the same directory at the same time can
  be swapped).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

__all__ = ["TranscriptLocator", "claude_project_dirs"]

_SLACK = 5.0  # seconds: a transcript touched just before the process start still counts
_NON_ALNUM = re.compile(r"[^A-Za-z0-9]")


def claude_project_dirs(claude_dir: Path, cwd: str) -> list[Path]:
    """Candidate project directories of a working directory (known encodings first)."""
    names = [_NON_ALNUM.sub("-", cwd), cwd.replace("/", "-").replace(".", "-")]
    out: list[Path] = []
    for name in names:
        path = claude_dir / "projects" / name
        if path not in out:
            out.append(path)
    return out


class TranscriptLocator:
    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self._claims: dict[Path, int] = {}  # transcript -> pid it was handed to
        self._meta_cache: dict[Path, tuple[tuple[int, int], str | None, str | None]] = {}

    def find(self, agent: str, pid: int, cwd: str | None, started_at: float) -> tuple[str, Path] | None:
        """(session_id, transcript path) for the process, or None when none is known yet."""
        if agent.startswith("claude"):
            found = self._claude(pid, cwd, started_at)
        elif agent.startswith("codex"):
            found = self._codex(pid, cwd, started_at)
        else:
            return None
        if found is not None:
            self._claim(found[1], pid)
        return found

    def release(self, pid: int) -> None:
        """Forget what was handed to `pid` (its session ended)."""
        for path in [p for p, owner in self._claims.items() if owner == pid]:
            del self._claims[path]

    # ------------------------------------------------------------------ claude

    def _claude(self, pid: int, cwd: str | None, started_at: float) -> tuple[str, Path] | None:
        claude_dir = self.home / ".claude"
        sid, file_cwd = self._claude_session_file(claude_dir, pid)
        cwd = cwd or file_cwd
        dirs = claude_project_dirs(claude_dir, cwd) if cwd else []
        candidates = self._recent(
            (p for d in dirs for p in _jsonl_in(d)), pid, started_at
        )
        newest = candidates[0] if candidates else None
        if sid:
            named = next((p for d in dirs for p in [d / f"{sid}.jsonl"] if p.is_file()), None)
            if named is None:  # cwd unknown or moved: look in every project
                named = next(iter((claude_dir / "projects").glob(f"*/{_glob_escape(sid)}.jsonl")), None)
            # The session file can be stale (/clear): a newer free transcript wins.
            if named is not None and self._free(named, pid) and (
                newest is None or newest[1] == named or newest[0] <= (_mtime(named) or 0.0)
            ):
                return sid, named
        if newest is not None:
            return newest[1].stem, newest[1]
        return None

    def _claude_session_file(self, claude_dir: Path, pid: int) -> tuple[str | None, str | None]:
        try:
            with open(claude_dir / "sessions" / f"{pid}.json", "rb") as fh:
                obj = json.loads(fh.read(65536))
        except (OSError, ValueError):
            return None, None
        if not isinstance(obj, dict) or obj.get("pid") not in (pid, None):
            return None, None
        sid = obj.get("sessionId") or obj.get("session_id")
        cwd = obj.get("cwd")
        ok_sid = sid if isinstance(sid, str) and re.fullmatch(r"[A-Za-z0-9._-]{1,128}", sid) else None
        return ok_sid, cwd if isinstance(cwd, str) else None

    # ------------------------------------------------------------------ codex

    def _codex(self, pid: int, cwd: str | None, started_at: float) -> tuple[str, Path] | None:
        base = self.home / ".codex" / "sessions"
        files: list[Path] = []
        for day in _days(started_at, time.time()):
            files.extend(sorted((base / day).glob("rollout-*.jsonl")))
        files.extend(base.glob("rollout-*.jsonl"))  # older, flat layout
        best: tuple[float, Path, str] | None = None
        for mtime, path in self._recent(files, pid, started_at):
            sid, meta_cwd = self._codex_meta(path)
            if cwd is not None and (meta_cwd is None or os.path.normpath(meta_cwd) != os.path.normpath(cwd)):
                continue
            best = (mtime, path, sid or path.stem)
            break
        return None if best is None else (best[2], best[1])

    def _codex_meta(self, path: Path) -> tuple[str | None, str | None]:
        try:
            st = path.stat()
        except OSError:
            return None, None
        key = (st.st_dev, st.st_ino)
        cached = self._meta_cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        sid = cwd = None
        try:
            with open(path, "rb") as fh:
                first = fh.readline(1 << 20)
            obj = json.loads(first)
            payload = obj.get("payload") if isinstance(obj, dict) else None
            if isinstance(obj, dict) and obj.get("type") == "session_meta" and isinstance(payload, dict):
                sid = payload.get("id") if isinstance(payload.get("id"), str) else None
                cwd = payload.get("cwd") if isinstance(payload.get("cwd"), str) else None
        except (OSError, ValueError):
            pass
        if sid is None and cwd is None:
            return None, None  # first line not written yet (or not a rollout): look again later
        self._meta_cache[path] = (key, sid, cwd)
        if len(self._meta_cache) > 4096:
            self._meta_cache.clear()
        return sid, cwd

    # ------------------------------------------------------------------ shared

    def _recent(self, paths: Iterable[Path], pid: int, started_at: float) -> list[tuple[float, Path]]:
        """(mtime, path) of files written since the process started and free for pid, newest first."""
        out = []
        for path in paths:
            m = _mtime(path)
            if m is not None and m >= started_at - _SLACK and self._free(path, pid):
                out.append((m, path))
        out.sort(key=lambda mp: mp[0], reverse=True)
        return out

    def _free(self, path: Path, pid: int) -> bool:
        owner = self._claims.get(path)
        return owner is None or owner == pid

    def _claim(self, path: Path, pid: int) -> None:
        for p in [p for p, owner in self._claims.items() if owner == pid and p != path]:
            del self._claims[p]
        self._claims[path] = pid


def _jsonl_in(directory: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(directory) if e.name.endswith(".jsonl") and e.is_file()]
    except OSError:
        return []


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _days(start: float, now: float) -> list[str]:
    """YYYY/MM/DD directories a rollout of a process started at `start` can be in:
    around its start day and the last week (UTC and local dates can differ by one)."""
    start_day = datetime.fromtimestamp(min(start, now), tz=timezone.utc).date()
    today = datetime.fromtimestamp(now, tz=timezone.utc).date()
    wanted = {start_day + timedelta(days=k) for k in (-1, 0, 1)}
    wanted |= {today - timedelta(days=k) for k in range(-1, 7)}
    return [f"{d.year:04d}/{d.month:02d}/{d.day:02d}" for d in sorted(wanted)]
