"""The `otelwatch` command: parses arguments and hands off to the module in
`otelwatch.commands` that owns each subcommand. Imports are lazy so that
`otelwatch hook` and `otelwatch event`, which agents run on every tool call,
start in a few tens of milliseconds; this module must never import a command
module, the OpenTelemetry SDK or psutil at its top level.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

TYPE_CHECKING = False  # typing and argparse cost milliseconds: `otelwatch hook` needs neither
if TYPE_CHECKING:
    import argparse

_DEFAULT_CONFIG_HELP = "$XDG_CONFIG_HOME/otelwatch/config.toml, then /etc/otelwatch/config.toml, when present"

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1  # e.g. the process does not exist, the daemon is unreachable
EXIT_USAGE = 2  # bad arguments or bad config


def _parser() -> argparse.ArgumentParser:
    import argparse

    from otelwatch import __version__

    p = argparse.ArgumentParser(
        prog="otelwatch",
        description="Watchdog for AI coding-agent sessions: tells hung from working.",
    )
    p.add_argument("--version", action="version", version=f"otelwatch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", metavar="FILE", help=f"TOML config (default: {_DEFAULT_CONFIG_HELP})")
    run.add_argument("--listen", metavar="ADDR", help="HOST:PORT for /metrics and the API (default: http.listen, "
                     "127.0.0.1:9464)")
    run.add_argument("--log-format", choices=("auto", "json", "text"), default="auto",
                     help="text: a start summary and readable lines; json: JSON lines (default: text on a "
                          "terminal, json otherwise)")

    ex = sub.add_parser("exec", help="run an agent under otelwatch: otelwatch exec -- CMD ...")
    ex.add_argument("--session-id", help="session id (default: generated)")
    ex.add_argument("--agent", help="agent name (default: the command's name)")
    ex.add_argument("--mode", choices=("headless", "interactive"), help="default: headless")
    ex.add_argument("--config", metavar="FILE", help="config for the registry/state directories")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")

    hook = sub.add_parser("hook", help="record an agent hook payload read from stdin")
    hook.add_argument("agent", choices=("claude",), help="whose hook format stdin holds")

    hk = sub.add_parser("hooks", help="add otelwatch's hooks to an agent's settings, or take them out")
    hk.add_argument("action", choices=("install", "uninstall"))
    hk.add_argument("agent", choices=("claude",))
    hk.add_argument("--settings", metavar="PATH",
                    help="settings file (default: $CLAUDE_CONFIG_DIR/settings.json or ~/.claude/settings.json)")
    hk.add_argument("--dry-run", action="store_true", help="show the change, write nothing")

    nt = sub.add_parser("notify", help="notifications: `notify test` sends a sample through every channel")
    nt.add_argument("action", choices=("test",))
    nt.add_argument("--config", metavar="FILE")

    ev = sub.add_parser("event", help="record one event for a session")
    ev.add_argument("session_id")
    ev.add_argument("type", help="event type, e.g. progress, heartbeat, PreToolUse, Stop")
    ev.add_argument("--tool", help="tool name for tool events")
    ev.add_argument("--agent", help="agent name")
    ev.add_argument("--pid", type=int, help="the agent's PID (default: the parent of the caller)")

    st = sub.add_parser("status", help="show sessions of a running daemon")
    st.add_argument("--url", default=None, help="daemon base URL (default: the config's http.listen)")
    st.add_argument("--config", metavar="FILE", help=f"default: {_DEFAULT_CONFIG_HELP}")
    st.add_argument("--watch", action="store_true", help="refresh every interval until Ctrl-C")
    st.add_argument("--interval", type=float, default=2.0, help="refresh period for --watch")
    st.add_argument("--json", action="store_true", help="print the raw JSON")
    st.add_argument("--no-color", action="store_true", help="no colours (also: NO_COLOR in the environment)")
    st.add_argument("--user", metavar="NAME", help="only this user's sessions (name or uid)")

    tp = sub.add_parser("top", help="live view of a running daemon's sessions, with drill-down")
    tp.add_argument("--url", default=None, help="daemon base URL (default: the config's http.listen)")
    tp.add_argument("--config", metavar="FILE", help=f"default: {_DEFAULT_CONFIG_HELP}")
    tp.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    tp.add_argument("--no-color", action="store_true", help="no colours (also: NO_COLOR in the environment)")
    tp.add_argument("--user", metavar="NAME", help="only this user's sessions (name or uid)")

    dg = sub.add_parser("diag", help="sample one process tree now and print the evidence")
    dg.add_argument("pid", type=int)
    dg.add_argument("--json", action="store_true", help="JSON instead of a table")
    dg.add_argument("--backend", choices=("auto", "procfs", "psutil"), default="auto",
                    help="probe backend (default auto: procfs where /proc exists, else psutil)")

    demo = sub.add_parser("demo", help="watch a zoo of synthetic agents get classified")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds before it stops itself")
    demo.add_argument("--listen", default="127.0.0.1:9464", help="HTTP listener while it runs")
    demo.add_argument("--backend", choices=("auto", "procfs", "psutil"), default="auto",
                      help="probe backend (default auto: procfs where /proc exists, else psutil)")

    cc = sub.add_parser("check-config", help="validate a config file and exit")
    cc.add_argument("file")

    ae = sub.add_parser("agent-env", help="what to set to send an agent's own OpenTelemetry to otelwatch")
    ae.add_argument("agent", choices=("claude", "codex", "gemini"))
    ae.add_argument("--config", metavar="FILE", help="the daemon's config (its OTLP listen address)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    if list(sys.argv[1:] if argv is None else argv) == ["hook", "claude"]:
        # What agents run on every tool call: straight to the hook, no argparse (bench/bench_hook.py).
        from otelwatch.commands.hook import hook_main

        return hook_main("claude", sys.stdin.buffer)
    args = _parser().parse_args(argv)
    command = args.command
    if command is None:
        _parser().print_help()
        return EXIT_USAGE

    if command == "hook":
        from otelwatch.commands.hook import hook_main

        return hook_main(args.agent, sys.stdin.buffer)
    if command == "event":
        from otelwatch.commands.hook import event_main

        return event_main(args.session_id, args.type, tool=args.tool, agent=args.agent, pid=args.pid)
    if command == "hooks":
        from otelwatch.commands.hooks_install import hooks_main

        return hooks_main(args.action, args.agent, settings=args.settings, dry_run=args.dry_run)
    if command == "notify":
        from otelwatch.commands.notify_test import notify_test_main

        return notify_test_main(args.config)
    if command == "diag":
        from otelwatch.commands.diag import diag_main

        return diag_main(args.pid, as_json=args.json, backend=args.backend)
    if command == "check-config":
        from otelwatch.commands.check_config import check_config_main

        return check_config_main(args.file)

    import os

    from otelwatch.config import Config, ConfigError, find_config, load_config, with_listen

    config_path = getattr(args, "config", None)  # demo has no --config
    if config_path is None and command in ("run", "status", "top", "exec"):
        # One config for the daemon and the commands that talk to it: a port said once.
        found = find_config(os.environ)
        config_path = str(found) if found is not None else None
    try:
        cfg = load_config(config_path) if config_path else Config()
        if command == "run" and args.listen:
            cfg = with_listen(cfg, args.listen)
    except ConfigError as exc:
        print(f"otelwatch: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if command == "run":
        from otelwatch.commands.run import run_daemon

        return run_daemon(cfg, config_file=config_path, log_format=args.log_format,
                          listen_given=bool(args.listen))
    if command == "exec":
        from otelwatch.commands.exec import exec_main

        cmd = list(args.cmd)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            print("otelwatch exec: no command given (usage: otelwatch exec -- CMD ARGS...)", file=sys.stderr)
            return EXIT_USAGE
        return exec_main(cmd, cfg, session_id=args.session_id, agent=args.agent, mode=args.mode)
    if command == "status":
        from otelwatch.commands.status import default_url, status_main

        url = args.url or default_url(cfg.http.listen)
        return status_main(url, watch=args.watch, interval=args.interval, as_json=args.json,
                           color=False if args.no_color else None, user=args.user)
    if command == "top":
        from otelwatch.commands.top.screen import default_url, top_main

        return top_main(args.url or default_url(cfg.http.listen), args.interval,
                        color=False if args.no_color else None, user=args.user)
    if command == "agent-env":
        from otelwatch.commands.agent_env import agent_env_main

        return agent_env_main(args.agent, cfg)
    if command == "demo":
        from otelwatch.commands.demo import demo_main

        return demo_main(duration=args.duration, listen=args.listen, backend=args.backend)
    raise AssertionError(command)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
