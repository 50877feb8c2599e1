"""Benchmark: what the WHOLE daemon costs, next to process-exporter and a naive psutil sampler.

    python bench/bench_daemon.py --n 100 --n 1000 --rounds 2

For each N it forks N sleepers (bench_probe's population: 16 files and 2
ESTABLISHED TCP connections each), registers each as a session in a private
registry directory and runs, side by side on the same processes:

  (a) `otelwatch run` as a subprocess (interval 1 s, registry source only, the
      Prometheus endpoint on, startup_grace 5 s so that the sessions are judged in the
      window, as a host's sessions mostly are: the sleepers read `active`): CPU seconds
      from its /proc/PID/stat over a steady window after warm-up, divided by the ticks
      it made in that window (/healthz); its RSS at the end of the window; /metrics
      scraped every second, each scrape timed from the client;
  (b) prometheus-process-exporter (when installed), one group per sleeper, scraped
      every second during the same window; its CPU measured the same way, per scrape;
  (c) a naive psutil sampler (oneshot + cpu_times + memory_info + num_threads +
      status + num_fds + net_connections per process), after the window, CPU per tick.

Every round starts both subprocesses afresh. Prints ratios and the range across
rounds and writes markdown to bench/results/daemon.md. A script, not a test.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_probe import (
    CONNS_PER_PROC,
    EXPORTER,
    NAME,
    REPO,
    bench_psutil,
    kill_all,
    raise_fd_limit,
    spawn_sleepers,
    start_server,
    write_report,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 30.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return bytes(resp.read())


def wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if cond():  # type: ignore[operator]
                return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def start_daemon(pids: list[int], tmp: Path, stalled: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    reg = tmp / "registry"
    reg.mkdir(mode=0o700, exist_ok=True)
    for f in reg.iterdir():
        f.unlink()
    for pid in pids:
        (reg / f"s{pid}.json").write_text(json.dumps({"session_id": f"s{pid}", "pid": pid, "agent": "bench"}))
    state = tmp / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    port = free_port()
    cfg = tmp / "otelwatch.toml"
    cfg.write_text(
        f'interval = 1.0\nstate_dir = "{state}"\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        f'[sources.registry]\ndir = "{reg}"\n'
        # The sleepers are past their start-up by the measured window, as a host's sessions
        # mostly are (in startup_grace nothing is judged, and the probe reads every tree in full).
        "[classify]\nstartup_grace = 5\n"
        # --stalled: every session silent past stall_after before the window (stalled,
        # waiting_on_network), so every tree is read in full on every tick.
        + ('stall_after = "5s"\n' if stalled else "")
        + "[sources.processes]\nenabled = false\n[sources.tmux]\nenabled = false\n"
        "[sources.transcripts]\nenabled = false\n[export.otlp]\nenabled = false\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    log = open(tmp / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "otelwatch", "run", "--config", str(cfg)],
                            stdout=log, stderr=log, cwd=REPO, env=env)
    log.close()
    return proc, f"http://127.0.0.1:{port}"


def start_exporter(tmp: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    if not os.path.exists(EXPORTER):
        return None
    cfg = tmp / "process-exporter.yml"
    # One group per process, as otelwatch reports one series set per session.
    cfg.write_text(f"process_names:\n  - name: '{{{{.Comm}}}}-{{{{.PID}}}}'\n    comm:\n    - {NAME}\n")
    port = free_port()
    proc = subprocess.Popen([EXPORTER, "-config.path", str(cfg), "-web.listen-address", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}/metrics"


def one_round(n: int, pids: list[int], tmp: Path, warm: float, window: float, ps_ticks: int,
              stalled: bool = False) -> dict[str, float]:
    daemon, base = start_daemon(pids, tmp, stalled)
    exporter = start_exporter(tmp)
    try:
        def all_seen() -> bool:
            sessions = json.loads(get(base + "/api/sessions"))
            return sum(1 for s in sessions if s.get("cpu_percent") is not None) >= n

        wait_for(all_seen, 120, f"the daemon to see {n} sessions")
        if exporter is not None:
            wait_for(lambda: NAME.encode() in get(exporter[1]), 60, "process-exporter")
        # Warm-up: imports, first samples, the SDK's series; the exporter scraped as in the window.
        end = time.monotonic() + warm
        while time.monotonic() < end:
            if exporter is not None:
                get(exporter[1])
            get(base + "/metrics")
            time.sleep(1.0)
        ticks0 = json.loads(get(base + "/healthz"))["ticks"]
        d0 = cpu_seconds(daemon.pid)
        e0 = cpu_seconds(exporter[0].pid) if exporter is not None else 0.0
        scrapes: list[float] = []
        exporter_scrapes = 0
        t_end = time.monotonic() + window
        next_at = time.monotonic()
        while time.monotonic() < t_end:
            if exporter is not None:
                get(exporter[1])
                exporter_scrapes += 1
            t0 = time.perf_counter()
            body = get(base + "/metrics")
            scrapes.append(time.perf_counter() - t0)
            next_at += 1.0
            time.sleep(max(0.0, next_at - time.monotonic()))
        d1 = cpu_seconds(daemon.pid)
        ticks1 = json.loads(get(base + "/healthz"))["ticks"]
        states = collections.Counter(f"{s['state']}/{s['reason']}" for s in json.loads(get(base + "/api/sessions")))
        print(f"N={n}: sessions at the end of the window: {dict(states)}", flush=True)
        e1 = cpu_seconds(exporter[0].pid) if exporter is not None else 0.0
        result = {
            "daemon_ms": (d1 - d0) / max(1, ticks1 - ticks0) * 1000,
            "ticks": ticks1 - ticks0,
            "rss_mb": rss_mb(daemon.pid),
            "scrape_ms": statistics.median(scrapes) * 1000,
            "scrape_max_ms": max(scrapes) * 1000,
            "overflow": float(b"otel_metric_overflow" in body),
            "exporter_ms": (e1 - e0) / exporter_scrapes * 1000 if exporter is not None else float("nan"),
            "exporter_rss_mb": rss_mb(exporter[0].pid) if exporter is not None else float("nan"),
        }
    finally:
        for proc in (daemon, exporter[0] if exporter is not None else None):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    result["psutil_ms"] = bench_psutil(pids, ps_ticks)
    return result


def span(values: list[float], fmt: str = "{:.1f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, action="append", help="number of sessions (repeatable)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warm", type=float, default=15.0, help="seconds before the measured window")
    ap.add_argument("--window", type=float, default=30.0, help="seconds of the measured window")
    ap.add_argument("--stalled", action="store_true",
                    help="every session stalled in the window (all trees read in full each tick)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "daemon.md"))
    args = ap.parse_args()
    sizes = args.n or [100, 1000]
    limit = raise_fd_limit()
    if limit < max(sizes) * (CONNS_PER_PROC + 1) + 200:
        print(f"RLIMIT_NOFILE {limit} is too low for N={max(sizes)}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="owbench-daemon-") as tmpname:
        tmp = Path(tmpname)
        os.chmod(tmp, 0o700)
        for n in sizes:
            server_pid, port = start_server()
            pids: list[int] = []
            try:
                pids = spawn_sleepers(n, port, lifetime=3600, bindir=tmp)
                time.sleep(2.0)
                runs = []
                for r in range(args.rounds):
                    res = one_round(n, pids, tmp, args.warm, args.window, max(1, min(5, 500 // n)), args.stalled)
                    runs.append(res)
                    print(f"N={n} round {r + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()), flush=True)
                rows.append((n, runs))
            finally:
                kill_all([server_pid])
                kill_all(pids)

    def col(runs: list[dict[str, float]], key: str) -> list[float]:
        return [r[key] for r in runs]

    lines = [
        "# Whole-daemon benchmark",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, Linux {platform.release()}. `otelwatch run`, interval 1 s, "
        "registry source only; N sleepers with 16 files and 2 ESTABLISHED TCP connections each, "
        + ("all stalled (stall_after 5 s: every tree read in full each tick); " if args.stalled
           else "active after a 5 s startup_grace; ")
        + f"{args.rounds} rounds of {args.window:.0f} s after {args.warm:.0f} s of warm-up; "
        "process-exporter (one group per PID) scraped every second in the same window; "
        "CPU from /proc/PID/stat. Ranges are across rounds.",
        "",
        "| N | otelwatch run, ms CPU per tick | RSS MB | /metrics scrape ms (median, max) "
        "| process-exporter ms per scrape | otelwatch / exporter | naive psutil ms per tick "
        "| psutil / otelwatch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, runs in rows:
        ratio_pe = [r["daemon_ms"] / r["exporter_ms"] for r in runs if r["exporter_ms"] > 0]
        ratio_ps = [r["psutil_ms"] / r["daemon_ms"] for r in runs if r["daemon_ms"] > 0]
        lines.append(
            f"| {n} | {span(col(runs, 'daemon_ms'))} | {span(col(runs, 'rss_mb'), '{:.0f}')} "
            f"| {span(col(runs, 'scrape_ms'))}, {span(col(runs, 'scrape_max_ms'))} "
            f"| {span(col(runs, 'exporter_ms'))} | {span(ratio_pe, '{:.2f}x') if ratio_pe else 'n/a'} "
            f"| {span(col(runs, 'psutil_ms'), '{:.0f}')} | {span(ratio_ps, '{:.0f}x') if ratio_ps else 'n/a'} |"
        )
    overflow = any(r["overflow"] for _, runs in rows for r in runs)
    lines += ["", f"Overflow series (otel.metric.overflow) in /metrics: {'yes' if overflow else 'none'}."]
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
