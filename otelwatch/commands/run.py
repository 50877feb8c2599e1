"""`otelwatch run`: the daemon process around the loop: one daemon per state directory,
the HTTP listener, notifications, signals and the standard-library log handler.

Owns the exit codes of `otelwatch run`: 0 after SIGTERM/SIGINT, 1 when another
daemon holds the state directory or the listener cannot bind, 2 for an unsafe
state or registry directory or a bad notification header. It must never start
a second loop on a state directory another daemon holds: the recovery state
file and the spool have one writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from otelwatch.config import Config, Paths, default_paths
from otelwatch.daemon import Watcher
from otelwatch.sources.trust import untrusted_dir

__all__ = ["AlreadyRunning", "StateDirRefused", "run_daemon", "state_dir_lock"]



class AlreadyRunning(RuntimeError):
    pass


class StateDirRefused(RuntimeError):
    """The state directory is not safe to trust: others could write its spool or state."""


@contextlib.contextmanager
def state_dir_lock(paths: Paths) -> Iterator[None]:
    """One daemon per state directory: a second one refuses to start."""
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The spool in it can open turns and the recovery state names PIDs: like the
    # registry directory, it must be ours and closed to everyone else.
    why = untrusted_dir(paths.state_dir, os.geteuid(), "state directory")
    if why:
        raise StateDirRefused(f"{why}; refusing it: run `chmod go-w {paths.state_dir}` or set state_dir")
    fd = os.open(paths.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise AlreadyRunning(
                f"another otelwatch (pid {holder}) is running on state directory {paths.state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def run_daemon(cfg: Config) -> int:
    """`otelwatch run`: serve until SIGTERM/SIGINT. Returns the process exit code."""
    from otelwatch.server import HttpServer
    from otelwatch.sources.registry import RegistryRefused
    from otelwatch.telemetry import Telemetry

    paths = default_paths(cfg)
    try:
        with state_dir_lock(paths):
            telemetry = Telemetry(cfg)  # the watcher shuts it down
            watcher = Watcher(cfg, paths=paths, telemetry=telemetry)
            try:
                watcher.start()  # refuses an unsafe registry directory before anything listens
            except RegistryRefused as exc:
                print(f"otelwatch: {exc}", file=sys.stderr)
                watcher.stop()
                return 2
            from otelwatch.notify import attach

            try:
                notifier = attach(watcher)
            except ValueError as exc:  # ConfigError: a header names an unset variable
                print(f"otelwatch: config error: {exc}", file=sys.stderr)
                watcher.stop()
                return 2
            try:
                server = HttpServer(
                    cfg.http.host, cfg.http.port, watcher,
                    telemetry.prometheus_exposition if telemetry.prometheus_enabled else None,
                ).start()
            except OSError as exc:
                print(f"otelwatch: cannot listen on {cfg.http.listen}: {exc.strerror or exc}", file=sys.stderr)
                watcher.stop()
                if notifier is not None:
                    notifier.shutdown(0.5)
                return 1
            otlp_server = None
            if watcher.otlp is not None and cfg.sources.otlp.listen:
                # [sources.otlp] listen: the agents' telemetry on an address of its own.
                from otelwatch.config import split_listen

                try:
                    otlp_server = HttpServer(*split_listen(cfg.sources.otlp.listen, "sources.otlp.listen"),
                                             watcher, None).start()
                except OSError as exc:
                    print(f"otelwatch: cannot listen on {cfg.sources.otlp.listen}: {exc.strerror or exc}",
                          file=sys.stderr)
                    server.shutdown(1.0)
                    watcher.stop()
                    return 1
            stop = threading.Event()

            def on_signal(signum: int, frame: Any) -> None:
                stop.set()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            # One log path: the modules' standard-library logging joins the JSON lines.
            handler = telemetry.logging_handler(logging.INFO)
            package_log = logging.getLogger("otelwatch")
            package_log.addHandler(handler)
            package_log.setLevel(logging.INFO)
            package_log.propagate = False  # not a second, plain-text copy on stderr
            watcher._log("daemon.started", {"listen": server.url, "state_dir": str(paths.state_dir),
                                            "registry_dir": str(paths.registry_dir), "pid": os.getpid()})
            while not stop.wait(0.5):
                pass
            watcher._log("daemon.stopping", {})
            server.shutdown(1.0)
            if otlp_server is not None:
                otlp_server.shutdown(1.0)
            watcher.stop(1.5)
            if notifier is not None:
                notifier.shutdown(1.0)
            package_log.removeHandler(handler)
            return 0
    except AlreadyRunning as exc:
        print(f"otelwatch: {exc}", file=sys.stderr)
        return 1
    except StateDirRefused as exc:
        print(f"otelwatch: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"otelwatch: cannot use state directory {paths.state_dir}: {exc}", file=sys.stderr)
        return 1
