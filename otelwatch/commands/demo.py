"""`otelwatch demo`: a zoo of synthetic agents, classified live, in about a minute.

Starts real processes (otelwatch.fake_agents) that behave like an active agent,
a hung one, one spinning on CPU, one asleep on a socket that never answers, one
in a long tool call, one retrying a failing API, an idle interactive session
and one that exits; registers them through the registry directory as any
orchestrator would; runs the real loop with thresholds of seconds, serves
/metrics and /api/sessions, and prints the status table as verdicts arrive.
Recovery runs in dry-run mode, so the hung agent shows what would be done and
nothing is signalled. Everything is cleaned up at the end or on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from otelwatch.commands.status import LiveScreen, format_table, table_width, use_color
from otelwatch.config import parse_config
from otelwatch.fake_agents import SilentServer
from otelwatch.sources.registry import register

# kind, mode, what a person should see, extra args for the fake agent
ZOO: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("active", "headless", "active", ()),
    ("hung", "headless", "stuck", ()),
    ("spin", "headless", "stalled/cpu_spin", ()),
    ("socket", "headless", "stalled/waiting_on_network", ()),
    ("tool", "headless", "long_running", ("--tool-child", "sleeper")),
    ("retry", "headless", "stalled/api_retrying", ()),
    ("idle", "interactive", "idle", ()),
    ("exit", "headless", "exited", ("--warmup", "6")),
)


def demo_config(state_dir: Path, listen: str, backend: str = "auto") -> Any:
    return parse_config({
        "probe": {"backend": backend},
        "interval": 1,
        "probe_timeout": 0.5,
        "state_dir": str(state_dir),
        "http": {"listen": listen},
        "classify": {"startup_grace": 2, "stall_after": 6, "tool_stall_after": 300,
                     "repeat_base": 10, "repeat_max": 60, "exited_retention": 300},
        "recovery": {"enabled": True, "dry_run": True, "recover_after": 8},
        "sources": {"registry": {"dir": str(state_dir / "sessions")}, "processes": {"enabled": False},
                    "tmux": {"enabled": False}, "transcripts": {"enabled": False}},
    })


def demo_main(duration: float = 60.0, listen: str = "127.0.0.1:9464", backend: str = "auto") -> int:
    from otelwatch.daemon import Watcher
    from otelwatch.http.server import HttpServer
    from otelwatch.telemetry import Telemetry

    tmp = Path(tempfile.mkdtemp(prefix="otelwatch-demo-"))
    os.chmod(tmp, 0o700)
    server = SilentServer()
    procs: list[subprocess.Popen[bytes]] = []
    watcher = None
    http = None
    color = use_color(sys.stdout)
    # Redrawn in place on a terminal; appended frame by frame when piped.
    screen = LiveScreen(sys.stdout)
    try:
        cfg = demo_config(tmp, listen, backend)
        telemetry = Telemetry(cfg, log_stream=open(tmp / "otelwatch.log", "a"))  # noqa: SIM115
        watcher = Watcher(cfg, telemetry=telemetry)
        reports: deque[str] = deque(maxlen=6)
        recovery: deque[str] = deque(maxlen=1)
        decided: dict[str, str] = {}  # session -> the evidence its recovery was decided on

        def on_report(report: Mapping[str, Any]) -> None:
            event = str(report.get("event", ""))
            if event in ("session.stalled", "session.stuck"):
                reports.append(f"{time.strftime('%H:%M:%S')} {report['session_id']}: "
                               f"{report['state']}/{report['reason']}: {report.get('summary', '')}")
            elif event.startswith("recovery.") and report.get("step") == "requested":
                decided[str(report.get("session_id"))] = str(report.get("detail") or "")
            elif event.startswith("recovery.") and report.get("step") == "completed":
                # Kept apart from the reports (which scroll by): what would have been done.
                sid = str(report.get("session_id"))
                recovery.append(f"{time.strftime('%H:%M:%S')} {sid}: "
                                + dry_run_words(report, cfg.recovery.grace, decided.get(sid, "")))

        watcher.subscribe(on_report)
        try:
            http = HttpServer(cfg.http.host, cfg.http.port, watcher, telemetry.prometheus_exposition)
        except OSError:
            http = HttpServer("127.0.0.1", 0, watcher, telemetry.prometheus_exposition)
        http.start()

        expected: dict[str, str] = {}
        for kind, mode, expect, extra in ZOO:
            events = tmp / f"{kind}.jsonl"
            argv = [sys.executable, "-m", "otelwatch.fake_agents", kind, "--events", str(events),
                    "--port", str(server.port), "--period", "1", "--lifetime", str(duration + 30), *extra]
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
            procs.append(proc)
            sid = f"demo-{kind}"
            expected[sid] = expect
            register(tmp / "sessions", {"session_id": sid, "pid": proc.pid, "agent": f"fake-{kind}",
                                        "events_path": str(events), "mode": mode, "labels": {"demo": "true"}})
        watcher.start()
        print(f"otelwatch demo: {len(procs)} synthetic agents, stall after 6 s, a tick every 1 s;\n"
              f"  {http.url}/api/sessions, stops in {duration:.0f} s (Ctrl-C: now)\n")
        started = time.monotonic()
        deadline = started + duration
        while time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            screen.show(_frame(watcher, cfg, expected, reports, recovery, http.url, color, deadline, started))
        screen.finish(_frame(watcher, cfg, expected, reports, recovery, http.url, color, deadline, started, final=True))
        return 0
    except KeyboardInterrupt:
        screen.close()
        print("\notelwatch demo: interrupted, cleaning up")
        return 130
    finally:
        screen.close()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=2)
        if http is not None:
            http.shutdown(1.0)
        if watcher is not None:
            watcher.stop(1.5)
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)


def dry_run_words(report: Mapping[str, Any], grace: float, decided_on: str = "") -> str:
    """A dry-run recovery as a sentence: the signal, to which process group and pids,
    after which gates (and the evidence the decision was taken on, from the
    `requested` step); a real recovery's outcome as it came."""
    detail = str(report.get("detail") or "")
    if report.get("status") != "dry_run":
        return f"recovery {report.get('status')}" + (f" ({detail})" if detail else "")
    plan, _, gates = detail.partition("; gates: ")
    m = re.match(r"would signal pgid (\d+) and pids \[([\d, ]*)\]", plan)
    if m:
        plan = (f"would have sent SIGTERM to process group {m.group(1)} (pids {m.group(2)}), then SIGKILL "
                f"after {grace:g} s to whatever was left")
    elif not plan:
        plan = "would have acted"
    held = [g.split("=", 1)[0] for g in gates.split("; ") if g.split("=", 1)[-1].startswith("ok")]
    evidence = re.sub(r",? ?pids \[[\d, ]*\]", "", decided_on).strip(", ")
    why = f"after all {len(held)} recovery gates held" if held else ""
    if evidence:
        why = f"{why} ({evidence})" if why else f"on {evidence}"
    return f"nothing signalled: {plan}" + (f"; {why}" if why else "")


def _load() -> str:
    """The host's load against its CPUs, e.g. "load 6.4 on 2 CPUs"; "" where unknown."""
    try:
        one = os.getloadavg()[0]
    except OSError:
        return ""
    return f"load {one:.1f} on {os.cpu_count() or '?'} CPUs"


def why_not(want: str, row: Mapping[str, Any] | None, cfg: Any, *, ticks: int, elapsed: float) -> str:
    """Why a session does not show the verdict it should (yet), in words."""
    c = cfg.classify
    loaded = _load()
    late = ticks < 0.8 * elapsed / cfg.interval
    pace = f"the loop ticked {ticks} times in {elapsed:.0f} s (every {cfg.interval:g} s wanted)"
    host = f"; the host is busy ({loaded}{', ' + pace if late else ''})" if loaded or late else ""
    if row is None:
        return "not registered yet" + host
    state, reason = str(row.get("state")), str(row.get("reason"))
    cpu = row.get("cpu_percent")
    if state == "starting":
        return f"still in its start-up grace ({c.startup_grace:g} s)" + host
    if reason == "insufficient_samples":
        return f"not enough samples yet to prove it idle (a window of {c.stall_after:g} s)" + host
    if want.endswith("cpu_spin") and state == "stalled":
        shown = "unknown" if not isinstance(cpu, (int, float)) else f"{cpu:.0f}%"
        return (f"its CPU is {shown}, and spinning needs {c.cpu_spin_percent:g}% of a core sustained over the "
                f"window: the spinner is not getting a whole core" + host)
    if want == "stuck":
        return (f"stuck needs no progress, no CPU (under {c.cpu_idle_percent:g}%) and no TCP for "
                f"{c.stall_after:g} s; it is {state}/{reason} now" + host)
    if want.startswith("stalled") and state in ("active", "starting"):
        return f"it made progress {row.get('silence_s') or 0:.0f} s ago; stalled needs {c.stall_after:g} s of silence"
    detail = (row.get("evidence") or {}).get("detail") if isinstance(row.get("evidence"), Mapping) else None
    return f"it is {state}/{reason}" + (f" ({detail})" if detail else "") + host


def _wrap(text: str, width: int | None, indent: str = "    ") -> list[str]:
    if width is None:
        return [text]
    return textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False) or [""]


def _frame(watcher: Any, cfg: Any, expected: Mapping[str, str], reports: deque[str], recovery: deque[str],
           url: str, color: bool, deadline: float, started: float, final: bool = False) -> str:
    """One screen of the demo: the table, how many verdicts arrived (and why the others
    have not), what the dry run would have done, the latest reports; fitted to the
    terminal (wrapped, never cut). The last frame ends with the outcome, so that is
    what stays on screen."""
    rows = [s.to_json() for s in watcher.sessions()]
    width = table_width(sys.stdout)
    height = shutil.get_terminal_size().lines if width is not None and not final else None
    table = format_table(rows, time.time(), color=color, width=width).split("\n")
    by_id = {r["session_id"]: r for r in rows}
    got = {sid: f"{r['state']}/{r['reason']}" for sid, r in by_id.items()}
    missing = [sid for sid, want in expected.items() if not got.get(sid, "").startswith(want)]
    left = max(0, int(deadline - time.monotonic()))
    count = f"{len(expected) - len(missing)}/{len(expected)} show what they should, {left} s left"
    verdicts = ["", *_wrap(f"{count}; otelwatch top --url {url}", width)]
    elapsed = time.monotonic() - started
    ticks = int(watcher.health().get("ticks", 0))
    if missing and (final or elapsed > 25):  # by then each should show its verdict: say why not
        for sid in missing:
            why = why_not(expected[sid], by_id.get(sid), cfg, ticks=ticks, elapsed=elapsed)
            verdicts += _wrap(f"  {sid} is not {expected[sid]}: {why}", width)
    if final:
        for sid, want in expected.items():
            verdicts += (_wrap(f"  -- {sid}: expected {want}, got {got.get(sid, 'not seen')}", width)
                         if sid in missing else [f"  ok {sid}: {got[sid]}"])
    dry = ["", "recovery (dry run):", *_wrap("  " + recovery[-1], width)] if recovery else []
    out = [*table, *dry] if final else [*table, *verdicts, *dry]
    shown: list[str] = []
    for line in reversed(list(reports)[-3:] if final else reports):  # the newest that fit the window
        lines = _wrap("  " + line, width)
        if height is not None and len(out) + len(shown) + len(lines) + 2 > height - 1:
            break
        shown = lines + shown
    if shown:
        out += ["", "latest reports:", *shown]
    return "\n".join([*out, *verdicts] if final else out)
