"""Discovering agent processes in the process table: `ProcessMatcher`.

Owns deciding which processes are agent sessions and which agent each is. It
must never match a process by text that merely contains an agent's name: a
router, a usage monitor, an MCP server wrapping an agent, `vim CLAUDE.md` or
`python3 check_codex.py` is not an agent, and tracking one would hide the real
agent it starts inside a false session.

What a process runs (`Program`): for a binary, the base name of argv[0] and
the kernel's name (comm); for an interpreter (node, bun, deno, python, sh,
bash, ...), the script it runs (or `python -m MODULE`), and the npm package
the script belongs to (the directory after the last `node_modules`).

The built-in agents are recognised by how they are really installed and
started (see `BUILTIN`): the exact executable or bin-shim name (`claude`,
`codex`, `gemini`, `aider`, `opencode`), a script anywhere in the agent's own
npm package (`node .../@openai/codex/bin/codex.js`), or its Python module
(`python -m aider`). A management subcommand (`claude mcp serve`, `codex
mcp-server`, `codex login`, `--version`) is not a session.

Patterns (`sources.processes.match`), tried in order, first match wins:
- a built-in name (`claude`, `claude-code`, `codex`, `gemini`, `aider`,
  `opencode`) selects that built-in recogniser;
- another plain name (letters, digits, `_ . -`, taken literally) must equal
  one of the process's names (`Program.names`): the executable's base name and
  comm; for a script its file name with and without extension, its package
  (`@scope/name` and `name`) or, outside node_modules, the project directory
  of a generic entry point (`~/src/my-agent/dist/cli.js` is `my-agent`); for
  `python -m` the module and its top package;
- any other regex must match one of those names in full (`my-?agent\\d*`);
- `cmdline:REGEX` is searched, unanchored, in the whole command line (argv
  joined by spaces); a named group `agent` gives the agent's name, else it is
  the program's name.

One session per agent root: a match whose ancestor also matches belongs to
that ancestor (codex's native binary under its node wrapper, a claude started
by claude's Bash tool); an agent under anything else (an orchestrator, a
router, a wrapper script) is its own session. otelwatch itself and everything
under it are never matched. Nothing read from a cmdline is ever executed.

Pure over the process table: no /proc reads of its own beyond `table.cmdline`.
Each process is classified once per (pid, create time, comm, argv) and the
result is kept while the process lives, so a tick costs a dict lookup per
process, not a regex (comm is in the key because an exec keeps pid and create
time: a wrapper that execs claude becomes claude).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from otelwatch.model import Mode, SessionSpec
from otelwatch.probe.proctable import ProcessTable
from otelwatch.sources import hookpath

__all__ = ["AGENT_NAMES", "BUILTIN", "Builtin", "ProcessMatcher", "Program", "headless", "opencode_project",
           "program_of"]

# Names whose agent label differs (used by the exec wrapper and hooks too).
AGENT_NAMES = hookpath.AGENT_NAMES  # one table: the hook names its agent the same way


@dataclass(frozen=True)
class Builtin:
    """How one real agent is installed and started."""

    agent: str  # the label sessions get
    names: frozenset[str]  # exact executable / bin-shim names
    packages: frozenset[str] = frozenset()  # npm packages whose scripts are the agent
    modules: frozenset[str] = frozenset()  # `python -m` modules
    native: re.Pattern[str] | None = None  # full-match names of platform binaries
    not_sessions: frozenset[str] = frozenset()  # first arguments that are not a session


_NOT_SESSIONS = frozenset({"--version", "--help", "-h"})
BUILTIN: dict[str, Builtin] = {
    "claude": Builtin(
        # npm ships the native binary as bin/claude.exe (run through a `claude` symlink, or by path),
        # or in @anthropic-ai/claude-code-<platform>/claude under `node cli-wrapper.cjs`.
        "claude-code", frozenset({"claude", "claude.exe"}),
        # The Agent SDK bundles the same CLI and runs it as `node .../claude-agent-sdk/cli.js`.
        packages=frozenset({"@anthropic-ai/claude-code", "@anthropic-ai/claude-agent-sdk"}),
        not_sessions=_NOT_SESSIONS | {"-v", "mcp", "config", "update", "doctor", "install", "setup-token",
                                      "migrate-installer", "plugin"}),
    "codex": Builtin(
        "codex", frozenset({"codex"}), packages=frozenset({"@openai/codex"}),
        # Releases before the per-platform packages shipped bin/codex-<target triple>.
        native=re.compile(r"codex-(x86_64|aarch64)-(unknown-linux-(musl|gnu)|apple-darwin)"),
        not_sessions=_NOT_SESSIONS | {"-V", "mcp", "mcp-server", "login", "logout", "completion"}),
    "gemini": Builtin(
        "gemini", frozenset({"gemini"}), packages=frozenset({"@google/gemini-cli"}),
        not_sessions=_NOT_SESSIONS | {"-v", "mcp", "extensions"}),
    # aider's -v is --verbose: a session.
    "aider": Builtin(
        "aider", frozenset({"aider"}), modules=frozenset({"aider", "aider.main", "aider.__main__"}),
        not_sessions=_NOT_SESSIONS),
    # npm's postinstall puts the native binary at opencode-ai/bin/opencode.exe (on Linux too):
    # started by that path its comm is `opencode.exe`.
    "opencode": Builtin(
        "opencode", frozenset({"opencode", "opencode.exe"}), packages=frozenset({"opencode-ai"}),
        not_sessions=_NOT_SESSIONS | {"-v", "auth", "providers", "upgrade", "uninstall", "models", "mcp",
                                      "completion", "stats", "export", "import", "db", "plugin", "debug"}),
}
BUILTIN["claude-code"] = BUILTIN["claude"]

_INTERPRETERS = frozenset({"node", "nodejs", "bun", "deno", "python", "python2", "python3", "pypy", "pypy3",
                           "sh", "bash", "dash", "zsh", "ksh", "mksh"})
_VERSIONED_PYTHON = re.compile(r"(python|pypy)\d+(\.\d+)*")
_INLINE = frozenset({"-c", "-e", "--eval", "-p", "--print", "-"})  # code, not a file, names the program
# Interpreter options that take the next argument as their value.
_OPTS_WITH_VALUE = frozenset({"-r", "--require", "--import", "--loader", "--experimental-loader", "-W", "-X",
                              "--title", "-o", "-C"})
_GENERIC_SCRIPTS = frozenset({"cli", "index", "main", "__main__", "run", "entry", "app", "server"})
_BUILD_DIRS = frozenset({"bin", "dist", "build", "lib", "src", "out"})
_PLAIN_RE = re.compile(r"[A-Za-z0-9_.-]+")
_CMDLINE = "cmdline:"


def _is_interpreter(name: str) -> bool:
    return name in _INTERPRETERS or (name.startswith(("python", "pypy")) and bool(_VERSIONED_PYTHON.fullmatch(name)))


def _basename(path: str) -> str:
    return path.rpartition("/")[2]


@dataclass(frozen=True)
class Program:
    """What a process runs, read from its comm and argv."""

    exe: str  # base name of argv[0] (comm when argv is empty)
    comm: str  # the kernel's name: a binary's or shebang script's file name, 15 chars at most
    script: str | None = None  # the file an interpreter runs, as given
    module: str | None = None  # `python -m MODULE`
    args: tuple[str, ...] = ()  # the program's own arguments
    interpreted: bool = False

    @cached_property
    def package(self) -> str | None:
        """The npm package the script is in: what follows the last node_modules ("@scope/name")."""
        if not self.script or "node_modules/" not in self.script:
            return None
        dirs = self.script.rsplit("node_modules/", 1)[1].split("/")[:-1]  # the file itself is no package
        if not dirs or dirs[0].startswith("."):  # node_modules/.bin/x: a shim, named by its file
            return None
        if dirs[0].startswith("@"):
            return "/".join(dirs[:2]) if len(dirs) >= 2 else None
        return dirs[0]

    @cached_property
    def names(self) -> tuple[str, ...]:
        """Every name user patterns are matched against in full."""
        names = [self.exe, self.comm]
        if self.script:
            base = _basename(self.script)
            names += [base, base.partition(".")[0]]
            package = self.package
            if package:
                names += [package, _basename(package)]
            else:
                names += _project_dir(self.script, base)
        if self.module:
            names += [self.module, self.module.partition(".")[0]]
        return tuple(dict.fromkeys(n for n in names if n))

    def display_name(self) -> str:
        """The program's name for a session label: package, script or module, else the executable."""
        if self.script:
            package = self.package
            return _basename(package) if package else _basename(self.script).partition(".")[0] or self.exe
        if self.module:
            return self.module.partition(".")[0]
        return self.exe


def _project_dir(script: str, base: str) -> list[str]:
    """A generic entry point outside node_modules (`~/src/my-agent/dist/cli.js`) is named
    by the directory above its build directories."""
    dirs = [d for d in script.split("/")[:-1] if d and d != "."]
    if not dirs or (base.partition(".")[0] not in _GENERIC_SCRIPTS and dirs[-1] not in _BUILD_DIRS):
        return []
    while dirs and dirs[-1] in _BUILD_DIRS:
        dirs.pop()
    return dirs[-1:]


def program_of(comm: str, argv: Sequence[str]) -> Program:
    """The Program of a process with this comm and argv."""
    exe = _basename(argv[0]) if argv else comm
    if not (_is_interpreter(exe) or _is_interpreter(comm)):
        return Program(exe, comm, args=tuple(argv[1:]))
    bun_like = exe.startswith(("bun", "deno"))
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg == "-m" and i + 1 < len(argv):
            return Program(exe, comm, module=argv[i + 1], args=tuple(argv[i + 2:]), interpreted=True)
        if arg in _INLINE or (arg[:1] == "-" and arg[1:].isalpha() and len(arg) <= 5 and "c" in arg):  # `bash -lc`
            return Program(exe, comm, interpreted=True)
        if arg.startswith("-"):
            i += 2 if arg in _OPTS_WITH_VALUE else 1
            continue
        if bun_like and arg in ("run", "x"):  # `bun run script.ts`, `deno run -A main.ts`
            i += 1
            continue
        break
    if i >= len(argv):
        return Program(exe, comm, interpreted=True)
    return Program(exe, comm, script=argv[i], args=tuple(argv[i + 1:]), interpreted=True)


def headless(argv: Sequence[str], agent: str | None = None, comm: str = "") -> bool:
    """Whether the cmdline asks for a one-shot run, by each agent's own flags (measured on
    Claude Code 2.1.330, Codex 0.169.0, Gemini CLI 0.61.0, opencode 1.18.33, aider 0.86.2):

    - claude: `-p` / `--print`; codex: `exec` (alias `e`) or `review` (0.169.0: non-interactive);
    - gemini: `-p` / `--prompt`, unless `-i` / `--prompt-interactive` (a TUI with a first prompt);
    - opencode: the `run` subcommand; `opencode --prompt TEXT` is the TUI;
    - aider: `--message` / `-m` / `--message-file` / `-f`; otherwise its prompt_toolkit TUI.

    Any other agent: `-p`, `--print`, `--prompt` or an `exec` subcommand."""
    args = list(program_of(comm or (_basename(argv[0]) if argv else ""), argv).args) if argv else []
    if agent in ("gemini",):
        if any(_flag(a, "-i", "--prompt-interactive") for a in args):
            return False
        return any(_flag(a, "-p", "--prompt") for a in args)
    if agent == "opencode":
        return _subcommand(args, _OPENCODE_VALUE_FLAGS) == "run"
    if agent == "aider":
        return any(_flag(a, "-m", "--message", "-f", "--message-file") or (a[:2] == "-m" and a[:3] != "-m-")
                   for a in args)
    if agent == "codex":
        return bool({"exec", "e", "review"} & set([a for a in args if not a.startswith("-")][:3]))
    if agent == "claude-code":
        return any(_flag(a, "-p", "--print") for a in args)
    if any(a in ("-p", "--print", "--prompt") or a.startswith(("--print=", "--prompt=")) for a in args):
        return True
    positional = [a for a in args if not a.startswith("-")]
    return "exec" in positional[:3]


def opencode_project(argv: Sequence[str], comm: str = "") -> str | None:
    """The project directory an opencode TUI was started on (`opencode [project]`), as given."""
    args = program_of(comm or (_basename(argv[0]) if argv else ""), argv).args if argv else ()
    first = _subcommand(args, _OPENCODE_VALUE_FLAGS)
    return None if first is None or first in _OPENCODE_COMMANDS else first


_OPENCODE_COMMANDS = frozenset({"run", "acp", "mcp", "attach", "debug", "providers", "auth", "agent", "upgrade",
                                "uninstall", "serve", "web", "models", "stats", "export", "import", "github", "pr",
                                "session", "plugin", "plug", "db", "completion"})
# opencode options that take a value (so the value is not its subcommand).
_OPENCODE_VALUE_FLAGS = frozenset({"--prompt", "--model", "-m", "--agent", "--session", "-s", "--port",
                                   "--hostname", "--log-level"})


def _flag(arg: str, *names: str) -> bool:
    """`arg` is one of `names`, or a long one of them with `=VALUE`."""
    return arg in names or any(n.startswith("--") and arg.startswith(n + "=") for n in names)


def _subcommand(args: Sequence[str], value_flags: frozenset[str]) -> str | None:
    """The first positional argument, skipping the values of `value_flags`."""
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--":
            return None
        if a.startswith("-"):
            skip = a in value_flags
            continue
        return a
    return None


# --------------------------------------------------------------------------- rules


class _BuiltinRule:
    def __init__(self, builtin: Builtin) -> None:
        self.b = builtin

    def __call__(self, p: Program, argv: Sequence[str]) -> str | None:
        b = self.b
        if p.interpreted:
            by_argv = bool(
                (p.script and (_basename(p.script) in b.names or p.package in b.packages))
                or (p.module and p.module in b.modules))
        else:
            by_argv = p.exe in b.names or bool(b.native and b.native.fullmatch(p.exe))
        if by_argv:
            return None if p.args[:1] and p.args[0] in b.not_sessions else b.agent
        # The kernel's name alone: argv read before an exec (a wrapper that execs claude)
        # still shows the wrapper, comm already shows claude.
        return b.agent if p.comm in b.names else None


class _NameRule:
    def __init__(self, word: str) -> None:
        self.word = word
        self.agent = AGENT_NAMES.get(word, word)

    def __call__(self, p: Program, argv: Sequence[str]) -> str | None:
        return self.agent if self.word in p.names else None


class _RegexRule:
    def __init__(self, rx: re.Pattern[str]) -> None:
        self.rx = rx

    def __call__(self, p: Program, argv: Sequence[str]) -> str | None:
        for name in p.names:
            if self.rx.fullmatch(name):
                return AGENT_NAMES.get(name, name)
        return None


class _CmdlineRule:
    def __init__(self, rx: re.Pattern[str]) -> None:
        self.rx = rx
        self.named = "agent" in rx.groupindex

    def __call__(self, p: Program, argv: Sequence[str]) -> str | None:
        m = self.rx.search(" ".join(argv))
        if m is None:
            return None
        name = (m.group("agent") if self.named else None) or p.display_name()
        return AGENT_NAMES.get(name, name)


def _rule(pattern: str, index: int) -> _BuiltinRule | _NameRule | _RegexRule | _CmdlineRule:
    where = f"sources.processes.match[{index}]"
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{where}: a pattern must be a non-empty string, got {pattern!r}")
    if pattern in BUILTIN:
        return _BuiltinRule(BUILTIN[pattern])
    cmdline = pattern.startswith(_CMDLINE)
    text = pattern[len(_CMDLINE):] if cmdline else pattern
    if not cmdline and _PLAIN_RE.fullmatch(text):
        return _NameRule(text)
    try:
        rx = re.compile(text)
    except re.error as exc:
        raise ValueError(f"{where}: bad regular expression {text!r}: {exc}") from None
    if (rx.search("") if cmdline else rx.fullmatch("")) is not None:
        raise ValueError(f"{where}: {pattern!r} matches the empty string, so every process")
    return _CmdlineRule(rx) if cmdline else _RegexRule(rx)


# --------------------------------------------------------------------------- matcher


class ProcessMatcher:
    """Finds agent sessions in process tables; keeps each process's verdict between scans."""

    def __init__(self, patterns: Iterable[str], *, self_pid: int | None = None) -> None:
        """Raises ValueError naming a pattern that is empty, not a regex, or matches everything."""
        self.patterns = tuple(patterns)
        self._rules = [_rule(p, i) for i, p in enumerate(self.patterns)]
        self.self_pid = os.getpid() if self_pid is None else self_pid
        # pid -> (create_time, comm, argv, agent, headless) of the last scan
        self._seen: dict[int, tuple[float, str, tuple[str, ...], str | None, bool]] = {}

    def match(self, comm: str, argv: Sequence[str]) -> str | None:
        """The agent name when the process is an agent, else None."""
        p = program_of(comm, argv)
        for rule in self._rules:
            agent = rule(p, argv)
            if agent is not None:
                return agent
        return None

    def scan(self, table: ProcessTable) -> list[SessionSpec]:
        """One SessionSpec per agent root in the table."""
        excluded = {self.self_pid, *table.descendants(self.self_pid)}
        seen = self._seen
        now: dict[int, tuple[float, str, tuple[str, ...], str | None, bool]] = {}
        matched: list[int] = []
        for info in table:
            pid = info.pid
            if info.state == "Z" or pid in excluded:
                continue
            argv = table.cmdline(pid)
            entry = seen.get(pid)
            if entry is None or entry[0] != info.create_time or entry[1] != info.comm or entry[2] != argv:
                agent = self.match(info.comm, argv)
                entry = (info.create_time, info.comm, argv, agent,
                         agent is not None and headless(argv, agent, info.comm))
            now[pid] = entry  # a fresh dict each scan: processes that are gone are forgotten
            if entry[3] is not None:
                matched.append(pid)
        self._seen = now
        roots = set(matched)
        specs: list[SessionSpec] = []
        for pid in matched:
            if any(a in roots for a in table.ancestors(pid)):
                continue  # part of the agent above it
            create_time, _, _, agent, is_headless = now[pid]
            assert agent is not None
            specs.append(SessionSpec(
                session_id=f"{agent}-{pid}-{int(create_time)}",
                pid=pid,
                agent=agent,
                source="process",
                mode=Mode.HEADLESS if is_headless else Mode.INTERACTIVE,
                create_time=create_time,
            ))
        specs.sort(key=lambda s: s.pid or 0)
        return specs
