"""Run a command next to a fake API inside a fresh network namespace.

Used as `unshare -n -- python3 -m tests.e2e.realagents.netns --server-json '[...]' --info F -- CMD ...`:
brings the namespace's loopback up, starts `tests.e2e.realagents.fakeapi` with the given
arguments, waits until it listens, writes `--info` (JSON: this runner's pid,
the server's pid and port, the command's pid, the namespace), runs CMD with
stdio inherited, and exits with CMD's status (128+N when killed by signal N).

It is a child subreaper: what CMD leaves behind (a Bash tool's children run in
sessions of their own) is reparented to it rather than to init, and killed when
CMD ends, so nothing of a scenario outlives it.

What it must never do: run CMD on a network that reaches anywhere but this
namespace's loopback (it refuses when any interface other than `lo` exists),
or leave the fake server or anything CMD started running after CMD ended.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["loopback_up", "main"]

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_PR_SET_CHILD_SUBREAPER = 36
READY_TIMEOUT = 15.0


def loopback_up() -> None:
    """`ip link set lo up`, without needing iproute2: the interface-flags ioctl."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def _isolated() -> str | None:
    """None when only `lo` exists here; otherwise what is wrong."""
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except OSError as exc:
        return f"cannot list network interfaces: {exc}"
    # /sys/class/net shows the namespace of whoever mounted sysfs, so ask the kernel too.
    try:
        with open("/proc/net/dev") as fh:
            here = sorted(line.split(":")[0].strip() for line in fh.readlines()[2:])
    except OSError as exc:
        return f"cannot read /proc/net/dev: {exc}"
    if here != ["lo"]:
        return f"not an isolated network namespace: interfaces {here} (sysfs shows {names})"
    return None


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _descendants() -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    stat = fh.read()
                kids.setdefault(int(stat[stat.rindex(b")") + 2:].split()[1]), []).append(int(entry.name))
    out, todo = [], list(kids.get(os.getpid(), ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def _kill_leftovers() -> None:
    """SIGKILL everything still below us (stopped first, so nothing forks meanwhile) and reap it."""
    for _ in range(5):
        pids = _descendants()
        if not pids:
            return
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.02)
            except ChildProcessError:
                break


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netns", description=__doc__.splitlines()[0])
    p.add_argument("--server-json", required=True, help="fakeapi arguments as a JSON list of strings")
    p.add_argument("--info", required=True, help="write pids, port and namespace here (JSON)")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given (-- CMD ...)")
    server_args = json.loads(args.server_json)
    if not isinstance(server_args, list) or not all(isinstance(a, str) for a in server_args):
        p.error("--server-json must be a JSON list of strings")

    loopback_up()
    _become_subreaper()
    problem = _isolated()
    if problem:
        print(f"netns: refusing to run {cmd[0]}: {problem}", file=sys.stderr)
        return 125

    server = subprocess.Popen([sys.executable, "-m", "tests.e2e.realagents.fakeapi", *server_args],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], READY_TIMEOUT)
        line = server.stdout.readline() if ready else b""
        if not line:
            print(f"netns: the fake API did not start within {READY_TIMEOUT} s", file=sys.stderr)
            return 125
        port = json.loads(line)["port"]
        info = {"runner_pid": os.getpid(), "server_pid": server.pid, "port": port,
                "netns": os.readlink("/proc/self/ns/net")}
        # Signals for us go to the command; it decides how to end (as under a terminal).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                 preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, set()))
        _write_json(Path(args.info), {**info, "child_pid": child.pid, "started": time.time()})
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = child.wait(timeout=0.2)
                break
            sig = signal.sigtimedwait({signal.SIGTERM, signal.SIGINT, signal.SIGHUP}, 0)
            if sig is not None:
                with contextlib.suppress(OSError):
                    child.send_signal(sig.si_signo)
        return 128 - rc if rc < 0 else rc
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        _kill_leftovers()


if __name__ == "__main__":
    sys.exit(main())
