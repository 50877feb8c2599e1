"""Demo and test support, not part of the daemon: synthetic agent processes to watch.

Used by `otelwatch demo`, the tests, the examples and the benchmark, always as
separate processes (`python -m otelwatch.fake_agents`); only `commands/demo.py`
imports it (for `SilentServer`), and nothing on the daemon's path ever does. It
ships in the package so that `otelwatch demo` works from an installed wheel.

Each behaves like one real failure or working mode, with real CPU, real sockets
and real children, so otelwatch is exercised against the kernel, not a mock:

    python -m otelwatch.fake_agents KIND [--events FILE] [--host H --port P] ...

Kinds: sleeper, busy, tcp, listen, files, tree, zombie, ignore-term,
and the stream-json agents active, hung, spin, socket, tool, idle, exit, retry.
Every kind ends by itself after --lifetime seconds (default one hour) so a
leaked process cannot outlive a test run for long.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any


class SilentServer:
    """A loopback TCP server that accepts connections and never answers: the API that
    hangs. The peer the `socket`/`tcp` kinds connect to; not part of their tree."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)  # so close() is noticed promptly
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def _emit(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _assistant_text(text: str) -> dict[str, Any]:
    return {"type": "assistant", "message": {"role": "assistant", "content": [{"type": "text", "text": text}]}}


def _tool_use(tool_id: str, name: str, command: str) -> dict[str, Any]:
    return {
        "type": "assistant",
        "message": {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": tool_id, "name": name, "input": {"command": command}}],
        },
    }


def _tool_result(tool_id: str) -> dict[str, Any]:
    return {
        "type": "user",
        "message": {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "ok"}]},
    }


def _spin(deadline: float) -> None:
    x = 0
    while time.time() < deadline:
        for _ in range(10000):
            x += 1


def _hold(deadline: float) -> None:
    while time.time() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.time())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m otelwatch.fake_agents")
    p.add_argument("kind")
    p.add_argument("--events", help="append stream-json events here instead of stdout")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--count", type=int, default=2, help="files to open, connections, children")
    p.add_argument("--depth", type=int, default=2, help="tree depth")
    p.add_argument("--period", type=float, default=1.0, help="seconds between events")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of normal events first")
    p.add_argument("--lifetime", type=float, default=3600.0)
    p.add_argument("--tool-child", default="busy", help="fake agent kind the tool call runs")
    args = p.parse_args(argv)
    deadline = time.time() + args.lifetime
    out: IO[str] = open(args.events, "a", encoding="utf-8") if args.events else sys.stdout  # noqa: SIM115
    kind = args.kind
    keep: list[Any] = []  # sockets and files that must stay open

    if kind == "sleeper":
        _hold(deadline)
    elif kind == "busy":
        _spin(deadline)
    elif kind == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        _hold(deadline)
    elif kind == "tcp":
        for _ in range(args.count):
            keep.append(socket.create_connection((args.host, args.port)))
        print("connected", flush=True)
        _hold(deadline)
    elif kind == "listen":
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.bind((args.host, args.port))
        srv.listen()
        keep.append(srv)
        print(srv.getsockname()[1], flush=True)
        _hold(deadline)
    elif kind == "files":
        for _ in range(args.count):
            keep.append(open(os.devnull, "rb"))  # noqa: SIM115
        print("opened", flush=True)
        _hold(deadline)
    elif kind == "tree":
        children = []
        if args.depth > 1:
            for _ in range(args.count):
                children.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "otelwatch.fake_agents", "tree", "--depth", str(args.depth - 1),
                         "--count", str(args.count), "--lifetime", str(args.lifetime)],
                        stdout=subprocess.DEVNULL,
                    )
                )
        print("spawned", flush=True)
        _hold(deadline)
    elif kind == "zombie":
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        keep.append(child)  # never waited for: it stays a zombie while we live
        print(child.pid, flush=True)
        _hold(deadline)
    else:
        _stream_agent(kind, out, args, deadline, keep)
    return 0


def _stream_agent(kind: str, out: IO[str], args: argparse.Namespace, deadline: float, keep: list[Any]) -> None:
    """Agents that speak Claude Code stream-json, then fall into one behaviour."""
    _emit(out, {"type": "system", "subtype": "init", "session_id": f"fake-{os.getpid()}", "model": "fake"})
    warm_until = time.time() + args.warmup
    n = 0
    while time.time() < warm_until:
        n += 1
        _emit(out, _assistant_text(f"working {n}"))
        time.sleep(args.period)

    if kind == "active":  # keeps making progress
        while time.time() < deadline:
            n += 1
            _emit(out, _assistant_text(f"step {n}"))
            time.sleep(args.period)
    elif kind == "hung":  # alive, silent, idle: the stuck case
        _emit(out, _assistant_text("thinking"))
        _hold(deadline)
    elif kind == "spin":  # silent and burning CPU with no network
        _emit(out, _assistant_text("looping"))
        _spin(deadline)
    elif kind == "socket":  # silent, asleep on a connection that never answers
        keep.append(socket.create_connection((args.host, args.port)))
        _emit(out, _assistant_text("calling the API"))
        _hold(deadline)
    elif kind == "tool":  # a long, legitimate tool call with a working child
        _emit(out, _tool_use("toolu_1", "Bash", "make -j2"))
        child = subprocess.Popen([sys.executable, "-m", "otelwatch.fake_agents", args.tool_child,
                                  "--lifetime", str(max(0.0, deadline - time.time()))])
        keep.append(child)
        while time.time() < deadline and child.poll() is None:
            time.sleep(args.period)
        _emit(out, _tool_result("toolu_1"))
        _hold(deadline)
    elif kind == "retry":  # the API keeps failing; the agent keeps retrying
        _emit(out, _assistant_text("calling the API"))
        while time.time() < deadline:
            _emit(out, {"type": "system", "subtype": "api_retry", "attempt": n, "error": "overloaded"})
            n += 1
            time.sleep(args.period)
    elif kind == "idle":  # an interactive session whose turn ended: waiting for its user
        _emit(out, {"type": "result", "subtype": "success", "is_error": False})
        _hold(deadline)
    elif kind == "exit":  # finishes its work and exits
        _emit(out, {"type": "result", "subtype": "success", "is_error": False})
    else:
        raise SystemExit(f"unknown fake agent kind {kind!r}")


if __name__ == "__main__":
    sys.exit(main())
