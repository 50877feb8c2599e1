"""The registry directory: sessions any program registers as `<dir>/<session_id>.json`.

Owns reading the directory (contract in DESIGN.md: only `session_id` and
`pid` are required; removing the file ends tracking) and the helpers
producers use to write it atomically (`register`, `unregister`).

Trust: the directory must belong to the user otelwatch runs as and must not
be group- or world-writable, otherwise anyone could make otelwatch watch (and,
with recovery on, act on) a process of their choosing. A refused directory
yields no sessions. Nothing read from a registry file is ever passed to a
shell. Bad files are skipped, counted and logged once per file version; an
unchanged directory costs one scandir plus one stat per file per scan.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from otelwatch.model import Mode, Runtime, SessionSpec
from otelwatch.probe.proctable import create_time_of, record_start_ticks
from otelwatch.sources.trust import untrusted_file

__all__ = [
    "MAX_FILE_BYTES", "RegistryRefused", "RegistrySource", "parse_spec", "register", "unregister", "write_atomic",
]

log = logging.getLogger("otelwatch.sources.registry")

MAX_FILE_BYTES = 64 << 10


class RegistryRefused(Exception):
    """The registry directory is not safe to trust (owner or permissions)."""


class RegistrySource:
    def __init__(self, dir: Path, *, uid: int | None = None, boot_time: float | None = None) -> None:
        self.boot_time = boot_time  # the daemon's, for entries' start_ticks
        self.dir = Path(dir)
        self.uid = os.geteuid() if uid is None else uid
        self.errors = 0  # bad file versions seen (each counted once)
        self.problems: dict[str, str] = {}  # file name -> why it is skipped, for current files
        self.refused: str = ""  # why the directory is refused; "" when it is accepted
        # file name -> ((mtime_ns, size, inode), spec or None for a bad file)
        self._cache: dict[str, tuple[tuple[int, int, int], SessionSpec | None]] = {}

    def check(self) -> None:
        """Create the directory (0700) if missing and verify it may be trusted.

        Raises RegistryRefused with a message a person can act on.
        """
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(self.dir)
        except OSError as exc:
            raise RegistryRefused(f"registry directory {self.dir}: {exc.strerror or exc}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise RegistryRefused(f"registry directory {self.dir} is not a directory")
        if st.st_uid != self.uid:
            raise RegistryRefused(
                f"registry directory {self.dir} belongs to uid {st.st_uid}, not to uid {self.uid} "
                "that otelwatch runs as; refusing it (use a directory you own, e.g. "
                "sources.registry.dir)"
            )
        if st.st_mode & 0o022:
            raise RegistryRefused(
                f"registry directory {self.dir} is group- or world-writable "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing it: run `chmod go-w {self.dir}`"
            )

    def scan(self, now: float) -> list[SessionSpec]:
        """The sessions registered now. Never raises."""
        try:
            self.check()
        except RegistryRefused as exc:
            if self.refused != str(exc):
                log.error("%s", exc)
            self.refused = str(exc)
            self._cache.clear()
            return []
        self.refused = ""
        try:
            entries = list(os.scandir(self.dir))
        except OSError as exc:
            log.warning("cannot list registry directory %s: %s", self.dir, exc.strerror or exc)
            return []
        specs: list[SessionSpec] = []
        seen: set[str] = set()
        for entry in entries:
            name = entry.name
            if not name.endswith(".json") or name.startswith("."):
                continue  # temp files of an atomic write start with a dot
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed while we looked
            if not stat.S_ISREG(st.st_mode):
                continue  # symlinks could point anywhere: only plain files count
            seen.add(name)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            cached = self._cache.get(name)
            if cached is not None and cached[0] == key:
                spec = cached[1]
            else:
                spec = self._load(entry.path, name, st.st_size, st)
                self._cache[name] = (key, spec)
            if spec is not None:
                specs.append(spec)
        for name in list(self._cache):
            if name not in seen:
                del self._cache[name]
                self.problems.pop(name, None)
        return specs

    def _load(self, path: str, name: str, size: int, st: os.stat_result) -> SessionSpec | None:
        try:
            # The directory is ours and closed to others, but a file in it could still
            # have been made by another user before (or be a hard link to one of theirs).
            why = untrusted_file(st, self.uid, path)
            if why:
                raise ValueError(why)
            if size > MAX_FILE_BYTES:
                raise ValueError(f"file is larger than {MAX_FILE_BYTES} bytes")
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
            obj = json.loads(data)
            spec = replace(parse_spec(obj, boot_time=self.boot_time), registered_at=st.st_mtime)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.errors += 1
            self.problems[name] = reason
            log.warning("skipping registry file %s: %s", path, reason)
            return None
        self.problems.pop(name, None)
        return spec


def parse_spec(obj: Any, source: str = "registry", boot_time: float | None = None) -> SessionSpec:
    """A SessionSpec from a registry file's JSON; ValueError naming the bad field."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    sid = obj.get("session_id")
    if not isinstance(sid, str) or not sid.strip() or len(sid) > 256:
        raise ValueError("session_id: required, a non-empty string of at most 256 characters")
    pid = obj.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise ValueError("pid: required, a positive integer")
    agent = _opt_str(obj, "agent") or "unknown"
    mode_text = _opt_str(obj, "mode") or "headless"
    try:
        mode = Mode(mode_text)
    except ValueError:
        raise ValueError(f"mode: must be 'headless' or 'interactive', not {mode_text!r}") from None
    events_path = _opt_str(obj, "events_path")
    if events_path is not None and not os.path.isabs(events_path):
        raise ValueError("events_path: must be an absolute path")
    stderr_path = _opt_str(obj, "stderr_path")
    labels = obj.get("labels", {})
    if labels is None:
        labels = {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ValueError("labels: must be an object of string to string")
    runtime = None
    rt = obj.get("runtime")
    if rt is not None:
        if not isinstance(rt, dict) or not isinstance(rt.get("kind"), str) or not rt["kind"]:
            raise ValueError("runtime: must be an object with a string 'kind'")
        target = rt.get("target", "")
        if not isinstance(target, str):
            raise ValueError("runtime.target: must be a string")
        runtime = Runtime(kind=rt["kind"], target=target)
    create_time = obj.get("create_time")
    if create_time is not None and (not isinstance(create_time, (int, float)) or isinstance(create_time, bool)):
        raise ValueError("create_time: must be a number (Unix time)")
    ticks = record_start_ticks(obj.get("start_ticks"))
    if ticks is not None and boot_time is not None:
        # The writer's start ticks, on this daemon's boot time: immune to wall-clock steps.
        create_time = create_time_of(ticks, boot_time)
    return SessionSpec(
        session_id=sid,
        pid=pid,
        agent=agent,
        source=source,
        mode=mode,
        events_path=events_path,
        labels=dict(labels),
        runtime=runtime,
        create_time=None if create_time is None else float(create_time),
        stderr_path=stderr_path,
    )


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key}: must be a string")
    return value or None


def register(dir: Path, spec: Mapping[str, Any]) -> Path:
    """Write `spec` as `<dir>/<session_id>.json` atomically (temp file + rename).

    Validates it as the daemon will read it; raises ValueError or OSError.
    """
    from otelwatch.sources.spool import safe_name

    parse_spec(dict(spec))
    final = Path(dir) / f"{safe_name(str(spec['session_id']))}.json"
    write_atomic(final, json.dumps(dict(spec)).encode("utf-8"))
    return final


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (mode 0600) so that readers see the old file or the
    new one, never a part: a dot-named temp file in the same directory, then a rename.
    Creates the directory (0700) when missing. Raises OSError."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def unregister(dir: Path, session_id: str) -> None:
    """Remove the session's registry file; a missing file is fine."""
    from otelwatch.sources.spool import safe_name

    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(dir) / f"{safe_name(session_id)}.json")
