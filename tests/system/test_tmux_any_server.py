"""Every pane on any server (issue #20): real tmux servers on sockets in two different
directories, neither in the daemon's own `$TMUX_TMPDIR`, found through each agent's own
`TMUX` / `TMUX_PANE`; same-named sessions on both never collide; a pane on a killed
server is no runtime.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otelwatch.config import parse_config
from otelwatch.daemon import Watcher
from otelwatch.model import tmux_attach_command
from tests.support.procs import require_binary, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def two_dirs() -> Iterator[tuple[str, list[str]]]:
    """(tmux binary, [socket in dir A, socket in dir B]); both servers killed at the end."""
    tmux = require_binary("tmux")
    dirs = [tempfile.mkdtemp(prefix="hsvc-a-"), tempfile.mkdtemp(prefix="hsvc-b-")]
    socks = [os.path.join(d, "sock") for d in dirs]
    try:
        yield tmux, socks
    finally:
        for sock in socks:
            subprocess.run([tmux, "-S", sock, "kill-server"], capture_output=True, timeout=10, check=False)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _watcher(tmp: Path, mark: str) -> Watcher:
    cfg = parse_config({"interval": 0.5, "probe_timeout": 0.4, "state_dir": str(tmp / "state"),
                        "classify": {"startup_grace": 0, "stall_after": 30},
                        "sources": {"registry": {"enabled": False}, "transcripts": {"enabled": False},
                                    "processes": {"match": [f"cmdline:^{re.escape(sys.executable)} -c .*{mark}"]},
                                    "tmux": {"timeout": 2}}})
    return Watcher(cfg, log_stream=io.StringIO())


def _ignores_sighup(pid: int) -> bool:
    """Whether pid has set SIGHUP to ignored (/proc/PID/status SigIgn, signal 1 = bit 0)."""
    with open(f"/proc/{pid}/status") as fh:
        line = next(x for x in fh if x.startswith("SigIgn:"))
    return bool(int(line.split()[1], 16) & 1 << (signal.SIGHUP - 1))


def test_same_named_sessions_on_two_servers_and_a_killed_server(
        tmp_path: Path, two_dirs: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    tmux, socks = two_dirs
    monkeypatch.setenv("TMUX_TMPDIR", str(tmp_path / "none"))  # the daemon's own socket dir: empty
    mark = f"hsvc-{os.getpid()}-pane"
    # An agent that ignores SIGHUP survives `tmux kill-server` (as Gemini's TUI did).
    agent = (f"{sys.executable} -c 'import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
             f"time.sleep(300)' {mark}")
    for sock in socks:
        subprocess.run([tmux, "-S", sock, "-f", "/dev/null", "new-session", "-d", "-s", "lab", "-x", "80",
                        "-y", "24", agent], check=True, timeout=10, env={**os.environ, "TERM": "xterm"})
    w = _watcher(tmp_path, mark)

    def ours() -> dict[str, Any]:
        w.tick()
        return {s.runtime.socket: s for s in w.sessions() if s.runtime is not None and s.runtime.socket in socks}

    agents: list[int] = []
    try:
        found = wait_for(lambda: (m := ours()) and set(m) == set(socks) and m, timeout=20, interval=0.2)
        runtimes = {sock: found[sock].to_json()["runtime"] for sock in socks}  # type: ignore[index]
        for sock in socks:
            assert runtimes[sock] == {"kind": "tmux", "target": "lab:0.0", "socket": sock,
                                      "attach": tmux_attach_command(sock, "lab:0.0")}
            assert runtimes[sock]["attach"] == f"tmux -S {sock} attach -t lab:0.0"
        agents = [found[sock].pid for sock in socks]  # type: ignore[index]
        assert len(set(agents)) == 2  # two agents, two runtimes: no collision
        # Found as soon as it runs; a loaded box may not have let it ignore SIGHUP yet
        # (one such agent died of the kill below and rightly read exited).
        wait_for(lambda: all(_ignores_sighup(pid) for pid in agents), timeout=20, interval=0.1)

        # Kill the first server: its agent lives on (SIGHUP ignored), its pane does not.
        subprocess.run([tmux, "-S", socks[0], "kill-server"], capture_output=True, timeout=10, check=False)

        def after_kill() -> dict[int, Any] | None:
            w.tick()
            by_pid = {s.pid: s for s in w.sessions() if s.pid in agents}
            dead = by_pid.get(agents[0])
            if dead is None or dead.runtime is not None:
                return None
            return by_pid

        by_pid = wait_for(after_kill, timeout=15, interval=0.2)
        assert by_pid[agents[0]].state.value != "exited"  # type: ignore[index]
        assert by_pid[agents[0]].to_json()["runtime"] is None  # type: ignore[index]
        assert by_pid[agents[1]].runtime.socket == socks[1]  # type: ignore[index]
    finally:
        w.stop()
        for pid in agents:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
