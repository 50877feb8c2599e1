"""Wrong-kill scenarios that need real PID reuse, run inside a fresh PID namespace.

`unshare --pid --fork --mount-proc python3 tests/support/pidns_scenarios.py NAME DIR` runs
one scenario as PID 1 of a new PID namespace, where the next PID can be chosen by
writing /proc/sys/kernel/ns_last_pid: a real reuse, not a simulated one. The daemon
runs inside the namespace too, so it sees the same PIDs. The scenario prints one
JSON object (its observations) as the last line of stdout; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository root

from tests.support.e2e_support import start_daemon
from tests.support.procs import FAKE, REPO, wait_for

RECOVERY = {"recovery": {"enabled": True, "recover_after": 1.5, "grace": 0.5, "max_per_hour": 100},
            "classify": {"exited_retention": 1}}


def spawn_at(pid: int, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start `argv` as process `pid` (the namespace's next PID is pid - 1 + 1)."""
    for _ in range(5):
        with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
            fh.write(str(pid - 1))
        proc = subprocess.Popen(argv, cwd=str(REPO), stdout=subprocess.DEVNULL, start_new_session=True)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    raise AssertionError(f"could not start a process as pid {pid}")


def named(events: list[dict[str, Any]], name: str, sid: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name and e.get("session_id") == sid]


def stale_registry(tmp: Path) -> dict[str, Any]:
    """A registry file without create_time outlives its process; its PID is reused."""
    registry = tmp / "sessions"
    registry.mkdir(mode=0o700, parents=True, exist_ok=True)
    first = subprocess.Popen(["sleep", "0.3"])
    from otelwatch.sources.registry import register

    register(registry, {"session_id": "stale", "pid": first.pid, "mode": "headless"})
    first.wait()
    time.sleep(2.0)  # the replacement starts clearly after the registration was written
    victim = spawn_at(first.pid, [*FAKE, "sleeper", "--lifetime", "60"])
    daemon = start_daemon(tmp, RECOVERY)
    try:
        # Long enough for recover_after and several exited_retention periods.
        time.sleep(4.0)
        events = daemon.log_events()
        snap = daemon.session("stale")
        return {"victim_pid": victim.pid, "registered_pid": first.pid, "victim_alive": victim.poll() is None,
                "ends": len(named(events, "session_summary", "stale")),
                "requested": len(named(events, "recovery_requested", "stale")),
                "state": snap and snap["state"]}
    finally:
        victim.kill()
        daemon.cleanup()


def restart_mid_escalation(tmp: Path) -> dict[str, Any]:
    """kill -9 the daemon after SIGTERM, before SIGKILL; the agent dies and its PID is
    reused while the daemon is down; the restarted daemon must signal nothing."""
    extra = {**RECOVERY, "recovery": {**RECOVERY["recovery"], "grace": 30}}
    daemon = start_daemon(tmp, extra)
    deaf = subprocess.Popen([*FAKE, "ignore-term", "--lifetime", "60"], cwd=str(REPO),
                            stdout=subprocess.DEVNULL, start_new_session=True)
    daemon.register("deaf", deaf.pid, mode="headless")
    wait_for(lambda: named(daemon.log_events(), "recovery_sigterm", "deaf"), timeout=20, interval=0.2)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    deaf.kill()
    deaf.wait()
    victim = spawn_at(deaf.pid, [*FAKE, "sleeper", "--lifetime", "60"])
    second = start_daemon(tmp / "again", {**extra, "state_dir": str(daemon.state_dir),
                                          "sources": {"registry": {"dir": str(daemon.registry)}}})
    try:
        time.sleep(5.0)
        events = second.log_events()
        signals = [e for e in events if e.get("event") in ("recovery_sigterm", "recovery_sigkill")]
        return {"victim_pid": victim.pid, "victim_alive": victim.poll() is None, "signals_after_restart": signals,
                "completed": [e.get("status") for e in named(events, "recovery_completed", "deaf")],
                "state": (second.session("deaf") or {}).get("state")}
    finally:
        victim.kill()
        second.cleanup()


def pid1_and_self(tmp: Path) -> dict[str, Any]:
    """PID 1 (this script: also the daemon's ancestor) and the daemon itself, registered
    as sessions with recovery on: neither may ever be acted on."""
    daemon = start_daemon(tmp, RECOVERY)
    try:
        daemon.register("init", 1, mode="headless")
        daemon.register("self", daemon.proc.pid, mode="headless")
        time.sleep(4.0)
        events = daemon.log_events()
        return {"requested": [e for e in events if e.get("event") == "recovery_requested"],
                "daemon_alive": daemon.proc.poll() is None,
                "states": {sid: (daemon.session(sid) or {}).get("state") for sid in ("init", "self")}}
    finally:
        daemon.cleanup()


SCENARIOS = {f.__name__: f for f in (stale_registry, restart_mid_escalation, pid1_and_self)}

if __name__ == "__main__":
    assert os.getpid() == 1, "run me inside `unshare --pid --fork --mount-proc`"
    result = SCENARIOS[sys.argv[1]](Path(sys.argv[2]))
    print(json.dumps(result), flush=True)
