"""The HTTP listener under abuse: cross-site and rebinding requests, half-open and
trickling connections, POST floods, few file descriptors. Real sockets on loopback,
the real `otelwatch run` where the loop's health is what is measured.

Numbers (RSS, tick duration, latencies) are printed for the report (`pytest -s`).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otelwatch.config import HttpConfig
from otelwatch.daemon import INBOX_DRAIN_PER_TICK, INBOX_MAX, INBOX_MAX_HTTP, Watcher
from otelwatch.http.server import MAX_EVENTS_PER_REQUEST, HostPolicy, HttpServer, parse_head, refusal
from tests.support.e2e_support import FAST, Daemon, http_get, merge, start_daemon, to_toml
from tests.support.procs import REPO, free_port, wait_for

pytestmark = pytest.mark.e2e

TIMEOUT = 1.0  # http.request_timeout of the daemons here
FLOOD_S = 3.0


def exchange(port: int, raw: bytes, timeout: float = 3.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one answer (status, headers, body) until the server closes
    or the Content-Length is in."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


def request(port: int, method: str, path: str, body: bytes = b"", *, host: str | None = None,
            headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Connection: close"]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def proc_status(pid: int) -> tuple[float, int]:
    """(RSS in MB, threads) of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def ticks(url: str, timeout: float = 1.0) -> int:
    status, body = http_get(url + "/healthz", timeout=timeout)
    assert status == 200, body
    return int(json.loads(body)["ticks"])


def tick_histogram(daemon: Daemon) -> tuple[float, float]:
    """(sum, count) of otelwatch_collector_tick_duration_seconds."""
    total = count = 0.0
    for line in daemon.metrics().splitlines():
        if line.startswith("otelwatch_collector_tick_duration_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("otelwatch_collector_tick_duration_seconds_count"):
            count = float(line.split()[-1])
    return total, count


def need_fds(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("abuse"), {"http": {"request_timeout": TIMEOUT}})
    try:
        yield d
    finally:
        d.cleanup()


def port_of(daemon: Daemon) -> int:
    return int(daemon.url.rsplit(":", 1)[1])


# --------------------------------------------------------------------------- policy (pure)


def head(text: str) -> object:
    return parse_head(text.replace("\n", "\r\n").encode() + b"\r\n")


@pytest.mark.parametrize(("text", "status"), [
    ("POST /api/events HTTP/1.1\nHost: 127.0.0.1:9464\nContent-Type: text/plain\nContent-Length: 2\n", 415),
    ("POST /api/events HTTP/1.1\nHost: 127.0.0.1:9464\nContent-Length: 2\n", 415),
    ("POST /api/events HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
     "Origin: https://evil.example\nContent-Length: 2\n", 403),
    ("GET /api/sessions HTTP/1.1\nHost: 127.0.0.1\nOrigin: null\n", 403),
    ("GET /api/sessions HTTP/1.1\nHost: 127.0.0.1\nOrigin: http://localhost.evil.example\n", 403),
    ("GET /api/sessions HTTP/1.1\nHost: rebind.evil.example:9464\n", 421),
    ("GET /api/sessions HTTP/1.1\nHost: 10.0.0.5:9464\n", 421),
    ("GET /api/sessions HTTP/1.1\nHost: ::1\n", 421),
    ("OPTIONS /api/events HTTP/1.1\nHost: 127.0.0.1\nOrigin: http://127.0.0.1:3000\n", 405),
    ("POST /api/events HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n", 411),
    ("POST /api/events HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\nContent-Length: 2000000\n", 413),
    ("POST /api/events HTTP/1.1\nHost: localhost:9464\nContent-Type: Application/JSON; charset=utf-8\n"
     "Origin: http://127.0.0.1:9464\nContent-Length: 2\n", None),
    ("GET /metrics HTTP/1.1\nHost: [::1]:9464\nOrigin: http://[::1]:9464\n", None),
    ("GET /healthz HTTP/1.0\n", None),
])
def test_policy(text: str, status: int | None) -> None:
    problem = refusal(head(text), HostPolicy())  # type: ignore[arg-type]
    assert (problem[0] if problem else None) == status, problem


def test_host_policy_with_allow_remote() -> None:
    assert HostPolicy.for_listen("127.0.0.1", True) == HostPolicy()
    named = HostPolicy.for_listen("10.0.0.5", True)
    assert named.allows("10.0.0.5:9464") and named.allows("localhost") and not named.allows("evil.example")
    assert not HostPolicy.for_listen("10.0.0.5", False).allows("10.0.0.5")
    assert HostPolicy.for_listen("0.0.0.0", True).allows("otelwatch.monitoring.svc:9464")


# --------------------------------------------------------------------------- the real daemon


def test_cross_site_and_rebinding_requests_change_nothing(daemon: Daemon) -> None:
    port = port_of(daemon)
    proc, events = daemon.agent("idle")
    daemon.register("victim", proc.pid, events_path=str(events), mode="interactive")
    before = daemon.wait_state("victim", "idle", "no_open_turn", timeout=10)
    prompt = json.dumps({"session_id": "victim", "hook_event_name": "UserPromptSubmit"}).encode()
    attacks = {
        # A web page's "simple request": no preflight needed, so the type must be refused.
        "text/plain": ({"Content-Type": "text/plain"}, None, 415),
        "text/plain, foreign Origin": ({"Content-Type": "text/plain", "Origin": "http://evil.example"}, None, 403),
        "foreign Origin": ({"Content-Type": "application/json", "Origin": "http://evil.example"}, None, 403),
        "rebinding Host": ({"Content-Type": "application/json"}, f"evil.example:{port}", 421),
    }
    for name, (headers, host, status) in attacks.items():
        got, answer_headers, body = exchange(port, request(port, "POST", "/api/events", prompt, host=host,
                                                          headers=headers))
        assert got == status, (name, body)
        assert "error" in json.loads(body) and "access-control-allow-origin" not in answer_headers
    got, _, _ = exchange(port, request(port, "GET", "/api/sessions", host=f"evil.example:{port}"))
    assert got == 421
    got, headers, _ = exchange(port, request(port, "OPTIONS", "/api/events", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}))
    assert got == 405 and not any(k.startswith("access-control") for k in headers)
    # Two more ticks: the session saw none of it.
    seen = ticks(daemon.url)
    wait_for(lambda: ticks(daemon.url) >= seen + 2, timeout=5)
    after = daemon.session("victim")
    assert after is not None and (after["state"], after["recent_events"]) == ("idle", before["recent_events"])
    # The same prompt from a loopback client, as JSON, is taken: the turn opens.
    got, _, body = exchange(port, request(port, "POST", "/api/events", prompt,
                                          headers={"Content-Type": "application/json"}))
    assert got == 202 and json.loads(body) == {"accepted": 1, "sessions": ["victim"]}
    daemon.wait_state("victim", "active", timeout=5)


def test_client_errors_are_one_counted_line_never_a_traceback(daemon: Daemon) -> None:
    port = port_of(daemon)
    json_type = {"Content-Type": "application/json"}
    nested = b"[" * 100_000
    got, _, body = exchange(port, request(port, "POST", "/api/events", nested, headers=json_type))
    assert got == 400 and b"nested" in body
    many = json.dumps([{"session_id": "s", "type": "x"}] * (MAX_EVENTS_PER_REQUEST + 1)).encode()
    got, _, body = exchange(port, request(port, "POST", "/api/events", many, headers=json_type))
    assert got == 413 and b"1000" in body
    got, _, body = exchange(port, request(port, "POST", "/api/events", b'[{"session_id": "s"}]', headers=json_type))
    assert got == 400 and b"event 0" in body
    for _ in range(20):  # abandoned mid-request
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"POST /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{")
    wait_for(lambda: 'kind="http_client"' in daemon.metrics(), timeout=3)
    log = daemon.log_path.read_text()
    assert "Traceback" not in log
    lines = [json.loads(line) for line in log.splitlines() if '"http.client_error"' in line]
    reasons = [line["reason"] for line in lines]
    assert "JSON nested too deeply" in reasons
    assert reasons.count("connection closed mid-request") == 1  # once a minute, however many


def test_half_open_connections_leave_healthz_and_ticks(daemon: Daemon) -> None:
    n = 1000
    need_fds(n + 200)
    port = port_of(daemon)
    pid = daemon.proc.pid
    rss0, threads0 = proc_status(pid)
    sum0, count0 = tick_histogram(daemon)
    ticks0, t0 = ticks(daemon.url), time.monotonic()
    socks: list[socket.socket] = []
    try:
        for _ in range(n):  # connect, send nothing
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        latencies = []
        for _ in range(6):  # ~2 s of the attack
            start = time.monotonic()
            assert http_get(daemon.url + "/healthz", timeout=1.0)[0] == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.3)
        rss1, threads1 = proc_status(pid)
        # The server closes them (for newcomers, or after request_timeout): all see EOF.
        deadline = time.monotonic() + TIMEOUT + 3
        open_ = list(socks)
        while open_ and time.monotonic() < deadline:
            still = []
            for s in open_:
                try:
                    if s.recv(1) == b"":
                        continue
                except BlockingIOError:
                    still.append(s)
                except OSError:
                    continue
            open_ = still
            time.sleep(0.05)
    finally:
        for s in socks:
            s.close()
    elapsed = time.monotonic() - t0
    ticked = ticks(daemon.url) - ticks0
    sum1, count1 = tick_histogram(daemon)
    mean_tick = (sum1 - sum0) / max(1.0, count1 - count0)
    print(f"\n{n} half-open: healthz max {max(latencies) * 1000:.0f} ms; {ticked} ticks in {elapsed:.1f} s "
          f"(interval {FAST['interval']} s), mean tick {mean_tick * 1000:.1f} ms; "
          f"RSS {rss0:.0f} -> {rss1:.0f} MB, threads {threads0} -> {threads1}; not closed by server: {len(open_)}")
    assert max(latencies) < 1.0
    assert ticked >= 0.6 * elapsed / FAST["interval"]  # cadence intact
    assert threads1 <= threads0 + 1  # a connection never costs a thread
    assert rss1 < rss0 + 30
    assert not open_


def test_post_flood_keeps_memory_bounded_and_ticks_finishing(daemon: Daemon) -> None:
    port = port_of(daemon)
    pid = daemon.proc.pid
    # ~950 KB arrays of 1,000 events: the largest a client may send, as fast as it can.
    event = {"session_id": "flood", "type": "progress", "detail": "x" * 880}
    body = json.dumps([event] * MAX_EVENTS_PER_REQUEST).encode()
    rss0 = proc_status(pid)[0]
    ticks0 = ticks(daemon.url)
    answers: dict[int, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + FLOOD_S

    def client() -> None:
        while time.monotonic() < stop_at:
            try:
                got = exchange(port, request(port, "POST", "/api/events", body,
                                             headers={"Content-Type": "application/json"}), timeout=5)[0]
            except OSError:
                got = 0
            with lock:
                answers[got] = answers.get(got, 0) + 1

    clients = [threading.Thread(target=client) for _ in range(4)]
    for c in clients:
        c.start()
    peak, latencies = rss0, []
    while any(c.is_alive() for c in clients):
        peak = max(peak, proc_status(pid)[0])
        start = time.monotonic()
        assert http_get(daemon.url + "/healthz", timeout=2.0)[0] == 200
        latencies.append(time.monotonic() - start)
        time.sleep(0.2)
    for c in clients:
        c.join(5)
    during = ticks(daemon.url) - ticks0
    seen = ticks(daemon.url)
    wait_for(lambda: ticks(daemon.url) >= seen + 2, timeout=3)  # and it keeps ticking after
    rss2 = proc_status(pid)[0]
    print(f"\nPOST flood 4 x {FLOOD_S:g} s of {len(body) // 1000} KB: answers {answers}; RSS {rss0:.0f} before, "
          f"{peak:.0f} peak, {rss2:.0f} after MB; {during} ticks during; healthz max {max(latencies) * 1000:.0f} ms")
    # Taken until the inbox is full, then refused (whether it fills depends on the machine:
    # test_inbox_bounds pins the numbers).
    assert answers.get(202) and set(answers) <= {202, 429}
    assert during >= 0.5 * FLOOD_S / FAST["interval"]
    assert peak < rss0 + 150


def test_daemon_under_ulimit_256_survives_300_connections(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    port = free_port()
    (tmp_path / "sessions").mkdir(mode=0o700)
    cfg = merge(FAST, {
        "state_dir": str(tmp_path / "state"), "http": {"listen": f"127.0.0.1:{port}"},
        "sources": {"registry": {"dir": str(tmp_path / "sessions")}, "processes": {"enabled": False},
                    "tmux": {"enabled": False}, "transcripts": {"enabled": False}},
    })
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"}
    sleeper = subprocess.Popen(["sleep", "60"])
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "otelwatch", "run", "--config", str(tmp_path / "c.toml")], cwd=REPO, env=env,
            stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    socks: list[socket.socket] = []
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "log").read_text()
            with contextlib.suppress(OSError):
                return http_get(url + "/healthz", timeout=1)[0] == 200
            return False

        wait_for(up, timeout=15, interval=0.1)
        (tmp_path / "sessions" / "s.json").write_text(json.dumps({"session_id": "s", "pid": sleeper.pid}))
        wait_for(lambda: "otelwatch_session_open_fds" in http_get(url + "/metrics")[1].decode(), timeout=5)
        ticks0, cpu0, t0 = ticks(url), cpu_seconds(proc.pid), time.monotonic()
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        time.sleep(1.5)
        start = time.monotonic()
        assert http_get(url + "/healthz", timeout=1.0)[0] == 200
        latency = time.monotonic() - start
        elapsed = time.monotonic() - t0
        ticked = ticks(url) - ticks0
        cpu = (cpu_seconds(proc.pid) - cpu0) / elapsed
        snap = json.loads(http_get(url + "/api/sessions/s")[1])
        print(f"\nulimit 256, 300 connections: healthz {latency * 1000:.0f} ms, {ticked} ticks in {elapsed:.1f} s, "
              f"daemon CPU {cpu * 100:.0f}%, session open_fds {snap['open_fds']}")
        assert proc.poll() is None
        assert ticked >= 0.6 * elapsed / FAST["interval"]
        assert snap["sample_status"] == "ok" and snap["open_fds"] == 3  # still sampled, fully
        assert cpu < 0.5  # no accept() spin on EMFILE
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(10)
        sleeper.kill()
        sleeper.wait()
    assert "Traceback" not in (tmp_path / "log").read_text()


# --------------------------------------------------------------------------- the listener in-process


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[HttpServer]:
    watcher = Watcher(environ={"OTELWATCH_STATE_DIR": str(tmp_path)})
    server = HttpServer("127.0.0.1", 0, watcher, None,
                        http=HttpConfig(max_connections=4, request_timeout=0.5)).start()
    try:
        yield server
    finally:
        server.shutdown()
        watcher.stop()


def test_cap_keep_alive_and_trickling_clients(small_server: HttpServer) -> None:
    port = small_server.port
    get = b"GET /api/sessions HTTP/1.1\r\nHost: localhost\r\n\r\n"
    # A keep-alive connection serves several requests, then idles out.
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        for _ in range(2):
            s.sendall(get)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert s.recv(1) == b""
        assert 0.3 < time.monotonic() - start < 2.0
    # Four trickling requests fill the cap: a newcomer is refused, not threaded.
    slow = [socket.create_connection(("127.0.0.1", port), timeout=3) for _ in range(4)]
    try:
        for s in slow:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.1)
        got, _, body = exchange(port, get)
        assert got == 503 and b"too many connections" in body
        # Each is answered 408 and closed once its request_timeout is over.
        for s in slow:
            answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        for s in slow:
            s.close()
    assert exchange(port, get)[0] == 200
    # Idle (half-open) connections at the cap make room for a newcomer instead.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=3) for _ in range(4)]
    try:
        time.sleep(0.05)
        assert exchange(port, get)[0] == 200
    finally:
        for s in idle:
            s.close()


def test_clients_that_do_not_read_hold_no_worker(tmp_path: Path) -> None:
    """Answers are written by the selector thread: readers that stall block nobody and are
    closed after request_timeout."""
    watcher = Watcher(environ={"OTELWATCH_STATE_DIR": str(tmp_path)})
    big = b"x" * (16 << 20)  # far more than the socket buffers hold
    server = HttpServer("127.0.0.1", 0, watcher, lambda accept: (big, "text/plain"),
                        http=HttpConfig(max_connections=8, request_timeout=2.0)).start()
    stalled = []
    closed = 'otelwatch_probe_errors_total{kind="http_client"}'
    try:
        for _ in range(4):  # more than there are workers
            s = socket.create_connection(("127.0.0.1", server.port), timeout=3)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            stalled.append(s)
        time.sleep(0.1)
        got = exchange(server.port, b"GET /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        # Answered while the stalled readers were still held: it waited for none of them
        # (a condition, not a wall-clock bound a loaded host would break).
        assert got[0] == 200 and closed not in watcher.telemetry.prometheus_exposition()[0].decode()
        # Past request_timeout the server gives up on them (counted, and their buffers freed).
        wait_for(lambda: f"{closed} 4.0" in watcher.telemetry.prometheus_exposition()[0].decode(), timeout=6)
    finally:
        for s in stalled:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, now
            s.close()
        server.shutdown()
        watcher.stop()


def test_inbox_bounds(tmp_path: Path) -> None:
    """POST is refused (queue.Full, counted) at INBOX_MAX_HTTP, all or nothing; the Python
    API drops (counted) only at INBOX_MAX; one tick takes at most INBOX_DRAIN_PER_TICK."""
    import queue

    watcher = Watcher(environ={"OTELWATCH_STATE_DIR": str(tmp_path)})
    try:
        with pytest.raises(ValueError, match="event 1: "):
            watcher.post_event([{"session_id": "s", "type": "x"}, {"type": "x"}])
        assert not watcher._inbox  # all or nothing
        batch = [{"session_id": "s", "type": "progress"}] * MAX_EVENTS_PER_REQUEST
        for _ in range(INBOX_MAX_HTTP // MAX_EVENTS_PER_REQUEST):
            assert len(watcher.post_event(batch)) == MAX_EVENTS_PER_REQUEST
        with pytest.raises(queue.Full, match="inbox is full"):
            watcher.post_event({"session_id": "s", "type": "progress"})
        for _ in range(INBOX_MAX - INBOX_MAX_HTTP + 10):
            watcher.feed("s", b'{"type": "assistant"}')
        assert len(watcher._inbox) == INBOX_MAX
        watcher._drain_inbox(time.time())
        assert len(watcher._inbox) == INBOX_MAX - INBOX_DRAIN_PER_TICK
        text = watcher.telemetry.prometheus_exposition()[0].decode()
        assert 'otelwatch_probe_errors_total{kind="inbox"} 11.0' in text
    finally:
        watcher.stop()


FD_RESERVE_SCRIPT = """
import json, os, resource, socket, sys, tempfile
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
from otelwatch.daemon import Watcher
from otelwatch.http.server import HttpServer, fd_budget

watcher = Watcher(environ={"OTELWATCH_STATE_DIR": tempfile.mkdtemp()})
server = HttpServer("127.0.0.1", 0, watcher, None).start()
cap, ceiling = fd_budget(64)
hog = []  # the rest of the process takes descriptors up to the listener's ceiling
while True:
    fd = os.open("/dev/null", os.O_RDONLY)
    hog.append(fd)
    if fd >= ceiling - 2:
        break

def get():
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as s:
        s.sendall(b"GET /api/sessions HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n")
        return int(s.recv(4096).split()[1])

refused = get()
spare = [os.open("/dev/null", os.O_RDONLY) for _ in range(20)]  # the reserve is still there
for fd in hog + spare:
    os.close(fd)
import time
time.sleep(0.4)  # accepting resumes after the pause
print(json.dumps({"cap": cap, "ceiling": ceiling, "refused": refused, "after": get()}))
server.shutdown()
watcher.stop()
"""


def test_descriptor_reserve_stops_accepting_and_resumes() -> None:
    out = subprocess.run([sys.executable, "-c", FD_RESERVE_SCRIPT], capture_output=True, text=True, cwd=REPO,
                         timeout=30, env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ceiling"] == 128 - 64 and 1 <= got["cap"] <= 64
    assert (got["refused"], got["after"]) == (503, 200)
