"""otelwatch: a per-host watchdog for AI coding-agent sessions.

The flow is probe -> classify -> act -> export; see DESIGN.md. The public
Python API for host applications is re-exported here.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
