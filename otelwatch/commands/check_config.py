"""`otelwatch check-config FILE`: validate a config file and exit.

Prints `FILE: ok` (exit 0) or one `config error` line on stderr (exit 2). It
only reads the file; it never starts anything.
"""

from __future__ import annotations

import sys

from otelwatch.config import ConfigError, load_config

__all__ = ["check_config_main"]

EXIT_OK = 0
EXIT_USAGE = 2  # like the CLI's: bad config


def check_config_main(path: str) -> int:
    try:
        if path:  # as before the split: an empty name checks the built-in defaults
            load_config(path)
    except ConfigError as exc:
        print(f"otelwatch: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: ok")
    return EXIT_OK
