"""`otelwatch status`: the sessions of a running daemon as a table.

`format_table` is pure (rows in, text out) and shared with `otelwatch demo`.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from otelwatch.report import human_duration

COLUMNS = ("SESSION", "AGENT", "PID", "STATE", "REASON", "FOR", "SILENCE", "CPU%", "RSS", "TCP", "FDS")
_COLORS = {"active": "32", "idle": "36", "long_running": "34", "stalled": "33", "stuck": "31;1",
           "exited": "90", "starting": "37"}


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
    if not tcp:
        return "0"
    short = {"ESTABLISHED": "EST", "CLOSE_WAIT": "CW", "SYN_SENT": "SYN", "TIME_WAIT": "TW"}
    return ",".join(f"{n}{short.get(state, state)}" for state, n in sorted(tcp.items()) if n) or "0"


def format_table(sessions: Sequence[Mapping[str, Any]], now: float, *, color: bool = False,
                 width: int = 24) -> str:
    rows = [COLUMNS]
    states = []
    for s in sorted(sessions, key=lambda s: (s.get("state") == "exited", str(s.get("session_id")))):
        cpu = s.get("cpu_percent")
        since = s.get("state_since")
        rows.append((
            str(s.get("session_id", ""))[:width],
            str(s.get("agent", ""))[:14],
            str(s.get("pid") or "-"),
            str(s.get("state", "")),
            str(s.get("reason", "")),
            human_duration(now - since) if isinstance(since, (int, float)) else "-",
            human_duration(s.get("silence_s")) if s.get("state") != "exited" else "-",
            "-" if cpu is None else f"{cpu:.0f}",
            _bytes(s.get("rss_bytes")),
            _tcp(s.get("tcp")),
            str(s.get("open_fds") if s.get("open_fds") is not None else "-"),
        ))
        states.append(str(s.get("state", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        if color and n > 0 and states[n - 1] in _COLORS:
            line = f"\x1b[{_COLORS[states[n - 1]]}m{line}\x1b[0m"
        lines.append(line)
    if len(rows) == 1:
        lines.append("(no sessions)")
    return "\n".join(lines)


def fetch_sessions(url: str, timeout: float = 3.0) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url.rstrip("/") + "/api/sessions", timeout=timeout) as resp:
        data = json.load(resp)
    if not isinstance(data, list):
        raise ValueError("unexpected answer from /api/sessions")
    return data


def status_main(url: str, *, watch: bool = False, interval: float = 2.0, as_json: bool = False) -> int:
    color = sys.stdout.isatty()
    while True:
        try:
            sessions = fetch_sessions(url)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            print(f"otelwatch status: cannot reach the daemon at {url}: {reason}", file=sys.stderr)
            return 1
        if as_json:
            print(json.dumps(sessions, indent=2))
        else:
            if watch and color:
                print("\x1b[H\x1b[2J", end="")
            print(format_table(sessions, time.time(), color=color))
        if not watch:
            return 0
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return 0
