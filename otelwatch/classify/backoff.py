"""The backoff of repeated reports: a stalled or stuck session is reported when
first seen, then after repeat_base, 2x, 4x ... up to repeat_max while its
fingerprint is unchanged. Pure: times are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from otelwatch.classify.window import child_ids
from otelwatch.config import ClassifyConfig
from otelwatch.events.activity import Activity
from otelwatch.model import PROBLEM_STATES, State, TreeSample, Verdict

__all__ = ["ReportSchedule", "fingerprint", "next_report"]


def fingerprint(verdict: Verdict, activity: Activity, sample: TreeSample | None) -> tuple[Any, ...]:
    """What must stay the same for a repeat report to be backed off:
    (state, reason, progress event count, child process identities).

    Progress events, not all events: an api_retrying session gets a heartbeat
    per retry, and counting those would reset the backoff on every retry line."""
    children = child_ids(sample) if sample is not None else frozenset()
    return (verdict.state, verdict.reason, activity.progress_events, children)


@dataclass(frozen=True)
class ReportSchedule:
    """The backoff of one session's reports: `interval` is the gap before the
    next report, due at `next_due`; `reports` counts reports of this fingerprint."""

    fingerprint: tuple[Any, ...]
    next_due: float
    interval: float
    reports: int


def next_report(
    schedule: ReportSchedule | None,
    fp: tuple[Any, ...],
    state: State,
    now: float,
    cfg: ClassifyConfig,
) -> tuple[ReportSchedule | None, bool]:
    """The schedule after this tick, and whether to report now.

    Only stalled and stuck are reported: at first detection, then after
    repeat_base, 2x, 4x ... capped at repeat_max, while the fingerprint holds.
    A changed fingerprint reports at once and starts again from repeat_base;
    leaving stalled/stuck clears the schedule. Gaps count from the report
    actually made, so a late tick never causes a burst.
    """
    if state not in PROBLEM_STATES:
        return None, False
    base = min(cfg.repeat_base, cfg.repeat_max)
    if schedule is None or schedule.fingerprint != fp:
        return ReportSchedule(fp, now + base, base, 1), True
    # A wall clock stepped back past the last report would otherwise silence
    # reports until it caught up; report and carry on from the new time.
    clock_stepped_back = now < schedule.next_due - schedule.interval
    if now < schedule.next_due and not clock_stepped_back:
        return schedule, False
    interval = min(max(schedule.interval * 2.0, base), cfg.repeat_max)
    return ReportSchedule(fp, now + interval, interval, schedule.reports + 1), True
