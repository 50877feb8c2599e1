"""Notifications to a person: the `[notify]` section.

Owns delivering what a person hears about to a command (argv, the notification
as JSON on stdin) and/or a webhook (JSON with a Slack/Discord-compatible
`text`/`content` summary, the full report and its `incident`). Which reports
become notifications, as one thread per incident (open, repeats on the report
backoff, one all-clear) with a held first message until its reason settles,
is `notify_incidents.Threads`.

`Notifier.submit` is a Watcher subscriber and runs on the loop thread, so it
only selects and enqueues; a timer thread releases held first messages.
Delivery runs on one worker thread per channel with a bounded queue: a hung
command or a webhook that never answers delays other notifications of that
channel, never a tick. Overflow is dropped and counted.

It must never run a shell, never add a rate of its own (volume follows the
report backoff exactly), and never log a header value or the webhook URL's
path (Slack and Discord put the secret there).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from otelwatch.config import NOTIFY_STATES, ConfigError, NotifyConfig
from otelwatch.telemetry.notify_incidents import Context, Threads, message_text, where, who

__all__ = ["Notifier", "attach", "expand_argv", "expand_headers", "preflight", "retry_delays", "selected",
           "summary_text"]

SIGNAL = "notify"  # the `signal` attribute of otelwatch.export.failures
QUEUE_SIZE = 64  # per channel; a person reads far fewer than this between two deliveries
SEVERITY = {state: rank for rank, state in enumerate(NOTIFY_STATES)}  # idle < ... < stuck
REPORT_EVENTS = frozenset({"session.stalled", "session.stuck"})
RECOVERY_EVENTS = frozenset({"recovery.requested", "recovery.completed"})
DISCORD_MAX = 2000  # Discord rejects a `content` longer than this
_PLACEHOLDER = re.compile(r"\{(session_id|state|reason|agent|event|name|cwd|user|phase|incident)\}")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_STOP = object()

Log = Callable[[str, Mapping[str, Any], str], None]


# --------------------------------------------------------------------------- pure parts


def selected(cfg: NotifyConfig, report: Mapping[str, Any]) -> bool:
    """Whether `report`, taken alone, passes `min_state`, `reasons`, `agents` (the per-report
    part of `Threads`, which also threads incidents and filters by user and directory).

    Stalled/stuck reports pass `min_state`, `reasons` and `agents`. A state change
    (`session.state`) is sent only for a state below stalled that `min_state` lets
    through (e.g. `min_state = "idle"`: "your agent is waiting for you"); entering
    stalled or stuck is said by its report, which is backed off. Recovery steps
    (requested, completed) follow `recovery`, session ends `session_end`; both
    only filtered by `agents`.
    """
    event = str(report.get("event", ""))
    if cfg.agents and str(report.get("agent", "")) not in cfg.agents:
        return False
    if event in REPORT_EVENTS or event == "session.state":
        state = str(report.get("state", ""))
        if event == "session.state" and state in ("stalled", "stuck"):
            return False
        if SEVERITY.get(state, -1) < SEVERITY[cfg.min_state]:
            return False
        return not cfg.reasons or str(report.get("reason", "")) in cfg.reasons
    if event in RECOVERY_EVENTS:
        return cfg.recovery
    if event == "session.end":
        return cfg.session_end
    return False


def placeholders(report: Mapping[str, Any]) -> dict[str, str]:
    """Values of {session_id} {state} {reason} {agent} {event} {name} {cwd} {user} {phase}
    {incident} for one notification ('' where it has none).

    A session end gives its final state and reason; a recovery step gives its
    status when completed (e.g. `terminated`, `dry_run`), else the step name."""
    event = str(report.get("event", ""))
    state, reason = report.get("state"), report.get("reason")
    if event == "session.end":
        state, reason = report.get("final_state"), report.get("final_reason")
    elif event.startswith("recovery."):
        state = report.get("status") or report.get("step")
    thread = report.get("incident")
    incident: Mapping[str, Any] = thread if isinstance(thread, Mapping) else {}
    return {
        "session_id": str(report.get("session_id") or ""),
        "agent": str(report.get("agent") or ""),
        "event": event,
        "state": str(state or ""),
        "reason": str(reason or ""),
        "name": str(report.get("name") or ""),
        "cwd": str(report.get("cwd") or ""),
        "user": str(report.get("user") or ""),
        "phase": str(incident.get("phase") or ""),
        "incident": str(incident.get("id") or ""),
    }


def expand_argv(argv: Sequence[str], report: Mapping[str, Any]) -> list[str]:
    """The command with placeholders substituted in each argument. Each stays one
    argument whatever it contains: nothing goes through a shell."""
    values = placeholders(report)
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in argv]


def expand_headers(headers: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """Header values with `${VAR}` read from the environment (tokens stay out of the
    config file). Raises ConfigError naming the header and variable, never a value."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        def env(m: re.Match[str], name: str = name) -> str:
            var = m.group(1)
            if var not in environ:
                raise ConfigError(f"notify.headers.{name}", f"environment variable {var} is not set")
            return environ[var]

        expanded = _ENV_REF.sub(env, value)
        if any(c in expanded for c in "\r\n\0"):
            raise ConfigError(f"notify.headers.{name}", "value contains a line break or NUL")
        if not name or any(c in name for c in " :\r\n\0"):
            raise ConfigError(f"notify.headers.{name}", "not a valid header name")
        out[name] = expanded
    return out


def preflight(cfg: NotifyConfig, environ: Mapping[str, str]) -> list[str]:
    """What would make a configured channel fail at its first incident, found now:
    `notify.command`'s program not found on PATH (or not executable), and every
    `${VAR}` in `notify.headers` that is not set. One "key: reason" line each."""
    problems: list[str] = []
    if cfg.command:
        program = cfg.command[0]
        if "/" in program:
            if not os.path.isfile(program):
                problems.append(f"notify.command[0]: {program!r} does not exist")
            elif not os.access(program, os.X_OK):
                problems.append(f"notify.command[0]: {program!r} is not executable")
        else:
            import shutil

            path = environ.get("PATH", os.defpath)
            if shutil.which(program, path=path) is None:
                problems.append(f"notify.command[0]: {program!r} not found on PATH ({path})")
    for name, value in cfg.headers.items():
        for var in _ENV_REF.findall(value):
            if var not in environ:
                problems.append(f"notify.headers.{name}: environment variable {var} is not set")
    return problems


def retry_delays(retries: int, base: float = 1.0, cap: float = 30.0) -> list[float]:
    """Waits before each retry: base, 2x, 4x ... capped."""
    return [min(cap, base * (2.0 ** i)) for i in range(max(0, retries))]


def summary_text(report: Mapping[str, Any], host: str = "") -> str:
    """What a person reads in a chat channel or a phone notification: the headline, then
    (when known) where the session is: directory, pane and the command to attach to it.
    A notification of an incident (`incident` in it) says its phase and thread."""
    if isinstance(report.get("incident"), Mapping):
        return message_text(report, host)
    line = _headline(report, host)
    tail = where(report)
    return f"{line}\n{tail}" if tail else line


def _headline(report: Mapping[str, Any], host: str) -> str:
    event = str(report.get("event", ""))
    name = who(report)  # "work-0b" (claude-code, alice), or s1 (claude-code) without a name
    at = f" on {host}" if host else ""
    if event in REPORT_EVENTS:
        nth = int(report.get("repeat") or 0)
        again = f" (repeat {nth})" if nth else ""
        return (f"otelwatch{at}: {name} is {report.get('state')}/{report.get('reason')}"
                f"{again}: {report.get('summary', '')}")
    if event.startswith("recovery."):
        step = report.get("step", event.split(".", 1)[1])
        status = f": {report['status']}" if report.get("status") else ""
        detail = f" ({report['detail']})" if report.get("detail") else ""
        return f"otelwatch{at}: recovery of {name} {step}{status}{detail}"
    if event == "session.end":
        return (f"otelwatch{at}: {name} ended after {report.get('duration_s')} s, final state "
                f"{report.get('final_state')}/{report.get('final_reason')}, {report.get('stalls', 0)} stall(s)")
    if event == "session.state":
        return (f"otelwatch{at}: {name} is now {report.get('state')}/{report.get('reason')}"
                f" (was {report.get('previous')})")
    return f"otelwatch{at}: {event} for {name}"


def webhook_body(report: Mapping[str, Any], host: str = "") -> bytes:
    """Slack reads `text`, Discord needs `content`; both ignore the rest. `incident`
    (id, phase, message number) lets a receiver keep one thread per incident."""
    text = summary_text(report, host)
    body: dict[str, Any] = {"text": text, "content": text[:DISCORD_MAX], "report": dict(report)}
    if isinstance(report.get("incident"), Mapping):
        body["incident"] = dict(report["incident"])
    return json.dumps(body, default=str).encode()


def redact_url(url: str) -> str:
    """scheme://host[:port]/... : webhook paths are credentials."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/..." if parts.path not in ("", "/") else f"{parts.scheme}://{host}{port}/"


# --------------------------------------------------------------------------- delivery


class _Failure(Exception):
    def __init__(self, message: str, retry: bool, wait: float = 0.0) -> None:
        super().__init__(message)
        self.retry = retry
        self.wait = wait


class _Channel:
    """One destination, its bounded queue and its worker thread."""

    def __init__(self, name: str, destination: str, deliver: Callable[[Mapping[str, Any]], int],
                 size: int) -> None:
        self.name = name
        self.destination = destination
        self.deliver = deliver  # returns attempts; raises _Failure (attempts in .args[1:] not needed)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=size)
        self.thread: threading.Thread | None = None


class Notifier:
    """Sends selected reports to `[notify] command` and/or `webhook`.

    `submit` is the Watcher subscriber (never blocks); `shutdown(timeout)` delivers
    what is queued until the deadline, then kills running commands; idempotent.
    Failures (each failed attempt, each dropped notification) go to
    `count_failure("notify")`; each notification that could not be delivered is
    logged once, with its attempts, whatever its retries were.
    """

    def __init__(
        self,
        cfg: NotifyConfig,
        *,
        count_failure: Callable[[str], None] | None = None,
        log: Log | None = None,
        environ: Mapping[str, str] | None = None,
        retry_base: float = 1.0,
        queue_size: int = QUEUE_SIZE,
        host: str | None = None,
        clock: Callable[[], float] = time.time,
        proc_context: bool = True,
    ) -> None:
        self.cfg = cfg
        self._clock = clock
        self._threads = Threads(cfg, Context(proc=proc_context))
        self._timer_wake = threading.Condition()
        self._count = count_failure or (lambda signal: None)
        self._log = log or _stderr_log
        self._headers = expand_headers(cfg.headers, os.environ if environ is None else environ)
        self._secrets = [v for v in self._headers.values() if len(v) >= 4]
        if cfg.webhook:
            path = urlsplit(cfg.webhook).path
            if len(path) > 1:
                self._secrets.append(path)
        self._retry_base = retry_base
        self._host = socket.gethostname() if host is None else host
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._abort = threading.Event()  # set past the shutdown deadline: give up at once
        self._closed = False
        self._deadline: float | None = None
        self.sent = 0
        self.failed = 0  # notifications not delivered (after retries)
        self.dropped = 0  # queue full or shut down before delivery
        self._dropped_unlogged = 0
        self._channels: list[_Channel] = []
        if cfg.command:
            self._channels.append(_Channel("command", cfg.command[0], self._run_command, queue_size))
        if cfg.webhook:
            self._channels.append(_Channel("webhook", redact_url(cfg.webhook), self._post, queue_size))
        for ch in self._channels:
            ch.thread = threading.Thread(target=self._work, args=(ch,), name=f"otelwatch-notify-{ch.name}",
                                         daemon=True)
            ch.thread.start()
        self._timer: threading.Thread | None = None
        if self._channels and cfg.settle > 0:
            self._timer = threading.Thread(target=self._release_held, name="otelwatch-notify-settle", daemon=True)
            self._timer.start()

    @property
    def enabled(self) -> bool:
        return bool(self._channels)

    def submit(self, report: Mapping[str, Any]) -> None:
        """Watcher subscriber: thread into incidents, select and enqueue; never blocks on a
        delivery, never raises."""
        if self._closed or not self._channels:
            return
        try:
            with self._timer_wake:
                messages = self._threads.observe(report, self._clock())
                if self._threads.next_deadline() is not None:
                    self._timer_wake.notify()
        except Exception as exc:  # a bug in selection must not reach the loop
            self._safe_log("notify_error", {"error": repr(exc)}, "error")
            return
        for message in messages:
            self._enqueue(message)

    def _enqueue(self, message: Mapping[str, Any]) -> None:
        item = dict(message)
        for ch in self._channels:
            try:
                ch.queue.put_nowait(item)
            except queue.Full:
                self._drop(1)

    def _release_held(self) -> None:
        """Send a held first message when its `settle` time is up (unless it settled first)."""
        while not self._closed:
            with self._timer_wake:
                deadline = self._threads.next_deadline()
                wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - self._clock()))
                if wait > 0:
                    self._timer_wake.wait(wait)
                if self._closed:
                    return
                try:
                    messages = self._threads.due(self._clock())
                except Exception as exc:
                    self._safe_log("notify_error", {"error": repr(exc)}, "error")
                    messages = []
            for message in messages:
                self._enqueue(message)

    def test(self, message: Mapping[str, Any]) -> list[tuple[str, str, bool, str]]:
        """Deliver `message` once through every channel now (no queue, no retries):
        (channel, destination, delivered, what happened) per channel."""
        results = []
        for ch in self._channels:
            try:
                detail = self._test_one(ch, message)
            except _Failure as exc:
                results.append((ch.name, ch.destination, False, self._scrub(str(exc))))
            except Exception as exc:
                results.append((ch.name, ch.destination, False, self._scrub(repr(exc))))
            else:
                results.append((ch.name, ch.destination, True, detail))
        return results

    def _test_one(self, ch: _Channel, message: Mapping[str, Any]) -> str:
        if ch.name == "webhook":
            status = self._post_once(webhook_body(message, self._host))
            return f"delivered (HTTP {status})"
        self._run_command(message)
        return "ran, exit status 0"

    def shutdown(self, timeout: float = 2.0) -> None:
        """Deliver what is queued until `timeout`, then abandon the rest. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + max(0.0, timeout)
        self._deadline = deadline
        with self._timer_wake:
            self._timer_wake.notify_all()
        for ch in self._channels:
            with contextlib.suppress(queue.Full):
                ch.queue.put_nowait(_STOP)
        for ch in self._channels:
            if ch.thread is not None:
                ch.thread.join(max(0.0, deadline - time.monotonic()))
        self._abort.set()
        with self._lock:
            running = list(self._running)
        for proc in running:
            _kill_group(proc)
        for ch in self._channels:
            if ch.thread is not None:
                ch.thread.join(0.5)
        self._flush_drop_log()

    # ------------------------------------------------------------------ workers

    def _work(self, ch: _Channel) -> None:
        while True:
            try:
                item = ch.queue.get(timeout=0.5)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if item is _STOP:
                return
            if self._abort.is_set() or (self._deadline is not None and time.monotonic() > self._deadline):
                self._drop(1)
                continue
            try:
                ch.deliver(item)
            except _Failure as exc:
                with self._lock:
                    self.failed += 1
                self._safe_log("notify_failed", {
                    "channel": ch.name, "destination": ch.destination,
                    "session_id": item.get("session_id"), "report_event": item.get("event"),
                    "error": self._scrub(str(exc)),
                }, "warning")
            except Exception as exc:  # a bug here must not kill the worker
                with self._lock:
                    self.failed += 1
                self._safe_log("notify_error", {"channel": ch.name, "error": self._scrub(repr(exc))}, "error")
            else:
                with self._lock:
                    self.sent += 1
            self._flush_drop_log()

    def _run_command(self, report: Mapping[str, Any]) -> int:
        argv = expand_argv(self.cfg.command, report)
        data = json.dumps(report, default=str).encode() + b"\n"
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            self._failure()
            raise _Failure(f"cannot run {argv[0]!r}: {exc.strerror or exc}", retry=False) from None
        with self._lock:
            self._running.add(proc)
        if self._abort.is_set():  # shutdown's kill ran while this one was being started
            _kill_group(proc)
        try:
            try:
                _, err = proc.communicate(data, timeout=self.cfg.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                self._failure()
                raise _Failure(f"{argv[0]!r} still running after {self.cfg.timeout:g} s: killed",
                               retry=False) from None
        finally:
            with self._lock:
                self._running.discard(proc)
        if proc.returncode != 0:
            self._failure()
            tail = err.decode("utf-8", "replace").strip()[-300:] if err else ""
            raise _Failure(f"{argv[0]!r} exited with {proc.returncode}" + (f": {tail}" if tail else ""),
                           retry=False)
        return 1

    def _post(self, report: Mapping[str, Any]) -> int:
        body = webhook_body(report, self._host)
        delays = retry_delays(self.cfg.retries, self._retry_base)
        attempt = 0
        while True:
            attempt += 1
            try:
                self._post_once(body)
                return attempt
            except _Failure as exc:
                self._failure()
                if not exc.retry or attempt > len(delays):
                    raise _Failure(f"{exc} (attempt {attempt} of {len(delays) + 1})", retry=False) from None
                if self._abort.wait(max(delays[attempt - 1], exc.wait)):
                    raise _Failure(f"{exc} (gave up at shutdown after attempt {attempt})", retry=False) from None

    def _post_once(self, body: bytes) -> int:
        from otelwatch import __version__

        req = urllib.request.Request(self.cfg.webhook, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": f"otelwatch/{__version__}", **self._headers})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                resp.read(1 << 16)
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            # 429 and 5xx may pass; any other 4xx (bad URL, revoked token) will not.
            retry = exc.code == 429 or exc.code >= 500
            wait = _retry_after(exc.headers.get("Retry-After")) if exc.code == 429 else 0.0
            raise _Failure(f"HTTP {exc.code} {exc.reason}", retry=retry, wait=wait) from None
        except urllib.error.URLError as exc:
            raise _Failure(f"cannot connect: {exc.reason}", retry=True) from None
        except (TimeoutError, OSError) as exc:
            raise _Failure(f"no answer within {self.cfg.timeout:g} s" if isinstance(exc, TimeoutError)
                           else f"connection failed: {exc}", retry=True) from None

    # ------------------------------------------------------------------ accounting

    def _failure(self) -> None:
        with contextlib.suppress(Exception):  # counting must never break delivery
            self._count(SIGNAL)

    def _drop(self, n: int) -> None:
        with self._lock:
            self.dropped += n
            self._dropped_unlogged += n
        self._failure()

    def _flush_drop_log(self) -> None:
        # Logged by a worker, never by the loop thread's submit: a flood costs one line.
        with self._lock:
            n, self._dropped_unlogged = self._dropped_unlogged, 0
        if n:
            self._safe_log("notify_dropped", {"dropped": n, "total_dropped": self.dropped}, "warning")

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _safe_log(self, event: str, fields: Mapping[str, Any], level: str) -> None:
        with contextlib.suppress(Exception):
            self._log(event, fields, level)


def _retry_after(value: str | None, cap: float = 60.0) -> float:
    try:
        return min(cap, max(0.0, float(value or 0)))
    except ValueError:
        return 0.0


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill a notify command and whatever it started (its own session, so its own
    process group); it is not reaped yet, so its pid cannot have been reused."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        # wait, not communicate: the worker may be in communicate() on it at the same time,
        # and on a loaded host a killed process takes a moment to be gone.
        proc.wait(timeout=1.0)
    for pipe in (proc.stdin, proc.stderr):
        with contextlib.suppress(Exception):
            if pipe is not None:
                pipe.close()


def _stderr_log(event: str, fields: Mapping[str, Any], level: str) -> None:
    print(json.dumps({"level": level, "event": event, **fields}, default=str), file=sys.stderr)


def attach(watcher: Any, cfg: NotifyConfig | None = None, *, environ: Mapping[str, str] | None = None,
           retry_base: float = 1.0) -> Notifier | None:
    """A Notifier for `watcher` (its `[notify]` config unless `cfg` is given), subscribed to its
    reports and counting failures on its telemetry; None when neither command nor webhook is
    set. Raises ConfigError when a header names an unset environment variable.
    Call `shutdown()` on the result after stopping the watcher."""
    cfg = cfg if cfg is not None else watcher.cfg.notify
    if not cfg.command and not cfg.webhook:
        return None
    telemetry = getattr(watcher, "telemetry", None)
    notifier = Notifier(cfg, count_failure=getattr(telemetry, "count_export_failure", None),
                        log=getattr(telemetry, "log", None), environ=environ, retry_base=retry_base)
    for problem in preflight(cfg, os.environ if environ is None else environ):
        # Said at start, not at the first incident (check-config refuses it outright).
        notifier._safe_log("notify_misconfigured", {"problem": problem}, "warning")
    watcher.subscribe(notifier.submit)
    return notifier
