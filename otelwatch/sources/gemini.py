"""Gemini CLI's own records: its chat files, read as a session's event stream.

Gemini CLI 0.61.0 appends every conversation to
`<gemini home>/tmp/<project>/chats/session-<YYYY-MM-DDTHH-MM>-<id8>.jsonl`,
where the gemini home is `$GEMINI_CLI_HOME/.gemini` (default `~/.gemini`) and
<project> is a short name it registers in `<gemini home>/projects.json`, with
the project's root written in `tmp/<project>/.project_root` (measured). Its lines:

- first, a header: `{"sessionId", "projectHash", "startTime", "lastUpdated", "kind"}`;
- `{"$set": {...}}`: metadata (lastUpdated, the setup context): state, not work;
- messages `{"id", "timestamp", "type", "content", ...}`: `user` opens a turn
  (unless its content is only `functionResponse` parts: tool results sent back),
  `gemini` is the model's answer; an answer that asks for a tool is first written
  with empty content, and the tool calls (`toolCalls`, with status and timestamp)
  are written only when they end, as that same message again. So the chat file
  never shows a tool at work: the classifier infers it from the process tree
  (otelwatch/tooltree.py). A `gemini` line with text and no tool calls ends the
  turn; `error` ends it too; `info` and `warning` are progress.

Retries are not written here: Gemini prints `Attempt N failed. Retrying with
backoff...` on stderr, which is followed too when it goes to a regular file
(`stderr_file`, `parse_stderr_line`: retry heartbeats). An aborted attempt and
its retry move no progress clock: a blackholed API stays silent across its 60 s
client aborts.

`parse_chat_line` is pure. `find_chat` lists and stats files under the agent's
own directories (agent_dirs.py) and reads small `.project_root` files; it never
writes and never runs anything.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from otelwatch.model import Event, EventKind

__all__ = ["chat_session_id", "find_chat", "parse_chat_line", "parse_stderr_line", "stderr_file"]

# Gemini CLI's retry announcement on stderr (0.61.0, measured): "Attempt 1 failed. Retrying
# with backoff... Error: exception TypeError: fetch failed sending request".
_STDERR_RETRY = re.compile(rb"Attempt (\d{1,6}) failed\. Retrying with backoff")
_MAX_PROJECTS = 512  # project directories looked at per search
_ROOT_FILE_MAX = 8192
_SLACK = 5.0


def parse_chat_line(raw: bytes, seen_at: float, source: str) -> list[Event] | None:
    """The events of one chat-file line; None when it is not a JSON object."""
    line = raw.strip()
    if not line.startswith(b"{") or b"\0" in line:
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    t = _time(obj.get("timestamp"), seen_at)
    if "$set" in obj or ("sessionId" in obj and "type" not in obj):
        kind = "session_meta" if "sessionId" in obj else "set"
        return [Event(time=t, type=f"gemini/{kind}", kind=EventKind.STATE, source=source)]
    typ = obj.get("type")
    if typ == "user":
        if _tool_response(obj.get("content")):
            # The results of the tools, sent back to the model: the turn goes on.
            return [Event(time=t, type="tool_response", source=source)]
        return [Event(time=t, type="prompt", turn="open", awaiting_input=False, source=source,
                      detail=_text(obj.get("content")))]
    if typ == "gemini":
        calls = obj.get("toolCalls")
        if isinstance(calls, list) and calls:
            names = [str(c["name"]) for c in calls if isinstance(c, dict) and isinstance(c.get("name"), str)]
            return [Event(time=t, type="tool_calls", tool=(names[0][:200] if names else None),
                          source=source, detail=",".join(names)[:120])]
        text = _text(obj.get("content"))
        if text:
            return [Event(time=t, type="gemini", turn="close", source=source, detail=text)]
        # An answer that asks for a tool: the call itself shows only when it ends.
        return [Event(time=t, type="gemini", source=source, detail="tool requested")]
    if typ == "error":
        return [Event(time=t, type="error", turn="close", source=source, detail=_text(obj.get("content")))]
    name = typ[:48] if isinstance(typ, str) and typ else "unknown"
    return [Event(time=t, type=f"gemini/{name}", source=source)]


def parse_stderr_line(raw: bytes, seen_at: float, source: str) -> list[Event] | None:
    """A retry heartbeat for Gemini CLI's `Attempt N failed. Retrying with backoff...`
    line on its stderr; no event for any other line (stack traces, warnings)."""
    m = _STDERR_RETRY.search(raw[:512])
    if m is None:
        return []
    return [Event(time=seen_at, type="api_retry", kind=EventKind.HEARTBEAT, retry=True,
                  retry_attempt=int(m.group(1)), source=source, detail="Attempt failed. Retrying with backoff")]


def stderr_file(pid: int, uid: int | None, proc_root: str = "/proc") -> str | None:
    """The regular file a process's stderr goes to (a headless run redirected to a log),
    when it belongs to `uid` (the process's user; any when None); None for a terminal,
    a pipe, or anything else. Retries show only there."""
    try:
        target = os.readlink(f"{proc_root}/{pid}/fd/2")
    except OSError:
        return None
    if not target.startswith("/") or target.endswith(" (deleted)"):
        return None
    try:
        st = os.lstat(target)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
        return None
    return target


def chat_session_id(path: Path) -> str | None:
    """The sessionId in a chat file's header line; None when it cannot be read yet."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline(1 << 16)
        obj = json.loads(first)
    except (OSError, ValueError, RecursionError):
        return None
    sid = obj.get("sessionId") if isinstance(obj, dict) else None
    return sid[:128] if isinstance(sid, str) and sid else None


def find_chat(gemini_dir: Path, cwd: str | None, started_at: float, free: Callable[[Path], bool],
              owned: Callable[[os.stat_result], bool]) -> tuple[str, Path] | None:
    """(session id, chat file) of a Gemini CLI process: the newest chat file of its
    project (the `.project_root` that is its working directory or one above it)
    written since it started, that `free` says is not another process's and whose
    stat `owned` accepts; None when there is none yet."""
    if cwd is None:
        return None
    best: tuple[float, Path] | None = None
    for project in _projects_of(gemini_dir / "tmp", cwd):
        for path in _chat_files(project / "chats"):
            try:
                st = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or not owned(st) or st.st_mtime < started_at - _SLACK \
                    or not free(path):
                continue
            if best is None or st.st_mtime > best[0]:
                best = (st.st_mtime, path)
    if best is None:
        return None
    return chat_session_id(best[1]) or best[1].stem, best[1]


def _projects_of(tmp: Path, cwd: str) -> list[Path]:
    """Project directories under `tmp` whose recorded root is `cwd` or above it."""
    wanted = set(_ancestors(os.path.normpath(cwd)))
    out: list[Path] = []
    try:
        entries = list(os.scandir(tmp))[:_MAX_PROJECTS]
    except OSError:
        return out
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            with open(os.path.join(entry.path, ".project_root"), "rb") as fh:
                root = fh.read(_ROOT_FILE_MAX).decode("utf-8", "replace").strip()
        except OSError:
            continue
        if root and os.path.normpath(root) in wanted:
            out.append(Path(entry.path))
    return out


def _ancestors(path: str) -> Iterable[str]:
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _chat_files(chats: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(chats)
                if e.name.startswith("session-") and e.name.endswith(".jsonl")]
    except OSError:
        return []


def _time(value: object, seen_at: float) -> float:
    if isinstance(value, str) and 10 <= len(value) <= 40:
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return seen_at
        return min(t, seen_at) if t == t else seen_at
    return seen_at


def _tool_response(content: Any) -> bool:
    return isinstance(content, list) and bool(content) and all(
        isinstance(p, dict) and "functionResponse" in p for p in content)


def _text(content: Any) -> str:
    """A short excerpt of a message's content (a string or a list of {"text": ...} parts)."""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    else:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= 120 else text[:119] + "…"
