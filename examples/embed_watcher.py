"""Embed otelwatch in a host application that spawns agents itself (a bot, an orchestrator).

Runs two agents under an in-process Watcher: one keeps working, one goes quiet.
The host feeds each agent's stdout lines to the watcher, subscribes to reports,
and reads verdicts. Thresholds are seconds so it finishes in a few seconds:

    python examples/embed_watcher.py
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from otelwatch import Watcher, parse_config

cfg = parse_config({
    "interval": 1,
    "probe_timeout": 0.5,
    "state_dir": "/tmp/otelwatch-example",
    "classify": {"startup_grace": 1, "stall_after": 4},
    # An embedded watcher only watches what it is told to:
    "sources": {"registry": {"enabled": False}, "processes": {"enabled": False},
                "tmux": {"enabled": False}, "transcripts": {"enabled": False}},
    "export": {"prometheus": {"enabled": True}},
})


def run_agent(kind: str) -> subprocess.Popen[bytes]:
    # Stand-ins for `claude -p ... --output-format stream-json`.
    return subprocess.Popen([sys.executable, "-m", "otelwatch.fake_agents", kind, "--period", "0.5",
                             "--lifetime", "30"], stdout=subprocess.PIPE)


def pump(watcher: Watcher, session_id: str, proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:  # the host reads the agent's output anyway: hand each line over
        watcher.feed(session_id, line)


def main() -> int:
    watcher = Watcher(cfg).start()
    watcher.subscribe(lambda r: print("report:", r["event"], r.get("session_id"), r.get("reason", ""),
                                      r.get("summary", "")))
    agents = {"job-working": run_agent("active"), "job-quiet": run_agent("hung")}
    for sid, proc in agents.items():
        watcher.track(proc.pid, sid, agent="fake-claude", events_path=None)
        threading.Thread(target=pump, args=(watcher, sid, proc), daemon=True).start()
    try:
        deadline = time.monotonic() + 30  # returns as soon as both verdicts are in
        while time.monotonic() < deadline:
            time.sleep(1)
            states = {s.session_id: f"{s.state}/{s.reason}" for s in watcher.sessions()}
            if states.get("job-quiet") == "stuck/no_activity" and states.get("job-working", "").startswith("active"):
                break
        for s in watcher.sessions():
            print(f"{s.session_id}: {s.state}/{s.reason} silence={s.silence_s:.1f}s cpu={s.cpu_percent}")
        final = {s.session_id: s.state.value for s in watcher.sessions()}
        return 0 if final == {"job-working": "active", "job-quiet": "stuck"} else 1
    finally:
        for proc in agents.values():
            proc.kill()
            proc.wait()
        watcher.stop()


if __name__ == "__main__":
    sys.exit(main())
