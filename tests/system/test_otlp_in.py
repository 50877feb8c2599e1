"""The agents' own OpenTelemetry in ([sources.otlp]): decoding (protobuf, JSON, gzip,
chunked), what each agent's records mean, the join to sessions (own when the sender
is in the session's tree, observed otherwise), the forwarder, and the bounds under
a slow upstream and a flood. Real sockets on loopback and real processes; the
agents' payloads are shaped as captured from the real CLIs (otlp_agent_payloads.py),
the real CLIs themselves are in tests/e2e/realagents/test_otlp_agents.py."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otelwatch.config import parse_config
from otelwatch.daemon import Watcher
from otelwatch.http.front import dechunk
from otelwatch.http.policy import HeadError, HostPolicy, parse_head, refusal
from otelwatch.http.server import HttpServer
from otelwatch.model import EventKind, Reason, State
from otelwatch.sources.otlp_decode import MAX_INFLATED_BYTES, OtlpDecodeError, decode_request
from otelwatch.sources.otlp_events import meaning
from otelwatch.sources.otlp_forward import Forwarder
from tests.support.otlp_agent_payloads import (
    CLAUDE_RESOURCE,
    CODEX_RESOURCE,
    SENDER,
    claude_turn,
    codex_turn,
    gemini_json,
    gemini_retries,
    logs_pb,
    metrics_pb,
    post,
)
from tests.support.otlp_sink import OtlpSink
from tests.support.procs import PROBE_BACKEND, REPO, wait_for

PB = "application/x-protobuf"
JSON = "application/json"


# --------------------------------------------------------------------------- decoding (pure)


def test_protobuf_logs_decode_to_named_records_with_resource_and_attributes() -> None:
    body = logs_pb(CLAUDE_RESOURCE, claude_turn("sess-a"), t=1_800_000_000.0)
    d = decode_request("logs", body, PB)
    assert d.items == 4 and [r.name for r in d.records] == [
        "user_prompt", "api_request", "tool_decision", "tool_result"]  # event.name wins over the body
    rec = d.records[1]
    assert rec.resource["service.name"] == "claude-code"
    assert rec.attrs["input_tokens"] == 12 and rec.attrs["cost_usd"] == pytest.approx(0.000228)
    assert rec.time == pytest.approx(1_800_000_000.001)


def test_json_gzip_and_bad_bodies() -> None:
    body = gemini_retries("g-1", 4242, 2, t=1_800_000_000.0)
    plain = decode_request("logs", body, "application/json; charset=utf-8")
    zipped = decode_request("logs", gzip.compress(body), JSON, "gzip")
    assert plain == zipped and plain.items == 6
    retry = plain.records[2]
    assert retry.name == "gemini_cli.network_retry_attempt" and retry.attrs["attempt"] == 1
    assert retry.resource["process.pid"] == 4242 and retry.attrs["delay_ms"] == pytest.approx(4609.7)
    # A Codex debug line: no event name with spaces is taken for one.
    assert decode_request("metrics", metrics_pb(CLAUDE_RESOURCE, "claude_code.token.usage", 12.0, {}), PB).items == 1
    for bad, ctype, enc in ((b"\xff\x00garbage", PB, ""), (b"{not json", JSON, ""), (b"xx", JSON, "gzip"),
                            (body, "text/plain", ""), (body, JSON, "br")):
        with pytest.raises(OtlpDecodeError):
            decode_request("logs", bad, ctype, enc)
    bomb = gzip.compress(b"0" * (MAX_INFLATED_BYTES + 10))
    with pytest.raises(OtlpDecodeError) as exc:
        decode_request("logs", bomb, JSON, "gzip")
    assert exc.value.status == 413


def test_what_each_agents_records_mean() -> None:
    now = 1_800_000_100.0
    claude = [meaning(r, now, "otlp") for r in decode_request(
        "logs", logs_pb(CLAUDE_RESOURCE, claude_turn("s"), t=now - 5), PB).records]
    assert [m.agent for m in claude] == ["claude-code"] * 4 and claude[0].session_ids == ("s",)
    assert claude[0].event is not None and claude[0].event.turn == "open"
    assert claude[1].usage == {"api_requests": 1, "input_tokens": 12, "output_tokens": 9, "cache_read_tokens": 3,
                               "cache_creation_tokens": 0, "cost_usd": pytest.approx(0.000228)}
    assert claude[1].model == "claude-opus-5-5" and claude[1].event is not None
    assert claude[1].event.kind is EventKind.PROGRESS and claude[1].event.time == pytest.approx(now - 4.999)
    assert claude[2].event is not None and claude[2].event.tool == "Bash"

    codex = [meaning(r, now, "otlp") for r in decode_request("logs", logs_pb(
        CODEX_RESOURCE, codex_turn("conv-1"), body_name=False), PB).records]
    assert [m.agent for m in codex] == ["codex"] * 3 and codex[0].session_ids == ("conv-1",)
    assert codex[2].usage == {"input_tokens": 12, "output_tokens": 9, "cache_read_tokens": 0}

    gem = [meaning(r, now, "otlp") for r in decode_request("logs", gemini_retries("g", 77, 2), JSON).records]
    assert gem[0].pid == 77 and gem[0].session_ids == ("g",)
    kinds = [(m.event.type, m.event.kind, m.event.retry, m.event.retry_attempt) for m in gem if m.event]
    assert kinds[:3] == [("otlp.api_request", EventKind.HEARTBEAT, False, None),
                         ("otlp.api_error", EventKind.HEARTBEAT, True, None),
                         ("otlp.network_retry_attempt", EventKind.HEARTBEAT, True, 1)]
    assert gem[2].event is not None and gem[2].event.retry_max == 5
    dirty = decode_request("logs", logs_pb(CLAUDE_RESOURCE, [("claude_code.api_request", {
        "session.id": "s", "event.name": "api_request", "model": "opus\x1b[2J\x07", "input_tokens": 1})]), PB)
    assert meaning(dirty.records[0], now, "otlp").model == "opus[2J"  # nothing reaches a terminal unescaped
    assert gem[2].event.retry_delay_s == pytest.approx(4.6097)
    assert sum(m.usage.get("api_errors", 0) for m in gem) == 2


# --------------------------------------------------------------------------- the listener's rules


def _head(raw: str) -> Any:
    return parse_head(raw.replace("\n", "\r\n").encode() + b"\r\n")


def test_protobuf_and_chunked_only_on_the_otlp_paths_and_only_when_on() -> None:
    hosts = HostPolicy()
    pb_logs = _head("POST /v1/logs HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/x-protobuf\n"
                    "Content-Length: 3\n")
    assert refusal(pb_logs, hosts, otlp=True) is None
    assert refusal(pb_logs, hosts, otlp=False)[0] == 415  # type: ignore[index]
    pb_events = _head("POST /api/events HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/x-protobuf\n"
                      "Content-Length: 3\n")
    assert refusal(pb_events, hosts, otlp=True)[0] == 415  # type: ignore[index]
    chunked = _head("POST /v1/logs HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
                    "Transfer-Encoding: chunked\n")
    assert chunked.chunked and refusal(chunked, hosts, otlp=True) is None
    assert refusal(chunked, hosts, otlp=False)[0] == 411  # type: ignore[index]
    with pytest.raises(HeadError):  # chunked elsewhere, or with a length (smuggling), is refused
        _head("POST /api/events HTTP/1.1\nHost: 127.0.0.1\nTransfer-Encoding: chunked\n")
    with pytest.raises(HeadError):
        _head("POST /v1/logs HTTP/1.1\nHost: 127.0.0.1\nTransfer-Encoding: chunked\nContent-Length: 5\n")
    cross = _head("POST /v1/logs HTTP/1.1\nHost: evil.example\nContent-Type: application/x-protobuf\n"
                  "Content-Length: 3\n")
    assert refusal(cross, hosts, otlp=True)[0] == 421  # type: ignore[index]


def test_dechunk_waits_for_the_whole_body_and_refuses_garbage() -> None:
    wire = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT"
    for cut in range(len(wire) - 4):
        assert dechunk(bytearray(wire[:cut]), 0) is None
    body, end = dechunk(bytearray(wire), 0)  # type: ignore[misc]
    assert body == b"hello world" and wire[end:] == b"NEXT"
    for bad in (b"zz\r\nhello\r\n", b"5\r\nhelloXX0\r\n\r\n", b"fffffffff\r\n"):
        with pytest.raises(HeadError):
            dechunk(bytearray(bad), 0)


# --------------------------------------------------------------------------- the daemon, end to end


def _cfg(tmp_path: Path, **otlp: Any) -> Any:
    return parse_config({
        "probe": {"backend": PROBE_BACKEND},
        "interval": 0.5, "probe_timeout": 0.4, "state_dir": str(tmp_path / "state"),
        "classify": {"startup_grace": 0, "stall_after": 3},
        "sources": {"registry": {"enabled": False}, "processes": {"enabled": False},
                    "tmux": {"enabled": False}, "transcripts": {"enabled": False},
                    "otlp": {"enabled": True, **otlp}},
    })


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Watcher, HttpServer]]:
    w = Watcher(_cfg(tmp_path), environ={})
    server = HttpServer("127.0.0.1", 0, w, None).start()
    w.start()
    try:
        yield w, server
    finally:
        server.shutdown()
        w.stop()


def _sender(tmp_path: Path, port: int, posts: list[tuple[str, bytes, str, str, bool]]) -> subprocess.Popen[str]:
    """A process that sends `posts` itself and stays alive: a session's own sender."""
    spec = []
    for n, (path, body, ctype, enc, chunked) in enumerate(posts):
        f = tmp_path / f"body{n}"
        f.write_bytes(body)
        spec.append([path, str(f), ctype, enc, chunked])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.Popen([sys.executable, "-c", SENDER, str(port), json.dumps(spec)], stdout=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)


def _statuses(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    out = []
    for _ in range(50):
        line = proc.stdout.readline().strip()
        if not line or line == "done":
            break
        out.append(line)
    return out


def test_a_sessions_own_records_count_its_tokens_and_cost(tmp_path: Path,
                                                          daemon: tuple[Watcher, HttpServer]) -> None:
    w, server = daemon
    sid = "3f1c6a0e-claude-sess"
    sender = _sender(tmp_path, server.port, [
        ("/v1/logs", logs_pb(CLAUDE_RESOURCE, claude_turn(sid)), PB, "", False),
        ("/v1/logs", gzip.compress(logs_pb(CLAUDE_RESOURCE, claude_turn(sid)[1:2])), PB, "gzip", True),
        ("/v1/metrics", metrics_pb(CLAUDE_RESOURCE, "claude_code.token.usage", 12.0, {"session.id": sid}), PB, "",
         False),
    ])
    try:
        w.track(sender.pid, sid, agent="claude-code")
        assert _statuses(sender) == ["200", "200", "200"]

        def usage() -> Any:
            snap = w.session(sid)
            return snap is not None and snap.usage is not None and snap.usage["api_requests"] == 2 and snap

        snap = wait_for(usage, timeout=10)
        assert snap.usage == {"input_tokens": 24, "output_tokens": 18, "cache_read_tokens": 6,  # type: ignore[union-attr]
                              "cache_creation_tokens": 0, "cost_usd": pytest.approx(0.000456), "api_requests": 2,
                              "api_errors": 0, "model": "claude-opus-5-5"}
        sources = {e.source for e in snap.recent_events if e.type.startswith("otlp.")}  # type: ignore[union-attr]
        assert sources == {"otlp"}  # sent by the session's own process: own
        assert w.otlp is not None and w.otlp.stats.own >= 5 and w.otlp.stats.observed == 0
        api = json.loads(_get(server.port, "/api/sessions"))
        assert [s["usage"]["api_requests"] for s in api if s["session_id"] == sid] == [2]

        # The same session id from a process outside the session's tree: observed, dated by arrival.
        before = time.time()
        status, _ = post(server.port, "/v1/logs", logs_pb(CLAUDE_RESOURCE, claude_turn(sid)[:1], t=before - 60), PB)
        assert status == 200
        observed = wait_for(lambda: [e for e in (w.session(sid) or snap).recent_events  # type: ignore[union-attr]
                                     if e.source == "otlp_observed"], timeout=10)
        assert observed[0].time >= before  # type: ignore[index]
    finally:
        sender.kill()
        sender.wait()


def test_gemini_retries_make_the_session_api_retrying_with_attempt_numbers(
        tmp_path: Path, daemon: tuple[Watcher, HttpServer]) -> None:
    """Gemini-shaped JSON records (chunked, as Gemini CLI sends them; the real CLI's drop run
    is in tests/e2e/realagents/test_otlp_agents.py): its per-attempt errors and retry
    announcements are retry heartbeats, so a session whose calls keep failing is
    stalled/api_retrying with the attempt it is on, never stuck."""
    w, server = daemon
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        w.track(sleeper.pid, "gem-sess", agent="gemini")
        prompt = gemini_json("g-chat", sleeper.pid, [("gemini_cli.user_prompt", {"prompt_length": 5})])
        assert post(server.port, "/v1/logs", prompt, JSON, chunked=True)[0] == 200
        deadline = time.monotonic() + 20
        attempt = 0
        verdict = None
        while time.monotonic() < deadline:
            attempt = min(attempt + 1, 5)
            body = gemini_json("g-chat", sleeper.pid, [
                ("gemini_cli.api_error", {"error": "fetch failed"}),
                ("gemini_cli.network_retry_attempt", {"attempt": attempt, "max_attempts": 5, "delay_ms": 1500.0})])
            assert post(server.port, "/v1/logs", body, JSON, chunked=True, chunk=97)[0] == 200
            time.sleep(1.0)
            snap = w.session("gem-sess")
            if snap is not None and snap.state is State.STALLED:
                verdict = snap
                break
        assert verdict is not None and verdict.reason is Reason.API_RETRYING, verdict
        retries = [e for e in verdict.recent_events if e.retry]
        assert retries and retries[-1].retry_max == 5 and retries[-1].retry_attempt == attempt
        assert verdict.usage is not None and verdict.usage["api_errors"] >= 3
        # joined by the resource's process.pid (the chat id is not an id otelwatch knows), sent by
        # a process outside the tree: observed
        assert {e.source for e in retries} == {"otlp_observed"}
    finally:
        sleeper.kill()
        sleeper.wait()


def _get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        while data := s.recv(65536):
            buf += data
    return buf.partition(b"\r\n\r\n")[2]


# --------------------------------------------------------------------------- forwarding


def test_every_record_is_forwarded_unchanged(tmp_path: Path) -> None:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    sink = OtlpSink()
    w = Watcher(_cfg(tmp_path, forward=sink.url + "/otlp"), environ={})
    server = HttpServer("127.0.0.1", 0, w, None).start()
    try:
        sent_pb = [logs_pb(CLAUDE_RESOURCE, claude_turn(f"s{n}")) for n in range(5)]
        for n, body in enumerate(sent_pb):
            assert post(server.port, "/v1/logs", gzip.compress(body) if n % 2 else body, PB,
                        encoding="gzip" if n % 2 else "", chunked=n == 3)[0] == 200
        gem = gemini_retries("g", 1, 2)
        assert post(server.port, "/v1/logs", gem, JSON, chunked=True)[0] == 200
        want = ExportLogsServiceRequest()
        for body in sent_pb:
            want.MergeFromString(body)

        def arrived() -> bool:
            got = ExportLogsServiceRequest()
            for _, ctype, body in list(sink.got):
                if ctype == PB:
                    got.MergeFromString(body)
            return len(got.resource_logs) >= len(want.resource_logs) and any(c == JSON for _, c, _ in sink.got)

        wait_for(arrived, timeout=10)
        got_pb = ExportLogsServiceRequest()
        for path, ctype, body in sink.got:
            if ctype == PB:
                assert path == "/otlp/v1/logs"
                got_pb.MergeFromString(body)
        assert got_pb == want  # every resource, record and attribute as it came, in order
        got_json = [json.loads(b) for _, c, b in sink.got if c == JSON]
        assert got_json == [json.loads(gem)]
        assert w.otlp is not None and w.otlp.forwarder is not None and w.otlp.forwarder.dropped == 0
    finally:
        server.shutdown()
        w.stop()
        sink.close()


def test_a_slow_or_dead_upstream_never_slows_the_sender_nor_grows_memory(tmp_path: Path) -> None:
    failures: list[str] = []
    with socket.socket() as dead:  # accepts (backlog) and never answers
        dead.bind(("127.0.0.1", 0))
        dead.listen(1)
        fwd = Forwarder(f"http://127.0.0.1:{dead.getsockname()[1]}", timeout=0.5, queue_bytes=200_000,
                        failed=lambda signal, n: failures.append(signal))
        body = logs_pb(CLAUDE_RESOURCE, claude_turn("s") * 20)
        t0 = time.perf_counter()
        results = [fwd.submit("logs", PB, body) for _ in range(500)]
        took = time.perf_counter() - t0
        assert took < 0.5, f"submitting 500 bodies took {took:.3f} s"
        assert fwd.queued_bytes <= 200_000 and results.count(False) > 400
        wait_for(lambda: fwd.failures >= 1, timeout=10)
        fwd.close(1.0)
    assert failures and set(failures) == {"logs"}


def test_a_flood_is_answered_fast_and_held_in_bounded_memory(tmp_path: Path) -> None:
    w = Watcher(_cfg(tmp_path, queue=1000, forward="http://127.0.0.1:9/", forward_queue_bytes=1 << 16),
                environ={})  # no tick runs: nothing drains the queue
    server = HttpServer("127.0.0.1", 0, w, None).start()
    try:
        body = logs_pb(CLAUDE_RESOURCE, claude_turn("flood") * 100)  # 400 records per request
        worst = 0.0
        for _ in range(30):
            t0 = time.perf_counter()
            assert post(server.port, "/v1/logs", body, PB)[0] == 200
            worst = max(worst, time.perf_counter() - t0)
        assert w.otlp is not None and len(w.otlp) == 1000  # the queue's bound
        assert w.otlp.stats.dropped == 30 * 400 - 1000
        assert w.otlp.forwarder is not None and w.otlp.forwarder.queued_bytes <= 1 << 16
        assert worst < 1.0, f"slowest answer {worst:.3f} s"
    finally:
        server.shutdown()
        w.stop()


# --------------------------------------------------------------------------- the agent's side


def test_an_agents_connection_to_otelwatch_is_not_its_network() -> None:
    from otelwatch.model import ProcessSample, SampleStatus, TcpConnection, TreeSample
    from otelwatch.probe.own_connections import without_own_connections

    api = TcpConnection("ESTABLISHED", "10.0.0.2:40000", "10.0.0.9:443")
    mine = TcpConnection("ESTABLISHED", "127.0.0.1:40001", "127.0.0.1:9464")
    v6 = TcpConnection("TIME_WAIT", "[::1]:40002", "[::1]:9464")
    other_port = TcpConnection("ESTABLISHED", "127.0.0.1:40003", "127.0.0.1:8080")
    p = ProcessSample(pid=10, ppid=1, create_time=1.0, name="claude", status="S", cpu_seconds=0.0, cpu_percent=0.0,
                      rss_bytes=1, threads=1, tcp={"ESTABLISHED": 3, "TIME_WAIT": 1},
                      connections=(api, mine, v6, other_port))
    s = TreeSample(time=1.0, status=SampleStatus.OK, processes=(p,), tcp={"ESTABLISHED": 3, "TIME_WAIT": 1})
    out = without_own_connections(s, {9464})
    assert out.tcp == {"ESTABLISHED": 2} and out.processes[0].connections == (api, other_port)
    assert out.processes[0].tcp == {"ESTABLISHED": 2}
    assert without_own_connections(s, {1234}) is s and without_own_connections(s, set()) is s


def test_agent_env_prints_what_each_agent_needs(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[http]\nlisten = "127.0.0.1:19464"\n[sources.otlp]\nenabled = true\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(agent: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "otelwatch", "agent-env", agent, *extra], capture_output=True,
                              text=True, env=env, timeout=30)

    claude = run("claude", "--config", str(cfg))
    assert claude.returncode == 0 and claude.stderr == ""
    assert "export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:19464\n" in claude.stdout
    assert "export CLAUDE_CODE_ENABLE_TELEMETRY=1\n" in claude.stdout
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf" in claude.stdout
    gemini = run("gemini", "--config", str(cfg)).stdout
    assert "export GEMINI_TELEMETRY_OTLP_ENDPOINT=http://127.0.0.1:19464\n" in gemini
    assert "GEMINI_TELEMETRY_OTLP_PROTOCOL=http\n" in gemini
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    codex = tomllib.loads(run("codex", "--config", str(cfg)).stdout)
    assert codex["otel"]["exporter"] == {"otlp-http": {"endpoint": "http://127.0.0.1:19464/v1/logs",
                                                       "protocol": "binary"}}
    assert codex["otel"]["metrics_exporter"]["otlp-http"]["endpoint"].endswith("/v1/metrics")
    off = run("claude")  # defaults: the receiver is off, and it says so on stderr
    assert "http://127.0.0.1:9464" in off.stdout and "[sources.otlp] enabled = true" in off.stderr


def test_tops_drill_down_and_the_session_summary_show_the_usage() -> None:
    from otelwatch.commands.top.data import History
    from otelwatch.commands.top.render import render_detail
    from otelwatch.model import SessionSnapshot
    from otelwatch.sessions.report import session_summary

    usage = {"input_tokens": 12, "output_tokens": 9, "cache_read_tokens": 3, "cache_creation_tokens": 0,
             "cost_usd": 0.000228, "api_requests": 1, "api_errors": 2, "model": "claude-opus-5-5"}
    snap = SessionSnapshot(session_id="s", agent="claude-code", pid=1, state=State.ACTIVE,
                           reason=Reason.RECENT_PROGRESS, state_since=0.0, last_event_time=None,
                           last_event_age_s=None, silence_s=0.0, cpu_percent=None, rss_bytes=0, open_fds=None,
                           threads=0, tcp={}, usage=usage)
    text = "\n".join("".join(t for t, _ in line) for line in render_detail(snap.to_json(), History(), time.time()))
    assert "tokens in 12 out 9 cache 3  cost $0.0002  API requests 1 failed 2  model claude-opus-5-5" in text
    assert session_summary(snap, ended_at=1.0, longest_silence_s=0, stalls=0, recoveries=0)["usage"] == usage


def test_otelwatch_run_serves_otlp_on_its_own_address_too(tmp_path: Path) -> None:
    from tests.support.e2e_support import start_daemon
    from tests.support.procs import free_port

    otlp_port = free_port()
    daemon = start_daemon(tmp_path, {"sources": {"otlp": {"enabled": True, "listen": f"127.0.0.1:{otlp_port}"}}})
    try:
        body = logs_pb(CLAUDE_RESOURCE, claude_turn("own-address"))

        def listening() -> bool:  # the OTLP address is bound just after the main listener
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", otlp_port), timeout=1):
                return True
            return False
        wait_for(listening, timeout=15)
        assert post(otlp_port, "/v1/logs", body, PB)[0] == 200
        main_port = int(daemon.url.rsplit(":", 1)[1])
        assert post(main_port, "/v1/logs", body, PB, chunked=True)[0] == 200  # and on the main listener

        def counted() -> Any:
            h = json.loads(_get(main_port, "/healthz"))
            return h["otlp"]["requests"] == 2 and h["otlp"]
        stats = wait_for(counted, timeout=15)
        assert stats["records"] == 8  # type: ignore[index]
        # The protobuf media type stays refused off the OTLP paths.
        assert post(main_port, "/api/events", b"x", PB)[0] == 415
    finally:
        daemon.stop()
