"""One real agent CLI with its own OpenTelemetry pointed at a real otelwatch.

Runs as the command of `tests.e2e.realagents.netns` (so inside the agent's own network
namespace, next to the fake API): starts `otelwatch run` on this namespace's
loopback with [sources.otlp] on (a sibling of the CLI, as a user runs it), sets the agent up with exactly
what `otelwatch agent-env AGENT` prints, runs the CLI, records the daemon's view
of every session (/api/sessions) every half second while it runs and for a few seconds after it
exits, and writes it all as JSON (`--out`).

Options add an upstream the receiver forwards to: `--sink` (a local OTLP/HTTP
receiver that stores what it gets), `--slow-sink S` (one that answers each
request only after S seconds), `--vm BINARY` (a real VictoriaMetrics, queried for
the agent's metrics afterwards). `--bare` runs the CLI without telemetry and
without otelwatch, `--plain` with its telemetry sent to a plain local receiver
that answers at once (the baselines for exit times).

Never leaves anything running: the netns runner kills what is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support.otlp_sink import OtlpSink
from tests.support.procs import free_port

POLL_S = 0.5


def start_vm(binary: str, data: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([binary, f"-httpListenAddr=127.0.0.1:{port}", f"-storageDataPath={data}",
                             "-opentelemetry.usePrometheusNaming", "-search.latencyOffset=0s",
                             "-search.disableCache", "-loggerLevel=WARN"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("victoria-metrics did not start")


def vm_query(url: str, promql: str) -> list[Any]:
    with urllib.request.urlopen(f"{url}/internal/force_flush", timeout=5):
        pass
    q = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=5) as resp:
        return list(json.loads(resp.read())["data"]["result"])


def agent_env(agent: str, base: str, home: Path) -> dict[str, str]:
    """What `otelwatch agent-env AGENT` prints, applied: exports, or Codex's [otel] section."""
    from otelwatch.commands.agent_env import snippet

    text = snippet(agent, base)
    if agent == "codex":
        config = home / ".codex" / "config.toml"
        config.write_text(config.read_text() + "\n" + text)
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            out[key] = value
    return out


def tree(root: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    stat = fh.read()
                kids.setdefault(int(stat[stat.rindex(b")") + 2:].split()[1]), []).append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    out, todo = {root}, [root]
    while todo:
        for kid in kids.get(todo.pop(), ()):
            if kid not in out:
                out.add(kid)
                todo.append(kid)
    return out


def _get(base: str, path: str) -> Any:
    try:
        with urllib.request.urlopen(base + path, timeout=5) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def snap_row(t: float, s: Mapping[str, Any]) -> dict[str, Any]:
    retries = [(e.get("retry_attempt"), e.get("retry_max"), e.get("source")) for e in s.get("recent_events", [])
               if e.get("retry")]
    return {"t": t, "session_id": s["session_id"], "agent": s["agent"], "pid": s["pid"], "state": s["state"],
            "reason": s["reason"], "usage": s.get("usage"), "retries": retries,
            "otlp_sources": sorted({e.get("source") for e in s.get("recent_events", [])
                                    if str(e.get("type", "")).startswith("otlp.")})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="otlp_run")
    p.add_argument("--agent", required=True, choices=("claude", "codex", "gemini"))
    p.add_argument("--out", required=True)
    p.add_argument("--home", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--after", type=float, default=4.0, help="seconds to keep watching after the CLI exits")
    p.add_argument("--sink", action="store_true")
    p.add_argument("--slow-sink", type=float, default=0.0)
    p.add_argument("--vm", default="")
    p.add_argument("--bare", action="store_true")
    p.add_argument("--plain", action="store_true", help="telemetry on, sent to a plain local receiver, no otelwatch")
    p.add_argument("--beside", action="store_true",
                   help="otelwatch runs and watches, but the telemetry goes to a plain local receiver")
    p.add_argument("--stall-after", type=float, default=10.0)
    p.add_argument("--max-s", type=float, default=600.0, help="end the CLI (SIGTERM) after this long")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    home = Path(args.home)
    result: dict[str, Any] = {"agent": args.agent}
    env = dict(os.environ)
    if args.bare or args.plain:
        if args.plain:
            env.update(agent_env(args.agent, OtlpSink().url, home))
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, timeout=600)
        result.update(rc=proc.returncode, elapsed_s=time.monotonic() - t0)
        Path(args.out).write_text(json.dumps(result))
        return 0

    vm = None
    sink = None
    forward = ""
    if args.vm:
        vm, vm_url = start_vm(args.vm, Path(args.state) / "vmdata")
        forward = vm_url + "/opentelemetry"
    elif args.sink or args.slow_sink:
        sink = OtlpSink(args.slow_sink)
        forward = sink.url
    port = free_port()
    config = Path(args.state) / "otelwatch.toml"
    config.write_text("\n".join([
        "interval = 0.5", "probe_timeout = 0.4", f'state_dir = "{args.state}"',
        "[http]", f'listen = "127.0.0.1:{port}"',
        "[classify]", "startup_grace = 2", f"stall_after = {args.stall_after}",
        "[sources.registry]", "enabled = false", "[sources.tmux]", "enabled = false",
        "[sources.otlp]", "enabled = true", f'forward = "{forward}"', "forward_timeout = 2",
    ]) + "\n")
    base = f"http://127.0.0.1:{port}"
    with open(Path(args.state) / "daemon.log", "wb") as log:
        # The real daemon, a sibling of the CLI (never its parent: otelwatch does not watch its own tree).
        daemon = subprocess.Popen([sys.executable, "-m", "otelwatch", "run", "--config", str(config)],
                                  env={**env, "HOME": str(home)}, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (_get(base, "/healthz") or {}).get("ticks", 0) < 3:
            time.sleep(0.1)  # warm: its first ticks (discovering the host's agents) are behind it
        env.update(agent_env(args.agent, OtlpSink().url if args.beside else base, home))
        rows: list[dict[str, Any]] = []
        t0 = time.monotonic()
        proc2 = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        out_chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: out_chunks.append(proc2.stdout.read() if proc2.stdout else b""),
                                  daemon=True)
        reader.start()
        exit_time: list[float] = []  # taken the moment the CLI exits, not at the next poll
        waiter = threading.Thread(target=lambda: (proc2.wait(), exit_time.append(time.monotonic())), daemon=True)
        waiter.start()
        exited_at = None
        sessions: list[Any] = []
        mine: set[int] = {proc2.pid}  # the CLI's processes (other people's agents run on this host too)
        while True:
            rc = proc2.poll()
            now = time.monotonic()
            if rc is not None and exited_at is None:
                exited_at = now
            sessions = _get(base, "/api/sessions") or sessions
            if rc is None:
                mine |= tree(proc2.pid)
            rows += [{**snap_row(time.time(), s), "mine": s["pid"] in mine} for s in sessions]
            if exited_at is not None and now - exited_at >= args.after:
                break
            if now - t0 > args.max_s and rc is None:
                proc2.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc2.wait(5)
                proc2.kill()
            time.sleep(POLL_S)
        reader.join(5)
        health = _get(base, "/healthz") or {}
        waiter.join(5)
        result.update(rc=proc2.returncode, elapsed_s=(exit_time[0] if exit_time else time.monotonic()) - t0, rows=rows,
                      sessions=sessions, stats=health.get("otlp"),
                      stdout_tail=b"".join(out_chunks)[-3000:].decode("utf-8", "replace"))
    finally:
        daemon.terminate()  # SIGTERM: the forwarder sends what it still holds
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    if sink is not None:
        result["sink"] = [[path, ctype, body.hex()] for path, ctype, body in sink.got]
    if vm is not None:
        deadline = time.monotonic() + 20
        series: list[Any] = []
        while time.monotonic() < deadline and not series:
            series = vm_query(vm_url, '{__name__=~"claude_code_.*|codex_.*"}')
            time.sleep(0.5)
        result["vm_series"] = [s["metric"] for s in series]
        vm.terminate()
        vm.wait(10)
    Path(args.out).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
