"""`otelwatch top`: a live terminal view of a running daemon's sessions.

Owns the operator's view: one row per session, most severe first, refreshed in
place, and a drill-down into one session's evidence. It reads only the
daemon's HTTP API (/api/sessions, /healthz, /metrics), so it works against a
daemon of another user or through an SSH tunnel, and it never touches /proc.

It must never trigger a recovery: the daemon's gates decide that, and a kill
key in a list that re-sorts every second invites exactly the wrong-process
kill otelwatch exists to prevent.

The first half is pure (sessions in, lines of styled text out) and tested
without a terminal; the second half is the curses painter and key loop. Polls
run on a background thread so a daemon that never answers never freezes keys.
"""

from __future__ import annotations

import contextlib
import curses
import json
import locale
import math
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from otelwatch.commands.status import _bytes, _tcp
from otelwatch.report import human_duration

__all__ = ["History", "Poll", "layout", "matches", "render_detail", "render_list", "sort_sessions",
           "sparkline", "top_main"]

SEVERITY = ("stuck", "stalled", "long_running", "active", "idle", "starting", "exited")
SORTS = ("severity", "silence", "cpu", "rss", "agent", "session")
CPU_POINTS = 8  # sparkline width: 8 polls
TRANSITIONS_KEPT = 30
METRICS_EVERY_S = 10.0  # /metrics can be large (per-session series): read it now and then
SPARK_UTF8 = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-:=+*#"

Segment = tuple[str, str]  # (text, style); styles: "", "bold", "dim", "error", "header", "state:<name>"
Line = list[Segment]


def _rank(state: str) -> int:
    return SEVERITY.index(state) if state in SEVERITY else len(SEVERITY)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


# --------------------------------------------------------------------------- data from polls


@dataclass
class Poll:
    """One round of reads from the daemon; `error` set when /api/sessions failed."""

    time: float
    sessions: list[dict[str, Any]] | None = None
    health: dict[str, Any] | None = None
    health_status: int | None = None
    metrics: dict[str, float] | None = None  # None: not read this round (or /metrics off)
    error: str | None = None


class History:
    """What top remembers across polls: each session's recent CPU (for the sparkline)
    and the state transitions it saw (the incident history of the drill-down)."""

    def __init__(self, points: int = CPU_POINTS, kept: int = TRANSITIONS_KEPT) -> None:
        self.points = points
        self.kept = kept
        self.cpu: dict[str, deque[float | None]] = {}
        self.transitions: dict[str, deque[tuple[float, str | None, str]]] = {}
        self._last: dict[str, str] = {}

    def update(self, sessions: Iterable[Mapping[str, Any]], now: float) -> None:
        seen = set()
        for s in sessions:
            sid = str(s.get("session_id", ""))
            seen.add(sid)
            cpu = s.get("cpu_percent")
            self.cpu.setdefault(sid, deque(maxlen=self.points)).append(
                float(cpu) if isinstance(cpu, (int, float)) else None)
            label = f"{s.get('state')}/{s.get('reason')}"
            before = self._last.get(sid)
            if before != label:
                since = s.get("state_since")
                # First sight: the daemon knows when the state began; later changes are
                # dated by the poll that saw them (within one interval).
                at = float(since) if before is None and isinstance(since, (int, float)) else now
                self.transitions.setdefault(sid, deque(maxlen=self.kept)).append((at, before, label))
                self._last[sid] = label
        for sid in [k for k in self._last if k not in seen]:  # left the daemon's listing
            self._last.pop(sid, None)
            self.cpu.pop(sid, None)
            self.transitions.pop(sid, None)


def parse_metrics(text: str) -> dict[str, float]:
    """The few series the header shows, summed over labels."""
    wanted = {"otelwatch_probe_timeouts_total": "probe_timeouts",
              "otelwatch_collector_tick_duration_seconds_sum": "tick_sum",
              "otelwatch_collector_tick_duration_seconds_count": "tick_count",
              "otelwatch_export_failures_total": "export_failures"}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("otelwatch_"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        key = wanted.get(name)
        if key is None:
            continue
        with contextlib.suppress(ValueError, IndexError):
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


# --------------------------------------------------------------------------- pure view


def sort_sessions(sessions: Iterable[Mapping[str, Any]], key: str = "severity") -> list[Mapping[str, Any]]:
    """Most severe first (stuck, stalled, long_running, active, idle, starting, exited),
    longest silence first within a state; other keys put the largest first."""
    def sev(s: Mapping[str, Any]) -> tuple[Any, ...]:
        return (_rank(str(s.get("state"))), -_num(s.get("silence_s")), str(s.get("session_id")))

    keys: dict[str, Callable[[Mapping[str, Any]], tuple[Any, ...]]] = {
        "severity": sev,
        "silence": lambda s: (s.get("state") == "exited", -_num(s.get("silence_s")), *sev(s)),
        "cpu": lambda s: (-_num(s.get("cpu_percent")), *sev(s)),
        "rss": lambda s: (-_num(s.get("rss_bytes")), *sev(s)),
        "agent": lambda s: (str(s.get("agent")), *sev(s)),
        "session": lambda s: (str(s.get("session_id")),),
    }
    return sorted(sessions, key=keys.get(key, sev))


def matches(session: Mapping[str, Any], text: str) -> bool:
    """Filter terms, all must hold: `agent:X` (substring of the agent), `state:X` (state
    starts with X), or a bare word found in the agent, state, reason or session id."""
    for term in text.lower().split():
        agent, state = str(session.get("agent", "")).lower(), str(session.get("state", "")).lower()
        if term.startswith("agent:"):
            ok = term[6:] in agent
        elif term.startswith("state:"):
            ok = state.startswith(term[6:])
        else:
            ok = any(term in str(session.get(k, "")).lower() for k in ("agent", "state", "reason", "session_id"))
        if not ok:
            return False
    return True


def sparkline(values: Sequence[float | None], width: int = CPU_POINTS, unicode: bool = True) -> str:
    """CPU (percent of one core, 100 = full block) as one character per poll."""
    blocks = SPARK_UTF8 if unicode else SPARK_ASCII
    out = []
    for v in list(values)[-width:]:
        if v is None:
            out.append(" ")
        else:
            level = min(len(blocks) - 1, max(0, math.ceil(min(v, 100.0) / 100.0 * (len(blocks) - 1))))
            out.append(blocks[level])
    return "".join(out).rjust(width)


def _where(s: Mapping[str, Any]) -> str:
    runtime = s.get("runtime")
    if isinstance(runtime, Mapping) and runtime.get("target"):
        return f"{runtime.get('kind')} {runtime.get('target')}"
    # The API has no cwd (it would need /proc at scrape time): the pid is what we have.
    return f"pid {s.get('pid')}" if s.get("pid") else "-"


@dataclass(frozen=True)
class Column:
    name: str
    priority: int  # dropped first when the terminal is narrow: highest number
    min_width: int
    max_width: int
    right: bool = False


# In display order. At 80 columns the agent and the runtime pane are the first to go.
COLUMNS = (
    Column("SESSION", 0, 10, 32),
    Column("STATE/REASON", 0, 12, 26),
    Column("SILENT", 1, 6, 7, right=True),
    Column("CPU%", 2, 4, 5, right=True),
    Column("TREND", 3, CPU_POINTS, CPU_POINTS),
    Column("RSS", 4, 6, 7, right=True),
    Column("TCP", 5, 3, 12),
    Column("CH", 6, 2, 3, right=True),
    Column("AGENT", 7, 5, 16),
    Column("WHERE", 8, 6, 24),
)


def row_cells(s: Mapping[str, Any], history: History, unicode: bool = True) -> list[str]:
    sid = str(s.get("session_id", ""))
    cpu = s.get("cpu_percent")
    exited = s.get("state") == "exited"
    return [
        sid,
        f"{s.get('state', '?')}/{s.get('reason', '?')}",
        "-" if exited else human_duration(s.get("silence_s")),
        "-" if not isinstance(cpu, (int, float)) else f"{cpu:.0f}",
        sparkline(list(history.cpu.get(sid, ())), CPU_POINTS, unicode),
        _bytes(s.get("rss_bytes")),
        "-" if exited else _tcp(s.get("tcp")),
        str(len(s.get("children") or ())),
        str(s.get("agent", "")),
        _where(s),
    ]


def layout(rows: Sequence[Sequence[str]], width: int, columns: Sequence[Column] = COLUMNS) -> list[tuple[int, int]]:
    """(column index, width) of the columns that fit in `width`, in display order.

    Each column wants its widest cell (within its bounds); the session id gives way
    first, then whole columns go by priority; leftover space goes back to the id."""
    want = []
    for i, col in enumerate(columns):
        widest = max([len(col.name), *(len(r[i]) for r in rows)])
        want.append(max(col.min_width, min(col.max_width, widest)))
    widths = dict(enumerate(want))
    session_full = widths[0]
    widths[0] = min(widths[0], max(columns[0].min_width, 14))

    def total() -> int:
        return sum(widths.values()) + len(widths) - 1

    for i in sorted(range(len(columns)), key=lambda i: (-columns[i].priority, -i)):
        if total() <= width:
            break
        if columns[i].priority > 0:
            del widths[i]
    if total() > width:  # only the essentials left: squeeze them
        widths[1] = max(columns[1].min_width, widths[1] - (total() - width))
        widths[0] = max(columns[0].min_width, widths[0] - max(0, total() - width))
    widths[0] += max(0, min(session_full - widths[0], width - total()))
    return sorted(widths.items())


def _fit(text: str, width: int, right: bool = False) -> str:
    if len(text) > width:
        return text[:max(0, width - 1)] + "~" if width > 1 else text[:width]
    return text.rjust(width) if right else text.ljust(width)


@dataclass
class View:
    """Everything the screen shows; the key loop mutates it, `render_*` read it."""

    url: str
    interval: float
    sort: str = "severity"
    filter: str = ""
    paused: bool = False
    selected: str | None = None  # session id: once moved to, stays on its session when rows move
    pinned: bool = False  # False: the cursor stays on the first (most severe) row
    top: int = 0  # first list row shown
    detail: str | None = None  # session id of the open drill-down
    detail_top: int = 0
    editing: str | None = None  # filter text being typed
    poll: Poll | None = None  # the latest shown (frozen while paused)
    sessions: list[dict[str, Any]] = field(default_factory=list)  # last good listing (kept while unreachable)
    last_ok: float | None = None
    metrics: dict[str, float] | None = None
    metrics_prev: dict[str, float] | None = None
    unicode: bool = True
    history: History = field(default_factory=History)

    def rows(self) -> list[Mapping[str, Any]]:
        return [s for s in sort_sessions(self.sessions, self.sort) if matches(s, self.filter)]

    def apply(self, poll: Poll) -> None:
        if poll.sessions is not None:
            self.sessions = poll.sessions
            self.last_ok = poll.time
            self.history.update(poll.sessions, poll.time)
        if poll.metrics is not None:
            self.metrics_prev, self.metrics = self.metrics, poll.metrics
        self.poll = poll


def _header(view: View, now: float) -> Line:
    """Who is watched and how the watcher itself is doing (from /healthz and /metrics)."""
    line: Line = [("otelwatch top ", "header"), (view.url.replace("http://", ""), "dim")]
    poll = view.poll
    if poll is not None and poll.health is not None:
        age = poll.health.get("last_tick_age_s")
        ok = bool(poll.health.get("ok"))
        text = "no tick yet" if age is None else f"last tick {age:.1f}s ago"
        line.append(("  " + text + ("" if ok else " (loop late: /healthz 503)"), "" if ok else "error"))
    metrics = view.metrics
    if metrics:
        prev = view.metrics_prev
        count, total = metrics.get("tick_count", 0.0), metrics.get("tick_sum", 0.0)
        if prev and count > prev.get("tick_count", 0.0):  # recent average, not since start
            count, total = count - prev.get("tick_count", 0.0), total - prev.get("tick_sum", 0.0)
        if count:
            line.append((f", {total / count * 1000:.0f}ms/tick", "dim"))
        timeouts = int(metrics.get("probe_timeouts", 0))
        line.append((f"  probe timeouts {timeouts}", "error" if timeouts else "dim"))
    elif poll is not None and poll.sessions is not None and view.metrics is None and view.last_ok is not None:
        line.append(("  (no /metrics)", "dim"))
    line.append(("  " + time.strftime("%H:%M:%S", time.localtime(now)), "dim"))
    return line


def _status_line(view: View) -> Line:
    """Counts per state and the view's settings; or the problem, when there is one."""
    poll = view.poll
    if view.editing is not None:
        return [("filter (agent:X state:X or words; Enter keeps, Esc cancels): ", "bold"), (view.editing + "_", "")]
    if poll is not None and poll.error is not None:
        seen = "never reached" if view.last_ok is None else \
            "data below from " + time.strftime("%H:%M:%S", time.localtime(view.last_ok))
        error = re.sub(r"^\[Errno \d+\] ", "", poll.error)
        return [(f"daemon unreachable: {error}; retrying every {view.interval:g}s; {seen}", "error")]
    if poll is None:
        return [(f"connecting to {view.url} ...", "dim")]
    counts: dict[str, int] = {}
    for s in view.sessions:
        counts[str(s.get("state"))] = counts.get(str(s.get("state")), 0) + 1
    parts: Line = [(f"{counts[state]} {state}  ", f"state:{state}") for state in SEVERITY if counts.get(state)]
    if not parts:
        parts = [("no sessions  ", "dim")]
    parts.append((f"sort: {view.sort}", "dim"))
    if view.filter:
        parts.append((f"  filter: {view.filter}", "bold"))
    if view.paused:
        parts.append(("  PAUSED (p resumes)", "error"))
    return parts


def wrap(lines: Sequence[Line], width: int, indent: int = 4) -> list[Line]:
    """Lines longer than `width` continued on the next lines, indented, styles kept."""
    out: list[Line] = []
    for line in lines:
        current: Line = []
        used = 0
        for text, style in line:
            while text:
                room = width - used
                if room <= 0:
                    out.append(current)
                    current, used = [(" " * indent, "")], indent
                    room = width - used
                cut = room
                if len(text) > room:  # break at a space when there is one in the second half
                    space = text.rfind(" ", 0, room + 1)
                    cut = space + 1 if space >= room // 2 else room
                current.append((text[:cut], style))
                used = used + cut if len(text) > cut else used + len(text)
                if len(text) > cut:
                    used = width  # the rest goes on the next line
                text = text[cut:]
        out.append(current)
    return out


def render_list(view: View, width: int, height: int, now: float) -> list[Line]:
    """The whole list screen, `height` lines of at most `width` characters."""
    rows = view.rows()
    cells = [row_cells(s, view.history, view.unicode) for s in rows]
    cols = layout([*cells], width)
    lines: list[Line] = [_header(view, now), _status_line(view)]
    lines.append([(" ".join(_fit(COLUMNS[i].name, w, COLUMNS[i].right) for i, w in cols), "header")])
    body = max(1, height - 4)
    ids = [str(s.get("session_id")) for s in rows]
    index = ids.index(view.selected) if view.pinned and view.selected in ids else (0 if ids else -1)
    view.selected = ids[index] if index >= 0 else None
    if index >= 0:
        view.top = min(max(view.top, index - body + 1), index)
    view.top = max(0, min(view.top, max(0, len(rows) - body)))
    for n in range(view.top, min(len(rows), view.top + body)):
        s, row = rows[n], cells[n]
        segments: Line = []
        for k, (i, w) in enumerate(cols):
            if k:
                segments.append((" ", ""))
            segments.append((_fit(row[i], w, COLUMNS[i].right), f"state:{s.get('state')}" if i == 1 else ""))
        if n == index:
            segments = [(text, "selected" if not style else f"selected {style}") for text, style in segments]
            segments.append((" " * max(0, width - sum(len(t) for t, _ in segments)), "selected"))
        lines.append(segments)
    if not rows:
        total = len(view.sessions)
        lines.append([(f"(no session matches the filter; {total} hidden)" if total else
                       "(no sessions)" if view.last_ok is not None else "", "dim")])
    while len(lines) < height - 1:
        lines.append([])
    lines = lines[:height - 1]
    lines.append([("Enter details  \u2191\u2193/jk move  / filter  s sort  p pause  q quit"
                   if view.unicode else "Enter details  up/down/jk move  / filter  s sort  p pause  q quit", "dim")])
    return lines


def _clock(t: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "--:--:--"


def _cmd(text: Any, limit: int = 200) -> str:
    return str(text or "").replace("\n", " ")[:limit]


def render_detail(session: Mapping[str, Any] | None, history: History, now: float,
                  unicode: bool = True) -> list[Line]:
    """The drill-down: one session's evidence, as many lines as it takes (the caller scrolls)."""
    if session is None:
        return [[("This session is no longer listed by the daemon (it ended and its retention passed).",
                  "error")]]
    s = session
    sid = str(s.get("session_id"))
    state = str(s.get("state"))
    report = s.get("last_report") if isinstance(s.get("last_report"), Mapping) else None
    since = s.get("state_since")
    lines: list[Line] = [
        [(sid, "bold"), (f"  {s.get('agent')}  pid {s.get('pid')}  {s.get('mode', '')}  via {s.get('source', '?')}",
                         "")],
        [(f"{state}/{s.get('reason')}", f"state:{state}"),
         (f"  for {human_duration(now - since) if isinstance(since, (int, float)) else '?'}"
          f"  silent {human_duration(s.get('silence_s'))}"
          f"  last event {human_duration(s.get('last_event_age_s'))} ago"
          f"  events {s.get('events', 0)}" + (f" (malformed {s['malformed']})" if s.get("malformed") else ""), "")],
        [(f"CPU {_num(s.get('cpu_percent')):.0f}% {sparkline(list(history.cpu.get(sid, ())), CPU_POINTS, unicode)}"
          f"  RSS {_bytes(s.get('rss_bytes'))}  threads {s.get('threads') or '-'}  fds {s.get('open_fds') or '-'}"
          f"  TCP {_tcp(s.get('tcp'))}  children {len(s.get('children') or ())}  where {_where(s)}", "")],
    ]
    labels = s.get("labels") or {}
    if labels:
        lines.append([("labels " + " ".join(f"{k}={v}" for k, v in sorted(labels.items())), "dim")])
    usage = s.get("usage")
    if isinstance(usage, Mapping):  # from the agent's own OpenTelemetry ([sources.otlp])
        lines.append([(f"tokens in {usage.get('input_tokens', 0)} out {usage.get('output_tokens', 0)}"
                       f" cache {usage.get('cache_read_tokens', 0)}  cost ${_num(usage.get('cost_usd')):.4f}"
                       f"  API requests {usage.get('api_requests', 0)} failed {usage.get('api_errors', 0)}"
                       + (f"  model {_cmd(usage['model'], 64)}" if usage.get("model") else ""), "")])
    evidence = s.get("evidence") or {}
    if s.get("sample_status") not in (None, "ok"):
        lines.append([(f"last sample: {s.get('sample_status')}", "error")])
    if evidence.get("detail"):
        lines.append([("evidence: ", "bold"), (str(evidence["detail"]), "")])
    lines.append([])

    if report:
        lines.append([(f"Last report {_clock(report.get('time'))} ({report.get('state')}/{report.get('reason')}, "
                       f"repeat {report.get('repeat', 0)}): ", "bold"), (str(report.get("summary", "")), "")])
    else:
        lines.append([("No report yet: ", "bold"),
                       ("wait channels, TCP remotes and stderr are read when a session turns stalled or stuck.",
                        "dim")])

    lines.append([])
    lines.append([("PROCESSES", "header")])
    lines.append([(f"  {'PID':>7} ST {'WAIT CHANNEL':<22} {'CPU%':>5} COMMAND", "dim")])
    root = report.get("root") if report and isinstance(report.get("root"), Mapping) else None
    if root is not None:
        lines.append([(f"  {s.get('pid')!s:>7} {root.get('status', '?'):<2} {root.get('wchan') or '-':<22} "
                       f"{'':>5} {_cmd(root.get('cmdline'))}", "")])
        children = report.get("children") if report else None
    else:
        lines.append([(f"  {s.get('pid')!s:>7} ?  {'(no report yet)':<22} {_num(s.get('cpu_percent')):>5.0f} "
                       "(the agent)", "")])
        children = s.get("children")
    for c in children or ():
        cpu = c.get("cpu_percent")
        wchan = c.get("wchan") or ("-" if report else "(no report yet)")
        lines.append([(f"  {c.get('pid')!s:>7} {c.get('status', '?'):<2} {wchan:<22} "
                       f"{'-' if cpu is None else f'{cpu:.0f}':>5} {_cmd(c.get('cmdline') or c.get('name'))}", "")])
    if report and s.get("children") is not None and len(s.get("children") or ()) != len(children or ()):
        lines.append([(f"  (now {len(s.get('children') or ())} children; the list above is from the report)",
                       "dim")])

    lines.append([])
    lines.append([("TCP REMOTES", "header")])
    conns = list(report.get("connections") or ()) if report else []
    if conns:
        lines.extend([[(f"  {c}", "")] for c in conns])
    elif s.get("tcp"):
        lines.append([(f"  {_tcp(s.get('tcp'))} now; remotes are listed in reports (no report yet)", "dim")])
    else:
        lines.append([("  none", "dim")])

    lines.append([])
    lines.append([("OPEN TOOL CALLS", "header")])
    tools = evidence.get("open_tools") or []
    if tools:
        lines.extend([[(f"  {t.get('tool') or '?'}  open for {human_duration(t.get('age_s'))}", "")] for t in tools])
    else:
        lines.append([("  none", "dim")])

    lines.append([])
    lines.append([("RECENT EVENTS", "header")])
    events = list(s.get("recent_events") or ())[-10:]
    for e in events:
        extra = " ".join(str(e[k]) for k in ("tool", "turn", "tool_call", "detail") if e.get(k))
        lines.append([(f"  {_clock(e.get('time'))}  {e.get('type', '?'):<14} {e.get('kind', ''):<9} {extra}"
                       f"{'  via ' + e['source'] if e.get('source') else ''}", "")])
    if not events:
        lines.append([("  none (no event source, or nothing arrived yet)", "dim")])

    stderr = str(report.get("stderr_tail") or "") if report else ""
    if stderr:
        lines.append([])
        lines.append([("STDERR (tail, from the last report)", "header")])
        lines.extend([[("  " + ln, "")] for ln in stderr.rstrip("\n").splitlines()[-12:]])

    lines.append([])
    lines.append([("INCIDENT HISTORY (state changes seen by this top)", "header")])
    for at, before, after in history.transitions.get(sid, ()):
        change = f"first seen {after}" if before is None else f"{before} -> {after}"
        style = f"state:{after.split('/', 1)[0]}"
        lines.append([(f"  {_clock(at)}  ", ""), (change, style)])

    lines.append([])
    lines.append([("RECOVERIES", "header")])
    recoveries = list(s.get("recoveries") or ())
    for r in recoveries[-10:]:
        bits = [r.get("step"), r.get("action"), r.get("status"), r.get("reason"),
                f"{r['duration_s']}s" if r.get("duration_s") is not None else None, r.get("detail")]
        lines.append([(f"  {_clock(r.get('time'))}  " + "  ".join(str(b) for b in bits if b), "")])
    if not recoveries:
        lines.append([("  none (the daemon's gates decide; top never starts one)", "dim")])
    return lines


# --------------------------------------------------------------------------- reading the daemon


class Client:
    """GETs against the daemon's API with short timeouts; errors become Poll.error."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._metrics_at = -math.inf
        self._metrics_off = False

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=self.timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:  # /healthz answers 503 with a body
            return int(exc.code), exc.read()

    def poll(self, now: float) -> Poll:
        poll = Poll(time=now)
        try:
            status, body = self._get("/api/sessions")
            data = json.loads(body)
            if status != 200 or not isinstance(data, list):
                raise ValueError(f"/api/sessions answered {status}")
            poll.sessions = [s for s in data if isinstance(s, dict)]
        except (urllib.error.URLError, OSError, ValueError) as exc:
            poll.error = str(getattr(exc, "reason", exc))
            return poll
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
            status, body = self._get("/healthz")
            health = json.loads(body)
            if isinstance(health, dict):
                poll.health, poll.health_status = health, status
        if not self._metrics_off and time.monotonic() - self._metrics_at >= METRICS_EVERY_S:
            self._metrics_at = time.monotonic()
            with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
                status, body = self._get("/metrics")
                if status == 404:
                    self._metrics_off = True  # the daemon runs without its Prometheus endpoint
                elif status == 200:
                    poll.metrics = parse_metrics(body.decode("utf-8", "replace"))
        return poll


class Poller:
    """Polls on its own thread; the key loop picks up `latest` when `version` moves."""

    def __init__(self, client: Client, interval: float, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.interval = interval
        self.clock = clock
        self.latest: Poll | None = None
        self.version = 0
        self.paused = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otelwatch-top-poll", daemon=True)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.paused:
                poll = self.client.poll(self.clock())
                with self._lock:
                    self.latest, self.version = poll, self.version + 1
            self._wake.wait(self.interval)
            self._wake.clear()

    def take(self, seen: int) -> tuple[Poll | None, int]:
        with self._lock:
            return (self.latest, self.version) if self.version != seen else (None, seen)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
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
        view.editing = view.filter
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
                lines = [_header(view, now), _status_line(view)]
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


def default_url(listen: str) -> str:
    """The daemon's URL from its `http.listen`; a wildcard bind is reached on loopback."""
    host, _, port = listen.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"http://{host}:{port}"


def top_main(url: str, interval: float = 2.0, *, color: bool | None = None) -> int:
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
    poller = Poller(Client(url, timeout=min(3.0, max(1.0, interval))), interval).start()

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
