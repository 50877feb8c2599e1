"""Notifications: pure selection and substitution, delivery against a real loopback
HTTP server and real commands, and end to end through `otelwatch run` watching a
real hung agent (the volume follows the report backoff; dead endpoints and hanging
commands never delay a tick)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from otelwatch.config import ConfigError, NotifyConfig
from otelwatch.telemetry.notify import (
    Notifier,
    expand_argv,
    expand_headers,
    redact_url,
    retry_delays,
    selected,
    summary_text,
    webhook_body,
)
from tests.support.e2e_support import Daemon, http_get, merge, start_daemon
from tests.support.procs import TcpServer, free_port, wait_for

STUCK = {"event": "session.stuck", "session_id": "s1", "agent": "claude-code", "pid": 42, "state": "stuck",
         "reason": "no_activity", "summary": "sleeping in ep_poll with no TCP connections", "repeat": 0}
TOKEN = "s3cr3t-token-xyz"
# A command that records its argv, its stdin and when it ran, one JSON line per run.
RECORDER = ("import json, sys, time\n"
            "data = sys.stdin.read()\n"
            "with open(sys.argv[1], 'a') as fh:\n"
            "    fh.write(json.dumps({'argv': sys.argv[2:], 'stdin': json.loads(data), 't': time.time()}) + '\\n')\n")


# --------------------------------------------------------------------------- pure


def test_selection_follows_min_state_reasons_agents_and_switches() -> None:
    cfg = NotifyConfig(min_state="stalled")
    stalled = {**STUCK, "event": "session.stalled", "state": "stalled", "reason": "cpu_spin"}
    assert selected(cfg, STUCK) and selected(cfg, stalled)
    assert not selected(NotifyConfig(min_state="stuck"), stalled)
    assert not selected(NotifyConfig(reasons=("waiting_on_network",)), STUCK)
    assert selected(NotifyConfig(reasons=("no_activity",)), STUCK)
    assert not selected(NotifyConfig(agents=("codex",)), STUCK)
    # State changes: never for stalled/stuck (their reports say it, backed off);
    # below stalled only when min_state reaches down to them.
    change = {"event": "session.state", "session_id": "s1", "agent": "a", "state": "idle", "reason": "no_open_turn"}
    assert not selected(cfg, change)
    assert selected(NotifyConfig(min_state="idle"), change)
    assert not selected(NotifyConfig(min_state="idle"), {**change, "state": "stuck"})
    assert not selected(NotifyConfig(min_state="idle"), {**change, "state": "exited"})
    requested = {"event": "recovery.requested", "session_id": "s1", "agent": "a", "step": "requested"}
    assert selected(cfg, requested) and not selected(NotifyConfig(recovery=False), requested)
    assert not selected(cfg, {**requested, "event": "recovery.sigterm", "step": "sigterm"})
    end = {"event": "session.end", "session_id": "s1", "agent": "a", "final_state": "exited"}
    assert not selected(cfg, end) and selected(NotifyConfig(session_end=True), end)


def test_placeholders_are_substituted_per_argument_never_split() -> None:
    argv = ["notify-send", "otelwatch {event}", "{session_id} is {state}/{reason} ({agent})", "--", "{x}"]
    report = {**STUCK, "session_id": "evil; rm -rf / $(id)"}
    out = expand_argv(argv, report)
    assert out == ["notify-send", "otelwatch session.stuck", "evil; rm -rf / $(id) is stuck/no_activity (claude-code)",
                   "--", "{x}"]
    done = {"event": "recovery.completed", "session_id": "s1", "agent": "a", "step": "completed",
            "status": "terminated", "reason": "no_activity"}
    assert expand_argv(["{state}", "{reason}"], done) == ["terminated", "no_activity"]
    end = {"event": "session.end", "session_id": "s1", "final_state": "exited", "final_reason": "process_exited"}
    assert expand_argv(["{state}/{reason}"], end) == ["exited/process_exited"]


def test_header_env_expansion_and_errors_name_the_header_not_the_value() -> None:
    env = {"TOKEN": TOKEN}
    assert expand_headers({"Authorization": "Bearer ${TOKEN}", "X-Plain": "v"}, env) == {
        "Authorization": f"Bearer {TOKEN}", "X-Plain": "v"}
    with pytest.raises(ConfigError) as err:
        expand_headers({"Authorization": "Bearer ${MISSING_VAR}"}, env)
    assert err.value.key == "notify.headers.Authorization" and "MISSING_VAR" in str(err.value)
    with pytest.raises(ConfigError) as err:
        expand_headers({"X-Bad": "a${TOKEN}\r\nInjected: 1"}, env)
    assert TOKEN not in str(err.value)


def test_retry_backoff_and_texts() -> None:
    assert retry_delays(4, base=1.0, cap=5.0) == [1.0, 2.0, 4.0, 5.0]
    assert retry_delays(0) == []
    text = summary_text({**STUCK, "repeat": 2}, host="box")
    assert text.startswith("otelwatch on box: s1 (claude-code) is stuck/no_activity (repeat 2): sleeping in ep_poll")
    body = json.loads(webhook_body(STUCK, "box"))
    assert body["text"] == body["content"] and body["report"]["session_id"] == "s1"
    assert redact_url("https://hooks.slack.com/services/T0/B0/SECRET") == "https://hooks.slack.com/..."


# --------------------------------------------------------------------------- delivery, in process


class Hooks:
    """A real loopback webhook receiver: answers `codes` in turn (then 200), records each POST."""

    def __init__(self, codes: tuple[int, ...] = ()) -> None:
        self.codes = list(codes)
        self.posts: list[tuple[float, dict[str, str], dict[str, Any]]] = []
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hooks.posts.append((time.monotonic(), dict(self.headers), json.loads(body)))
                code = hooks.codes.pop(0) if hooks.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/PATHSECRET"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    try:
        yield h
    finally:
        h.close()


class Recorder:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.logs: list[tuple[str, dict[str, Any], str]] = []

    def count(self, signal: str) -> None:
        self.failures.append(signal)

    def log(self, event: str, fields: Any, level: str) -> None:
        self.logs.append((event, dict(fields), level))


def test_webhook_retries_with_backoff_then_delivers_with_headers(hooks: Hooks) -> None:
    hooks.codes = [503, 429]
    rec = Recorder()
    cfg = NotifyConfig(webhook=hooks.url, headers={"Authorization": "Bearer ${TOK}"}, retries=3, timeout=2)
    n = Notifier(cfg, count_failure=rec.count, log=rec.log, environ={"TOK": TOKEN}, retry_base=0.05)
    try:
        n.submit(STUCK)
        wait_for(lambda: n.sent == 1, timeout=5)
    finally:
        n.shutdown(1.0)
    assert len(hooks.posts) == 3
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(hooks.posts)]
    assert 0.04 <= gaps[0] < 0.5 and 0.09 <= gaps[1] < 0.6  # 0.05, then 0.1: doubling
    assert hooks.posts[-1][1]["Authorization"] == f"Bearer {TOKEN}"
    assert hooks.posts[-1][2]["report"]["session_id"] == "s1" and "stuck" in hooks.posts[-1][2]["text"]
    assert rec.failures == ["notify", "notify"] and rec.logs == []  # delivered in the end: nothing to log


def test_refused_webhook_counts_each_attempt_logs_once_and_never_leaks_secrets() -> None:
    rec = Recorder()
    url = f"http://127.0.0.1:{free_port()}/hook/PATHSECRET"
    cfg = NotifyConfig(webhook=url, headers={"Authorization": "Bearer ${TOK}"}, retries=2, timeout=1)
    n = Notifier(cfg, count_failure=rec.count, log=rec.log, environ={"TOK": TOKEN}, retry_base=0.01)
    try:
        n.submit(STUCK)
        wait_for(lambda: n.failed == 1, timeout=5)
    finally:
        n.shutdown(1.0)
    assert rec.failures == ["notify"] * 3  # the first attempt and two retries
    assert [event for event, _, _ in rec.logs] == ["notify_failed"]  # one line for the notification
    logged = json.dumps(rec.logs)
    assert "attempt 3 of 3" in logged and TOKEN not in logged and "PATHSECRET" not in logged


def test_non_retryable_http_error_is_not_retried(hooks: Hooks) -> None:
    hooks.codes = [404]
    rec = Recorder()
    n = Notifier(NotifyConfig(webhook=hooks.url, retries=3), count_failure=rec.count, log=rec.log, retry_base=0.01)
    try:
        n.submit(STUCK)
        wait_for(lambda: n.failed == 1, timeout=5)
    finally:
        n.shutdown(1.0)
    assert len(hooks.posts) == 1 and rec.failures == ["notify"]


def test_command_gets_argv_placeholders_and_report_on_stdin(tmp_path: Path) -> None:
    out, recorder = tmp_path / "runs.jsonl", tmp_path / "recorder.py"
    recorder.write_text(RECORDER)  # a file: a NotifyConfig rejects {...} that is not a placeholder
    cfg = NotifyConfig(command=(sys.executable, str(recorder), str(out), "{session_id}", "{state}", "{event}",
                                "{phase}", "{incident}"))
    n = Notifier(cfg, log=Recorder().log, proc_context=False)
    try:
        n.submit(STUCK)
        n.submit({**STUCK, "state": "starting", "event": "session.state"})  # not selected alone ...
        n.submit({**STUCK, "state": "active", "event": "session.state"})  # ... but the all-clear is
        wait_for(lambda: n.sent == 2, timeout=5)
    finally:
        n.shutdown(1.0)
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(runs) == 2
    assert runs[0]["argv"] == ["s1", "stuck", "session.stuck", "open", "s1#1"]
    assert runs[0]["stdin"]["summary"] == STUCK["summary"]
    assert runs[1]["argv"] == ["s1", "starting", "session.state", "resolved", "s1#1"]
    assert runs[1]["stdin"]["incident"]["resolution"] == "back to starting"


def test_hanging_command_is_killed_and_submit_never_blocks(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    hang = (sys.executable, "-c", HANG, str(pidfile))
    rec = Recorder()
    # 1 s: a Python start on a loaded 2-core host can take longer than 0.3 s before it writes its pid.
    n = Notifier(NotifyConfig(command=hang, timeout=1.0), count_failure=rec.count, log=rec.log, queue_size=2)
    try:
        t0 = time.monotonic()
        for i in range(20):
            n.submit({**STUCK, "session_id": f"s{i}"})
        submit_s = time.monotonic() - t0
        wait_for(lambda: n.failed >= 1, timeout=5)
        first = int(pidfile.read_text().split()[0])
        wait_for(lambda: not _alive(first), timeout=2)  # killed, and reaped by the notifier
    finally:
        t1 = time.monotonic()
        n.shutdown(0.5)
        n.shutdown(0.5)  # idempotent
        shutdown_s = time.monotonic() - t1
    assert submit_s < 0.05, submit_s  # the loop thread never waits for a delivery
    assert n.dropped >= 17  # one running, two queued at most
    assert shutdown_s < 2.5
    for pid in pidfile.read_text().split():
        assert not _alive(int(pid)), f"notify command {pid} outlived shutdown"
    assert "notify_dropped" in [e for e, _, _ in rec.logs]
    assert any("killed" in f.get("error", "") for e, f, _ in rec.logs if e == "notify_failed")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- end to end


NOTIFY_FAST = {"classify": {"startup_grace": 0.5, "stall_after": 2, "repeat_base": 1, "repeat_max": 8}}


def _hist(metrics: str, name: str = "otelwatch_collector_tick_duration_seconds") -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith(name + "_sum"):
            out["sum"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count"):
            out["count"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_bucket"):
            le = re.search(r'le="([^"]+)"', line)
            if le:
                out[f"le{le.group(1)}"] = float(line.rsplit(" ", 1)[1])
    return out


def _counter(metrics: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))


HANG = ("import os, sys, time\n"
        "open(sys.argv[1], 'a').write(str(os.getpid()) + '\\n')\n"
        "time.sleep(60)\n")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Four daemons started together, each watching one hung agent: `good` notifies a
    live webhook and a recording command; `silent` a webhook that accepts and never
    answers and a command that hangs; `refused` a closed port and a failing command;
    `none` does not notify (the baseline for tick durations)."""
    tmp = tmp_path_factory.mktemp("notify")
    hooks = Hooks()
    silent = TcpServer("127.0.0.1")
    runs, hung_pids = tmp / "runs.jsonl", tmp / "hang.pids"
    recorder = tmp / "recorder.py"  # a file: config rejects {...} that is not a placeholder
    recorder.write_text(RECORDER)
    configs: dict[str, dict[str, Any]] = {
        "good": {"command": [sys.executable, str(recorder), str(runs), "{session_id}", "{state}", "{event}"],
                 "webhook": hooks.url, "headers": {"Authorization": "Bearer ${OTW_NOTIFY_TOKEN}"},
                 "timeout": 2, "retries": 1},
        "silent": {"command": [sys.executable, "-c", HANG, str(hung_pids)],
                   "webhook": f"http://127.0.0.1:{silent.port}/hook", "timeout": 1, "retries": 1},
        "refused": {"command": [sys.executable, "-c", "import sys; sys.exit(3)"],
                    "webhook": f"http://127.0.0.1:{free_port()}/hook/PATHSECRET", "timeout": 1, "retries": 1},
        "none": {},
    }
    daemons: dict[str, Daemon] = {}
    try:
        for name, notify in configs.items():
            extra = merge(NOTIFY_FAST, {"notify": notify} if notify else {})
            daemons[name] = start_daemon(tmp / name, extra, wait=False, env={"OTW_NOTIFY_TOKEN": TOKEN})
        for d in daemons.values():
            wait_for(functools.partial(_healthy, d), timeout=15, interval=0.1)
        started = time.monotonic()
        for name, d in daemons.items():
            proc, events = d.agent("hung")
            d.register(f"hung-{name}", proc.pid, agent="fake-hung", events_path=str(events))
        yield {"daemons": daemons, "hooks": hooks, "silent": silent, "runs": runs, "hung_pids": hung_pids,
               "started": started}
    finally:
        for d in daemons.values():  # all stop at once: each may wait on its notifier
            with contextlib.suppress(ProcessLookupError):
                d.proc.send_signal(signal.SIGTERM)
        for d in daemons.values():
            d.cleanup()
        hooks.close()
        silent.close()
        for line in hung_pids.read_text().split() if hung_pids.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line), 9)


def _healthy(d: Daemon) -> bool:
    if d.proc.poll() is not None:
        raise AssertionError(f"daemon exited with {d.proc.returncode}:\n{d.log_tail()}")
    try:
        return http_get(d.url + "/healthz", timeout=1)[0] == 200
    except OSError:
        return False


def _reports(d: Daemon, sid: str) -> list[dict[str, Any]]:
    out = []
    for line in d.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("event") in ("session_stalled", "session_stuck") and rec.get("session_id") == sid:
                out.append(rec)
    return out


@pytest.mark.e2e
def test_hung_agent_notifies_on_the_report_backoff_schedule(fleet: dict[str, Any]) -> None:
    d, hooks = fleet["daemons"]["good"], fleet["hooks"]

    def posts() -> list[tuple[float, dict[str, str], dict[str, Any]]]:
        return [p for p in hooks.posts if p[2]["report"].get("session_id") == "hung-good"]

    wait_for(posts, timeout=10, interval=0.05)
    first = posts()[0][0]
    # stall_after 2 s + 2 intervals of 0.5 s, counted from the agent's start (its last event
    # comes within its Python startup), plus the registry scan.
    to_first = first - fleet["started"]
    assert to_first <= 2 + 2 * 0.5 + 1.0, to_first
    # Reports at 0, repeat_base (1 s), 3 s, then 7 s: the third, then half a second more.
    wait_for(lambda: len([p for p in posts() if p[2]["report"]["state"] == "stuck"]) >= 3, timeout=6)
    time.sleep(max(0.0, first + 3.6 - time.monotonic(), 0.5))
    got = posts()
    # A first report whose reason is not settled yet (insufficient_samples) is held: the
    # settled one that follows opens the incident instead (notify.settle).
    reports = [r for r in _reports(d, "hung-good") if r["reason"] != "insufficient_samples"]
    assert [(p[2]["report"]["state"], p[2]["report"]["repeat"]) for p in got] == \
        [(r["state"], r["repeat"]) for r in reports]
    stuck = [p for p in got if p[2]["report"]["state"] == "stuck"]
    assert [p[2]["report"]["repeat"] for p in stuck] == [0, 1, 2], got
    gaps = [round(b[0] - a[0], 2) for a, b in itertools.pairwise(stuck)]
    assert 0.9 <= gaps[0] <= 1.8 and 1.9 <= gaps[1] <= 3.0, gaps  # repeat_base, then 2x
    print(f"\nfirst notification {to_first:.2f} s after the agent started; repeats after {gaps} s")
    assert got[0][1]["Authorization"] == f"Bearer {TOKEN}" and "stuck" in got[-1][2]["text"]
    wait_for(lambda: len(fleet["runs"].read_text().splitlines()) >= len(got), timeout=5)
    runs = [json.loads(line) for line in fleet["runs"].read_text().splitlines()]
    mine = [r for r in runs if r["argv"][0] == "hung-good"]
    assert len(mine) == len(got) and mine[-1]["argv"] == ["hung-good", "stuck", "session.stuck"]
    assert mine[-1]["stdin"]["session_id"] == "hung-good" and "summary" in mine[-1]["stdin"]
    assert TOKEN not in d.log_path.read_text(errors="replace")


def _failed_twice(d: Daemon) -> bool:
    return _counter(d.metrics(), 'otelwatch_export_failures_total{signal="notify"}') >= 2


@pytest.mark.e2e
def test_dead_endpoints_and_hanging_command_never_delay_a_tick(fleet: dict[str, Any]) -> None:
    daemons = fleet["daemons"]
    failing = ("silent", "refused")
    for name in failing:  # both channels failed at least once: timeouts, refusals, kills
        wait_for(functools.partial(_failed_twice, daemons[name]), timeout=12, interval=0.2)
    assert fleet["silent"].accepted, "the silent webhook was never called"
    assert fleet["hung_pids"].exists(), "the hanging command never ran"
    stats = {name: _hist(daemons[name].metrics()) for name in (*failing, "none")}
    means = {name: h["sum"] / h["count"] * 1000 for name, h in stats.items()}
    print("\ntick duration mean ms / ticks / over 25 ms / over 250 ms: " + ", ".join(
        f"{n}: {means[n]:.1f} / {h['count']:.0f} / {h['count'] - h['le0.025']:.0f} / {h['count'] - h['le0.25']:.0f}"
        for n, h in stats.items()))
    for name in failing:
        h = stats[name]
        # A tick that waited on a notification would take at least notify.timeout (1 s):
        # the hung webhook, the hanging command, or the first retry's backoff.
        assert h["le1"] == h["count"], (name, h)
        # Blocking would add >= 1000 ms to a few of ~15 ticks (>= 150 ms on the mean); a loaded
        # 2-core box moves the means by tens of ms.
        assert means[name] < means["none"] + 150, means
        assert daemons[name].proc.poll() is None
        assert stats[name]["count"] >= 0.8 * stats["none"]["count"] - 2, stats
    log = daemons["refused"].log_path.read_text(errors="replace")
    assert "notify_failed" in log and "PATHSECRET" not in log


@pytest.mark.e2e
def test_daemon_refuses_a_header_naming_an_unset_variable(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, {"notify": {"webhook": "http://127.0.0.1:9/x",
                                           "headers": {"Authorization": "Bearer ${OTW_UNSET_FOR_TEST}"}}},
                     wait=False)
    try:
        assert d.proc.wait(timeout=20) == 2
    finally:
        d.cleanup()
    log = d.log_path.read_text()
    assert "notify.headers.Authorization" in log and "OTW_UNSET_FOR_TEST is not set" in log
