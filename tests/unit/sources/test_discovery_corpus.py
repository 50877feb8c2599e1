"""The default process matcher on a corpus of real-world command lines.

Every case of tests/support/discovery_corpus.txt (its header says the format) becomes a
process in one fixture /proc directory, read by the real ProcessTableReader, and
one scan must find exactly the sessions the corpus expects. A failure lists the
corpus lines that came out differently.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from otelwatch.config import DEFAULT_AGENTS
from otelwatch.model import Mode, SessionSpec
from otelwatch.probe.proctable import ProcessTableReader
from otelwatch.sources.processes import ProcessMatcher
from tests.support.procs import REPO

CORPUS = REPO / "tests" / "support" / "discovery_corpus.txt"
BOOT_TIME = 1_700_000_000
NOT_SELF = -1
INIT = 1


@dataclass(frozen=True)
class Case:
    line: int
    pid: int
    ppid: int
    comm: str
    argv: tuple[str, ...]
    expect: str  # "none", "inside", "AGENT" or "AGENT:headless"


def parse_corpus(text: str, first_pid: int = 100) -> list[Case]:
    """The corpus as processes with pids and parents (see the corpus header for the format)."""
    cases: list[Case] = []
    stack: list[int] = []  # pids of the open tree's path from its root, by depth
    in_tree = False
    pid = first_pid
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            in_tree = False
            continue
        if raw.lstrip().startswith("#"):
            continue
        if raw.startswith("tree:"):
            in_tree, stack = True, []
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        if in_tree:
            depth, odd = divmod(indent - 2, 2)
            if odd or depth < 0 or depth > len(stack):
                raise ValueError(f"{CORPUS.name}:{number}: bad indent in a tree")
            del stack[depth:]
        elif indent:
            raise ValueError(f"{CORPUS.name}:{number}: indented line outside a tree")
        expect, _, rest = raw.strip().partition(" ")
        words = shlex.split(rest)
        comm = None
        if words and words[0].startswith("comm="):
            comm = words.pop(0)[len("comm="):]
        if not words:
            raise ValueError(f"{CORPUS.name}:{number}: no command line")
        ppid = stack[-1] if in_tree and stack else INIT
        cases.append(Case(number, pid, ppid, comm or words[0].rpartition("/")[2][:15], tuple(words), expect))
        if in_tree:
            stack.append(pid)
        pid += 1
    return cases


def write_proc(root: Path, procs: list[tuple[int, int, str, tuple[str, ...]]]) -> None:
    """A /proc with these (pid, ppid, comm, argv), in the kernel's formats."""
    (root / "stat").write_text(f"cpu 1 2 3 4\nbtime {BOOT_TIME}\n")
    for pid, ppid, comm, argv in procs:
        d = root / str(pid)
        d.mkdir()
        # state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        # cutime cstime priority nice threads itrealvalue starttime vsize rss
        fields = ["S", ppid, pid, pid, 0, -1, 0, 0, 0, 0, 0, 3, 1, 0, 0, 20, 0, 1, 0, 1000 + pid, 0, 100]
        (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(map(str, fields)) + "\n")
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))


def corpus_proc(root: Path, cases: list[Case]) -> None:
    write_proc(root, [(INIT, 0, "systemd", ("/sbin/init",))] + [(c.pid, c.ppid, c.comm, c.argv) for c in cases])


CASES = parse_corpus(CORPUS.read_text())


def test_corpus_is_well_formed() -> None:
    agents = {"claude-code", "codex", "gemini", "aider", "opencode"}
    for c in CASES:
        agent, _, mode = c.expect.partition(":")
        assert agent in agents | {"none", "inside"} and mode in ("", "headless"), f"line {c.line}: {c.expect!r}"
        assert c.expect != "inside" or c.ppid != INIT, f"line {c.line}: 'inside' needs a parent"
    # Both kinds, every built-in agent, and trees are covered.
    expected_agents = {c.expect.partition(":")[0] for c in CASES}
    assert expected_agents >= agents | {"none", "inside"}
    assert sum(c.expect == "none" for c in CASES) >= 40


def test_default_matcher_on_corpus(tmp_path: Path) -> None:
    corpus_proc(tmp_path, CASES)
    matcher = ProcessMatcher(DEFAULT_AGENTS, self_pid=NOT_SELF)
    specs = {s.pid: s for s in matcher.scan(ProcessTableReader(str(tmp_path)).read())}
    wrong = []
    for c in CASES:
        spec = specs.get(c.pid)
        if c.expect == "inside":
            got = "inside" if spec is None and matcher.match(c.comm, c.argv) is not None else describe(spec)
        else:
            got = describe(spec)
        if got != c.expect:
            wrong.append(f"  line {c.line}: expected {c.expect}, got {got}: {shlex.join(c.argv)}")
    assert not wrong, "corpus cases that came out differently:\n" + "\n".join(wrong)
    assert INIT not in specs


def describe(spec: SessionSpec | None) -> str:
    if spec is None:
        return "none"
    return spec.agent + (":headless" if spec.mode is Mode.HEADLESS else "")


def test_scan_classifies_each_process_once_and_sees_an_exec(tmp_path: Path) -> None:
    """Hundreds of processes: after the first scan a tick re-classifies nothing, except
    a process whose comm changed (an exec keeps pid and start time: the argv the table
    cached is the wrapper's, comm is the agent's)."""
    filler = [c for c in CASES if c.expect == "none" and c.ppid == INIT]
    procs = [(1000 + i, INIT, c.comm, c.argv) for i, c in ((i, filler[i % len(filler)]) for i in range(300))]
    write_proc(tmp_path, [(INIT, 0, "systemd", ("/sbin/init",)), *procs])
    reader = ProcessTableReader(str(tmp_path))
    matcher = ProcessMatcher(DEFAULT_AGENTS, self_pid=NOT_SELF)
    calls: list[str] = []
    original = matcher.match

    def counted(comm: str, argv: Sequence[str]) -> str | None:
        calls.append(comm)
        return original(comm, argv)

    matcher.match = counted  # type: ignore[method-assign]
    assert matcher.scan(reader.read()) == [] and len(calls) == len(procs) + 1  # and init
    calls.clear()
    assert matcher.scan(reader.read()) == [] and calls == []

    wrapper = next(p for p in procs if p[3][:2] == ("bash", "claude-wrapper.sh"))
    stat = tmp_path / str(wrapper[0]) / "stat"
    stat.write_text(stat.read_text().replace("(bash)", "(claude)"))
    specs = matcher.scan(reader.read())
    assert calls == ["claude"]
    assert [(s.pid, s.agent) for s in specs] == [(wrapper[0], "claude-code")]


@pytest.mark.parametrize("text, error", [
    ("tree: t\n      none x\n", "bad indent"),
    ("  none x\n", "outside a tree"),
    ("none comm=x\n", "no command line"),
])
def test_corpus_format_errors_are_named(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_corpus(text)
