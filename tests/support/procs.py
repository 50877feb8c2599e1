"""Real processes for tests: spawn fake agents and local servers, always cleaned up.

Use through the fixtures in conftest.py (`spawn`, `tcp_server`, `tcp_server6`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from otelwatch.fake_agents import SilentServer as TcpServer  # noqa: F401 - re-exported for tests

FAKE = [sys.executable, "-m", "otelwatch.fake_agents"]
REPO = Path(__file__).resolve().parents[2]
# The probe backend the verdict and recovery suites run with ([probe] backend): scripts/test
# runs them a second time with OTELWATCH_TEST_PROBE_BACKEND=psutil.
PROBE_BACKEND = os.environ.get("OTELWATCH_TEST_PROBE_BACKEND", "auto")


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> object:
    """Poll predicate until it returns something truthy; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def require_binary(name: str) -> str:
    """Path of a binary tests need. Missing: fail on CI (it must be installed), skip locally."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is required on CI but not installed (.ci/run should install it)")
    pytest.skip(f"{name} not installed")
    raise AssertionError  # unreachable


class Spawner:
    """Starts processes in their own process group and kills every group at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, *args: str, ready: bool = False, fake: bool = True, lifetime: float = 120.0,
                 **popen: object) -> subprocess.Popen[bytes]:
        """Start `python -m otelwatch.fake_agents ARGS` (or ARGS itself with fake=False).

        ready=True waits for the first line on stdout (kinds that print when set up).
        """
        argv = [*FAKE, *args, "--lifetime", str(lifetime)] if fake else list(args)
        popen.setdefault("stdout", subprocess.PIPE if ready else subprocess.DEVNULL)
        popen.setdefault("cwd", str(REPO))
        proc = subprocess.Popen(argv, start_new_session=True, **popen)  # type: ignore[call-overload]
        self.procs.append(proc)
        if ready:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, f"{argv} exited before it was ready"
            proc.ready_line = line.decode().strip()
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.stdout:
                proc.stdout.close()


def free_port() -> int:
    """A loopback port free right now (bind to 0, read it back, release it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listener_in_own_netns(spawn: Spawner) -> subprocess.Popen[bytes]:
    """A fake agent listening on a port in a network namespace of its own (`unshare -n`),
    once it is in there: its socket is in no table our namespace can read. Skips
    without root or unshare."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root to make a network namespace")
    agent = spawn(unshare, "-n", *FAKE, "listen", "--lifetime", "60", fake=False, ready=True)
    own_ns = os.readlink("/proc/self/ns/net")
    wait_for(lambda: os.readlink(f"/proc/{agent.pid}/ns/net") != own_ns, timeout=5)
    return agent
