"""The shipped service setup against another user's real Claude Code TUI (issue #20).

root runs a real Claude Code TUI in its own tmux server and network namespace, next
to a fake API. Four `otelwatch run` daemons watch it at once, with zero
configuration (process matching, each agent's own HOME from its environment):

- `root`: the reference.
- `caps`: an unprivileged user (`hsvcwatch`) holding exactly the two capabilities the
  systemd unit grants (setpriv --inh-caps/--ambient-caps +dac_read_search,+sys_ptrace):
  must give the same verdicts as `root`.
- `nocaps`: the same user without them: blind (visibility denied, TCP and FDs null),
  never idle, and warns naming the fix.
- `notranscripts`: root with `[sources.transcripts] enabled = false` (what the
  Kubernetes ConfigMap used to ship): turns "disabled", never idle.

Phases: the TUI idle at its input box, then a prompt the fake API never answers
(an open turn on one ESTABLISHED socket). Every daemon's verdict of the TUI is
recorded every 0.25 s; the measured timelines are printed (pytest -s) for the
before/after table.

The unprivileged daemons run Python from root's pyenv: a private mount namespace
shows them a /root that only lets them reach `.pyenv` (nothing else of root's is
made readable), so the test needs root, `unshare -m` and `setpriv`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from e2e_support import http_get, to_toml
from procs import REPO, free_port, wait_for

from realagents.harness import base_env, require_real_agents
from realagents.tui import INPUT_BOX, Tui, claude_env, launch_tui, seed_home

pytestmark = [pytest.mark.real_agents, pytest.mark.timeout(240)]

USER = "hsvcwatch"
PORT = 18080  # the fake API's, inside the TUI's own network namespace
INTERVAL = 2.0  # a real TUI tree on a loaded 2-core box (load ~20 here) can take over 1 s to probe
STALL_AFTER = 8.0
STARTUP_GRACE = 2.0
CAPS = "+dac_read_search,+sys_ptrace"
FIX_WORDS = ("CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE")


def _require_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (a second user, setpriv, a mount namespace)")
    for tool in ("setpriv", "unshare", "useradd", "userdel", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


@pytest.fixture(scope="module")
def service_user() -> Iterator[tuple[int, int]]:
    _require_root_tools()
    created = False
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
                       check=True, timeout=30)
        created = True
        pw = pwd.getpwnam(USER)
    try:
        yield pw.pw_uid, pw.pw_gid
    finally:
        if created:
            subprocess.run(["userdel", USER], capture_output=True, timeout=30, check=False)


@dataclass
class Watch:
    """One daemon and what it said about the TUI, row by row: (time, session or None)."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    rows: list[tuple[float, dict[str, Any] | None]] = field(default_factory=list)

    def find(self, pid: int) -> dict[str, Any] | None:
        status, body = http_get(self.url + "/api/sessions", timeout=2)
        if status != 200:
            return None
        return next((s for s in json.loads(body) if s.get("pid") == pid), None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _start(name: str, base: Path, *, uid: int | None, caps: bool, transcripts: bool, pyenv_view: Path) -> Watch:
    home = base / name
    home.mkdir(mode=0o700)
    port = free_port()
    cfg = {"interval": INTERVAL, "probe_timeout": INTERVAL, "state_dir": str(home / "state"),
           "http": {"listen": f"127.0.0.1:{port}"},
           "classify": {"startup_grace": STARTUP_GRACE, "stall_after": STALL_AFTER},
           "sources": {"registry": {"enabled": False}, "transcripts": {"enabled": transcripts}}}
    (home / "otelwatch.toml").write_text(to_toml(cfg))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "PYTHONPATH": str(REPO),
           "TMUX_TMPDIR": str(home), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    argv = [sys.executable, "-m", "otelwatch", "run", "--config", str(home / "otelwatch.toml")]
    if uid is not None:
        for path in (home, *home.iterdir()):
            os.chown(path, uid, -1)
        drop = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups"]
        if caps:
            drop += [f"--inh-caps={CAPS}", f"--ambient-caps={CAPS}"]
        # In a private mount namespace, /root is a 0711 directory holding only root's .pyenv
        # (where this interpreter lives); everything else stays as it is.
        script = ('mount --bind /root/.pyenv "$0/.pyenv" && mount --rbind "$0" /root && exec "$@"')
        argv = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script, str(pyenv_view),
                *drop, "--", *argv]
    log = home / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT, env=env)
    watch = Watch(name, proc, f"http://127.0.0.1:{port}", log)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"daemon {name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            return http_get(watch.url + "/healthz", timeout=1)[0] == 200
        return False

    wait_for(up, timeout=30, interval=0.2)
    return watch


def _summary(rows: list[tuple[float, dict[str, Any] | None]], t0: float) -> list[str]:
    out: list[str] = []
    last = None
    for t, s in rows:
        key = None if s is None else (s["state"], s["reason"], json.dumps(s.get("tcp")), s.get("open_fds"),
                                      json.dumps(s.get("visibility")))
        if key != last:
            out.append(f"  {t - t0:6.1f}s  " + ("(not listed)" if s is None else
                       f"{s['state']}/{s['reason']} silence {s['silence_s']} tcp {s.get('tcp')} "
                       f"fds {s.get('open_fds')} visibility {s.get('visibility')} "
                       f"runtime {(s.get('runtime') or {}).get('target')}"))
            last = key
    return out


def test_service_user_sees_another_users_tui_as_root_does(service_user: tuple[int, int]) -> None:
    clis = require_real_agents()
    uid, _ = service_user
    base = Path(tempfile.mkdtemp(prefix="hsvc-daemons-"))
    os.chmod(base, 0o755)  # the daemons' own directories, each 0700 and owned by its daemon
    pyenv_view = base / "rootview"
    pyenv_view.mkdir(mode=0o711)
    (pyenv_view / ".pyenv").mkdir()
    root = Path(tempfile.mkdtemp(prefix="hsvc-tui-"))  # root's, 0700: another user's files
    home = root / "home"
    sock_dir = root / "tmux"
    sock_dir.mkdir(mode=0o700)
    seed_home(home, [root / "tui" / "cwd"])
    (root / "tui").mkdir(exist_ok=True)
    settings = root / "tui" / "settings.json"
    settings.write_text("{}")
    watches: dict[str, Watch] = {}
    tui: Tui | None = None
    stop = threading.Event()
    try:
        tui = launch_tui("tui", clis.claude, root, home=home, sock_dir=sock_dir, port=PORT,
                         args=["--settings", str(settings)], env=claude_env(base_env(home), PORT), lifetime=200)
        tui.wait_screen(INPUT_BOX, timeout=60)
        pid = tui.pane_pid()
        assert pid is not None
        watches = {
            "root": _start("root", base, uid=None, caps=False, transcripts=True, pyenv_view=pyenv_view),
            "caps": _start("caps", base, uid=uid, caps=True, transcripts=True, pyenv_view=pyenv_view),
            "nocaps": _start("nocaps", base, uid=uid, caps=False, transcripts=True, pyenv_view=pyenv_view),
            "notranscripts": _start("notranscripts", base, uid=None, caps=False, transcripts=False,
                                    pyenv_view=pyenv_view),
        }

        def record() -> None:
            while not stop.is_set():
                for w in watches.values():
                    with contextlib.suppress(OSError, ValueError):
                        w.rows.append((time.time(), w.find(pid)))
                stop.wait(0.25)

        recorder = threading.Thread(target=record, daemon=True)
        recorder.start()
        t0 = time.time()
        # Phase 1: idle at the input box for longer than stall_after.
        time.sleep(STARTUP_GRACE + STALL_AFTER + 3.0)
        t_prompt = tui.type("[fake:never_answer] hang")
        # Phase 2: the API never answers: the turn is open on one ESTABLISHED socket.
        time.sleep(STALL_AFTER + 8.0)
        stop.set()
        recorder.join(timeout=5)

        report = [f"TUI pid {pid}, prompt at {t_prompt - t0:.1f}s"]
        for w in watches.values():
            report += [f"{w.name}:", *_summary(w.rows, t0)]
        print("\n".join(report))

        def phase(name: str, lo: float, hi: float) -> list[dict[str, Any]]:
            return [s for t, s in watches[name].rows if s is not None and lo <= t < hi]

        idle_end, end = t_prompt, time.time()
        settled = t0 + STARTUP_GRACE + 2.0
        stalled_by = t_prompt + STALL_AFTER + 4.0
        why = "\n".join(report)
        # The reference: idle, then stalled on the network.
        for name in ("root", "caps"):
            idle = phase(name, settled, idle_end)
            assert idle and all((s["state"], s["reason"]) == ("idle", "no_open_turn") for s in idle), why
            hung = phase(name, stalled_by, end)
            assert hung and all((s["state"], s["reason"]) == ("stalled", "waiting_on_network") for s in hung), why
            assert all(s["visibility"] == {"turns": "ok", "sockets": "ok"} for s in hung), why
            assert all(s["user"] == "root" and s["uid"] == 0 for s in hung), why
            assert hung[-1]["tcp"].get("ESTABLISHED", 0) >= 1, why
            assert hung[-1]["runtime"]["socket"] == tui.socket, why
        # Same verdicts, row for row in the settled parts of each phase.
        for lo, hi in ((settled, idle_end), (stalled_by, end)):
            assert {(s["state"], s["reason"]) for s in phase("caps", lo, hi)} == \
                   {(s["state"], s["reason"]) for s in phase("root", lo, hi)}, why
        # Blind: never idle, numbers unknown (null, never 0), says why.
        blind = phase("nocaps", settled, end)
        assert blind, why
        # What the process alone proves (idle and hung alike draw 2-10% CPU): unknown, so
        # stalled/access_denied throughout, never idle, never active from CPU, never stuck.
        assert all((s["state"], s["reason"]) == ("stalled", "access_denied") for s in blind), why
        assert all(s["visibility"] == {"turns": "denied", "sockets": "denied"} for s in blind), why
        assert all(s["tcp"] is None and s["open_fds"] is None for s in blind), why
        log = watches["nocaps"].log.read_text()
        warnings = [json.loads(line) for line in log.splitlines() if '.blind"' in line]
        assert any(all(word in json.dumps(w) for word in FIX_WORDS) for w in warnings), log[-3000:]
        assert any(w.get("user") == "root" for w in warnings), log[-3000:]
        # Transcripts off: turns unknown ("disabled"), sockets read; never idle.
        off = phase("notranscripts", settled, end)
        assert off and all((s["state"], s["reason"]) == ("stalled", "access_denied") for s in off), why
        assert all(s["visibility"] == {"turns": "disabled", "sockets": "ok"} for s in off), why
        assert phase("notranscripts", stalled_by, end)[-1]["tcp"].get("ESTABLISHED", 0) >= 1, why
    finally:
        stop.set()
        for w in watches.values():
            w.stop()
        if tui is not None:
            tui.kill()
        shutil.rmtree(root, ignore_errors=True)
        if os.environ.get("HSVC_KEEP") is None:
            shutil.rmtree(base, ignore_errors=True)
