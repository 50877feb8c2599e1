"""procfs: the raw readers against literal /proc text and against the real kernel."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from otelwatch.probe import procfs
from otelwatch.probe.procfs import ProcessGone, TcpSocket, TcpTable
from tests.support.procs import Spawner, TcpServer, wait_for

HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
          "   uid  timeout inode")
V4_LINES = [
    HEADER,
    "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 "
    "12345 1 0000000000000000 100 0 0 10 0",
    "   1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 "
    "12346 1 0000000000000000 20 4 30 10 -1",
    "   2: 0A00000A:0016 0100000A:D431 08 00000000:00000000 00:00000000 00000000     0        0 "
    "12347 1 0000000000000000 20 4 30 10 -1",
    # TIME_WAIT: no owner, inode 0, must be left out
    "   3: 0100007F:C351 0100007F:1F90 06 00000000:00000000 03:00000F9A 00000000     0        0 "
    "0 3 0000000000000000",
    "garbage line",
]
V6_LINES = [
    HEADER,
    "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A "
    "00000000:00000000 00:00000000 00000000  1000        0 22345 1 0000000000000000 100 0 0 10 0",
    "   1: 0000000000000000FFFF00000100007F:C350 0000000000000000FFFF00000100007F:01BB 02 "
    "00000000:00000000 00:00000000 00000000  1000        0 22346 1 0000000000000000 20 4 30 10 -1",
    "   2: 00000000000000000000000001000000:1F91 00000000000000000000000001000000:1F90 0B "
    "00000000:00000000 00:00000000 00000000  1000        0 22347 1 0000000000000000 20 4 30 10 -1",
]

little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little", reason="literal lines are as an x86 kernel prints them")


@little_endian_only
def test_parse_v4_literal_lines() -> None:
    table = TcpTable(procfs.parse_proc_net_tcp(V4_LINES, v6=False), "proc")
    assert len(table) == 3  # header, TIME_WAIT (inode 0) and garbage skipped
    assert table.get(12345) == TcpSocket("LISTEN", "127.0.0.1:8080", "0.0.0.0:0")
    assert table.get(12346) == TcpSocket("ESTABLISHED", "127.0.0.1:50000", "127.0.0.1:8080")
    assert table.get(12347) == TcpSocket("CLOSE_WAIT", "10.0.0.10:22", "10.0.0.1:54321")
    assert table.get(0) is None


@little_endian_only
def test_parse_v6_literal_lines_word_order() -> None:
    table = TcpTable(procfs.parse_proc_net_tcp(V6_LINES, v6=True), "proc")
    assert table.get(22345) == TcpSocket("LISTEN", "[::1]:8080", "[::]:0")
    assert table.get(22346) == TcpSocket("SYN_SENT", "[::ffff:127.0.0.1]:50000", "[::ffff:127.0.0.1]:443")
    assert table.get(22347) == TcpSocket("CLOSING", "[::1]:8081", "[::1]:8080")


def test_every_state_code_has_its_name() -> None:
    names = [procfs.TCP_STATES[i] for i in range(1, 12)]
    assert names == ["ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
                     "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING"]


def _endpoint(sockname: tuple[object, ...], v6: bool) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if v6 else f"{host}:{port}"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_real_tables_netlink_and_proc_agree(host: str) -> None:
    v6 = ":" in host
    server = TcpServer(host)
    client = socket.create_connection((host, server.port))
    try:
        wait_for(lambda: server.accepted, timeout=5)
        accepted = server.accepted[0]
        mine = {
            os.fstat(client.fileno()).st_ino: TcpSocket(
                "ESTABLISHED", _endpoint(client.getsockname(), v6), _endpoint(client.getpeername(), v6)),
            os.fstat(accepted.fileno()).st_ino: TcpSocket(
                "ESTABLISHED", _endpoint(accepted.getsockname(), v6), _endpoint(accepted.getpeername(), v6)),
            os.fstat(server.sock.fileno()).st_ino: TcpSocket(
                "LISTEN", _endpoint(server.sock.getsockname(), v6), "[::]:0" if v6 else "0.0.0.0:0"),
        }
        from_proc = procfs.proc_tcp_table(os.getpid())
        from_netlink = procfs.netlink_tcp_table()
        assert from_proc.source == "proc" and from_netlink.source == "netlink"
        for inode, expected in mine.items():
            assert from_proc.get(inode) == expected
            assert from_netlink.get(inode) == expected
        # Other tests on the host open sockets concurrently; the bulk must still agree.
        common = set(dict(from_proc.items())) & set(dict(from_netlink.items()))
        assert len(common) >= 0.8 * min(len(from_proc), len(from_netlink))
    finally:
        client.close()
        server.close()


def test_scan_fds_counts_files_and_finds_sockets(spawn: Spawner, tcp_server: TcpServer) -> None:
    files = spawn("files", "--count", "200", ready=True)
    scan = procfs.scan_fds(files.pid)
    assert scan is not None
    assert 200 <= scan.num_fds <= 210
    assert scan.sockets == frozenset()

    tcp = spawn("tcp", "--host", "127.0.0.1", "--port", str(tcp_server.port), "--count", "2", ready=True)
    scan = procfs.scan_fds(tcp.pid)
    assert scan is not None and len(scan.sockets) == 2
    table = procfs.netlink_tcp_table()
    assert [table.get(i).state for i in scan.sockets] == ["ESTABLISHED"] * 2  # type: ignore[union-attr]


def test_gone_process_raises_process_gone(spawn: Spawner) -> None:
    proc = spawn("sleeper")
    proc.kill()
    proc.wait()
    for reader in (procfs.scan_fds, procfs.read_io, procfs.read_wchan, procfs.owner_uid,
                   procfs.net_namespace, procfs.proc_tcp_table):
        with pytest.raises(ProcessGone):
            reader(proc.pid)


def test_io_wchan_uid_namespace_of_a_sleeper(spawn: Spawner) -> None:
    proc = spawn("sleeper")
    wait_for(lambda: procfs.read_wchan(proc.pid) not in (None, "0"), timeout=10)
    io = procfs.read_io(proc.pid)
    assert io is not None and io.read_bytes >= 0 and io.write_bytes >= 0
    assert procfs.owner_uid(proc.pid) == os.geteuid()
    assert procfs.net_namespace(proc.pid) == os.readlink("/proc/self/ns/net")
