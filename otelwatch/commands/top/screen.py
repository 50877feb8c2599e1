"""`otelwatch top`: a live terminal view of a running daemon's sessions.

Owns the operator's view: one row per session, most severe first, refreshed in
place, and a drill-down into one session's evidence. It reads only the
daemon's HTTP API (/api/sessions, /healthz, /metrics), so it works against a
daemon of another user or through an SSH tunnel, and it never touches /proc.

It must never trigger a recovery: the daemon's gates decide that, and a kill
key in a list that re-sorts every second invites exactly the wrong-process
kill otelwatch exists to prevent.

This file is the screen: the curses painter and the key loop. What is polled
and kept between polls is `data.py`; sessions in, lines of styled text out
(pure, tested without a terminal) is `render.py`. Polls run on a background
thread so a daemon that never answers never freezes keys.
"""

from __future__ import annotations

import contextlib
import curses
import locale
import math
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from otelwatch.commands.status import (
    default_url,
    safe,
)
from otelwatch.commands.top.data import SORTS, Client, Poller
from otelwatch.commands.top.render import Line, View, header, render_detail, render_list, status_line, wrap

__all__ = ["default_url", "top_main"]


# --------------------------------------------------------------------------- data from polls


# --------------------------------------------------------------------------- pure view


# --------------------------------------------------------------------------- reading the daemon


        # The thread may sit in an HTTP read for up to the client timeout: it is a daemon
        # thread and holds nothing, so it is not waited for.


# --------------------------------------------------------------------------- terminal


class _Painter:
    """Styled lines onto a curses window; colours only when the terminal has them and
    NO_COLOR is unset, otherwise bold/dim/reverse carry the same meaning."""

    COLORS = {"stuck": curses.COLOR_RED, "stalled": curses.COLOR_YELLOW, "long_running": curses.COLOR_BLUE,
              "active": curses.COLOR_GREEN, "idle": curses.COLOR_CYAN, "starting": curses.COLOR_WHITE,
              "exited": curses.COLOR_WHITE, "error": curses.COLOR_RED, "header": curses.COLOR_CYAN}

    def __init__(self, scr: Any, color: bool) -> None:
        self.scr = scr
        self.attrs: dict[str, int] = {
            "": curses.A_NORMAL, "bold": curses.A_BOLD, "dim": curses.A_DIM, "header": curses.A_BOLD,
            "error": curses.A_BOLD, "selected": curses.A_REVERSE,
            "state:stuck": curses.A_BOLD, "state:stalled": curses.A_BOLD, "state:exited": curses.A_DIM,
        }
        if color:
            with contextlib.suppress(curses.error):
                curses.start_color()
                with contextlib.suppress(curses.error):
                    curses.use_default_colors()
                for n, (name, fg) in enumerate(self.COLORS.items(), start=1):
                    curses.init_pair(n, fg, -1)
                    pair = curses.color_pair(n)
                    key = name if name in ("error", "header") else f"state:{name}"
                    self.attrs[key] = pair | self.attrs.get(key, curses.A_NORMAL)

    def attr(self, style: str) -> int:
        value = curses.A_NORMAL
        for part in style.split():
            value |= self.attrs.get(part, curses.A_NORMAL)
        return value

    def draw(self, lines: Sequence[Line]) -> None:
        height, width = self.scr.getmaxyx()
        self.scr.erase()
        for y, line in enumerate(lines[:height]):
            x = 0
            for text, style in line:
                if x >= width:
                    break
                text = safe(text)  # whatever a line holds, no control character reaches the terminal
                with contextlib.suppress(curses.error):  # the bottom-right cell always "fails"
                    self.scr.addnstr(y, x, text, width - x, self.attr(style))
                x += len(text)
        self.scr.noutrefresh()
        curses.doupdate()


def _unicode_ok() -> bool:
    encoding = (locale.getpreferredencoding(False) or "").lower().replace("-", "")
    return encoding == "utf8"


def _handle_key(view: View, key: Any, rows: list[Mapping[str, Any]], page: int, poller: Poller) -> bool:
    """Apply one key to the view; False means quit."""
    if view.editing is not None:
        if key in ("\n", "\r", curses.KEY_ENTER):
            view.filter, view.editing = view.editing.strip(), None
        elif key == "\x1b":
            view.editing = None
        elif key in (curses.KEY_BACKSPACE, "\x7f", "\b"):
            view.editing = view.editing[:-1]
        elif key == "\x15":  # Ctrl-U
            view.editing = ""
        elif isinstance(key, str) and key.isprintable():
            view.editing += key
        return True
    if key in ("q", "Q"):
        return False
    if key in ("p", "P", " "):
        view.paused = not view.paused
        poller.paused = view.paused
        if not view.paused:
            poller.wake()
        return True
    if view.detail is not None:
        if key in ("\x1b", curses.KEY_LEFT, "h", curses.KEY_BACKSPACE, "\x7f", "\n", "\r", curses.KEY_ENTER):
            view.detail, view.detail_top = None, 0
        elif key in (curses.KEY_DOWN, "j"):
            view.detail_top += 1
        elif key in (curses.KEY_UP, "k"):
            view.detail_top = max(0, view.detail_top - 1)
        elif key in (curses.KEY_NPAGE,):
            view.detail_top += page
        elif key in (curses.KEY_PPAGE,):
            view.detail_top = max(0, view.detail_top - page)
        elif key in ("g", curses.KEY_HOME):
            view.detail_top = 0
        return True
    if key == "\x1b":
        return False
    ids = [str(s.get("session_id")) for s in rows]
    index = ids.index(view.selected) if view.selected in ids else 0
    if key in (curses.KEY_DOWN, "j", curses.KEY_UP, "k", curses.KEY_NPAGE, curses.KEY_PPAGE, "g", "G",
               curses.KEY_HOME, curses.KEY_END):
        view.pinned = True
    if key in (curses.KEY_DOWN, "j"):
        index += 1
    elif key in (curses.KEY_UP, "k"):
        index -= 1
    elif key == curses.KEY_NPAGE:
        index += page
    elif key == curses.KEY_PPAGE:
        index -= page
    elif key in ("g", curses.KEY_HOME):
        index = 0
    elif key in ("G", curses.KEY_END):
        index = len(ids) - 1
    elif key in ("\n", "\r", curses.KEY_ENTER, curses.KEY_RIGHT, "l") and ids:
        view.detail, view.detail_top = ids[max(0, min(index, len(ids) - 1))], 0
    elif key in ("/", "f"):
        # A fresh filter each time: the one in force stays until Enter replaces it (an
        # empty one clears it) and comes back on Esc; the prompt shows it as "was:".
        view.editing = ""
    elif key == "s":
        view.sort = SORTS[(SORTS.index(view.sort) + 1) % len(SORTS)]
    if ids:
        view.selected = ids[max(0, min(index, len(ids) - 1))]
    return True


def _loop(scr: Any, view: View, poller: Poller, color: bool) -> None:
    with contextlib.suppress(curses.error):
        curses.curs_set(0)
    scr.keypad(True)
    scr.timeout(200)
    painter = _Painter(scr, color)
    seen = 0
    dirty = True
    drawn_at = 0.0
    while True:
        poll, seen_now = poller.take(seen)
        if poll is not None:
            seen = seen_now
            if not view.paused:
                view.apply(poll)
                dirty = True
        now = time.time()
        height, width = scr.getmaxyx()
        if dirty or now - drawn_at >= 1.0:
            if view.detail is not None:
                session = next((s for s in view.sessions if str(s.get("session_id")) == view.detail), None)
                body = wrap(render_detail(session, view.history, now, view.unicode), width)
                view.detail_top = max(0, min(view.detail_top, len(body) - (height - 3)))
                lines = [header(view, now), status_line(view, width)]
                lines += body[view.detail_top:view.detail_top + max(0, height - 3)]
                while len(lines) < height - 1:
                    lines.append([])
                lines = lines[:height - 1]
                lines.append([("Esc back  \u2191\u2193/jk scroll  PgUp/PgDn  p pause  q quit" if view.unicode
                               else "Esc back  up/down/jk scroll  PgUp/PgDn  p pause  q quit", "dim")])
            else:
                lines = render_list(view, width, height, now)
            painter.draw(lines)
            dirty, drawn_at = False, now
        try:
            key = scr.get_wch()
        except curses.error:
            continue
        if key == curses.KEY_RESIZE:
            dirty = True
            continue
        if not _handle_key(view, key, view.rows(), max(1, height - 5), poller):
            return
        dirty = True


def top_main(url: str, interval: float = 2.0, *, color: bool | None = None, user: str | None = None) -> int:
    """`otelwatch top`: runs until q, Esc or Ctrl-C; the terminal is restored on every exit."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("otelwatch top: needs a terminal; for pipes and files use `otelwatch status --watch` "
              "or `otelwatch status --json`", file=sys.stderr)
        return 1
    if not math.isfinite(interval) or interval < 0.2 or interval > 3600:
        print(f"otelwatch top: --interval must be between 0.2 and 3600 seconds, got {interval:g}", file=sys.stderr)
        return 2
    locale.setlocale(locale.LC_ALL, "")
    want_color = (color if color is not None else True) and not os.environ.get("NO_COLOR")
    view = View(url=url.rstrip("/"), interval=interval, unicode=_unicode_ok())
    poller = Poller(Client(url, timeout=min(3.0, max(1.0, interval)), user=user), interval).start()

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through curses.wrapper, which restores the terminal

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    with contextlib.suppress(AttributeError):
        curses.set_escdelay(25)  # Esc is a key here, not the start of a sequence to wait for
    try:
        curses.wrapper(lambda scr: _loop(scr, view, poller, want_color and curses.has_colors()))
    except KeyboardInterrupt:
        pass
    except curses.error as exc:
        print(f"otelwatch top: cannot drive this terminal (TERM={os.environ.get('TERM', '')!r}): {exc}",
              file=sys.stderr)
        return 1
    finally:
        poller.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 0
