"""Benchmark: CPU cost per tick of otelwatch's probe against naive psutil and process-exporter.

    python bench/bench_probe.py --n 100 --n 1000

For each N it starts N sleeper processes, each holding ~20 FDs (16 on /dev/null,
std streams, whatever the bench inherited) and 2 TCP connections to a local server, then measures the CPU
time one tick costs:

  (a) otelwatch: ProcessTableReader().read() + Prober.sample over the N roots
      (time.process_time of this process, which counts all its threads; median per tick);
  (a') otelwatch's portable backend ([probe] backend = "psutil"): PsutilTableReader().read()
      + PsutilProber.sample, measured the same way;
  (b) naive psutil: per process oneshot() + net_connections() + num_fds() + cpu_times();
  (c) prometheus-process-exporter (when /usr/bin/prometheus-process-exporter exists),
      configured to match the sleepers, scraped a few times; its CPU comes from
      utime+stime of its /proc/PID/stat, per scrape. Run twice: with its defaults and
      with -gather-smaps=false -threads=false (its cheapest setting). It does not
      count TCP connections at all.

Prints a table and writes it as markdown to bench/results/latest.md. This is a
script, not a test: it spawns thousands of FDs and sockets and takes a minute or two.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from otelwatch.probe.backends import probe_backend  # noqa: E402
from otelwatch.probe.proctable import read_proc  # noqa: E402

EXPORTER = "/usr/bin/prometheus-process-exporter"
NAME = "owbench-sleep"  # comm of the sleepers (15 chars max), what process-exporter matches
FILES_PER_PROC = 16
CONNS_PER_PROC = 2


# --------------------------------------------------------------------------- the population


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start_server() -> tuple[int, int]:
    """A forked process that accepts and holds every connection. Returns (pid, port)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    port = srv.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the server
        held = []
        try:
            while True:
                ready, _, _ = select.select([srv], [], [], 1.0)
                if ready:
                    conn, _ = srv.accept()
                    # Linger 0: closing resets instead of leaving TIME_WAIT entries, which
                    # would inflate the next measurement's TCP tables.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    held.append(conn)
                if os.getppid() == 1:  # the bench died: do not linger
                    break
        finally:
            os._exit(0)
    srv.close()
    return pid, port


def spawn_sleepers(n: int, port: int, lifetime: int, bindir: Path) -> list[int]:
    """N tiny processes: fork, open the FDs and sockets, exec `sleep` under the name NAME.

    exec keeps inheritable FDs, so each sleeper is a small C program holding real
    files and real TCP connections, not a Python interpreter (N of those would
    need gigabytes)."""
    exe = bindir / NAME
    if not exe.exists():
        exe.symlink_to(shutil.which("sleep") or "/bin/sleep")
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(FILES_PER_PROC):
                    os.set_inheritable(os.open(os.devnull, os.O_RDONLY), True)
                for _ in range(CONNS_PER_PROC):
                    s = socket.create_connection(("127.0.0.1", port))
                    os.set_inheritable(s.detach(), True)
                os.execv(str(exe), [NAME, str(lifetime)])
            finally:
                os._exit(127)
        pids.append(pid)
    # Wait until every child has exec'd (its comm is the new name) and so holds its FDs.
    deadline = time.monotonic() + 60
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                with open(f"/proc/{pid}/comm") as fh:
                    if fh.read().strip() == NAME:
                        pending.discard(pid)
            except OSError:
                pending.discard(pid)
        if pending:
            time.sleep(0.05)
    return pids


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


# --------------------------------------------------------------------------- measurements


def bench_otelwatch(pids: list[int], ticks: int, backend: str = "procfs") -> tuple[float, dict[str, float]]:
    """Median CPU ms per tick (table read + probe) of one probe backend, and a check of what it saw."""
    reader, prober = probe_backend(backend)
    targets = {f"s{pid}": pid for pid in pids}
    samples = prober.sample(reader.read(), targets, 30.0)  # warm: cmdline cache, threads
    per_tick = []
    for _ in range(ticks):
        cpu0 = time.process_time()
        samples = prober.sample(reader.read(), targets, 30.0)
        per_tick.append(time.process_time() - cpu0)
    cpu = statistics.median(per_tick) * 1000
    prober.shutdown()
    est = [s.tcp.get("ESTABLISHED", 0) for s in samples.values() if s.tcp is not None]
    fds = [s.num_fds for s in samples.values() if s.num_fds is not None]
    check = {
        "ok": sum(1 for s in samples.values() if s.status.value == "ok"),
        "tcp_per_proc": sum(est) / max(1, len(est)),
        "fds_per_proc": sum(fds) / max(1, len(fds)),
    }
    return cpu, check


def bench_psutil(pids: list[int], ticks: int) -> float:
    import psutil

    procs = [psutil.Process(pid) for pid in pids]
    conns = "net_connections" if hasattr(psutil.Process, "net_connections") else "connections"

    def tick() -> None:
        for p in procs:
            try:
                with p.oneshot():
                    p.cpu_times()
                    p.memory_info()
                    p.num_threads()
                    p.status()
                    p.num_fds()
                    getattr(p, conns)(kind="tcp")
            except psutil.Error:
                pass

    tick()  # warm
    per_tick = []
    for _ in range(ticks):
        cpu0 = time.process_time()
        tick()
        per_tick.append(time.process_time() - cpu0)
    return statistics.median(per_tick) * 1000


def proc_cpu_seconds(pid: int) -> float:
    info = read_proc(pid)
    if info is None:
        raise RuntimeError(f"process-exporter (PID {pid}) exited during the benchmark")
    return info.cpu_seconds


def bench_exporter(scrapes: int, lean: bool, tmp: Path) -> float | None:
    if not os.path.exists(EXPORTER):
        return None
    cfg = tmp / "process-exporter.yml"
    # One group per process, as otelwatch reports one sample per session.
    cfg.write_text(f"process_names:\n  - name: '{{{{.Comm}}}}-{{{{.PID}}}}'\n    comm:\n    - {NAME}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [EXPORTER, "-config.path", str(cfg), "-web.listen-address", f"127.0.0.1:{port}"]
    if lean:
        argv += ["-gather-smaps=false", "-threads=false"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                body = urllib.request.urlopen(url, timeout=30).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    return None
                time.sleep(0.1)
        if NAME.encode() not in body:
            print("warning: process-exporter matched no sleepers", file=sys.stderr)
        urllib.request.urlopen(url, timeout=30).read()  # warm
        cpu0 = proc_cpu_seconds(proc.pid)
        for _ in range(scrapes):
            urllib.request.urlopen(url, timeout=30).read()
        return (proc_cpu_seconds(proc.pid) - cpu0) / scrapes * 1000
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- main


SETTLE_S = 2.0
ROUNDS = 3


def fmt_runs(runs: list[float]) -> str:
    return " ".join(f"{r:.1f}" for r in runs)


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b <= 0 else f"{a / b:.1f}x"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, action="append", help="number of sleepers (repeatable)")
    ap.add_argument("--ticks", type=int, default=0,
                    help="otelwatch ticks per N (median taken; default: more at small N)")
    ap.add_argument("--scrapes", type=int, default=0,
                    help="process-exporter scrapes per N (default: more at small N)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "latest.md"))
    args = ap.parse_args()
    sizes = args.n or [100, 1000]
    limit = raise_fd_limit()
    need = max(sizes) * (CONNS_PER_PROC + 1) + 200
    if limit < need:
        print(f"RLIMIT_NOFILE {limit} is below the {need} the server needs", file=sys.stderr)
        return 2

    rows = []
    with tempfile.TemporaryDirectory(prefix="owbench-") as tmpname:
        tmp = Path(tmpname)
        for n in sizes:
            server_pid, port = start_server()
            pids: list[int] = []
            try:
                t0 = time.monotonic()
                pids = spawn_sleepers(n, port, lifetime=600, bindir=tmp)
                print(f"N={n}: {len(pids)} sleepers up in {time.monotonic() - t0:.1f} s", flush=True)
                # Let the fork/exec storm settle, then measure the two in alternating rounds
                # so both see the same machine: a burst of load lands on both, not on one.
                time.sleep(SETTLE_S)
                ow_runs, pb_runs, ps_runs = [], [], []
                ps_ticks = max(1, min(9, 500 // n))  # naive psutil re-reads the TCP table per process
                pb_ticks = args.ticks or max(3, 300 // n)
                for _ in range(ROUNDS):
                    ow_run, check = bench_otelwatch(pids, args.ticks or max(10, 3000 // n))
                    ow_runs.append(ow_run)
                    pb_run, pb_check = bench_otelwatch(pids, pb_ticks, "psutil")
                    pb_runs.append(pb_run)
                    ps_runs.append(bench_psutil(pids, ps_ticks))
                ow, pb, ps = (statistics.median(r) for r in (ow_runs, pb_runs, ps_runs))
                print(f"  otelwatch  {ow:8.1f} ms/tick   saw {check}  (rounds: {fmt_runs(ow_runs)})", flush=True)
                print(f"  ow psutil  {pb:8.1f} ms/tick   saw {pb_check}  ({pb_ticks} ticks; "
                      f"rounds: {fmt_runs(pb_runs)})", flush=True)
                print(f"  psutil     {ps:8.1f} ms/tick   ({ps_ticks} ticks; rounds: {fmt_runs(ps_runs)})",
                      flush=True)
                pe = bench_exporter(args.scrapes or max(10, 2000 // n), lean=False, tmp=tmp)
                print(f"  process-exporter (defaults) {fmt(pe)} ms/scrape", flush=True)
                pel = bench_exporter(args.scrapes or max(10, 2000 // n), lean=True, tmp=tmp)
                print(f"  process-exporter (lean)     {fmt(pel)} ms/scrape", flush=True)
                rows.append((n, ow, pb, ps, pe, pel, check))
            finally:
                kill_all([server_pid])  # first, so its resets close both ends cleanly
                kill_all(pids)

    lines = [
        "# Probe benchmark",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, Linux {platform.release()}.",
        f"Each process: {FILES_PER_PROC} files, {CONNS_PER_PROC} ESTABLISHED TCP connections, "
        "its std streams and what it inherited (FDs as counted below). "
        "Median CPU time per tick, after 2 s of settling, otelwatch (both probe backends) and psutil measured "
        "in 3 alternating rounds (otelwatch: table read + probe, procfs backend or psutil backend; "
        "naive psutil: per process oneshot + net_connections + num_fds + cpu_times) or per scrape "
        "(process-exporter, which does not count TCP; lean = -gather-smaps=false -threads=false).",
        "",
        "| N | otelwatch ms | otelwatch psutil backend ms | naive psutil ms | process-exporter ms "
        "| process-exporter lean ms | psutil backend / otelwatch | naive psutil / otelwatch "
        "| exporter / otelwatch | exporter lean / otelwatch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, ow, pb, ps, pe, pel, _check in rows:
        lines.append(f"| {n} | {fmt(ow)} | {fmt(pb)} | {fmt(ps)} | {fmt(pe)} | {fmt(pel)} | {ratio(pb, ow)} "
                     f"| {ratio(ps, ow)} | {ratio(pe, ow)} | {ratio(pel, ow)} |")
    lines += ["", "What otelwatch saw (last tick): " + "; ".join(
        f"N={n}: {c['ok']:.0f} ok, {c['tcp_per_proc']:.2f} ESTABLISHED and "
        f"{c['fds_per_proc']:.1f} FDs per process" for n, *_rest, c in rows)]
    write_report(lines, args.out)
    return 0


def write_report(lines: list[str], out: str | Path) -> None:
    """Print the report and write it to `out` (its directory made when missing)."""
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"written to {path}")


if __name__ == "__main__":
    sys.exit(main())
