"""Never signal the wrong process: every wrong-kill path found by the adversarial pass,
with recovery on, short thresholds, and a real process that must survive.

- An event alone (a POSTed or spooled turn start) never opens the recovery gate, while
  a real hang after a hook's turn start stays recoverable.
- A stale registry file never adopts the process that reuses its PID, and a dead PID's
  file stays ended (real PID reuse, in a PID namespace: see pidns_scenarios.py).
- A spool file or state directory others can write is not trusted.
- Symlinked, huge, foreign-owned, group-writable and malformed registry entries are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e_support import Daemon, start_daemon
from tests.support.procs import FAKE, REPO, wait_for

pytestmark = pytest.mark.e2e

RECOVERY = {"recovery": {"enabled": True, "recover_after": 1.5, "grace": 0.5, "max_per_hour": 100}}
# Waits for a trigger file, then opens its own turn (its hook, run as its own child:
# an own event), works (a second of CPU), then hangs: what a real agent does when its
# turn opens and its API call never returns.
REACTS = """
import os, subprocess, sys, time
trigger = sys.argv[1]
while not os.path.exists(trigger):
    time.sleep(0.05)
if len(sys.argv) > 2:
    subprocess.run([sys.executable, "-m", "otelwatch", "event", sys.argv[2], "UserPromptSubmit"], timeout=10)
end = time.time() + 1.0
while time.time() < end:
    pass
time.sleep(120)
"""


def start_agent(daemon: Daemon, argv: list[str]) -> subprocess.Popen[bytes]:
    # The daemon's state directory: where the agent's hooks find its hook socket.
    env = {**os.environ, "OTELWATCH_STATE_DIR": str(daemon.state_dir)}
    proc = subprocess.Popen(argv, cwd=str(REPO), stdout=subprocess.DEVNULL, start_new_session=True, env=env)
    daemon.agents.append(proc)
    return proc


def post(daemon: Daemon, payload: dict[str, Any]) -> int:
    req = urllib.request.Request(daemon.url + "/api/events", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=3) as resp:
        return int(resp.status)


def record_event(daemon: Daemon, sid: str, type: str, pid: int) -> None:
    """The real `otelwatch event` CLI: the spool path hooks use."""
    env = {**os.environ, "OTELWATCH_STATE_DIR": str(daemon.state_dir)}
    subprocess.run([sys.executable, "-m", "otelwatch", "event", sid, type, "--pid", str(pid)],
                   cwd=str(REPO), env=env, check=True, timeout=10)


def test_an_event_alone_never_opens_the_recovery_gate(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, RECOVERY)
    try:
        # Two idle interactive sessions whose processes never react: one gets its turn
        # opened over HTTP, one through the spool (a hook). A third reacts to its turn
        # (works, then hangs): the real hang a hook's UserPromptSubmit is there to catch.
        posted = start_agent(daemon, [*FAKE, "sleeper", "--lifetime", "60"])
        spooled = start_agent(daemon, [*FAKE, "sleeper", "--lifetime", "60"])
        trigger = tmp_path / "go"
        hung = start_agent(daemon, [sys.executable, "-c", REACTS, str(trigger), "hung"])
        for sid, proc in (("posted", posted), ("spooled", spooled), ("hung", hung)):
            daemon.register(sid, proc.pid, mode="interactive")
        for sid in ("posted", "spooled", "hung"):
            daemon.wait_state(sid, "idle", "no_open_turn", timeout=10)

        assert post(daemon, {"session_id": "posted", "type": "turn_start", "time": 0}) == 202
        record_event(daemon, "spooled", "turn_start", spooled.pid)
        trigger.touch()  # "hung" opens its own turn through its hook

        # The two that never reacted reach stuck (every gate but the reaction holds)...
        for sid in ("posted", "spooled"):
            daemon.wait_state(sid, "stuck", "no_activity", timeout=20)
        done = wait_for(lambda: [r for r in daemon.session("hung")["recoveries"] if r["step"] == "completed"],
                        timeout=20, interval=0.2)
        assert done[-1]["status"] == "terminated"  # type: ignore[index]
        # ...and stay untouched for longer than recover_after after that.
        time.sleep(2.0)
        for sid, proc in (("posted", posted), ("spooled", spooled)):
            snap = daemon.session(sid)
            assert snap is not None and snap["recoveries"] == [], (snap, daemon.log_tail(80))
            assert proc.poll() is None, f"{sid} was signalled"
        requested = [e["session_id"] for e in daemon.log_events() if e.get("event") == "recovery_requested"]
        assert requested == ["hung"]
    finally:
        daemon.cleanup()


def test_a_state_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o777)
    daemon = start_daemon(tmp_path, {}, wait=False)
    try:
        assert daemon.proc.wait(timeout=15) == 2
        assert "group- or world-writable" in daemon.log_tail()
    finally:
        daemon.cleanup()


def test_untrusted_spool_files_and_bad_registry_entries_are_skipped(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, RECOVERY)
    try:
        victim = start_agent(daemon, [*FAKE, "sleeper", "--lifetime", "60"])
        # Spool files another user owns or anyone may write: one could open a turn
        # for any process (`otelwatch event evil UserPromptSubmit --pid P`).
        spool = daemon.state_dir / "events"
        spool.mkdir(mode=0o700, exist_ok=True)
        record = {"otelwatch": 1, "session_id": "evil", "pid": victim.pid, "time": time.time(),
                  "type": "UserPromptSubmit", "kind": "progress", "turn": "open"}
        foreign = spool / "evil.jsonl"
        foreign.write_text(json.dumps(record) + "\n")
        os.chown(foreign, 4242, 4242)  # another user's file (we run as root here)
        writable = spool / "evil2.jsonl"
        writable.write_text(json.dumps({**record, "session_id": "evil2"}) + "\n")
        os.chmod(writable, 0o666)
        # Registry entries that each name the victim, none of which may be trusted or read.
        entry = {"session_id": "x", "pid": victim.pid, "mode": "headless"}
        outside = tmp_path / "outside.json"
        outside.write_text(json.dumps({**entry, "session_id": "linked"}))
        os.symlink(outside, daemon.registry / "linked.json")
        (daemon.registry / "huge.json").write_text(
            json.dumps({**entry, "session_id": "huge", "labels": {"pad": "x" * 100_000}}))
        for name, mode, owner in (("foreign", 0o600, 4242), ("groupw", 0o620, 0)):
            path = daemon.registry / f"{name}.json"
            path.write_text(json.dumps({**entry, "session_id": name}))
            os.chmod(path, mode)
            if owner:
                os.chown(path, owner, owner)
        for name, text in (("garbage", "{not json"), ("nopid", '{"session_id": "nopid"}'),
                           ("deep", "[" * 100_000), ("badpid", '{"session_id": "badpid", "pid": -1}')):
            (daemon.registry / f"{name}.json").write_text(text)
        # Long enough for the startup grace, stall_after and recover_after, had any been tracked.
        time.sleep(6.0)
        assert daemon.sessions() == []
        assert victim.poll() is None
        dropped = [e for e in daemon.log_events() if e.get("event") == "source.untrusted"]
        assert len(dropped) == 2, dropped  # one line per spool file, not one per tick
    finally:
        daemon.cleanup()


unshare = shutil.which("unshare")


def run_in_pid_namespace(name: str, tmp: Path) -> dict[str, Any]:
    tmp.mkdir(mode=0o700, exist_ok=True)
    out = subprocess.run([unshare or "unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                          str(REPO / "tests" / "support" / "pidns_scenarios.py"), name, str(tmp)],
                         cwd=str(REPO), capture_output=True, timeout=90)
    lines = out.stdout.decode(errors="replace").strip().splitlines()
    assert out.returncode == 0 and lines, out.stderr.decode(errors="replace")[-3000:]
    return json.loads(lines[-1])  # type: ignore[no-any-return]


needs_pidns = pytest.mark.skipif(unshare is None or os.geteuid() != 0,
                                 reason="real PID reuse needs root and unshare")


@needs_pidns
def test_stale_registry_file_never_adopts_a_reused_pid(tmp_path: Path) -> None:
    got = run_in_pid_namespace("stale_registry", tmp_path / "ns")
    assert got["victim_pid"] == got["registered_pid"]  # a real reuse happened
    assert got["victim_alive"], got
    assert got["requested"] == 0, got
    assert got["ends"] == 1, got  # ended once, not re-created every exited_retention


@needs_pidns
def test_restart_mid_escalation_signals_nothing_after_pid_reuse(tmp_path: Path) -> None:
    got = run_in_pid_namespace("restart_mid_escalation", tmp_path / "ns")
    assert got["victim_alive"], got
    assert got["signals_after_restart"] == [], got


@needs_pidns
def test_pid1_and_the_daemon_itself_are_never_acted_on(tmp_path: Path) -> None:
    got = run_in_pid_namespace("pid1_and_self", tmp_path / "ns")
    assert got["requested"] == [], got
    assert got["daemon_alive"], got


def test_an_alias_never_ends_or_rekeys_another_session(tmp_path: Path, spawn: Any) -> None:
    """A POST naming a new id and a tracked pid makes an alias; a registry entry under that
    id for another process once ended the aliased session and restarted its history."""
    from otelwatch.config import parse_config
    from otelwatch.daemon import Watcher
    from otelwatch.sources.registry import register

    registry = tmp_path / "reg"
    registry.mkdir(mode=0o700)
    cfg = parse_config({
        "interval": 1, "state_dir": str(tmp_path / "state"),
        "sources": {"registry": {"dir": str(registry)}, "processes": {"enabled": False},
                    "tmux": {"enabled": False}, "transcripts": {"enabled": False}},
    })
    w = Watcher(cfg)
    try:
        a, b = spawn("sleeper"), spawn("sleeper")
        register(registry, {"session_id": "A", "pid": a.pid})
        w.tick()
        started = {s.session_id: s.started_at for s in w.sessions()}
        w.post_event({"session_id": "B", "type": "progress", "pid": a.pid})
        w.tick()
        register(registry, {"session_id": "B", "pid": b.pid})
        w.tick()
        w.tick()
        snaps = {s.session_id: s for s in w.sessions()}
        assert snaps["A"].state.value != "exited" and snaps["A"].started_at == started["A"]
        assert snaps["B"].pid == b.pid
    finally:
        w.stop()


FOREIGN_POST = """
import os, socket, sys
os.setgid(4242)
os.setuid(4242)
host, port = sys.argv[1], int(sys.argv[2])
body = b'{"session_id": "victim", "type": "turn_start"}'
s = socket.socket()
s.connect((host, port))
s.sendall(b"POST /api/events HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nContent-Type: application/json\\r\\n"
          b"Content-Length: " + str(len(body)).encode() + b"\\r\\nConnection: close\\r\\n\\r\\n" + body)
print(s.recv(4096).split(b"\\r\\n")[0].decode())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_other_users_cannot_post_events(tmp_path: Path) -> None:
    """The loopback listener is reachable by every local user; only otelwatch's own user,
    root and recovery.users may add events (the kernel says who owns the client's socket)."""
    daemon = start_daemon(tmp_path, {})
    try:
        port = daemon.url.rsplit(":", 1)[1]
        out = subprocess.run([sys.executable, "-c", FOREIGN_POST, "127.0.0.1", port], capture_output=True,
                             timeout=10, cwd="/")
        assert out.stdout.decode().strip().endswith("403 Forbidden"), out
        assert post(daemon, {"session_id": "victim", "type": "turn_start"}) == 202  # our own user may
        refused = [e for e in daemon.log_events() if e.get("event") == "http.refused"]
        assert any("uid 4242" in json.dumps(e) for e in refused), refused
    finally:
        daemon.cleanup()
