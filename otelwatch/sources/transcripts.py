"""Following a discovered agent process's own transcript: `TranscriptLocator`.

Owns the mapping (agent, pid, cwd, start time) -> (session id, transcript
file), so a process found by name gets a real event stream without any
change to the agent; what Claude Code's session file says about the CLI's
state (`ClaudeSession`), and the events that bring a session's activity in
line with it (`status_events`); and the reading of a transcript that its
lines alone do not say (`fold_transcript`: an API attempt after an
unanswered one is a retry). Read-only: it lists and stats files under each
agent's own config directories (agent_dirs.py: from its environment, or the
configured home) and reads at most the first line of a Codex rollout and
Claude Code's small session files. Never writes, never runs anything.

What is known and what is heuristic:

- Claude Code writes `~/.claude/projects/<project>/<session-uuid>.jsonl`,
  where <project> is the working directory with every character other than
  letters and digits replaced by "-" (so "/" and "." become "-"). Recent
  versions also write `~/.claude/sessions/<pid>.json` with `sessionId` and
  `cwd`. 2.1.330 keeps it current (measured): it is rewritten on every
  status change (`status`: idle, busy, waiting with `waitingFor`, and
  `statusUpdatedAt` in ms), `sessionId` follows `/clear` at once, and the
  file is removed when the CLI exits. Such a file names the transcript even
  before it exists (the CLI creates it at the first prompt), so a new
  session's transcript is known from the first tick (known). An older
  file without `status` was written once and can go stale (`/clear`
  starts a new transcript without updating it), so a newer transcript of
  the same project that nobody else holds wins over it (heuristic).
- Gemini CLI's chat files, opencode's session in its database and aider's
  history (gemini.py, opencode.py, aider.py) are found by working directory
  and recency, each only when it is a regular file of the process's own user.
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
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from otelwatch.events.activity import Activity
from otelwatch.model import Event, EventKind
from otelwatch.sources.agent_dirs import AgentDirs, dirs_from
from otelwatch.sources.aider import find_history
from otelwatch.sources.gemini import find_chat
from otelwatch.sources.opencode import find_session
from otelwatch.sources.processes import opencode_project
from otelwatch.sources.tail import open_owned

__all__ = ["BACKGROUND_GRACE_S", "ClaudeSession", "TranscriptLocator", "claude_project_dirs", "fold_transcript",
           "status_events"]

_SLACK = 5.0  # seconds: a transcript touched just before the process start still counts
_NON_ALNUM = re.compile(r"[^A-Za-z0-9]")
_SESSION_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_SESSION_FILE_MAX = 65536
_OTHER_AGENTS = frozenset({"gemini", "opencode", "aider"})
# A turn closed this long ago while the session file still says busy/shell is background
# work, not the file lagging behind the transcript (2.1.330 goes busy -> idle in ~0.3 s).
BACKGROUND_GRACE_S = 3.0


@dataclass(frozen=True)
class ClaudeSession:
    """What Claude Code's `~/.claude/sessions/<pid>.json` says about one of its processes."""

    pid: int
    session_id: str | None
    cwd: str | None
    # "idle" (at its input box), "busy" (a turn runs), "waiting" (asks its user: `waiting_for`
    # says what, e.g. "permission prompt"); others seen in passing ("shell") carry nothing
    # known. None: a version that does not keep the file current.
    status: str | None = None
    status_at: float | None = None  # when the status was set (the CLI's own clock, seconds)
    waiting_for: str | None = None
    kind: str | None = None  # "interactive", ...
    name: str | None = None  # the session's own name (`/rename`, or one the CLI gave it)

    @property
    def current(self) -> bool:
        """Whether the CLI keeps this file current (it names the transcript in use now)."""
        return self.status is not None


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
    """`dirs(pid)`: where that process keeps its files (agent_dirs.AgentDirResolver);
    without it every process's are under `home`."""

    def __init__(self, home: Path, dirs: Callable[[int], AgentDirs] | None = None) -> None:
        self.home = Path(home)
        fixed = dirs_from({}, self.home, uid=os.geteuid())
        self._dirs: Callable[[int], AgentDirs] = dirs or (lambda _pid: fixed)
        self._claims: dict[Path, int] = {}  # transcript -> pid it was handed to
        self._meta_cache: dict[Path, tuple[tuple[int, int], str | None, str | None]] = {}
        self._sessions: dict[int, tuple[tuple[int, int, int, int], ClaudeSession | None]] = {}
        self._denied: set[int] = set()  # pids whose files we may not read

    def find(self, agent: str, pid: int, cwd: str | None, started_at: float) -> tuple[str, Path] | None:
        """(session_id, transcript path) for the process, or None when none is known yet.

        For a Claude Code process whose session file is kept current the path is
        the transcript it names, which may not exist yet (no prompt so far)."""
        if agent.startswith("claude"):
            found = self._claude(pid, cwd, started_at)
        elif agent.startswith("codex"):
            found = self._codex(pid, cwd, started_at)
        elif agent in _OTHER_AGENTS:
            found = self._other(agent, pid, cwd, started_at)
        else:
            return None
        if found is not None:
            self._claim(found[1], pid)
        return found

    def release(self, pid: int) -> None:
        """Forget what was handed to `pid` (its session ended)."""
        for path in [p for p, owner in self._claims.items() if owner == pid]:
            del self._claims[path]
        self._sessions.pop(pid, None)
        self._denied.discard(pid)
        forget = getattr(self._dirs, "forget", None)
        if forget is not None:
            forget(pid)

    # ------------------------------------------------------------------ claude

    def claude_session(self, pid: int) -> ClaudeSession | None:
        """The process's session file, parsed; None when it has none (or not a readable one).

        Cheap enough for every tick: one stat, and one read of a small file only when it
        changed since the last call."""
        dirs = self._dirs(pid)
        if dirs.claude is None or dirs.uid is None:
            self._sessions.pop(pid, None)
            return None
        path = dirs.claude / "sessions" / f"{pid}.json"
        try:
            st = os.lstat(path)
        except OSError as exc:
            self._sessions.pop(pid, None)
            self._note_denied(pid, exc)  # there, but not ours to read: blind, not idle
            return None
        self._denied.discard(pid)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != dirs.uid:
            # Another user's, a symlink, a FIFO, a device: never read (DESIGN "Users are walls").
            self._sessions.pop(pid, None)
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._sessions.get(pid)
        if cached is not None and cached[0] == key:
            return cached[1]
        session = _read_session_file(path, pid, dirs.uid)
        self._sessions[pid] = (key, session)
        if len(self._sessions) > 4096:
            self._sessions.clear()
        return session

    def _claude(self, pid: int, cwd: str | None, started_at: float) -> tuple[str, Path] | None:
        agent_dirs = self._dirs(pid)
        claude_dir, uid = agent_dirs.claude, agent_dirs.uid
        if claude_dir is None or uid is None:
            return None
        session = self.claude_session(pid)
        sid = session.session_id if session is not None else None
        if session is not None and session.current and sid:
            # Kept current by the CLI: it names the transcript in use, also after /clear,
            # and no heuristic may take another process's transcript instead. Its cwd is
            # the project the CLI files it under (the process may have changed directory).
            where = session.cwd or cwd
            dirs = claude_project_dirs(claude_dir, where) if where else []
            named = next((p for d in dirs for p in [d / f"{sid}.jsonl"] if _owned(p, uid)), None)
            if named is None and not dirs:
                named = next((p for p in (claude_dir / "projects").glob(f"*/{_glob_escape(sid)}.jsonl")
                              if _owned(p, uid)), None)
            if named is None and dirs and not os.path.lexists(dirs[0] / f"{sid}.jsonl"):
                named = dirs[0] / f"{sid}.jsonl"  # not written yet: the CLI creates it at the first prompt
            if named is not None and self._free(named, pid):
                return sid, named
            return None
        cwd = cwd or (session.cwd if session is not None else None)
        dirs = claude_project_dirs(claude_dir, cwd) if cwd else []
        candidates = self._recent(
            (p for d in dirs for p in _jsonl_in(d)), pid, started_at, uid
        )
        newest = candidates[0] if candidates else None
        if sid:
            named = next((p for d in dirs for p in [d / f"{sid}.jsonl"] if _owned(p, uid)), None)
            if named is None:  # cwd unknown or moved: look in every project
                named = next((p for p in (claude_dir / "projects").glob(f"*/{_glob_escape(sid)}.jsonl")
                              if _owned(p, uid)), None)
            # The session file can be stale (/clear): a newer free transcript wins.
            if named is not None and self._free(named, pid) and (
                newest is None or newest[1] == named or newest[0] <= (_mtime(named) or 0.0)
            ):
                return sid, named
        if newest is not None:
            return newest[1].stem, newest[1]
        return None

    # ------------------------------------------------------------------ codex

    def denied(self, pid: int) -> bool:
        """Whether `pid`'s turn information is there but not ours to read: its environment
        (another user's process, without CAP_SYS_PTRACE) or its agent's directories
        (another user's, without CAP_DAC_READ_SEARCH)."""
        return pid in self._denied or pid in getattr(self._dirs, "denied", ())

    def _note_denied(self, pid: int, exc: OSError) -> None:
        if isinstance(exc, PermissionError):
            if len(self._denied) >= 4096:
                self._denied.clear()
            self._denied.add(pid)
        else:
            self._denied.discard(pid)

    def _codex(self, pid: int, cwd: str | None, started_at: float) -> tuple[str, Path] | None:
        dirs = self._dirs(pid)
        if dirs.codex is None or dirs.uid is None:
            return None
        base, uid = dirs.codex / "sessions", dirs.uid
        try:
            base.stat()
            self._denied.discard(pid)
        except OSError as exc:
            self._note_denied(pid, exc)
        files: list[Path] = []
        for day in _days(started_at, time.time()):
            files.extend(sorted((base / day).glob("rollout-*.jsonl")))
        files.extend(base.glob("rollout-*.jsonl"))  # older, flat layout
        best: tuple[float, Path, str] | None = None
        for mtime, path in self._recent(files, pid, started_at, uid):
            sid, meta_cwd = self._codex_meta(path, uid)
            if cwd is not None and (meta_cwd is None or os.path.normpath(meta_cwd) != os.path.normpath(cwd)):
                continue
            best = (mtime, path, sid or path.stem)
            break
        return None if best is None else (best[2], best[1])

    def _codex_meta(self, path: Path, uid: int) -> tuple[str | None, str | None]:
        st = _owned(path, uid)
        if st is None:
            return None, None
        key = (st.st_dev, st.st_ino)
        cached = self._meta_cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        sid = cwd = None
        try:
            with open_owned(path, (uid,)) as fh:
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

    # ------------------------------------------------------------------ gemini, opencode, aider

    def _other(self, agent: str, pid: int, cwd: str | None, started_at: float) -> tuple[str, Path] | None:
        """Gemini CLI's chat file, opencode's session in its database, aider's history
        (otelwatch/sources/gemini.py, opencode.py, aider.py), each only when it is a
        regular file of the process's own user."""
        dirs = self._dirs(pid)
        uid = dirs.uid

        def owned(st: os.stat_result) -> bool:
            return stat.S_ISREG(st.st_mode) and (uid is None or st.st_uid == uid)

        def free(path: Path) -> bool:
            return self._free(path, pid)

        if agent == "gemini":
            gemini_dir = dirs.gemini or dirs_from({}, self.home).gemini
            assert gemini_dir is not None
            return find_chat(gemini_dir, cwd, started_at, free, owned)
        if agent == "opencode":
            data_dir = dirs.opencode or dirs_from({}, self.home).opencode
            assert data_dir is not None
            project = opencode_project(_cmdline(pid)) if cwd is not None else None
            if project is not None and cwd is not None:  # `opencode PROJECT`: its sessions are filed there
                found = find_session(data_dir, os.path.join(cwd, project), started_at, free, owned)
                if found is not None:
                    return found
            return find_session(data_dir, cwd, started_at, free, owned)
        env = {"AIDER_CHAT_HISTORY_FILE": dirs.aider_history} if dirs.aider_history else {}
        path = find_history(cwd, env, _cmdline(pid), uid, started_at)
        if path is None or not self._free(path, pid):
            return None
        return f"aider-{pid}", path

    # ------------------------------------------------------------------ shared

    def _recent(self, paths: Iterable[Path], pid: int, started_at: float, uid: int) -> list[tuple[float, Path]]:
        """(mtime, path) of the agent's user's own regular files written since the process
        started and free for pid, newest first."""
        out = []
        for path in paths:
            st = _owned(path, uid)
            m = None if st is None else st.st_mtime
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


def _cmdline(pid: int) -> tuple[str, ...]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read(1 << 16)
    except OSError:
        return ()
    return tuple(os.fsdecode(a) for a in raw.split(b"\0") if a)


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


def _owned(path: Path, uid: int | None) -> os.stat_result | None:
    """The lstat of `path` when it is a regular file (not a symlink) owned by `uid`; else None."""
    if uid is None:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) and st.st_uid == uid else None


def _read_session_file(path: Path, pid: int, uid: int) -> ClaudeSession | None:
    try:
        # Non-blocking, no symlink, a regular file of the agent's user (checked on the open
        # descriptor), at most _SESSION_FILE_MAX bytes: a FIFO here never stalls the loop.
        with open_owned(path, (uid,)) as fh:
            obj = json.loads(fh.read(_SESSION_FILE_MAX))
    except (OSError, ValueError, RecursionError):
        return None  # being rewritten, or not JSON: read again when it changes
    if not isinstance(obj, dict) or obj.get("pid") not in (pid, None):
        return None
    sid = obj.get("sessionId") or obj.get("session_id")
    status = obj.get("status")
    at = obj.get("statusUpdatedAt", obj.get("updatedAt"))
    return ClaudeSession(
        pid=pid,
        session_id=sid if isinstance(sid, str) and _SESSION_ID.fullmatch(sid) else None,
        cwd=_text(obj.get("cwd"), 4096),
        status=_text(status, 32),
        status_at=float(at) / 1000.0 if isinstance(at, (int, float)) and not isinstance(at, bool) else None,
        waiting_for=_text(obj.get("waitingFor"), 120),
        kind=_text(obj.get("kind"), 32),
        name=_text(obj.get("name"), 120),
    )


def _text(value: object, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


# --------------------------------------------------------------------------- reading a session's state


def status_events(session: ClaudeSession, before: ClaudeSession | None, activity: Activity,
                  now: float) -> list[Event]:
    """The events that bring `activity` in line with the CLI's session file, at `now`.

    Called every tick: it returns nothing once the activity agrees, and it never
    undoes what happened after the status was set. Its events are heartbeats,
    except the opening of a turn (a prompt is work). What the file gives that
    nothing else does (measured on 2.1.330):

    - idle: the CLI is back at its input box. Esc while waiting on the API writes
      nothing anywhere (no transcript line, no Stop hook): this closes the turn,
      when it was opened no later than the status was set.
    - waiting: a person is asked (a permission prompt): awaiting_input, and it stays
      so while the file says waiting (transcript lines flushed after the prompt
      came up must not clear it).
    - busy: a turn runs. After a permission prompt it means the person answered:
      no longer awaiting input (hooks say nothing until the tool ends). A new busy
      status with no turn open opens one (a prompt, before its transcript lines).
    - busy or shell after the turn closed (BACKGROUND_GRACE_S ago): background work
      (subagents, a run_in_background shell): the turn opens again until idle.

    `before` is the file as seen at the previous tick (None: not seen before).
    """
    status = session.status
    if status is None:
        return []
    t = min(session.status_at if session.status_at is not None else now, now)
    if status == "idle":
        opened = activity.turn_opened_at
        if activity.turn_open and (opened is None or opened <= t):
            return [Event(time=t, type="status/idle", kind=EventKind.HEARTBEAT, turn="close",
                          awaiting_input=False, source="session", own=True, detail="back at the input box")]
        return []
    if status == "waiting":
        if not activity.awaiting_input:
            return [Event(time=t, type="status/waiting", kind=EventKind.HEARTBEAT, awaiting_input=True,
                          source="session", own=True, detail=session.waiting_for or "")]
        return []
    if status not in ("busy", "shell"):
        return []
    out: list[Event] = []
    if activity.awaiting_input and status == "busy":
        out.append(Event(time=t, type="status/busy", kind=EventKind.HEARTBEAT, awaiting_input=False,
                         source="session", own=True, detail="answered"))
    fresh = before is None or before.status != status or before.status_at != session.status_at
    closed = max((e.time for e in activity.recent if e.turn == "close"), default=None)
    if status == "busy" and fresh and not activity.turn_open and (closed is None or t > closed):
        out.append(Event(time=t, type="status/busy", turn="open", awaiting_input=False, source="session", own=True,
                         detail="turn started"))
    elif not activity.turn_open and closed is not None and t <= closed and now - closed >= BACKGROUND_GRACE_S:
        # The turn ended but the CLI still says it works: background Agent-tool subagents
        # (busy) or a run_in_background shell (shell). It processes until the file says idle:
        # the turn is open again, dated when the status was set (it moves no clock), so the
        # subagents' and shells' processes started since count as its tools (tooltree.py).
        opened = min((e.time for e in activity.recent if e.turn == "open"), default=t)
        out.append(Event(time=min(t, opened), type=f"status/{status}", kind=EventKind.STATE, turn="open",
                         source="session", own=True, detail="background work"))
    return out


# Claude Code transcript lines the parser calls heartbeats (the loop at work on itself) that
# an interactive transcript writes together with a prompt or an answer (2.1.330).
_WRITTEN_WITH_WORK = frozenset({"api-request", "api-request-shape", "api-request-blob", "last-prompt",
                                "atis-latch", "cost-state"})


def fold_transcript(activity: Activity, events: Iterable[Event]) -> Activity:
    """`activity` after a Claude Code transcript's `events`, with what its lines imply.

    In interactive mode the CLI announces no retry (no api_retry, no api_error line):
    each attempt writes one `api-request` line, so an attempt made while the one before
    it got no answer (no progress since) and was not announced is a retry. Every other
    API-call and bookkeeping line is written in the same flush as the prompt or answer
    it goes with: state, not a heartbeat (one a moment younger than the prompt would
    outlive its silence and pass the hung turn off as a tool run)."""
    for event in events:
        if event.type in _WRITTEN_WITH_WORK and event.kind is EventKind.HEARTBEAT and not event.retry:
            if event.type == "api-request" and _unanswered_attempt(activity, event.time):
                event = replace(event, retry=True, detail=event.detail or "attempt after an unanswered one")
            else:
                event = replace(event, kind=EventKind.STATE)
        activity = activity.apply(event)
    return activity


def _unanswered_attempt(activity: Activity, t: float) -> bool:
    requests = [e.time for e in activity.recent if e.type == "api-request" and e.time <= t]
    if not requests:
        return False
    last = max(requests)
    if activity.last_progress_time is not None and activity.last_progress_time > last:
        return False  # answered (or the turn moved on)
    # A retry the CLI announced itself (api_retry / api_error with its schedule) is already counted.
    return not any(e.retry and e.time >= last and e.type != "api-request" for e in activity.recent)
