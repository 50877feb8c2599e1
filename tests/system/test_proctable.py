"""ProcessTable: one read of /proc/*/stat, parent links, identities, cmdline cache."""

from __future__ import annotations

import os
import subprocess
import time

from otelwatch.probe.proctable import CLK_TCK, PAGE_SIZE, ProcessTable, ProcessTableReader, parse_stat, read_proc
from tests.support.procs import Spawner, wait_for


def test_parse_stat_with_spaces_and_parens_in_the_name() -> None:
    # proc(5) field N is fields[N - 3]
    fields = ["0"] * 30
    for n, value in {3: "S", 4: "10", 5: "11", 6: "12", 14: "150", 15: "50", 20: "3", 22: "500",
                     24: "7"}.items():
        fields[n - 3] = value
    data = f"42 (a (weird) name) {' '.join(fields)}".encode()
    info = parse_stat(42, data, boot_time=1000.0)
    assert info.comm == "a (weird) name" and info.state == "S"
    assert (info.ppid, info.pgid, info.sid) == (10, 11, 12)
    assert info.cpu_seconds == 200 / CLK_TCK and info.threads == 3
    assert info.create_time == 1000.0 + 500 / CLK_TCK and info.rss_bytes == 7 * PAGE_SIZE


def test_table_of_a_real_tree_and_its_stamp(spawn: Spawner) -> None:
    reader = ProcessTableReader()
    root = spawn("tree", "--count", "2", "--depth", "2", ready=True)
    before = time.time()
    table = wait_for(lambda: t if len((t := reader.read()).children(root.pid)) == 2 else None, timeout=10)
    assert isinstance(table, ProcessTable)
    assert before - 1 <= table.time <= time.time() and table.monotonic <= time.monotonic()
    kids = table.children(root.pid)
    assert sorted(table.descendants(root.pid)) == sorted(kids)
    assert table.ancestors(kids[0])[:2] == [root.pid, os.getpid()]
    info = table.get(root.pid)
    assert info is not None and read_proc(root.pid) is not None
    assert abs(read_proc(root.pid).create_time - info.create_time) < 0.02  # type: ignore[union-attr]
    assert "tree" in table.cmdline(root.pid)
    assert table.cmdline(root.pid) is table.cmdline(root.pid)  # cached per identity


def test_missing_process(spawn: Spawner) -> None:
    gone = spawn("sleeper")
    gone.kill()
    gone.wait()
    assert read_proc(gone.pid) is None
    table = ProcessTableReader().read()
    assert gone.pid not in table and table.get(gone.pid) is None and table.cmdline(gone.pid) == ()


def test_a_real_start_is_told_to_a_clock_tick_though_btime_is_whole_seconds() -> None:
    """A registration's mtime is compared with this (sessions._bind_identity): the
    whole-second boot time alone put a start up to a second early."""
    before = time.time()
    proc = subprocess.Popen(["sleep", "5"])
    after = time.time()
    try:
        table = ProcessTableReader().read()
        info = table.get(proc.pid)
        assert info is not None
        tick = 1 / CLK_TCK
        assert before - tick - 0.01 <= table.started_at(info) <= after + 0.01
        assert 0.0 <= table.boot_shift < 1.0 + 0.01  # what btime's truncation lost
    finally:
        proc.kill()
        proc.wait()
