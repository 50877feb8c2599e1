"""Configuration: the TOML shape of DESIGN.md, its defaults, and its validation.

Every key has a default. Unknown keys and bad values raise `ConfigError` naming
the dotted key and the reason. Durations are seconds (numbers) or strings such
as "90s", "5m", "1h30m". This module does no I/O except reading the file named
to `load_config`, and never looks at the environment except through the
`environ` argument of `default_paths`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_AGENTS = ("claude", "codex", "gemini", "aider", "opencode")


class ConfigError(ValueError):
    """A bad configuration: `key` is the dotted name, `reason` says what is wrong."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "127.0.0.1:9464"
    # A non-loopback listen address exposes POST /api/events (which can make a
    # session look busy or start a turn) to the network: it needs this opt-in.
    allow_remote: bool = False
    max_connections: int = 64  # concurrent connections; past it: 503 and close
    request_timeout: float = 5.0  # a client must send its request (and body) within this

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


@dataclass(frozen=True)
class ClassifyConfig:
    startup_grace: float = 30.0
    stall_after: float = 300.0
    tool_stall_after: float = 1800.0
    cpu_idle_percent: float = 1.0  # below this (of one core) counts as zero CPU: the stuck gate
    cpu_spin_percent: float = 50.0  # at or above this, sustained over the window, is a spin
    repeat_base: float = 60.0
    repeat_max: float = 3600.0
    exited_retention: float = 600.0


@dataclass(frozen=True)
class RecoveryConfig:
    enabled: bool = False
    dry_run: bool = False
    recover_after: float | None = None  # None: max(300, 3 * stall_after); see effective_recover_after
    action: str = "signal"
    command: tuple[str, ...] = ()
    command_timeout: float = 30.0
    grace: float = 10.0
    max_per_hour: int = 6
    protect: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    state_file: str = ""
    # Extension (off by default): also recover `stalled/waiting_on_network` sessions
    # after this much longer silence, like an idle-message timeout. 0 disables it.
    waiting_on_network_after: float = 0.0


@dataclass(frozen=True)
class ProbeConfig:
    backend: str = "auto"  # "procfs" (Linux /proc + netlink), "psutil" (portable); auto: procfs where /proc exists


# Severity order for notify.min_state: a notification goes out for a report whose
# state is at least this severe.
NOTIFY_STATES = ("idle", "active", "long_running", "stalled", "stuck")


@dataclass(frozen=True)
class NotifyConfig:
    # argv, report JSON on stdin; placeholders {session_id} {state} {reason} {agent} {event}
    command: tuple[str, ...] = ()
    webhook: str = ""  # POST JSON (Slack/Discord-compatible `text` + the full report)
    headers: Mapping[str, str] = field(default_factory=dict)  # webhook headers; "${VAR}" reads the environment
    timeout: float = 10.0  # one command run or one webhook POST
    retries: int = 3  # webhook attempts after the first, with backoff
    min_state: str = "stalled"  # stalled: stalled and stuck reports
    reasons: tuple[str, ...] = ()  # empty: every reason
    agents: tuple[str, ...] = ()  # empty: every agent
    recovery: bool = True  # recovery requested/completed
    session_end: bool = False  # the summary line when a session ends


@dataclass(frozen=True)
class RegistrySourceConfig:
    enabled: bool = True
    dir: str = ""


@dataclass(frozen=True)
class ProcessSourceConfig:
    enabled: bool = True
    match: tuple[str, ...] = DEFAULT_AGENTS


@dataclass(frozen=True)
class TmuxSourceConfig:
    enabled: bool = True
    timeout: float = 1.0  # every tmux call is bounded by this


@dataclass(frozen=True)
class TranscriptSourceConfig:
    enabled: bool = True
    home: str = ""  # default: the home directory of the user otelwatch runs as


@dataclass(frozen=True)
class OtlpSourceConfig:
    """The agents' own OpenTelemetry in (sources/otlp.py); off by default."""

    enabled: bool = False
    listen: str = ""  # "": on the [http] listener; else a loopback address of its own
    forward: str = ""  # the user's OTLP/HTTP endpoint (base URL): every record is sent on there
    forward_timeout: float = 5.0  # one forwarded request may take this long
    queue: int = 20_000  # log records waiting for the loop; past it they are dropped (counted)
    forward_queue_bytes: int = 32 << 20  # bodies waiting to be forwarded; past it dropped (counted)


@dataclass(frozen=True)
class SourcesConfig:
    registry: RegistrySourceConfig = field(default_factory=RegistrySourceConfig)
    processes: ProcessSourceConfig = field(default_factory=ProcessSourceConfig)
    tmux: TmuxSourceConfig = field(default_factory=TmuxSourceConfig)
    transcripts: TranscriptSourceConfig = field(default_factory=TranscriptSourceConfig)
    otlp: OtlpSourceConfig = field(default_factory=OtlpSourceConfig)


@dataclass(frozen=True)
class PrometheusExportConfig:
    enabled: bool = True


@dataclass(frozen=True)
class OtlpExportConfig:
    enabled: bool = False  # also on when OTEL_EXPORTER_OTLP_ENDPOINT is set
    endpoint: str = ""  # default: the OTEL_EXPORTER_OTLP_* variables, else the SDK default
    protocol: str = ""  # "grpc" | "http/protobuf"; default: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc
    interval: float = 15.0  # metric export interval
    timeout: float = 5.0  # one export may take this long before it is abandoned


@dataclass(frozen=True)
class ExportConfig:
    prometheus: PrometheusExportConfig = field(default_factory=PrometheusExportConfig)
    otlp: OtlpExportConfig = field(default_factory=OtlpExportConfig)


@dataclass(frozen=True)
class Config:
    interval: float = 5.0
    probe_timeout: float = 2.0  # when not set: the smaller of 2 s and interval (see parse_config)
    state_dir: str = ""  # default: $XDG_STATE_HOME/otelwatch or ~/.local/state/otelwatch
    http: HttpConfig = field(default_factory=HttpConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def recover_after(self) -> float:
        return effective_recover_after(self.recovery, self.classify)


def effective_recover_after(recovery: RecoveryConfig, classify: ClassifyConfig) -> float:
    """An explicit value is taken as given; unset means the larger of 5 minutes and
    3 x stall_after (900 s with the defaults)."""
    if recovery.recover_after is not None:
        return recovery.recover_after
    return max(300.0, 3.0 * classify.stall_after)


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Paths:
    state_dir: Path
    registry_dir: Path
    spool_dir: Path  # hook and `otelwatch event` lines, one file per session
    recovery_state: Path
    lock_file: Path  # one daemon per state directory
    home: Path


def default_paths(cfg: Config, environ: Mapping[str, str] | None = None) -> Paths:
    """Where otelwatch keeps things, from config first, then the environment.

    `OTELWATCH_STATE_DIR` overrides the state directory for hooks and tests that
    have no config file; `OTELWATCH_REGISTRY_DIR` likewise for the registry.
    """
    env = os.environ if environ is None else environ
    home = Path(cfg.sources.transcripts.home or env.get("HOME") or Path.home())
    if cfg.state_dir:
        state = Path(cfg.state_dir)
    elif env.get("OTELWATCH_STATE_DIR"):
        state = Path(env["OTELWATCH_STATE_DIR"])
    elif env.get("XDG_STATE_HOME"):
        state = Path(env["XDG_STATE_HOME"]) / "otelwatch"
    else:
        state = Path(env.get("HOME") or Path.home()) / ".local" / "state" / "otelwatch"
    if cfg.sources.registry.dir:
        registry = Path(cfg.sources.registry.dir)
    elif env.get("OTELWATCH_REGISTRY_DIR"):
        registry = Path(env["OTELWATCH_REGISTRY_DIR"])
    elif env.get("XDG_RUNTIME_DIR"):
        registry = Path(env["XDG_RUNTIME_DIR"]) / "otelwatch" / "sessions"
    else:
        registry = state / "sessions"
    recovery_state = Path(cfg.recovery.state_file) if cfg.recovery.state_file else state / "recovery.json"
    return Paths(
        state_dir=state,
        registry_dir=registry,
        spool_dir=state / "events",
        recovery_state=recovery_state,
        lock_file=state / "otelwatch.lock",
        home=home,
    )


# --------------------------------------------------------------------------- parsing

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object, key: str = "") -> float:
    """Seconds from a number or a string like "90s", "5m", "1h30m"."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration (seconds or '5m'), got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        pos, seconds = 0, 0.0
        for m in _DURATION_RE.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if not text or pos != len(text):
            try:
                seconds = float(text)
            except ValueError:
                raise ConfigError(
                    key, f"bad duration {value!r}: use seconds or a string like '90s', '5m', '1h'"
                ) from None
    else:
        raise ConfigError(key, f"expected a duration (seconds or '5m'), got {type(value).__name__}")
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise ConfigError(key, f"duration must be a finite number >= 0, got {value!r}")
    return seconds


def split_listen(listen: str, key: str = "http.listen") -> tuple[str, int]:
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ConfigError(key, f"expected HOST:PORT, got {listen!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(key, f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} is out of range 0-65535")
    return host, port


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _number(value: object, key: str, *, minimum: float = 0.0, maximum: float = 1e9,
            integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"expected a number, got {value!r}")
    if value != value or value < minimum or value > maximum:
        raise ConfigError(key, f"must be between {minimum:g} and {maximum:g}, got {value!r}")
    if integer and not float(value).is_integer():
        raise ConfigError(key, f"expected a whole number, got {value!r}")
    return int(value) if integer else float(value)


def _bounded(minimum: float, maximum: float, *, integer: bool = False) -> Any:
    def check(value: object, key: str) -> float:
        return _number(value, key, minimum=minimum, maximum=maximum, integer=integer)

    return check


def _duration_in(minimum: float, maximum: float, *, positive: bool = True) -> Any:
    """A duration within [minimum, maximum] (and > 0 when `positive`): every number a
    loop waits on or multiplies is bounded, so no value can stall or kill the loop."""

    def check(value: object, key: str) -> float:
        seconds = _positive_duration(value, key) if positive else parse_duration(value, key)
        if not minimum <= seconds <= maximum:
            raise ConfigError(key, f"must be between {_fmt_s(minimum)} and {_fmt_s(maximum)}, got {value!r}")
        return seconds

    return check


def _fmt_s(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _string(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _string_list(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f"expected a list of strings, got {value!r}")
    return tuple(value)


def _regex_list(value: object, key: str) -> tuple[str, ...]:
    patterns = _string_list(value, key)
    for i, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{key}[{i}]", f"bad regular expression {pattern!r}: {exc}") from None
    return patterns


def _agent_patterns(value: object, key: str) -> tuple[str, ...]:
    """Discovery patterns: like _regex_list, but one that matches every process is refused."""
    patterns = _regex_list(value, key)
    for i, pattern in enumerate(patterns):
        body = pattern[len("cmdline:"):] if pattern.startswith("cmdline:") else pattern
        if re.fullmatch(body, ""):
            raise ConfigError(f"{key}[{i}]", f"{pattern!r} matches every process (it matches the empty string)")
    return patterns


def _positive_duration(value: object, key: str) -> float:
    seconds = parse_duration(value, key)
    if seconds <= 0:
        raise ConfigError(key, f"must be > 0, got {value!r}")
    return seconds


def _choice(*choices: str) -> Any:
    def check(value: object, key: str) -> str:
        if value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return str(value)

    return check


def _string_map(value: object, key: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(key, f"expected a table of strings, got {value!r}")
    return dict(value)


def _notify_command(value: object, key: str) -> tuple[str, ...]:
    argv = _string_list(value, key)
    allowed = ("session_id", "state", "reason", "agent", "event")
    for i, arg in enumerate(argv):
        unknown = [n for n in re.findall(r"\{([^{}]*)\}", arg) if n not in allowed]
        if unknown:
            names = ", ".join("{" + n + "}" for n in allowed)
            raise ConfigError(f"{key}[{i}]", f"unknown placeholder {{{unknown[0]}}}: use {names}")
    return argv


def _url(value: object, key: str) -> str:
    text = _string(value, key)
    if text and not re.match(r"^https?://[^/\s]+", text):
        raise ConfigError(key, f"expected an http:// or https:// URL, got {text!r}")
    return text


def _listen(value: object, key: str) -> str:
    text = _string(value, key)
    split_listen(text, key)
    return text


def _command(value: object, key: str) -> tuple[str, ...]:
    argv = _string_list(value, key)
    for i, arg in enumerate(argv):
        bad = re.findall(r"\{([^{}]*)\}", arg)
        unknown = [name for name in bad if name not in ("pid", "pgid", "session_id")]
        if unknown:
            raise ConfigError(
                f"{key}[{i}]", f"unknown placeholder {{{unknown[0]}}}: use {{pid}}, {{pgid}} or {{session_id}}"
            )
    return argv


# Validators by dotted key. Sections are the dataclass fields holding dataclasses.
# Bounds: the widest values a person could mean. Past them a value is a typo or an
# attack (interval = 1e308 once killed the loop thread while /healthz said ok).
_WEEK = 7 * 86400.0
_VALIDATORS: dict[str, Any] = {
    "interval": _duration_in(0.05, 3600.0),
    "probe_timeout": _duration_in(0.01, 3600.0),
    "state_dir": _string,
    "http.listen": _listen,
    "http.allow_remote": _bool,
    "http.max_connections": _bounded(1, 4096, integer=True),
    "http.request_timeout": _duration_in(0.1, 300.0),
    "classify.startup_grace": _duration_in(0.0, _WEEK, positive=False),
    "classify.stall_after": _duration_in(0.1, _WEEK),
    "classify.tool_stall_after": _duration_in(0.1, _WEEK),
    "classify.cpu_idle_percent": _bounded(0.0, 100.0),
    "classify.cpu_spin_percent": _bounded(0.1, 100000.0),
    "classify.repeat_base": _duration_in(0.1, _WEEK),
    "classify.repeat_max": _duration_in(0.1, _WEEK),
    "classify.exited_retention": _duration_in(0.0, _WEEK, positive=False),
    "probe.backend": _choice("auto", "procfs", "psutil"),
    "notify.command": _notify_command,
    "notify.webhook": _url,
    "notify.headers": _string_map,
    "notify.timeout": _duration_in(0.1, 600.0),
    "notify.retries": _bounded(0, 20, integer=True),
    "notify.min_state": _choice(*NOTIFY_STATES),
    "notify.reasons": _string_list,
    "notify.agents": _string_list,
    "notify.recovery": _bool,
    "notify.session_end": _bool,
    "recovery.enabled": _bool,
    "recovery.dry_run": _bool,
    "recovery.recover_after": _duration_in(0.1, _WEEK),
    "recovery.action": _choice("signal", "command"),
    "recovery.command": _command,
    "recovery.command_timeout": _duration_in(0.1, 3600.0),
    "recovery.grace": _duration_in(0.0, 3600.0, positive=False),
    "recovery.max_per_hour": _bounded(0, 3600, integer=True),
    "recovery.protect": _regex_list,
    "recovery.users": _string_list,
    "recovery.state_file": _string,
    "recovery.waiting_on_network_after": _duration_in(0.0, _WEEK, positive=False),
    "sources.registry.enabled": _bool,
    "sources.registry.dir": _string,
    "sources.processes.enabled": _bool,
    "sources.processes.match": lambda v, k: _agent_patterns(v, k),
    "sources.tmux.enabled": _bool,
    "sources.tmux.timeout": _duration_in(0.01, 60.0),
    "sources.transcripts.enabled": _bool,
    "sources.transcripts.home": _string,
    "sources.otlp.enabled": _bool,
    "sources.otlp.listen": lambda v, k: _listen(v, k) if _string(v, k) else "",
    "sources.otlp.forward": _url,
    "sources.otlp.forward_timeout": _duration_in(0.1, 600.0),
    "sources.otlp.queue": _bounded(100, 1_000_000, integer=True),
    "sources.otlp.forward_queue_bytes": _bounded(1 << 16, 1 << 30, integer=True),
    "export.prometheus.enabled": _bool,
    "export.otlp.enabled": _bool,
    "export.otlp.endpoint": _string,
    "export.otlp.protocol": _choice("", "grpc", "http/protobuf"),
    "export.otlp.interval": _duration_in(0.1, 86400.0),
    "export.otlp.timeout": _duration_in(0.1, 600.0),
}


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip("."), f"expected a table, got {data!r}")
    by_name = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = prefix + name
        if name not in by_name:
            known = ", ".join(sorted(by_name))
            raise ConfigError(key, f"unknown key (known here: {known})")
        default = by_name[name].default_factory
        if key in _VALIDATORS:
            kwargs[name] = _VALIDATORS[key](value, key)
        elif callable(default):  # a nested section
            kwargs[name] = _build(type(default()), value, key + ".")
        else:  # pragma: no cover - every leaf has a validator
            raise ConfigError(key, "no validator")
    return cls(**kwargs)


def parse_config(data: Mapping[str, Any]) -> Config:
    """A validated `Config` from already-parsed TOML data."""
    cfg: Config = _build(Config, data, "")
    if "probe_timeout" not in data and cfg.probe_timeout > cfg.interval:
        # Derived, not an error: `interval = 1` alone must be a valid config.
        cfg = replace(cfg, probe_timeout=cfg.interval)
    c = cfg.classify
    if c.repeat_max < c.repeat_base:
        raise ConfigError("classify.repeat_max", f"must be >= classify.repeat_base ({c.repeat_base:g})")
    if c.cpu_spin_percent <= c.cpu_idle_percent:
        raise ConfigError("classify.cpu_spin_percent",
                          f"must be > classify.cpu_idle_percent ({c.cpu_idle_percent:g})")
    if cfg.probe_timeout > cfg.interval:
        raise ConfigError("probe_timeout", f"must be <= interval ({cfg.interval:g} s)")
    host = cfg.http.host
    if not cfg.http.allow_remote and not _is_loopback(host):
        raise ConfigError("http.listen", f"{host!r} is not a loopback address: POST /api/events would be open "
                          "to the network; set http.allow_remote = true to accept that")
    if cfg.sources.otlp.listen and not _is_loopback(split_listen(cfg.sources.otlp.listen)[0]):
        raise ConfigError("sources.otlp.listen", "must be a loopback address: the agents' telemetry is local")
    r = cfg.recovery
    if r.action == "command" and not r.command:
        raise ConfigError("recovery.command", 'must be set when recovery.action = "command"')
    return cfg


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """The config in `path` (None: all defaults). Raises ConfigError naming the problem."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("", f"config file {os.fspath(path)!r} does not exist") from None
    except PermissionError:
        raise ConfigError("", f"config file {os.fspath(path)!r} is not readable (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError("", f"config file {os.fspath(path)!r} is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{os.fspath(path)}: not valid TOML: {exc}") from None
    return parse_config(data)

