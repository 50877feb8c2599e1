"""Late ticks: when the watchdog itself was not watching (host suspended, daemon
stopped, overloaded), the gap is not the agent's silence. Pure.
"""

from __future__ import annotations

__all__ = ["LATE_TICK_MIN_S", "is_late_tick"]

# A tick later than this floor is always scheduling noise, never a suspend:
# see is_late_tick.
LATE_TICK_MIN_S = 10.0


def is_late_tick(expected: float, actual: float, interval: float) -> bool:
    """Whether a tick came so late that the watchdog was not watching (host
    suspended, daemon stopped, machine overloaded): the daemon then moves its
    `watch_since` to `actual` so the gap never counts as evidence of idleness
    (the windows that gate stuck and recovery start again; silence does not).

    Late means more than max(2 intervals, LATE_TICK_MIN_S) after `expected`.
    Two intervals absorb one slow tick (a probe may take probe_timeout); the
    10 s floor keeps a loaded CI box with a sub-second interval from restarting
    the windows all the time, and costs little: silence is judged in minutes.
    Pass wall-clock or CLOCK_BOOTTIME times: CLOCK_MONOTONIC (time.monotonic)
    stops during suspend on Linux and would hide exactly the gap to detect.
    """
    return actual - expected > max(2.0 * interval, LATE_TICK_MIN_S)
