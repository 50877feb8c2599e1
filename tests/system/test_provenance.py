"""The pieces of issue 19 one at a time, with real processes and files: the hook socket
(peer credentials and ancestry), the POST wall between users, agents' files opened
without blocking, following or trusting another user, and process identity from start
ticks that a wall-clock step does not move (hook records and the recovery state file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from otelwatch.model import Event, ProcessIdentity
from otelwatch.probe.proctable import create_time_of, read_boot_time, read_proc
from otelwatch.recovery.state import StateFile
from otelwatch.sources.hook_socket import HookSocket, ancestry, send
from otelwatch.sources.inbox import Inbox
from otelwatch.sources.tail import FileTail, NotOwned, NotRegularFile, open_owned
from otelwatch.sources.transcripts import TranscriptLocator
from tests.support.e2e_support import start_daemon
from tests.support.procs import REPO, wait_for

BOOT = read_boot_time()


# --------------------------------------------------------------------------- the hook socket


def test_ancestry_is_the_chain_of_live_parents_as_the_probe_sees_them(tmp_path: Path) -> None:
    # agent (python) -> sh -> sleep: the sleep's ancestry runs through sh to the agent.
    agent = subprocess.Popen([sys.executable, "-c", "import subprocess; subprocess.run(['sh', '-c', 'sleep 20; :'])"])
    try:
        def chain_to_leaf() -> list[int] | None:
            mid = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
            leaf = subprocess.run(["pgrep", "-P", mid[0]], capture_output=True, text=True).stdout.split() if mid else []
            return [int(leaf[0]), int(mid[0])] if leaf else None

        found = wait_for(chain_to_leaf, timeout=10)
        assert isinstance(found, list)
        chain = ancestry(found[0], BOOT)
        assert [c[0].pid for c in chain[:3]] == [*found, agent.pid]
        assert [c[1] for c in chain[:2]] == ["sleep", "sh"]
        info = read_proc(agent.pid, boot_time=BOOT)
        assert info is not None and chain[2][0] == info.identity  # exactly the probe's identity
        assert ancestry(4_000_000, BOOT) == []  # no such process: nothing
    finally:
        agent.kill()
        agent.wait()


def test_the_socket_checks_the_peer_when_the_event_arrives(tmp_path: Path) -> None:
    got: list[tuple[Any, tuple[ProcessIdentity, ...], int]] = []
    path = tmp_path / "hook.sock"
    def deliver(payload: Any, who: tuple[ProcessIdentity, ...], uid: int) -> bool:
        got.append((payload, who, uid))
        return True

    sock = HookSocket(path, BOOT, deliver, lambda *a: None).start()
    try:
        assert os.stat(path).st_mode & 0o777 == (0o666 if os.geteuid() == 0 else 0o600)
        # An agent runs a hook (its child) that sends: the hook's ancestry, read from the
        # kernel's peer credentials and /proc, runs through that agent.
        hook = ("import sys; from pathlib import Path; from otelwatch.sources.hook_socket import send; "
                "sys.exit(0 if send([Path(sys.argv[1])], {'session_id': 's', 'type': 'turn_start'}) else 3)")
        code = ("import os, subprocess, sys\nprint(os.getpid(), flush=True)\n"
                f"subprocess.run([sys.executable, '-c', {hook!r}, sys.argv[1]], check=True)\n")
        agent = subprocess.run([sys.executable, "-c", code, str(path)], cwd=str(REPO), capture_output=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30)
        assert agent.returncode == 0, agent.stderr
        payload, who, uid = got[0]
        assert payload == {"session_id": "s", "type": "turn_start"} and uid == os.geteuid()
        assert [p.pid for p in who[1:2]] == [int(agent.stdout.split()[0])]
        assert who[-1].pid <= os.getpid() or len(who) > 2  # and on up the tree
        # A socket that is not there, or a message too big, is never delivered.
        assert not send([tmp_path / "nothing.sock"], {"session_id": "x"})
        assert not send([path], {"session_id": "x", "type": "y" * (70 << 10)})
        assert len(got) == 1
    finally:
        sock.shutdown()
    assert not path.exists()


def test_a_hook_event_is_own_only_for_a_session_whose_root_it_ran_under() -> None:
    from otelwatch.model import SessionSpec
    from otelwatch.sessions.table import Tracked, _settled

    me = read_proc(os.getpid(), boot_time=BOOT)
    assert me is not None
    ours = Tracked("a", SessionSpec("a", pid=me.pid), 0.0, identity=me.identity)
    other = Tracked("b", SessionSpec("b", pid=1), 0.0, identity=ProcessIdentity(1, 1.0))
    event = Event(1.0, "UserPromptSubmit", turn="open", tree=(ProcessIdentity(me.pid + 1, 5.0), me.identity))
    settled = _settled(ours, event)
    assert settled is not None and settled.own and settled.tree == ()
    assert not getattr(_settled(other, event), "own", True)
    # A PID reused by another process: not in the tree.
    reused = Tracked("c", SessionSpec("c", pid=me.pid), 0.0, identity=ProcessIdentity(me.pid, me.create_time + 1))
    assert not getattr(_settled(reused, event), "own", True)
    # A posted event applies only to a session of the user who posted it (root: any).
    posted = Event(1.0, "Stop", turn="close", poster_uid=os.geteuid() + 1)
    assert _settled(ours, posted) is None
    assert _settled(ours, replace(posted, poster_uid=0)) is not None
    assert _settled(ours, replace(posted, poster_uid=os.geteuid())) is not None


# --------------------------------------------------------------------------- users are walls


def test_post_naming_another_users_pid_is_refused() -> None:
    inbox = Inbox(time.time, lambda: None)
    payload = {"session_id": "x", "type": "turn_start", "pid": 1}  # PID 1: root's
    with pytest.raises(PermissionError):
        inbox.post(payload, uid=54321)
    with pytest.raises(PermissionError):
        inbox.post(payload, uid=-1)  # nobody can tell who sent it
    with pytest.raises(PermissionError):
        inbox.post({**payload, "pid": 4_000_000}, uid=54321)  # no such process: nobody's
    assert len(inbox) == 0
    assert inbox.post(payload, uid=0) == ["x"]  # root may speak for any
    assert inbox.post({**payload, "pid": os.getpid()}, uid=os.geteuid()) == ["x"]
    assert inbox.post({"session_id": "y", "type": "turn_start"}, uid=54321) == ["y"]  # no pid: observed only


# --------------------------------------------------------------------------- agents' files


def test_agent_files_are_never_followed_blocked_on_or_taken_from_another_user(tmp_path: Path) -> None:
    regular = tmp_path / "t.jsonl"
    regular.write_text('{"type": "assistant"}\n')
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    link = tmp_path / "link.jsonl"
    link.symlink_to(regular)
    me = os.geteuid()
    with open_owned(regular, (me,)) as fh:
        assert fh.read() == b'{"type": "assistant"}\n'
    t0 = time.monotonic()
    with pytest.raises(NotRegularFile):
        open_owned(fifo, (me,))  # no writer: a blocking open would wait for ever
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(OSError):
        open_owned(link, (me,))  # ELOOP: never through a symlink
    with pytest.raises(NotOwned):
        open_owned(regular, (me + 1,))
    # A tail of an agent's file: a symlink or another user's file yields nothing, and is own when read.
    assert FileTail(link, owners=(me,), own=True).poll(time.time())[0] == []
    assert FileTail(regular, owners=(me + 1,), own=True).poll(time.time())[0] == []
    events, _ = FileTail(regular, owners=(me,), own=True).poll(time.time())
    assert events and all(e.own for e in events)


def test_a_fifo_session_file_is_not_read_and_never_blocks(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".claude" / "sessions").mkdir(parents=True)
    os.mkfifo(home / ".claude" / "sessions" / "4242.json")
    locator = TranscriptLocator(home)
    done = threading.Event()

    def read() -> None:
        locator.claude_session(4242)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(2.0), "reading a FIFO session file blocked"
    assert locator.claude_session(4242) is None


# --------------------------------------------------------------------------- one clock


def test_the_state_file_keeps_identities_across_a_clock_step() -> None:
    now = time.time()
    ident = [4242, 1000.0 + 123.45]  # written with boot time 1000.0
    data = {"version": 1, "boot_time": 1000.0, "recoveries": [], "given_up": [ident],
            "escalations": [{"session_id": "s", "pid": 4242, "create_time": ident[1], "step": "sigterm",
                             "time": now, "snapshot": [ident]}]}
    # The wall clock stepped 20 s forward since: /proc/stat's btime moved with it.
    state = StateFile.parse(data, now, boot_time=1020.0)
    assert state.given_up == [ProcessIdentity(4242, 1020.0 + 123.45)]
    assert state.escalations[0].identity == ProcessIdentity(4242, 1020.0 + 123.45)
    assert state.escalations[0].snapshot == (ProcessIdentity(4242, 1020.0 + 123.45),)
    # Older files (no boot_time) are read as they are.
    old = {k: v for k, v in data.items() if k != "boot_time"}
    assert StateFile.parse(old, now, boot_time=1020.0).given_up == [ProcessIdentity(4242, 1123.45)]
    assert create_time_of(12345, 1000.0) == 1000.0 + 12345 / os.sysconf("SC_CLK_TCK")


STEPPED = """
import otelwatch.sources.hookpath as p
_real = p._boot_time
def _boot_time():
    return _real() + 20.0  # the wall clock stepped 20 s after the daemon started
p._boot_time = _boot_time
"""


@pytest.mark.e2e
def test_a_wall_clock_step_after_the_daemon_started_ends_no_hook_session(tmp_path: Path) -> None:
    """The hook reads btime fresh; the daemon keeps its own. A hook run after a 20 s step
    (injected: btime + 20, as /proc/stat would show it) once recorded a create time 20 s
    off, and the session showed exited/process_exited at once while alive."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(STEPPED)
    daemon = start_daemon(tmp_path / "d")
    agent = subprocess.Popen(["sleep", "60"])
    try:
        env = {**os.environ, "OTELWATCH_STATE_DIR": str(daemon.state_dir),
               "PYTHONPATH": f"{inject}{os.pathsep}{REPO}"}
        subprocess.run([sys.executable, "-m", "otelwatch", "event", "stepped", "heartbeat", "--pid",
                        str(agent.pid)], cwd=str(REPO), env=env, check=True, timeout=20)
        rec = json.loads((daemon.state_dir / "events" / "stepped.jsonl").read_text().splitlines()[-1])
        info = read_proc(agent.pid)
        assert info is not None and abs(rec["create_time"] - info.create_time - 20.0) < 1.5  # the step is real
        snap = daemon.wait_state("stepped", "idle", timeout=15)
        time.sleep(2.0)
        snap = daemon.session("stepped") or {}
        assert snap.get("state") not in ("exited", None), snap
        assert abs(snap["create_time"] - info.create_time) < 0.05, snap
    finally:
        agent.kill()
        agent.wait()
        daemon.cleanup()


@pytest.mark.e2e
def test_the_exec_wrappers_stream_is_own_and_a_hook_record_beside_it_is_not(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "d")
    env = {**os.environ, "OTELWATCH_STATE_DIR": str(daemon.state_dir), "OTELWATCH_REGISTRY_DIR": str(daemon.registry),
           "PYTHONPATH": str(REPO)}
    line = json.dumps({"type": "assistant", "message": {"role": "assistant", "content": [{"type": "text",
                                                                                         "text": "hi"}]}})
    child = f"import time; print({line!r}, flush=True); time.sleep(30)"
    wrapper = subprocess.Popen([sys.executable, "-m", "otelwatch", "exec", "--session-id", "ex", "--mode",
                                "interactive", "--", sys.executable, "-c", child], cwd=str(REPO), env=env,
                               stdout=subprocess.DEVNULL, start_new_session=True)
    daemon.agents.append(wrapper)
    try:
        def seen() -> list[dict[str, Any]] | None:
            snap = daemon.session("ex")
            return snap["recent_events"] if snap and snap["recent_events"] else None

        events = wait_for(seen, timeout=20, interval=0.2)
        assert isinstance(events, list) and all(e.get("own") for e in events), events
        # The same user's `otelwatch event ex turn_start --pid P` beside it: observed.
        snap = daemon.session("ex")
        assert snap is not None
        subprocess.run([sys.executable, "-m", "otelwatch", "event", "other", "turn_start", "--pid",
                        str(snap["pid"])], cwd=str(REPO), env=env, check=True, timeout=20)
        later = wait_for(lambda: [e for e in (daemon.session("ex") or {}).get("recent_events", [])
                                  if e["type"] == "turn_start"], timeout=15, interval=0.2)
        assert isinstance(later, list) and not any(e.get("own") for e in later), later
    finally:
        daemon.cleanup()
