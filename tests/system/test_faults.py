"""Fault suite (issue #16): otelwatch's loop must never freeze or die because of one input.

Real daemons (`otelwatch run`), real processes, loopback only. The expensive
cases overlap in time: the 50-session soak daemon starts with the first test
and is judged by the last one, while the other cases run their own daemons
meanwhile (each daemon's assertions are about that daemon alone). Every case
is bounded by a pytest timeout; every wait polls.

Cases: the soak (50 sessions, one of them with a FIFO as its events file, OTLP
to a server that accepts and never answers); a second daemon on the same
state directory; corrupt recovery state files; the daemon SIGSTOPped longer
than the lag threshold with recovery on and a really hung agent; a session
of 500 children, a zombie session and a refused OTLP endpoint on one daemon.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from otelwatch.config import parse_config
from otelwatch.recovery import Recovery
from tests.support.e2e_support import Daemon, http_get, start_daemon
from tests.support.procs import FAKE, REPO, TcpServer, free_port, wait_for

pytestmark = pytest.mark.e2e

INTERVAL = 0.5
PROBE_TIMEOUT = 0.4
TIMING = {"interval": INTERVAL, "probe_timeout": PROBE_TIMEOUT}  # FAST's, stated where they are used
SOAK_S = 20.0
LAG_S = 11.5  # the daemon is stopped this long: past the 10 s floor of the lag threshold
# Bounds that hold on a loaded 2-core box yet catch the faults, which are not subtle: a
# blocked loop stops ticking (/healthz 503 within 1.5 s), a quadratic one takes seconds.
CADENCE = 0.5  # at least this share of the nominal tick count
TICK_STALL_S = 2.5  # no tick may take longer (a histogram bucket bound)


# --------------------------------------------------------------------------- helpers


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` with those labels (0 when there is none)."""
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def tick_stats(text: str) -> tuple[float, float, float]:
    """(ticks, mean duration, ticks slower than TICK_STALL_S) from a /metrics body."""
    count = metric(text, "otelwatch_collector_tick_duration_seconds_count")
    mean = metric(text, "otelwatch_collector_tick_duration_seconds_sum") / count
    slow = count - metric(text, "otelwatch_collector_tick_duration_seconds_bucket", le=str(TICK_STALL_S))
    return count, mean, slow


def ticks(daemon: Daemon) -> int:
    return int(json.loads(http_get(daemon.url + "/healthz")[1])["ticks"])


def json_lines(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's structured log lines (its stderr also holds plain warnings)."""
    return [json.loads(line) for line in daemon.log_path.read_text(errors="replace").splitlines()
            if line.startswith("{")]


def error_lines(daemon: Daemon) -> list[str]:
    text = daemon.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if "Traceback" in line] + \
        [json.dumps(rec) for rec in json_lines(daemon) if rec.get("level") == "error"]


def report(case: str, **numbers: Any) -> None:
    """One line of measurements per case (shown with -s, and with a failure)."""
    print(f"FAULTS {case}: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in numbers.items()))


def sleepers(daemon: Daemon, n: int, extra: str = "", lifetime: int = 120) -> tuple[int, list[int]]:
    """One shell with n `sleep` children (then `extra`, shell code); the shell's pid and
    the children's. Cheap real processes: a python per session would cost 20 MB each."""
    script = f"for i in $(seq {n}); do sleep {lifetime} & echo $!; done; {extra or 'true'}; wait"
    shell = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    daemon.agents.append(shell)  # type: ignore[arg-type]  # killed with its group at cleanup
    assert shell.stdout is not None
    pids = [int(shell.stdout.readline()) for _ in range(n)]
    return shell.pid, pids


def stream_line(text: str) -> str:
    return json.dumps({"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}}) + "\n"


@dataclass
class Watch:
    """Polls one daemon in the background: /healthz (status, ticks) and the daemon's RSS."""

    daemon: Daemon
    period: float = INTERVAL
    limit_s: float = 120.0
    samples: list[tuple[float, int, int, float]] = field(default_factory=list)  # (t, status, ticks, MiB)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        end = time.monotonic() + self.limit_s
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                status, body = http_get(self.daemon.url + "/healthz", timeout=2)
                ticks = json.loads(body)["ticks"]
                self.samples.append((time.monotonic(), status, ticks, rss_mib(self.daemon.proc.pid)))
            except (OSError, ValueError, KeyError) as exc:
                self.samples.append((time.monotonic(), -1, -1, math.nan))
                print(f"watch: {exc!r}", file=sys.stderr)
            self._stop.wait(self.period)

    def stop(self) -> list[tuple[float, int, int, float]]:
        self._stop.set()
        self._thread.join(5)
        return list(self.samples)


# --------------------------------------------------------------------------- the soak daemon


@dataclass
class Soak:
    daemon: Daemon
    watch: Watch
    started: float
    sessions: dict[str, str]  # session id -> "active" | "idle" | "silent" | "fifo"


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Soak]:
    """50 sessions at interval 0.5 s, exporting OTLP (gRPC) to a server that accepts and
    never answers. 30 make progress (lines appended here), 10 wait for their user,
    9 are silent, 1 has a FIFO as its events file."""
    server = TcpServer("127.0.0.1")
    tmp = tmp_path_factory.mktemp("soak")
    daemon = start_daemon(tmp, {**TIMING, "export": {"otlp": {
        "enabled": True, "endpoint": f"http://127.0.0.1:{server.port}", "protocol": "grpc",
        "interval": INTERVAL, "timeout": 1.0}}})
    stop = threading.Event()
    writer: threading.Thread | None = None
    watch: Watch | None = None
    try:
        _, pids = sleepers(daemon, 50)
        events_dir = tmp / "events"
        events_dir.mkdir()
        sessions: dict[str, str] = {}
        active: list[Path] = []
        for i, pid in enumerate(pids):
            kind = "active" if i < 30 else "idle" if i < 40 else "silent" if i < 49 else "fifo"
            sid = f"soak-{i:02d}"
            path = events_dir / f"{sid}.jsonl"
            if kind == "fifo":
                os.mkfifo(path)
            elif kind == "idle":
                path.write_text(json.dumps({"type": "result", "subtype": "success"}) + "\n")
            else:
                path.write_text(stream_line("started"))
            if kind == "active":
                active.append(path)
            daemon.register(sid, pid, events_path=str(path), mode="interactive" if kind == "idle" else "headless",
                            agent=f"soak-{kind}")
            sessions[sid] = kind

        def write() -> None:
            n = 0
            while not stop.wait(INTERVAL) and n < 1000:
                n += 1
                for path in active:
                    with open(path, "a") as fh:
                        fh.write(stream_line(f"step {n}"))

        writer = threading.Thread(target=write, name="soak-writer", daemon=True)
        writer.start()
        wait_for(lambda: len(daemon.sessions()) == 50, timeout=10)
        watch = Watch(daemon)
        yield Soak(daemon, watch, time.monotonic(), sessions)
    finally:
        stop.set()
        if writer is not None:
            writer.join(5)
        if watch is not None:
            watch.stop()
        daemon.cleanup()
        server.close()


@pytest.mark.timeout(60)
def test_second_daemon_on_the_same_state_dir_refuses(soak: Soak) -> None:
    daemon = soak.daemon
    second = subprocess.run([sys.executable, "-m", "otelwatch", "run", "--config", str(daemon.config_path)],
                            capture_output=True, text=True, timeout=20, cwd=str(REPO),
                            env={**os.environ, "OTELWATCH_STATE_DIR": str(daemon.state_dir)})
    assert second.returncode == 1, second.stderr
    assert f"another otelwatch (pid {daemon.proc.pid}) is running on state directory {daemon.state_dir}" \
        in second.stderr
    assert "Traceback" not in second.stderr
    # The first one is untouched: still healthy, still holding the lock.
    assert http_get(daemon.url + "/healthz")[0] == 200
    assert (daemon.state_dir / "otelwatch.lock").read_text().strip() == str(daemon.proc.pid)


# --------------------------------------------------------------------------- corrupt state files

NOW = time.time()


def _escalation(**over: Any) -> dict[str, Any]:
    esc: dict[str, Any] = {"session_id": "s", "agent": "a", "action": "signal", "reason": "no_activity",
                           "kind": "stuck", "pid": 4_000_000, "create_time": NOW - 100, "pgid": 4_000_000,
                           "snapshot": [[4_000_000, NOW - 100]], "step": "sigterm", "time": NOW - 10,
                           "requested_at": NOW - 11, "events": 3}
    esc.update(over)
    return esc


def _state(**over: Any) -> dict[str, Any]:
    state: dict[str, Any] = {"version": 1, "recoveries": [NOW - 60], "escalations": [_escalation()],
                             "given_up": [[4_000_001, NOW - 500]]}
    state.update(over)
    return state


# (case, file text, what the warning must name)
CORRUPT = [
    ("inf recovery time", json.dumps(_state()).replace(f'"recoveries": [{NOW - 60!r}]', '"recoveries": [1e999]'),
     "recoveries[0] = inf"),
    # The key is part of what is replaced: a bare "1.5" also occurs inside the float timestamps.
    ("inf pid", json.dumps(_state(escalations=[_escalation(pid=1.5)])).replace('"pid": 1.5', '"pid": 1e999'),
     "escalations[0].pid = inf"),
    ("nan create time", json.dumps(_state(escalations=[_escalation(create_time=math.nan)])),
     "escalations[0].create_time = nan"),
    ("negative pid", json.dumps(_state(escalations=[_escalation(pid=-5)])), "escalations[0].pid = -5"),
    ("pid zero in given_up", json.dumps(_state(given_up=[[0, 1.0]])), "given_up[0][0] = 0"),
    ("pid past the kernel's limit", json.dumps(_state(given_up=[[1 << 40, 1.0]])), "given_up[0][0]"),
    ("a bool is not a pid", json.dumps(_state(escalations=[_escalation(pgid=True)])),
     "escalations[0].pgid = True"),
    ("string time", json.dumps(_state(escalations=[_escalation(time="soon")])), "escalations[0].time = 'soon'"),
    ("integer of 400 digits", json.dumps(_state(recoveries=[10**400])), "recoveries[0]"),
    ("time far in the future", json.dumps(_state(recoveries=[NOW + 10 * 86400])), "recoveries[0]"),
    ("unknown step", json.dumps(_state(escalations=[_escalation(step="sigstop")])), "escalations[0].step"),
    ("unknown action", json.dumps(_state(escalations=[_escalation(action="rm -rf")])), "escalations[0].action"),
    ("snapshot of scalars", json.dumps(_state(escalations=[_escalation(snapshot=[1, 2])])),
     "escalations[0].snapshot[0]"),
    ("escalation not an object", json.dumps(_state(escalations=[[1, 2]])), "bad 'escalations' list"),
    ("missing pid", json.dumps(_state(escalations=[{k: v for k, v in _escalation().items() if k != "pid"}])),
     "lacks ['pid']"),
    ("one session twice", json.dumps(_state(escalations=[_escalation(), _escalation()])), "one session twice"),
    ("huge list", json.dumps(_state(recoveries=[NOW - 60] * 20_000)), "recoveries has 20000 entries"),
    ("nested too deep", '{"version": 1, "recoveries": ' + "[" * 100_000 + "]" * 100_000 + "}", "unreadable"),
]


def _load(path: Path, caplog: pytest.LogCaptureFixture) -> tuple[Recovery, list[str]]:
    caplog.clear()
    rec = Recovery(parse_config({"recovery": {"enabled": True}}), path)
    return rec, [r.getMessage() for r in caplog.records if r.name.startswith("otelwatch.recovery")]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("case", "text", "named"), CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_state_file_is_moved_aside_and_the_daemon_starts(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str, text: str, named: str) -> None:
    path = tmp_path / "recovery.json"
    path.write_text(text)
    path.chmod(0o600)
    rec, lines = _load(path, caplog)
    try:
        assert len(lines) == 1, lines  # one line, naming what was wrong
        assert named in lines[0] and "moved aside" in lines[0] and str(path) in lines[0], lines[0]
        aside = list(tmp_path.glob("recovery.json.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_text() == text
        assert rec.drain() == []  # nothing resumed, nothing closed: the file was not trusted
    finally:
        rec.shutdown()
    assert json.loads(path.read_text())["escalations"] == []


@pytest.mark.timeout(30)
def test_oversized_state_file_is_moved_aside_unread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "recovery.json"
    with open(path, "wb") as fh:
        fh.truncate(17 << 20)  # sparse: costs no disk
    path.chmod(0o600)
    rec, lines = _load(path, caplog)
    rec.shutdown()
    assert len(lines) == 1 and "too large" in lines[0]
    assert list(tmp_path.glob("recovery.json.corrupt-*"))


@pytest.mark.timeout(30)
def test_valid_state_file_is_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "recovery.json"
    path.write_text(json.dumps(_state()))
    path.chmod(0o600)
    rec, lines = _load(path, caplog)
    try:
        # The escalation's process (pid 4 000 000) is gone: closed, never signalled.
        closed = rec.drain()
        assert [(s.session_id, s.step) for s in closed] == [("s", "completed")]
        assert not list(tmp_path.glob("recovery.json.corrupt-*")) and not any("moved aside" in x for x in lines)
    finally:
        rec.shutdown()
    saved = json.loads(path.read_text())
    assert saved["escalations"] == [] and saved["recoveries"] == [NOW - 60]


_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["recoveries", "given_up", "escalations", "pid", "create_time", "pgid", "snapshot",
                            "step", "time", "requested_at", "events", "session_id", "action", "kind"]),
       value=_json)
def test_any_value_in_the_state_file_starts_or_is_moved_aside(key: str, value: Any) -> None:
    """Whatever one field holds, loading never raises: the file is used or moved aside."""
    state = _state()
    if key in state:
        state[key] = value
    else:
        state["escalations"] = [_escalation(**{key: value})]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recovery.json"
        path.write_text(json.dumps(state))
        path.chmod(0o600)
        Recovery(parse_config({"recovery": {"enabled": True}}), path)
        moved = list(Path(tmp).glob("recovery.json.corrupt-*"))
        # Used: the escalation (pid 4 000 000 never lives) was closed and the file rewritten.
        assert moved or json.loads(path.read_text())["escalations"] == []
        assert not moved or not path.exists()


# --------------------------------------------------------------------------- the daemon's own lag


@pytest.mark.timeout(60)
def test_daemon_stopped_past_the_lag_threshold_restarts_its_windows(tmp_path: Path) -> None:
    """SIGSTOP for longer than the lag threshold with recovery on and a really hung agent
    that was already stuck: the gap is the watchdog's, so the windows start again and
    nothing is recovered (counting the gap as evidence would recover it at the first tick
    after SIGCONT: recover_after is far shorter than the stop), while its silence is its
    true silence, gap included (issue #20: never reset to 0, never active). The
    daemon also starts on a corrupt state file (1e999), moving it aside."""
    state = tmp_path / "state"
    state.mkdir(parents=True, mode=0o700)
    corrupt = state / "recovery.json"
    corrupt.write_text('{"version": 1, "recoveries": [1e999], "escalations": [], "given_up": []}')
    corrupt.chmod(0o600)
    daemon = start_daemon(tmp_path, {**TIMING, "recovery": {"enabled": True, "recover_after": 6, "grace": 0.5}})
    try:
        assert list(state.glob("recovery.json.corrupt-*"))
        assert "recoveries[0] = inf" in daemon.log_path.read_text()
        proc, events = daemon.agent("hung")
        daemon.register("lag-hung", proc.pid, events_path=str(events))
        daemon.wait_state("lag-hung", "stuck", "no_activity", timeout=15)
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(LAG_S)  # the daemon cannot answer: nothing to poll for
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        resumed_at = ticks(daemon)
        late = wait_for(lambda: [r for r in json_lines(daemon) if r.get("event") == "tick.late"], timeout=5)
        assert late[0]["late_by_s"] >= 10  # type: ignore[index]
        # Until the late tick has published, the listing is still the one from before the stop.
        wait_for(lambda: ticks(daemon) >= resumed_at + 2, timeout=5)
        # Silence counts from the last event, across the stop; but the session cannot be
        # stuck before the daemon has watched stall_after (3 s) again, and is never active.
        seen = []
        while time.monotonic() < resumed + 2.5 or not seen:
            snap = daemon.session("lag-hung")
            since = time.monotonic() - resumed
            assert snap is not None
            seen.append((round(since, 2), snap["state"], snap["silence_s"]))
            assert snap["silence_s"] >= LAG_S, seen
            assert snap["state"] == "stalled" or (snap["state"] == "stuck" and since >= 3.0), seen
            assert snap["recoveries"] == [], snap["recoveries"]
            time.sleep(0.2)
        report("lag", late_by_s=late[0]["late_by_s"], after_resume=seen)  # type: ignore[index]
        assert proc.poll() is None, "the hung agent was recovered because of the daemon's own lag"
        assert http_get(daemon.url + "/healthz")[0] == 200
        assert error_lines(daemon) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.proc.pid, signal.SIGCONT)
        daemon.cleanup()


# --------------------------------------------------------------------------- a crowded daemon


@dataclass
class Crowd:
    daemon: Daemon
    watch: Watch
    zombie: int
    zombie_parent: subprocess.Popen[bytes]
    registered: float  # monotonic time both sessions were registered


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crowd]:
    """Recovery on (short windows), OTLP over HTTP to a port nothing listens on; one
    session whose shell holds 500 children while it reports progress every 0.5 s (its
    `sleep 0.5` children come and go), and one whose process is a zombie its parent
    never reaps."""
    tmp = tmp_path_factory.mktemp("crowd")
    daemon = start_daemon(tmp, {
        **TIMING,
        "recovery": {"enabled": True, "recover_after": 2, "grace": 0.5},
        "export": {"otlp": {"enabled": True, "endpoint": f"http://127.0.0.1:{free_port()}",
                            "protocol": "http/protobuf", "interval": INTERVAL, "timeout": 1.0}}})
    watch: Watch | None = None
    try:
        events = tmp / "tree.jsonl"
        line = stream_line("building").strip().replace("'", "")
        loop = f"for j in $(seq 240); do echo '{line}' >> {events}; sleep 0.5; done"
        root, _ = sleepers(daemon, 500, extra=loop)
        parent = subprocess.Popen([*FAKE, "zombie", "--lifetime", "60"], stdout=subprocess.PIPE,
                                  cwd=str(REPO), start_new_session=True)
        daemon.agents.append(parent)
        assert parent.stdout is not None
        zombie = int(parent.stdout.readline())
        wait_for(lambda: _status(zombie) == "Z", timeout=5)
        wait_for(events.exists, timeout=10)
        daemon.register("crowd-500", root, events_path=str(events), agent="tree")
        daemon.register("crowd-zombie", zombie, agent="zombie")
        watch = Watch(daemon)
        yield Crowd(daemon, watch, zombie, parent, time.monotonic())
    finally:
        if watch is not None:
            watch.stop()
        daemon.cleanup()


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.timeout(60)
def test_zombie_session_is_classified_and_never_recovered(crowd: Crowd) -> None:
    daemon = crowd.daemon
    snap = daemon.wait_state("crowd-zombie", "exited", "process_exited", timeout=10)
    assert snap["recoveries"] == []
    # Past recover_after (2 s) and a few ticks: a recovery would have started by now.
    wait_for(lambda: time.monotonic() - crowd.registered > 2.0 + 4 * INTERVAL, timeout=10, interval=0.2)
    again = daemon.session("crowd-zombie")
    assert again is not None and again["state"] == "exited" and again["recoveries"] == []
    assert crowd.zombie_parent.poll() is None, "the parent of the zombie was signalled"
    assert _status(crowd.zombie) == "Z"  # nobody touched it


@pytest.mark.timeout(60)
def test_session_of_500_children_is_probed_within_its_deadline(crowd: Crowd) -> None:
    daemon = crowd.daemon
    # The whole tree was read: 501 processes, one thread each.
    daemon.wait_state("crowd-500", "active", "recent_progress", timeout=15)
    wait_for(lambda: daemon.session("crowd-500")["threads"] >= 501, timeout=10)  # type: ignore[index]
    wait_for(lambda: len(crowd.watch.samples) >= 8, timeout=10)  # a cadence is measured over time
    text = daemon.metrics()
    (t0, _, ticks0, _), (t1, _, ticks1, _) = crowd.watch.samples[0], crowd.watch.samples[-1]
    assert all(status == 200 for _, status, _, _ in crowd.watch.samples), crowd.watch.samples
    assert ticks1 - ticks0 >= CADENCE * (t1 - t0) / INTERVAL, crowd.watch.samples
    assert metric(text, "otelwatch_probe_timeouts_total") == 0
    count, mean, slow = tick_stats(text)
    report("500 children", ticks=count, mean_tick_s=mean, slow_ticks=slow, healthz=sorted(
        {st for _, st, _, _ in crowd.watch.samples}), threads=daemon.session("crowd-500")["threads"])  # type: ignore[index]
    assert mean < PROBE_TIMEOUT and slow == 0, f"mean tick {mean:.3f} s, {slow} of {count} over {TICK_STALL_S} s"
    assert daemon.session("crowd-500")["recoveries"] == []  # type: ignore[index]


@pytest.mark.timeout(60)
def test_refused_otlp_endpoint_costs_the_loop_nothing(crowd: Crowd) -> None:
    daemon = crowd.daemon
    wait_for(lambda: metric(daemon.metrics(), "otelwatch_export_failures_total", signal="metrics") >= 3,
             timeout=10)
    wait_for(lambda: len(crowd.watch.samples) >= 8, timeout=10)
    samples = crowd.watch.stop()
    assert all(status == 200 for _, status, _, _ in samples), samples
    (t0, _, ticks0, rss0), (t1, _, ticks1, rss1) = samples[2], samples[-1]
    report("refused otlp", seconds=t1 - t0, ticks=ticks1 - ticks0, rss_mib=(rss0, rss1),
           export_failures=metric(daemon.metrics(), "otelwatch_export_failures_total"),
           healthz=sorted({st for _, st, _, _ in samples}))
    assert ticks1 - ticks0 >= CADENCE * (t1 - t0) / INTERVAL, samples
    assert rss1 - rss0 < 16, f"RSS grew {rss1 - rss0:.1f} MiB in {t1 - t0:.0f} s"
    assert error_lines(daemon) == []


# --------------------------------------------------------------------------- the soak, judged last


@pytest.mark.timeout(60)
def test_soak_fifty_sessions_bounded_rss_and_ticks(soak: Soak) -> None:
    daemon = soak.daemon
    wait_for(lambda: time.monotonic() - soak.started >= SOAK_S, timeout=SOAK_S + 5, interval=0.2)
    samples = soak.watch.stop()
    text = daemon.metrics()
    sessions = {s["session_id"]: s for s in daemon.sessions()}

    assert all(status == 200 for _, status, _, _ in samples), [s for s in samples if s[1] != 200]
    (t0, _, ticks0, _), (t1, _, ticks1, _) = samples[0], samples[-1]
    assert ticks1 - ticks0 >= CADENCE * (t1 - t0) / INTERVAL, f"{ticks1 - ticks0} ticks in {t1 - t0:.1f} s"
    count, mean, slow = tick_stats(text)
    warm = [rss for t, _, _, rss in samples if t - t0 >= 5]
    report("soak", seconds=t1 - t0, ticks=ticks1 - ticks0, mean_tick_s=mean, slow_ticks=slow,
           rss_mib=(warm[0], max(warm), warm[-1]), healthz=sorted({st for _, st, _, _ in samples}),
           export_failures=metric(text, "otelwatch_export_failures_total"))
    assert mean < INTERVAL / 2 and slow == 0, f"mean tick {mean:.3f} s, {slow} of {count} over {TICK_STALL_S} s"
    # RSS: flat after warm-up (5 s), small overall, while every OTLP export hangs.
    assert max(warm) - warm[0] < 16, f"RSS {warm[0]:.1f} -> {max(warm):.1f} MiB"
    assert max(warm) < 250, f"RSS {max(warm):.1f} MiB"
    assert metric(text, "otelwatch_export_failures_total") >= 1  # the exports did hang and fail
    # Every session classified as what it is; the FIFO one refused, not blocking.
    assert len(sessions) == 50
    by_kind: dict[str, set[str]] = {}
    for sid, kind in soak.sessions.items():
        by_kind.setdefault(kind, set()).add(sessions[sid]["state"])
    assert by_kind["active"] == {"active"} and by_kind["idle"] == {"idle"}, by_kind
    assert by_kind["silent"] <= {"stalled", "stuck"} and by_kind["fifo"] <= {"stalled", "stuck"}, by_kind
    stderr = daemon.log_path.read_text(errors="replace")
    assert stderr.count("it is a FIFO, not a regular file") == 1
    assert metric(text, "otelwatch_probe_timeouts_total") == 0
    assert metric(text, "otelwatch_probe_errors_total") == 0
    assert error_lines(daemon) == []
    took = daemon.stop()
    # By design ~1.5 s (the shutdown budget the hung exporter uses up); the SDK's own
    # default would wait 30 s. 5 s leaves room for a loaded box.
    assert daemon.proc.returncode == 0 and took < 5.0, f"shutdown took {took:.2f} s with a hung export"
