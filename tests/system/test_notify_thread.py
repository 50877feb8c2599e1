"""Notifications people keep on: one thread per incident (open, repeats, one all-clear), the
settled first message, filters by user/agent/directory/state, `otelwatch notify test` and
`check-config`'s notify checks. Pure threading first, then delivery to a real loopback
webhook receiver, then end to end through `otelwatch run` watching a real hung agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otelwatch.config import ConfigError, NotifyConfig, parse_config
from otelwatch.telemetry.notify import Notifier, preflight, summary_text
from otelwatch.telemetry.notify_incidents import Context, Threads, cwd_matches
from tests.support.e2e_support import merge, start_daemon
from tests.support.procs import REPO, wait_for
from tests.system.test_notify import NOTIFY_FAST, Hooks

NAMES = {"name": "work-0b", "cwd": "/home/al/app", "user": "al",
         "runtime": {"kind": "tmux", "target": "work:0.1", "socket": "/tmp/tmux-1000/default",
                     "attach": "tmux -S /tmp/tmux-1000/default attach -t work:0.1"}}


def report(state: str = "stuck", reason: str = "no_activity", sid: str = "s1", repeat: int = 0,
           **extra: Any) -> dict[str, Any]:
    return {"event": f"session.{state}", "session_id": sid, "agent": "claude-code", "pid": None, "state": state,
            "reason": reason, "summary": "sleeping in ep_poll, no progress for 5m", "repeat": repeat,
            **NAMES, **extra}


def change(state: str, sid: str = "s1", previous: str = "stuck") -> dict[str, Any]:
    return {"event": "session.state", "session_id": sid, "agent": "claude-code", "state": state,
            "reason": "recent_progress", "previous": previous}


def threads(**cfg: Any) -> Threads:
    return Threads(NotifyConfig(**cfg), Context(proc=False))  # fake pids: no /proc look-ups


def phases(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["incident"]["phase"], m["incident"]["id"]) for m in messages]


# --------------------------------------------------------------------------- pure


def test_one_incident_one_thread_open_repeat_update_all_clear() -> None:
    t = threads()
    out = t.observe(change("stuck", previous="active"), 0)  # entering is said by the report
    out += t.observe(report(), 0)
    out += t.observe(report(repeat=1), 60)
    out += t.observe(report("stalled", "waiting_on_network"), 90)
    out += t.observe(report("stalled", "waiting_on_network", repeat=1), 150)
    out += t.observe(change("active", previous="stalled"), 200)
    assert phases(out) == [("open", "s1#1"), ("repeat", "s1#1"), ("update", "s1#1"), ("repeat", "s1#1"),
                           ("resolved", "s1#1")]
    clear = out[-1]
    assert clear["incident"]["resolution"] == "back to active" and clear["incident"]["duration_s"] == 200
    assert clear["incident"]["first_state"] == "stuck" and clear["name"] == "work-0b"  # names carried over
    assert [m["incident"]["message"] for m in out] == [1, 2, 3, 4, 5]
    # The next stall is a new incident, in a new thread.
    assert phases(t.observe(report(), 300)) == [("open", "s1#2")]
    assert phases(t.observe(change("exited"), 310)) == [("resolved", "s1#2")]
    assert t.open_incidents() == 0


def test_first_message_waits_for_a_settled_reason_bounded() -> None:
    t = threads(settle=30)
    # insufficient_samples, then stuck 2 s later: one message, the settled one.
    assert t.observe(report("stalled", "insufficient_samples"), 0) == []
    assert t.next_deadline() == 30
    out = t.observe(report(), 2)
    assert phases(out) == [("open", "s1#1")] and out[0]["reason"] == "no_activity"
    assert t.due(100) == [] and t.next_deadline() is None
    # A flap that ends before it settles reaches nobody: no open, no all-clear.
    t2 = threads(settle=30)
    assert t2.observe(report("stalled", "insufficient_samples"), 0) == []
    assert t2.observe(change("active", previous="stalled"), 5) == [] and t2.due(100) == []
    # Still unsettled at the deadline: sent as it is, saying so.
    t3 = threads(settle=30)
    t3.observe(report("stalled", "insufficient_samples"), 0)
    assert t3.due(29.9) == []
    [held] = t3.due(30)
    assert held["reason"] == "insufficient_samples" and held["unsettled_after_s"] == 30
    assert phases(t3.observe(report(), 40)) == [("update", "s1#1")]
    # settle = 0: no hold at all.
    assert phases(threads(settle=0).observe(report("stalled", "insufficient_samples"), 0)) == [("open", "s1#1")]


def test_recovery_by_otelwatch_is_the_all_clear_and_exit_adds_nothing() -> None:
    t = threads()
    t.observe(report(), 0)
    req = {"event": "recovery.requested", "session_id": "s1", "agent": "claude-code", "pid": 9, "step": "requested"}
    assert phases(t.observe(req, 900)) == [("recovery", "s1#1")]
    done = {**req, "event": "recovery.completed", "step": "completed", "status": "terminated"}
    [clear] = t.observe(done, 911)
    assert clear["incident"]["phase"] == "resolved"
    assert clear["incident"]["resolution"] == "recovered by otelwatch (terminated)"
    assert t.observe(change("exited"), 912) == []
    end = {"event": "session.end", "session_id": "s1", "agent": "claude-code", "final_state": "exited"}
    assert t.observe(end, 912) == []
    # A dry run ends nothing: the incident goes on.
    t2 = threads()
    t2.observe(report(), 0)
    assert phases(t2.observe({**done, "status": "dry_run"}, 900)) == [("recovery", "s1#1")]
    assert t2.open_incidents() == 1


def test_untracked_session_and_all_clear_off() -> None:
    t = threads(session_end=True)
    t.observe(report(), 0)
    end = {"event": "session.end", "session_id": "s1", "agent": "claude-code", "final_state": "stuck"}
    out = t.observe(end, 5)
    assert out[0]["incident"]["resolution"] == "no longer tracked" and out[1]["event"] == "session.end"
    quiet = threads(all_clear=False)
    quiet.observe(report(), 0)
    assert quiet.observe(change("active"), 5) == []


def test_a_state_below_stalled_that_is_asked_for_is_said_once() -> None:
    t = threads(min_state="idle")
    assert [m["state"] for m in t.observe(change("idle", previous="active"), 0)] == ["idle"]
    t.observe(report(), 10)
    out = t.observe(change("idle"), 20)
    assert phases(out) == [("resolved", "s1#1")]  # the all-clear, not also "now idle"


@pytest.mark.parametrize("cfg, names, passes", [
    ({"users": ("al",)}, {}, True),
    ({"users": ("bob",)}, {}, False),
    ({"users": ("al",)}, {"user": None}, False),  # an owner we cannot tell is not one of them
    ({"agents": ("codex",)}, {}, False),
    ({"cwd": ("/home/al",)}, {}, True),
    ({"cwd": ("/home/al/",)}, {}, True),
    ({"cwd": ("/home/a",)}, {}, False),  # a prefix on a path boundary, not of the text
    ({"cwd": ("/home/*/app",)}, {}, True),
    ({"cwd": ("*/scratch*",)}, {}, False),
    ({"cwd": ("/srv",)}, {"cwd": None}, False),
    ({"states": ("stalled",)}, {}, False),
    ({"states": ("stuck",)}, {}, True),
    ({"min_state": "stuck"}, {}, True),
    ({"reasons": ("waiting_on_network",)}, {}, False),
])
def test_filters(cfg: dict[str, Any], names: dict[str, Any], passes: bool) -> None:
    t = threads(**cfg)
    r = {**report(), **names}
    out = t.observe(r, 0) + t.observe(change("active"), 5)
    assert phases(out) == ([("open", "s1#1"), ("resolved", "s1#1")] if passes else [])


def test_cwd_matches() -> None:
    assert cwd_matches("/home/al/app", ("/",)) and cwd_matches("/home/al", ("/home/al",))
    assert not cwd_matches("/home/alice", ("/home/al",)) and cwd_matches("/x/scratch-1/y", ("*/scratch*",))


def test_new_config_keys_are_validated() -> None:
    cfg = parse_config({"notify": {"users": ["al"], "cwd": ["/home/al", "*/w*"], "states": ["stuck"],
                                   "settle": "2m", "all_clear": False}}).notify
    assert (cfg.users, cfg.cwd, cfg.states, cfg.settle, cfg.all_clear) == (("al",), ("/home/al", "*/w*"),
                                                                           ("stuck",), 120.0, False)
    for bad, key in [({"cwd": ["relative/dir"]}, "notify.cwd[0]"), ({"states": ["hung"]}, "notify.states[0]"),
                     ({"states": ["stuck"], "min_state": "stalled"}, "notify.states"),
                     ({"settle": -1}, "notify.settle"), ({"command": ["x", "{pane}"]}, "notify.command[1]")]:
        with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
            parse_config({"notify": bad})


def test_text_names_the_session_its_directory_and_how_to_attach() -> None:
    t = threads()
    [opened] = t.observe(report(), 0)
    text = summary_text(opened, "box")
    head, where = text.split("\n")
    assert head.startswith('otelwatch on box: OPEN: "work-0b" (claude-code, al) is stuck/no_activity: sleeping')
    assert "[incident s1#1, message 1]" in head
    assert where == ("dir /home/al/app · tmux work:0.1 (attach: tmux -S /tmp/tmux-1000/default attach -t work:0.1)"
                     " · session s1")
    [clear] = t.observe(change("active"), 125)
    assert summary_text(clear, "box").startswith(
        'otelwatch on box: ALL CLEAR: "work-0b" (claude-code, al) back to active after 2m05s (incident s1#1, '
        "was stuck/no_activity)")


# --------------------------------------------------------------------------- delivery


@pytest.fixture
def receiver() -> Iterator[Hooks]:
    h = Hooks()
    try:
        yield h
    finally:
        h.close()


def test_held_first_message_is_released_by_the_timer(receiver: Hooks) -> None:
    n = Notifier(NotifyConfig(webhook=receiver.url, settle=0.3), log=lambda *a: None, proc_context=False)
    try:
        t0 = time.monotonic()
        n.submit(report("stalled", "insufficient_samples"))
        wait_for(lambda: receiver.posts, timeout=5, interval=0.02)
        waited = receiver.posts[0][0] - t0
    finally:
        n.shutdown(1.0)
    body = receiver.posts[0][2]
    assert 0.25 <= waited < 3.0, waited
    assert body["incident"]["phase"] == "open" and body["report"]["unsettled_after_s"] == 0.3
    assert "not settled after 0s" in body["text"] or "not settled after" in body["text"]


def test_notify_test_says_what_happened_per_channel(receiver: Hooks, tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'[notify]\ncommand = ["{sys.executable}", "-c", "import sys; sys.stdin.read()"]\n'
                    f'webhook = "{receiver.url}"\nheaders = {{ Authorization = "Bearer ${{HOP_TEST_TOKEN}}" }}\n')
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOP_TEST_TOKEN": "tok-123"}
    r = subprocess.run([sys.executable, "-m", "otelwatch", "notify", "test", "--config", str(good)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "command " in r.stdout and ": ok: ran, exit status 0" in r.stdout
    assert f"webhook http://127.0.0.1:{receiver.server.server_address[1]}/...: ok: delivered (HTTP 200)" in r.stdout
    assert "2 of 2 channel(s) delivered" in r.stdout and "PATHSECRET" not in r.stdout
    [(_, headers, body)] = receiver.posts
    assert headers["Authorization"] == "Bearer tok-123" and body["incident"]["phase"] == "test"
    assert body["text"].startswith("otelwatch on ") and "TEST" in body["text"] and "dir " in body["text"]

    bad = tmp_path / "bad.toml"
    bad.write_text(f'[notify]\ncommand = ["{sys.executable}", "-c", "import sys; sys.exit(3)"]\n'
                   f'webhook = "{receiver.url}"\n')
    r = subprocess.run([sys.executable, "-m", "otelwatch", "notify", "test", "--config", str(bad)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False)
    assert r.returncode == 1 and ": FAILED: " in r.stdout and "exited with 3" in r.stdout
    assert ": ok: delivered (HTTP 200)" in r.stdout and "1 of 2 channel(s) delivered" in r.stdout

    none = tmp_path / "none.toml"
    none.write_text("interval = 5\n")
    r = subprocess.run([sys.executable, "-m", "otelwatch", "notify", "test", "--config", str(none)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False)
    assert r.returncode == 1 and "no notification channel configured" in r.stdout


def test_check_config_resolves_the_command_and_every_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[notify]\ncommand = ["hop-no-such-notifier", "{session_id}"]\n'
                   'webhook = "http://127.0.0.1:9/x"\n'
                   'headers = { Authorization = "Bearer ${HOP_UNSET_A}", X-Team = "${HOP_UNSET_B}-${HOME}" }\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOP_UNSET")}
    r = subprocess.run([sys.executable, "-m", "otelwatch", "check-config", str(cfg)], capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=60, check=False)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[0].startswith("otelwatch: config error: notify.command[0]: 'hop-no-such-notifier' not found on PATH")
    assert lines[1:] == ["otelwatch: config error: notify.headers.Authorization: environment variable HOP_UNSET_A "
                         "is not set",
                         "otelwatch: config error: notify.headers.X-Team: environment variable HOP_UNSET_B is not set"]
    # Set, and the program found: ok.
    assert preflight(NotifyConfig(command=("sh",), headers={"A": "${HOP_SET}"}), {"PATH": "/bin:/usr/bin",
                                                                                  "HOP_SET": "1"}) == []
    assert preflight(NotifyConfig(command=(str(cfg),)), {}) == [f"notify.command[0]: {str(cfg)!r} is not executable"]


# --------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_a_whole_incident_through_the_daemon_to_a_webhook(tmp_path: Path, receiver: Hooks) -> None:
    """A real hung agent under `otelwatch run`: its incident opens (settled), repeats on the
    backoff and gets one all-clear when the agent makes progress; the next one ends by exit.
    A second agent, found only once it has been silent for longer than stall_after (where the
    daemon may say insufficient_samples before it says stuck), opens with a settled verdict."""
    d = start_daemon(tmp_path, merge(NOTIFY_FAST, {"notify": {"webhook": receiver.url, "settle": 5,
                                                               "timeout": 2, "retries": 1}}))
    try:
        t0 = time.monotonic()
        proc, events = d.agent("hung")
        d.register("hung-1", proc.pid, agent="fake-hung", events_path=str(events))
        late, late_events = d.agent("hung")  # registered only after it is already silent

        def mine() -> list[dict[str, Any]]:
            return [p[2] for p in receiver.posts if p[2]["report"].get("session_id") == "hung-1"]

        wait_for(lambda: len(mine()) >= 3, timeout=20, interval=0.05)  # open, then two repeats
        assert time.monotonic() - t0 > 2 + 1  # the late agent has been silent for over stall_after
        d.register("fresh-1", late.pid, agent="fake-hung", events_path=str(late_events))
        with open(events, "a") as fh:  # the agent moves again: one assistant line
            fh.write(json.dumps({"type": "assistant", "message": {"content": [{"type": "text", "text": "ok"}]}})
                     + "\n")
        wait_for(lambda: any(m["incident"]["phase"] == "resolved" for m in mine()), timeout=15, interval=0.05)
        wait_for(lambda: any(m["incident"]["id"] == "hung-1#2" for m in mine()), timeout=20, interval=0.05)
        os.killpg(proc.pid, 9)
        wait_for(lambda: any(m["incident"].get("resolution") == "exited" for m in mine()), timeout=15,
                 interval=0.05)
        wait_for(lambda: any(p[2]["report"].get("session_id") == "fresh-1" for p in receiver.posts), timeout=20,
                 interval=0.05)
        log = [(round(p[0] - t0, 2), p[2]) for p in receiver.posts if p[2]["report"].get("session_id") == "hung-1"]
        fresh = [p[2] for p in receiver.posts if p[2]["report"].get("session_id") == "fresh-1"]
        fresh_reports = [(r["state"], r["reason"]) for r in d.log_events()
                         if r.get("event") in ("session_stalled", "session_stuck") and r.get("session_id") == "fresh-1"]
    finally:
        d.cleanup()
    print("\nwebhook receiver log:")
    for t, body in log:
        print(f"  +{t:6.2f}s {body['incident']['id']} {body['incident']['phase']:8} {body['text']!r}")
    first = [b for _, b in log if b["incident"]["id"] == "hung-1#1"]
    kinds = [b["incident"]["phase"] for b in first]
    assert kinds[0] == "open" and kinds[-1] == "resolved" and kinds.count("resolved") == 1
    assert set(kinds[1:-1]) <= {"repeat", "update"} and len(kinds) >= 4
    assert first[0]["report"]["reason"] != "insufficient_samples"  # the settled verdict opens it
    assert first[-1]["incident"]["resolution"] == "back to active"
    assert [b["incident"]["message"] for b in first] == list(range(1, len(first) + 1))
    reports = [r for r in d.log_events() if r.get("event") in ("session_stalled", "session_stuck")
               and r.get("session_id") == "hung-1"]
    unsettled = [r for r in reports if r.get("reason") == "insufficient_samples"]
    print("daemon's reports: " + ", ".join(f"{r['state']}/{r['reason']} (repeat {r['repeat']})" for r in reports))
    # Every report but the unsettled ones became a message of its incident, none twice.
    assert len([b for _, b in log if b["incident"]["phase"] in ("open", "repeat", "update")]) == \
        len(reports) - len(unsettled)
    print(f"fresh hang: the daemon reported {fresh_reports}; the webhook got "
          f"{[(b['incident']['phase'], b['report']['state'], b['report']['reason']) for b in fresh]}")
    assert fresh[0]["incident"]["phase"] == "open" and fresh[0]["report"]["reason"] != "insufficient_samples"
    assert all(b["report"]["reason"] != "insufficient_samples" for b in fresh)
    second = [b["incident"]["phase"] for _, b in log if b["incident"]["id"] == "hung-1#2"]
    assert second[0] == "open" and second[-1] == "resolved" and second.count("resolved") == 1
