"""Telemetry's JSON log lines (telemetry/logs.py): one line per report and summary,
reserved keys kept, a closed stream never raises. The standard library's
logging joining them is in test_log_handler.py.
"""

from __future__ import annotations

import io

from otelwatch.config import Config
from otelwatch.model import Reason, State
from otelwatch.telemetry import Telemetry
from tests.support.telemetry_support import logs_of, snap


def test_report_and_summary_are_one_json_line_each(tel: Telemetry) -> None:
    s = snap("s1", State.STUCK, Reason.NO_ACTIVITY, silence_s=901.5)
    tel.on_report(s, {"fingerprint": "abc", "processes": [{"pid": 1, "wchan": "ep_poll"}],
                      "time": 5})
    tel.on_session_end(s, {"duration_s": 1000.0, "stalls": 2, "recoveries": 0})
    tel.log("started", {"version": "0.1.0", "nan": float("nan")}, level="debug")
    lines = logs_of(tel)
    assert [line["event"] for line in lines] == ["session_stuck", "session_summary", "started"]
    report = lines[0]
    assert report["level"] == "warning"
    assert report["session_id"] == "s1" and report["reason"] == "no_activity"
    assert report["silence_s"] == 901.5
    assert report["processes"] == [{"pid": 1, "wchan": "ep_poll"}]
    assert report["field_time"] == 5  # reserved keys are never overwritten
    assert report["time"].endswith("Z")
    assert lines[1]["stalls"] == 2 and lines[1]["agent"] == "claude-code"
    assert lines[2]["level"] == "debug" and lines[2]["nan"] is None


def test_closed_log_stream_never_raises() -> None:
    stream = io.StringIO()
    t = Telemetry(Config(), environ={}, log_stream=stream)
    try:
        stream.close()
        t.log("x", {})
        t.on_report(snap("s1", State.STUCK, Reason.NO_ACTIVITY), {})
        assert t._log.lines_dropped == 2
    finally:
        t.shutdown()
