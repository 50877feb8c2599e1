"""aider's own record: its chat history markdown, read as a session's event stream.

aider 0.86.2 appends to `.aider.chat.history.md` in the git root (else the working
directory; `--chat-history-file` or `AIDER_CHAT_HISTORY_FILE` move it) as it works,
one file for every run in that project (measured):

- `# aider chat started at 2026-12-07 03:52:02`: a new run (no turn is open);
- `#### <prompt>`: a prompt, opening a turn (`#### /run CMD` and `#### !CMD` run a
  shell command as a child `sh -c CMD`: a tool call, open until the next line);
- `> Tokens: 600 sent, 9 received.`: the model's answer is in: the turn ends;
- `> Retrying in 0.2 seconds...`: an API attempt failed, the next is announced
  (aider doubles the delay from 0.125 s up to 60 s);
- other `> ` lines (tool output, warnings, API errors) and the model's text:
  progress. An API error line is a heartbeat: the loop lives, work did not move.

`HistoryParser` is pure but for its memory of an open `/run` call. `find_history`
stats the one file a process uses; it never writes and never runs anything.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from otelwatch.model import Event, EventKind

__all__ = ["HISTORY_NAME", "HistoryParser", "find_history", "parse_retry_delay"]

HISTORY_NAME = ".aider.chat.history.md"
_RETRY = re.compile(r"^> Retrying in (\d+(?:\.\d+)?) seconds?", re.IGNORECASE)
_API_ERROR = re.compile(r"^> (litellm\.\w*Error|\w*(?:API|Connection|Timeout)\w*Error)\b")
_RUN = re.compile(r"^#### (?:/run\s+|/test\s+|!)(.+)")
_MAX_DELAY_S = 3600.0


def parse_retry_delay(line: str) -> float | None:
    """The delay of a `> Retrying in N seconds...` line, in seconds; None for other lines."""
    m = _RETRY.match(line)
    return None if m is None else min(float(m.group(1)), _MAX_DELAY_S)


class HistoryParser:
    """`parse(raw, seen_at, source)`: the events of one history line (None for binary
    garbage). Remembers an open `/run` call and whether it is inside an API error's lines."""

    def __init__(self) -> None:
        self._run_open: str | None = None  # the tool id of a `/run` call with no line after it yet
        self._in_error = False  # after an API error line, until work shows again

    def parse(self, raw: bytes, seen_at: float, source: str) -> list[Event] | None:
        if b"\0" in raw:
            return None
        line = raw.decode("utf-8", "replace").rstrip()
        if not line.strip():
            return []
        out: list[Event] = []
        if self._run_open is not None:
            # The command printed or finished: aider writes nothing while it runs, and it is
            # back at its prompt after it (the output goes to the model only with the next prompt).
            out.append(Event(time=seen_at, type="run_end", tool="run", tool_id=self._run_open,
                             tool_call="close", turn="close", source=source))
            self._run_open = None
        out.append(self._event(line, seen_at, source))
        return out

    def _event(self, line: str, t: float, source: str) -> Event:
        quoted = line.startswith(">")
        if not quoted:
            self._in_error = False
        if line.startswith("# aider chat started"):
            return Event(time=t, type="session_start", turn="close", source=source, detail=line[2:80])
        if line.startswith("#### "):
            text = line[5:].strip()
            run = _RUN.match(line)
            if run is not None:
                self._run_open = f"run@{t}"
                return Event(time=t, type="run", tool="run", tool_id=self._run_open, tool_call="open",
                             turn="open", awaiting_input=False, source=source, detail=_short(run.group(1)))
            if text.startswith("/") and text.split()[0] not in _MODEL_COMMANDS:
                # /add, /drop, /undo, /clear ...: handled locally, no model call, no turn.
                return Event(time=t, type="command", awaiting_input=False, source=source, detail=_short(text))
            return Event(time=t, type="prompt", turn="open", awaiting_input=False, source=source,
                         detail=_short(text))
        if line.startswith("> Tokens:"):
            self._in_error = False
            return Event(time=t, type="tokens", turn="close", source=source, detail=_short(line[2:]))
        delay = parse_retry_delay(line)
        if delay is not None:
            # The next attempt is announced: the turn goes on (an API error line closed it).
            self._in_error = False
            return Event(time=t, type="api_retry", kind=EventKind.HEARTBEAT, retry=True, retry_delay_s=delay,
                         turn="open", source=source, detail=_short(line[2:]))
        if _API_ERROR.match(line):
            # Followed by `Retrying in ...` when aider tries again; otherwise it gave up and
            # is back at its prompt (or exits, headless): the turn ends here.
            self._in_error = True
            return Event(time=t, type="api_error", kind=EventKind.HEARTBEAT, turn="close", source=source,
                         detail=_short(line[2:]))
        if quoted and self._in_error:
            # The error's explanation ("The API provider's servers are down ..."): not work.
            return Event(time=t, type="api_error", kind=EventKind.HEARTBEAT, source=source, detail=_short(line[2:]))
        return Event(time=t, type="output" if quoted else "assistant", source=source,
                     detail=_short(line.lstrip("> ")))


# Slash commands that send a prompt to the model (a turn); the others are handled locally.
_MODEL_COMMANDS = frozenset({"/ask", "/code", "/architect", "/context", "/help", "/lint", "/test"})


def find_history(cwd: str | None, env: Mapping[str, str], argv: tuple[str, ...], uid: int | None,
                 started_at: float) -> Path | None:
    """The chat history file of an aider process: `--chat-history-file`, else
    `AIDER_CHAT_HISTORY_FILE`, else `.aider.chat.history.md` in the git root above
    `cwd` (or `cwd`). Only a regular file (not a symlink) owned by `uid` (the
    process's user; any owner when None) that was written since the process
    started; None otherwise."""
    if cwd is None:
        return None
    named = _arg(argv, "--chat-history-file") or env.get("AIDER_CHAT_HISTORY_FILE")
    path = Path(os.path.join(cwd, named)) if named else Path(_git_root(cwd) or cwd) / HISTORY_NAME
    try:
        st = path.lstat()
    except OSError:
        return None
    if not _regular(st) or (uid is not None and st.st_uid != uid) or st.st_mtime < started_at - 5.0:
        return None
    return path


def _regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def _arg(argv: tuple[str, ...], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


def _git_root(cwd: str) -> str | None:
    path = os.path.normpath(cwd)
    for _ in range(64):
        if os.path.exists(os.path.join(path, ".git")):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 120 else text[:119] + "…"
