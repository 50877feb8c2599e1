"""`otelwatch check-config FILE`: validate a config file and exit.

Prints `FILE: ok` (exit 0) or `config error` lines on stderr (exit 2). Besides
the file it checks what would otherwise fail only at the first incident:
`notify.command`'s program is found on PATH and every `${VAR}` in
`notify.headers` is set (`notify.preflight`). It never starts anything.
"""

from __future__ import annotations

import os
import sys

from otelwatch.config import ConfigError, load_config

__all__ = ["check_config_main"]

EXIT_OK = 0
EXIT_USAGE = 2  # like the CLI's: bad config


def check_config_main(path: str) -> int:
    try:
        cfg = load_config(path or None)  # as before the split: an empty name checks the built-in defaults
    except ConfigError as exc:
        print(f"otelwatch: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # What would fail only at the first incident: notify.command's program, header ${VAR}s.
    from otelwatch.telemetry.notify import preflight

    problems = preflight(cfg.notify, os.environ)
    for problem in problems:
        print(f"otelwatch: config error: {problem}", file=sys.stderr)
    if problems:
        return EXIT_USAGE
    print(f"{path}: ok")
    return EXIT_OK
