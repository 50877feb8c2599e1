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

Phases: the TUI idle at its input box; a prompt the fake API never answers (an
open turn on one ESTABLISHED socket); Esc and a prompt whose answer is a Bash tool
call, which asks for permission (permissions.defaultMode "default"); yes, and
the tool (a 600 s sleep) runs. Every daemon's verdict of the TUI is
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

from tests.e2e.realagents.harness import base_env, require_real_agents
from tests.e2e.realagents.tui import INPUT_BOX, Tui, claude_env, launch_tui, seed_home
from tests.support.e2e_support import http_get, to_toml
from tests.support.procs import REPO, free_port, wait_for

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
        argv = [*drop, "--", *argv]
        if sys.executable.startswith("/root/.pyenv/"):
            # In a private mount namespace, /root is a 0711 directory holding only root's .pyenv
            # (where this interpreter lives); everything else stays as it is.
            script = 'mount --bind /root/.pyenv "$0/.pyenv" && mount --rbind "$0" /root && exec "$@"'
            argv = ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script, str(pyenv_view), *argv]
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
                                      json.dumps(s.get("visibility")), len(s.get("children") or ()))
        if key != last:
            out.append(f"  {t - t0:6.1f}s  " + ("(not listed)" if s is None else
                       f"{s['state']}/{s['reason']} silence {s['silence_s']} tcp {s.get('tcp')} "
                       f"fds {s.get('open_fds')} cpu {s.get('cpu_percent')} children {len(s.get('children') or ())} "
                       f"visibility {s.get('visibility')} "
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
    settings.write_text(json.dumps({"permissions": {"defaultMode": "default"}}))
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
        time.sleep(STALL_AFTER + 30.0)
        t_esc = tui.keys("Escape", what="Esc")
        time.sleep(0.5)
        tui.keys("C-u", what="empty the input box")
        # Phase 3: a Bash tool call waits for a person's permission.
        tui.type("[fake:tool_bash] run it")
        tui.wait_screen("Do you want to proceed", timeout=40)
        t_permission = tui.mark("permission prompt on screen")
        time.sleep(14.0)
        # Phase 4: allowed; the tool runs (silently, for longer than stall_after).
        t_tool = tui.keys("Enter", what="yes")
        time.sleep(STALL_AFTER + 16.0)
        stop.set()
        recorder.join(timeout=5)

        report = [f"TUI pid {pid}, prompt at {t_prompt - t0:.1f}s, permission prompt at {t_permission - t0:.1f}s, "
                  f"tool allowed at {t_tool - t0:.1f}s"]
        for w in watches.values():
            report += [f"{w.name}:", *_summary(w.rows, t0)]
        print("\n".join(report))

        def phase(name: str, lo: float, hi: float) -> list[dict[str, Any]]:
            return [s for t, s in watches[name].rows if s is not None and lo <= t < hi]

        def settles(name: str, lo: float, hi: float, want: tuple[str, str], within: float) -> list[dict[str, Any]]:
            """The rows of [lo, hi) from the first `want` on: it came within `within` s and then held.
            A stalled session may read probe_timeout on a tick whose probe overran (this box's
            load reaches 30 on 2 cores): the same state, and still never idle or active."""
            ok = {want, (want[0], "probe_timeout")} if want[0] == "stalled" else {want}
            rows = [(t, s) for t, s in watches[name].rows if s is not None and lo <= t < hi]
            hit = next((i for i, (_, s) in enumerate(rows) if (s["state"], s["reason"]) == want), None)
            assert hit is not None and rows[hit][0] <= lo + within, f"{name}: no {want} in time\n{why}"
            after = [s for _, s in rows[hit:]]
            assert all((s["state"], s["reason"]) in ok for s in after), f"{name}: left {want}\n{why}"
            return after

        why = "\n".join(report)
        # Edges come late on this loaded 2-core box (a tick, a probe, the TUI's own redraw):
        # each verdict must come within its bound after its cause and then hold.
        edge = 4 * INTERVAL + 16.0  # measured up to 13 s from a typed prompt to its first sign at load ~25
        settled = t0 + STARTUP_GRACE + 2.0
        phases = [  # (from, to, the reference verdict, its bound)
            (settled, t_prompt, ("idle", "no_open_turn"), edge),
            (t_prompt, t_esc, ("stalled", "waiting_on_network"), STALL_AFTER + edge),
            (t_permission, t_tool, ("idle", "awaiting_input"), edge),
            (t_tool, time.time(), ("long_running", "tool_running"), STALL_AFTER + edge),
        ]
        # The reference and the capable service user: the same verdicts, phase by phase.
        for name in ("root", "caps"):
            for lo, hi, want, within in phases:
                settles(name, lo, hi, want, within)
            hung = settles(name, *phases[1][:3], STALL_AFTER + edge)
            assert all(s["visibility"] == {"turns": "ok", "sockets": "ok"} for s in hung), why
            assert all(s["user"] == "root" and s["uid"] == 0 for s in hung), why
            assert any((s["tcp"] or {}).get("ESTABLISHED", 0) >= 1 for s in hung), why
            assert hung[-1]["runtime"]["socket"] == tui.socket, why
        # Blind: never idle, numbers unknown (null, never 0), says why.
        end = phases[-1][1]
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
        # (sockets None only before its first readable sample: a probe timeout says nothing)
        assert all(s["visibility"]["turns"] == "disabled" and s["visibility"]["sockets"] in ("ok", None)
                   for s in off), why
        assert any((s["tcp"] or {}).get("ESTABLISHED", 0) >= 1 for s in phase("notranscripts", t_prompt, t_esc)), why
    finally:
        stop.set()
        for w in watches.values():
            w.stop()
        if tui is not None:
            tui.kill()
        shutil.rmtree(root, ignore_errors=True)
        if os.environ.get("HSVC_KEEP") is None:
            shutil.rmtree(base, ignore_errors=True)
