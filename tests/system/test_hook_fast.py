"""The hook's lean path (`otelwatch.sources.hookpath`): the same records as the model's, and cheap imports."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otelwatch.config import Config, default_paths
from otelwatch.probe.proctable import read_boot_time, read_proc
from otelwatch.sources import hookpath
from otelwatch.sources.payloads import payload_to_event
from otelwatch.sources.spool import make_record
from tests.support.procs import REPO

T = 1_700_000_000.0

PAYLOADS: list[dict[str, object]] = [
    {"hook_event_name": name, "session_id": "s", "tool_name": "Bash", "tool_use_id": "toolu_1"}
    for name in sorted(hookpath.HOOK_NAMES | {"FutureHook"})
]
PAYLOADS += [
    {"hook_event_name": "Notification", "notification_type": "permission_prompt"},
    {"hook_event_name": "Notification", "message": "Claude needs your permission to use Bash"},
    {"hook_event_name": "Notification", "message": "  a   long\tmessage " * 40},
    {"hook_event_name": "Stop", "reason": "done"},
    {"hook_event_name": "PreToolUse", "tool_name": "x" * 500, "tool_use_id": 7},
    {"hook_event_name": "UserPromptSubmit", "time": T - 30},
    {"hook_event_name": "UserPromptSubmit", "time": T + 30},
    {"type": "progress"}, {"type": "heartbeat"}, {"type": "retry"}, {"type": "waiting"},
    {"type": "turn_start"}, {"type": "turn_end"}, {"type": "tool_start", "tool": "make"},
    {"type": "tool_end", "tool": "make", "tool_id": "t9"}, {"type": "Stop"},
    {"type": "Notification", "notification_type": "idle_prompt"},
    {"type": " compiled ", "detail": "d" * 300}, {"type": "PreToolUse", "tool": "Edit"},
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: str(p.get("hook_event_name") or p.get("type")))
def test_lean_record_equals_the_models(payload: dict[str, object]) -> None:
    t, fields = hookpath.payload_fields(payload, T)
    lean = hookpath.make_record(hookpath.event_json(t, fields, "hook"), "sid", pid=42, agent="claude-code",
                                create_time=1.5)
    full = make_record(payload_to_event(payload, T, "hook"), "sid", pid=42, agent="claude-code", create_time=1.5)
    assert lean == full
    assert json.dumps(lean)  # a record is plain JSON


@pytest.mark.parametrize("env", [
    {"HOME": "/home/u"},
    {"HOME": "/home/u", "XDG_STATE_HOME": "/xdg/state"},
    {"HOME": "/home/u", "XDG_STATE_HOME": "/xdg/state", "OTELWATCH_STATE_DIR": "/srv/ow"},
    {"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1000"},
])
def test_spool_dir_is_the_configs(env: dict[str, str]) -> None:
    assert Path(hookpath.spool_dir(env)) == default_paths(Config(), env).spool_dir
    assert Path(hookpath.state_dir(env)) == default_paths(Config(), env).state_dir


def test_read_stat_agrees_with_the_process_table() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        boot = read_boot_time()
        for pid in (os.getpid(), sleeper.pid):
            info = read_proc(pid, boot_time=boot)
            assert info is not None
            assert hookpath.read_stat(pid, boot) == (info.comm, info.ppid, info.create_time, info.start_ticks)
            assert hookpath.pid_identity(pid) == (round(info.create_time, 2), info.start_ticks)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert hookpath.read_stat(sleeper.pid, boot) is None  # reaped: gone


def _imports(argv: list[str], data: bytes, env: dict[str, str]) -> set[str]:
    r = subprocess.run(argv, input=data, capture_output=True, env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
                       cwd=REPO, timeout=60, check=False)
    assert r.returncode == 0
    return {line.rsplit("|", 1)[1].strip() for line in r.stderr.decode().splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def test_hook_imports_only_the_lean_path(tmp_path: Path) -> None:
    env = {**os.environ, "OTELWATCH_STATE_DIR": str(tmp_path)}
    data = json.dumps({"session_id": "imp", "hook_event_name": "PreToolUse", "tool_name": "Bash"}).encode()
    hook = _imports([sys.executable, "-m", "otelwatch", "hook", "claude"], data, env)
    bare = _imports([sys.executable, "-c", "pass"], b"", env)
    ours = {m for m in hook if m.split(".")[0] == "otelwatch"}
    assert ours <= {"otelwatch", "otelwatch.cli", "otelwatch.commands", "otelwatch.commands.hook",
                    "otelwatch.sources", "otelwatch.sources.hookpath", "otelwatch.__main__"}, ours
    added = {m.split(".")[0] for m in hook - bare}
    for heavy in ("opentelemetry", "psutil", "argparse", "logging", "tomllib", "dataclasses", "enum", "pathlib"):
        assert heavy not in added, f"the hook imports {heavy}"
    assert (tmp_path / "events" / "imp.jsonl").exists()  # and it still recorded the event


def test_hook_costs_little_more_than_the_interpreter(tmp_path: Path) -> None:
    # Interleaved with `python -c pass` so that the machine's load hits both alike; the
    # budget is generous (a loaded shared host), the benchmark gives the real figures.
    import compileall

    import otelwatch

    compileall.compile_dir(os.path.dirname(otelwatch.__file__), quiet=1)  # as pip install does
    env = {**os.environ, "OTELWATCH_STATE_DIR": str(tmp_path)}
    data = json.dumps({"session_id": "t", "hook_event_name": "Stop"}).encode()
    hook: list[float] = []
    bare: list[float] = []
    for _ in range(9):
        for argv, out in (([sys.executable, "-m", "otelwatch", "hook", "claude"], hook),
                          ([sys.executable, "-c", "pass"], bare)):
            start = time.perf_counter()
            subprocess.run(argv, input=data, capture_output=True, env=env, cwd=REPO, timeout=60, check=True)
            out.append(time.perf_counter() - start)
    extra = statistics.median(hook) - statistics.median(bare)
    print(f"\nhook {statistics.median(hook) * 1e3:.0f} ms, python -c pass {statistics.median(bare) * 1e3:.0f} ms")
    assert extra < 0.060, f"the hook adds {extra * 1e3:.0f} ms to the interpreter's start"
