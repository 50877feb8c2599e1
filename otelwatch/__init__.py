"""otelwatch: a per-host watchdog for AI coding-agent sessions.

The flow is probe -> classify -> act -> export (see DESIGN.md). For host
applications that spawn agents themselves, the public Python API is:

    from otelwatch import Watcher, load_config
    watcher = Watcher(load_config("otelwatch.toml")).start()
    sid = watcher.track(proc.pid, "job-42", agent="claude-code")
    watcher.feed(sid, line)                  # each stream-json line the agent prints
    watcher.subscribe(print)                 # stalled/stuck reports, recoveries, session ends
    [s.state for s in watcher.sessions()]
    watcher.stop()

Names are imported lazily so that `otelwatch hook` (run on every tool call)
does not pay for the OpenTelemetry SDK.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.4.0"

__all__ = [
    "Config",
    "ConfigError",
    "Event",
    "Reason",
    "SessionSnapshot",
    "State",
    "Verdict",
    "Watcher",
    "__version__",
    "load_config",
    "parse_config",
]

_LAZY = {
    "Watcher": "otelwatch.daemon",
    "Config": "otelwatch.config",
    "ConfigError": "otelwatch.config",
    "load_config": "otelwatch.config",
    "parse_config": "otelwatch.config",
    "Event": "otelwatch.model",
    "Reason": "otelwatch.model",
    "SessionSnapshot": "otelwatch.model",
    "State": "otelwatch.model",
    "Verdict": "otelwatch.model",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'otelwatch' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
