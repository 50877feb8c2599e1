"""`otelwatch hooks install|uninstall claude [--settings PATH] [--dry-run]`.

Merges otelwatch's hook handlers into an existing Claude Code `settings.json`
(default `$CLAUDE_CONFIG_DIR/settings.json`, else `~/.claude/settings.json`),
keeping every other hook and setting, and takes them out again.

- The command written is the absolute path of the running `otelwatch` (or
  `PYTHON -m otelwatch`), so it works when otelwatch is not on Claude's PATH
  (a virtualenv, pipx).
- Ours are the handlers whose command runs `otelwatch hook claude` (any path).
  Install adds one matcher group per hook event, or points an otelwatch handler
  already there (e.g. the README's bare `otelwatch hook claude`) at this path;
  twice is once. Uninstall removes otelwatch's handlers, the groups and events
  left empty by that, and `hooks` when it was only ours: install then uninstall
  gives back the same JSON.
- It prints a unified diff, writes atomically (a temporary file in the same
  directory, then rename; a symlinked settings file is written through to its
  target), keeps the previous content in `<settings>.otelwatch-backup`, and
  keeps the file's mode and owner. `--dry-run` prints the diff and writes nothing.
- It says whether the daemon will see the events: hook events are spooled
  under the state directory of the user the hook runs as (the settings file's
  owner) and reach only an otelwatch daemon of that user using that state
  directory.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import os
import pwd
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

__all__ = ["HOOK_EVENTS", "hook_command", "hooks_main", "install", "is_ours", "settings_path", "uninstall"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# Claude Code hook events otelwatch reads, and whether each takes a tool-name matcher.
HOOK_EVENTS: tuple[tuple[str, bool], ...] = (
    ("SessionStart", False),
    ("UserPromptSubmit", False),
    ("PreToolUse", True),
    ("PostToolUse", True),
    ("PostToolUseFailure", True),  # a failed tool closes its call too, else it looks open for ever
    ("PermissionRequest", True),  # the agent waits for a person (no Notification fires for it)
    ("Notification", False),
    ("Stop", False),
    ("SessionEnd", False),
)
HOOK_TIMEOUT_S = 10  # Claude Code's own limit for our handler; the hook bounds itself at 2 s
BACKUP_SUFFIX = ".otelwatch-backup"
_OURS = re.compile(r"(?:^|[\s/\"'])otelwatch['\"]?(?:\s+-m\s+otelwatch)?\s+hook\s+claude\s*$")


def settings_path(environ: Mapping[str, str]) -> Path:
    """Claude Code's user settings: `$CLAUDE_CONFIG_DIR/settings.json`, else `~/.claude/settings.json`."""
    if environ.get("CLAUDE_CONFIG_DIR"):
        return Path(environ["CLAUDE_CONFIG_DIR"]) / "settings.json"
    return Path(environ.get("HOME") or Path.home()) / ".claude" / "settings.json"


def hook_command(argv0: str | None = None, executable: str | None = None) -> str:
    """The shell command that runs this otelwatch's hook, by absolute path.

    The console script when that is what runs (`/venv/bin/otelwatch`), else the one
    beside this interpreter, else this interpreter with `-m otelwatch`."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    script = Path(argv0)
    beside = Path(executable).with_name("otelwatch")
    if script.name in ("otelwatch", "otelwatch.exe") and script.is_file():
        words = [str(script.absolute())]
    elif beside.is_file() and os.access(beside, os.X_OK):
        words = [str(beside.absolute())]
    else:
        words = [str(Path(executable).absolute()), "-m", "otelwatch"]
    return " ".join(shlex.quote(w) for w in [*words, "hook", "claude"])


def is_ours(handler: object) -> bool:
    """Whether a hook handler runs `otelwatch hook claude` (by any path)."""
    return (isinstance(handler, dict) and handler.get("type") == "command"
            and isinstance(handler.get("command"), str) and bool(_OURS.search(handler["command"].strip())))


# --------------------------------------------------------------------------- the merge (pure)


def install(settings: Mapping[str, Any], command: str) -> tuple[dict[str, Any], list[str]]:
    """(new settings, what changed) with otelwatch's handler on every event of HOOK_EVENTS.

    Raises ValueError when the file's `hooks` is not the shape Claude Code reads."""
    out = json.loads(json.dumps(settings))  # a deep copy; key order kept
    hooks = out.setdefault("hooks", {})
    if not isinstance(hooks, dict):
        raise ValueError("'hooks' is not an object")
    changes: list[str] = []
    for event, tool_matcher in HOOK_EVENTS:
        groups = hooks.setdefault(event, [])
        if not isinstance(groups, list):
            raise ValueError(f"'hooks.{event}' is not a list")
        ours = [h for g in groups if isinstance(g, dict) and isinstance(g.get("hooks"), list)
                for h in g["hooks"] if is_ours(h)]
        if any(h.get("command") == command for h in ours):
            continue
        if ours:
            for h in ours:
                changes.append(f"{event}: {h['command']!r} -> {command!r}")
                h["command"] = command
            continue
        group: dict[str, Any] = {"matcher": "*"} if tool_matcher else {}
        group["hooks"] = [{"type": "command", "command": command, "timeout": HOOK_TIMEOUT_S}]
        groups.append(group)
        changes.append(f"{event}: added")
    return out, changes


def uninstall(settings: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(new settings, what changed) without any otelwatch handler; what else is there stays."""
    out = json.loads(json.dumps(settings))
    hooks = out.get("hooks")
    changes: list[str] = []
    if not isinstance(hooks, dict):
        return out, changes
    for event in list(hooks):
        groups = hooks[event]
        if not isinstance(groups, list):
            continue
        kept = []
        for group in groups:
            handlers = group.get("hooks") if isinstance(group, dict) else None
            if not isinstance(handlers, list) or not any(is_ours(h) for h in handlers):
                kept.append(group)
                continue
            changes.append(f"{event}: removed")
            rest = [h for h in handlers if not is_ours(h)]
            if rest:
                kept.append({**group, "hooks": rest})
        if len(kept) != len(groups) or kept != groups:
            if kept:
                hooks[event] = kept
            else:
                del hooks[event]
    if changes and not hooks:
        del out["hooks"]
    return out, changes


def render(settings: Mapping[str, Any]) -> str:
    return json.dumps(settings, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- will the daemon see them


def hook_state_dir(owner_uid: int, environ: Mapping[str, str]) -> Path:
    """The state directory a hook running as `owner_uid` spools to (hooks read no config)."""
    from otelwatch.sources import hookpath

    if owner_uid == os.geteuid():
        return Path(hookpath.spool_dir(environ)).parent
    try:
        home = pwd.getpwuid(owner_uid).pw_dir
    except KeyError:
        home = f"~{owner_uid}"
    return Path(hookpath.spool_dir({"HOME": home})).parent


def daemon_holds(state_dir: Path) -> bool:
    """Whether a daemon holds `state_dir`'s lock (`otelwatch run` keeps it locked while it runs)."""
    try:
        fd = os.open(state_dir / "otelwatch.lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def running_daemons(limit: int = 4096) -> list[tuple[int, int]]:
    """(pid, uid) of the `otelwatch run` processes on this host, by their cmdline."""
    found = []
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()][:limit]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read(4096).split(b"\0")
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        words = [os.path.basename(a.decode("utf-8", "replace")) for a in argv if a]
        for i, word in enumerate(words[:4]):
            if word == "otelwatch" and i + 1 < len(words) and words[i + 1] == "run":
                found.append((int(entry), uid))
                break
    return found


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def visibility(path: Path, environ: Mapping[str, str]) -> list[str]:
    """What a person must know about whether the daemon will see this file's hook events."""
    notes: list[str] = []
    try:
        owner = path.stat().st_uid
    except OSError:
        owner = os.geteuid()
    state = hook_state_dir(owner, environ)
    who = _user(owner)
    if owner != os.geteuid():
        notes.append(f"warning: {path} belongs to {who}: Claude Code runs these hooks as {who}, so their "
                     f"events go to {who}'s state directory {state}, not yours")
    if daemon_holds(state):
        notes.append(f"ok: a daemon is running with state directory {state}: it will see the events")
        return notes
    others = [(pid, uid) for pid, uid in running_daemons() if pid != os.getpid()]
    if others:
        listing = ", ".join(f"pid {pid} as {_user(uid)}" for pid, uid in others[:5])
        them = "daemon does" if len(others) == 1 else "daemons do"
        notes.append(f"warning: the running otelwatch {them} not use {state} ({listing}): hook events reach "
                     f"only a daemon of user {who} with that state directory (state_dir, OTELWATCH_STATE_DIR and "
                     f"XDG_STATE_HOME change it). Run `otelwatch run` as {who} without them, or give the hooks "
                     f"the same OTELWATCH_STATE_DIR")
    else:
        notes.append(f"note: no otelwatch daemon is running with state directory {state}; events wait "
                     f"there (spooled) until `otelwatch run` starts as {who}")
    return notes


def check_command(command: str, environ: Mapping[str, str]) -> str:
    """'' when the hook command runs (`... --version`) without this shell's PYTHONPATH, else why not."""
    argv = [*shlex.split(command)[:-2], "--version"]
    env = {k: v for k, v in environ.items() if k != "PYTHONPATH"}
    try:
        r = subprocess.run(argv, capture_output=True, env=env, timeout=20, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {argv[0]}: {exc}"
    if r.returncode != 0:
        tail = r.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        return f"`{' '.join(argv)}` fails without PYTHONPATH: {tail[0]}"
    return ""


# --------------------------------------------------------------------------- the file


def write_atomic(path: Path, text: str, backup: bytes | None) -> Path | None:
    """Write `text` to `path` (through a symlink to its target) by rename, keeping mode and owner;
    the previous bytes go to `<target>.otelwatch-backup` first. Returns the backup's path."""
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    saved = None
    try:
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        st = None
    if backup is not None:
        saved = target.with_name(target.name + BACKUP_SUFFIX)
        _write_file(saved, backup, st)
    _write_file(target, text.encode(), st)
    return saved


def _write_file(dest: Path, data: bytes, like: os.stat_result | None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, (like.st_mode & 0o7777) if like is not None else 0o600)
        if like is not None and (like.st_uid, like.st_gid) != (os.geteuid(), os.getegid()):
            with contextlib.suppress(PermissionError):
                os.chown(tmp, like.st_uid, like.st_gid)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def hooks_main(action: str, agent: str, *, settings: str | None = None, dry_run: bool = False,
               environ: Mapping[str, str] | None = None, command: str | None = None,
               out: TextIO | None = None) -> int:
    """`otelwatch hooks install|uninstall claude`: 0 done (or nothing to do), 1 not written, 2 bad file."""
    env = os.environ if environ is None else environ
    stdout = out or sys.stdout
    if agent != "claude":
        print(f"otelwatch hooks: no installer for {agent!r} (claude only)", file=stdout)
        return EXIT_USAGE
    path = Path(settings).expanduser() if settings else settings_path(env)
    try:
        old_bytes: bytes | None = path.read_bytes()
    except FileNotFoundError:
        old_bytes = None
    except OSError as exc:
        print(f"otelwatch hooks: cannot read {path}: {exc.strerror or exc}", file=stdout)
        return EXIT_FAILED
    old_text = (old_bytes or b"").decode("utf-8", "replace")
    try:
        current = json.loads(old_text) if old_text.strip() else {}
    except ValueError as exc:
        print(f"otelwatch hooks: {path} is not valid JSON ({exc}); nothing changed", file=stdout)
        return EXIT_USAGE
    if not isinstance(current, dict):
        print(f"otelwatch hooks: {path} does not hold a JSON object; nothing changed", file=stdout)
        return EXIT_USAGE
    cmd = command or hook_command()
    try:
        new, changes = install(current, cmd) if action == "install" else uninstall(current)
    except ValueError as exc:
        print(f"otelwatch hooks: {path}: {exc}; nothing changed", file=stdout)
        return EXIT_USAGE
    if not changes:
        what = "already installed" if action == "install" else "not installed"
        print(f"{path}: otelwatch's hooks are {what}; nothing to change", file=stdout)
    else:
        new_text = render(new)
        diff = difflib.unified_diff(old_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
                                    fromfile=f"{path} (before)", tofile=f"{path} (after)")
        for line in diff:
            stdout.write(line if line.endswith("\n") else line + "\n")
        if dry_run:
            print(f"dry run: {path} not written ({len(changes)} change(s))", file=stdout)
        else:
            try:
                saved = write_atomic(path, new_text, old_bytes)
            except OSError as exc:
                print(f"otelwatch hooks: cannot write {path}: {exc.strerror or exc}; nothing changed", file=stdout)
                return EXIT_FAILED
            done = "installed" if action == "install" else "removed"
            backup = f"; previous content in {saved}" if saved else ""
            print(f"{path}: otelwatch's hooks {done} ({len(changes)} change(s)){backup}", file=stdout)
    if action == "install":
        print(f"hook command: {cmd}", file=stdout)
        problem = check_command(cmd, env)
        if problem:
            print(f"warning: {problem}", file=stdout)
        for note in visibility(path, env):
            print(note, file=stdout)
    return EXIT_OK
