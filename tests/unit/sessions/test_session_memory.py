"""session_memory.SessionMemory: what a restarted daemon takes back, and what it refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path

from otelwatch.model import Mode, ProcessIdentity, Reason, SessionSpec, State, Verdict
from otelwatch.sessions.memory import MAX_ENTRIES, SessionMemory
from otelwatch.sessions.table import Tracked

NOW = 1_700_000_000.0


def _tracked(pid: int = 4242, create_time: float = NOW - 900, key: str = "s") -> Tracked:
    t = Tracked(key=key, spec=SessionSpec(key, pid, mode=Mode.HEADLESS), started_at=create_time)
    t.identity = ProcessIdentity(pid, create_time)
    return t


def _saved(tmp_path: Path) -> SessionMemory:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    mem = SessionMemory(state / "sessions.json")
    old = _tracked()
    old.verdict = Verdict(State.STALLED, Reason.WAITING_ON_NETWORK, 420.0)
    old.state_since, old.stalls, old.longest_silence = NOW - 120, 2, 420.0
    assert mem.save([old, _tracked(pid=5, key="gone")], NOW, force=True)  # no verdict yet: not saved
    return mem


def test_a_restart_takes_back_silence_state_and_counts(tmp_path: Path) -> None:
    mem = _saved(tmp_path)
    assert os.stat(mem.path).st_mode & 0o777 == 0o600
    assert [e["key"] for e in json.loads(mem.path.read_text())["sessions"]] == ["s"]
    fresh = SessionMemory(mem.path)
    assert fresh.load(NOW + 60) == 1
    new = _tracked()
    assert fresh.restore([new]) == [new]
    assert new.activity.last_progress_time == NOW - 420  # silence began there, not at the restart
    assert new.verdict is not None and (new.verdict.state, new.verdict.reason) == (State.STALLED,
                                                                                    Reason.WAITING_ON_NETWORK)
    assert (new.state_since, new.stalls, new.longest_silence) == (NOW - 120, 2, 420.0)
    assert fresh.restore([new]) == []  # once per session


def test_a_reused_pid_inherits_nothing(tmp_path: Path) -> None:
    mem = _saved(tmp_path)
    fresh = SessionMemory(mem.path)
    fresh.load(NOW + 60)
    other = _tracked(create_time=NOW - 10)  # same pid, another process
    assert fresh.restore([other]) == []
    assert other.activity.last_progress_time is None and other.verdict is None


def test_untrusted_or_broken_files_are_refused(tmp_path: Path) -> None:
    mem = _saved(tmp_path)
    os.chmod(mem.path, 0o666)
    refused = SessionMemory(mem.path)
    assert refused.load(NOW) == 0 and "writable" in refused.problem
    os.chmod(mem.path, 0o600)
    assert SessionMemory(mem.path, uid=os.geteuid() + 1).load(NOW) == 0  # not otelwatch's user's
    link = mem.path.with_name("link.json")
    link.symlink_to(mem.path)
    assert SessionMemory(link).load(NOW) == 0  # never through a symlink
    mem.path.write_text('{"version": 1, "sessions": [{"pid": "x"}, ' + json.dumps(
        {"pid": 7, "create_time": NOW, "key": "k", "silence_since": NOW, "state": "no-such-state",
         "reason": "x", "state_since": NOW, "stalls": 0, "longest_silence": 0, "saved_at": NOW}) + "]}")
    os.chmod(mem.path, 0o600)
    assert SessionMemory(mem.path).load(NOW) == 0  # bad entries dropped, the loop goes on
    mem.path.write_text("{not json")
    assert SessionMemory(mem.path).load(NOW) == 0


def test_saves_are_bounded_and_throttled(tmp_path: Path) -> None:
    mem = _saved(tmp_path)
    many = []
    for i in range(MAX_ENTRIES + 50):
        t = _tracked(pid=10_000 + i, key=f"k{i}")
        t.verdict = Verdict(State.ACTIVE, Reason.RECENT_PROGRESS, 1.0)
        many.append(t)
    assert not mem.save(many, NOW + 0.5)  # within SAVE_EVERY_S of the last save
    assert mem.save(many, NOW + 10)
    assert len(json.loads(mem.path.read_text())["sessions"]) == MAX_ENTRIES
