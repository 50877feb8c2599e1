"""The daemon's one view of every session source: scan them all, guarded, once per tick.

Owns which sources are configured (registry, spool, process discovery, tmux,
transcripts), calling each behind a guard (a failing source is logged once and
counted every tick, never fatal), following each session's events file and
transcript, and reading a session's captured stderr for reports.

Must never classify, signal or export: it only says what the sources say.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from otelwatch.config import Config, Paths
from otelwatch.events.lines import fold
from otelwatch.model import Event, SessionSpec
from otelwatch.probe.proctable import ProcessTable
from otelwatch.sessions.table import SessionTable, Tracked, session_uid
from otelwatch.sources.feeds import open_feed
from otelwatch.sources.gemini import parse_stderr_line, stderr_file
from otelwatch.sources.spool import PRUNE_EVERY_S, RETENTION_S, remove_older_than
from otelwatch.sources.tail import FileTail, open_regular
from otelwatch.sources.tmux import PaneInfo
from otelwatch.sources.transcripts import fold_transcript, status_events

if TYPE_CHECKING:  # no OpenTelemetry SDK import for a type
    from otelwatch.telemetry import TelemetrySink

__all__ = ["TRANSCRIPT_RETRY_S", "Sources"]

TRANSCRIPT_RETRY_S = 10.0  # looking again for a transcript no session file names
# Sessions whose own transcript is their event stream: found by name, or known from hooks.
_TRANSCRIPT_SOURCES = frozenset({"process", "tmux", "hook"})
# Agents whose turn information (session file, transcript) otelwatch reads.
_TURN_KEEPERS = ("claude", "codex")


class Sources:
    """The configured session sources behind one `scan()`; each is optional and guarded."""

    def __init__(self, cfg: Config, paths: Paths, telemetry: TelemetrySink, *,
                 boot_time: float | None = None) -> None:
        from otelwatch.sources.agent_dirs import AgentDirResolver
        from otelwatch.sources.processes import ProcessMatcher
        from otelwatch.sources.registry import RegistrySource
        from otelwatch.sources.spool import SpoolSource
        from otelwatch.sources.tmux import TmuxSource
        from otelwatch.sources.transcripts import TranscriptLocator

        s = cfg.sources
        self._telemetry = telemetry
        # boot_time: the daemon's one boot time, on which records' start ticks are placed.
        self.registry = RegistrySource(paths.registry_dir, boot_time=boot_time) if s.registry.enabled else None
        self.spool = SpoolSource(paths.spool_dir, log=lambda message: self._warn("spool", message),
                                 boot_time=boot_time)
        self._spool_prefix = str(paths.spool_dir) + os.sep
        self._exec_dir = paths.state_dir / "exec"  # the exec wrapper's stderr rings
        self._pruned_at = -math.inf
        self.processes = ProcessMatcher(s.processes.match, self_pid=os.getpid()) if s.processes.enabled else None
        self.tmux = TmuxSource(timeout=s.tmux.timeout) if s.tmux.enabled else None
        self.transcripts = TranscriptLocator(paths.home, AgentDirResolver(
            paths.home, configured=bool(s.transcripts.home))) if s.transcripts.enabled else None
        self.registry_ok = False
        # agent pid -> the tmux pane it runs in (or ran in) at the last scan; None when tmux is
        # off or the last scan failed (a failed read is no news).
        self.panes: dict[int, PaneInfo] | None = None
        self._tmux_counted = (0, 0)  # tmux timeouts and errors already exported
        # id(Tracked) -> (it, the tail of its stderr file): Gemini CLI's retries (gemini.py).
        self._stderr_tails: dict[int, tuple[Tracked, FileTail]] = {}
        self._stderr_checked: dict[int, float] = {}
        self._failed: set[str] = set()

    def check(self) -> None:
        """Refuse an unsafe registry directory at start (raises with a clear message)."""
        if self.registry is not None:
            self.registry.check()

    def scan(self, table: ProcessTable, now: float,
             agent_pids: Iterable[int]) -> tuple[list[SessionSpec], dict[str, list[Event]]]:
        specs: list[SessionSpec] = []
        events: dict[str, list[Event]] = {}
        self.registry_ok = False
        if self.registry is not None:
            got = self._guard("registry", lambda: self.registry.scan(now))  # type: ignore[union-attr]
            if got is not None:
                specs.extend(got)
                self.registry_ok = True
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            remove_older_than(self._exec_dir, ".stderr", RETENTION_S, now)
        got_spool = self._guard("spool", lambda: self.spool.poll(now))
        if got_spool is not None:
            spool_specs, events, _malformed = got_spool
            specs.extend(spool_specs)
        if self.processes is not None:
            specs.extend(self._guard("processes", lambda: self.processes.scan(table)) or ())  # type: ignore[union-attr]
        if self.tmux is not None:
            pids = set(agent_pids) | {s.pid for s in specs if s.pid is not None}
            panes = self._guard("tmux", lambda: self.tmux.scan(table, pids))  # type: ignore[union-attr]
            self.panes = None if panes is None else {
                pid: pane for pane in panes
                if (pid := pane.agent_pid if pane.agent_pid is not None else pane.last_agent_pid) is not None
            }
            self._export_tmux_problems()
        return specs, events

    def _export_tmux_problems(self) -> None:
        """A tmux server that does not answer costs every tick up to its timeout: count it
        like a probe timeout (kind "tmux") so the probe-timeout alert sees it."""
        assert self.tmux is not None
        timeouts, errors = self.tmux.timeouts, self.tmux.errors
        seen_timeouts, seen_errors = self._tmux_counted
        for _ in range(timeouts - seen_timeouts):
            self._problem("tmux", True)
        for _ in range(errors - seen_errors):
            self._problem("tmux", False)
        self._tmux_counted = (timeouts, errors)

    def runtime_target_alive(self, spec: SessionSpec) -> bool | None:
        """For a session whose process is gone: does its runtime (its tmux pane) live on?
        Asked once, when the process is found dead, not every tick: the pane its agent ran
        in is asked about afresh (one call to that pane's server); a registered pane the
        scans never mapped to the agent, from the last scan. None: unknown."""
        tmux = self.tmux
        if tmux is None:
            return None
        pane = tmux.pane_of(spec.pid) if spec.pid is not None else None
        if pane is not None:
            pid = spec.pid
            assert pid is not None
            result = self._guard("tmux", lambda: tmux.recheck(pane, pid))
            return None if result is None else bool(result)
        runtime = spec.runtime
        if runtime is None or runtime.kind != "tmux" or not runtime.target:
            return None
        result = self._guard("tmux", lambda: self.tmux.pane_alive(runtime.target, runtime.socket or None))  # type: ignore[union-attr]
        return None if result is None else bool(result)

    def _warn(self, source: str, message: str) -> None:
        self._log("source.untrusted", {"source": source, "detail": message}, "warning")

    def _guard(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
        except Exception as exc:
            if name not in self._failed:  # log once per failing source, count every time
                self._failed.add(name)
                self._log("source.error", {"source": name, "error": repr(exc)}, "error")
            self._problem(f"source_{name}", False)
            return None
        self._failed.discard(name)
        return result

    def close(self) -> None:
        try:
            self.spool.close()
        except OSError as exc:  # closing the spool's files: nothing left to lose
            self._log("source.error", {"source": "spool", "error": repr(exc)}, "warning")

    def match_transcripts(self, sessions: SessionTable, table: ProcessTable, now: float,
                           cwd_of: Callable[[int], str | None]) -> None:
        """Find each discovered or hooked session's own transcript, and read Claude Code's
        session file for it. `cwd_of` is the probe's working-directory read."""
        locator = self.transcripts
        if locator is None:
            return
        for tracked in sessions.values():
            spec = tracked.spec
            # Sessions with no stream of their own: found by name, or known from hooks, which
            # miss what only the transcript and the CLI's session file say (interrupts,
            # /clear, tool results, retries, a permission prompt answered).
            if tracked.ended_at is not None or spec.pid is None or spec.source not in _TRANSCRIPT_SOURCES:
                continue
            try:
                session = locator.claude_session(spec.pid) if spec.agent.startswith("claude") else None
            except Exception as exc:
                self._log("transcript.error", {"session_id": tracked.key, "error": repr(exc)}, "warning")
                session = None
            tracked.claude_before, tracked.claude = tracked.claude, session
            if session is not None and session.current:
                pass  # the CLI names its transcript now (and after /clear): followed every tick, cheaply
            elif spec.events_path or now - tracked.transcript_checked_at < TRANSCRIPT_RETRY_S:
                continue
            tracked.transcript_checked_at = now
            known_cwd = session is not None and session.current and session.cwd
            cwd = None if known_cwd else cwd_of(spec.pid)  # None where unknown (gone, no /proc)
            try:
                found = locator.find(spec.agent, spec.pid, cwd, tracked.started_at)
            except Exception as exc:
                self._log("transcript.error", {"session_id": tracked.key, "error": repr(exc)}, "warning")
                continue
            if found is None or spec.events_path == str(found[1]):
                continue
            transcript_id, path = found
            tracked.spec = replace(spec, events_path=str(path))
            sessions.adopt(transcript_id, tracked)

    def judge_turns(self, sessions: SessionTable) -> None:
        """Set each live session's `turns` visibility (visibility.py) from what was read this tick."""
        for tracked in sessions.values():
            if tracked.ended_at is None:
                tracked.turns = self._turns_of(tracked)

    def _turns_of(self, tracked: Tracked) -> str:
        spec = tracked.spec
        if tracked.activity.events > 0 or (tracked.claude is not None and tracked.claude.current):
            return "ok"
        if spec.source not in _TRANSCRIPT_SOURCES or not spec.agent.startswith(_TURN_KEEPERS):
            # An explicit event stream (registry, exec, API) or an agent whose files we do not follow.
            return "ok" if spec.events_path or spec.source in ("exec", "api") else "none"
        if self.transcripts is None:
            return "disabled"
        if spec.pid is not None and self.transcripts.denied(spec.pid):
            return "denied"
        return "ok" if spec.events_path or tracked.claude is not None else "none"

    def poll_tails(self, sessions: SessionTable, now: float) -> None:
        """Read what each session's events file gained, and Claude Code's word on its turn."""
        spool = self._spool_prefix
        for tracked in sessions.values():
            path = tracked.spec.events_path
            if path and path.startswith(spool):
                # The exec wrapper and hooks write to the spool, which the spool source
                # already reads; tailing it again would count every event twice.
                continue
            if path and (tracked.tail is None or str(tracked.tail.path) != path):
                if tracked.tail is not None:
                    tracked.tail.close()  # the agent moved on to a new transcript (/clear, /resume)
                transcript = tracked.spec.source in _TRANSCRIPT_SOURCES
                source = "transcript" if transcript else "stream"
                # Users are walls: a transcript is read only when its agent's user owns it; a
                # registry entry's events file (the entry is otelwatch's user's word) may also
                # be otelwatch's user's. Either way its lines are the session's own events.
                uid = session_uid(tracked)
                owners = {uid} if uid is not None else set()
                if not transcript:
                    owners.add(os.geteuid())
                tracked.tail = open_feed(tracked.spec.agent, path, source, owners=owners, own=True)
            if tracked.ended_at is not None:
                continue
            if tracked.tail is not None:
                try:
                    events, malformed = tracked.tail.poll(now)
                except Exception as exc:
                    self._problem("events", False)
                    self._log("events.error", {"session_id": tracked.key, "error": repr(exc)}, "warning")
                    events, malformed = [], 0
                transcript = tracked.tail.source == "transcript"
                activity = fold_transcript(tracked.activity, events) if transcript else fold(tracked.activity, events)
                tracked.activity = activity.count_malformed(malformed) if malformed else activity
            if tracked.spec.agent == "gemini" and tracked.spec.source in _TRANSCRIPT_SOURCES and path:
                # Once its chat file is followed: retries read before the prompt they belong to
                # would stand alone, and the prompt found later would read as progress after them.
                self._poll_gemini_stderr(tracked, now)
            if tracked.claude is not None:
                # After the transcript: the CLI's own word on its turn, which nothing else
                # gives for Esc or for a permission prompt answered.
                for event in status_events(tracked.claude, tracked.claude_before, tracked.activity, now):
                    tracked.activity = tracked.activity.apply(event)

    def _poll_gemini_stderr(self, tracked: Tracked, now: float) -> None:
        """Gemini CLI announces its API retries only on stderr: follow it when it is a file."""
        held = self._stderr_tails.get(id(tracked))
        if held is None or held[0] is not tracked:
            if len(self._stderr_tails) > 4096:
                self._stderr_tails.clear()
            if now - self._stderr_checked.get(id(tracked), -math.inf) < TRANSCRIPT_RETRY_S or tracked.spec.pid is None:
                return
            self._stderr_checked[id(tracked)] = now
            uid = tracked.latest.processes[0].uid if tracked.latest and tracked.latest.processes else None
            path = stderr_file(tracked.spec.pid, uid)
            if path is None:
                return
            held = self._stderr_tails[id(tracked)] = (tracked, FileTail(path, source="stderr",
                                                                        parser=parse_stderr_line))
        events, _ = held[1].poll(now)
        if events:
            tracked.activity = fold(tracked.activity, events)

    def close_feed(self, tracked: Tracked) -> None:
        """Close a forgotten session's event feed (the session table does no I/O)."""
        if tracked.tail is not None:
            tracked.tail.close()
            tracked.tail = None

    def release(self, tracked: Tracked) -> None:
        """An ended session's readers beside its events path."""
        held = self._stderr_tails.pop(id(tracked), None)
        self._stderr_checked.pop(id(tracked), None)
        if held is not None:
            held[1].close()

    def stderr_tail(self, spec: SessionSpec) -> str:
        """The last bytes of a session's captured stderr (the exec wrapper's ring), for reports."""
        return _read_tail(spec.stderr_path)

    def _log(self, event: str, fields: Mapping[str, Any], level: str) -> None:
        try:
            self._telemetry.log(event, fields, level)
        except Exception:  # the log itself failed: stderr is all that is left, never the tick
            print(f"otelwatch: {event} {dict(fields)}", file=sys.stderr)

    def _problem(self, kind: str, timeout: bool) -> None:
        """Count a source problem (otelwatch.probe.errors/timeouts, `kind`); a failing
        counter is logged instead."""
        try:
            self._telemetry.on_probe_problem(kind, timeout)
        except Exception as exc:
            self._log("telemetry.error", {"call": "on_probe_problem", "kind": kind, "error": repr(exc)}, "error")




def _read_tail(path: str | None, limit: int = 4096) -> str:
    if not path:
        return ""
    try:
        with open_regular(path) as fh:  # a FIFO here must never block the loop
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
