"""What `otelwatch run` says to a person: the start summary and readable log lines.

Owns the text face of the daemon. On a terminal (or with `--log-format text`)
`run` prints `start_summary` once the first tick is done (sessions found by
agent, sources on, endpoints, notification channels, what it cannot see and how
to fix that), and `TextLog` turns the JSON log lines into one readable line
each. With `--log-format json` (the default when stderr is not a terminal) the
JSON lines are written unchanged. `listen_failed` says how to choose another
port when the address is taken.

Pure text from the config and the sessions; nothing here reads /proc or the
network. Every value from a session goes through `safe`, so nothing a process
or a file wrote reaches a terminal as an escape sequence.
"""

from __future__ import annotations

import errno
import io
import json
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import IO, Any
from urllib.parse import urlsplit

from otelwatch.commands.status import safe
from otelwatch.config import Config, Paths
from otelwatch.sessions.report import human_duration

__all__ = ["FIX_BLIND", "TextLog", "blind_sessions", "listen_failed", "log_format", "start_summary"]

FIX_BLIND = ("run otelwatch as root, or grant it CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE "
             "(systemd: AmbientCapabilities=CAP_DAC_READ_SEARCH CAP_SYS_PTRACE)")


def log_format(choice: str, stream: IO[str]) -> str:
    """"text" or "json": `auto` is text on a terminal, JSON lines otherwise."""
    if choice in ("json", "text"):
        return choice
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def _redact_url(url: str) -> str:
    """scheme://host/... of a webhook: its path and query often hold the secret."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a webhook)"
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/..." if parts.path not in ("", "/") or parts.query else \
        f"{parts.scheme}://{host}{port}"


def blind_sessions(sessions: Sequence[Mapping[str, Any]], me: str | None) -> list[Mapping[str, Any]]:
    """Live sessions whose numbers otelwatch could not read (another user's processes
    without the capabilities to inspect them)."""
    return [s for s in sessions if s.get("state") != "exited" and (
        s.get("sample_status") == "access_denied" or s.get("reason") == "access_denied"
        or (s.get("open_fds") is None and me is not None and s.get("user") not in (None, me)))]


def _proc_hidepid(mounts: str) -> str | None:
    """The hidepid= option of the /proc mount when it hides other users' processes."""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as fh:
            lines = fh.read(1 << 20).splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "/proc" and parts[2] == "proc":
            hide = next((o for o in parts[3].split(",") if o.startswith("hidepid=")), None)
            if hide and hide.split("=", 1)[1] not in ("0", "off"):
                return hide
    return None


def start_summary(cfg: Config, paths: Paths, *, sessions: Sequence[Mapping[str, Any]], url: str,
                  config_file: str | None, notify_on: bool, me: str, pid: int, version: str,
                  ticked: bool, tmux_found: bool | None = None, proc_mounts: str = "/proc/mounts") -> str:
    """The few lines a person reads when the daemon starts on a terminal."""
    rows: list[tuple[str, str]] = []
    live = [s for s in sessions if s.get("state") != "exited"]
    if not ticked:
        rows.append(("sessions", "not counted yet (the first tick has not finished)"))
    elif not live:
        rows.append(("sessions", "none yet (agents are found as they start)"))
    else:
        agents = Counter(safe(s.get("agent") or "unknown") for s in live)
        by_agent = ", ".join(f"{n} {agent}" for agent, n in sorted(agents.items(), key=lambda kv: (-kv[1], kv[0])))
        bad = Counter(str(s.get("state")) for s in live if s.get("state") in ("stalled", "stuck"))
        trouble = "; " + ", ".join(f"{n} {state}" for state, n in sorted(bad.items())) if bad else ""
        rows.append(("sessions", f"{len(live)} found: {by_agent}{trouble}"))

    s = cfg.sources
    on = []
    if s.processes.enabled:
        on.append("processes (" + ", ".join(s.processes.match) + ")")
    if s.tmux.enabled:
        on.append("tmux" if tmux_found is not False else "tmux (not installed: panes not mapped)")
    if s.transcripts.enabled:
        on.append("transcripts")
    if s.registry.enabled:
        on.append(f"registry {paths.registry_dir}")
    on.append("hooks")
    rows.append(("sources", ", ".join(on)))

    ends = []
    if cfg.export.prometheus.enabled:
        ends.append(f"{url}/metrics")
    ends.append(f"{url}/api/sessions")
    rows.append(("endpoints", "  ".join(ends)))
    otlp = cfg.export.otlp
    endpoint = otlp.endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if otlp.enabled or endpoint:
        rows.append(("otlp", f"to {_redact_url(endpoint) if endpoint else 'the SDK default (localhost:4317)'}"))

    n = cfg.notify
    channels = []
    if n.webhook:
        channels.append(f"webhook {_redact_url(n.webhook)}")
    if n.command:
        channels.append(f"command {safe(n.command[0])}")
    if channels and notify_on:
        rows.append(("notify", ", ".join(channels) + f" (from {n.min_state})"))
    else:
        rows.append(("notify", "off (set notify.webhook or notify.command in the config file)"))
    r = cfg.recovery
    rows.append(("recovery", "off (watch only)" if not r.enabled else
                 "dry run (says what it would do)" if r.dry_run else
                 f"on: stuck for {human_duration(cfg.recover_after)} -> {r.action}"))

    blind = blind_sessions(sessions, me)
    if blind:
        users = sorted({str(b.get("user") or "?") for b in blind})
        rows.append(("cannot see", f"{len(blind)} session(s) of {', '.join(safe(u) for u in users)}: "
                                   f"{FIX_BLIND}"))
    elif os.geteuid() != 0 and s.processes.enabled:
        rows.append(("cannot see", f"other users' agents in full (running as {me}); to watch them too: "
                                   f"{FIX_BLIND}"))
    hidden = _proc_hidepid(proc_mounts)
    if hidden and os.geteuid() != 0:
        rows.append(("cannot see", f"other users' processes at all (/proc is mounted with {hidden}): add "
                                   f"{me} to the group named by gid= of that mount, or run as root"))
    if cfg.probe.backend == "psutil" or not os.path.isdir("/proc/self"):
        rows.append(("cannot see", "wait channels and per-process sockets (the portable psutil probe; "
                                   "README, Platforms)"))

    source = f"config {config_file}" if config_file else "built-in defaults (no config file found)"
    head = f"otelwatch {version} watching as {me} (pid {pid}), {source}"
    width = max(len(k) for k, _ in rows)
    lines = [head, *(f"  {k.ljust(width)}  {v}" for k, v in rows),
             f"  {'next'.ljust(width)}  otelwatch status  |  otelwatch top  |  Ctrl-C stops"]
    return "\n".join(lines)


def listen_failed(listen: str, exc: OSError, config_file: str | None, listen_given: bool) -> str:
    """The message when the listener cannot bind: for a taken port, how to choose another."""
    why = exc.strerror or str(exc)
    text = f"otelwatch: cannot listen on {listen}: {why}"
    if exc.errno != errno.EADDRINUSE:
        return text
    host, _, port = listen.rpartition(":")
    other = f"{host}:{int(port) + 1}" if port.isdigit() and int(port) < 65535 else f"{host}:9465"
    where = f"http.listen in {config_file}" if config_file else \
        "http.listen in ~/.config/otelwatch/config.toml"
    already = " (given with --listen)" if listen_given else ""
    return (f"{text}{already}.\n  Another otelwatch or another program holds it "
            f"(`ss -ltnp 'sport = :{port}'` shows which).\n"
            f"  Choose another port: `otelwatch run --listen {other}`, or set {where}\n"
            f"  (status and top read that file too, so the port is said once).")


class TextLog(io.TextIOBase):
    """A stream for the daemon's JSON log lines that writes one readable line for each."""

    HELD_MAX = 200  # lines kept while the start summary is pending; older ones are counted

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._buffer = ""
        self._held: list[str] | None = []  # until release(): the summary comes first
        self._dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            shown = render_line(line)
            if not shown:
                continue
            if self._held is None:
                self._out.write(shown + "\n")
            elif len(self._held) < self.HELD_MAX:
                self._held.append(shown)
            else:
                self._dropped += 1
        return len(text)

    def release(self) -> None:
        """Write the lines held back so far; from now on each line is written at once."""
        held, self._held = self._held or [], None
        for shown in held:
            self._out.write(shown + "\n")
        if self._dropped:
            self._out.write(f"({self._dropped} more start-up lines not shown)\n")
        self._out.flush()

    def flush(self) -> None:
        if self._held is None:
            self._out.flush()

    def isatty(self) -> bool:
        return False


def render_line(line: str) -> str:
    """One JSON log line as a person reads it; a line that is not JSON as it came."""
    try:
        r = json.loads(line)
    except ValueError:
        return safe(line)
    if not isinstance(r, dict):
        return safe(line)
    clock = time.strftime("%H:%M:%S")
    level = str(r.get("level", "info"))
    mark = {"warning": "WARN ", "error": "ERROR", "critical": "ERROR"}.get(level, "     ")
    event = str(r.get("event", "")).replace(".", "_")
    sid = safe(r.get("session_id", ""))
    if event in ("session_stalled", "session_stuck"):
        again = f", repeat {r['repeat']}" if r.get("repeat") else ""
        text = (f"{str(r.get('state', '')).upper()} {r.get('reason')}: {safe(r.get('who') or sid)}: "
                f"{safe(r.get('summary', ''))}{again}")
    elif event == "session_state":
        text = f"{sid}: {r.get('from') or r.get('previous') or 'new'} -> {r.get('state')}/{r.get('reason')}"
    elif event in ("session_summary", "session_end"):
        text = (f"ended: {safe(r.get('who') or sid)} after {human_duration(r.get('duration_s'))}, "
                f"{r.get('final_state')}/{r.get('final_reason')}, {r.get('stalls', 0)} stall(s)")
    elif event.startswith("recovery_"):
        bits = [r.get("step"), r.get("status"), r.get("detail")]
        text = f"recovery of {sid}: " + " ".join(safe(b) for b in bits if b)
    elif event == "daemon_started":
        return ""  # the start summary said it
    else:
        skip = {"time", "level", "event"}
        extra = " ".join(f"{k}={safe(v)}" for k, v in r.items() if k not in skip)
        text = f"{event} {extra}".strip()
    return f"{clock} {mark} {text}"
