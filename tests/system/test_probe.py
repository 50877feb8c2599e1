"""Prober against real processes: CPU rates, TCP, FDs, trees, zombies, exits, PID reuse, hangs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from otelwatch.model import ProcessIdentity, SampleStatus, TreeSample
from otelwatch.probe.prober import Prober
from otelwatch.probe.procfs import read_wchan
from otelwatch.probe.proctable import ProcessTable, ProcessTableReader
from tests.support.procs import REPO, Spawner, TcpServer, listener_in_own_netns, wait_for

FAKE = [sys.executable, "-m", "otelwatch.fake_agents"]


@pytest.fixture
def reader() -> ProcessTableReader:
    return ProcessTableReader()


@pytest.fixture
def prober() -> Iterator[Prober]:
    p = Prober(max_workers=4)
    try:
        yield p
    finally:
        p.shutdown()


def one(prober: Prober, reader: ProcessTableReader, target: ProcessIdentity | int,
        timeout: float = 5.0) -> TreeSample:
    return prober.sample(reader.read(), {"s": target}, timeout)["s"]


def test_cpu_busy_loop_and_sleeper(
    spawn: Spawner, prober: Prober, reader: ProcessTableReader,
) -> None:
    busy, sleeper = spawn("busy"), spawn("sleeper")
    # The sleeper's interpreter start-up is work: measure it once it sleeps.
    wait_for(lambda: "sleep" in (read_wchan(sleeper.pid) or ""), timeout=10)
    targets = {"busy": busy.pid, "sleeper": sleeper.pid}
    first = prober.sample(reader.read(), targets, 5.0)
    assert first["busy"].status is SampleStatus.OK
    # First sight: no rate yet, and never a made-up 0.0.
    assert first["busy"].cpu_percent is None and first["sleeper"].cpu_percent is None
    assert first["busy"].processes[0].cpu_percent is None
    time.sleep(1.0)
    second = prober.sample(reader.read(), targets, 5.0)
    busy_cpu, busy_demand = second["busy"].cpu_percent, second["busy"].cpu_demand_percent
    # On a loaded host the loop gets what the scheduler gives it (7% was seen with load
    # 10 on 2 cores), but it wants a whole core all the time: its demand says so.
    assert busy_cpu is not None and busy_demand is not None
    assert 50.0 < busy_demand < 150.0  # one thread cannot want more than one core
    assert 0.0 < busy_cpu <= busy_demand + 1.0
    assert second["sleeper"].cpu_percent is not None and second["sleeper"].cpu_percent < 5.0
    assert second["sleeper"].cpu_demand_percent is not None and second["sleeper"].cpu_demand_percent < 5.0
    # A loop never goes to sleep of its own accord; a sleeper does (and costs no read).
    assert first["busy"].awake_since is None  # nothing to compare with yet
    assert second["busy"].awake_since == first["busy"].time
    assert second["sleeper"].awake_since is None
    assert second["busy"].root == first["busy"].root  # bare pid: the identity it found
    assert second["busy"].cpu_seconds >= first["busy"].cpu_seconds

    prober.forget("busy")  # session ended: its history is gone
    assert prober.sample(reader.read(), {"busy": busy.pid}, 5.0)["busy"].cpu_percent is None


def test_child_born_after_previous_tick_counts_all_its_cpu(
    spawn: Spawner, prober: Prober, reader: ProcessTableReader,
) -> None:
    # The busy child starts after the first sample; its whole CPU time is new work.
    script = (f"sleep 0.4; {sys.executable} -m otelwatch.fake_agents busy --lifetime 30 & wait")
    root = spawn("sh", "-c", script, fake=False)
    first = one(prober, reader, root.pid)
    assert first.status is SampleStatus.OK and first.cpu_percent is None
    assert not any(p.name.startswith("python") for p in first.processes)  # not born yet

    def busy_child_started() -> bool:
        t = reader.read()
        return any(i is not None and i.comm.startswith("python")
                   for i in map(t.get, t.descendants(root.pid)))

    wait_for(busy_child_started, timeout=10)
    time.sleep(0.6)
    second = one(prober, reader, root.pid)
    children = [p for p in second.processes if p.pid != root.pid]
    assert children and all(p.cpu_percent is not None for p in children)
    assert second.cpu_percent is not None and second.cpu_percent > 0.0
    # What a loaded host lets it use varies; what it wanted since it was born does not.
    assert second.cpu_demand_percent is not None and second.cpu_demand_percent > 20.0


@pytest.mark.parametrize("server", ["tcp_server", "tcp_server6"])
def test_one_established_connection_counted_once(
    spawn: Spawner, prober: Prober, reader: ProcessTableReader, server: str, request: pytest.FixtureRequest,
) -> None:
    srv = request.getfixturevalue(server)  # the server lives in pytest, not in the tree
    agent = spawn("tcp", "--host", srv.host, "--port", str(srv.port), "--count", "1", ready=True)
    s = one(prober, reader, agent.pid)
    assert s.status is SampleStatus.OK
    assert s.tcp == {"ESTABLISHED": 1}
    assert s.tcp_total == 1 and s.listen == 0
    conns = s.processes[0].connections
    assert len(conns) == 1 and conns[0].remote.endswith(f":{srv.port}")
    if ":" in srv.host:
        assert conns[0].remote == f"[::1]:{srv.port}"
    # Same answer through the /proc/PID/net fallback.
    prober.netlink_ok = False
    assert one(prober, reader, agent.pid).tcp == {"ESTABLISHED": 1}


def test_socket_shared_by_parent_and_child_is_one_connection(
    spawn: Spawner, prober: Prober, reader: ProcessTableReader, tcp_server: TcpServer,
) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("needs bash for /dev/tcp")
    # fd 3 is one socket; the sleep child inherits it.
    script = f"exec 3<>/dev/tcp/127.0.0.1/{tcp_server.port}; sleep 60 & wait"
    root = spawn(bash, "-c", script, fake=False)
    wait_for(lambda: len(reader.read().descendants(root.pid)) == 1 and tcp_server.accepted, timeout=10)
    s = one(prober, reader, root.pid)
    assert s.status is SampleStatus.OK and len(s.processes) == 2
    assert [p.tcp for p in s.processes] == [{"ESTABLISHED": 1}] * 2
    assert s.tcp == {"ESTABLISHED": 1}


def test_listen_only_counts_apart(
    spawn: Spawner, prober: Prober, reader: ProcessTableReader,
) -> None:
    agent = spawn("listen", ready=True)
    s = one(prober, reader, agent.pid)
    assert s.listen == 1
    assert s.tcp == {}
    assert s.processes[0].connections == ()


def test_listen_in_another_network_namespace(
    spawn: Spawner, prober: Prober, reader: ProcessTableReader,
) -> None:
    agent = listener_in_own_netns(spawn)
    s = one(prober, reader, agent.pid)
    # Netlink only sees our namespace: finding this socket proves the per-namespace read.
    assert s.listen == 1 and s.tcp == {}


def test_two_hundred_open_files(spawn: Spawner, prober: Prober, reader: ProcessTableReader) -> None:
    agent = spawn("files", "--count", "200", ready=True)
    s = one(prober, reader, agent.pid)
    assert s.num_fds is not None and 200 <= s.num_fds <= 210
    assert s.tcp == {}


def test_tree_totals_are_sums_of_parts(
    spawn: Spawner, prober: Prober, reader: ProcessTableReader,
) -> None:
    root = spawn("tree", "--count", "2", "--depth", "3", ready=True)
    # root -> 2 children -> 2 grandchildren each
    wait_for(lambda: len(reader.read().descendants(root.pid)) == 6, timeout=20)
    s = one(prober, reader, root.pid)
    assert s.status is SampleStatus.OK
    assert s.children == 6 and len(s.processes) == 7
    assert s.processes[0].pid == root.pid
    ps = s.processes
    assert s.rss_bytes == sum(p.rss_bytes for p in ps)
    assert s.threads == sum(p.threads for p in ps)
    assert s.num_fds == sum(p.num_fds or 0 for p in ps)
    assert s.cpu_seconds == pytest.approx(sum(p.cpu_seconds for p in ps))
    assert s.read_bytes == sum(p.read_bytes or 0 for p in ps)
    grandchildren = [p for p in ps if p.ppid != root.pid and p.pid != root.pid]
    assert len(grandchildren) == 4


def test_zombie_child_and_zombie_root(
    spawn: Spawner, prober: Prober, reader: ProcessTableReader,
) -> None:
    parent = spawn("zombie", ready=True)
    child_pid = int(parent.ready_line)  # type: ignore[attr-defined]
    wait_for(lambda: (i := reader.read().get(child_pid)) is not None and i.state == "Z", timeout=10)
    s = one(prober, reader, parent.pid)
    assert s.status is SampleStatus.OK and s.children == 1
    zombie = next(p for p in s.processes if p.pid == child_pid)
    assert zombie.status == "Z" and zombie.num_fds == 0

    # Our own unreaped child is a zombie root.
    proc = subprocess.Popen(["true"])
    try:
        wait_for(lambda: (i := reader.read().get(proc.pid)) is not None and i.state == "Z", timeout=10)
        z = one(prober, reader, proc.pid)
        assert z.status is SampleStatus.ZOMBIE and not z.alive
    finally:
        proc.wait()


def test_process_exits_between_samples(
    spawn: Spawner, prober: Prober, reader: ProcessTableReader,
) -> None:
    agent = spawn("sleeper")
    s1 = one(prober, reader, agent.pid)
    assert s1.status is SampleStatus.OK and s1.root is not None
    agent.kill()
    agent.wait()
    s2 = one(prober, reader, s1.root)
    assert s2.status is SampleStatus.VANISHED and s2.root == s1.root and s2.processes == ()


def test_child_vanishing_mid_sample_is_dropped(spawn: Spawner, reader: ProcessTableReader) -> None:
    root = spawn("sh", "-c", "sleep 60 & sleep 60 & wait", fake=False)
    table = wait_for(lambda: t if len((t := reader.read()).descendants(root.pid)) == 2 else None, timeout=10)
    assert isinstance(table, ProcessTable)
    victim = table.descendants(root.pid)[0]

    def kill_victim(_sid: str) -> None:
        # After the table was read, before the probe looks: the child is gone for real.
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{victim}"), timeout=5)

    p = Prober(_before_sample=kill_victim)
    try:
        s = p.sample(table, {"s": root.pid}, 5.0)["s"]
    finally:
        p.shutdown()
    assert s.status is SampleStatus.OK
    assert victim not in [x.pid for x in s.processes]
    assert s.children == 1


def test_pid_reuse_is_vanished_not_merged(
    spawn: Spawner, prober: Prober, reader: ProcessTableReader,
) -> None:
    agent = spawn("sleeper")
    info = reader.read().get(agent.pid)
    assert info is not None
    right = one(prober, reader, info.identity)
    assert right.status is SampleStatus.OK and right.root == info.identity
    wrong = ProcessIdentity(agent.pid, info.create_time - 100.0)
    s = one(prober, reader, wrong)
    assert s.status is SampleStatus.VANISHED
    assert s.error == "pid reused" and s.processes == ()


def test_forced_hang_times_out_only_that_session(
    spawn: Spawner, reader: ProcessTableReader,
) -> None:
    a, b = spawn("sleeper"), spawn("sleeper")
    release = threading.Event()
    calls: list[str] = []

    def hook(sid: str) -> None:
        calls.append(sid)
        if sid == "hang":
            release.wait(30)

    p = Prober(max_workers=2, _before_sample=hook)
    try:
        targets = {"hang": a.pid, "ok": b.pid}
        timeout = 0.5
        t0 = time.monotonic()
        r1 = p.sample(reader.read(), targets, timeout)
        assert time.monotonic() - t0 < timeout + 0.8
        assert r1["hang"].status is SampleStatus.PROBE_TIMEOUT and r1["ok"].status is SampleStatus.OK
        assert r1["hang"].root is not None and r1["hang"].root.pid == a.pid

        # Next tick: still hung, answered at once, no second thread piled on it.
        t0 = time.monotonic()
        r2 = p.sample(reader.read(), targets, timeout)
        assert time.monotonic() - t0 < timeout  # only "ok" is probed
        assert r2["hang"].status is SampleStatus.PROBE_TIMEOUT and r2["ok"].status is SampleStatus.OK
        assert calls.count("hang") == 1 and p.hung_threads == 1
        assert p.take_problems() == [("tree", "timeout"), ("tree", "timeout")]
        assert p.take_problems() == []

        release.set()
        wait_for(lambda: p.hung_threads == 0, timeout=5)
        r3 = p.sample(reader.read(), targets, timeout)
        assert r3["hang"].status is SampleStatus.OK
    finally:
        release.set()
        p.shutdown()
        p.shutdown()  # idempotent
    after = p.sample(reader.read(), {"x": a.pid}, 0.1)
    assert after["x"].status is SampleStatus.PROBE_TIMEOUT


ACCESS_SCRIPT = """
import json, os, sys
from otelwatch.probe.prober import Prober
from otelwatch.probe.proctable import ProcessTableReader
if len(sys.argv) > 2:  # drop to that uid after the imports (the interpreter lives under /root)
    uid = int(sys.argv[2])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
p = Prober()
s = p.sample(ProcessTableReader().read(), {"s": int(sys.argv[1])}, 5.0)["s"]
print(json.dumps({"status": s.status.value, "num_fds": s.num_fds, "tcp": s.tcp,
                  "rss": s.rss_bytes, "threads": s.threads, "error": s.error}))
p.shutdown()
"""


def test_another_users_process_is_access_denied(spawn: Spawner) -> None:
    # The probe must run as a different user than the target's owner. As root, run it
    # as nobody against our own sleeper; otherwise, root's PID 1 is someone else's.
    argv = [str(spawn("sleeper").pid), "65534"] if os.geteuid() == 0 else ["1"]
    out = subprocess.run([sys.executable, "-c", ACCESS_SCRIPT, *argv], cwd=str(REPO),
                         env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["status"] == "access_denied"
    assert got["num_fds"] is None and got["tcp"] is None  # unknown, not zero
    assert got["rss"] > 0 and got["threads"] >= 1  # what /proc/PID/stat tells anyone
    assert "not readable" in got["error"]



def test_sessions_queued_behind_a_hung_probe_still_get_sampled(
    spawn: Spawner, reader: ProcessTableReader,
) -> None:
    """The default pool has one worker; a hang in the first session must not turn the
    sessions after it into timeouts: the stuck worker is set aside and replaced."""
    procs = [spawn("sleeper") for _ in range(4)]
    release = threading.Event()

    def hook(sid: str) -> None:
        if sid == "hang":
            release.wait(30)

    p = Prober(_before_sample=hook)
    try:
        targets = {"hang": procs[0].pid, **{f"ok{i}": pr.pid for i, pr in enumerate(procs[1:])}}
        t0 = time.monotonic()
        r = p.sample(reader.read(), targets, 1.0)
        assert time.monotonic() - t0 < 1.0 + 0.8
        assert r["hang"].status is SampleStatus.PROBE_TIMEOUT
        assert all(r[f"ok{i}"].status is SampleStatus.OK for i in range(3)), r
        assert p.hung_threads == 1
    finally:
        release.set()
        p.shutdown()


def test_a_tick_cut_short_reads_the_sessions_it_missed_first_next_time(
    spawn: Spawner, reader: ProcessTableReader,
) -> None:
    """A loaded host: the deadline ends each tick before every session is read. The ones it
    missed go first next tick, so no session is read twice before every one was read once
    (before: the same tail of the queue timed out tick after tick). A slow read is a sleep
    in the worker here, under the pool's hang budget (timeout / 10), so no worker is retired."""
    sleeper = spawn("sleeper")
    sids = [f"s{i:02d}" for i in range(24)]
    p = Prober(_before_sample=lambda sid: time.sleep(0.06))  # one worker: about 12 reads a tick
    try:
        seen: set[str] = set()
        for tick in range(12):  # bounded: at least 2 reads a tick even on a loaded box
            r = p.sample(reader.read(), {sid: sleeper.pid for sid in sids}, 0.8)
            read = {sid for sid in sids if r[sid].status is SampleStatus.OK}
            assert read, f"tick {tick} read nothing"
            if read & seen:  # read one again: only after every one it had not read yet
                assert set(sids) - seen <= read, (tick, sorted(set(sids) - seen - read))
            seen |= read
            if seen == set(sids):
                break
            time.sleep(0.2)  # the rest of the interval: the read the deadline cut ends meanwhile
        assert seen == set(sids) and tick <= 3, (tick, sorted(set(sids) - seen))
    finally:
        p.shutdown()
