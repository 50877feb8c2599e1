"""The registry directory: contract shape, garbage files, trust checks, caching, helpers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from otelwatch.model import Mode, Runtime
from otelwatch.sources.registry import RegistryRefused, RegistrySource, register, unregister

T = 1_700_000_000.0


@pytest.fixture
def regdir(tmp_path: Path) -> Path:
    d = tmp_path / "sessions"
    d.mkdir(mode=0o700)
    d.chmod(0o700)
    return d


def test_full_and_minimal_entries(regdir: Path) -> None:
    (regdir / "full.json").write_text(json.dumps({
        "session_id": "full", "pid": 1234, "agent": "claude-code", "events_path": "/abs/stream.jsonl",
        "mode": "interactive", "labels": {"team": "infra"}, "runtime": {"kind": "tmux", "target": "w:0.1"},
        "create_time": 1699999999.5, "future_field": [1, 2]}))
    (regdir / "min.json").write_text(json.dumps({"session_id": "min", "pid": 99}))
    specs = {s.session_id: s for s in RegistrySource(regdir).scan(T)}
    full, minimal = specs["full"], specs["min"]
    assert full.pid == 1234 and full.agent == "claude-code" and full.mode is Mode.INTERACTIVE
    assert full.events_path == "/abs/stream.jsonl" and full.labels == {"team": "infra"}
    assert full.runtime == Runtime("tmux", "w:0.1") and full.create_time == 1699999999.5
    assert full.source == "registry"
    assert minimal.mode is Mode.HEADLESS and minimal.agent == "unknown" and minimal.runtime is None


@pytest.mark.parametrize("content", [
    b"",
    b"{\"session_id\": \"x\", \"pid\": 1",  # partial write
    b"not json at all",
    b"[1, 2]",
    b"{\"pid\": 5}",
    b"{\"session_id\": \"x\"}",
    b"{\"session_id\": \"x\", \"pid\": \"5\"}",
    b"{\"session_id\": \"x\", \"pid\": true}",
    b"{\"session_id\": \"x\", \"pid\": -3}",
    b"{\"session_id\": \"x\", \"pid\": 5, \"mode\": \"sometimes\"}",
    b"{\"session_id\": \"x\", \"pid\": 5, \"labels\": {\"a\": 1}}",
    b"{\"session_id\": \"x\", \"pid\": 5, \"events_path\": \"relative.jsonl\"}",
    b"{\"session_id\": \"x\", \"pid\": 5, \"runtime\": \"tmux\"}",
    b"\xff\xfe\x00garbage",
])
def test_garbage_files_skipped_counted_logged_once(regdir: Path, content: bytes,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    (regdir / "bad.json").write_bytes(content)
    (regdir / "good.json").write_text(json.dumps({"session_id": "good", "pid": 7}))
    src = RegistrySource(regdir)
    with caplog.at_level(logging.WARNING, logger="otelwatch.sources.registry"):
        for i in range(3):
            assert [s.session_id for s in src.scan(T + i)] == ["good"]
    assert src.errors == 1 and "bad.json" in src.problems
    assert sum("bad.json" in r.getMessage() for r in caplog.records) == 1


def test_new_version_of_bad_file_logged_again_and_fix_clears_problem(regdir: Path) -> None:
    bad = regdir / "s.json"
    bad.write_text("{")
    src = RegistrySource(regdir)
    src.scan(T)
    bad.write_text("{{")  # another bad version (size changed)
    src.scan(T + 1)
    assert src.errors == 2
    bad.write_text(json.dumps({"session_id": "s", "pid": 3}))
    assert [s.pid for s in src.scan(T + 2)] == [3]
    assert src.problems == {}


def test_removed_file_ends_tracking(regdir: Path) -> None:
    path = register(regdir, {"session_id": "a", "pid": 11})
    src = RegistrySource(regdir)
    assert [s.session_id for s in src.scan(T)] == ["a"]
    path.unlink()
    assert src.scan(T + 1) == []


def test_unchanged_files_are_not_reread(regdir: Path) -> None:
    register(regdir, {"session_id": "a", "pid": 11})
    src = RegistrySource(regdir)
    first = src.scan(T)
    second = src.scan(T + 1)
    assert first[0] is second[0]  # the cached object: no read, no parse
    register(regdir, {"session_id": "a", "pid": 12})
    assert src.scan(T + 2)[0].pid == 12


def test_temp_files_symlinks_and_other_names_ignored(regdir: Path, tmp_path: Path) -> None:
    (regdir / ".a.tmp").write_text(json.dumps({"session_id": "tmp", "pid": 1}))
    (regdir / "notes.txt").write_text("hello")
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"session_id": "link", "pid": 1}))
    (regdir / "link.json").symlink_to(target)
    src = RegistrySource(regdir)
    assert src.scan(T) == [] and src.errors == 0


def test_creates_missing_dir_0700(tmp_path: Path) -> None:
    d = tmp_path / "a" / "sessions"
    src = RegistrySource(d)
    src.check()
    assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700


def test_refuses_group_or_world_writable_dir(regdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    register(regdir, {"session_id": "a", "pid": 11})
    regdir.chmod(0o777)
    src = RegistrySource(regdir)
    with pytest.raises(RegistryRefused, match="world-writable"):
        src.check()
    with caplog.at_level(logging.ERROR, logger="otelwatch.sources.registry"):
        assert src.scan(T) == [] and src.scan(T + 1) == []
    assert "chmod go-w" in src.refused
    assert sum("refusing" in r.getMessage() for r in caplog.records) == 1
    regdir.chmod(0o720)
    with pytest.raises(RegistryRefused):
        src.check()
    regdir.chmod(0o700)
    assert [s.session_id for s in src.scan(T + 2)] == ["a"] and src.refused == ""


def test_refuses_dir_of_another_user(regdir: Path) -> None:
    # Owning the directory as another user needs root; instead tell the source it runs as
    # another uid, which is the same comparison.
    src = RegistrySource(regdir, uid=os.geteuid() + 1)
    with pytest.raises(RegistryRefused, match="belongs to uid"):
        src.check()
    assert src.scan(T) == []


def test_register_is_atomic_and_sanitises_names(regdir: Path) -> None:
    path = register(regdir, {"session_id": "../../etc/passwd", "pid": 5, "agent": "x"})
    assert path.parent == regdir and ".." not in path.name
    assert [p.name for p in regdir.iterdir()] == [path.name]  # no temp file left behind
    assert [s.session_id for s in RegistrySource(regdir).scan(T)] == ["../../etc/passwd"]
    unregister(regdir, "../../etc/passwd")
    unregister(regdir, "../../etc/passwd")  # missing is fine
    assert list(regdir.iterdir()) == []


def test_register_validates(regdir: Path) -> None:
    with pytest.raises(ValueError, match="pid"):
        register(regdir, {"session_id": "a"})
    assert list(regdir.iterdir()) == []
