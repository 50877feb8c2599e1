"""`otelwatch top`, its rendering (pure): sessions in, lines of styled text out.

The list with its columns dropped by priority to fit the width, the header and
status line, sparklines, and a session's drill-down (evidence, processes, TCP
remotes, the attach command). Tested without a terminal.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from otelwatch.commands.status import (
    SEVERITY,
    _bytes,
    _fds,
    _tcp,
    safe,
    short_dir,
)
from otelwatch.commands.top.data import CPU_POINTS, History, Poll, matches, num, sort_sessions
from otelwatch.sessions.report import human_duration

__all__ = ["COLUMNS", "Column", "Line", "View", "attach_command", "header", "layout", "render_detail", "render_list",
           "row_cells", "sparkline", "status_line", "wrap"]

SPARK_UTF8 = "▁▂▃▄▅▆▇█"


SPARK_ASCII = "_.-:=+*#"


Segment = tuple[str, str]  # (text, style); styles: "", "bold", "dim", "error", "header", "state:<name>"


Line = list[Segment]


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
    """Where the session runs, shortest first: its pane, else its working directory, else its pid."""
    runtime = s.get("runtime")
    if isinstance(runtime, Mapping) and runtime.get("target"):
        return safe(f"{runtime.get('kind')} {runtime.get('target')}")
    if s.get("cwd"):
        return short_dir(s.get("cwd"), 32)
    return f"pid {s.get('pid')}" if s.get("pid") else "-"


def attach_command(s: Mapping[str, Any]) -> str | None:
    """The command that reaches the session's pane, when its runtime says it."""
    runtime = s.get("runtime")
    if isinstance(runtime, Mapping) and runtime.get("attach"):
        return safe(runtime.get("attach"))
    return None


@dataclass(frozen=True)
class Column:
    name: str
    priority: int  # dropped first when the terminal is narrow: highest number
    min_width: int
    max_width: int
    right: bool = False


# In display order. At 80 columns the agent, the owner and the process numbers go first;
# where the session runs (its pane, else its directory) stays as long as it can.
COLUMNS = (
    Column("SESSION", 0, 10, 48),
    Column("NAME", 2, 4, 20),
    Column("STATE/REASON", 0, 12, 36),  # never cut when it fits: the longest is 34
    Column("SILENT", 1, 6, 7, right=True),
    Column("CPU%", 3, 4, 5, right=True),
    Column("TREND", 6, CPU_POINTS, CPU_POINTS),
    Column("RSS", 7, 6, 7, right=True),
    Column("TCP", 4, 3, 12),
    Column("CH", 8, 2, 3, right=True),
    Column("AGENT", 10, 5, 16),
    Column("USER", 9, 4, 12),
    Column("WHERE", 5, 6, 32),
)


STATE_COLUMN = 2


def row_cells(s: Mapping[str, Any], history: History, unicode: bool = True) -> list[str]:
    sid = str(s.get("session_id", ""))
    cpu = s.get("cpu_percent")
    exited = s.get("state") == "exited"
    return [
        safe(sid),
        safe(s.get("name") or "-"),
        safe(f"{s.get('state', '?')}/{s.get('reason', '?')}"),
        "-" if exited else human_duration(s.get("silence_s")),
        "-" if not isinstance(cpu, (int, float)) else f"{cpu:.0f}",
        sparkline(list(history.cpu.get(sid, ())), CPU_POINTS, unicode),
        _bytes(s.get("rss_bytes")),
        "-" if exited else _tcp(s.get("tcp")),
        str(len(s.get("children") or ())),
        safe(s.get("agent", "")),
        safe(s.get("user") or "-"),
        _where(s),
    ]


def layout(rows: Sequence[Sequence[str]], width: int, columns: Sequence[Column] = COLUMNS) -> list[tuple[int, int]]:
    """(column index, width) of the columns that fit in `width`, in display order.

    Each column wants its widest cell (within its bounds); whole columns go by priority
    before a session id is cut (ids are what people copy), and only when the essentials
    alone are too wide are the reason and then the id shortened."""
    want = []
    for i, col in enumerate(columns):
        widest = max([len(col.name), *(len(r[i]) for r in rows)])
        want.append(max(col.min_width, min(col.max_width, widest)))
    widths = dict(enumerate(want))

    def total() -> int:
        return sum(widths.values()) + len(widths) - 1

    # A column with nothing to say (no session has a name, say) is the first to give way.
    priority = [99 if col.priority and rows and all(r[i] == "-" for r in rows) else col.priority
                for i, col in enumerate(columns)]
    for i in sorted(range(len(columns)), key=lambda i: (-priority[i], -i)):
        if total() <= width:
            break
        if priority[i] > 0:
            del widths[i]
    if total() > width:  # only the essentials left: squeeze them
        widths[STATE_COLUMN] = max(columns[STATE_COLUMN].min_width, widths[STATE_COLUMN] - (total() - width))
        widths[0] = max(columns[0].min_width, widths[0] - max(0, total() - width))
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


def header(view: View, now: float) -> Line:
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


def status_line(view: View, width: int | None = None) -> Line:
    """Counts per state and the view's settings; or the problem, when there is one.
    At a narrow `width` the `filter:` and `PAUSED` marks stay: the sort setting goes
    first, then the counts are shortened."""
    poll = view.poll
    if view.editing is not None:
        hint = "filter (agent:X state:X user:X or words; Enter keeps, Esc cancels): "
        was = f"  (was: {view.filter})" if view.filter else ""
        if width is not None and len(hint) + len(view.editing) + 1 + len(was) > width:
            hint = "filter (Enter applies, Esc keeps the old): "
        return [(hint, "bold"), (view.editing + "_", ""), (was, "dim")]
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
    marks: Line = []
    if view.filter:
        marks.append((f"  filter: {view.filter}", "bold"))
    if view.paused:
        marks.append(("  PAUSED (p resumes)", "error"))
    sort: Line = [(f"sort: {view.sort}", "dim")]

    def size(line: Line) -> int:
        return sum(len(t) for t, _ in line)

    if width is None or size(parts) + size(sort) + size(marks) <= width:
        return parts + sort + marks
    if view.paused and size(parts) + size(marks) > width:
        marks[-1] = ("  PAUSED", "error")
    room = max(0, width - size(marks))
    out: Line = []  # the most severe counts that fit, then "..." for the rest
    used = 0
    for n, (text, style) in enumerate(parts):
        last = n == len(parts) - 1
        if used + len(text) > (room if last else room - 4):
            out.append(("...", "dim"))
            used += 3
            break
        out.append((text, style))
        used += len(text)
    if marks and size(marks) > width:  # a long filter: its start shows, cut at the edge
        text, style = marks[0]
        marks[0] = (text[:max(0, width - used - size(marks[1:]) - 1)] + "~", style)
    return out + marks


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
    lines: list[Line] = [header(view, now), status_line(view, width)]
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
            segments.append((_fit(row[i], w, COLUMNS[i].right),
                             f"state:{s.get('state')}" if i == STATE_COLUMN else ""))
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
        [(safe(sid), "bold"), (safe(f"  {s.get('agent')}  pid {s.get('pid')}  {s.get('mode', '')}  "
                                    f"via {s.get('source', '?')}"), "")],
        [(f"{state}/{s.get('reason')}", f"state:{state}"),
         (f"  for {human_duration(now - since) if isinstance(since, (int, float)) else '?'}"
          f"  silent {human_duration(s.get('silence_s'))}"
          f"  last event {human_duration(s.get('last_event_age_s'))} ago"
          f"  events {s.get('events', 0)}" + (f" (malformed {s['malformed']})" if s.get("malformed") else ""), "")],
        [(f"CPU {num(s.get('cpu_percent')):.0f}% {sparkline(list(history.cpu.get(sid, ())), CPU_POINTS, unicode)}"
          f"  RSS {_bytes(s.get('rss_bytes'))}  threads {s.get('threads') or '-'}  fds {_fds(s)}"
          f"  TCP {_tcp(s.get('tcp'))}  children {len(s.get('children') or ())}  where {_where(s)}", "")],
    ]
    names = [f'name "{safe(s["name"])}"' if s.get("name") else "no name of its own",
             f"user {safe(s.get('user') or '?')}", f"dir {safe(s.get('cwd') or '?')}"]
    lines.insert(1, [("  ".join(names), "")])
    attach = attach_command(s)
    runtime = s.get("runtime") if isinstance(s.get("runtime"), Mapping) else None
    if attach:
        lines.insert(2, [("attach: ", "bold"), (attach, "")])
    elif runtime and runtime.get("target"):
        lines.insert(2, [(f"pane: {safe(runtime.get('kind'))} {safe(runtime.get('target'))}", "")])
    labels = s.get("labels") or {}
    if labels:
        lines.append([("labels " + " ".join(f"{k}={v}" for k, v in sorted(labels.items())), "dim")])
    usage = s.get("usage")
    if isinstance(usage, Mapping):  # from the agent's own OpenTelemetry ([sources.otlp])
        lines.append([(f"tokens in {usage.get('input_tokens', 0)} out {usage.get('output_tokens', 0)}"
                       f" cache {usage.get('cache_read_tokens', 0)}  cost ${num(usage.get('cost_usd')):.4f}"
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
        lines.append([(f"  {s.get('pid')!s:>7} ?  {'(no report yet)':<22} {num(s.get('cpu_percent')):>5.0f} "
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
