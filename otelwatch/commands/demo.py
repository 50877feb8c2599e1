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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from otelwatch.commands.status import LiveScreen, format_table, use_color
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

        def on_report(report: Mapping[str, Any]) -> None:
            event = str(report.get("event", ""))
            if event in ("session.stalled", "session.stuck"):
                reports.append(f"{time.strftime('%H:%M:%S')} {report['session_id']}: "
                               f"{report['state']}/{report['reason']}: {report.get('summary', '')}")
            elif event.startswith("recovery.") and report.get("step") == "completed":
                reports.append(f"{time.strftime('%H:%M:%S')} {report['session_id']}: recovery "
                               f"{report.get('status')} (dry run: nothing was signalled)")

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
        print(f"otelwatch demo: {len(procs)} synthetic agents; thresholds: stall after 6 s, "
              f"tick every 1 s.\n  {http.url}/metrics  {http.url}/api/sessions  "
              f"(stops by itself in {duration:.0f} s; Ctrl-C to stop now)\n")
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            screen.show(_frame(watcher, expected, reports, http.url, color, deadline))
        screen.finish(_frame(watcher, expected, reports, http.url, color, deadline, final=True))
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


def _frame(watcher: Any, expected: Mapping[str, str], reports: deque[str], url: str, color: bool,
           deadline: float, final: bool = False) -> str:
    rows = [s.to_json() for s in watcher.sessions()]
    out = [format_table(rows, time.time(), color=color)]
    got = {r["session_id"]: f"{r['state']}/{r['reason']}" for r in rows}
    matched = sum(1 for sid, want in expected.items() if got.get(sid, "").startswith(want))
    out.append(f"\n{matched}/{len(expected)} sessions show what they should "
               f"({max(0, int(deadline - time.monotonic()))} s left; {url}/metrics; "
               f"`otelwatch top --url {url}` in another pane)")
    if reports:
        out.append("\nlatest reports:")
        out.extend("  " + line[:160] for line in reports)
    if final:
        for sid, want in expected.items():
            mark = "ok " if got.get(sid, "").startswith(want) else "-- "
            out.append(f"  {mark}{sid:<14} expected {want:<28} got {got.get(sid, 'not seen')}")
    return "\n".join(out)
