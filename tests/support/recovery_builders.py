"""Builders for the pure recovery policy's tests: process samples, session views
and policy contexts around one fixed process identity. Shared by
test_recovery_policy.py and test_recovery_properties.py so that no test file
imports another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from otelwatch.config import ClassifyConfig, Config, RecoveryConfig
from otelwatch.model import ProcessIdentity, ProcessSample, Reason, SampleStatus, State, TreeSample, Verdict
from otelwatch.recovery.policy import PolicyContext, SessionView

PID, CT, UID, SELF = 4242, 1_000.0, 1000, 99_999
T0 = 1_700_000_000.0


def config(**recovery: object) -> Config:
    base: dict[str, object] = {"enabled": True, "recover_after": 10.0, "max_per_hour": 6}
    base.update(recovery)
    return Config(interval=1.0, probe_timeout=0.5, classify=ClassifyConfig(stall_after=5.0),
                  recovery=RecoveryConfig(**base))  # type: ignore[arg-type]


def context(cfg: Config | None = None, **changes: object) -> PolicyContext:
    ctx = PolicyContext.from_config(cfg or config(), self_pid=SELF, allowed_uids={UID},
                                    self_ancestors={50, 60})
    return replace(ctx, **changes)  # type: ignore[arg-type]


def proc(pid: int, ppid: int, *, ct: float = CT, cpu_s: float = 0.5, cpu: float | None = 0.0,
         status: str = "S", uid: int | None = UID, cmd: tuple[str, ...] = ("node", "agent"),
         tcp: int | None = 0) -> ProcessSample:
    return ProcessSample(pid=pid, ppid=ppid, create_time=ct, name=cmd[0] if cmd else "", status=status,
                         cpu_seconds=cpu_s, cpu_percent=cpu, rss_bytes=1 << 20, threads=1, pgid=PID,
                         uid=uid, tcp=None if tcp is None else {"ESTABLISHED": tcp} if tcp else {},
                         cmdline=cmd)


def make_view(
    t: float,
    *,
    state: State = State.STUCK,
    reason: Reason = Reason.NO_ACTIVITY,
    pid: int = PID,
    ct: float = CT,
    tcp: int | None = 0,
    cpu: float | None = 0.0,
    cpu_s: float = 1.0,
    events: int = 5,
    uid: int | None = UID,
    cmd: tuple[str, ...] = ("node", "agent"),
    children: Sequence[ProcessSample] = (),
    status: SampleStatus = SampleStatus.OK,
    root_status: str = "S",
) -> SessionView:
    root = proc(pid, 1, ct=ct, cpu_s=cpu_s, cpu=cpu, status=root_status, uid=uid, cmd=cmd, tcp=tcp)
    procs = (root, *children)
    tcp_map = None if tcp is None else ({"ESTABLISHED": tcp} if tcp else {})
    sample = TreeSample(time=t, status=status, root=ProcessIdentity(pid, ct), processes=procs,
                        cpu_percent=cpu, cpu_seconds=cpu_s + sum(c.cpu_seconds for c in children),
                        tcp=tcp_map, children=len(children))
    return SessionView("s1", "claude-code", ProcessIdentity(pid, ct), PID, uid, cmd,
                       Verdict(state, reason, silence_s=60.0), sample, events)
