"""A spinning process is spinning however little CPU it gets: the cpu_spin rule reads
demand (time on a CPU plus time runnable on a run queue, /proc/PID/schedstat), not usage,
for a process that never went to sleep; one that sleeps between rounds is no loop.

Real busy loops pinned to two CPUs with other busy loops, sampled by the real probe
(both backends: /proc, and psutil, which reads the same run-queue wait on Linux),
classified by the real classifier: three spinners on two cores (each gets two thirds or
less), then two more burners at a lower nice level than the spinners (the spinner gets
well under the 50% spin bar). A sleeper beside them never reads cpu_spin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from otelwatch.classify.rules import classify
from otelwatch.config import ClassifyConfig
from otelwatch.events.activity import Activity
from otelwatch.model import Mode, Reason, SessionInfo, State, TreeSample
from otelwatch.probe.prober import Prober
from otelwatch.probe.proctable import ProcessTableReader
from otelwatch.probe.psutil_backend import PsutilProber, PsutilTableReader

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="no schedstat on this kernel")

CFG = ClassifyConfig(startup_grace=0.0, stall_after=2.0, cpu_idle_percent=1.0, cpu_spin_percent=50.0)
INTERVAL = 0.25
SAMPLES = 14  # 3.25 s: past stall_after with a full window behind it
# Two CPUs of ours: the contention is the same on a 2-core runner and a 64-core box.
CPUS = set(sorted(os.sched_getaffinity(0))[:2])
LOOP = "while True: pass"
# Work for 4 ms, sleep for 0.5 ms: a timer-driven process that a busy host keeps waiting.
TICKER = ("import time\n"
          "while True:\n"
          "    t = time.perf_counter()\n"
          "    while time.perf_counter() - t < 0.004:\n"
          "        pass\n"
          "    time.sleep(0.0005)\n")


class Procs:
    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], nice: int = 0) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv)
        self.started.append(proc)
        os.sched_setaffinity(proc.pid, CPUS)
        if nice:
            os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
        return proc

    def loop(self, nice: int = 0) -> subprocess.Popen[bytes]:
        return self.start([sys.executable, "-c", LOOP], nice)


Backend = tuple[type[ProcessTableReader], type[Prober]]  # (table reader, prober)
BACKENDS: dict[str, Backend] = {
    "procfs": (ProcessTableReader, Prober),
    "psutil": (PsutilTableReader, PsutilProber),
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        for proc in p.started:
            proc.kill()
        for proc in p.started:
            proc.wait()


def watch(targets: dict[str, int], backend: Backend) -> dict[str, list[TreeSample]]:
    """SAMPLES tree samples of each target, INTERVAL apart, by the real probe."""
    reader, prober = backend[0](), backend[1]()
    out: dict[str, list[TreeSample]] = {sid: [] for sid in targets}
    try:
        for _ in range(SAMPLES):
            for sid, sample in prober.sample(reader.read(), targets, 5.0).items():
                out[sid].append(sample)
            time.sleep(INTERVAL)
    finally:
        prober.shutdown()
    return out


def verdict(samples: list[TreeSample]) -> tuple[State, Reason, float, float]:
    """(state, reason, mean usage %, mean demand %) of a headless session silent since
    its first sample."""
    start = samples[0].time
    info = SessionInfo(mode=Mode.HEADLESS, started_at=start, has_event_source=True)
    v = classify(CFG, info, samples, Activity(), samples[-1].time, start)
    rated = [s for s in samples if s.cpu_percent is not None]
    usage = sum(s.cpu_percent or 0.0 for s in rated) / max(1, len(rated))
    demand = sum(s.cpu_demand_percent or 0.0 for s in rated) / max(1, len(rated))
    print(f"{v.state}/{v.reason}: usage {usage:.1f}%, demand {demand:.1f}%")  # figures for the record
    return v.state, v.reason, usage, demand


def test_three_spinners_on_two_cores_each_read_cpu_spin(procs: Procs, backend: Backend) -> None:
    spinners = [procs.loop() for _ in range(3)]
    sleeper = procs.start(["sleep", "60"])
    got = watch({"spin": spinners[0].pid, "sleeper": sleeper.pid}, backend)
    state, reason, usage, demand = verdict(got["spin"])
    assert (state, reason) == (State.STALLED, Reason.CPU_SPIN), (usage, demand)
    assert usage < 80.0 < demand  # two cores, three loops: nobody gets a whole one
    assert all(s.cpu_demand_percent is not None for s in got["spin"][1:])
    assert verdict(got["sleeper"])[1] is not Reason.CPU_SPIN


def test_a_spinner_starved_under_the_spin_bar_still_reads_cpu_spin(procs: Procs, backend: Backend) -> None:
    """Two burners at a lower nice level than the three spinners (weights 1024 against
    335 each): the spinner gets about a fifth of a core, and wants all of it.

    Beside it, at the spinners' nice level, a ticker: 4 ms of work, then half a
    millisecond asleep, again and again. Starved the same way it is runnable nearly all
    the time too (96% demand at 17% usage when measured), as the real Gemini CLI and
    opencode TUIs were while drawing a spinner on a loaded 2-core box (90-137% demand at
    15-25% usage); but it goes to sleep of its own accord between rounds (about 55 times
    a second), which a loop never does: not a spin."""
    spinners = [procs.loop(nice=5) for _ in range(3)]
    for _ in range(2):
        procs.loop(nice=0)
    ticker = procs.start([sys.executable, "-c", TICKER], nice=5)
    sleeper = procs.start(["sleep", "60"])
    got = watch({"spin": spinners[0].pid, "ticker": ticker.pid, "sleeper": sleeper.pid}, backend)
    state, reason, usage, demand = verdict(got["spin"])
    assert usage < CFG.cpu_spin_percent, "not starved: the case this test is for did not happen"
    assert (state, reason) == (State.STALLED, Reason.CPU_SPIN), (usage, demand)
    assert demand > 80.0
    assert got["spin"][-1].awake_since is not None and got["spin"][-1].awake_since <= got["spin"][1].time
    t_state, t_reason, t_usage, t_demand = verdict(got["ticker"])
    assert t_usage < CFG.cpu_spin_percent and t_demand > 80.0, "not starved: the ticker's case did not happen"
    assert (t_state, t_reason) == (State.STALLED, Reason.TOOL_CALL_WITHOUT_PROGRESS), (t_usage, t_demand)
    # It slept in most intervals; one of a quarter second in which it got less than a
    # round's 4 ms of CPU shows no sleep (seen at 9% usage), and proves no loop.
    assert any(s.awake_since is None for s in got["ticker"][1:])
    _, s_reason, _, s_demand = verdict(got["sleeper"])
    assert s_reason is not Reason.CPU_SPIN and s_demand < 5.0
