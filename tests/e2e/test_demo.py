"""`otelwatch demo`: the dry-run line says what would have been done (signal, process
group and pids, after which gates, on what evidence), and a verdict that has not
arrived is explained instead of a silent "7/8". The words are pure and tested as
such; one real run (a pipe, 30 s) shows both on a loaded host."""

from __future__ import annotations

import os
import subprocess
import sys

from otelwatch.commands.demo import demo_config, dry_run_words, why_not
from tests.support.procs import REPO


def test_dry_run_words_say_signal_group_pids_and_gates() -> None:
    report = {"status": "dry_run", "detail": "would signal pgid 4242 and pids [4242, 4243]; gates: enabled=ok; "
                                             "verdict=ok (stuck); window=ok (8.2 s); owner_allowed=ok"}
    words = dry_run_words(report, 10.0, "stuck for 8.2 s over 8 ticks, tree cpu 0.00%, tcp 0, pids [4242, 4243]")
    assert words.startswith("nothing signalled: would have sent SIGTERM to process group 4242 (pids 4242, 4243), "
                            "then SIGKILL after 10 s")
    assert "after all 4 recovery gates held (stuck for 8.2 s over 8 ticks, tree cpu 0.00%, tcp 0)" in words
    real = dry_run_words({"status": "terminated", "detail": "exited after SIGTERM"}, 10.0)
    assert real == "recovery terminated (exited after SIGTERM)"


def test_why_a_verdict_has_not_arrived(tmp_path: object) -> None:
    cfg = demo_config(tmp_path, "127.0.0.1:0")  # type: ignore[arg-type]
    spin = {"state": "stalled", "reason": "tool_call_without_progress", "cpu_percent": 21.0}
    why = why_not("stalled/cpu_spin", spin, cfg, ticks=20, elapsed=40.0)
    assert "its CPU is 21%" in why and "50% of a core" in why
    assert "ticked 20 times in 40 s" in why  # the loop itself was late: said
    assert "not registered yet" in why_not("stuck", None, cfg, ticks=40, elapsed=40.0)
    starting = why_not("stuck", {"state": "starting", "reason": "startup_grace"}, cfg, ticks=5, elapsed=5.0)
    assert "start-up grace (2 s)" in starting
    fresh = why_not("stuck", {"state": "stalled", "reason": "insufficient_samples"}, cfg, ticks=5, elapsed=5.0)
    assert "not enough samples" in fresh
    assert "it is stalled/waiting_on_network" in why_not("stuck", {"state": "stalled", "reason":
                                                                  "waiting_on_network"}, cfg, ticks=9, elapsed=9.0)


def test_a_real_demo_run_explains_itself() -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-m", "otelwatch", "demo", "--duration", "30", "--listen", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env)
    assert out.returncode == 0, out.stderr
    last = out.stdout.rsplit("SESSION", 1)[1]  # the final frame
    lines = last.splitlines()
    oks = [line for line in lines if line.startswith(("  ok ", "  -- "))]
    assert len(oks) == 8, last  # the outcome is what ends the output
    for miss in (line for line in oks if line.startswith("  -- ")):
        sid = miss.split()[1].rstrip(":")
        assert f"  {sid} is not " in last, last  # and every miss says why
    if "recovery (dry run):" in last:
        assert "would have sent SIGTERM to process group" in last and "recovery gates held" in last, last
