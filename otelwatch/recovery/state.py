"""The recovery state file's contents, parsed strictly: escalations, given-up processes, rate.

Owns `Escalation` (one recovery in progress, as persisted after every step) and
`StateFile` (the whole file, every value checked). The file decides whose
processes may be signalled after a restart, so a value that is missing, of the
wrong type or out of range makes the whole file corrupt (`StateCorrupt`, naming
the value): it is moved aside, never half-trusted.

Pure: no I/O (the actuator's `StateStore` reads and writes the file), time passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from otelwatch.model import EscalationStep, ProcessIdentity, same_process
from otelwatch.recovery.policy import KIND_NETWORK, KIND_STUCK, RATE_WINDOW

__all__ = ["FUTURE_SLACK_S", "GIVEN_UP_KEEP", "PID_MAX", "STEPS", "Escalation", "StateCorrupt", "StateFile"]

GIVEN_UP_KEEP = 100

# What a value in the state file may be. Anything else is a corrupt file (moved aside
# whole, never half-trusted): the file decides whose processes may be signalled.
PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT: no pid is larger
STATE_LIST_MAX = 10_000  # entries per list; a real file holds a handful
SNAPSHOT_MAX = 100_000  # processes in one escalation's tree snapshot
TEXT_MAX = 4096  # characters of a session id, agent, reason
FUTURE_SLACK_S = 86_400.0  # a wall-clock time later than now + this is out of range
# The steps an escalation in progress can be at (completed ones are not in the file).
STEPS = tuple(s.value for s in EscalationStep if s is not EscalationStep.COMPLETED)


class StateCorrupt(ValueError):
    """A value of the state file that is of the wrong type or out of range; says where."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: Any, where: str, lo: float, hi: float) -> float:
    """A finite real in [lo, hi] (JSON's 1e999 is inf, NaN parses too; bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StateCorrupt(f"{where} = {_show(value)} is not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer with hundreds of digits
        number = math.inf
    if not math.isfinite(number) or not lo <= number <= hi:
        raise StateCorrupt(f"{where} = {_show(value)} is out of range ({lo:.0f}..{hi:.0f})")
    return number


def _integer(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateCorrupt(f"{where} = {_show(value)} is not an integer")
    if not lo <= value <= hi:
        raise StateCorrupt(f"{where} = {_show(value)} is out of range ({lo}..{hi})")
    return value


def _text(value: Any, where: str, choices: tuple[str, ...] = ()) -> str:
    if not isinstance(value, str) or (choices and value not in choices) or len(value) > TEXT_MAX:
        expected = f"one of {list(choices)}" if choices else f"a string of at most {TEXT_MAX} characters"
        raise StateCorrupt(f"{where} = {_show(value)} is not {expected}")
    return value


def _items(value: Any, where: str, most: int) -> list[Any]:
    if not isinstance(value, list):
        raise StateCorrupt(f"{where} is not a list")
    if len(value) > most:
        raise StateCorrupt(f"{where} has {len(value)} entries (at most {most})")
    return value


def _identity(value: Any, where: str, now: float) -> ProcessIdentity:
    """[pid, create_time] as written by `to_json`."""
    if not isinstance(value, list) or len(value) != 2:
        raise StateCorrupt(f"{where} = {_show(value)} is not a [pid, create_time] pair")
    return ProcessIdentity(_integer(value[0], f"{where}[0]", 1, PID_MAX),
                           _number(value[1], f"{where}[1]", 0.0, now + FUTURE_SLACK_S))


@dataclass
class Escalation:
    """One recovery in progress; mirrored in the state file after every step."""

    session_id: str
    agent: str
    action: str
    reason: str
    kind: str
    identity: ProcessIdentity
    pgid: int
    snapshot: tuple[ProcessIdentity, ...]  # the tree at decision time, root first
    step: str  # last step done: "requested", "sigterm", "sigkill", "command"
    time: float  # wall clock of that step
    requested_at: float
    events: int  # the session's event count when decided (or when resumed)

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "agent": self.agent, "action": self.action,
            "reason": self.reason, "kind": self.kind, "pid": self.identity.pid,
            "create_time": self.identity.create_time, "pgid": self.pgid,
            "snapshot": [[i.pid, i.create_time] for i in self.snapshot],
            "step": self.step, "time": self.time, "requested_at": self.requested_at,
            "events": self.events,
        }

    @classmethod
    def from_json(cls, d: Any, now: float, where: str = "escalation") -> Escalation:
        """Strict: raises `StateCorrupt` naming the first field that is missing, of the wrong
        type or out of range (`now`, wall clock, bounds the times)."""
        if not isinstance(d, dict):
            raise StateCorrupt(f"{where} is not an object")
        missing = [k for k in ("session_id", "pid", "create_time", "step", "time") if k not in d]
        if missing:
            raise StateCorrupt(f"{where} lacks {missing}")
        latest = now + FUTURE_SLACK_S
        ident = ProcessIdentity(_integer(d["pid"], f"{where}.pid", 1, PID_MAX),
                                _number(d["create_time"], f"{where}.create_time", 0.0, latest))
        snapshot = tuple(_identity(item, f"{where}.snapshot[{i}]", now)
                         for i, item in enumerate(_items(d.get("snapshot", []), f"{where}.snapshot",
                                                         SNAPSHOT_MAX)))
        if not snapshot or not same_process(snapshot[0], ident):
            snapshot = (ident, *snapshot)
        t = _number(d["time"], f"{where}.time", 0.0, latest)
        session_id = _text(d["session_id"], f"{where}.session_id")
        if not session_id:
            raise StateCorrupt(f"{where}.session_id is empty")
        return cls(
            session_id,
            _text(d.get("agent", "unknown"), f"{where}.agent"),
            _text(d.get("action", "signal"), f"{where}.action", ("signal", "command")),
            _text(d.get("reason", ""), f"{where}.reason"),
            _text(d.get("kind", KIND_STUCK), f"{where}.kind", (KIND_STUCK, KIND_NETWORK)),
            ident,
            _integer(d.get("pgid", 0), f"{where}.pgid", 0, PID_MAX),
            snapshot,
            _text(d["step"], f"{where}.step", STEPS),
            t,
            _number(d.get("requested_at", t), f"{where}.requested_at", 0.0, latest),
            _integer(d.get("events", 0), f"{where}.events", 0, 2**63 - 1),
        )


def _shifted(data: dict[str, Any], delta: float) -> dict[str, Any]:
    """`data` with every identity's create_time moved by `delta` (values checked later)."""
    if delta == 0:
        return data

    def move(value: Any) -> Any:
        return value + delta if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    def pair(value: Any) -> Any:
        return [value[0], move(value[1])] if isinstance(value, list) and len(value) == 2 else value

    out = dict(data)
    if isinstance(data.get("given_up"), list):
        out["given_up"] = [pair(v) for v in data["given_up"]]
    if isinstance(data.get("escalations"), list):
        escalations = []
        for esc in data["escalations"]:
            if isinstance(esc, dict):
                esc = dict(esc)
                if "create_time" in esc:
                    esc["create_time"] = move(esc["create_time"])
                if isinstance(esc.get("snapshot"), list):
                    esc["snapshot"] = [pair(v) for v in esc["snapshot"]]
            escalations.append(esc)
        out["escalations"] = escalations
    return out


@dataclass(frozen=True)
class StateFile:
    """The state file's contents, every value checked."""

    recent: list[float]
    given_up: list[ProcessIdentity]
    escalations: list[Escalation]

    @classmethod
    def parse(cls, data: Any, now: float, boot_time: float | None = None) -> StateFile:
        """Raises `StateCorrupt` naming the first bad value.

        Identities are kept as create times, each the writer's `boot_time` plus the
        process's start in clock ticks since boot. With both boot times known they are
        moved onto this daemon's (`boot_time`), so a wall-clock step between the two
        daemons (which moves /proc/stat's btime) changes no identity. A file without
        one (older versions) is read as it is."""
        if not isinstance(data, dict):
            raise StateCorrupt("the top level is not an object")
        written_boot = data.get("boot_time")
        if written_boot is not None and boot_time is not None:
            shift = _number(written_boot, "boot_time", 0.0, now + FUTURE_SLACK_S)
            data = _shifted(data, boot_time - shift)
        latest = now + FUTURE_SLACK_S
        recent = [t for i, v in enumerate(_items(data.get("recoveries", []), "recoveries", STATE_LIST_MAX))
                  if (t := _number(v, f"recoveries[{i}]", 0.0, latest)) > now - RATE_WINDOW]
        given_up = [_identity(v, f"given_up[{i}]", now)
                    for i, v in enumerate(_items(data.get("given_up", []), "given_up", STATE_LIST_MAX))]
        escalations = [Escalation.from_json(v, now, f"escalations[{i}]")
                       for i, v in enumerate(_items(data.get("escalations", []), "escalations",
                                                    STATE_LIST_MAX))]
        ids = [e.session_id for e in escalations]
        if len(set(ids)) != len(ids):
            raise StateCorrupt("escalations name one session twice")
        return cls(recent, given_up[-GIVEN_UP_KEEP:], escalations)
