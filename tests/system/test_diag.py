"""`otelwatch diag PID`: a real tree as a table and as JSON; a missing PID is one line, exit 1."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from otelwatch.commands.diag import diag_main
from tests.support.procs import REPO, Spawner, TcpServer


def test_diag_table_of_a_real_tree(spawn: Spawner, tcp_server: TcpServer) -> None:
    agent = spawn("tcp", "--host", "127.0.0.1", "--port", str(tcp_server.port), "--count", "1", ready=True)
    out, err = io.StringIO(), io.StringIO()
    assert diag_main(agent.pid, stdout=out, stderr=err) == 0
    text = out.getvalue()
    assert err.getvalue() == ""
    assert f"tree of PID {agent.pid}: status ok" in text
    assert "WCHAN" in text and "ESTABLISHED=1" in text
    assert f"-> 127.0.0.1:{tcp_server.port}" in text  # the remote endpoint
    row = next(line for line in text.splitlines() if line.startswith(f"{agent.pid} "))
    assert "otelwatch.fake_agents tcp" in row
    assert "?" not in row.split()[4]  # CPU is a real rate: two samples were taken


def test_diag_json(spawn: Spawner) -> None:
    agent = spawn("tree", "--count", "1", "--depth", "2", ready=True)
    out = io.StringIO()
    assert diag_main(agent.pid, as_json=True, stdout=out, stderr=io.StringIO()) == 0
    data = json.loads(out.getvalue())
    assert data["status"] == "ok" and data["root"]["pid"] == agent.pid
    assert data["children"] == 1 and len(data["processes"]) == 2
    root = data["processes"][0]
    assert root["pid"] == agent.pid and isinstance(root["cpu_percent"], float)
    assert isinstance(root["wchan"], str) and root["num_fds"] >= 3
    assert data["tcp"] == {}


def test_diag_nonexistent_pid_via_cli(spawn: Spawner) -> None:
    gone = spawn("sleeper")
    gone.kill()
    gone.wait()
    out = subprocess.run([sys.executable, "-m", "otelwatch", "diag", str(gone.pid)], cwd=str(REPO),
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert lines == [f"otelwatch diag: no process with PID {gone.pid}"]
