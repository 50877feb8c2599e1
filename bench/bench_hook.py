"""Benchmark: the wall time of `otelwatch hook claude`, beside `true` and a bare `python -c pass`.

    python bench/bench_hook.py                     # 200 runs of each, about 30 s
    python bench/bench_hook.py --runs 500 --otelwatch /opt/venv/bin/otelwatch

Claude Code runs the hook on every prompt and tool call and waits for it, so its
wall time is added to the agent's. Each run starts the command as Claude Code does
(a fresh process, a PreToolUse payload on stdin, stdout and stderr read) and times
it from spawn to exit. The three commands take turns run by run, so a burst of load
from elsewhere lands on all of them alike. The hook writes to a temporary state
directory (OTELWATCH_STATE_DIR), never the user's.

`true` is the floor of starting any process; `python -c pass` is the floor of
starting this interpreter with its site-packages (every `.pth` file there runs at
each start: an editable install or a sitecustomize shows up in both lines).
The ratio to it is what otelwatch itself adds.

Before timing it compiles the package's bytecode (`compileall`, as `pip install`
does), since an environment with PYTHONDONTWRITEBYTECODE would otherwise time the
compiler on every run; `--no-compile` skips that.

Also lists the modules the hook imports beyond a bare `python -c pass` (from
`python -X importtime`): the hook path must stay off the OpenTelemetry SDK,
psutil, argparse and the rest of the package.

Prints a table and writes it as markdown to bench/results/hook.md. A script,
not a test: numbers move with the host's load, which it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAYLOAD = json.dumps({
    "session_id": "bench-hook-0000", "transcript_path": "/nonexistent/bench.jsonl", "cwd": "/tmp",
    "permission_mode": "default", "hook_event_name": "PreToolUse", "tool_name": "Bash",
    "tool_input": {"command": "make test"}, "tool_use_id": "toolu_bench",
}).encode()


def default_otelwatch() -> list[str]:
    """The installed console script beside this interpreter (what `hooks install` writes), else -m."""
    script = Path(sys.executable).with_name("otelwatch")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "otelwatch"]


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child): the CPU time hardly moves with the host's load."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, input=PAYLOAD, capture_output=True, env=env, check=False, timeout=60)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted list."""
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def extra_imports(hook: list[str], env: dict[str, str]) -> list[str]:
    """Top-level names of the modules the hook imports that `python -c pass` does not."""
    def imported(argv: list[str]) -> set[str]:
        r = subprocess.run(argv, input=PAYLOAD, capture_output=True, env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
                           check=False, timeout=60)
        names = set()
        for line in r.stderr.decode("utf-8", "replace").splitlines():
            if line.startswith("import time:") and line.count("|") == 2:
                name = line.rsplit("|", 1)[1].strip()
                if name != "imported package":
                    names.add(name)
        return names

    return sorted(imported(hook) - imported([sys.executable, "-c", "pass"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200, help="runs of each command (default 200)")
    ap.add_argument("--otelwatch", default=None,
                    help="the otelwatch command to time (default: the script beside this python)")
    ap.add_argument("--no-compile", action="store_true", help="do not compile the package's bytecode first")
    ap.add_argument("--out", default=str(HERE / "results" / "hook.md"), help="markdown output ('' for none)")
    args = ap.parse_args()
    if not args.no_compile:
        import compileall

        import otelwatch

        compileall.compile_dir(os.path.dirname(otelwatch.__file__), quiet=1)
    hook = ([args.otelwatch] if args.otelwatch else default_otelwatch()) + ["hook", "claude"]
    true = shutil.which("true") or "/bin/true"
    commands = {"true": [true], "python -c pass": [sys.executable, "-c", "pass"], "otelwatch hook claude": hook}
    with tempfile.TemporaryDirectory(prefix="owbench-hook-") as state:
        env = {**os.environ, "OTELWATCH_STATE_DIR": state}
        for argv in commands.values():  # warm the page cache and the .pyc files
            for _ in range(3):
                run_once(argv, env)
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, argv in commands.items():
                wall, used = run_once(argv, env)
                times[name].append(wall)
                cpu[name].append(used)
        load_after = os.getloadavg()[0]
        recorded = len((Path(state) / "events" / "bench-hook-0000.jsonl").read_bytes().splitlines())
        extra = extra_imports(hook, env)

    stats = {}
    for name, values in times.items():
        values.sort()
        stats[name] = {"median": statistics.median(values), "p90": quantile(values, 0.90),
                       "p99": quantile(values, 0.99), "max": values[-1], "cpu": statistics.median(cpu[name])}
    base_true, base_py = stats["true"]["median"], stats["python -c pass"]["median"]
    host = (f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"load average {load_before:.2f} before, {load_after:.2f} after; {args.runs} runs each, interleaved"
            f"{'' if args.no_compile else '; bytecode compiled'}")
    lines = [f"Hook wall time ({host})", "",
             "| command | median ms | p90 ms | p99 ms | max ms | CPU ms (median) | median vs true "
             "| median vs python -c pass |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in stats.items():
        lines.append(f"| `{name}` | {s['median'] * 1e3:.1f} | {s['p90'] * 1e3:.1f} | {s['p99'] * 1e3:.1f} | "
                     f"{s['max'] * 1e3:.1f} | {s['cpu'] * 1e3:.1f} | {s['median'] / base_true:.1f}x | "
                     f"{s['median'] / base_py:.2f}x |")
    hook_s = stats["otelwatch hook claude"]
    lines += ["", f"otelwatch adds {(hook_s['median'] - base_py) * 1e3:.1f} ms (median) to a bare interpreter start; "
              f"target: median <= 60 ms, p99 <= 150 ms on an idle 2-core host: "
              f"{'met' if hook_s['median'] <= 0.060 and hook_s['p99'] <= 0.150 else 'NOT met'} here.",
              f"Records written: {recorded} of {args.runs + 3} hook runs.",
              f"Modules imported beyond `python -c pass`: {', '.join(extra) or 'none'}.",
              f"Command: `{' '.join(hook)}`."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
