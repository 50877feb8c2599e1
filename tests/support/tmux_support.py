"""A real, private tmux server for tests: its own socket laid out like tmux's default
directory ($TMUX_TMPDIR/tmux-UID/), one pane whose shell outlives a fake agent.

The `tmux_server` fixture in conftest.py wraps `running_tmux_server()`; it is
always killed, and SIGCONT'd first in case a test froze it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.procs import require_binary

AGENT = f"{sys.executable} -c 'import time; time.sleep(300)' fake-agent"


class Server:
    def __init__(self, tmux: str, sock: str) -> None:
        self.tmux = tmux
        self.sock = sock

    def run(self, *args: str) -> str:
        out = subprocess.run([self.tmux, "-S", self.sock, *args], capture_output=True, timeout=10,
                             check=True, env={**os.environ, "TERM": "xterm"})
        return out.stdout.decode().strip()


@contextlib.contextmanager
def running_tmux_server() -> Iterator[Server]:
    tmux = require_binary("tmux")
    # Short path: unix socket paths are limited to ~107 bytes. Laid out like tmux's own
    # default directory so discovery through TMUX_TMPDIR is exercised too.
    base = tempfile.mkdtemp(prefix="owt-tmux-")
    sockdir = Path(base) / f"tmux-{os.geteuid()}"
    sockdir.mkdir(mode=0o700)
    srv = Server(tmux, str(sockdir / "default"))
    pid = None
    try:
        # The pane runs a shell that outlives the agent, like a person's pane does.
        srv.run("-f", "/dev/null", "new-session", "-d", "-s", "w", "-x", "80", "-y", "24",
                f"sh -c \"{AGENT}; sleep 300\"")
        pid = int(srv.run("display-message", "-p", "#{pid}"))
        yield srv
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        subprocess.run([tmux, "-S", srv.sock, "kill-server"], capture_output=True, timeout=10, check=False)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
