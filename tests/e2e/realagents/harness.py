"""Running real agent CLIs under a real otelwatch daemon and recording what it says.

Owns: finding the installed CLIs (scripts/install-real-agents), starting one
scenario (a CLI next to a fake API, inside its own network namespace, Claude
Code under `otelwatch exec` or bare, Codex bare), the daemon's test
config, a recorder that polls `/api/sessions` and keeps every session's
(time, state, reason, cpu, tcp) rows, the checks of a scenario's timeline
against its target verdicts, and killing every process a scenario started.

What it must never do: run a CLI outside a network namespace of its own, leave
a process behind (a Bash tool's children run in their own session, so trees
are collected by parent pid, stopped, then killed), or sleep where it can poll.
Reusable for the interactive TUI later: `launch_in_netns` takes any argv.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
DEFAULT_AGENTS_DIR = "/opt/otelwatch-real-agents"
FAKE_PORT = 18080  # every namespace has its own loopback, so one port serves all
POLL_S = 1.0  # how often the recorder reads /api/sessions
HEARTBEATS = frozenset({"tool_progress", "system/api_retry", "system/status"})  # DESIGN.md: never progress

# The daemon as a person would run it, with seconds instead of minutes where the
# scenario budget needs it: stall_after 30, default CPU thresholds, recovery on
# (dry run: this host may run other people's agents) with a short recover_after
# so that a wrong decision shows as a recovery record within the window.
INTERVAL = 5.0
STALL_AFTER = 30.0
STARTUP_GRACE = 5.0
DAEMON_CONFIG: dict[str, Any] = {
    "interval": INTERVAL,
    "probe_timeout": 2.0,
    "classify": {"startup_grace": STARTUP_GRACE, "stall_after": STALL_AFTER, "tool_stall_after": 1800,
                 "repeat_base": 60, "repeat_max": 3600, "exited_retention": 600},
    "recovery": {"enabled": True, "dry_run": True, "recover_after": 10},
    "sources": {"processes": {"enabled": True}, "tmux": {"enabled": True}, "transcripts": {"enabled": True}},
}


# --------------------------------------------------------------------------- the CLIs


@dataclass(frozen=True)
class Clis:
    claude: str
    codex: str  # codex.js, run with node


def agents_dir() -> Path:
    return Path(os.environ.get("OTELWATCH_REAL_AGENTS_DIR") or DEFAULT_AGENTS_DIR)


def _unavailable(reason: str) -> None:
    """On CI a missing CLI is a failure (the suite must run there); locally a skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"real agents required on CI: {reason}", pytrace=False)
    pytest.skip(f"real agents unavailable: {reason}")


def require_real_agents() -> Clis:
    """The installed CLIs and a usable `unshare -n`; skips locally / fails on CI otherwise."""
    base = agents_dir()
    claude, codex = base / "bin" / "claude", base / "bin" / "codex"
    hint = "run scripts/install-real-agents"
    if not (claude.exists() and os.access(claude, os.X_OK)):
        _unavailable(f"no Claude Code binary at {claude} ({hint})")
    if not codex.exists():
        _unavailable(f"no Codex at {codex} ({hint})")
    if shutil.which("node") is None:
        _unavailable("node is not installed (Codex's wrapper needs it)")
    unshare = shutil.which("unshare")
    if unshare is None:
        _unavailable("unshare (util-linux) is not installed")
    else:
        probe = subprocess.run([unshare, "-n", "--", "true"], capture_output=True, timeout=10)
        if probe.returncode != 0:
            _unavailable(f"cannot create a network namespace (unshare -n: {probe.stderr.decode().strip()}); "
                         "the agents must never run on the host network")
    return Clis(claude=str(claude), codex=str(codex))


# --------------------------------------------------------------------------- process trees


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree(root: int, kids: Mapping[int, Sequence[int]] | None = None) -> set[int]:
    """root and all its live descendants (by parent pid, so other sessions and groups count too)."""
    kids = _children_map() if kids is None else kids
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo.extend(kids.get(pid, ()))
    return {p for p in out if os.path.exists(f"/proc/{p}")}


def kill_tree(root: int) -> None:
    """Stop the whole tree (a stopped process cannot fork), then kill every member."""
    for _ in range(5):
        pids = tree(root)
        if not pids:
            return
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids | tree(root):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)


def namespace_tcp(pid: int) -> dict[str, int]:
    """TCP states counted over pid's whole network namespace (/proc/PID/net/tcp{,6}), LISTEN included:
    what a prober that did not match sockets to the process would wrongly report."""
    names = {"01": "ESTABLISHED", "02": "SYN_SENT", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}
    counts: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as fh:
            for line in fh.readlines()[1:]:
                st = line.split()[3]
                counts[names.get(st, st)] = counts.get(names.get(st, st), 0) + 1
    return counts


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] != b"Z"


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Expect:
    """A scenario's target verdict timeline.

    `settle`: the (state, reason) the session must reach within stall_after + 1
    interval of its last progress, and then keep without a single change until
    `final` (or the end of the observation). `final`: the verdict it must end in
    (and keep). `seen`: a verdict it must show at least once before. `rc`: the
    CLI's exit status. `tcp`: the TCP counts it must report while settled.
    """

    settle: tuple[str, str] | None = None
    final: tuple[str, str] | None = None
    seen: tuple[str, str] | None = None
    rc: int | None = None
    tcp: Mapping[str, int] | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    agent: str  # "claude" | "codex"
    behaviour: str  # a fakeapi behaviour
    expect: Expect
    cli_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    tool_command: str = "sleep 600"
    stream_seconds: float = 0.0
    # Claude Code under `otelwatch exec` (registered, stdout as events), or bare: found by
    # process discovery, with its transcript under the shared HOME as its event stream.
    wrapped: bool = True

    @property
    def session_id(self) -> str:
        return f"ra-{self.name}"

    @property
    def prompt(self) -> str:
        # A marker in the root's cmdline says whose process it is in `ps` and in reports.
        return f"otelwatch-realagents {self.name}: say hello"


@dataclass
class Line:
    t: float  # wall time it was read
    obj: dict[str, Any] | None
    raw: str

    @property
    def kind(self) -> str:
        obj = self.obj or {}
        typ = str(obj.get("type", ""))
        return f"{typ}/{obj['subtype']}" if typ == "system" and obj.get("subtype") else typ

    @property
    def heartbeat(self) -> bool:
        return self.kind in HEARTBEATS


class Launched:
    """One scenario's process tree: unshare -> netns runner -> (fake API, CLI [under otelwatch exec])."""

    def __init__(self, scenario: Scenario, proc: subprocess.Popen[bytes], workdir: Path, info_path: Path) -> None:
        self.scenario = scenario
        self.proc = proc
        self.workdir = workdir
        self.info_path = info_path
        self.started = time.time()
        self.lines: list[Line] = []
        self.exited_at: float | None = None
        self.session_ids: set[str] = {scenario.session_id}  # the daemon's ids for this tree, once seen
        self._reader = threading.Thread(target=self._read, name=f"stdout-{scenario.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                obj = json.loads(text)
            except ValueError:
                obj = None
            self.lines.append(Line(time.time(), obj if isinstance(obj, dict) else None, text))
        self.proc.wait()
        self.exited_at = time.time()

    @property
    def info(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return None

    @property
    def rc(self) -> int | None:
        return self.proc.poll()

    def live_pids(self, kids: Mapping[int, Sequence[int]] | None = None) -> set[int]:
        return tree(self.proc.pid, kids) if self.proc.poll() is None else set()

    def agent_root(self) -> int | None:
        """The CLI's root process: claude itself (under the exec wrapper), or Codex's node wrapper."""
        info = self.info
        if info is None:
            return None
        child = int(info["child_pid"])
        if self.scenario.agent != "claude" or not self.scenario.wrapped:
            return child
        kids = _children_map().get(child, [])
        return kids[0] if kids else None

    def progress_times(self) -> list[float]:
        return [ln.t for ln in self.lines if not ln.heartbeat]

    def stderr_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "stderr").read_text(errors="replace")[-n:]
        return ""

    def api_log(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in (self.workdir / "api.log").read_text().splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def kill(self) -> None:
        kill_tree(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._reader.join(timeout=5)


def launch_in_netns(argv: Sequence[str], *, server_args: Sequence[str], env: Mapping[str, str], cwd: Path,
                    stderr_path: Path, info_path: Path) -> subprocess.Popen[bytes]:
    """Start `argv` beside a fake API (`server_args`) in a new network namespace.

    stdout is a pipe (the caller reads it); stderr goes to `stderr_path`. The
    process leads its own session, and `kill_tree` ends everything under it."""
    cmd = ["unshare", "-n", "--", sys.executable, "-m", "tests.e2e.realagents.netns",
           "--server-json", json.dumps(list(server_args)), "--info", str(info_path), "--", *argv]
    with open(stderr_path, "wb") as err:
        return subprocess.Popen(cmd, env=dict(env), cwd=str(cwd), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, start_new_session=True)


def base_env(home: Path) -> dict[str, str]:
    """A small clean environment: nothing of the developer's (API keys, proxies, agent settings) leaks in."""
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def launch(scenario: Scenario, clis: Clis, root: Path, *, state_dir: Path, registry_dir: Path,
           shared_home: Path) -> Launched:
    """Start one scenario: Claude Code under `otelwatch exec` (or bare), Codex bare.

    Bare CLIs get `shared_home` as HOME: the daemon's own, so that zero config finds
    their transcripts (~/.claude/projects, ~/.codex/sessions) as a user's would."""
    workdir = root / scenario.name
    (workdir / "cwd").mkdir(parents=True, exist_ok=True)
    server = ["--api", "anthropic" if scenario.agent == "claude" else "openai", "--behaviour", scenario.behaviour,
              "--port", str(FAKE_PORT), "--tool-command", scenario.tool_command,
              "--stream-seconds", str(scenario.stream_seconds), "--log", str(workdir / "api.log")]
    if scenario.agent == "claude":
        home = workdir / "home" if scenario.wrapped else shared_home
        home.mkdir(exist_ok=True)
        env = {
            **base_env(home),
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{FAKE_PORT}",
            "ANTHROPIC_API_KEY": "sk-ant-otelwatch-tests-dummy",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "OTELWATCH_STATE_DIR": str(state_dir),
            "OTELWATCH_REGISTRY_DIR": str(registry_dir),
            **scenario.env,
        }
        argv = [clis.claude, "-p", scenario.prompt, "--output-format", "stream-json", "--verbose",
                *scenario.cli_args]
        if scenario.wrapped:
            argv = [sys.executable, "-m", "otelwatch", "exec", "--session-id", scenario.session_id,
                    "--agent", "claude-code", "--", *argv]
    else:
        write_codex_config(shared_home / ".codex")
        env = {**base_env(shared_home), "OTELWATCH_FAKE_KEY": "sk-otelwatch-tests-dummy", **scenario.env}
        argv = ["node", clis.codex, "exec", "--json", "--skip-git-repo-check", *scenario.cli_args, scenario.prompt]
    info = workdir / "info.json"
    proc = launch_in_netns(argv, server_args=server, env=env, cwd=workdir / "cwd", stderr_path=workdir / "stderr",
                           info_path=info)
    return Launched(scenario, proc, workdir, info)


def write_codex_config(codex_dir: Path) -> None:
    """The custom provider that points Codex at the fake (OPENAI_BASE_URL alone is not used)."""
    codex_dir.mkdir(parents=True, exist_ok=True)
    (codex_dir / "config.toml").write_text(
        'model = "fake-model"\n'
        'model_provider = "otelwatch_fake"\n'
        "\n"
        "[model_providers.otelwatch_fake]\n"
        'name = "otelwatch fake"\n'
        f'base_url = "http://127.0.0.1:{FAKE_PORT}/v1"\n'
        'env_key = "OTELWATCH_FAKE_KEY"\n'
        'wire_api = "responses"\n'
        "supports_websockets = false\n"
    )


# --------------------------------------------------------------------------- recording


@dataclass(frozen=True)
class Row:
    t: float  # wall time of the poll
    session_id: str
    pid: int | None
    state: str
    reason: str
    cpu: float | None
    tcp: Mapping[str, int]
    children: int
    last_event_age: float | None
    recoveries: int
    source: str
    started_at: float  # when the daemon first saw the session: silence before it is never counted
    events: int
    runtime: tuple[str, str] | None = None  # (kind, target), e.g. ("tmux", "work:0.0")
    detail: str = ""  # the verdict's evidence detail, for timelines
    sample: str = "ok"  # the latest sample's status (probe_timeout: the daemon could not read it in time)

    @classmethod
    def of(cls, t: float, s: Mapping[str, Any]) -> Row:
        rt = s.get("runtime")
        runtime = (str(rt.get("kind")), str(rt.get("target"))) if isinstance(rt, dict) else None
        evidence = s.get("evidence") or {}
        detail = evidence.get("detail") or ""
        return cls(t, s["session_id"], s.get("pid"), s["state"], s["reason"], s.get("cpu_percent"),
                   dict(s.get("tcp") or {}), len(s.get("children") or ()), s.get("last_event_age_s"),
                   len(s.get("recoveries") or ()), s.get("source", ""), float(s.get("started_at") or 0.0),
                   int(s.get("events") or 0), runtime, str(detail)[:80], str(evidence.get("sample_status") or "ok"))


class Recorder:
    """Polls the daemon every POLL_S and keeps, per scenario, the rows of the sessions
    whose pid is in that scenario's process tree (other agents on the host are ignored)."""

    def __init__(self, fetch: Callable[[], list[dict[str, Any]]], runs: Iterable[Launched]) -> None:
        self.fetch = fetch
        self.runs = list(runs)
        self.rows: dict[str, list[Row]] = {r.scenario.name: [] for r in self.runs}
        self.ids_at_once: dict[str, list[tuple[float, tuple[str, ...]]]] = {r.scenario.name: [] for r in self.runs}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="recorder", daemon=True)

    def start(self) -> Recorder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # recorded and shown on failure, never fatal to the run
                self.errors.append(f"{time.time():.1f} {exc!r}")
            self._stop.wait(POLL_S)

    def poll(self) -> None:
        kids = _children_map()  # one /proc scan per poll for every scenario
        live = {run.scenario.name: run.live_pids(kids) for run in self.runs}
        sessions = self.fetch()
        t = time.time()
        for run in self.runs:
            # A session is this scenario's when it names a live pid of the tree (a pid of the
            # tree that has died may already be someone else's), or once it has been.
            pids = live[run.scenario.name]
            mine = [s for s in sessions if s.get("pid") in pids or s["session_id"] in run.session_ids]
            run.session_ids.update(s["session_id"] for s in mine)
            live_ids = tuple(sorted(s["session_id"] for s in mine if s["state"] != "exited"))
            self.ids_at_once[run.scenario.name].append((t, live_ids))
            for s in mine:
                self.rows[run.scenario.name].append(Row.of(t, s))


# --------------------------------------------------------------------------- judging


def due_time(progress: Sequence[float], stall_after: float) -> float | None:
    """When the first silence of stall_after begins to count as a stall: the first
    progress line followed by a gap of at least stall_after, plus stall_after."""
    for i, t in enumerate(progress):
        if i + 1 == len(progress) or progress[i + 1] - t >= stall_after:
            return t + stall_after
    return None


def segments(rows: Sequence[Row], t0: float) -> list[str]:
    """The timeline as a person reads it: one line per (state, reason) stretch."""
    out: list[str] = []
    cur: tuple[str, str, str] | None = None
    start = 0.0
    group: list[Row] = []

    def flush() -> None:
        if cur is None:
            return
        cpus = [r.cpu for r in group if r.cpu is not None]
        tcps = sorted({json.dumps(r.tcp, sort_keys=True) for r in group})
        cpu = f"cpu {min(cpus):.1f}-{max(cpus):.1f}%" if cpus else "cpu -"
        unread = collections.Counter(r.sample for r in group if r.sample != "ok")
        out.append(f"  {start - t0:6.1f}s..{group[-1].t - t0:6.1f}s  {cur[1]:<12} {cur[2]:<22} "
                   f"[{cur[0]}] {cpu} tcp {' '.join(tcps)} children {max(r.children for r in group)}"
                   f"{''.join(f' {k} x{n}/{len(group)}' for k, n in sorted(unread.items()))}"
                   f"{' RECOVERIES ' + str(group[-1].recoveries) if group[-1].recoveries else ''}")

    for row in rows:
        key = (row.session_id, row.state, row.reason)
        if key != cur:
            flush()
            cur, start, group = key, row.t, []
        group.append(row)
    flush()
    return out


def describe(run: Launched, rows: Sequence[Row], recorder: Recorder | None = None) -> str:
    """Everything a person needs to see what happened in one scenario."""
    t0 = run.started
    lines = [f"scenario {run.scenario.name} ({run.scenario.agent}, fake API {run.scenario.behaviour}); "
             f"rc={run.rc} exited_at={'-' if run.exited_at is None else f'{run.exited_at - t0:.1f}s'}",
             "verdict timeline (time since launch):", *segments(rows, t0), "CLI stdout:"]
    for ln in run.lines[:40]:
        lines.append(f"  {ln.t - t0:6.1f}s {ln.kind or '?':<22} {'(heartbeat)' if ln.heartbeat else ''}")
    lines.append("fake API log:")
    for rec in run.api_log()[:30]:
        lines.append(f"  {rec.get('t', t0) - t0:6.1f}s {rec.get('event')} conn={rec.get('conn', '-')} "
                     f"{rec.get('path', '')} open={rec.get('open')}")
    tail = run.stderr_tail()
    if tail.strip():
        lines += ["stderr tail:", tail]
    if recorder is not None and recorder.errors:
        lines += ["recorder errors:", *recorder.errors[-5:]]
    return "\n".join(lines)


def never_stuck_nor_recovered(rows: Sequence[Row], t0: float, why: str) -> list[str]:
    """The first stuck verdict and the first recovery record of a working session, if any:
    none of the real agents' scenarios, headless or TUI, may show either."""
    problems = []
    stuck = [r for r in rows if r.state == "stuck"]
    if stuck:
        problems.append(f"stuck/{stuck[0].reason} at {stuck[0].t - t0:.1f}s: {why}")
    recovered = [r for r in rows if r.recoveries]
    if recovered:
        problems.append(f"a recovery record at {recovered[0].t - t0:.1f}s for a working session")
    return problems


def check(run: Launched, rows: Sequence[Row], ids_at_once: Sequence[tuple[float, tuple[str, ...]]], *,
          observed_until: float, stall_after: float = STALL_AFTER, interval: float = INTERVAL,
          slack: float = POLL_S + 2.0) -> list[str]:
    """What is wrong with a scenario's timeline against its target (empty: conforms)."""
    exp = run.scenario.expect
    problems: list[str] = []
    t0 = run.started
    if not rows:
        return ["the daemon never listed a session for this scenario's processes"]

    # One agent run is one session: never two live sessions for one tree at the same time.
    doubles = [(t, ids) for t, ids in ids_at_once if len(ids) > 1]
    if doubles:
        t, ids = doubles[0]
        problems.append(f"picked up as {len(ids)} sessions at {t - t0:.1f}s: {list(ids)}")

    problems.extend(never_stuck_nor_recovered(rows, t0, "no target says stuck"))

    verdicts = [(r.state, r.reason) for r in rows]
    first = exp.settle or exp.final
    assert first is not None
    try:
        i_first = verdicts.index(first)
    except ValueError:
        i_first = None
        last = rows[-1]
        problems.append(f"never {first[0]}/{first[1]} (last: {last.state}/{last.reason} at {last.t - t0:.1f}s)")

    early = rows if i_first is None else rows[:i_first]
    wrong_early = [r for r in early if r.state not in ("starting", "active")]
    if wrong_early:
        r = wrong_early[0]
        problems.append(f"{r.state}/{r.reason} at {r.t - t0:.1f}s, before its target verdict")
    if exp.seen is not None and exp.seen not in verdicts[: i_first or len(verdicts)]:
        problems.append(f"never {exp.seen[0]}/{exp.seen[1]} before {first[0]}/{first[1]}")

    if exp.settle is not None and i_first is not None:
        due = due_time(run.progress_times(), stall_after)
        t_settle = rows[i_first].t
        if due is None:
            problems.append("no progress line on stdout: cannot say when the verdict was due")
            due = math.inf
        # The daemon counts silence only from when it first saw the session.
        due = max(due, rows[0].started_at + stall_after)
        if t_settle > due + interval + slack:
            problems.append(f"{first[0]}/{first[1]} at {t_settle - t0:.1f}s, due at {due - t0:.1f}s: later than "
                            f"one interval ({interval:g}s) + {slack:g}s")
        # Then not one change until the final verdict (or the end of the window).
        rest = rows[i_first:]
        i_final = next((i for i, r in enumerate(rest) if (r.state, r.reason) == exp.final), len(rest))
        # Real progress on stdout (e.g. the tool_result, assistant and result lines when
        # Claude moves a long Bash call to the background, or the final error answer of
        # a drop) moves the session to active at once, by contract; from the last such
        # line it must be back on its verdict within stall_after + one interval.
        progress = [ln.t for ln in run.lines if ln.kind in ("user", "assistant", "result")]

        def explained(r: Row) -> bool:
            return r.state == "active" and any(0 <= r.t - p <= stall_after + interval + slack for p in progress)

        changed = [r for r in rest[:i_final] if (r.state, r.reason) != exp.settle and not explained(r)]
        if changed:
            r = changed[0]
            problems.append(f"changed to {r.state}/{r.reason} at {r.t - t0:.1f}s after settling at "
                            f"{t_settle - t0:.1f}s")
        if exp.tcp is not None:
            bad = [r for r in rest[:i_final] if dict(r.tcp) != dict(exp.tcp)]
            if bad:
                problems.append(f"tcp {bad[0].tcp} at {bad[0].t - t0:.1f}s while settled; the agent holds "
                                f"{dict(exp.tcp)}")
        held = (rest[i_final - 1].t if i_final else t_settle) - t_settle
        if exp.final is None and held < 0.4 * (observed_until - t0):
            problems.append(f"settled for only {held:.0f}s of a {observed_until - t0:.0f}s window")

    if exp.final is not None:
        i_final_all = next((i for i, v in enumerate(verdicts) if v == exp.final), None)
        if i_final_all is None:
            if i_first is not None:  # already reported when final is the first target
                problems.append(f"never {exp.final[0]}/{exp.final[1]}")
        else:
            after = [r for r in rows[i_final_all:] if (r.state, r.reason) != exp.final]
            if after:
                problems.append(f"left {exp.final[0]}/{exp.final[1]} for {after[0].state}/{after[0].reason} "
                                f"at {after[0].t - t0:.1f}s")
    if exp.rc is not None and run.rc != exp.rc:
        problems.append(f"exit status {run.rc}, expected {exp.rc} (propagated through otelwatch exec)")
    return problems


def cpu_tcp_summary(rows: Sequence[Row]) -> str:
    cpus = [r.cpu for r in rows if r.cpu is not None and r.state != "exited"]
    tcps = sorted({json.dumps(dict(r.tcp), sort_keys=True) for r in rows if r.state != "exited"})
    if not cpus:
        return "no live samples"
    return (f"cpu% min {min(cpus):.1f} median {statistics.median(cpus):.1f} max {max(cpus):.1f}; "
            f"tcp seen {' '.join(tcps)}")
