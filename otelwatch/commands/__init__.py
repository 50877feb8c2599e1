"""One module per `otelwatch` subcommand; `otelwatch.cli` parses arguments and imports only the one it runs.

Modules: `run` (the daemon process: state directory lock, listener, signals),
`hook` (`hook` and `event`), `exec`, `status`, `top`, `diag`, `demo`,
`check_config`. This file imports nothing: `otelwatch hook` runs on every tool
call of an agent and must not pay for the other commands.
"""
