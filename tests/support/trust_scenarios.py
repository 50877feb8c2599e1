"""Who may speak for a session (issue 19): attacks run for real inside a fresh PID namespace.

`unshare --pid --fork --mount-proc python3 tests/support/trust_scenarios.py NAME DIR [ARGS]`
runs one scenario as PID 1 of a new PID namespace, with the real `otelwatch run`
daemon (recovery on, process discovery on) inside it: the daemon sees, and can
signal, only the processes of the namespace, so a wrong kill hits a victim of the
test and nothing else on the host. Victims are processes that name themselves
`claude` (a script of that name), found by discovery like a real Claude Code.
Other users (`hsec-*`) are created and removed by the test that runs this; their
uids come as arguments. The scenario prints one JSON object (its observations) as
the last line of stdout; the test asserts on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository root

from tests.support.e2e_support import Daemon, http_get, start_daemon
from tests.support.procs import REPO, wait_for

# An idle agent that listens on a port (a local server, an MCP endpoint: anyone can
# connect), burns a second of CPU on SIGUSR1 (what input it processes would cost), forks a
# short child on SIGUSR2. With "own-turn" it waits for a trigger file, then runs its own
# hook (`otelwatch hook claude`, UserPromptSubmit: an own event), works one second, and
# hangs: the real hang recovery is for.
VICTIM = r'''
import json, os, signal, socket, subprocess, sys, threading, time
port_file, mode = sys.argv[1], sys.argv[2]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(8)
with open(port_file + ".tmp", "w") as fh:
    fh.write(str(srv.getsockname()[1]))
os.rename(port_file + ".tmp", port_file)

def serve():
    while True:
        conn, _ = srv.accept()
        with conn:
            while conn.recv(4096):
                pass

threading.Thread(target=serve, daemon=True).start()
todo = []

def burn(*_):
    end = time.process_time() + 1.0
    while time.process_time() < end:
        pass

signal.signal(signal.SIGUSR1, burn)
signal.signal(signal.SIGUSR2, lambda *_: todo.append("fork"))
if mode == "own-turn":
    trigger = port_file + ".go"
    while not os.path.exists(trigger):
        time.sleep(0.05)
    payload = {"session_id": sys.argv[3], "hook_event_name": "UserPromptSubmit", "prompt": "go"}
    subprocess.run([os.environ["HSEC_PY"], "-m", "otelwatch", "hook", "claude"],
                   input=json.dumps(payload).encode(), timeout=20)
    burn()
while True:
    signal.pause()
    while todo:
        todo.pop()
        subprocess.Popen(["sleep", "0.3"]).wait()
'''

# Transcripts on: with them off every victim's turn information would be unread, and a
# session otelwatch is blind to is never idle (nor recoverable): the walls under test
# here are provenance and users, with the daemon able to read what it may.
RECOVERY: dict[str, Any] = {"recovery": {"enabled": True, "recover_after": 2, "grace": 0.5, "max_per_hour": 100},
            "sources": {"processes": {"enabled": True, "match": ["claude"]}, "transcripts": {"enabled": True}}}


def victim_bin(base: Path) -> Path:
    """The victim script, named `claude`, readable and runnable by every user."""
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    path = base / "claude"
    path.write_text("#!/usr/bin/python3\n" + VICTIM)
    os.chmod(path, 0o755)
    return path


def start_victim(exe: Path, work: Path, name: str, mode: str = "idle", *extra: str, uid: int | None = None,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int, Path]:
    """(process, port it listens on, its port file)."""
    ports = exe.parent.parent / "ports"  # every user's victims write their port here
    ports.mkdir(exist_ok=True)
    os.chmod(ports, 0o1777)
    port_file = ports / f"{name}.port"
    full_env = {"PATH": "/usr/bin:/bin", "HOME": str(work), **(env or {})}
    kw: dict[str, Any] = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    proc = subprocess.Popen([str(exe), str(port_file), mode, *extra], cwd=str(work), env=full_env,
                            stdout=subprocess.DEVNULL, start_new_session=True, **kw)
    wait_for(port_file.exists, timeout=15)
    return proc, int(port_file.read_text()), port_file


def session_of(daemon: Daemon, pid: int) -> dict[str, Any] | None:
    return next((s for s in daemon.sessions() if s["pid"] == pid), None)


def wait_session(daemon: Daemon, pid: int, state: str | None = None, timeout: float = 20) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        s = session_of(daemon, pid)
        return s if s is not None and (state is None or s["state"] == state) else None

    try:
        return wait_for(check, timeout=timeout, interval=0.2)  # type: ignore[return-value]
    except AssertionError:
        raise AssertionError(f"pid {pid} never {state}: {session_of(daemon, pid)}\n{daemon.log_tail(40)}") from None


def post(daemon: Daemon, payload: dict[str, Any], uid: int | None = None) -> int:
    """POST /api/events as `uid` (a child process of that user: the kernel says who sent it)."""
    code = ("import json,sys,urllib.request,urllib.error\n"
            "req=urllib.request.Request(sys.argv[1]+'/api/events',data=sys.argv[2].encode(),"
            "headers={'Content-Type':'application/json'},method='POST')\n"
            "try:\n print(urllib.request.urlopen(req,timeout=5).status)\n"
            "except urllib.error.HTTPError as e:\n print(e.code)\n")
    kw: dict[str, Any] = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    out = subprocess.run(["/usr/bin/python3", "-c", code, daemon.url, json.dumps(payload)], capture_output=True,
                         timeout=20, cwd="/", **kw)
    return int(out.stdout.decode().strip() or 0)


def connect_for(port: int, seconds: float, uid: int | None = None) -> None:
    """Any local user connects to the victim's port, holds the connection, closes it."""
    if uid is None:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            time.sleep(seconds)
        return
    code = f"import socket,time\ns=socket.create_connection(('127.0.0.1',{port}));time.sleep({seconds});s.close()"
    subprocess.run(["/usr/bin/python3", "-c", code], user=uid, group=uid, extra_groups=[], timeout=20, cwd="/")


def requested(daemon: Daemon) -> list[int]:
    return [int(e.get("pid", 0)) for e in daemon.log_events() if e.get("event") == "recovery_requested"]


def completed(daemon: Daemon, pid: int) -> list[str]:
    s = session_of(daemon, pid)
    return [r.get("status", "") for r in (s or {}).get("recoveries", []) if r.get("step") == "completed"]


# --------------------------------------------------------------------------- scenarios


def outsiders(tmp: Path) -> dict[str, Any]:
    """Cases 1-3 of the issue (a forged turn start, then a connection, CPU, a fork), a
    forged turn start alone, a Ctrl-Z'd session; and in the same run the positive side:
    a truly hung headless session and an interactive one hung inside its own turn."""
    exe = victim_bin(tmp / "bin")
    work = tmp / "work"
    work.mkdir(mode=0o755, exist_ok=True)
    daemon = start_daemon(tmp / "d", RECOVERY)
    env = {"HSEC_PY": sys.executable, "PYTHONPATH": str(REPO), "OTELWATCH_STATE_DIR": str(daemon.state_dir)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        ports: dict[str, int] = {}
        for name, mode, extra in (("connect", "idle", ()), ("cpu", "idle", ()), ("fork", "idle", ()),
                                  ("forged_only", "idle", ()), ("stopped", "idle", ()),
                                  ("headless", "idle", ("-p",)), ("own_turn", "own-turn", ("own-sid",))):
            proc, port, _ = start_victim(exe, work, name, mode, *extra, env=env)
            procs[name], ports[name] = proc, port
            daemon.agents.append(proc)
        for name in ("connect", "cpu", "fork", "forged_only", "stopped", "own_turn"):
            wait_session(daemon, procs[name].pid, "idle")
        statuses = {name: post(daemon, {"session_id": f"forged-{name}", "hook_event_name": "UserPromptSubmit",
                                        "pid": procs[name].pid})
                    for name in ("connect", "cpu", "fork", "forged_only", "stopped")}
        procs["stopped"].send_signal(signal.SIGSTOP)
        (tmp / "ports" / "own_turn.port.go").touch()
        connect_for(ports["connect"], 1.5)
        procs["cpu"].send_signal(signal.SIGUSR1)
        procs["fork"].send_signal(signal.SIGUSR2)
        for name in ("headless", "own_turn"):
            wait_for(lambda n=name: completed(daemon, procs[n].pid), timeout=40, interval=0.2)  # type: ignore[misc]
        # Longer than stall_after + recover_after again: any wrong kill had its chance.
        time.sleep(6.0)
        out = {"posted": statuses,
               "alive": {name: p.poll() is None for name, p in procs.items()},
               "requested": sorted(name for name, p in procs.items() if p.pid in requested(daemon)),
               "completed": {name: completed(daemon, p.pid) for name, p in procs.items()},
               "states": {name: (session_of(daemon, p.pid) or {}).get("state") for name, p in procs.items()},
               # Provenance as /api/sessions shows it: (type, own) of each session's events.
               "events": {name: [(e["type"], bool(e.get("own"))) for e in
                                 (session_of(daemon, p.pid) or {}).get("recent_events", [])]
                          for name, p in procs.items()}}
        procs["stopped"].send_signal(signal.SIGCONT)
        return out
    finally:
        daemon.cleanup()


def cross_user(tmp: Path, alice: int, bob: int) -> dict[str, Any]:
    """Case 4: daemon as root, recovery.users = [alice, bob]. Alice POSTs a turn start naming
    bob's pid, then connects to bob's listening port."""
    exe = victim_bin(tmp / "bin")
    work = tmp / "bob"
    work.mkdir(mode=0o755, exist_ok=True)
    os.chown(work, bob, bob)
    extra: dict[str, Any] = {**RECOVERY, "recovery": {**RECOVERY["recovery"], "users": [str(alice), str(bob)]}}
    daemon = start_daemon(tmp / "d", extra)
    try:
        victim, port, _ = start_victim(exe, work, "victim", uid=bob)
        daemon.agents.append(victim)
        wait_session(daemon, victim.pid, "idle")
        status = post(daemon, {"session_id": "alice-says", "hook_event_name": "UserPromptSubmit",
                               "pid": victim.pid}, uid=alice)
        own = post(daemon, {"session_id": "bob-says", "hook_event_name": "Notification"}, uid=bob)
        # Naming bob's session by its id instead: accepted (202), applied to nothing of bob's.
        bob_sid = wait_session(daemon, victim.pid)["session_id"]
        by_id = post(daemon, {"session_id": bob_sid, "hook_event_name": "UserPromptSubmit"}, uid=alice)
        connect_for(port, 1.5, uid=alice)
        time.sleep(10.0)  # stall_after + recover_after + grace, twice over
        events = [e["type"] for e in (session_of(daemon, victim.pid) or {}).get("recent_events", [])]
        return {"alice_post": status, "bob_post": own, "alive": victim.poll() is None,
                "alice_by_id": by_id, "bob_events": events,
                "requested": requested(daemon), "state": (session_of(daemon, victim.pid) or {}).get("state"),
                "refused_logged": any("another user's process" in json.dumps(e) for e in daemon.log_events())}
    finally:
        daemon.cleanup()


def planted_files(tmp: Path, mallory: int, with_fifo: bool) -> dict[str, Any]:
    """The FIFO denial of service and both leaks: mallory (any local user) runs processes
    named claude; one's session file is a FIFO, one's transcript a symlink to root's 0600
    transcript, one's HOME a directory she does not own (the daemon's own home has root's
    transcript for her working directory). A root session in that directory must keep it."""
    exe = victim_bin(tmp / "bin")
    daemon_home = tmp / "daemon-home"
    shared_cwd = tmp / "project"
    shared_cwd.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(tmp, 0o755)
    proj = "".join(c if c.isalnum() else "-" for c in str(shared_cwd))
    roots = daemon_home / ".claude" / "projects" / proj
    roots.mkdir(parents=True)
    secret = roots / "root-session.jsonl"
    secret.write_text(json.dumps({"type": "user", "message": {"role": "user", "content": "ROOT-SECRET-PROMPT"},
                                  "timestamp": "2026-12-07T00:00:00Z"}) + "\n" + json.dumps(
        {"type": "assistant", "timestamp": "2026-12-07T00:00:01Z", "message": {"role": "assistant", "content": [
            {"type": "text", "text": "ROOT-SECRET-ANSWER"},
            {"type": "tool_use", "id": "t1", "name": "RootSecretTool", "input": {}}]}}) + "\n")
    os.chmod(secret, 0o600)
    # Mallory's own home, with her transcript for her cwd a symlink to root's transcript.
    mhome = tmp / "mallory"
    (mhome / ".claude" / "sessions").mkdir(parents=True)
    mwork = mhome / "work"
    mwork.mkdir()
    mproj = mhome / ".claude" / "projects" / "".join(c if c.isalnum() else "-" for c in str(mwork))
    mproj.mkdir(parents=True)
    for d in [mhome, *mhome.rglob("*")]:
        os.chown(d, mallory, mallory)
        os.chmod(d, 0o755)
    extra: dict[str, Any] = {**RECOVERY, "sources": {**RECOVERY["sources"], "transcripts": {"enabled": True}}}
    daemon = start_daemon(tmp / "d", extra, env={"HOME": str(daemon_home)})
    try:
        fifo_agent, _, _ = start_victim(exe, mwork, "fifo", uid=mallory, env={"HOME": str(mhome)})
        daemon.agents.append(fifo_agent)
        fifo = mhome / ".claude" / "sessions" / f"{fifo_agent.pid}.json"
        if with_fifo:
            subprocess.run(["/usr/bin/python3", "-c", f"import os; os.mkfifo({str(fifo)!r})"], user=mallory,
                           group=mallory, extra_groups=[], check=True, cwd="/")
        link_agent, _, _ = start_victim(exe, mwork, "link", uid=mallory, env={"HOME": str(mhome)})
        daemon.agents.append(link_agent)
        link = mproj / "stolen.jsonl"
        subprocess.run(["/usr/bin/python3", "-c", f"import os; os.symlink({str(secret)!r}, {str(link)!r})"],
                       user=mallory, group=mallory, extra_groups=[], check=True, cwd="/")
        os.utime(secret)  # fresh: a transcript written since her agent started
        homeless, _, _ = start_victim(exe, shared_cwd, "homeless", uid=mallory, env={"HOME": str(daemon_home)})
        daemon.agents.append(homeless)
        # Health and ticks over a few seconds while the FIFO is there.
        t0, ticks0 = time.monotonic(), daemon_health(daemon)["ticks"]
        codes = []
        for _ in range(10):
            codes.append(http_get(daemon.url + "/healthz", timeout=3)[0])
            time.sleep(0.4)
        elapsed, ticks = time.monotonic() - t0, daemon_health(daemon)["ticks"] - ticks0
        states = {name: (session_of(daemon, p.pid) or {}).get("state")
                  for name, p in (("fifo", fifo_agent), ("link", link_agent), ("homeless", homeless))}
        # Root's own session in that directory: it, and only it, may have root's transcript.
        mine, _, _ = start_victim(exe, shared_cwd, "root", env={"HOME": str(daemon_home)})
        daemon.agents.append(mine)
        os.utime(secret)  # written after root's agent started, as its own transcript would be
        with contextlib.suppress(AssertionError):
            wait_for(lambda: (session_of(daemon, mine.pid) or {}).get("recent_events"), timeout=15, interval=0.3)
        time.sleep(2.0)
        def leaked(pid: int) -> bool:
            text = json.dumps(session_of(daemon, pid))
            return "ROOT-SECRET" in text or "RootSecretTool" in text

        by = {"symlink": leaked(link_agent.pid), "home": leaked(homeless.pid), "fifo": leaked(fifo_agent.pid)}
        return {"healthz": codes, "ticks": ticks, "elapsed": elapsed, "interval": 0.5, "states": states,
                "leaked": any(by.values()), "leaked_by": by,
                "root_has_it": "RootSecretTool" in json.dumps(session_of(daemon, mine.pid))}
    finally:
        daemon.cleanup()


def daemon_health(daemon: Daemon) -> dict[str, Any]:
    _, body = http_get(daemon.url + "/healthz", timeout=5)
    out: dict[str, Any] = json.loads(body)
    return out


def fifo(tmp: Path, mallory: int) -> dict[str, Any]:
    return planted_files(tmp, mallory, with_fifo=True)


def leaks(tmp: Path, mallory: int) -> dict[str, Any]:
    """The leaks alone (without the FIFO, which on the old code stalls everything)."""
    return planted_files(tmp, mallory, with_fifo=False)


SCENARIOS = {"outsiders": outsiders, "cross_user": cross_user, "fifo": fifo, "leaks": leaks}

if __name__ == "__main__":
    assert os.getpid() == 1, "run me inside `unshare --pid --fork --mount-proc`"
    args = [int(a) for a in sys.argv[3:]]
    result = SCENARIOS[sys.argv[1]](Path(sys.argv[2]), *args)  # type: ignore[operator]
    print(json.dumps(result), flush=True)
