from __future__ import annotations

from otelwatch.events.activity import Activity
from otelwatch.model import REASONS_BY_STATE, Event, EventKind, Reason, State


def test_every_reason_belongs_to_exactly_one_state() -> None:
    owners = [s for r in Reason for s in State if r in REASONS_BY_STATE[s]]
    assert len(owners) == len(Reason)


def test_fold_counts_and_clocks_never_move_back() -> None:
    a = Activity().apply(Event(time=10.0, type="assistant")).apply(Event(time=5.0, type="assistant"))
    assert (a.events, a.progress_events, a.last_progress_time, a.first_event_time) == (2, 2, 10.0, 5.0)
    a = a.apply(Event(time=12.0, type="api_retry", kind=EventKind.HEARTBEAT, retry=True))
    assert (a.events, a.progress_events, a.last_progress_time) == (3, 2, 10.0)
    assert a.last_heartbeat_time == a.last_retry_time == 12.0


def test_tool_calls_open_close_and_imply_an_open_turn() -> None:
    a = Activity().apply(Event(time=1.0, type="PreToolUse", tool="Bash", tool_call="open"))
    assert a.turn_open and a.turn_opened_at == 1.0 and [t.tool for t in a.open_tools] == ["Bash"]
    a = a.apply(Event(time=2.0, type="tool_use", tool="Read", tool_id="t2", tool_call="open"))
    a = a.apply(Event(time=3.0, type="PostToolUse", tool="Bash", tool_call="close"))  # no id: by name
    assert [t.tool_id for t in a.open_tools] == ["t2"]
    a = a.apply(Event(time=4.0, type="result", turn="close"))
    assert not a.turn_open and a.open_tools == ()


def test_awaiting_input_set_by_notification_cleared_by_progress() -> None:
    a = Activity().apply(Event(time=1.0, type="Notification", kind=EventKind.HEARTBEAT, awaiting_input=True))
    assert a.awaiting_input
    assert a.apply(Event(time=2.0, type="ping", kind=EventKind.HEARTBEAT)).awaiting_input
    assert not a.apply(Event(time=2.0, type="PostToolUse", tool_call="close")).awaiting_input


def test_recent_ring_is_bounded() -> None:
    a = Activity()
    for i in range(50):
        a = a.apply(Event(time=float(i), type="x"), ring=20)
    assert len(a.recent) == 20 and a.recent[0].time == 30.0 and a.events == 50
