"""Configuration: the TOML shape of DESIGN.md, its defaults, and its validation.

Every key has a default. Unknown keys and bad values raise `ConfigError` naming
the dotted key and the reason. Durations are seconds (numbers) or strings such
as "90s", "5m", "1h30m". This module does no I/O except reading the file named
to `load_config` and looking for the default one (`find_config`), and never looks
at the environment except through the `environ` arguments of `default_paths` and
`find_config`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

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
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
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
    allowed = ("session_id", "state", "reason", "agent", "event", "name", "cwd", "user", "phase", "incident")
    for i, arg in enumerate(argv):
        unknown = [n for n in re.findall(r"\{([^{}]*)\}", arg) if n not in allowed]
        if unknown:
            names = ", ".join("{" + n + "}" for n in allowed)
            raise ConfigError(f"{key}[{i}]", f"unknown placeholder {{{unknown[0]}}}: use {names}")
    return argv


def _cwd_patterns(value: object, key: str) -> tuple[str, ...]:
    patterns = _string_list(value, key)
    for i, pattern in enumerate(patterns):
        if not pattern.startswith(("/", "*", "?", "[")):
            raise ConfigError(f"{key}[{i}]", f"expected an absolute path or a glob, got {pattern!r}")
    return patterns


def _choices_list(value: object, key: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    items = _string_list(value, key)
    for i, item in enumerate(items):
        if item not in choices:
            raise ConfigError(f"{key}[{i}]", f"expected one of {', '.join(map(repr, choices))}, got {item!r}")
    return items


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


# Bounds: the widest values a person could mean. Past them a value is a typo or an
# attack (interval = 1e308 once killed the loop thread while /healthz said ok).
_WEEK = 7 * 86400.0


class _Checked:
    """A config section whose fields are checked when it is built, from TOML or through
    the Python API alike: each field's check sits beside it (`_f`), and a bad value
    raises ConfigError with the field's dotted name. Checks also normalise (a duration
    string to seconds, a list to a tuple). Relations between fields (probe_timeout <=
    interval, repeat_max >= repeat_base, cpu_spin_percent > cpu_idle_percent) are the
    config file's rules, checked by `parse_config`."""

    _section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is None or (value is None and f.default is None):
                continue  # a section, or an optional value left unset
            checked = check(value, self._section + f.name)
            if checked is not value:
                object.__setattr__(self, f.name, checked)


def _f(default: Any, check: Callable[[object, str], Any]) -> Any:
    """A field and its check (see `_Checked`); a mutable default is copied per instance."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class HttpConfig(_Checked):
    _section = "http."
    listen: str = _f("127.0.0.1:9464", _listen)
    # A non-loopback listen address exposes POST /api/events (which can make a
    # session look busy or start a turn) to the network: it needs this opt-in.
    allow_remote: bool = _f(False, _bool)
    max_connections: int = _f(64, _bounded(1, 4096, integer=True))  # concurrent connections; past it: 503 and close
    request_timeout: float = _f(5.0, _duration_in(0.1, 300.0))  # a client must send its request (and body) within this

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


@dataclass(frozen=True)
class ClassifyConfig(_Checked):
    _section = "classify."
    startup_grace: float = _f(30.0, _duration_in(0.0, _WEEK, positive=False))
    stall_after: float = _f(300.0, _duration_in(0.1, _WEEK))
    tool_stall_after: float = _f(1800.0, _duration_in(0.1, _WEEK))
    # below this (of one core) counts as zero CPU: the stuck gate
    cpu_idle_percent: float = _f(1.0, _bounded(0.0, 100.0))
    # at or above this, sustained over the window, is a spin
    cpu_spin_percent: float = _f(50.0, _bounded(0.1, 100000.0))
    repeat_base: float = _f(60.0, _duration_in(0.1, _WEEK))
    repeat_max: float = _f(3600.0, _duration_in(0.1, _WEEK))
    exited_retention: float = _f(600.0, _duration_in(0.0, _WEEK, positive=False))


@dataclass(frozen=True)
class RecoveryConfig(_Checked):
    _section = "recovery."
    enabled: bool = _f(False, _bool)
    dry_run: bool = _f(False, _bool)
    # None: max(300, 3 * stall_after); see effective_recover_after
    recover_after: float | None = _f(None, _duration_in(0.1, _WEEK))
    action: str = _f("signal", _choice("signal", "command"))
    command: tuple[str, ...] = _f((), _command)
    command_timeout: float = _f(30.0, _duration_in(0.1, 3600.0))
    grace: float = _f(10.0, _duration_in(0.0, 3600.0, positive=False))
    max_per_hour: int = _f(6, _bounded(0, 3600, integer=True))
    protect: tuple[str, ...] = _f((), _regex_list)
    users: tuple[str, ...] = _f((), _string_list)
    state_file: str = _f("", _string)
    # Extension (off by default): also recover `stalled/waiting_on_network` sessions
    # after this much longer silence, like an idle-message timeout. 0 disables it.
    waiting_on_network_after: float = _f(0.0, _duration_in(0.0, _WEEK, positive=False))


@dataclass(frozen=True)
class ProbeConfig(_Checked):
    _section = "probe."
    # "procfs" (Linux /proc + netlink), "psutil" (portable); auto: procfs where /proc exists
    backend: str = _f("auto", _choice("auto", "procfs", "psutil"))


# Severity order for notify.min_state: a notification goes out for a report whose
# state is at least this severe.
NOTIFY_STATES = ("idle", "active", "long_running", "stalled", "stuck")


@dataclass(frozen=True)
class NotifyConfig(_Checked):
    _section = "notify."
    # argv, report JSON on stdin; placeholders {session_id} {state} {reason} {agent} {event}
    # {name} {cwd} {user} {phase} {incident}
    command: tuple[str, ...] = _f((), _notify_command)
    webhook: str = _f("", _url)  # POST JSON (Slack/Discord-compatible `text` + the full report)
    headers: Mapping[str, str] = _f({}, _string_map)  # webhook headers; "${VAR}" reads the environment
    timeout: float = _f(10.0, _duration_in(0.1, 600.0))  # one command run or one webhook POST
    retries: int = _f(3, _bounded(0, 20, integer=True))  # webhook attempts after the first, with backoff
    min_state: str = _f("stalled", _choice(*NOTIFY_STATES))  # stalled: stalled and stuck reports
    reasons: tuple[str, ...] = _f((), _string_list)  # empty: every reason
    agents: tuple[str, ...] = _f((), _string_list)  # empty: every agent
    recovery: bool = _f(True, _bool)  # recovery requested/completed
    session_end: bool = _f(False, _bool)  # the summary line when a session ends
    users: tuple[str, ...] = _f((), _string_list)  # owners of the agent's process (user names); empty: every user
    # working directories: a path prefix or a glob ("/home/*/work/*"); empty: all
    cwd: tuple[str, ...] = _f((), _cwd_patterns)
    # exactly these states (instead of min_state); empty: min_state decides
    states: tuple[str, ...] = _f((), lambda v, k: _choices_list(v, k, NOTIFY_STATES))
    # a new incident's first message waits at most this long for a settled reason
    settle: float = _f(60.0, _duration_in(0.0, 3600.0, positive=False))
    all_clear: bool = _f(True, _bool)  # one message when an incident that was notified ends


@dataclass(frozen=True)
class RegistrySourceConfig(_Checked):
    _section = "sources.registry."
    enabled: bool = _f(True, _bool)
    dir: str = _f("", _string)


@dataclass(frozen=True)
class ProcessSourceConfig(_Checked):
    _section = "sources.processes."
    enabled: bool = _f(True, _bool)
    match: tuple[str, ...] = _f(DEFAULT_AGENTS, _agent_patterns)


@dataclass(frozen=True)
class TmuxSourceConfig(_Checked):
    _section = "sources.tmux."
    enabled: bool = _f(True, _bool)
    timeout: float = _f(1.0, _duration_in(0.01, 60.0))  # every tmux call is bounded by this


@dataclass(frozen=True)
class TranscriptSourceConfig(_Checked):
    _section = "sources.transcripts."
    enabled: bool = _f(True, _bool)
    home: str = _f("", _string)  # default: the home directory of the user otelwatch runs as


@dataclass(frozen=True)
class OtlpSourceConfig(_Checked):
    """The agents' own OpenTelemetry in (sources/otlp.py); off by default."""

    _section = "sources.otlp."
    enabled: bool = _f(False, _bool)
    # "": on the [http] listener; else a loopback address of its own
    listen: str = _f("", lambda v, k: _listen(v, k) if _string(v, k) else "")
    forward: str = _f("", _url)  # the user's OTLP/HTTP endpoint (base URL): every record is sent on there
    forward_timeout: float = _f(5.0, _duration_in(0.1, 600.0))  # one forwarded request may take this long
    # log records waiting for the loop; past it they are dropped (counted)
    queue: int = _f(20_000, _bounded(100, 1_000_000, integer=True))
    # bodies waiting to be forwarded; past it dropped (counted)
    forward_queue_bytes: int = _f(32 << 20, _bounded(1 << 16, 1 << 30, integer=True))


@dataclass(frozen=True)
class SourcesConfig(_Checked):
    _section = "sources."
    registry: RegistrySourceConfig = field(default_factory=RegistrySourceConfig)
    processes: ProcessSourceConfig = field(default_factory=ProcessSourceConfig)
    tmux: TmuxSourceConfig = field(default_factory=TmuxSourceConfig)
    transcripts: TranscriptSourceConfig = field(default_factory=TranscriptSourceConfig)
    otlp: OtlpSourceConfig = field(default_factory=OtlpSourceConfig)


@dataclass(frozen=True)
class PrometheusExportConfig(_Checked):
    _section = "export.prometheus."
    enabled: bool = _f(True, _bool)


@dataclass(frozen=True)
class OtlpExportConfig(_Checked):
    _section = "export.otlp."
    enabled: bool = _f(False, _bool)  # also on when OTEL_EXPORTER_OTLP_ENDPOINT is set
    endpoint: str = _f("", _string)  # default: the OTEL_EXPORTER_OTLP_* variables, else the SDK default
    # "grpc" | "http/protobuf"; default: OTEL_EXPORTER_OTLP_PROTOCOL, else grpc
    protocol: str = _f("", _choice("", "grpc", "http/protobuf"))
    # Metric export interval; None: OTEL_METRIC_EXPORT_INTERVAL (milliseconds), else 15 s.
    interval: float | None = _f(None, _duration_in(0.1, 86400.0))
    timeout: float = _f(5.0, _duration_in(0.1, 600.0))  # one export may take this long before it is abandoned


@dataclass(frozen=True)
class ExportConfig(_Checked):
    _section = "export."
    prometheus: PrometheusExportConfig = field(default_factory=PrometheusExportConfig)
    otlp: OtlpExportConfig = field(default_factory=OtlpExportConfig)


@dataclass(frozen=True)
class Config(_Checked):
    interval: float = _f(5.0, _duration_in(0.05, 3600.0))
    # when not set: the smaller of 2 s and interval (see parse_config)
    probe_timeout: float = _f(2.0, _duration_in(0.01, 3600.0))
    state_dir: str = _f("", _string)  # default: $XDG_STATE_HOME/otelwatch or ~/.local/state/otelwatch
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
        if "check" in by_name[name].metadata:
            kwargs[name] = value  # checked (with its dotted name) when the section is built
        elif callable(default):  # a nested section
            kwargs[name] = _build(type(default()), value, key + ".")
        else:  # pragma: no cover - every leaf has a check
            raise ConfigError(key, "no validator")
    return cls(**kwargs)


def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every key a config file may set, as dotted names (`classify.stall_after`)."""
    out: list[str] = []
    for f in fields(cls):
        if "check" in f.metadata:
            out.append(prefix + f.name)
        elif callable(f.default_factory):
            out.extend(config_keys(type(f.default_factory()), prefix + f.name + "."))
    return out


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
    notify = data.get("notify")
    if isinstance(notify, Mapping) and notify.get("states") and "min_state" in notify:
        raise ConfigError("notify.states", "set notify.states or notify.min_state, not both")
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


SYSTEM_CONFIG = Path("/etc/otelwatch/config.toml")


def config_candidates(environ: Mapping[str, str]) -> list[Path]:
    """Where `run`, `status` and `top` look for a config file when none is named:
    `$XDG_CONFIG_HOME/otelwatch/config.toml` (a relative XDG_CONFIG_HOME is ignored,
    as the XDG spec says; default ~/.config), then /etc/otelwatch/config.toml."""
    xdg = environ.get("XDG_CONFIG_HOME", "")
    home = environ.get("HOME") or str(Path.home())
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(home) / ".config"
    return [base / "otelwatch" / "config.toml", SYSTEM_CONFIG]


def find_config(environ: Mapping[str, str]) -> Path | None:
    """The first config file of `config_candidates` that exists (None: defaults)."""
    for path in config_candidates(environ):
        if os.path.lexists(path):  # present but unreadable is said by load_config, not skipped
            return path
    return None


def with_listen(cfg: Config, listen: str) -> Config:
    """`cfg` listening on `listen` (`otelwatch run --listen`), validated like http.listen."""
    http = replace(cfg.http, listen=_listen(listen, "--listen"))
    if not http.allow_remote and not _is_loopback(http.host):
        raise ConfigError("--listen", f"{http.host!r} is not a loopback address: POST /api/events would be open "
                          "to the network; set http.allow_remote = true in the config file to accept that")
    return replace(cfg, http=http)


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

