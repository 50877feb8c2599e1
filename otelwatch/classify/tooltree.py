"""A tool at work, seen in the process tree: `tool_processes`.

Some agents record a tool call only when it ends (Gemini CLI's chat file writes
`toolCalls` when they finish; aider writes nothing while `/run` runs; Claude Code's
background shells and subagents outlive the turn that started them). While such a
tool runs, the agent's records are silent and its own process sleeps, which alone
would read as `stuck`. The tool is visible in the process tree, though: a child
the agent started inside the turn (`bash -c ...` -> `sleep 120`), still alive.

A process of the tree is a tool process when it is alive, started after the turn
opened (when a turn is known), and is none of the agent's session-long helpers:

- the agent itself again (Gemini CLI relaunches itself as a child with more heap:
  same program, same script);
- a child that already existed when the turn opened (MCP servers, language
  servers, a shell the TUI keeps), and everything below such a child;
- a program named as a helper (MCP servers, language servers), whenever started.

Pure: reads only the TreeSample it is given; no clock, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from otelwatch.model import ProcessSample, TreeSample

__all__ = ["CREATE_TIME_SLACK_S", "HELPER_RE", "is_helper", "tool_processes"]

# Session-long helpers by the program they run (see is_helper).
HELPER_RE = re.compile(
    r"(^|[/@\s_.-])(mcp|modelcontextprotocol)([\s/_.-]|$)|mcp-server|server-mcp|language-?server|langserver"
    r"|(^|[/\s])(gopls|rust-analyzer|clangd|pyright|pylsp|jdtls|tsserver|typescript-language-server)(\s|$)",
    re.IGNORECASE,
)
_INTERPRETER_OPTS = re.compile(r"^-")
# A process's create time is the kernel's boot time (whole seconds in /proc/stat) plus its
# start ticks, so it can read up to a second off the wall clock that dates a prompt.
CREATE_TIME_SLACK_S = 1.5


# Launchers whose first arguments name the program they run (`npx -y @scope/mcp-server-x`).
_LAUNCHERS = frozenset({"node", "nodejs", "bun", "deno", "python", "python3", "npx", "uvx", "uv", "pipx", "npm",
                        "pnpm", "yarn", "bunx"})


def is_helper(cmdline: Sequence[str]) -> bool:
    """Whether a process runs a session-long helper (an MCP or language server), judged by
    its program (and a launcher's first two non-option arguments), never by its arguments."""
    if not cmdline:
        return False
    words = [cmdline[0]]
    if cmdline[0].rpartition("/")[2] in _LAUNCHERS:
        words += [a for a in cmdline[1:] if not a.startswith("-")][:2]
    return any(HELPER_RE.search(w) is not None for w in words)


def _program(cmdline: Sequence[str], name: str) -> tuple[str, str]:
    """(executable base name, first non-option argument): the same for an agent and its relaunch."""
    if not cmdline:
        return (name, "")
    exe = cmdline[0].rpartition("/")[2]
    first = next((a for a in cmdline[1:] if not _INTERPRETER_OPTS.match(a)), "")
    return (exe, first)


def tool_processes(sample: TreeSample | None, since: float | None) -> tuple[ProcessSample, ...]:
    """The tool processes of the tree (see the module docstring), oldest first.

    `since`: when the turn opened; None when no turn is known (a headless run with no
    turn events), in which case every descendant that is not a helper counts."""
    if sample is None or not sample.alive or len(sample.processes) < 2:
        return ()
    root = sample.processes[0]
    root_program = _program(root.cmdline, root.name)
    by_pid = {p.pid: p for p in sample.processes}
    # The root, and the agent relaunched under it, are the agent: never helpers, never tools.
    excluded: dict[int, bool] = {root.pid: False}
    agent = {root.pid}
    for p in sample.processes[1:]:
        if p.ppid == root.pid and _program(p.cmdline, p.name) == root_program:
            excluded[p.pid] = False
            agent.add(p.pid)

    def helper(p: ProcessSample) -> bool:
        """A helper, or below one (memoised over the tree)."""
        known = excluded.get(p.pid)
        if known is not None:
            return known
        excluded[p.pid] = True  # a cycle in a racy read: treat as a helper (never a tool)
        if (since is not None and p.create_time < since - CREATE_TIME_SLACK_S) or is_helper(p.cmdline):
            result = True
        else:
            parent = by_pid.get(p.ppid)
            result = parent is not None and helper(parent)
        excluded[p.pid] = result
        return result

    out = [p for p in sample.processes[1:]
           if p.pid not in agent and p.status not in ("Z", "X", "x") and not helper(p)]
    out.sort(key=lambda p: p.create_time)
    return tuple(out)
