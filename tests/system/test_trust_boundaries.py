"""Who may speak for a session (issue 19), with real processes, real users and real signals.

Each case the issue measured runs as an attacker would run it, against the real daemon
inside its own PID namespace (tests/support/trust_scenarios.py), with recovery on and thresholds
of seconds: the four wrong kills (a forged turn start followed by a connection to the
victim's port, by input that makes it burn CPU, by a fork; and another user's forged
turn start naming bob's process), the FIFO that stalled the loop, the two leaks of
root's transcript, and in the same runs the positive side (a hung headless session and
an interactive one hung inside its own turn are recovered; a Ctrl-Z'd one never).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("useradd") is None or os.geteuid() != 0,
    reason="needs root, unshare and useradd")]



def run_scenario(name: str, base: Path, *args: int) -> dict[str, Any]:
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                          str(REPO / "tests" / "support" / "trust_scenarios.py"), name, str(base), *map(str, args)],
                         cwd=str(REPO), capture_output=True, timeout=150)
    lines = out.stdout.decode(errors="replace").strip().splitlines()
    assert out.returncode == 0 and lines, out.stderr.decode(errors="replace")[-4000:]
    got: dict[str, Any] = json.loads(lines[-1])
    return got


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every test user can traverse (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="hsec-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_user(name: str) -> int:
    subprocess.run(["userdel", name], capture_output=True)  # a leftover of an interrupted run
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    return int(subprocess.run(["id", "-u", name], check=True, capture_output=True).stdout)


@pytest.fixture
def users() -> Iterator[dict[str, int]]:
    names = ("hsec-alice", "hsec-bob")
    made: dict[str, int] = {}
    try:
        for name in names:
            made[name] = make_user(name)
        yield made
    finally:
        for name in made:
            subprocess.run(["pkill", "-KILL", "-u", str(made[name])], capture_output=True)
            subprocess.run(["userdel", name], capture_output=True)


def test_outsiders_never_open_the_recovery_gate_but_real_hangs_are_recovered(base: Path) -> None:
    got = run_scenario("outsiders", base)
    assert got["posted"] == {n: 202 for n in ("connect", "cpu", "fork", "forged_only", "stopped")}, got
    # Cases 1-3, the forged turn start alone, Ctrl-Z: alive and never even requested.
    for name in ("connect", "cpu", "fork", "forged_only", "stopped"):
        assert got["alive"][name], (name, got)
        assert name not in got["requested"], (name, got)
    # The positive side, in the same run: both hangs recovered (SIGTERM was enough).
    assert got["completed"]["headless"] == ["terminated"], got
    assert got["completed"]["own_turn"] == ["terminated"], got
    assert sorted(got["requested"]) == ["headless", "own_turn"], got
    # The victim's own hook (run inside its tree, checked on the hook socket) is own; every
    # forged turn start over HTTP is observed.
    assert ["UserPromptSubmit", True] in got["events"]["own_turn"], got["events"]
    assert not any(own for name in ("connect", "cpu", "fork", "forged_only", "stopped")
                   for _, own in got["events"][name]), got["events"]


def test_another_users_pid_is_refused_and_bob_survives(base: Path, users: dict[str, int]) -> None:
    got = run_scenario("cross_user", base, users["hsec-alice"], users["hsec-bob"])
    assert got["alice_post"] == 403, got  # naming bob's process: refused whatever recovery.users says
    assert got["bob_post"] == 202, got  # bob may still speak (for himself, observed)
    assert got["refused_logged"], got
    assert got["alice_by_id"] == 202 and "UserPromptSubmit" not in got["bob_events"], got
    assert got["alive"] and got["requested"] == [], got


def test_a_planted_fifo_never_stalls_the_loop(base: Path, users: dict[str, int]) -> None:
    got = run_scenario("fifo", base, users["hsec-alice"])
    assert all(code == 200 for code in got["healthz"]), got  # healthz stays 200 while the FIFO is there
    # Ticks on time: at least 60% of the interval's worth over the measured span.
    assert got["ticks"] >= 0.6 * got["elapsed"] / got["interval"], got
    assert all(state not in (None, "starting") for state in got["states"].values()), got
    assert not got["leaked"], got


def test_symlinked_transcript_and_a_home_not_ones_own_leak_nothing(base: Path, users: dict[str, int]) -> None:
    got = run_scenario("leaks", base, users["hsec-alice"])
    # No line of root's transcript under mallory's sessions: neither through the symlink in
    # her projects directory nor through her agent's HOME that is not hers.
    assert got["leaked_by"] == {"symlink": False, "home": False, "fifo": False}
    assert got["root_has_it"], got  # root's own session still claims its transcript
    assert all(code == 200 for code in got["healthz"]), got
