"""Following one append-only JSON-lines file: `FileTail`.

Owns reading new complete lines of one file across the things files do while
they are followed: not existing yet, already holding history, growing by
partial lines, being truncated, being rotated or replaced. Each `poll` reads
at most `max_read` bytes, so one huge file cannot stall a tick, and never
holds more than one line's worth of bytes (`MAX_LINE_BYTES`): a longer line is
skipped as it streams past and counted as malformed.

It never raises for OS errors: they are counted in `errors`, kept in
`last_error` and logged once per distinct error. It never interprets lines
beyond handing them to the event parser.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import BinaryIO

from otelwatch.events import MAX_LINE_BYTES, parse_events
from otelwatch.model import Event

__all__ = ["DEFAULT_MAX_READ", "FileTail", "LineSplitter"]

log = logging.getLogger("otelwatch.sources.tail")

DEFAULT_MAX_READ = 4 << 20  # bytes per poll per file
_CHUNK = 256 << 10


class LineSplitter:
    """Cuts a byte stream into complete lines (without their newline).

    Holds at most MAX_LINE_BYTES of an unfinished line: a longer line is dropped
    as it streams past and counted in `overlong`. Shared by `FileTail` and the
    exec wrapper's stdout reader.
    """

    def __init__(self) -> None:
        self.partial = bytearray()
        self.skipping = False  # inside an overlong line: drop bytes until its newline
        self.overlong = 0

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        """The lines `data` completes, each with the position in `data` just after its newline."""
        out: list[tuple[bytes, int]] = []
        start = 0
        while (nl := data.find(b"\n", start)) >= 0:
            piece = data[start:nl]
            start = nl + 1
            if self.skipping:
                self.skipping = False
                continue
            if self.partial:
                self.partial += piece
                piece = bytes(self.partial)
                self.partial.clear()
            if len(piece) > MAX_LINE_BYTES:
                self.overlong += 1
            else:
                out.append((piece, start))
        if not self.skipping:
            self.partial += data[start:]
            if len(self.partial) > MAX_LINE_BYTES:
                self.partial.clear()
                self.skipping = True
                self.overlong += 1
        return out

    def take_partial(self) -> bytes:
        """The unfinished line, which will never get its newline (the stream ended); resets."""
        rest = b"" if self.skipping else bytes(self.partial)
        self.reset()
        return rest

    def reset(self) -> None:
        self.partial.clear()
        self.skipping = False


class FileTail:
    """Follows `path`; `poll(now)` returns the events of lines completed since the last poll.

    Lines already in the file when it is first seen are dated by the file's
    mtime (their own timestamp wins when they carry one); lines appended later
    are dated by the `now` of the poll that reads them.
    """

    def __init__(self, path: str | Path, source: str = "stream", json_only: bool = True,
                 *, max_read: int = DEFAULT_MAX_READ) -> None:
        self.path = str(path)
        self.source = source
        self.json_only = json_only
        self.max_read = max_read
        self.errors = 0  # OS errors seen (each poll that failed counts once)
        self.last_error = ""
        self._fh: BinaryIO | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._offset = 0
        self._lines = LineSplitter()
        self._seen_any = False  # first sight of the path done (history dated by mtime)
        self._backlog_end = 0  # bytes present at first sight ...
        self._backlog_time = 0.0  # ... and the mtime that dates them
        self._logged: set[str] = set()

    # ------------------------------------------------------------------ public

    def poll(self, now: float) -> tuple[list[Event], int]:
        """(new events, malformed lines) since the last poll."""
        events: list[Event] = []
        malformed = 0
        for line, t in self._poll_lines(now):
            parsed = parse_events(line, t, self.source, json_only=self.json_only)
            if parsed is None:
                malformed += 1
            else:
                events.extend(parsed)
        return events, malformed + self._take_overlong()

    def poll_lines(self, now: float) -> tuple[list[tuple[bytes, float]], int]:
        """Raw complete lines with the time that dates them, and overlong lines skipped.

        For readers that need more of a line than its `Event` (the spool reader).
        """
        lines = self._poll_lines(now)
        return lines, self._take_overlong()

    def close(self) -> None:
        self.release()
        self._ident = None

    def release(self) -> None:
        """Close the file but keep the position: the next poll reopens it and goes on
        where it left off when it is still the same file (a reader of many idle files
        need not hold a descriptor for each)."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
        self._fh = None

    @property
    def offset(self) -> int:
        return self._offset

    # ------------------------------------------------------------------ internals

    def _take_overlong(self) -> int:
        n, self._lines.overlong = self._lines.overlong, 0
        return n

    def _poll_lines(self, now: float) -> list[tuple[bytes, float]]:
        out: list[tuple[bytes, float]] = []
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            # Removed or rotated away: finish what the old file still holds, then wait.
            if self._fh is not None:
                self._read(out, now, self.max_read)
                self._flush_partial(out, now)
            self.close()  # whatever appears at this path next is a new file
            self._seen_any = True
            return out
        except OSError as exc:
            self._error(exc)
            return out

        ident = (st.st_dev, st.st_ino)
        if self._fh is not None and ident != self._ident:
            # Replaced (rotation, atomic rewrite): drain the old file, then start the new one.
            budget = self._read(out, now, self.max_read)
            self._flush_partial(out, now)
            self.close()
            if budget <= 0:
                return out
        if self._fh is None:
            try:
                self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open between polls
                st = os.fstat(self._fh.fileno())
            except OSError as exc:
                self.release()
                self._error(exc)
                return out
            if (st.st_dev, st.st_ino) != self._ident:  # a new file, not a released one: from its top
                self._ident = (st.st_dev, st.st_ino)
                self._offset = 0
                self._lines.reset()
                if not self._seen_any:
                    # History present at first sight: date it by when it was last written.
                    self._backlog_end = st.st_size
                    self._backlog_time = min(st.st_mtime, now)
                else:
                    self._backlog_end = 0
            self._seen_any = True
        if st.st_size < self._offset:
            # Truncated in place: start again from the top.
            self._offset = 0
            self._lines.reset()
            self._backlog_end = 0
        self._read(out, now, self.max_read)
        return out

    def _read(self, out: list[tuple[bytes, float]], now: float, budget: int) -> int:
        """Read up to budget bytes from the open file; returns the budget left."""
        fh = self._fh
        if fh is None:
            return budget
        while budget > 0:
            try:
                fh.seek(self._offset)
                data = fh.read(min(_CHUNK, budget))
            except OSError as exc:
                self._error(exc)
                return 0
            if not data:
                break
            budget -= len(data)
            self._split(data, out, now)
        return budget

    def _split(self, data: bytes, out: list[tuple[bytes, float]], now: float) -> None:
        base = self._offset
        self._offset += len(data)
        for line, end in self._lines.feed(data):
            if line.strip():
                t = self._backlog_time if base + end <= self._backlog_end else now
                out.append((line, t))

    def _flush_partial(self, out: list[tuple[bytes, float]], now: float) -> None:
        # The last line of a file that is gone will never get its newline.
        rest = self._lines.take_partial()
        if rest.strip():
            out.append((rest, now))

    def _error(self, exc: OSError) -> None:
        self.errors += 1
        self.last_error = f"{self.path}: {exc.strerror or exc}"
        key = f"{type(exc).__name__}:{exc.errno}"
        if key not in self._logged:
            self._logged.add(key)
            log.warning("cannot read events file %s: %s", self.path, exc.strerror or exc)
