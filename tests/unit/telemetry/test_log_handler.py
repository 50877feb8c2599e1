"""The standard library's logging joins otelwatch's JSON lines (one log path)."""

from __future__ import annotations

import io
import json
import logging

from otelwatch.telemetry.logs import JsonLog, JsonLogHandler


def test_stdlib_logging_becomes_json_lines_with_levels() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("otelwatch.test_log_handler")
    handler = JsonLogHandler(JsonLog(stream), logging.DEBUG)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        logger.debug("probe %d", 7)
        logger.warning("registry file %s skipped", "x.json")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("worker failed")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["level"], r["message"]) for r in lines] == [
        ("debug", "probe 7"), ("warning", "registry file x.json skipped"), ("error", "worker failed")]
    assert all(r["event"] == "log" and r["logger"] == "otelwatch.test_log_handler" for r in lines)
    assert "ValueError: boom" in lines[2]["exception"]
