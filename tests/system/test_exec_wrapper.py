"""`otelwatch exec` with real child agents: byte-exact stdout, exit codes, signals, spool, stderr ring."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from otelwatch.sources.registry import RegistrySource
from otelwatch.sources.spool import spool_path
from tests.support.procs import REPO, wait_for

# Writes the same bytes to stdout and to a file, so the test can compare them exactly.
AGENT = r'''
import json, os, signal, sys, time
copy = open(sys.argv[1], "wb")
mode = sys.argv[2] if len(sys.argv) > 2 else "normal"
def out(b):
    copy.write(b); copy.flush()
    sys.stdout.buffer.write(b); sys.stdout.buffer.flush()
def line(o):
    out(json.dumps(o).encode() + b"\n")
if mode == "term":
    def on_term(signum, frame):
        open(sys.argv[3], "w").write("got TERM")
        sys.exit(7)
    signal.signal(signal.SIGTERM, on_term)
line({"type": "system", "subtype": "init", "session_id": "x"})
line({"type": "assistant", "message": {"content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash"}]}})
sys.stderr.write("warming up\n" * 3); sys.stderr.flush()
if mode == "term":
    print("ready", file=sys.stderr, flush=True)
    time.sleep(60)
if mode == "wait":
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.02)
if mode == "flood":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # like node or C agents, not like Python
    for i in range(100000):
        line({"type": "assistant", "n": i})
out(b"plain text \xff\xfe not utf-8\n")
line({"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]}})
sys.stderr.write("E" * 100000 + "last words\n")
line({"type": "result", "subtype": "success"})
out(b'{"type": "assistant", "no": "newline"}')
if mode == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(3)
'''


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OTELWATCH_STATE_DIR": str(tmp_path / "state"),
            "OTELWATCH_REGISTRY_DIR": str(tmp_path / "registry")}


@pytest.fixture
def agent(tmp_path: Path) -> Path:
    path = tmp_path / "agent.py"
    path.write_text(AGENT)
    return path


def wrapper(env: dict[str, str], *cmd: str, sid: str = "exec-test", **popen: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "otelwatch", "exec", "--session-id", sid, "--agent",
                             "fake", "--", *cmd], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **popen)  # type: ignore[call-overload]


def spool(env: dict[str, str], sid: str = "exec-test") -> list[dict]:
    path = spool_path(Path(env["OTELWATCH_STATE_DIR"]) / "events", sid)
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_stdout_byte_identical_exit_code_events_and_stderr_ring(env: dict[str, str], agent: Path,
                                                                 tmp_path: Path) -> None:
    copy = tmp_path / "copy.bin"
    proc = wrapper(env, sys.executable, str(agent), str(copy))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert out == copy.read_bytes()
    assert out.endswith(b'"newline"}') and b"\xff\xfe" in out
    assert err.startswith(b"warming up\n") and err.endswith(b"last words\n")

    recs = spool(env)
    assert [r["type"] for r in recs] == ["init", "tool_use", "line", "tool_result", "result", "assistant"]
    assert all(r["session_id"] == "exec-test" and r["agent"] == "fake" and r["source"] == "exec" for r in recs)
    assert recs[1]["tool_call"] == "open" and recs[3]["tool_call"] == "close" and recs[4]["turn"] == "close"
    assert len({r["pid"] for r in recs}) == 1 and recs[0]["pid"] != proc.pid  # the child's pid

    ring = (Path(env["OTELWATCH_STATE_DIR"]) / "exec" / "exec-test.stderr").read_bytes()
    assert len(ring) == 64 << 10 and ring.endswith(b"last words\n")
    # Unregistered at the end.
    assert RegistrySource(Path(env["OTELWATCH_REGISTRY_DIR"])).scan(0) == []


def test_registered_while_running(env: dict[str, str], agent: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    proc = wrapper(env, sys.executable, str(agent), str(tmp_path / "copy"), "wait", str(go))
    try:
        reg = RegistrySource(Path(env["OTELWATCH_REGISTRY_DIR"]))
        specs = wait_for(lambda: reg.scan(0), timeout=20)
        [spec] = specs  # type: ignore[misc]
        assert spec.session_id == "exec-test" and spec.agent == "fake" and spec.runtime.kind == "exec"
        assert spec.events_path == str(spool_path(Path(env["OTELWATCH_STATE_DIR"]) / "events", "exec-test"))
        assert spec.pid != proc.pid and spec.create_time is not None
        child_cmd = Path(f"/proc/{spec.pid}/cmdline").read_bytes()
        assert str(agent).encode() in child_cmd
    finally:
        go.write_text("go")
        proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert reg.scan(1) == []


def test_sigterm_forwarded_to_child(env: dict[str, str], agent: Path, tmp_path: Path) -> None:
    marker = tmp_path / "term"
    proc = wrapper(env, sys.executable, str(agent), str(tmp_path / "copy"), "term", str(marker))
    assert proc.stderr is not None
    for line in iter(proc.stderr.readline, b""):  # EOF: the wrapper died, the signal below fails
        if b"ready" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _out, _ = proc.communicate(timeout=30)
    assert marker.read_text() == "got TERM"
    assert proc.returncode == 7


def test_killed_child_gives_128_plus_signal(env: dict[str, str], agent: Path, tmp_path: Path) -> None:
    proc = wrapper(env, sys.executable, str(agent), str(tmp_path / "copy"), "sigkill")
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL


def test_reader_going_away_behaves_like_a_filter(env: dict[str, str], agent: Path, tmp_path: Path) -> None:
    proc = wrapper(env, sys.executable, str(agent), str(tmp_path / "copy"), "flood")
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b'{"type": "system"')
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGPIPE  # the agent met the closed pipe, as without us
    assert b"Traceback" not in err


def test_unwritable_dirs_warn_once_and_still_run(agent: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    env = {**os.environ, "OTELWATCH_STATE_DIR": str(blocker / "state"),
           "OTELWATCH_REGISTRY_DIR": str(blocker / "registry")}
    copy = tmp_path / "copy.bin"
    proc = wrapper(env, sys.executable, str(agent), str(copy))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3 and out == copy.read_bytes()
    warnings = [x for x in err.splitlines() if x.startswith(b"otelwatch exec: warning")]
    assert 1 <= len(warnings) <= 3  # registry, spool, stderr ring: each once
    assert len({w.split(b":")[2] for w in warnings}) == len(warnings)


def test_missing_command(env: dict[str, str], tmp_path: Path) -> None:
    proc = wrapper(env, str(tmp_path / "no-such-agent"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 127 and b"no-such-agent" in err
