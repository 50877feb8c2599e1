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
import time
from collections.abc import Iterator
from pathlib import Path
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


def start_hook_sockets(cfg: Config, paths: Paths, watcher: Watcher) -> list[Any]:
    """The hook sockets (`sources.hook_socket`): in the state directory, and for a root
    daemon on the default state directory also /run/otelwatch/hook.sock, where other
    users' hooks look. One that cannot be bound is logged; hooks then use the spool."""
    from otelwatch.sources.hook_socket import HookSocket
    from otelwatch.sources.hookpath import SOCKET_NAME

    where = [paths.state_dir / SOCKET_NAME]
    if os.geteuid() == 0 and not cfg.state_dir and not os.environ.get("OTELWATCH_STATE_DIR"):
        run = Path("/run/otelwatch")
        with contextlib.suppress(OSError):
            run.mkdir(mode=0o755, exist_ok=True)
        where.append(run / SOCKET_NAME)
    out = []
    for path in where:
        try:
            out.append(HookSocket(path, watcher.boot_time, watcher.hook_event, watcher._log).start())
        except OSError as exc:
            watcher._log("hook_socket.unavailable", {"path": str(path), "error": exc.strerror or str(exc)},
                         "warning")
    return out


def run_daemon(cfg: Config, *, config_file: str | None = None, log_format: str = "json",
               listen_given: bool = False) -> int:
    """`otelwatch run`: serve until SIGTERM/SIGINT. Returns the process exit code.

    `log_format`: "json" (JSON lines on stderr), "text" (a start summary, then one
    readable line per log line), or "auto" (text when stderr is a terminal)."""
    from otelwatch.commands.startup import TextLog, listen_failed
    from otelwatch.commands.startup import log_format as pick_format
    from otelwatch.http.server import HttpServer
    from otelwatch.sources.registry import RegistryRefused
    from otelwatch.telemetry import Telemetry

    paths = default_paths(cfg)
    text = pick_format(log_format, sys.stderr) == "text"
    try:
        with state_dir_lock(paths):
            # the watcher shuts it down
            log_stream: Any = TextLog(sys.stderr) if text else None  # a text stream like IO[str]
            telemetry = Telemetry(cfg, log_stream=log_stream)
            watcher = Watcher(cfg, paths=paths, telemetry=telemetry)
            try:
                watcher.start()  # refuses an unsafe registry directory before anything listens
            except RegistryRefused as exc:
                print(f"otelwatch: {exc}", file=sys.stderr)
                watcher.stop()
                return 2
            from otelwatch.telemetry.notify import attach

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
                print(listen_failed(cfg.http.listen, exc, config_file, listen_given), file=sys.stderr)
                watcher.stop()
                if notifier is not None:
                    notifier.shutdown(0.5)
                return 1
            hooks = start_hook_sockets(cfg, paths, watcher)
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
                                            "registry_dir": str(paths.registry_dir), "pid": os.getpid(),
                                            "config": config_file})
            if isinstance(log_stream, TextLog):
                _print_summary(cfg, paths, watcher, server.url, config_file, notifier is not None, stop)
                log_stream.release()
            while not stop.wait(0.5):
                pass
            watcher._log("daemon.stopping", {})
            server.shutdown(1.0)
            for hook_socket in hooks:
                hook_socket.shutdown(0.5)
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


def _print_summary(cfg: Config, paths: Paths, watcher: Watcher, url: str, config_file: str | None,
                   notify_on: bool, stop: threading.Event) -> None:
    """The start summary on stderr, once the first tick has counted the sessions (or
    after a bounded wait: a slow first tick must not keep the summary back for long)."""
    import shutil

    from otelwatch import __version__
    from otelwatch.commands.startup import start_summary
    from otelwatch.sessions.names import user_name

    deadline = time.monotonic() + min(10.0, 2 * cfg.interval + cfg.probe_timeout)
    while watcher.health().get("ticks", 0) < 1 and time.monotonic() < deadline and not stop.wait(0.05):
        pass
    ticked = watcher.health().get("ticks", 0) >= 1
    print(start_summary(cfg, paths, sessions=[s.to_json() for s in watcher.sessions()], url=url,
                        config_file=config_file, notify_on=notify_on, me=user_name(os.geteuid()),
                        pid=os.getpid(), version=__version__, ticked=ticked,
                        tmux_found=shutil.which("tmux") is not None), file=sys.stderr, flush=True)
