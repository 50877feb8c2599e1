"""`otelwatch status`: the sessions of a running daemon as a table.

`format_table` is pure (rows in, text out) and shared with `otelwatch demo`.
`LiveScreen` redraws frames in place on a terminal (`--watch`, the demo) and
appends them unchanged when stdout is a pipe or a file, so output stays
pipeable. Reads only the daemon's HTTP API; never touches /proc.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import IO, Any

from otelwatch.model import SEVERITY as STATE_SEVERITY
from otelwatch.sessions.report import human_duration

# In display order, each with its keep priority: at a narrow width the highest number
# goes first. SESSION (never cut: ids are copied from here), STATE and REASON stay.
COLUMNS = ("SESSION", "NAME", "AGENT", "PID", "USER", "STATE", "REASON", "FOR", "SILENCE", "CPU%", "RSS",
           "TCP", "FDS", "DIR")
KEEP = {"SESSION": 0, "STATE": 0, "REASON": 0, "SILENCE": 1, "NAME": 2, "CPU%": 3, "TCP": 4, "FOR": 5,
        "AGENT": 6, "PID": 7, "FDS": 8, "RSS": 9, "USER": 10, "DIR": 11}
EMPTY_KEEP = 99  # the keep number of a column whose every cell is "-"
SEVERITY = tuple(s.value for s in STATE_SEVERITY)  # most severe first (model.SEVERITY)
DIR_MAX = 40
# Whose sessions come first in the table: the caller's own, unless root (who sees all alike).
_CALLER = os.getuid() if os.getuid() != 0 else None
_COLORS = {"active": "32", "idle": "36", "long_running": "34", "stalled": "33", "stuck": "31;1",
           "exited": "90", "starting": "37"}


def _finite(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def severity_key(s: Mapping[str, Any]) -> tuple[Any, ...]:
    """Most severe first (stuck, stalled, long_running, active, idle, starting, exited),
    longest silence first within a state, then by id: the order of `status` and `top`."""
    state = str(s.get("state"))
    rank = SEVERITY.index(state) if state in SEVERITY else len(SEVERITY)
    return (rank, -_finite(s.get("silence_s")), str(s.get("session_id")))


def _bytes(n: int | None) -> str:
    if not n:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}G"  # pragma: no cover


def _tcp(tcp: Mapping[str, int] | None) -> str:
    if tcp is None:
        return "?"  # could not be read (another user's sockets): unknown, never 0
    if not tcp:
        return "0"
    short = {"ESTABLISHED": "EST", "CLOSE_WAIT": "CW", "SYN_SENT": "SYN", "TIME_WAIT": "TW"}
    return ",".join(f"{n}{short.get(state, state)}" for state, n in sorted(tcp.items()) if n) or "0"


def _fds(s: Mapping[str, Any]) -> str:
    if s.get("open_fds") is not None:
        return str(s.get("open_fds"))
    return "-" if s.get("state") == "exited" else "?"  # unreadable, never 0


def own_first(sessions: Sequence[Mapping[str, Any]], uid: int | None = None) -> list[Mapping[str, Any]]:
    """The caller's own sessions first (a non-root caller on a shared host), order kept otherwise."""
    uid = os.getuid() if uid is None else uid
    if uid == 0:
        return list(sessions)
    return sorted(sessions, key=lambda s: s.get("uid") != uid)


def sessions_path(user: str | None) -> str:
    """/api/sessions, filtered to one owner (`?user=NAME` or a uid) when `user` is given."""
    return "/api/sessions" + ("" if not user else "?" + urllib.parse.urlencode({"user": user}))


def safe(value: Any) -> str:
    """A value from the API as one line of printable text (nothing a terminal would obey)."""
    text = str(value)
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def short_dir(path: Any, limit: int = DIR_MAX) -> str:
    """A working directory shortened from the left (its last parts say the most)."""
    text = safe(path) if path else "-"
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def fit_columns(widths: Sequence[int], keep: Sequence[int], width: int | None) -> list[int]:
    """Indexes of the columns that fit in `width` (two spaces between columns), dropping
    the highest `keep` number first; columns with keep 0 are never dropped."""
    shown = list(range(len(widths)))
    if width is None:
        return shown
    for i in sorted(shown, key=lambda i: (-keep[i], -i)):
        if sum(widths[j] for j in shown) + 2 * (len(shown) - 1) <= width:
            break
        if keep[i] > 0:
            shown.remove(i)
    return shown


def format_table(sessions: Sequence[Mapping[str, Any]], now: float, *, color: bool = False,
                 width: int | None = None) -> str:
    """The sessions, most severe first; at most `width` columns wide (None: every column,
    every directory in full), dropping columns by KEEP. Session ids are never cut."""
    rows = [COLUMNS]
    states = []
    def order(s: Mapping[str, Any]) -> tuple[bool, Any]:
        return _CALLER is not None and s.get("uid") != _CALLER, severity_key(s)

    for s in sorted(sessions, key=order):
        cpu = s.get("cpu_percent")
        since = s.get("state_since")
        exited = s.get("state") == "exited"
        rows.append((
            safe(s.get("session_id", "")),
            safe(s.get("name") or "-")[:32],
            safe(s.get("agent", ""))[:14],
            str(s.get("pid") or "-"),
            safe(s.get("user") or "-")[:16],
            safe(s.get("state", "")),
            safe(s.get("reason", "")),
            human_duration(now - since) if isinstance(since, (int, float)) else "-",
            human_duration(s.get("silence_s")) if not exited else "-",
            "-" if not isinstance(cpu, (int, float)) else f"{cpu:.0f}",
            _bytes(s.get("rss_bytes")),
            "-" if s.get("state") == "exited" else _tcp(s.get("tcp")),
            _fds(s),
            short_dir(s.get("cwd")) if width is not None else safe(s.get("cwd") or "-"),
        ))
        states.append(str(s.get("state", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    # A column with nothing to say (no session has a name, say) is the first to give way.
    empty = [len(rows) > 1 and all(r[i] == "-" for r in rows[1:]) for i in range(len(COLUMNS))]
    keep = [EMPTY_KEEP if empty[i] and KEEP[c] else KEEP[c] for i, c in enumerate(COLUMNS)]
    shown = fit_columns(widths, keep, width)
    lines = []
    for n, row in enumerate(rows):
        line = "  ".join(row[i].ljust(widths[i]) for i in shown).rstrip()
        if color and n > 0 and states[n - 1] in _COLORS:
            line = f"\x1b[{_COLORS[states[n - 1]]}m{line}\x1b[0m"
        lines.append(line)
    if len(rows) == 1:
        lines.append("(no sessions)")
    return "\n".join(lines)


def table_width(stream: IO[str]) -> int | None:
    """The width a table may take on `stream`: the terminal's (less the last column,
    which some terminals wrap on), or None for a pipe or a file (every column)."""
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        return None
    return max(20, shutil.get_terminal_size().columns - 1)


def default_url(listen: str) -> str:
    """The daemon's URL from its `http.listen`; a wildcard bind is reached on loopback."""
    host, _, port = listen.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"http://{host}:{port}"


def fetch_sessions(url: str, timeout: float = 3.0, user: str | None = None) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url.rstrip("/") + sessions_path(user), timeout=timeout) as resp:
        data = json.load(resp)
    if not isinstance(data, list):
        raise ValueError("unexpected answer from /api/sessions")
    return data


def use_color(stream: IO[str]) -> bool:
    """Colours only on a terminal that has them, and never when NO_COLOR is set
    (https://no-color.org: any non-empty value)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
HOME, CLEAR_SCREEN, CLEAR_EOL, CLEAR_BELOW = "\x1b[H", "\x1b[2J", "\x1b[K", "\x1b[J"


def clip(line: str, width: int) -> str:
    """`line` cut to `width` visible characters; colour escapes are kept and closed."""
    if width <= 0:
        return ""
    out: list[str] = []
    visible = 0
    pos = 0
    colored = False
    for m in _ANSI.finditer(line):
        text = line[pos:m.start()]
        if visible + len(text) > width:
            out.append(text[:width - visible])
            return "".join(out) + ("\x1b[0m" if colored else "")
        out.append(text)
        visible += len(text)
        out.append(m.group())
        colored = m.group() != "\x1b[0m"
        pos = m.end()
    text = line[pos:]
    if visible + len(text) > width:
        return "".join(out) + text[:width - visible] + ("\x1b[0m" if colored else "")
    return "".join(out) + text


class LiveScreen:
    """Shows successive frames: on a terminal each replaces the last in place (cursor
    home, every line rewritten and its rest erased, nothing left below; clipped to the
    window so it never scrolls); elsewhere each frame is appended as plain text.
    `close()` (or leaving the `with` block) shows the cursor again and leaves the last
    frame on screen."""

    def __init__(self, stream: IO[str] | None = None, *, tty: bool | None = None,
                 size: Callable[[], os.terminal_size] = shutil.get_terminal_size) -> None:
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty()) if tty is None else tty
        self._size = size
        self._started = False
        self._closed = False

    def show(self, text: str) -> None:
        if not self.tty:
            self.stream.write(text + "\n")
            self.stream.flush()
            return
        cols, rows = self._size()
        lines = text.split("\n")
        if len(lines) > max(1, rows - 1):
            hidden = len(lines) - (rows - 2)
            lines = [*lines[:max(0, rows - 2)], f"... {hidden} more lines (enlarge the window)"]
        head = HIDE_CURSOR + HOME + CLEAR_SCREEN if not self._started else HOME
        self._started = True
        body = "\n".join(clip(line, cols - 1) + CLEAR_EOL for line in lines)
        self.stream.write(head + body + "\n" + CLEAR_BELOW)
        self.stream.flush()

    def finish(self, text: str) -> None:
        """The last frame, in full (it may scroll): what stays on screen afterwards."""
        if self.tty:
            self.stream.write(HOME + CLEAR_SCREEN + SHOW_CURSOR)
            self.tty = False
        self.show(text)
        self._closed = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tty and self._started:
            self.stream.write(SHOW_CURSOR)
            self.stream.flush()

    def __enter__(self) -> LiveScreen:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def status_main(url: str, *, watch: bool = False, interval: float = 2.0, as_json: bool = False,
                color: bool | None = None, stream: IO[str] | None = None, user: str | None = None) -> int:
    """`otelwatch status`. A daemon never reached is an error (exit 1, likely a wrong
    URL); with --watch, one lost after it answered is shown in place and retried."""
    out = stream if stream is not None else sys.stdout
    color = use_color(out) if color is None else color and use_color(out)
    screen = LiveScreen(out, tty=None if watch and not as_json else False)
    reached = False
    try:
        with screen:
            while True:
                try:
                    sessions = fetch_sessions(url, user=user)
                    reached = True
                    if as_json:
                        text = json.dumps(sessions, indent=2)
                    else:
                        text = format_table(sessions, time.time(), color=color, width=table_width(out))
                        if watch and screen.tty:
                            text += (f"\n\n{url}  every {interval:g} s  {time.strftime('%H:%M:%S')}"
                                     "  (Ctrl-C to stop; `otelwatch top` for a live view with details)")
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    reason = getattr(exc, "reason", exc)
                    message = f"otelwatch status: cannot reach the daemon at {url}: {reason}"
                    if not reached or not watch:
                        print(message, file=sys.stderr)
                        return 1
                    if not screen.tty:
                        print(message + f" (retrying every {interval:g} s)", file=sys.stderr)
                        text = ""
                    else:
                        text = f"{message}\nretrying every {interval:g} s ({time.strftime('%H:%M:%S')})"
                if text:
                    screen.show(text)
                if not watch:
                    return 0
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `status | head`: the reader has what it wanted. Point stdout at /dev/null so
        # the interpreter's last flush at exit fails silently too, and end quietly.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
            os.close(devnull)
        return 0
