"""Benchmark: what the agents' own OpenTelemetry costs otelwatch, and what otelwatch costs the agents.

    python bench/bench_otlp.py                      # both parts, about two minutes
    python bench/bench_otlp.py --skip-agents        # only the receiver's cost and the flood

(1) Receiver cost. `otelwatch run` as a subprocess ([sources.otlp] on, interval
    1 s, no session discovery, so that the daemon's own tick costs next to
    nothing), fed Claude Code-shaped protobuf log requests (100 records each,
    `api_request` and friends, as captured from the real CLI) over keep-alive
    connections from this process. CPU is the daemon's utime+stime from
    /proc/PID/stat across the posting window plus the ticks that drain what
    was posted, minus its idle rate over as long; reported per 1,000 records,
    median of 3 rounds.
    Twice: without forwarding, and forwarding to a local OTLP/HTTP sink.
(2) Flood: two clients post as fast as they can for --flood seconds while the
    upstream accepts and never answers: answer times, records queued and
    dropped, the daemon's RSS over the flood (it must level off).
(3) Exit time. `claude -p` against the fake Anthropic API in its own network
    namespace (tests/e2e/realagents), bare (no telemetry), with its telemetry sent to
    a real `otelwatch run` (what `otelwatch agent-env claude` prints), and the
    same forwarding to an upstream that answers each request only after 20 s;
    and, to tell otelwatch's share from the CLI's own telemetry's and from the
    CPU a running daemon takes on a 2-core host, with its telemetry sent to a
    plain local receiver that answers at once, with and without otelwatch
    running beside it.
    Median of --runs runs each, wall time from start to exit.

Writes markdown to bench/results/otlp.md. A script, not a test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' support modules: tests.support.*, tests.e2e.realagents.*

from tests.support.procs import free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / TICKS


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        return json.loads(resp.read())


def wait_healthy(port: int, timeout: float = 30.0) -> None:
    """Until the daemon on `port` answers /healthz (its OSError past `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            health(port)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Sink:
    def __init__(self, delay: float = 0.0) -> None:
        self.count = 0
        sink = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if delay:
                    time.sleep(delay)
                sink.count += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def receiver_cost(records: int, forward: str, tmp: Path, rounds: int = 3) -> dict:
    from tests.support.otlp_agent_payloads import CLAUDE_RESOURCE, claude_turn, logs_pb

    port = free_port()
    state = tmp / f"state-{bool(forward)}"
    state.mkdir(mode=0o700)
    config = tmp / f"otlp-{bool(forward)}.toml"
    config.write_text("\n".join([
        "interval = 1", f'state_dir = "{state}"', "[http]", f'listen = "127.0.0.1:{port}"',
        "[sources.registry]", "enabled = false", "[sources.processes]", "enabled = false",
        "[sources.tmux]", "enabled = false", "[sources.transcripts]", "enabled = false",
        "[sources.otlp]", "enabled = true", f'forward = "{forward}"',
    ]) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    daemon = subprocess.Popen([sys.executable, "-m", "otelwatch", "run", "--config", str(config)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(port)
        time.sleep(2)  # warm: imports done, first ticks made
        per_request = 100
        body = logs_pb(CLAUDE_RESOURCE, (claude_turn("3f1c6a0e-bench") * 25)[:per_request])
        costs: list[float] = []
        latencies: list[float] = []
        for _ in range(rounds):
            idle_c0, idle_t0 = cpu_s(daemon.pid), time.monotonic()
            time.sleep(3)
            idle_rate = (cpu_s(daemon.pid) - idle_c0) / (time.monotonic() - idle_t0)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # one per round (idle ones close)
            c0, t0 = cpu_s(daemon.pid), time.monotonic()
            for _ in range(records // per_request):
                s = time.perf_counter()
                conn.request("POST", "/v1/logs", body=body, headers={"Content-Type": "application/x-protobuf"})
                resp = conn.getresponse()
                resp.read()
                latencies.append(time.perf_counter() - s)
                assert resp.status == 200, resp.status
            deadline = time.monotonic() + 30
            while health(port)["otlp"]["queued"] and time.monotonic() < deadline:
                time.sleep(0.2)
            if forward:
                while health(port)["otlp"]["forward"]["queued_bytes"] and time.monotonic() < deadline:
                    time.sleep(0.2)
            time.sleep(1.2)  # the tick that drains the last of them
            conn.close()
            wall = time.monotonic() - t0
            costs.append((cpu_s(daemon.pid) - c0 - idle_rate * wall) * 1000 / (records / 1000))
        h = health(port)["otlp"]
        latencies.sort()
        return {"records": h["records"], "cpu_ms_per_1000": statistics.median(costs), "all": costs,
                "p50_ms": latencies[len(latencies) // 2] * 1000, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
                "dropped": h["dropped"], "forwarded": h.get("forward", {}).get("sent")}
    finally:
        daemon.terminate()
        daemon.wait(10)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def flood(seconds: float, tmp: Path) -> dict:
    """Post as fast as two clients can for `seconds`, forwarding to an upstream that accepts
    and never answers: the daemon's RSS over time, what it answered, what it dropped."""
    from tests.support.otlp_agent_payloads import CLAUDE_RESOURCE, claude_turn, logs_pb

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead.listen(1)
    port = free_port()
    state = tmp / "state-flood"
    state.mkdir(mode=0o700)
    config = tmp / "flood.toml"
    config.write_text("\n".join([
        "interval = 1", f'state_dir = "{state}"', "[http]", f'listen = "127.0.0.1:{port}"',
        "[sources.registry]", "enabled = false", "[sources.processes]", "enabled = false",
        "[sources.tmux]", "enabled = false", "[sources.transcripts]", "enabled = false",
        "[sources.otlp]", "enabled = true", f'forward = "http://127.0.0.1:{dead.getsockname()[1]}"',
        "forward_timeout = 2",
    ]) + "\n")
    daemon = subprocess.Popen([sys.executable, "-m", "otelwatch", "run", "--config", str(config)],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    body = logs_pb(CLAUDE_RESOURCE, (claude_turn("3f1c6a0e-flood") * 25)[:100])
    answered: list[float] = []
    stop = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < stop:
            s = time.perf_counter()
            try:
                conn.request("POST", "/v1/logs", body=body, headers={"Content-Type": "application/x-protobuf"})
                conn.getresponse().read()
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            answered.append(time.perf_counter() - s)

    try:
        wait_healthy(port)
        time.sleep(2)
        rss = [rss_mb(daemon.pid)]
        threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        while time.monotonic() < stop:
            time.sleep(seconds / 6)
            rss.append(rss_mb(daemon.pid))
        for t in threads:
            t.join(15)
        h = health(port)["otlp"]
        answered.sort()
        return {"rss": rss, "requests": len(answered), "p50_ms": answered[len(answered) // 2] * 1000,
                "max_ms": answered[-1] * 1000, "records": h["records"], "dropped": h["dropped"],
                "forward": h["forward"]}
    finally:
        daemon.terminate()
        daemon.wait(10)
        dead.close()


def exit_times(runs: int, tmp: Path) -> dict:
    from tests.e2e.realagents.harness import FAKE_PORT, base_env, kill_tree, launch_in_netns, require_real_agents

    clis = require_real_agents()
    out: dict[str, list[float]] = {"telemetry off": [], "telemetry to a plain receiver": [],
                                   "otelwatch running, telemetry to a plain receiver": [],
                                   "telemetry to otelwatch": [], "telemetry to otelwatch, 20 s upstream": []}
    for n in range(runs):
        for name, extra in (("telemetry off", ["--bare"]), ("telemetry to a plain receiver", ["--plain"]),
                            ("otelwatch running, telemetry to a plain receiver", ["--beside", "--after", "0"]),
                            ("telemetry to otelwatch", ["--after", "0"]),
                            ("telemetry to otelwatch, 20 s upstream", ["--slow-sink", "20", "--after", "0"])):
            work = tmp / f"exit-{n}-{''.join(c for c in name if c.isalnum())}"
            (work / "cwd").mkdir(parents=True)
            (work / "state").mkdir(mode=0o700)
            (work / "home").mkdir()
            env = {**base_env(work / "home"), "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{FAKE_PORT}",
                   "ANTHROPIC_API_KEY": "sk-ant-bench-dummy", "DISABLE_AUTOUPDATER": "1",
                   "DISABLE_ERROR_REPORTING": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
            result = work / "result.json"
            argv = [sys.executable, "-m", "realagents.otlp_run", "--agent", "claude", "--out", str(result),
                    "--home", str(work / "home"), "--state", str(work / "state"), *extra, "--",
                    clis.claude, "-p", "otelwatch bench: say hello", "--output-format", "stream-json", "--verbose"]
            server = ["--api", "anthropic", "--behaviour", "normal", "--port", str(FAKE_PORT), "--tool-command",
                      "true", "--stream-seconds", "0", "--log", str(work / "api.log")]
            proc = launch_in_netns(argv, server_args=server, env=env, cwd=work / "cwd",
                                   stderr_path=work / "stderr", info_path=work / "info.json")
            try:
                proc.communicate(timeout=300)
            finally:
                kill_tree(proc.pid)
            r = json.loads(result.read_text())
            assert r["rc"] == 0, (name, r)
            out[name].append(r["elapsed_s"])
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=10_000, help="records per round (3 rounds)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--skip-agents", action="store_true")
    p.add_argument("--skip-receiver", action="store_true", help="only the exit times")
    p.add_argument("--flood", type=float, default=30.0, help="seconds of flood (0: none)")
    args = p.parse_args()
    lines = ["# OTLP in: receiver cost and agents' exit times", "",
             f"host: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start", ""]
    with tempfile.TemporaryDirectory(prefix="owbench-otlp-") as d:
        tmp = Path(d)
        sink = Sink()
        lines += ["| receiver | CPU ms per 1,000 records, median (rounds) | answer p50 / p99 ms | records "
                  "| forwarded bodies |",
                  "|---|---|---|---|---|"]
        for name, forward in () if args.skip_receiver else (("no forwarding", ""),
                                                             ("forwarding to a local OTLP/HTTP sink", sink.url)):
            r = receiver_cost(args.records, forward, tmp)
            lines.append(f"| {name} | {r['cpu_ms_per_1000']:.1f} ({', '.join(f'{c:.0f}' for c in r['all'])}) | "
                         f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | "
                         f"{r['records']} | {r['forwarded'] if r['forwarded'] is not None else '-'} |")
            print(lines[-1], flush=True)
        if args.flood and not args.skip_receiver:
            f = flood(args.flood, tmp)
            lines += ["", f"Flood: two clients posting 100-record requests for {args.flood:g} s, forwarding to an "
                      "upstream that never answers.", "",
                      "| requests answered | answer p50 / max ms | records queued / dropped | forward dropped "
                      "| RSS over the flood, MB |", "|---|---|---|---|---|",
                      f"| {f['requests']} | {f['p50_ms']:.1f} / {f['max_ms']:.0f} | {f['records']} / {f['dropped']} "
                      f"| {f['forward']['dropped']} | {' '.join(f'{r:.0f}' for r in f['rss'])} |"]
            print("\n".join(lines[-3:]), flush=True)
        if not args.skip_agents:
            ex = exit_times(args.runs, tmp)
            lines += ["", f"| `claude -p` against the fake API (median of {args.runs}) | exit after, s | all runs |",
                      "|---|---|---|"]
            for name, values in ex.items():
                lines.append(f"| {name} | {statistics.median(values):.2f} | "
                             f"{', '.join(f'{v:.2f}' for v in values)} |")
                print(lines[-1], flush=True)
    out = REPO / "bench" / "results" / "otlp.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
