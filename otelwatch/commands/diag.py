"""`otelwatch diag PID [--json] [--backend B]`: sample one process tree now and print the evidence.

Owns the one-off report a person reads at 3 a.m.: two samples one second apart
(so CPU is a real rate), with kernel wait channels, as a table or as JSON,
read by either probe backend, with a note naming what that backend cannot know
here (shown as "?", or "-" for wchan). It only reads; it never signals, and
never prints a traceback: every failure is one line on stderr and a non-zero
exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from otelwatch.model import ProcessIdentity, ProcessSample, SampleStatus, TreeSample
from otelwatch.probe.backends import probe_backend, resolve
from otelwatch.probe.prober import Prober

__all__ = ["backend_notes", "diag_main", "format_table", "sample_to_json"]

EXIT_OK = 0
EXIT_NO_PROCESS = 1
EXIT_UNREADABLE = 2
EXIT_USAGE = 2  # like the CLI's: a bad --backend
INTERVAL = 1.0  # seconds between the two samples
TIMEOUT = 5.0  # a one-off report may wait longer than a tick would
SESSION = "diag"


def backend_notes(backend: str) -> list[str]:
    """What the resolved backend ("procfs" or "psutil") cannot read on this host."""
    if backend != "psutil":
        return []
    from otelwatch.probe.psutil_backend import HAS_IO_COUNTERS, LINUX

    notes = ["wchan: unknown (psutil has no kernel wait channel; the procfs backend reads it on Linux)"]
    if not HAS_IO_COUNTERS:
        notes.append("io: unknown (psutil has no per-process I/O counters on this platform)")
    if LINUX:
        notes.append("tcp: unknown for processes in another network namespace "
                     "(psutil reads only its own namespace's sockets; the procfs backend reads theirs)")
    return notes


def diag_main(pid: int, as_json: bool = False, *, backend: str = "auto", stdout: TextIO | None = None,
              stderr: TextIO | None = None, interval: float = INTERVAL) -> int:
    """Print pid's tree (table, or JSON with as_json) as `backend` reads it ("auto",
    "procfs", "psutil"). 0: printed; 1: no such process (or it ended during the report);
    2: printed, but some of it was not readable."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    prober: Prober | None = None
    try:
        name = resolve(backend)
    except ValueError as exc:
        print(f"otelwatch diag: {exc}", file=err)
        return EXIT_USAGE
    try:
        # One tree: psutil may read each process's own sockets, exact even where shared.
        reader, prober = probe_backend(name, per_process_tcp=True)
        first = reader.read()
        info = first.get(pid)
        if info is None:
            print(f"otelwatch diag: no process with PID {pid}", file=err)
            return EXIT_NO_PROCESS
        identity = info.identity
        prober.sample(first, {SESSION: identity}, TIMEOUT)
        time.sleep(interval)
        sample = prober.sample(reader.read(), {SESSION: identity}, TIMEOUT, with_wchan=True)[SESSION]
        return _report(pid, identity, sample, as_json, out, err, name)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's exit-time
        # flush of stdout from printing a second error.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_NO_PROCESS
    except Exception as exc:  # a report must end in one line, never a traceback
        print(f"otelwatch diag: cannot read PID {pid}: {type(exc).__name__}: {exc}", file=err)
        return EXIT_NO_PROCESS
    finally:
        if prober is not None:
            prober.shutdown(1.0)


def _report(pid: int, identity: ProcessIdentity, sample: TreeSample, as_json: bool,
            out: TextIO, err: TextIO, backend: str) -> int:
    if sample.status is SampleStatus.VANISHED:
        print(f"otelwatch diag: process {pid} exited during the report ({sample.error})", file=err)
        return EXIT_NO_PROCESS
    if sample.status is SampleStatus.PROBE_TIMEOUT:
        print(f"otelwatch diag: reading process {pid} did not finish ({sample.error})", file=err)
        return EXIT_UNREADABLE
    notes = backend_notes(backend)
    if as_json:
        json.dump(sample_to_json(sample, backend=backend, notes=notes), out, indent=2)
        out.write("\n")
    else:
        out.write(format_table(sample, backend=backend, notes=notes))
    if sample.status is SampleStatus.ACCESS_DENIED:
        print(f"otelwatch diag: some of process {pid}'s tree is not readable as uid {os.geteuid()} "
              f"({sample.error}); run as its owner or root for FDs and TCP", file=err)
        return EXIT_UNREADABLE
    return EXIT_OK


# --------------------------------------------------------------------------- formatting


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1048576:.1f}M"


def _opt(v: object) -> str:
    return "?" if v is None else str(v)


def _pct(v: float | None) -> str:
    return "?" if v is None else f"{v:.1f}"


def _tcp(tcp: Mapping[str, int] | None, listen: int) -> str:
    if tcp is None:
        return "?"
    parts = [f"{state}={n}" for state, n in sorted(tcp.items())]
    if listen:
        parts.append(f"LISTEN={listen}")
    return ",".join(parts) or "-"


def _cmd(p: ProcessSample, width: int = 100) -> str:
    text = " ".join(p.cmdline) or f"[{p.name}]"
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(s: TreeSample, *, backend: str = "", notes: Sequence[str] = ()) -> str:
    """A human-readable report: the tree's totals, one row per process, remote endpoints,
    and (when given) the backend that read it with what it could not know."""
    lines = [
        f"tree of PID {s.root.pid if s.root else '?'}: status {s.status.value}"
        + (f" ({s.error})" if s.error else ""),
        f"  cpu {_pct(s.cpu_percent)}% of a core, cpu time {s.cpu_seconds:.2f} s, rss {_mib(s.rss_bytes)}, "
        f"threads {s.threads}, fds {_opt(s.num_fds)}, tcp {_tcp(s.tcp, s.listen)}, "
        f"descendants {s.children}, io read {_opt(s.read_bytes)} B / write {_opt(s.write_bytes)} B",
    ]
    if backend:
        lines.append(f"  read by the {backend} backend" + (":" if notes else ""))
        lines.extend(f"    {note}" for note in notes)
    lines.append("")
    header = ("PID", "PPID", "S", "WCHAN", "CPU%", "RSS", "THR", "FDS", "TCP", "CMD")
    rows = [header]
    for p in s.processes:
        rows.append((str(p.pid), str(p.ppid), p.status, p.wchan or "-", _pct(p.cpu_percent),
                     _mib(p.rss_bytes), str(p.threads), _opt(p.num_fds), _tcp(p.tcp, p.listen), _cmd(p)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1])
    conns = [(p.pid, c) for p in s.processes for c in p.connections]
    lines.append("")
    if conns:
        lines.append("TCP connections (non-LISTEN):")
        for pid, c in conns:
            lines.append(f"  {pid}: {c.state:<12} {c.local} -> {c.remote}")
    else:
        lines.append("TCP connections (non-LISTEN): none")
    return "\n".join(lines) + "\n"


def _usage(x: TreeSample | ProcessSample) -> dict[str, Any]:
    """The measurements a tree and each of its processes both have."""
    return {
        "cpu_percent": None if x.cpu_percent is None else round(x.cpu_percent, 2),
        "cpu_seconds": round(x.cpu_seconds, 3),
        "rss_bytes": x.rss_bytes,
        "threads": x.threads,
        "num_fds": x.num_fds,
        "tcp": None if x.tcp is None else dict(x.tcp),
        "listen": x.listen,
        "read_bytes": x.read_bytes,
        "write_bytes": x.write_bytes,
    }


def sample_to_json(s: TreeSample, *, backend: str = "", notes: Sequence[str] = ()) -> dict[str, Any]:
    """The sample as plain JSON types (the same field names as the model), plus the backend
    that read it and what it could not know, when given."""
    extra: dict[str, Any] = {"backend": backend, "notes": list(notes)} if backend else {}
    return {
        **extra,
        "time": s.time,
        "status": s.status.value,
        "error": s.error,
        "root": None if s.root is None else {"pid": s.root.pid, "create_time": s.root.create_time},
        **_usage(s),
        "children": s.children,
        "processes": [
            {
                "pid": p.pid,
                "ppid": p.ppid,
                "pgid": p.pgid,
                "uid": p.uid,
                "name": p.name,
                "status": p.status,
                "wchan": p.wchan,
                "create_time": p.create_time,
                **_usage(p),
                "connections": [{"state": c.state, "local": c.local, "remote": c.remote}
                                for c in p.connections],
                "cmdline": list(p.cmdline),
            }
            for p in s.processes
        ],
    }
