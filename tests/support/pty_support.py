"""Reading what a program wrote to a pseudo-terminal, bounded in time."""

from __future__ import annotations

import os
import select
import subprocess
import time

__all__ = ["read_pty"]


def read_pty(master: int, proc: subprocess.Popen[bytes] | None = None, *, timeout: float,
             poll: float = 0.2, until_quiet: bool = False) -> bytes:
    """The bytes on `master` until end of file, the program's exit (`proc`) or `timeout`
    seconds; with `until_quiet`, also until a poll interval passes with nothing new."""
    out = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([master], [], [], poll)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the slave side closed (Linux says EIO)
                break
            if not chunk:
                break
            out += chunk
        elif until_quiet or (proc is not None and proc.poll() is not None):
            break
    return out
