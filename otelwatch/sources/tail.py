"""Following one append-only JSON-lines file: `FileTail`.

Owns reading new complete lines of one file across the things files do while
they are followed: not existing yet, already holding history, growing by
partial lines, being truncated (even when regrown past the old offset between
two polls), being rotated or replaced. Each `poll` reads at most `max_read`
bytes, so one huge file cannot stall a tick, and never holds more than one
line's worth of bytes (`MAX_LINE_BYTES`): a longer line is skipped as it
streams past and counted as malformed.

It never blocks: files are opened with O_NONBLOCK and anything but a regular
file (a FIFO with no writer would block `open()` forever; sockets, devices,
directories) is refused before a byte is read. It never raises for OS errors:
they and refusals are counted in `errors`, kept in `last_error` and logged
once per distinct problem. It never interprets lines beyond handing them to
the event parser.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from otelwatch.events.lines import MAX_LINE_BYTES, parse_events
from otelwatch.model import Event

__all__ = ["DEFAULT_MAX_READ", "FileTail", "LineSplitter", "NotOwned", "NotRegularFile", "open_owned",
           "open_regular"]

log = logging.getLogger("otelwatch.sources.tail")

DEFAULT_MAX_READ = 4 << 20  # bytes per poll per file
_CHUNK = 256 << 10
# What is remembered of the bytes already read, to notice a file truncated and
# regrown past the old offset between two polls (same inode, size not smaller):
# its first bytes, and the last bytes before the offset. A rewrite by the same
# agent may repeat the head (the same init line), hardly also the bytes at the offset.
_HEAD_BYTES = 512
_MARK_BYTES = 64
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)


class NotRegularFile(OSError):
    """A path that is a FIFO, socket, device or directory, where a file was expected."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path}: is a {kind}, not a regular file")
        self.kind = kind


class NotOwned(OSError):
    """A file owned by another user than the one whose file it must be."""

    def __init__(self, path: str, uid: int, owners: Collection[int]) -> None:
        super().__init__(f"{path}: owned by uid {uid}, not by {sorted(owners)}")
        self.uid = uid


def open_owned(path: str | os.PathLike[str], owners: Collection[int], buffering: int = -1) -> BinaryIO:
    """Open one of an agent's files: never blocking (O_NONBLOCK), never through a symlink
    as its last component (O_NOFOLLOW), then on the open descriptor (no race with a swap
    of the path): a regular file owned by one of `owners`. Raises NotRegularFile,
    NotOwned, or OSError as open() does (ELOOP for a symlink). An empty `owners` (the
    agent's user is unknown) refuses everything. Owner on the descriptor is the wall
    between users: another user's file reached through any directory or hard link of
    someone else is refused."""
    fd = os.open(path, _OPEN_FLAGS | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(os.fspath(path), _file_kind(st.st_mode))
        if st.st_uid not in owners:
            raise NotOwned(os.fspath(path), st.st_uid, owners)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str | os.PathLike[str], buffering: int = -1) -> BinaryIO:
    """Open a file for reading without ever blocking the caller: O_NONBLOCK, because
    open() of a FIFO with no writer waits forever (a device may too), then fstat.
    Raises `NotRegularFile` for anything but a regular file, OSError as open() does.
    For every file the loop reads whose path someone else chose."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(os.fspath(path), _file_kind(st.st_mode))
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


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
                 *, max_read: int = DEFAULT_MAX_READ, owners: Collection[int] | None = None,
                 own: bool = False,
                 parser: Callable[[bytes, float, str], list[Event] | None] | None = None) -> None:
        self.path = str(path)
        self.source = source
        # With `owners`: an agent's file, opened only as `open_owned` allows (no symlink,
        # owned by one of them). `own`: its events are the session's own (provenance).
        self.owners = None if owners is None else frozenset(owners)
        self.own = own
        self.json_only = json_only
        # An agent's own line format (Gemini's chat files, aider's markdown); default: parse_events.
        self.parser = parser
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
        self._head = bytearray()  # the file's first bytes as read (up to _HEAD_BYTES)
        self._mark = b""  # the last bytes read, just before _offset (up to _MARK_BYTES)
        self._seen_stat: tuple[int, int] | None = None  # (size, mtime_ns) when last compared
        self._logged: set[str] = set()

    # ------------------------------------------------------------------ public

    def poll(self, now: float) -> tuple[list[Event], int]:
        """(new events, malformed lines) since the last poll."""
        events: list[Event] = []
        malformed = 0
        for line, t in self._poll_lines(now):
            if self.parser is not None:
                parsed = self.parser(line, t, self.source)
            else:
                parsed = parse_events(line, t, self.source, json_only=self.json_only)
            if parsed is None:
                malformed += 1
            elif self.own:
                events.extend(replace(e, own=True) for e in parsed)
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
            st = os.stat(self.path) if self.owners is None else os.lstat(self.path)
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
            if not stat.S_ISREG(st.st_mode):  # refused before it is even opened
                self._refuse("symlink" if stat.S_ISLNK(st.st_mode) else _file_kind(st.st_mode))
                return out
            opened = self._open()
            if opened is None:
                return out
            st = opened
            if (st.st_dev, st.st_ino) != self._ident:  # a new file, not a released one: from its top
                self._ident = (st.st_dev, st.st_ino)
                self._restart()
                if not self._seen_any:
                    # History present at first sight: date it by when it was last written.
                    self._backlog_end = st.st_size
                    self._backlog_time = min(st.st_mtime, now)
            self._seen_any = True
        if st.st_size < self._offset or self._rewritten(st):
            # Truncated in place (and maybe regrown past our offset already): from the top.
            self._restart()
        self._read(out, now, self.max_read)
        return out

    def _open(self) -> os.stat_result | None:
        """Open the path without blocking; its fstat, or None (counted) when it cannot be
        read or is not a regular file (the path may have changed since the stat)."""
        try:
            if self.owners is None:
                fh = open_regular(self.path, buffering=0)
            else:
                fh = open_owned(self.path, self.owners, buffering=0)
        except NotRegularFile as exc:
            self._refuse(exc.kind)
            return None
        except NotOwned as exc:
            self.errors += 1
            self.last_error = str(exc)
            if "refused:owner" not in self._logged:
                self._logged.add("refused:owner")
                log.warning("cannot read events file %s: owned by uid %d, not by the agent's user; refused",
                            self.path, exc.uid)
            return None
        except OSError as exc:
            self._error(exc)
            return None
        try:
            st = os.fstat(fh.fileno())
        except OSError as exc:
            fh.close()
            self._error(exc)
            return None
        self._fh = fh
        return st

    def _restart(self) -> None:
        """Read the file from its top again; its lines are new ones (dated by the poll)."""
        self._offset = 0
        self._lines.reset()
        self._backlog_end = 0
        self._head.clear()
        self._mark = b""
        self._seen_stat = None

    def _rewritten(self, st: os.stat_result) -> bool:
        """Whether the bytes already read changed: truncated and written again past our
        offset between two polls. Compared only when size or mtime moved since the last
        comparison, so an idle file costs no reads."""
        seen = (st.st_size, st.st_mtime_ns)
        if self._offset == 0 or seen == self._seen_stat or self._fh is None:
            return False
        self._seen_stat = seen
        fd = self._fh.fileno()
        try:
            if self._head and os.pread(fd, len(self._head), 0) != self._head:
                return True
            return bool(self._mark) and os.pread(fd, len(self._mark), self._offset - len(self._mark)) != self._mark
        except OSError as exc:
            self._error(exc)
            return False

    def _refuse(self, kind: str) -> None:
        self.errors += 1
        self.last_error = f"{self.path}: is a {kind}, not a regular file"
        if f"refused:{kind}" not in self._logged:
            self._logged.add(f"refused:{kind}")
            log.warning("cannot read events file %s: it is a %s, not a regular file; refused",
                        self.path, kind)

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
        if base < _HEAD_BYTES:
            self._head += data[:_HEAD_BYTES - base]
        self._mark = (self._mark + data[-_MARK_BYTES:])[-_MARK_BYTES:]
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


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"
