"""Discovering agent processes by name: `ProcessMatcher`.

Owns deciding which processes in the table are agent sessions. A process
matches when a configured regex (`sources.processes.match`, searched, not
anchored) is found in one of its *names*: its kernel name (comm), the
basename of argv[0], and for interpreters (node, bun, deno, python) the
script they run: its file name, and for generic entry points (`cli.js`,
`index.js`, `main.py`, ...) the package directory names above it, so
`node /usr/lib/node_modules/@anthropic-ai/claude-code/cli.js` is "claude".
Arbitrary argument text never matches: `grep claude` or `vim claude.md` are
not agents.

One session per agent root: a match whose ancestor also matches belongs to
that ancestor (a Bash tool's children, a CLI's re-exec of itself). otelwatch
itself and everything under it are never matched. Nothing read from a
cmdline is ever executed. Pure over the process table: no /proc reads of its
own beyond `table.cmdline` (cached per process identity).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from otelwatch.model import Mode, SessionSpec
from otelwatch.proctable import ProcessTable

__all__ = ["AGENT_NAMES", "ProcessMatcher", "agent_name", "interpreter", "process_names"]

# Patterns whose plain name differs from the agent name used in labels and ids.
AGENT_NAMES = {"claude": "claude-code"}
_INTERPRETER_RE = re.compile(r"^(node|nodejs|bun|deno|python(\d+(\.\d+)?)?|pypy3?)$")
_GENERIC_SCRIPTS = frozenset({"cli", "index", "main", "__main__", "run", "bin", "entry", "app"})
_PLAIN_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# Options of interpreters that take a value as the next argument.
_OPTS_WITH_VALUE = frozenset({"-r", "--require", "--import", "--loader", "-W", "-X", "--title", "-c", "-e"})


def interpreter(argv: Sequence[str], comm: str) -> bool:
    exe = os.path.basename(argv[0]) if argv else ""
    return bool(_INTERPRETER_RE.match(exe) or _INTERPRETER_RE.match(comm))


def process_names(comm: str, argv: Sequence[str]) -> list[str]:
    """The names a process is known by (see the module docstring)."""
    names = [comm]
    if argv:
        exe = os.path.basename(argv[0])
        if exe and exe != comm:
            names.append(exe)
    if not interpreter(argv, comm):
        return names
    script = _script_arg(argv)
    if script is None:
        return names
    if script.startswith("module:"):
        names.append(script[len("module:"):])
        return names
    parts = [p for p in script.split("/") if p]
    if not parts:
        return names
    stem = parts[-1].split(".")[0]
    names.append(parts[-1])
    if stem in _GENERIC_SCRIPTS or (len(parts) >= 2 and parts[-2] in ("bin", "dist", "build", "lib")):
        # A generic entry point: the package is named by the directories above it,
        # up to node_modules (or two levels when there is none).
        above = parts[:-1]
        above = above[len(above) - above[::-1].index("node_modules"):] if "node_modules" in above else above[-2:]
        names.extend(above)
    return names


def _script_arg(argv: Sequence[str]) -> str | None:
    """The script an interpreter runs ("module:NAME" for python -m), or None."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m" and i + 1 < len(argv):
            return "module:" + argv[i + 1]
        if arg in ("-c", "-e", "--eval", "-p", "--print"):
            return None  # inline code: nothing names the program
        if arg.startswith("-"):
            i += 2 if arg in _OPTS_WITH_VALUE else 1
            continue
        if arg in ("run", "x") and os.path.basename(argv[0]).startswith(("bun", "deno")):
            i += 1  # `bun run script.ts`, `deno run ...`
            continue
        return arg
    return None


def agent_name(pattern: str, matched: str) -> str:
    """The agent name of a match: the pattern when it is a plain word, normalised
    (claude -> claude-code); for a real regex the text it matched."""
    base = pattern if _PLAIN_RE.match(pattern) else matched
    return AGENT_NAMES.get(base, base)


def headless(argv: Sequence[str]) -> bool:
    """Whether the cmdline asks for a one-shot run (claude -p, codex exec, gemini -p)."""
    args = list(argv[1:])
    if any(a in ("-p", "--print", "--prompt") or a.startswith(("--print=", "--prompt=")) for a in args):
        return True
    positional = [a for a in args if not a.startswith("-")]
    return "exec" in positional[:3]


class ProcessMatcher:
    def __init__(self, patterns: Sequence[str], *, self_pid: int | None = None) -> None:
        self.patterns = [(p, re.compile(p)) for p in patterns]
        self.self_pid = os.getpid() if self_pid is None else self_pid

    def match(self, comm: str, argv: Sequence[str]) -> str | None:
        """The agent name when the process matches a pattern, else None."""
        names = process_names(comm, argv)
        for pattern, rx in self.patterns:
            for name in names:
                m = rx.search(name)
                if m:
                    return agent_name(pattern, m.group(0))
        return None

    def scan(self, table: ProcessTable) -> list[SessionSpec]:
        """One SessionSpec per matching agent root in the table."""
        excluded = {self.self_pid, *table.descendants(self.self_pid)}
        matched: dict[int, str] = {}
        for info in table:
            if info.pid in excluded or info.state == "Z":
                continue
            agent = self.match(info.comm, table.cmdline(info.pid))
            if agent is not None:
                matched[info.pid] = agent
        specs: list[SessionSpec] = []
        for pid, agent in matched.items():
            if any(a in matched for a in table.ancestors(pid)):
                continue  # part of an agent above it
            proc = table.get(pid)
            if proc is None:
                continue
            argv = table.cmdline(pid)
            specs.append(SessionSpec(
                session_id=f"{agent}-{pid}-{int(proc.create_time)}",
                pid=pid,
                agent=agent,
                source="process",
                mode=Mode.HEADLESS if headless(argv) else Mode.INTERACTIVE,
                create_time=proc.create_time,
            ))
        specs.sort(key=lambda s: s.pid or 0)
        return specs
