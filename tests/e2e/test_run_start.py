"""One config and a readable start: the default config file (XDG, then /etc) read by
`run`, `status` and `top` alike, `--config` winning over it, `run --listen`, the human
start summary on a terminal against JSON lines into a pipe, and a port in use that
says how to choose another. Real daemons, real ptys, real sockets on loopback."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import otelwatch.config as config_module
from otelwatch.config import ConfigError, config_candidates, find_config, load_config, with_listen
from tests.support.e2e_support import http_get, to_toml
from tests.support.procs import REPO, free_port, wait_for
from tests.support.pty_support import read_pty
from tests.system.test_status import SESSION, FakeApi


def _quiet_config(tmp: Path, **http: str) -> dict[str, Any]:
    """A daemon that looks at nothing on the host (no discovery, no tmux, no transcripts)."""
    tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
    (tmp / "sessions").mkdir(exist_ok=True, mode=0o700)
    return {"interval": 0.5, "probe_timeout": 0.4, "state_dir": str(tmp / "state"),
            **({"http": http} if http else {}),
            "sources": {"registry": {"dir": str(tmp / "sessions")}, "processes": {"enabled": False},
                        "tmux": {"enabled": False}, "transcripts": {"enabled": False}}}


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp / "xdg"), "OTELWATCH_STATE_DIR": str(tmp / "state"), **extra}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.pop("NO_COLOR", None)
    return env


def _xdg_config(tmp: Path, data: dict[str, Any]) -> Path:
    path = tmp / "xdg" / "otelwatch" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(data))
    return path


@pytest.fixture
def api() -> Iterator[FakeApi]:
    a = FakeApi()
    try:
        yield a
    finally:
        a.close()


# --------------------------------------------------------------------------- lookup


def test_lookup_order_xdg_then_etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # /etc is the machine's, shared with everything else running here: the constant that
    # names /etc/otelwatch/config.toml is pointed at a file of this test instead.
    system = tmp_path / "etc" / "otelwatch" / "config.toml"
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", system)
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert config_candidates(env) == [tmp_path / "xdg" / "otelwatch" / "config.toml", system]
    assert find_config(env) is None
    system.parent.mkdir(parents=True)
    system.write_text('[http]\nlisten = "127.0.0.1:9001"\n')
    assert find_config(env) == system
    user = _xdg_config(tmp_path, {"http": {"listen": "127.0.0.1:9002"}})
    assert find_config(env) == user  # the user's own file first
    assert load_config(find_config(env)).http.listen == "127.0.0.1:9002"
    # No XDG_CONFIG_HOME (or a relative one, which the XDG spec says to ignore): ~/.config.
    home_cfg = tmp_path / "home" / ".config" / "otelwatch" / "config.toml"
    assert config_candidates({"HOME": str(tmp_path / "home")})[0] == home_cfg
    assert config_candidates({"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": "rel"})[0] == home_cfg


def test_listen_is_validated_like_the_config_key() -> None:
    cfg = with_listen(load_config(None), "127.0.0.1:19999")
    assert cfg.http.listen == "127.0.0.1:19999" and cfg.http.port == 19999
    with pytest.raises(ConfigError, match="--listen"):
        with_listen(load_config(None), "nonsense")
    with pytest.raises(ConfigError, match="not a loopback address"):
        with_listen(load_config(None), "0.0.0.0:9464")


def test_status_takes_its_url_from_the_default_config_and_config_wins(tmp_path: Path, api: FakeApi) -> None:
    port = api.url.rsplit(":", 1)[1]
    _xdg_config(tmp_path, {"http": {"listen": f"127.0.0.1:{port}"}})
    env = _env(tmp_path)
    status = [sys.executable, "-m", "otelwatch", "status"]
    out = subprocess.run(status, capture_output=True, text=True, timeout=30, cwd=str(REPO), env=env)
    assert out.returncode == 0 and str(SESSION["session_id"]) in out.stdout, out.stderr
    elsewhere = tmp_path / "other.toml"
    dead = free_port()
    elsewhere.write_text(f'[http]\nlisten = "127.0.0.1:{dead}"\n')
    out = subprocess.run([*status, "--config", str(elsewhere)], capture_output=True, text=True, timeout=30,
                         cwd=str(REPO), env=env)
    assert out.returncode == 1 and f"127.0.0.1:{dead}" in out.stderr  # --config wins over the default file
    out = subprocess.run([*status, "--config", str(elsewhere), "--url", api.url], capture_output=True, text=True,
                         timeout=30, cwd=str(REPO), env=env)
    assert out.returncode == 0 and str(SESSION["session_id"]) in out.stdout  # --url wins over both


def _pty_run(argv: list[str], env: dict[str, str], until: bytes, timeout: float = 20.0,
             keys: bytes = b"") -> tuple[subprocess.Popen[bytes], bytes, int]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=str(REPO), env=env,
                            start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    while until not in out and time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([master], [], [], 0.3)
        if ready:
            try:
                out += os.read(master, 65536)
            except OSError:
                break
    if keys:
        os.write(master, keys)
    return proc, out, master


def _drain(master: int, proc: subprocess.Popen[bytes], out: bytes) -> bytes:
    out += read_pty(master, proc, timeout=10)
    os.close(master)
    return out


def test_top_takes_its_url_from_the_default_config(tmp_path: Path, api: FakeApi) -> None:
    port = api.url.rsplit(":", 1)[1]
    _xdg_config(tmp_path, {"http": {"listen": f"127.0.0.1:{port}"}})
    env = _env(tmp_path, TERM="xterm", COLUMNS="100", LINES="30")
    proc, out, master = _pty_run([sys.executable, "-m", "otelwatch", "top", "--interval", "0.5"], env,
                                 str(SESSION["session_id"]).encode() + b" ", keys=b"q")
    try:
        proc.wait(timeout=10)
    finally:
        out = _drain(master, proc, out)
    assert proc.returncode == 0
    assert f"127.0.0.1:{port}".encode() in out and b"stuck/no_activity" in out, out[-2000:]


# --------------------------------------------------------------------------- run


def test_run_listen_json_lines_into_a_pipe_with_the_config_file_named(tmp_path: Path) -> None:
    config = _xdg_config(tmp_path, _quiet_config(tmp_path, listen=f"127.0.0.1:{free_port()}"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "otelwatch", "run", "--listen", f"127.0.0.1:{port}"],
                            cwd=str(REPO), env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _healthy(port), timeout=20, interval=0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in err.decode().splitlines()]  # every line is JSON
    started = next(r for r in lines if r["event"] == "daemon.started")
    assert started["listen"] == f"http://127.0.0.1:{port}" and started["config"] == str(config)


def _healthy(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/healthz", timeout=1)[0] == 200
    except OSError:
        return False


def test_run_on_a_terminal_starts_with_a_summary(tmp_path: Path) -> None:
    port = free_port()
    config = _xdg_config(tmp_path, _quiet_config(tmp_path, listen=f"127.0.0.1:{port}"))
    env = _env(tmp_path, TERM="xterm", COLUMNS="160", LINES="40")
    proc, out, master = _pty_run([sys.executable, "-m", "otelwatch", "run"], env, b"Ctrl-C stops")
    try:
        assert _healthy(port)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        out = _drain(master, proc, out)
    text = out.decode(errors="replace").replace("\r", "")
    assert proc.returncode == 0, text
    head = text.split("Ctrl-C stops", 1)[0]
    assert f"config {config}" in head and "sessions" in head and "none yet" in head
    assert f"http://127.0.0.1:{port}/metrics" in head and "notify" in head and "recovery   off" in head
    assert "sources    hooks" in head or "registry" in head
    assert '{"time"' not in text  # readable lines, not JSON


def test_run_with_log_format_json_on_a_terminal(tmp_path: Path) -> None:
    port = free_port()
    _xdg_config(tmp_path, _quiet_config(tmp_path, listen=f"127.0.0.1:{port}"))
    env = _env(tmp_path, TERM="xterm")
    proc, out, master = _pty_run([sys.executable, "-m", "otelwatch", "run", "--log-format", "json"], env,
                                 b"daemon.started")
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        out = _drain(master, proc, out)
    assert b'"event":"daemon.started"' in out and b"Ctrl-C stops" not in out


def test_a_port_in_use_says_how_to_choose_another(tmp_path: Path) -> None:
    _xdg_config(tmp_path, _quiet_config(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "otelwatch", "run", "--listen", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=30, cwd=str(REPO), env=_env(tmp_path))
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert f"--listen 127.0.0.1:{port + 1}" in out.stderr and "http.listen in" in out.stderr, out.stderr


def test_summary_says_what_it_cannot_see_and_redacts_channels(tmp_path: Path) -> None:
    from otelwatch.commands.startup import render_line, start_summary
    from otelwatch.config import default_paths, parse_config

    cfg = parse_config({"probe": {"backend": "psutil"},
                        "notify": {"webhook": "https://hooks.example.com/services/T0/B0/SECRET"}})
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw,nosuid,nodev,noexec,relatime,hidepid=invisible 0 0\n")
    sessions = [{"session_id": "a", "agent": "claude-code", "state": "stalled", "reason": "access_denied",
                 "sample_status": "access_denied", "user": "bob"},
                {"session_id": "b", "agent": "codex", "state": "stuck", "user": "me", "open_fds": 3},
                {"session_id": "c", "agent": "claude-code", "state": "exited", "user": "me"}]
    text = start_summary(cfg, default_paths(cfg, {"HOME": str(tmp_path)}), sessions=sessions,
                         url="http://127.0.0.1:9464", config_file=None, notify_on=True, me="me", pid=1,
                         version="x", ticked=True, tmux_found=False, proc_mounts=str(mounts))
    assert "2 found: 1 claude-code, 1 codex; 1 stalled, 1 stuck" in text  # the exited one is not counted
    assert "1 session(s) of bob: run otelwatch as root, or grant it CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE" in text
    assert "tmux (not installed: panes not mapped)" in text and "wait channels" in text
    assert "webhook https://hooks.example.com/..." in text and "SECRET" not in text
    from otelwatch.commands.startup import _proc_hidepid

    assert _proc_hidepid(str(mounts)) == "hidepid=invisible"  # said to a user who is not root
    assert ("hidepid=invisible" in text) == (os.geteuid() != 0)
    # The readable log lines: a report names the session as a person knows it, control characters shown as ?.
    line = render_line(json.dumps({"time": "t", "level": "warning", "event": "session_stuck", "state": "stuck",
                                   "reason": "no_activity", "who": '"work-0b" claude-code pid 7 in /w\x1b[2J',
                                   "summary": "sleeping"}))
    assert "WARN  STUCK no_activity: \"work-0b\" claude-code pid 7 in /w?[2J: sleeping" in line
    assert render_line(json.dumps({"event": "daemon.started"})) == ""  # the summary said it
