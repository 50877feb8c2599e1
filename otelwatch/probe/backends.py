"""Which probe backend reads this host: /proc and netlink (Linux) or psutil (portable).

Owns the choice (`resolve`, from `[probe] backend`) and the pair the daemon and
`otelwatch diag` build from it (`probe_backend`: a process-table reader and a
prober that compute identities with one boot time). It reads nothing beyond
checking that /proc exists, and imports psutil only when psutil is chosen, so
the procfs path costs nothing more than before.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from otelwatch.probe.prober import Prober
from otelwatch.probe.proctable import ProcessTableReader

__all__ = ["BACKENDS", "probe_backend", "resolve", "table_reader"]

BACKENDS = ("auto", "procfs", "psutil")


def resolve(backend: str, proc_root: str = "/proc") -> str:
    """"procfs" or "psutil" for a configured backend. auto: procfs where a Linux /proc is
    mounted at proc_root (its /proc/stat holds the boot time every identity needs; the
    BSDs' /proc has none), psutil elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"probe backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if backend == "auto":
        return "procfs" if os.path.isfile(os.path.join(proc_root, "stat")) else "psutil"
    return backend


def table_reader(backend: str, proc_root: str = "/proc", *,
                 boot_time: float | None = None) -> ProcessTableReader:
    """A process-table reader of the resolved backend."""
    if resolve(backend, proc_root) == "psutil":
        from otelwatch.probe.psutil_backend import PsutilTableReader

        return PsutilTableReader(boot_time=boot_time)
    return ProcessTableReader(proc_root, boot_time=boot_time)


def probe_backend(backend: str, proc_root: str = "/proc", *, clock: Callable[[], float] = time.time,
                  max_workers: int = 1, per_process_tcp: bool = False) -> tuple[ProcessTableReader, Prober]:
    """(table reader, prober) for `[probe] backend`. The reader's `boot_time` is the one to
    hand to anything else that compares identities (the recovery actuator).
    per_process_tcp: psutil reads each process's own sockets instead of joining one
    host-wide table (exact per process, costly per tick; for one-off reports)."""
    if resolve(backend, proc_root) == "psutil":
        from otelwatch.probe.psutil_backend import PsutilProber, PsutilTableReader

        return PsutilTableReader(), PsutilProber(max_workers=max_workers, clock=clock, proc_root=proc_root,
                                                 host_tcp=False if per_process_tcp else None)
    return ProcessTableReader(proc_root), Prober(proc_root=proc_root, max_workers=max_workers, clock=clock)
