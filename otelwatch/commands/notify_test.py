"""`otelwatch notify test [--config FILE]`: send a sample notification through every channel.

Reads the same config as `otelwatch run` (`--config`, else the default config
file when present), checks it like `check-config` does (the command's program
on PATH, every `${VAR}` of the headers set), then delivers one sample incident
message once (no queue, no retries) through the command and the webhook, and
says per channel what happened. Exit 0 when every channel delivered, 1 when
one failed or none is configured, 2 for a bad config.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, TextIO

__all__ = ["notify_test_main", "sample_message"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def sample_message(now: float | None = None) -> dict[str, Any]:
    """A stuck report as a real incident's first message would carry it, marked as a test."""
    t = time.time() if now is None else now
    return {
        "event": "session.stuck", "test": True,
        "session_id": "otelwatch-notify-test", "agent": "claude-code", "pid": os.getpid(),
        "name": "notify-test", "cwd": os.getcwd(), "user": _user(),
        "runtime": {"kind": "tmux", "target": "work:0.1", "attach": "tmux attach -t work:0.1"},
        "state": "stuck", "reason": "no_activity",
        "summary": "a sample from `otelwatch notify test`: nothing is stuck", "silence_s": 0.0, "repeat": 0,
        "incident": {"id": "otelwatch-notify-test#1", "phase": "test", "opened_at": t, "message": 1,
                     "first_state": "stuck", "first_reason": "no_activity", "age_s": 0.0},
    }


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


def _config_path(given: str | None) -> str | None:
    if given:
        return given
    from otelwatch import config

    find = getattr(config, "find_config", None)  # the default config file, where this version has one
    found = find(os.environ) if find is not None else None
    return str(found) if found is not None else None


def notify_test_main(config_path: str | None, *, out: TextIO | None = None) -> int:
    stdout = out or sys.stdout
    from otelwatch.config import Config, ConfigError, load_config
    from otelwatch.telemetry.notify import Notifier, preflight

    path = _config_path(config_path)
    try:
        cfg = load_config(path) if path else Config()
    except ConfigError as exc:
        print(f"otelwatch: config error: {exc}", file=stdout)
        return EXIT_USAGE
    where = path or "built-in defaults"
    notify = cfg.notify
    if not notify.command and not notify.webhook:
        print(f"{where}: no notification channel configured ([notify] command or webhook): nothing sent",
              file=stdout)
        return EXIT_FAILED
    problems = preflight(notify, os.environ)
    for problem in problems:
        print(f"otelwatch: config error: {problem}", file=stdout)
    if any(p.startswith("notify.headers.") for p in problems):
        return EXIT_USAGE  # the webhook cannot even be built
    notifier = Notifier(notify, log=lambda event, fields, level: None, host=socket.gethostname())
    try:
        results = notifier.test(sample_message())
    finally:
        notifier.shutdown(0.5)
    for channel, destination, ok, detail in results:
        print(f"{channel} {destination}: {'ok' if ok else 'FAILED'}: {detail}", file=stdout)
    failed = [r for r in results if not r[2]]
    print(f"{len(results) - len(failed)} of {len(results)} channel(s) delivered ({where})", file=stdout)
    return EXIT_FAILED if failed else EXIT_OK
