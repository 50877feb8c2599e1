"""The psutil probe backend against real processes, side by side with the /proc one.

Same processes, both backends: the tables, identities, TCP states and remotes must
agree; what psutil cannot see (another network namespace, another user's FDs, usage
it may not read) must come out unknown, never zero; deadlines work as the /proc
prober's. Runs on Linux; the macOS-only branches are forced where they can be.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from otelwatch.commands.diag import diag_main
from otelwatch.config import parse_config
from otelwatch.daemon import Watcher
from otelwatch.model import ProcessIdentity, SampleStatus, TreeSample, same_process
from otelwatch.probe.backends import probe_backend, resolve
from otelwatch.probe.prober import Prober
from otelwatch.probe.proctable import ProcessTable, ProcessTableReader, read_proc
from otelwatch.probe.psutil_backend import PsutilProber, PsutilProcessTable, PsutilTableReader, read_info
from otelwatch.recovery.actuator import ProcView
from tests.support.procs import FAKE, REPO, Spawner, TcpServer, listener_in_own_netns, wait_for


@pytest.fixture
def reader() -> PsutilTableReader:
    return PsutilTableReader()


@pytest.fixture
def prober() -> Iterator[PsutilProber]:
    p = PsutilProber()
    try:
        yield p
    finally:
        p.shutdown()


def one(prober: Prober, table: ProcessTable, target: ProcessIdentity | int) -> TreeSample:
    return prober.sample(table, {"s": target}, 5.0)["s"]


def conns(s: TreeSample) -> set[tuple[int, str, str, str]]:
    return {(p.pid, c.state, c.local, c.remote) for p in s.processes for c in p.connections}


# --------------------------------------------------------------------------- the table and identities


def test_tables_and_identities_agree_with_procfs(spawn: Spawner) -> None:
    root = spawn("tree", "--count", "2", "--depth", "2", ready=True)
    procfs_reader = ProcessTableReader()
    wait_for(lambda: len(procfs_reader.read().descendants(root.pid)) == 2, timeout=10)
    a, b = procfs_reader.read(), PsutilTableReader().read()
    pids = [root.pid, *a.descendants(root.pid)]
    assert sorted(b.descendants(root.pid)) == sorted(pids[1:])
    for pid in pids:
        x, y = a.get(pid), b.get(pid)
        assert x is not None and y is not None
        assert (y.ppid, y.pgid, y.sid, y.comm, y.threads) == (x.ppid, x.pgid, x.sid, x.comm, x.threads)
        # The identity the daemon, the probe and the actuator compare across readers.
        assert same_process(x.identity, y.identity), (x.create_time, y.create_time)
        assert b.cmdline(pid) == a.cmdline(pid) and b.cmdline(pid)[0] == sys.executable
        assert y.rss_bytes > 0 and y.cpu_seconds >= 0
    # Re-identification before a signal, across backends, both ways.
    ident_procfs, ident_psutil = a.get(root.pid).identity, b.get(root.pid).identity  # type: ignore[union-attr]
    assert ProcView(backend="psutil").alive(ident_procfs) and ProcView(backend="procfs").alive(ident_psutil)
    assert not ProcView(backend="psutil").alive(ProcessIdentity(root.pid, ident_procfs.create_time - 1.0))
    assert ProcView(backend="psutil").uid(root.pid) == os.geteuid()


def test_create_times_use_the_boot_time_they_are_given(spawn: Spawner) -> None:
    """/proc/stat's btime moves by a second now and then; identities the daemon keeps must
    not, so psutil's create times are rebased on the boot time the reader holds, exactly
    as the /proc reader computes them."""
    pid = spawn("sleeper").pid
    bt = PsutilTableReader().boot_time
    for shifted in (bt, bt + 1.0):
        mine = PsutilTableReader(boot_time=shifted).read().get(pid)
        theirs = read_proc(pid, boot_time=shifted)
        assert mine is not None and theirs is not None
        assert mine.create_time == pytest.approx(theirs.create_time, abs=1e-6)
    got = read_info(pid)
    assert got is not None and got[1] is True and got[0].state in ("R", "S")  # starting, or asleep
    assert read_info(0) is None and read_info(2**22 + 1) is None


# --------------------------------------------------------------------------- the probe


@pytest.mark.parametrize("host_tcp", [True, False], ids=["host-table", "per-process"])
@pytest.mark.parametrize("server", ["tcp_server", "tcp_server6"])
def test_tcp_states_and_remotes_match_procfs(spawn: Spawner, server: str, host_tcp: bool,
                                             request: pytest.FixtureRequest) -> None:
    srv = request.getfixturevalue(server)
    agent = spawn("tcp", "--host", srv.host, "--port", str(srv.port), "--count", "2", ready=True)
    listener = spawn("listen", ready=True)
    procfs_prober, psutil_prober = Prober(), PsutilProber(host_tcp=host_tcp)
    try:
        for pid in (agent.pid, listener.pid):
            want = one(procfs_prober, ProcessTableReader().read(), pid)
            got = one(psutil_prober, PsutilTableReader().read(), pid)
            assert got.status is SampleStatus.OK and got.root == want.root
            assert (got.tcp, got.listen, got.num_fds) == (want.tcp, want.listen, want.num_fds)
            assert conns(got) == conns(want)
        assert want.listen == 1 and want.tcp == {}
        agent_sample = one(psutil_prober, PsutilTableReader().read(), agent.pid)
        assert agent_sample.tcp == {"ESTABLISHED": 2}
        host = "[::1]" if ":" in srv.host else "127.0.0.1"
        assert {c[3] for c in conns(agent_sample)} == {f"{host}:{srv.port}"}
    finally:
        procfs_prober.shutdown()
        psutil_prober.shutdown()


@pytest.mark.parametrize("host_tcp", [True, False], ids=["host-table", "per-process"])
def test_shared_sockets_never_read_as_zero(spawn: Spawner, reader: PsutilTableReader, tcp_server: TcpServer,
                                           host_tcp: bool) -> None:
    """One socket held by bash and its two sleep children. psutil's host-wide table names a
    single owner for it (the highest PID), so the first child, watched alone, joins to zero:
    that zero must be proven per process, and comes out as the one connection it holds."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("needs bash for /dev/tcp")
    root = spawn(bash, "-c", f"exec 3<>/dev/tcp/127.0.0.1/{tcp_server.port}; sleep 60 & sleep 60 & wait",
                 fake=False)
    wait_for(lambda: len(reader.read().descendants(root.pid)) == 2 and tcp_server.accepted, timeout=10)
    first_child = min(reader.read().descendants(root.pid))
    p = PsutilProber(host_tcp=host_tcp)
    try:
        tree = one(p, reader.read(), root.pid)
        alone = one(p, reader.read(), first_child)
    finally:
        p.shutdown()
    assert tree.tcp == {"ESTABLISHED": 1} and len(tree.processes) == 3  # one socket, counted once
    assert alone.tcp == {"ESTABLISHED": 1} and alone.processes[0].tcp == {"ESTABLISHED": 1}
    if not host_tcp:  # per process, every holder shows it
        assert [x.tcp for x in tree.processes] == [{"ESTABLISHED": 1}] * 3


def test_another_network_namespace_is_unknown_not_zero(spawn: Spawner, prober: PsutilProber,
                                                       reader: PsutilTableReader) -> None:
    agent = listener_in_own_netns(spawn)
    # psutil would read our namespace's table and find nothing: an unproven zero.
    s = one(prober, reader.read(), agent.pid)
    assert s.status is SampleStatus.OK and s.tcp is None and s.tcp_total is None
    assert s.num_fds is not None and s.processes[0].tcp is None


def test_cpu_rates_zombies_exits_and_pid_reuse(spawn: Spawner, prober: PsutilProber,
                                               reader: PsutilTableReader) -> None:
    busy, parent = spawn("busy"), spawn("zombie", ready=True)
    child_pid = int(parent.ready_line)  # type: ignore[attr-defined]
    wait_for(lambda: (i := reader.read().get(child_pid)) is not None and i.state == "Z", timeout=10)
    targets = {"busy": busy.pid, "parent": parent.pid}
    t1 = reader.read()
    first = prober.sample(t1, targets, 5.0)
    assert first["busy"].cpu_percent is None  # first sight: no rate, never a made-up 0.0
    time.sleep(1.0)
    t2 = reader.read()
    second = prober.sample(t2, targets, 5.0)
    # What share of a core a busy loop gets depends on the host's load (a few percent
    # under load 40 on 2 cores); the rate is its CPU time over the tables' interval.
    c1, c2 = t1.get(busy.pid), t2.get(busy.pid)
    assert c1 is not None and c2 is not None and c2.cpu_seconds > c1.cpu_seconds
    expected = (c2.cpu_seconds - c1.cpu_seconds) / (t2.monotonic - t1.monotonic) * 100.0
    assert second["busy"].cpu_percent == pytest.approx(expected) and expected < 150.0
    # CPU demand: psutil has no run-queue wait; on Linux the backend reads /proc/PID/schedstat.
    demand = second["busy"].cpu_demand_percent
    if os.path.exists("/proc/self/schedstat"):
        assert demand is not None and demand >= second["busy"].cpu_percent
        assert second["busy"].awake_since == first["busy"].time  # a loop never slept
    else:
        assert demand is None  # the spin rule reads usage
    zombie = next(p for p in second["parent"].processes if p.pid == child_pid)
    assert zombie.status == "Z" and zombie.num_fds == 0 and zombie.tcp == {}

    proc = subprocess.Popen(["true"])  # our own unreaped child: a zombie root
    try:
        wait_for(lambda: (i := reader.read().get(proc.pid)) is not None and i.state == "Z", timeout=10)
        assert one(prober, reader.read(), proc.pid).status is SampleStatus.ZOMBIE
    finally:
        proc.wait()
    root = second["busy"].root
    assert root is not None
    wrong = one(prober, reader.read(), ProcessIdentity(busy.pid, root.create_time - 100.0))
    assert wrong.status is SampleStatus.VANISHED and wrong.error == "pid reused"
    busy.kill()
    busy.wait()
    gone = one(prober, reader.read(), root)
    assert gone.status is SampleStatus.VANISHED and gone.processes == ()


def test_unreadable_usage_is_unknown_not_zero(spawn: Spawner, prober: PsutilProber,
                                              reader: PsutilTableReader) -> None:
    """macOS denies another user's CPU times: the table holds a placeholder zero, which the
    probe must report as unknown. Forced here by marking a readable process unreadable."""
    root = spawn("tree", "--count", "1", "--depth", "2", ready=True)
    wait_for(lambda: reader.read().descendants(root.pid), timeout=10)
    for _ in range(2):
        t = reader.read()
        (child,) = t.descendants(root.pid)
        masked = PsutilProcessTable({p.pid: p for p in t}, reader, t.time, t.monotonic, frozenset({child}))
        s = one(prober, masked, root.pid)
        time.sleep(0.2)
    assert s.status is SampleStatus.OK and s.cpu_percent is None
    by_pid = {p.pid: p for p in s.processes}
    assert by_pid[child].cpu_percent is None and by_pid[root.pid].cpu_percent is not None


ACCESS_SCRIPT = """
import json, os, sys
from otelwatch.probe.psutil_backend import PsutilProber, PsutilTableReader
uid = int(sys.argv[2])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
p = PsutilProber()
s = p.sample(PsutilTableReader().read(), {"s": int(sys.argv[1])}, 5.0)["s"]
print(json.dumps({"status": s.status.value, "num_fds": s.num_fds, "tcp": s.tcp, "threads": s.threads,
                  "io": s.read_bytes, "error": s.error}))
p.shutdown()
"""


def test_another_users_process_is_access_denied(spawn: Spawner) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the probe as another user")
    out = subprocess.run([sys.executable, "-c", ACCESS_SCRIPT, str(spawn("sleeper").pid), "65534"],
                         cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["status"] == "access_denied" and "not readable" in got["error"]
    assert got["num_fds"] is None and got["tcp"] is None and got["io"] is None  # unknown, not zero
    assert got["threads"] >= 1


def test_a_hung_read_times_out_only_its_session(spawn: Spawner, reader: PsutilTableReader) -> None:
    a, b = spawn("sleeper"), spawn("sleeper")
    release = threading.Event()

    def hook(sid: str) -> None:
        if sid == "hang":  # a read blocked in the kernel, as test_probe.py makes one
            release.wait(30)

    p = PsutilProber(_before_sample=hook)
    try:
        table = reader.read()
        t0 = time.monotonic()
        r = p.sample(table, {"hang": a.pid, "ok": b.pid}, 0.5)
        assert time.monotonic() - t0 < 0.5 + 0.8
        assert r["hang"].status is SampleStatus.PROBE_TIMEOUT and r["ok"].status is SampleStatus.OK
        assert p.take_problems() == [("tree", "timeout")] and p.hung_threads == 1
    finally:
        release.set()
        p.shutdown()


def test_cwd_and_wchan_outside_the_tick() -> None:
    psutil_prober, procfs_prober = PsutilProber(), Prober()
    try:
        assert psutil_prober.cwd(os.getpid()) == procfs_prober.cwd(os.getpid()) == os.getcwd()
        assert psutil_prober.wchan(os.getpid()) is None  # psutil has none: unknown
        gone = 2**22 + 1  # above any PID
        assert psutil_prober.cwd(gone) is None and procfs_prober.cwd(gone) is None
        assert procfs_prober.wchan(gone) is None  # gone is unknown, not an exception
    finally:
        psutil_prober.shutdown()
        procfs_prober.shutdown()


# --------------------------------------------------------------------------- choosing it


def test_backend_choice_and_the_watcher_uses_it(tmp_path: Path) -> None:
    assert resolve("auto") == "procfs" and resolve("psutil") == "psutil"
    assert resolve("auto", str(tmp_path / "no-proc")) == "psutil"  # macOS: no /proc
    with pytest.raises(ValueError, match="auto, procfs, psutil"):
        resolve("sysctl")
    reader, prober = probe_backend("auto", str(tmp_path / "no-proc"))
    prober.shutdown()
    assert isinstance(reader, PsutilTableReader) and isinstance(prober, PsutilProber)
    # A host without /proc (as macOS): auto picks psutil for the probe and for recovery.
    cfg = parse_config({"state_dir": str(tmp_path / "state"), "recovery": {"enabled": True, "dry_run": True},
                        "sources": {"registry": {"enabled": False}, "processes": {"enabled": False},
                                    "tmux": {"enabled": False}, "transcripts": {"enabled": False}}})
    w = Watcher(cfg, log_stream=io.StringIO(), proc_root=str(tmp_path / "no-proc"))
    try:
        sid = w.track(os.getpid(), "me")
        (snap,) = w.tick()
        assert isinstance(w._prober, PsutilProber) and snap.session_id == sid
        assert snap.sample_status is SampleStatus.OK and snap.create_time == pytest.approx(
            psutil.Process().create_time(), abs=1.1)
    finally:
        w.stop()


def test_auto_tcp_reads_per_process_until_many_are_watched(spawn: Spawner, reader: PsutilTableReader,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import otelwatch.probe.psutil_backend as probe_psutil

    p, pid = PsutilProber(), spawn("sleeper").pid
    try:
        assert one(p, reader.read(), pid).status is SampleStatus.OK and p._use_host is False
        monkeypatch.setattr(probe_psutil, "HOST_TCP_MIN_PROCESSES", 1)
        assert one(p, reader.read(), pid).tcp == {} and p._use_host is True
    finally:
        p.shutdown()


def test_diag_shows_the_same_tcp_with_either_backend(spawn: Spawner, tcp_server: TcpServer,
                                                     tcp_server6: TcpServer) -> None:
    tcp = f"{' '.join(FAKE)} tcp --lifetime 60"
    root = spawn("sh", "-c", f"{tcp} --host 127.0.0.1 --port {tcp_server.port} --count 2 & "
                 f"{tcp} --host ::1 --port {tcp_server6.port} --count 1 & wait", fake=False)
    wait_for(lambda: len(tcp_server.accepted) == 2 and len(tcp_server6.accepted) == 1, timeout=15)
    reports: dict[str, Any] = {}
    for backend in ("procfs", "psutil"):
        out, err = io.StringIO(), io.StringIO()
        assert diag_main(root.pid, as_json=True, backend=backend, stdout=out, stderr=err, interval=0.2) == 0
        reports[backend] = json.loads(out.getvalue())
    a, b = reports["procfs"], reports["psutil"]
    assert a["tcp"] == b["tcp"] == {"ESTABLISHED": 3}

    def remotes(r: dict[str, Any]) -> set[tuple[int, str, str, str]]:
        return {(p["pid"], c["state"], c["local"], c["remote"]) for p in r["processes"] for c in p["connections"]}

    assert remotes(a) == remotes(b) and len(remotes(a)) == 3
    assert b["backend"] == "psutil" and any(n.startswith("wchan: unknown") for n in b["notes"])
    assert a["backend"] == "procfs" and a["notes"] == []
    table = subprocess.run([sys.executable, "-m", "otelwatch", "diag", str(root.pid), "--backend", "psutil"],
                           cwd=str(REPO), capture_output=True, text=True, timeout=30, check=False)
    assert table.returncode == 0, table.stderr
    assert "read by the psutil backend:" in table.stdout and "ESTABLISHED=3" in table.stdout
    assert f"-> [::1]:{tcp_server6.port}" in table.stdout and f"-> 127.0.0.1:{tcp_server.port}" in table.stdout


def test_launchd_plist_runs_the_daemon_and_restarts_it_on_failure() -> None:
    """macOS on paper: the user agent parses as a plist and says what the README says.
    (plutil and launchd are not here; it has not been loaded on a Mac.)"""
    import plistlib

    path = REPO / "deploy" / "launchd" / "dev.otelwatch.plist"
    with path.open("rb") as fh:
        plist = plistlib.load(fh)
    assert plist["Label"] == "dev.otelwatch" and path.name == f"{plist['Label']}.plist"
    assert plist["ProgramArguments"][1:3] == ["run", "--config"]
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert plist["StandardErrorPath"].endswith("/Library/Logs/otelwatch/otelwatch.log")
    # Every path is absolute once installed: launchd expands neither ~ nor $HOME.
    paths = [*plist["ProgramArguments"][::3], plist["StandardOutPath"], plist["StandardErrorPath"]]
    assert all(p.startswith("__HOME__/") for p in paths) and "__HOME__" in path.read_text().split("-->")[0]
