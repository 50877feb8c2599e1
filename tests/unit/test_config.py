from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from otelwatch.cli import main
from otelwatch.config import (
    ClassifyConfig,
    Config,
    ConfigError,
    HttpConfig,
    NotifyConfig,
    OtlpExportConfig,
    RecoveryConfig,
    TmuxSourceConfig,
    default_paths,
    load_config,
    parse_config,
    parse_duration,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(5, 5.0), (2.5, 2.5), ("90s", 90.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0), ("250ms", 0.25),
     ("7", 7.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5x", "", "m5", "-3", True, [1], float("nan")])
def test_bad_durations_name_the_key(bad: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_duration(bad, "classify.stall_after")
    assert err.value.key == "classify.stall_after"


def test_defaults_match_design() -> None:
    cfg = Config()
    assert (cfg.interval, cfg.probe_timeout, cfg.http.listen) == (5.0, 2.0, "127.0.0.1:9464")
    c = cfg.classify
    assert (c.startup_grace, c.stall_after, c.tool_stall_after, c.cpu_idle_percent) == (30, 300, 1800, 1.0)
    assert (c.repeat_base, c.repeat_max, c.exited_retention) == (60, 3600, 600)
    r = cfg.recovery
    assert (r.enabled, r.dry_run, r.action, r.grace, r.max_per_hour) == (False, False, "signal", 10, 6)
    assert cfg.recover_after == 900  # max(300, 3 * stall_after)
    assert cfg.sources.processes.match == ("claude", "codex", "gemini", "aider", "opencode")
    assert cfg.export.prometheus.enabled and not cfg.export.otlp.enabled


def test_recover_after_derivation_and_explicit_value() -> None:
    assert parse_config({"classify": {"stall_after": 10}}).recover_after == 300
    assert parse_config({"classify": {"stall_after": 200}}).recover_after == 600
    assert parse_config({"recovery": {"recover_after": "2s"}, "classify": {"stall_after": 100}}).recover_after == 2


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"intervall": 5}, "intervall"),
        ({"classify": {"stall_afterr": 5}}, "classify.stall_afterr"),
        ({"classify": {"stall_after": "soon"}}, "classify.stall_after"),
        ({"classify": {"stall_after": 0}}, "classify.stall_after"),
        ({"classify": {"cpu_idle_percent": -1}}, "classify.cpu_idle_percent"),
        ({"classify": {"repeat_base": 100, "repeat_max": 10}}, "classify.repeat_max"),
        ({"recovery": {"enabled": "yes"}}, "recovery.enabled"),
        ({"recovery": {"action": "nuke"}}, "recovery.action"),
        ({"recovery": {"action": "command"}}, "recovery.command"),
        ({"recovery": {"command": ["kill", "{ppid}"]}}, "recovery.command[1]"),
        ({"recovery": {"max_per_hour": 1.5}}, "recovery.max_per_hour"),
        ({"recovery": {"protect": ["("]}}, "recovery.protect[0]"),
        ({"http": {"listen": "9464"}}, "http.listen"),
        ({"http": {"listen": "127.0.0.1:99999"}}, "http.listen"),
        ({"http": "x"}, "http"),
        ({"export": {"otlp": {"protocol": "carrier-pigeon"}}}, "export.otlp.protocol"),
        ({"interval": 1, "probe_timeout": 2}, "probe_timeout"),
    ],
)
def test_bad_values_name_the_dotted_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert err.value.key == key
    assert key in str(err.value)


def test_full_design_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "otelwatch.toml"
    path.write_text(
        """
interval = 5
probe_timeout = 2
[http]
listen = "127.0.0.1:9464"
[classify]
startup_grace = 30
stall_after = "5m"
tool_stall_after = 1800
cpu_idle_percent = 1.0
repeat_base = 60
repeat_max = "1h"
exited_retention = 600
[recovery]
enabled = false
dry_run = false
recover_after = 900
action = "signal"
command = []
grace = 10
max_per_hour = 6
protect = []
users = []
state_file = ""
[sources.registry]
dir = ""
[sources.processes]
enabled = true
match = ["claude", "codex", "gemini", "aider", "opencode"]
[sources.tmux]
enabled = true
[sources.transcripts]
enabled = true
[export.prometheus]
enabled = true
[export.otlp]
enabled = false
"""
    )
    cfg = load_config(path)
    assert cfg.classify.stall_after == 300 and cfg.classify.repeat_max == 3600


def test_load_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("interval = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_check_config_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text("interval = 3\n")
    assert main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[classify]\nstall_after = 'forever'\n")
    assert main(["check-config", str(bad)]) == 2
    assert "classify.stall_after" in capsys.readouterr().err


def test_paths_follow_config_then_environment(tmp_path: Path) -> None:
    env = {"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1000"}
    p = default_paths(Config(), env)
    assert p.registry_dir == Path("/run/user/1000/otelwatch/sessions")
    assert p.state_dir == Path("/home/u/.local/state/otelwatch")
    p = default_paths(parse_config({"state_dir": str(tmp_path)}), {"HOME": "/h"})
    assert p.state_dir == tmp_path and p.registry_dir == tmp_path / "sessions"
    assert p.recovery_state == tmp_path / "recovery.json"


@pytest.mark.parametrize(
    ("build", "data", "key"),
    [
        (lambda: Config(interval=-1.0), {"interval": -1.0}, "interval"),
        (lambda: Config(interval=1e308), {"interval": 1e308}, "interval"),
        (lambda: ClassifyConfig(stall_after=0), {"classify": {"stall_after": 0}}, "classify.stall_after"),
        (lambda: RecoveryConfig(max_per_hour=1.5),  # type: ignore[arg-type]
         {"recovery": {"max_per_hour": 1.5}}, "recovery.max_per_hour"),
        (lambda: RecoveryConfig(protect=("(",)), {"recovery": {"protect": ["("]}}, "recovery.protect[0]"),
        (lambda: HttpConfig(listen="9464"), {"http": {"listen": "9464"}}, "http.listen"),
        (lambda: TmuxSourceConfig(timeout=999), {"sources": {"tmux": {"timeout": 999}}}, "sources.tmux.timeout"),
        (lambda: OtlpExportConfig(protocol="carrier-pigeon"), {"export": {"otlp": {"protocol": "carrier-pigeon"}}},
         "export.otlp.protocol"),
    ],
)
def test_a_config_built_in_python_is_checked_like_a_file(build: Any, data: dict, key: str) -> None:
    """One check per field, beside it, run when the section is built: the Python API
    says what the TOML loader says, word for word."""
    with pytest.raises(ConfigError) as from_python:
        build()
    with pytest.raises(ConfigError) as from_file:
        parse_config(data)
    assert from_python.value.key == key and str(from_python.value) == str(from_file.value)


def test_every_setting_has_its_check_beside_it() -> None:
    def leaves(cls: type, prefix: str) -> list[str]:
        out = []
        for f in fields(cls):
            if "check" in f.metadata:
                out.append(prefix + f.name)
            else:  # a section: its own checked fields
                assert callable(f.default_factory), f"{prefix}{f.name} has no check"
                out += leaves(type(f.default_factory()), prefix + f.name + ".")
        return out

    names = leaves(Config, "")
    assert "interval" in names and "export.otlp.interval" in names and len(names) > 50
    # Built in Python, values are normalised as from a file.
    cfg = Config(interval="5m", notify=NotifyConfig(reasons=["no_activity"]))  # type: ignore[arg-type]
    assert cfg.interval == 300.0 and cfg.notify.reasons == ("no_activity",)
