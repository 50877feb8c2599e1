"""`otelwatch agent-env claude|codex|gemini`: what to set to point an agent's own
OpenTelemetry at this otelwatch ([sources.otlp]).

Prints, on stdout and nothing else, the snippet to paste: environment variables
for Claude Code and Gemini CLI (`export` lines, so `eval "$(otelwatch agent-env
claude)"` works), the `[otel]` section of `~/.codex/config.toml` for Codex. The
address is the one the daemon listens on for OTLP: `[sources.otlp] listen`, else
`[http] listen` (a wildcard host becomes 127.0.0.1). A note goes to stderr when
the config leaves the receiver off. Never touches the agent's files.
"""

from __future__ import annotations

import sys
from typing import TextIO

from otelwatch.config import Config, split_listen

__all__ = ["AGENTS", "agent_env_main", "otlp_base_url", "snippet"]

AGENTS = ("claude", "codex", "gemini")


def otlp_base_url(cfg: Config) -> str:
    listen = cfg.sources.otlp.listen or cfg.http.listen
    host, port = split_listen(listen)
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def snippet(agent: str, base: str) -> str:
    if agent == "claude":
        return "\n".join([
            "export CLAUDE_CODE_ENABLE_TELEMETRY=1",
            "export OTEL_LOGS_EXPORTER=otlp",
            "export OTEL_METRICS_EXPORTER=otlp",
            "export OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
            f"export OTEL_EXPORTER_OTLP_ENDPOINT={base}",
            "export OTEL_LOGS_EXPORT_INTERVAL=1000",
        ]) + "\n"
    if agent == "codex":
        return "\n".join([
            "# in $CODEX_HOME/config.toml (default ~/.codex/config.toml)",
            "[otel]",
            f'exporter = {{ otlp-http = {{ endpoint = "{base}/v1/logs", protocol = "binary" }} }}',
            f'metrics_exporter = {{ otlp-http = {{ endpoint = "{base}/v1/metrics", protocol = "binary" }} }}',
        ]) + "\n"
    if agent == "gemini":
        return "\n".join([
            "export GEMINI_TELEMETRY_ENABLED=true",
            "export GEMINI_TELEMETRY_TARGET=local",
            f"export GEMINI_TELEMETRY_OTLP_ENDPOINT={base}",
            "export GEMINI_TELEMETRY_OTLP_PROTOCOL=http",
        ]) + "\n"
    raise ValueError(f"unknown agent {agent!r}; one of {', '.join(AGENTS)}")


def agent_env_main(agent: str, cfg: Config, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    out.write(snippet(agent, otlp_base_url(cfg)))
    if not cfg.sources.otlp.enabled:
        err.write("otelwatch: note: the daemon's OTLP receiver is off; set [sources.otlp] enabled = true "
                  "in its config\n")
    return 0
