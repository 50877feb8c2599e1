"""Report bodies: the evidence a person reads when a session is stalled or stuck,
and the summary line when a session ends.

Pure: builds dicts and sentences from samples, activity and verdicts; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from otelwatch.events.activity import Activity
from otelwatch.model import Reason, SessionSnapshot, TreeSample, Verdict

_STATUS_WORDS = {
    "R": "running",
    "S": "sleeping",
    "D": "in uninterruptible I/O",
    "Z": "a zombie",
    "T": "stopped",
    "t": "stopped by a debugger",
    "I": "idle",
}


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = int(max(0.0, seconds))
    if s < 90:
        return f"{s}s"
    if s < 5400:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{round(s / 60)}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def runtime_json(snap: SessionSnapshot) -> dict[str, Any] | None:
    """The session's runtime as /api/sessions shows it (kind, target and whatever else it carries)."""
    runtime = snap.runtime
    if runtime is None:
        return None
    out: dict[str, Any] = {"kind": runtime.kind, "target": runtime.target}
    for key in ("socket", "attach"):  # where the runtime knows them (a tmux pane's server, its attach command)
        value = getattr(runtime, key, None)
        if isinstance(value, str) and value:
            out[key] = value
    return out


def who(session: Mapping[str, Any]) -> str:
    """The session as a person knows it, from its /api/sessions fields: its own name (or
    its id), agent and pid, owner, working directory and pane with the attach command.

    e.g. '"work-0b" claude-code pid 20892 of alice in /home/alice/app, tmux work:0.1
    (attach: tmux -S /tmp/tmux-1000/default attach -t work:0.1)'."""
    name = session.get("name")
    head = f'"{name}"' if name else str(session.get("session_id") or "?")
    parts = [head, str(session.get("agent") or "unknown agent")]
    if session.get("pid"):
        parts.append(f"pid {session.get('pid')}")
    if session.get("user"):
        parts.append(f"of {session.get('user')}")
    if session.get("cwd"):
        parts.append(f"in {session.get('cwd')}")
    text = " ".join(parts)
    runtime = session.get("runtime")
    if isinstance(runtime, Mapping) and runtime.get("target"):
        text += f", {runtime.get('kind') or 'runtime'} {runtime.get('target')}"
        if runtime.get("attach"):
            text += f" (attach: {runtime.get('attach')})"
    return text


def _names(snap: SessionSnapshot) -> dict[str, Any]:
    """The names a report carries (never metric labels), and the phrase built from them."""
    fields: dict[str, Any] = {"name": snap.name, "cwd": snap.cwd, "user": snap.user,
                              "runtime": runtime_json(snap)}
    fields["who"] = who({"session_id": snap.session_id, "agent": snap.agent, "pid": snap.pid, **fields})
    return fields


def describe(verdict: Verdict, sample: TreeSample | None, wchans: Mapping[int, str] | None = None) -> str:
    """One sentence: what the root process is doing, on what, for how long.

    e.g. "sleeping in ep_poll with 1 ESTABLISHED connection to 10.0.0.7:443, no progress for 14m",
    or for an agent retrying its API, "..., API retry (attempt 6/10, next in 18 s), no progress for 3m05s".
    """
    silence = f"no progress for {human_duration(verdict.silence_s)}"
    retry = _retry_words(verdict)
    if sample is None or not sample.processes:
        return ", ".join(p for p in (f"{verdict.state.value} ({verdict.reason.value})", retry, silence) if p)
    root = sample.processes[0]
    doing = _STATUS_WORDS.get(root.status, f"in state {root.status}")
    wchan = (wchans or {}).get(root.pid) or root.wchan
    if wchan and wchan != "0" and root.status in ("S", "D"):
        doing += f" in {wchan}"
    parts = [doing]
    if sample.cpu_percent is not None and sample.cpu_percent >= 1.0:
        parts.append(f"at {sample.cpu_percent:.0f}% CPU")
    tcp = sample.tcp or {}
    if tcp:
        conns = [c for p in sample.processes for c in p.connections]
        counts = ", ".join(f"{n} {state}" for state, n in sorted(tcp.items()) if n)
        where = ""
        remotes = sorted({c.remote for c in conns})
        if remotes:
            where = " to " + ", ".join(remotes[:3]) + (" ..." if len(remotes) > 3 else "")
        noun = "connection" if sum(tcp.values()) == 1 else "connections"
        parts.append(f"with {counts} {noun}{where}")
    elif sample.tcp is not None:
        parts.append("with no TCP connections")
    if sample.children:
        parts.append(f"{sample.children} child process{'es' if sample.children != 1 else ''}")
    head = " ".join(parts[:2]) if len(parts) > 1 else parts[0]
    return ", ".join([head, *parts[2:], *([retry] if retry else []), silence])


def _retry_words(verdict: Verdict) -> str:
    """The announced API retry the classifier put in the evidence (any reason: an attempt
    may be waiting on the network), or plain "API retry" for api_retrying without one."""
    retry = verdict.evidence.get("retry")
    text = retry.get("text") if isinstance(retry, Mapping) else None
    if isinstance(text, str) and text:
        return f"API retry ({text})"
    return "API retry" if verdict.reason is Reason.API_RETRYING else ""


def children_detail(sample: TreeSample | None, wchans: Mapping[int, str] | None = None,
                    limit: int = 20) -> list[dict[str, Any]]:
    if sample is None:
        return []
    out = []
    for p in sample.processes[1:limit + 1]:
        out.append({
            "pid": p.pid,
            "ppid": p.ppid,
            "name": p.name,
            "cmdline": " ".join(p.cmdline)[:200],
            "status": p.status,
            "wchan": (wchans or {}).get(p.pid) or p.wchan,
            "cpu_percent": None if p.cpu_percent is None else round(p.cpu_percent, 1),
        })
    return out


def build_report(snap: SessionSnapshot, sample: TreeSample | None, activity: Activity, *,
                 repeat: int, next_in_s: float | None, wchans: Mapping[int, str] | None = None,
                 stderr_tail: str = "") -> dict[str, Any]:
    """The structured body of one stalled/stuck report (a JSON log line, a span event)."""
    verdict = Verdict(snap.state, snap.reason, snap.silence_s, snap.evidence)
    root = sample.processes[0] if sample and sample.processes else None
    report: dict[str, Any] = {
        "event": f"session.{snap.state.value}",
        "session_id": snap.session_id,
        "agent": snap.agent,
        "pid": snap.pid,
        **_names(snap),
        "state": snap.state.value,
        "reason": snap.reason.value,
        "summary": describe(verdict, sample, wchans),
        "silence_s": round(snap.silence_s, 1),
        "last_event_age_s": None if snap.last_event_age_s is None else round(snap.last_event_age_s, 1),
        "cpu_percent": None if snap.cpu_percent is None else round(snap.cpu_percent, 1),
        "rss_bytes": snap.rss_bytes,
        "open_fds": snap.open_fds,
        "threads": snap.threads,
        "tcp": None if snap.tcp is None else dict(snap.tcp),
        "connections": sorted({f"{c.state} {c.local} -> {c.remote}"
                               for p in (sample.processes if sample else ()) for c in p.connections})[:20],
        "root": None if root is None else {
            "status": root.status,
            "wchan": (wchans or {}).get(root.pid) or root.wchan,
            "cmdline": " ".join(root.cmdline)[:300],
        },
        "children": children_detail(sample, wchans),
        "open_tools": [{"tool": t.tool, "tool_id": t.tool_id, "since": t.since}
                       for t in (*activity.open_tools, *activity.background_tasks)],
        "recent_events": [e.to_json() for e in activity.recent[-10:]],
        "evidence": dict(snap.evidence),
        "repeat": repeat,
        "next_report_in_s": None if next_in_s is None else round(next_in_s, 1),
    }
    if stderr_tail:
        report["stderr_tail"] = stderr_tail[-2000:]
    return report


def session_summary(snap: SessionSnapshot, *, ended_at: float, longest_silence_s: float,
                    stalls: int, recoveries: int) -> dict[str, Any]:
    """The one line written when a session ends."""
    return {
        "event": "session.end",
        "session_id": snap.session_id,
        "agent": snap.agent,
        "pid": snap.pid,
        **_names(snap),
        "duration_s": round(max(0.0, ended_at - snap.started_at), 1),
        "final_state": snap.state.value,
        "final_reason": snap.reason.value,
        "events": snap.events,
        "malformed": snap.malformed,
        "longest_silence_s": round(longest_silence_s, 1),
        "stalls": stalls,
        "recoveries": recoveries,
        **({"usage": dict(snap.usage)} if snap.usage else {}),
    }

