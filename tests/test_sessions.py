"""The session table's bounded bookkeeping: aliases and ended registrations."""

from __future__ import annotations

import tracemalloc

from otelwatch.sessions import ALIASES_PER_SESSION, AliasMap, EndedRegistrations


def test_aliases_resolve_rekey_and_forget() -> None:
    m = AliasMap()
    m.add("uuid-1", "job")
    m.add("hook-1", "job")
    assert m.resolve("uuid-1") == "job" and m.resolve("job") == "job" and m.resolve("other") == "other"
    m.rekey("job", "job-2")
    assert {m.resolve(a) for a in ("uuid-1", "hook-1", "job")} == {"job-2"}
    m.forget("job-2")
    assert len(m) == 0 and m.resolve("uuid-1") == "uuid-1"


def test_an_alias_moves_rather_than_duplicates() -> None:
    m = AliasMap()
    m.add("x", "a")
    m.add("x", "b")
    assert m.resolve("x") == "b" and m.aliases_of("a") == () and m.aliases_of("b") == ("x",)


def test_minting_ids_for_one_session_costs_a_fixed_amount() -> None:
    """2.5M POSTs with new session ids and a tracked pid once cost +228 MB."""
    m = AliasMap()
    tracemalloc.start()
    for i in range(30_000):
        m.add(f"minted-{i}", "victim")
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(m) == ALIASES_PER_SESSION
    assert m.resolve("minted-29999") == "victim" and m.resolve("minted-0") == "minted-0"
    assert current < 100_000  # bytes: bounded, not proportional to the flood


def test_forget_costs_only_the_sessions_own_aliases() -> None:
    m = AliasMap()
    for s in range(5_000):
        m.add(f"alias-{s}", f"session-{s}")
    for s in range(5_000):
        m.forget(f"session-{s}")  # was a scan of every alias per forget: quadratic
    assert len(m) == 0


def test_ended_registrations_are_exact_and_bounded() -> None:
    ended = EndedRegistrations(limit=3)
    ended.add("a", 10, 100.0)
    assert ended.ended("a", 10, 100.0)
    assert not ended.ended("a", 11, 100.0)  # another pid: a new registration
    assert not ended.ended("a", 10, 200.0)  # written again later: a new registration
    for sid in ("b", "c", "d"):
        ended.add(sid, 1, 1.0)
    assert len(ended) == 3 and not ended.ended("a", 10, 100.0)
