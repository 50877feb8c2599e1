"""`otelwatch exec -- CMD ...`: run an agent as a child and watch its output.

Owns the wrapper's promises: stdin is inherited untouched; stdout is copied
byte for byte (binary, flushed per chunk, so `otelwatch exec -- agent | jq`
works) and each complete line is parsed into an event appended to the
session's spool file; stderr is copied through and its last 64 KiB are kept
in `<state_dir>/exec/<session>.stderr`; the session is registered in the
registry directory while the child runs; SIGINT, SIGTERM, SIGHUP and SIGQUIT
sent to the wrapper are forwarded to the child; the child's exit status is
returned (128+N when killed by signal N, like a shell).

What it must never do: change a byte of the agent's output, fail to run the
agent because otelwatch's directories are unusable (it warns once and runs
anyway), or build a shell command from anything.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from otelwatch.config import Config, default_paths
from otelwatch.events.lines import parse_events
from otelwatch.sources.processes import AGENT_NAMES
from otelwatch.sources.registry import register, unregister, write_atomic
from otelwatch.sources.spool import append_records, make_record, safe_name, spool_path
from otelwatch.sources.tail import LineSplitter

__all__ = ["FORWARDED_SIGNALS", "STDERR_RING_BYTES", "exec_main"]

STDERR_RING_BYTES = 64 << 10
STDERR_FLUSH_EVERY = 1.0  # seconds between rewrites of the stderr ring file
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_SI_KERNEL = 0x80  # si_code of signals the kernel sends (e.g. the terminal's Ctrl-C)
_EXIT_GRACE = 1.0  # after the child exits, how long descendants may keep its pipes open


def exec_main(cmd: list[str], cfg: Config, *, session_id: str | None = None, agent: str | None = None,
              mode: str | None = None) -> int:
    """Run `cmd` under watch; returns its exit status."""
    agent = agent or _agent_from_cmd(cmd)
    session_id = session_id or f"{safe_name(agent)}-{uuid.uuid4().hex[:12]}"
    paths = default_paths(cfg, os.environ)
    warn = _Warner()

    # Signals wait in the mask until the loop forwards them; the child starts with ours restored.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        try:
            child = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, "OTELWATCH_SESSION_ID": session_id},
                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, old_mask),
            )
        except OSError as exc:
            sys.stderr.write(f"otelwatch exec: {cmd[0]}: {exc.strerror or exc}\n")
            return 127 if isinstance(exc, FileNotFoundError) else 126
        run = _Run(child, session_id, agent, paths.spool_dir, paths.state_dir / "exec", warn)
        try:
            spec: dict[str, Any] = {
                "session_id": session_id,
                "pid": child.pid,
                "agent": agent,
                "mode": mode or "headless",
                "events_path": str(spool_path(paths.spool_dir, session_id)),
                "stderr_path": str(run.stderr_path),
                "runtime": {"kind": "exec"},
            }
            if run.create_time is not None:
                spec["create_time"] = run.create_time
            if run.start_ticks is not None:
                spec["start_ticks"] = run.start_ticks  # what the daemon compares (immune to clock steps)
            registered = False
            try:
                register(paths.registry_dir, spec)
                registered = True
            except (OSError, ValueError) as exc:
                warn(f"cannot register the session in {paths.registry_dir}: {exc}")
            try:
                run.loop()
            finally:
                if registered:
                    try:
                        unregister(paths.registry_dir, session_id)
                    except OSError as exc:
                        warn(f"cannot unregister the session: {exc}")
        finally:
            run.finish()
        rc = child.returncode
        return 128 - rc if rc < 0 else rc
    finally:
        # Signals that arrived after the child was reaped have nobody to go to.
        while signal.sigtimedwait(FORWARDED_SIGNALS, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _agent_from_cmd(cmd: list[str]) -> str:
    name = os.path.basename(cmd[0]) if cmd else "agent"
    return AGENT_NAMES.get(name, name) or "agent"


class _Warner:
    """One line on stderr per distinct problem, so a broken directory does not flood."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, message: str) -> None:
        key = message.split(":")[0]
        if key in self.seen:
            return
        self.seen.add(key)
        try:
            sys.stderr.write(f"otelwatch exec: warning: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


class _Run:
    def __init__(self, child: subprocess.Popen[bytes], session_id: str, agent: str, spool_dir: Path,
                 exec_dir: Path, warn: _Warner) -> None:
        self.child = child
        self.session_id = session_id
        self.agent = agent
        self.spool_dir = spool_dir
        self.stderr_path = exec_dir / f"{safe_name(session_id)}.stderr"
        self.warn = warn
        self.create_time, self.start_ticks = _create_time(child.pid)
        self.lines = LineSplitter()
        self.ring = bytearray()
        self.ring_dirty = False
        self.ring_written_at = 0.0
        self.spool_ok = True
        self.forward_stdout = True

    # ------------------------------------------------------------------ loop

    def loop(self) -> None:
        child = self.child
        assert child.stdout is not None and child.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(child.stdout, selectors.EVENT_READ, "out")
        sel.register(child.stderr, selectors.EVENT_READ, "err")
        exited_at: float | None = None
        while sel.get_map():
            for key, _ in sel.select(timeout=0.1):
                data = _read(key.fileobj.fileno())  # type: ignore[union-attr]
                if not data:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]
                elif key.data == "out":
                    if not self._stdout(data):
                        # Our reader went away: close the pipe so the child meets SIGPIPE
                        # too, as it would writing to a closed pipe without us.
                        sel.unregister(key.fileobj)
                        key.fileobj.close()  # type: ignore[union-attr]
                else:
                    self._stderr(data)
            self._forward_signals()
            now = time.monotonic()
            if self.ring_dirty and now - self.ring_written_at >= STDERR_FLUSH_EVERY:
                self._write_ring()
            if exited_at is None and child.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > _EXIT_GRACE:
                break  # a descendant holds the pipes open; the agent itself is done
        for key in list(sel.get_map().values()):
            sel.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
        while True:
            try:
                child.wait(timeout=0.1)
                return
            except subprocess.TimeoutExpired:
                self._forward_signals()

    def finish(self) -> None:
        self._events([self.lines.take_partial()])
        if self.ring_dirty:
            self._write_ring()

    # ------------------------------------------------------------------ streams

    def _stdout(self, data: bytes) -> bool:
        """Copy and parse one chunk; False when our stdout is gone."""
        ok = True
        if self.forward_stdout:
            try:
                _write_all(1, data)
            except OSError:  # BrokenPipeError, or stdout closed
                self.forward_stdout = ok = False
        self._events([line for line, _ in self.lines.feed(data)])
        return ok

    def _stderr(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            _write_all(2, data)
        self.ring += data
        if len(self.ring) > STDERR_RING_BYTES:
            del self.ring[: len(self.ring) - STDERR_RING_BYTES]
        self.ring_dirty = True

    def _events(self, lines: list[bytes]) -> None:
        if not self.spool_ok or not lines:
            return
        now = time.time()
        records: list[dict[str, Any]] = []
        for line in lines:
            # Blank and binary lines are no events (and no count of them is kept for exec).
            for e in parse_events(line, now, "exec", json_only=False) or ():
                records.append(make_record(e, self.session_id, pid=self.child.pid, agent=self.agent,
                                           create_time=self.create_time, start_ticks=self.start_ticks))
        try:
            append_records(self.spool_dir, self.session_id, records)
        except OSError as exc:
            self.spool_ok = False
            self.warn(f"cannot record events in {self.spool_dir}: {exc.strerror or exc}")

    def _write_ring(self) -> None:
        self.ring_dirty = False
        self.ring_written_at = time.monotonic()
        try:
            write_atomic(self.stderr_path, bytes(self.ring))
        except OSError as exc:
            self.warn(f"cannot keep stderr in {self.stderr_path.parent}: {exc.strerror or exc}")

    def _forward_signals(self) -> None:
        while True:
            info = signal.sigtimedwait(FORWARDED_SIGNALS, 0)
            if info is None:
                return
            if info.si_code == _SI_KERNEL:
                continue  # from the terminal: the child, in our process group, got it too
            with contextlib.suppress(OSError):
                self.child.send_signal(info.si_signo)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _create_time(pid: int) -> tuple[float | None, int | None]:
    """(create_time, start ticks since boot) of the child; (None, None) when unreadable."""
    from otelwatch.probe.proctable import read_proc

    try:
        info = read_proc(pid)
    except OSError:
        return None, None
    return (None, None) if info is None else (info.create_time, info.start_ticks)
