"""docs/design.md stays true with the code: every state, reason, instrument, config key,
subcommand, endpoint and /api/sessions field the code has is named there, and the
README's links into the repository resolve."""

from __future__ import annotations

import argparse
import re
import time

from otelwatch.cli import _parser
from otelwatch.config import config_keys
from otelwatch.model import Reason, SessionSnapshot, State
from otelwatch.telemetry import instruments
from tests.support.procs import REPO

ROOT = REPO
DESIGN = (ROOT / "docs" / "design.md").read_text()


def _code_names() -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", DESIGN))


def test_states_and_reasons() -> None:
    named = _code_names()
    assert {s.value for s in State} <= named
    assert {r.value for r in Reason} - named == set()


def test_instruments() -> None:
    names = {v for k, v in vars(instruments).items() if k.isupper() and isinstance(v, str)
             and v.startswith("otelwatch.")}
    assert len(names) >= 20
    assert names - _code_names() == set()


def test_config_keys() -> None:
    assert set(config_keys()) - _code_names() == set(), "config keys missing from docs/design.md"


def test_subcommands() -> None:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = DESIGN
    for name in sub.choices:
        assert f"`otelwatch {name}" in text, f"otelwatch {name} is not in docs/design.md"


def test_endpoints_and_api_fields() -> None:
    for endpoint in ("GET /metrics", "GET /healthz", "GET /api/sessions", "POST /api/events"):
        assert f"`{endpoint}" in DESIGN
    snap = SessionSnapshot(session_id="s", agent="a", pid=1, state=State.ACTIVE, reason=Reason.RECENT_PROGRESS,
                           state_since=time.time(), last_event_time=None, last_event_age_s=None, silence_s=0.0,
                           cpu_percent=None, rss_bytes=0, open_fds=None, threads=0, tcp={})
    api = DESIGN.split("Each `/api/sessions` object has:", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`([a-z_]+)`", api))
    assert set(snap.to_json()) - listed == set(), "fields of /api/sessions missing from docs/design.md"


def test_readme_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "DESIGN.md" not in readme.replace("docs/design.md", "")  # the contract lives in this repository
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (ROOT / target).exists(), f"README links to {target}, which is not in the repository"
    for doc in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}"
