"""Run the real `otelwatch run` CLI against real fake agents; read it over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otelwatch.sources.registry import register
from tests.support.procs import FAKE, PROBE_BACKEND, REPO, free_port, wait_for

# Thresholds of seconds, so every state is reached within a few seconds.
FAST = {
    "interval": 0.5,
    "probe_timeout": 0.4,
    "classify": {"startup_grace": 1, "stall_after": 3, "tool_stall_after": 60,
                 "repeat_base": 2, "repeat_max": 8, "exited_retention": 60},
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for test configs: scalars first, then sub-tables."""
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = "\n".join(lines) + "\n"
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}{k}"
            body = to_toml(v, name + ".")
            out += f"\n[{name}]\n" + body
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    state_dir: Path
    registry: Path
    config_path: Path
    log_path: Path
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def sessions(self) -> list[dict[str, Any]]:
        status, body = http_get(self.url + "/api/sessions")
        assert status == 200, body
        return json.loads(body)

    def session(self, sid: str) -> dict[str, Any] | None:
        return next((s for s in self.sessions() if s["session_id"] == sid), None)

    def wait_state(self, sid: str, state: str, reason: str | None = None, timeout: float = 15.0) -> dict[str, Any]:
        last: list[dict[str, Any] | None] = [None]

        def check() -> dict[str, Any] | None:
            s = self.session(sid)
            last[0] = s
            if s and s["state"] == state and (reason is None or s["reason"] == reason):
                return s
            return None

        try:
            return wait_for(check, timeout=timeout, interval=0.2)  # type: ignore[return-value]
        except AssertionError:
            raise AssertionError(f"{sid} never became {state}/{reason}; last seen: {last[0]}\n"
                                 f"daemon log tail:\n{self.log_tail()}") from None

    def metrics(self) -> str:
        status, body = http_get(self.url + "/metrics")
        assert status == 200
        return body.decode()

    def register(self, sid: str, pid: int, **fields: Any) -> None:
        register(self.registry, {"session_id": sid, "pid": pid, **fields})

    def agent(self, kind: str, *args: str, events: bool = True,
              lifetime: float = 120) -> tuple[subprocess.Popen[bytes], Path]:
        path = self.state_dir / f"{kind}-{len(self.agents)}.jsonl"
        argv = [*FAKE, kind, "--lifetime", str(lifetime), *args]
        if events:
            argv += ["--events", str(path)]
        proc = subprocess.Popen(argv, cwd=str(REPO), stdout=subprocess.DEVNULL, start_new_session=True)
        self.agents.append(proc)
        return proc, path

    def log_events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines so far, as objects (other lines skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> float:
        """SIGTERM the daemon; returns how long it took to exit."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return time.monotonic() - t0

    def cleanup(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(timeout=5)
        self.stop()


def start_daemon(tmp: Path, extra: dict[str, Any] | None = None, *, wait: bool = True,
                 env: dict[str, str] | None = None) -> Daemon:
    tmp.mkdir(parents=True, exist_ok=True)
    os.chmod(tmp, 0o700)
    port = free_port()
    state_dir = tmp / "state"
    registry = tmp / "sessions"
    registry.mkdir(mode=0o700, exist_ok=True)
    cfg = merge(FAST, {
        "probe": {"backend": PROBE_BACKEND},
        "state_dir": str(state_dir),
        "http": {"listen": f"127.0.0.1:{port}"},
        "sources": {"registry": {"dir": str(registry)}, "processes": {"enabled": False},
                    "tmux": {"enabled": False}, "transcripts": {"enabled": False}},
    })
    cfg = merge(cfg, extra or {})
    config_path = tmp / "otelwatch.toml"
    config_path.write_text(to_toml(cfg))
    log_path = tmp / "daemon.log"
    full_env = {**os.environ, "OTELWATCH_STATE_DIR": str(state_dir), **(env or {})}
    if "OTEL_EXPORTER_OTLP_ENDPOINT" not in (env or {}):
        full_env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)  # a developer's own backend stays out of tests
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "otelwatch", "run", "--config", str(config_path)],
                                cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, env=full_env)
    daemon = Daemon(proc, f"http://127.0.0.1:{port}", state_dir, registry, config_path, log_path)
    if wait:
        try:
            wait_up(daemon)
        except BaseException:
            daemon.stop()  # the caller never gets it to stop: a failed start must not leak a daemon
            raise
    return daemon


def wait_up(daemon: Daemon, timeout: float = 30.0) -> None:
    """Wait for /healthz 200. A loop that ticks but late (/healthz is 503 past 3 intervals,
    which a loaded box with the process matcher on can keep up for a while) is up too once
    `timeout` has passed: the tests that mean punctuality read /healthz themselves."""
    deadline = time.monotonic() + timeout
    last, ticked = "no answer", False
    while True:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log_tail()}")
        try:
            status, body = http_get(daemon.url + "/healthz", timeout=1)
            if status == 200:
                return
            last = f"{status} {body.decode(errors='replace')}"
            ticked = ticked or json.loads(body).get("ticks", 0) >= 1
        except (OSError, ValueError, AttributeError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            if ticked:
                return
            raise AssertionError(f"daemon not up within {timeout:.0f} s (/healthz: {last}):\n{daemon.log_tail()}")
        time.sleep(0.1)
