from __future__ import annotations

from dataclasses import replace

from otelwatch.commands.status import format_table
from otelwatch.events.activity import Activity
from otelwatch.model import (
    Event,
    ProcessIdentity,
    ProcessSample,
    Reason,
    Runtime,
    SampleStatus,
    SessionSnapshot,
    State,
    TcpConnection,
    TreeSample,
    Verdict,
)
from otelwatch.sessions.report import build_report, describe, human_duration, session_summary, who


def _sample(status: str = "S", tcp: dict[str, int] | None = None, cpu: float = 0.0, children: int = 0) -> TreeSample:
    conns = tuple(TcpConnection(state, "10.0.0.2:40000", "10.0.0.7:443") for state, n in (tcp or {}).items()
                  for _ in range(n))
    root = ProcessSample(pid=100, ppid=1, create_time=1.0, name="claude", status=status, cpu_seconds=3.0,
                         cpu_percent=cpu, rss_bytes=1 << 20, threads=4, tcp=tcp or {}, connections=conns,
                         cmdline=("claude", "-p", "fix it"))
    kids = tuple(ProcessSample(pid=101 + i, ppid=100, create_time=2.0, name="bash", status="S", cpu_seconds=0.0,
                               cpu_percent=0.0, rss_bytes=1, threads=1, cmdline=("bash", "-c", "make"))
                 for i in range(children))
    return TreeSample(time=1000.0, status=SampleStatus.OK, root=ProcessIdentity(100, 1.0), processes=(root, *kids),
                      cpu_percent=cpu, tcp=tcp or {}, children=children)


def test_human_duration() -> None:
    assert [human_duration(s) for s in (None, 5, 89, 90, 840, 7260)] == ["never", "5s", "89s", "1m30s", "14m", "2h01m"]


def test_describe_says_where_it_waits_on_what_for_how_long() -> None:
    v = Verdict(State.STALLED, Reason.WAITING_ON_NETWORK, 840.0)
    text = describe(v, _sample(tcp={"ESTABLISHED": 1}), {100: "ep_poll"})
    assert text == ("sleeping in ep_poll with 1 ESTABLISHED connection to 10.0.0.7:443, "
                    "no progress for 14m")
    spin = describe(Verdict(State.STALLED, Reason.CPU_SPIN, 60), _sample(status="R", cpu=85.0))
    assert spin.startswith("running at 85% CPU") and "no TCP" in spin
    assert "2 child processes" in describe(Verdict(State.STUCK, Reason.NO_ACTIVITY, 400), _sample(children=2))
    assert describe(Verdict(State.STUCK, Reason.NO_ACTIVITY, 400), None) == "stuck (no_activity), no progress for 6m40s"


def test_describe_says_the_announced_retry() -> None:
    """An announced retry: the attempt and when it starts, as the classifier put it in the evidence."""
    evidence = {"retry": {"attempt": 6, "max_retries": 10, "next_in_s": 17.8, "text": "attempt 6/10, next in 18 s"}}
    v = Verdict(State.STALLED, Reason.API_RETRYING, 185.0, evidence)
    assert describe(v, _sample(), {100: "ep_poll"}) == (
        "sleeping in ep_poll with no TCP connections, API retry (attempt 6/10, next in 18 s), no progress for 3m05s")
    assert describe(v, None) == "stalled (api_retrying), API retry (attempt 6/10, next in 18 s), no progress for 3m05s"
    bare = Verdict(State.STALLED, Reason.API_RETRYING, 40.0)
    assert describe(bare, _sample()) == "sleeping with no TCP connections, API retry, no progress for 40s"
    # An attempt sitting on its connection is waiting on the network: the retry is said too.
    waiting = Verdict(State.STALLED, Reason.WAITING_ON_NETWORK, 400.0, evidence)
    assert describe(waiting, _sample(tcp={"ESTABLISHED": 1})) == (
        "sleeping with 1 ESTABLISHED connection to 10.0.0.7:443, API retry (attempt 6/10, next in 18 s), "
        "no progress for 6m40s")
    assert "retry" not in describe(Verdict(State.STALLED, Reason.WAITING_ON_NETWORK, 40.0), _sample())


def test_report_summary_of_a_retrying_session() -> None:
    evidence = {"retry": {"attempt": 2, "max_retries": 10, "next_in_s": -40.0, "text": "attempt 2/10 started 40 s ago"},
                "detail": "attempt 2/10 started 40 s ago"}
    report = build_report(_snap(State.STALLED, Reason.API_RETRYING, evidence=evidence), _sample(), Activity(),
                          repeat=0, next_in_s=60.0)
    assert "API retry (attempt 2/10 started 40 s ago)" in report["summary"]
    assert report["evidence"]["detail"] == "attempt 2/10 started 40 s ago"


def _snap(state: State = State.STUCK, reason: Reason = Reason.NO_ACTIVITY, **kw: object) -> SessionSnapshot:
    base: dict[str, object] = dict(session_id="s1", agent="claude-code", pid=100, state=state, reason=reason,
                                   state_since=900.0, last_event_time=500.0, last_event_age_s=500.0,
                                   silence_s=500.0, cpu_percent=0.0, rss_bytes=1 << 20, open_fds=12, threads=4,
                                   tcp={}, started_at=100.0, events=7)
    base.update(kw)
    return SessionSnapshot(**base)  # type: ignore[arg-type]


def test_report_carries_evidence_and_recent_events() -> None:
    activity = Activity().apply(Event(time=1.0, type="assistant")).apply(
        Event(time=2.0, type="tool_use", tool="Bash", tool_id="t1", tool_call="open"))
    report = build_report(_snap(), _sample(children=1), activity, repeat=2, next_in_s=240.0,
                          wchans={100: "do_select", 101: "pipe_read"}, stderr_tail="boom\n")
    assert report["event"] == "session.stuck" and report["repeat"] == 2
    assert report["root"]["wchan"] == "do_select" and report["children"][0]["wchan"] == "pipe_read"
    assert report["open_tools"][0]["tool"] == "Bash"
    assert [e["type"] for e in report["recent_events"]] == ["assistant", "tool_use"]
    assert report["stderr_tail"] == "boom\n" and report["next_report_in_s"] == 240.0


def test_summary() -> None:
    line = session_summary(_snap(State.EXITED, Reason.PROCESS_EXITED), ended_at=1300.0, longest_silence_s=512.3,
                           stalls=2, recoveries=1)
    assert line == {"event": "session.end", "session_id": "s1", "agent": "claude-code", "pid": 100,
                    "name": None, "cwd": None, "user": None, "runtime": None, "who": "s1 claude-code pid 100",
                    "duration_s": 1200.0, "final_state": "exited", "final_reason": "process_exited", "events": 7,
                    "malformed": 0, "longest_silence_s": 512.3, "stalls": 2, "recoveries": 1}


def test_reports_and_the_end_line_name_the_session_as_a_person_knows_it() -> None:
    snap = _snap(name="work-0b", cwd="/home/alice/app", user="alice", runtime=Runtime("tmux", "work:0.1"))
    report = build_report(snap, _sample(), Activity(), repeat=0, next_in_s=60.0)
    assert report["name"] == "work-0b" and report["cwd"] == "/home/alice/app" and report["user"] == "alice"
    assert report["runtime"] == {"kind": "tmux", "target": "work:0.1"}
    assert report["who"] == '"work-0b" claude-code pid 100 of alice in /home/alice/app, tmux work:0.1'
    end = session_summary(replace(snap, state=State.EXITED), ended_at=1300.0, longest_silence_s=1.0,
                          stalls=0, recoveries=0)
    assert end["who"] == report["who"] and end["name"] == "work-0b"
    # A runtime that knows how to reach its pane says so (another branch adds `attach`).
    api = {**snap.to_json(), "runtime": {"kind": "tmux", "target": "w:1.0",
                                         "attach": "tmux -S /tmp/tmux-1000/default attach -t w:1.0"}}
    assert who(api).endswith("tmux w:1.0 (attach: tmux -S /tmp/tmux-1000/default attach -t w:1.0)")
    assert who({"session_id": "s9", "agent": "codex"}) == "s9 codex"


def test_status_table() -> None:
    rows = [_snap(tcp={"ESTABLISHED": 2}).to_json(),
            _snap(State.EXITED, Reason.PROCESS_EXITED, session_id="s0").to_json()]
    text = format_table(rows, now=1000.0)
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["SESSION", "NAME", "AGENT", "PID", "USER"]
    assert lines[1].split()[0] == "s1" and "2EST" in lines[1] and "8m20s" in lines[1]  # exited sorts last
    assert lines[2].split()[0] == "s0"
    assert format_table([], 0).endswith("(no sessions)")
    assert "\x1b[31;1m" in format_table(rows, 1000.0, color=True)
