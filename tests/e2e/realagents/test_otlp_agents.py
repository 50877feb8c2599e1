"""The real CLIs' own OpenTelemetry into otelwatch ([sources.otlp]).

Each run: the CLI, its fake API and an in-process otelwatch (`tests.e2e.realagents.otlp_run`)
together in one network namespace; the CLI set up with exactly what `otelwatch
agent-env AGENT` prints. A complete Claude Code turn and a complete Codex turn
count their tokens (and Claude's cost) on the right session, joined by the
session id (= the transcript otelwatch follows) and sent by the session's own
process (own events); a forwarded stream arrives in a real VictoriaMetrics with
its attributes; an upstream that answers only after seconds never delays the
CLI's exit; a Gemini CLI whose API drops every connection is
`stalled/api_retrying` with the attempt numbers of its own records.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from tests.e2e.realagents.harness import (
    FAKE_PORT,
    agents_dir,
    base_env,
    kill_tree,
    launch_in_netns,
    require_real_agents,
    write_codex_config,
)
from tests.support.procs import require_binary

pytestmark = [pytest.mark.real_agents, pytest.mark.timeout(400)]

PROMPT = "otelwatch-realagents otlp: say hello"


def _claude_env(home: Path) -> dict[str, str]:
    return {**base_env(home), "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{FAKE_PORT}",
            "ANTHROPIC_API_KEY": "sk-ant-otelwatch-tests-dummy", "DISABLE_AUTOUPDATER": "1",
            "DISABLE_ERROR_REPORTING": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}


def run(tmp_path: Path, name: str, agent: str, cli: list[str], env: dict[str, str], *, behaviour: str = "normal",
        api: str = "anthropic", extra: tuple[str, ...] = (), timeout: float = 300,
        stream_seconds: float = 0.0) -> dict[str, Any]:
    """One CLI run under `tests.e2e.realagents.otlp_run` in its own network namespace; its result JSON."""
    work = tmp_path / name
    (work / "cwd").mkdir(parents=True, exist_ok=True)
    (work / "state").mkdir(mode=0o700, exist_ok=True)
    out = work / "result.json"
    server = ["--api", api, "--behaviour", behaviour, "--port", str(FAKE_PORT), "--tool-command", "true",
              "--stream-seconds", str(stream_seconds), "--log", str(work / "api.log")]
    argv = [sys.executable, "-m", "tests.e2e.realagents.otlp_run", "--agent", agent, "--out", str(out),
            "--home", env["HOME"], "--state", str(work / "state"), *extra, "--", *cli]
    proc = launch_in_netns(argv, server_args=server, env=env, cwd=work / "cwd", stderr_path=work / "stderr",
                           info_path=work / "info.json")
    try:
        proc.communicate(timeout=timeout)
    finally:
        kill_tree(proc.pid)
    if not out.exists():
        raise AssertionError(f"{name}: no result; stderr: {(work / 'stderr').read_text(errors='replace')[-3000:]}")
    return dict(json.loads(out.read_text()))


def _session(result: dict[str, Any], agent: str) -> dict[str, Any]:
    mine = {r["session_id"] for r in result["rows"] if r["mine"]}
    found = [s for s in result["sessions"] if s["agent"].startswith(agent) and s.get("usage")
             and s["session_id"] in mine]
    assert found, f"no {agent} session with usage: {json.dumps(result['sessions'])[:3000]} stats {result['stats']}"
    return found[0]


@pytest.fixture(scope="module")
def clis() -> Iterator[Any]:
    yield require_real_agents()


def test_a_claude_turn_counts_its_tokens_and_cost_and_arrives_in_victoria_metrics(tmp_path: Path, clis: Any) -> None:
    vm = require_binary("victoria-metrics")
    home = tmp_path / "home"
    home.mkdir()
    # VictoriaMetrics takes cumulative sums only (Claude Code's default is delta): the agent's own setting.
    env = {**_claude_env(home), "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "cumulative"}
    # The answer streams for 3 s, so that the daemon (ticking every 0.5 s on a loaded host)
    # sees the process before it exits: a turn of one second can end unseen.
    result = run(tmp_path, "claude", "claude", [clis.claude, "-p", PROMPT, "--output-format", "stream-json",
                                                "--verbose"], env, extra=("--vm", vm), stream_seconds=3)
    assert result["rc"] == 0, result.get("stdout_tail")
    s = _session(result, "claude")
    # The fake API answers 12 input and 9 output tokens (its message_start and message_delta);
    # the CLI prices them itself.
    u = s["usage"]
    assert (u["input_tokens"], u["output_tokens"], u["api_requests"], u["api_errors"]) == (12, 9, 1, 0), u
    assert u["cost_usd"] > 0 and u["model"]
    result_line = [json.loads(line) for line in result["stdout_tail"].splitlines()
                   if line.startswith("{") and '"type":"result"' in line]
    assert result_line and u["cost_usd"] == pytest.approx(result_line[-1]["total_cost_usd"])
    # Joined by the session id (the transcript's id), sent by the session's own process.
    assert s["session_id"] == result_line[-1]["session_id"] or any(
        r["session_id"] == s["session_id"] for r in result["rows"])
    # (Its events are in recent_events only while it runs: a 1 s turn may end before they come.)
    assert result["stats"]["own"] == result["stats"]["records"] > 0, result["stats"]
    assert result["stats"]["observed"] == result["stats"]["unjoined"] == 0
    # Forwarded unchanged: the CLI's metrics are in VictoriaMetrics, with their attributes.
    names = {m["__name__"] for m in result["vm_series"]}
    assert any(n.startswith("claude_code_token_usage") for n in names), names
    assert any(m.get("session_id") == result_line[-1]["session_id"] for m in result["vm_series"])
    # VictoriaMetrics takes OTLP metrics (its logs endpoint is VictoriaLogs'): they all went through.
    assert "metrics" not in result["stats"]["forward"]["failed_by_signal"], result["stats"]


def test_a_codex_turn_counts_its_tokens(tmp_path: Path, clis: Any) -> None:
    home = tmp_path / "home"
    write_codex_config(home / ".codex")
    env = {**base_env(home), "OTELWATCH_FAKE_KEY": "sk-otelwatch-tests-dummy"}
    # The answer streams for 4 s, so that the daemon (ticking every 0.5 s on a loaded host) sees
    # the CLI as a session before it exits; Codex batches its logs 1.4-10 s.
    result = run(tmp_path, "codex", "codex",
                 ["node", clis.codex, "exec", "--json", "--skip-git-repo-check", PROMPT], env, api="openai",
                 extra=("--sink", "--after", "12"), stream_seconds=4)
    assert result["rc"] == 0, result.get("stdout_tail")
    s = _session(result, "codex")
    u = s["usage"]
    assert (u["input_tokens"], u["output_tokens"], u["api_requests"]) == (12, 9, 1), u
    assert u["model"] == "fake-model"
    # Every log body forwarded as it came (protobuf), with the conversation id intact.
    logs = [bytes.fromhex(body) for path, ctype, body in result["sink"] if path == "/v1/logs"]
    got = ExportLogsServiceRequest()
    for body in logs:
        got.MergeFromString(body)
    conv = {kv.value.string_value for rl in got.resource_logs for sl in rl.scope_logs for lr in sl.log_records
            for kv in lr.attributes if kv.key == "conversation.id"}
    assert len(conv) == 1 and result["stats"]["records"] >= sum(
        len(sl.log_records) for rl in got.resource_logs for sl in rl.scope_logs)


def test_a_slow_upstream_never_delays_the_clis_exit(tmp_path: Path, clis: Any) -> None:
    """Codex's own exporter waits on a slow collector (1.5 s -> 22 s, REAL_AGENTS.md); with
    otelwatch in the path, forwarding to an upstream that answers after 20 s, it must not."""
    exits = {}
    for name, extra in (("fast", ("--sink", "--after", "1")), ("slow", ("--slow-sink", "20", "--after", "1"))):
        home = tmp_path / f"home-{name}"
        write_codex_config(home / ".codex")
        env = {**base_env(home), "OTELWATCH_FAKE_KEY": "sk-otelwatch-tests-dummy"}
        result = run(tmp_path, f"codex-{name}", "codex",
                     ["node", clis.codex, "exec", "--json", "--skip-git-repo-check", PROMPT], env, api="openai",
                     extra=extra)
        assert result["rc"] == 0
        exits[name] = result["elapsed_s"]
    print(f"codex exec exit via otelwatch: upstream answering at once {exits['fast']:.2f} s, "
          f"after 20 s {exits['slow']:.2f} s")
    assert exits["slow"] < min(exits["fast"] + 3.0, 10.0), exits  # its own exporter alone: 22 s


def _gemini() -> str:
    path = agents_dir() / "bin" / "gemini"
    if not path.exists():
        path = agents_dir() / "gemini-cli" / "node_modules" / ".bin" / "gemini"
    if not path.exists() or shutil.which("node") is None:
        pytest.skip(f"Gemini CLI not installed at {path} (scripts/install-real-agents)")
    return str(path)


def test_a_gemini_drop_run_is_api_retrying_with_its_own_attempt_numbers(tmp_path: Path, clis: Any) -> None:
    gemini = _gemini()
    home = tmp_path / "home"
    (home / ".gemini").mkdir(parents=True)
    (home / ".gemini" / "settings.json").write_text('{"security":{"auth":{"selectedType":"gemini-api-key"}}}')
    env = {**base_env(home), "GOOGLE_GEMINI_BASE_URL": f"http://127.0.0.1:{FAKE_PORT}", "GEMINI_API_KEY": "dummy",
           "GEMINI_CLI_TRUST_WORKSPACE": "true"}
    # The fake drops every connection: Gemini reports each failed attempt and announces each
    # retry (attempt N/5, its delay) in its telemetry, about 5 s late (its log batching). The
    # run is cut at 95 s (Gemini itself gives up after about 5 minutes).
    result = run(tmp_path, "gemini", "gemini", [gemini, "-p", PROMPT, "-o", "stream-json"], env, behaviour="drop",
                 extra=("--stall-after", "30", "--after", "2", "--max-s", "95"), timeout=300)
    rows = [r for r in result["rows"] if r["agent"].startswith("gemini") and r["mine"]]
    retrying = [r for r in rows if (r["state"], r["reason"]) == ("stalled", "api_retrying")]
    assert retrying, [(r["state"], r["reason"]) for r in rows][-40:]
    attempts = sorted({a for r in retrying for a, most, _ in r["retries"] if a is not None and most == 5})
    assert len(attempts) >= 2 and attempts[0] >= 1, attempts
    assert not [r for r in rows if r["state"] == "stuck"], "a retrying Gemini is never stuck"
    assert any(r["usage"] and r["usage"]["api_errors"] >= 2 for r in rows)
    # Sent by Gemini's own process (its tree is the session's): own events.
    assert any(r["otlp_sources"] == ["otlp"] for r in retrying), retrying[-3:]
    print(f"gemini drop: api_retrying with attempts {attempts}; exit {result['rc']} after {result['elapsed_s']:.1f} s")

