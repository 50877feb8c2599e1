"""Fast Linux /proc and netlink readers for the probe: FD scans, TCP tables, I/O, wchan.

This module owns the raw reads the probe needs beyond /proc/PID/stat (which
proctable.py owns): one pass over /proc/PID/fd giving the FD count and the
socket inodes, the host's TCP sockets per network namespace (a netlink
sock_diag dump, or /proc/PID/net/tcp{,6} as the fallback), /proc/PID/io,
/proc/PID/wchan and the owner uid.

It never uses psutil (too slow on the hot path: psutil re-reads the whole TCP
table for every process) and never decides what a reading means. Errors are
reported in a small, fixed way: "permission denied" becomes None (unknown,
never zero); a process that is gone raises ProcessGone; anything else is an
OSError for the caller to count.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple, NoReturn

from otelwatch.probe.proctable import read_small

__all__ = [
    "TCP_STATES",
    "FdScan",
    "IoCounters",
    "NetlinkUnsupported",
    "ProcessGone",
    "TcpSocket",
    "TcpTable",
    "fd_dir_stat",
    "net_namespace",
    "netlink_tcp_table",
    "owner_uid",
    "parse_proc_net_tcp",
    "proc_tcp_table",
    "read_io",
    "read_run_wait",
    "read_wchan",
    "scan_fds",
]

# Kernel TCP states (include/net/tcp_states.h); the names are the ones users know from ss/netstat.
TCP_STATES: dict[int, str] = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}


class ProcessGone(Exception):
    """The process no longer exists (it exited, or was reaped, while being read)."""


class NetlinkUnsupported(OSError):
    """sock_diag is not available here (old kernel, seccomp, no AF_NETLINK)."""


_GONE_ERRNOS = (errno.ENOENT, errno.ESRCH)


def _reraise(exc: OSError, pid: int | str) -> NoReturn:
    """Re-raise a read's OSError as ProcessGone when it says pid does not exist."""
    if exc.errno in _GONE_ERRNOS:
        raise ProcessGone(pid) from None
    raise exc


# --------------------------------------------------------------------------- FDs


class FdScan(NamedTuple):
    num_fds: int
    sockets: frozenset[int]  # inodes of socket:[N] links


def scan_fds(pid: int, proc_root: str = "/proc") -> FdScan | None:
    """Count the open FDs of pid and collect its socket inodes in one pass.

    None when the FD directory is not readable (another user's process): unknown,
    not zero. Raises ProcessGone when the process does not exist.
    """
    sockets: set[int] = set()
    count = 0
    readlink = os.readlink
    dir_fd = -1
    try:
        dir_fd = os.open(f"{proc_root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for name in os.listdir(dir_fd):
            try:
                # readlink relative to the open directory: no path walk per FD.
                target = readlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue  # closed between listdir and readlink
            count += 1
            if target.startswith("socket:["):
                sockets.add(int(target[8:-1]))
    except PermissionError:
        return None
    except OSError as exc:
        _reraise(exc, pid)
    finally:
        if dir_fd >= 0:
            os.close(dir_fd)
    return FdScan(count, frozenset(sockets))


def fd_dir_stat(pid: int, proc_root: str = "/proc") -> os.stat_result | None:
    """stat of /proc/PID/fd, None when it fails (gone, not permitted). One call gives
    what scan_fds and owner_uid would take many for: st_size is how many FDs pid has
    open as the kernel counts them (Linux 6.2 and later; 0 before, read as unknown),
    st_uid its owner (the same rule as owner_uid's /proc/PID)."""
    try:
        return os.stat(f"{proc_root}/{pid}/fd")
    except OSError:
        return None


# --------------------------------------------------------------------------- TCP tables


class TcpSocket(NamedTuple):
    state: str  # TCP_STATES name
    local: str  # "127.0.0.1:5555" or "[::1]:5555"
    remote: str


# A socket in the same state between the same endpoints is formatted once, not once per
# tick: most watched connections sit unchanged for minutes. Bounded; cleared when full.
_FORMATTED: dict[tuple[int, int, bytes, int, bytes, int], TcpSocket] = {}
_FORMATTED_MAX = 65536


class TcpTable:
    """The TCP sockets of one network namespace at one instant, by socket inode.

    Entries are kept raw and formatted only when looked up: a busy host has many
    sockets and a tick needs only those of the watched trees.
    """

    __slots__ = ("_raw", "source")

    def __init__(self, raw: dict[int, tuple[int, int, bytes, int, bytes, int]], source: str) -> None:
        # inode -> (family, state, local addr bytes, local port, remote addr bytes, remote port)
        self._raw = raw
        self.source = source  # "netlink" or "proc"

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, inode: object) -> bool:
        return inode in self._raw

    def get(self, inode: int) -> TcpSocket | None:
        raw = self._raw.get(inode)
        if raw is None:
            return None
        sock = _FORMATTED.get(raw)
        if sock is None:
            family, state, laddr, lport, raddr, rport = raw
            sock = TcpSocket(
                TCP_STATES.get(state, f"UNKNOWN_{state}"),
                _endpoint(family, laddr, lport),
                _endpoint(family, raddr, rport),
            )
            if len(_FORMATTED) >= _FORMATTED_MAX:
                _FORMATTED.clear()
            _FORMATTED[raw] = sock
        return sock

    def items(self) -> Iterator[tuple[int, TcpSocket]]:
        for inode in self._raw:
            sock = self.get(inode)
            if sock is not None:
                yield inode, sock


def _endpoint(family: int, addr: bytes, port: int) -> str:
    if family == socket.AF_INET6:
        return f"[{socket.inet_ntop(socket.AF_INET6, addr)}]:{port}"
    return f"{socket.inet_ntop(socket.AF_INET, addr)}:{port}"


# Netlink sock_diag (linux/sock_diag.h, linux/inet_diag.h).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid:
# sport, dport (big endian), src[16], dst[16], if, cookie[2].
_REQ_V2 = struct.Struct("=BBBxI4x16s16sI8x")
# inet_diag_msg: family, state, timer, retrans, sockid (sport, dport, src, dst, if, cookie),
# expires, rqueue, wqueue, uid, inode.
_DIAG_MSG_FMT = "=BBxx2s2s16s16s4x8x4x4x4x4xI"
_DIAG_MSG = struct.Struct(_DIAG_MSG_FMT)
_PORT = struct.Struct("!H")
# Every state except TIME_WAIT and NEW_SYN_RECV (12): those are kernel-held
# mini-sockets with inode 0 that no process owns, and on a busy host they can
# outnumber the real sockets many times over.
_ALL_STATES = 0xFFFFFFFF & ~((1 << 6) | (1 << 12))


def netlink_tcp_table(timeout: float = 2.0) -> TcpTable:
    """All TCP sockets (IPv4 and IPv6) of the caller's network namespace via sock_diag.

    Raises NetlinkUnsupported when netlink sock_diag cannot be used at all, OSError on
    other failures.
    """
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG)
    except (OSError, AttributeError) as exc:
        raise NetlinkUnsupported(f"netlink sock_diag socket: {exc}") from None
    raw: dict[int, tuple[int, int, bytes, int, bytes, int]] = {}
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            _netlink_dump(sock, family, seq, raw)
    finally:
        sock.close()
    return TcpTable(raw, "netlink")


def _netlink_dump(sock: socket.socket, family: int, seq: int,
                  raw: dict[int, tuple[int, int, bytes, int, bytes, int]]) -> None:
    body = _REQ_V2.pack(family, socket.IPPROTO_TCP, 0, _ALL_STATES, b"", b"", 0)
    hdr = _NLMSG_HDR.pack(_NLMSG_HDR.size + len(body), _SOCK_DIAG_BY_FAMILY,
                          _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0)
    sock.send(hdr + body)
    addr_len = 4 if family == socket.AF_INET else 16
    hdr_size = _NLMSG_HDR.size
    unpack_hdr = _NLMSG_HDR.unpack_from
    unpack_msg = _DIAG_MSG.unpack_from
    unpack_port = _PORT.unpack
    buf = bytearray(1 << 17)
    view = memoryview(buf)
    while True:
        n = sock.recv_into(view)
        if n == 0:
            raise OSError("netlink: connection closed during dump")
        off = 0
        while off + hdr_size <= n:
            length, mtype, _flags, mseq, _pid = unpack_hdr(buf, off)
            if length < hdr_size or off + length > n:
                raise OSError("netlink: truncated message")
            if mseq != seq:
                off += (length + 3) & ~3
                continue
            if mtype == _NLMSG_DONE:
                return
            if mtype == _NLMSG_ERROR:
                err = -struct.unpack_from("=i", buf, off + hdr_size)[0]
                if err in (errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT):
                    raise NetlinkUnsupported(err, f"sock_diag: {os.strerror(err)}")
                raise OSError(err, f"sock_diag: {os.strerror(err)}")
            if mtype == _SOCK_DIAG_BY_FAMILY:
                fam, state, sport, dport, src, dst, inode = unpack_msg(buf, off + hdr_size)
                if inode:
                    raw[inode] = (fam, state, src[:addr_len], unpack_port(sport)[0],
                                  dst[:addr_len], unpack_port(dport)[0])
            off += (length + 3) & ~3


def parse_proc_net_tcp(lines: Iterable[bytes | str], v6: bool,
                       into: dict[int, tuple[int, int, bytes, int, bytes, int]] | None = None,
                       ) -> dict[int, tuple[int, int, bytes, int, bytes, int]]:
    """Parse the lines of /proc/net/tcp (v6=False) or tcp6 (v6=True) into raw table entries.

    The kernel prints each 32-bit word of an address as a native-endian integer
    in hex, so the bytes are recovered by packing the words back in native order
    (on x86 "0100007F" is 127.0.0.1). Ports are printed in host order. The header
    line and malformed lines are skipped; sockets with inode 0 (owned by no
    process) are left out.
    """
    raw = {} if into is None else into
    family = socket.AF_INET6 if v6 else socket.AF_INET
    for line in lines:
        text = line.decode("ascii", "replace") if isinstance(line, bytes) else line
        f = text.split()
        if len(f) < 10 or not f[0].endswith(":") or not f[0][:-1].isdigit():
            continue
        try:
            inode = int(f[9])
            if not inode:
                continue
            laddr, lport = _hex_endpoint(f[1], v6)
            raddr, rport = _hex_endpoint(f[2], v6)
            state = int(f[3], 16)
        except (ValueError, struct.error):
            continue
        raw[inode] = (family, state, laddr, lport, raddr, rport)
    return raw


def _hex_endpoint(field: str, v6: bool) -> tuple[bytes, int]:
    addr_hex, _, port_hex = field.partition(":")
    words = len(addr_hex) // 8
    if words != (4 if v6 else 1):
        raise ValueError(f"bad address {field!r}")
    addr = struct.pack(f"={words}I", *(int(addr_hex[i * 8:i * 8 + 8], 16) for i in range(words)))
    return addr, int(port_hex, 16)


def proc_tcp_table(pid: int | str, proc_root: str = "/proc") -> TcpTable:
    """The TCP sockets of pid's network namespace from /proc/PID/net/tcp and tcp6.

    A missing tcp6 (IPv6 disabled) is not an error. Raises ProcessGone when pid
    is gone, OSError when the files cannot be read.
    """
    raw: dict[int, tuple[int, int, bytes, int, bytes, int]] = {}
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"{proc_root}/{pid}/net/{name}", "rb") as fh:
                parse_proc_net_tcp(fh, v6, raw)
        except FileNotFoundError:
            if v6:
                continue  # no IPv6 in this kernel or namespace
            if not os.path.exists(f"{proc_root}/{pid}"):
                raise ProcessGone(pid) from None
            raise
    return TcpTable(raw, "proc")


def net_namespace(pid: int | str, proc_root: str = "/proc") -> str | None:
    """The network namespace of pid ("net:[4026531840]"), None when not readable.

    Raises ProcessGone when pid does not exist (a zombie has no namespaces either).
    """
    try:
        return os.readlink(f"{proc_root}/{pid}/ns/net")
    except PermissionError:
        return None
    except OSError as exc:
        _reraise(exc, pid)


# --------------------------------------------------------------------------- io, wchan, uid


class IoCounters(NamedTuple):
    read_bytes: int
    write_bytes: int
    storage: bool  # True: read_bytes/write_bytes (storage I/O); False: rchar/wchar (all read/write calls)


def read_io(pid: int, proc_root: str = "/proc") -> IoCounters | None:
    """/proc/PID/io: storage read_bytes/write_bytes, or rchar/wchar when the kernel
    has no storage accounting. None when not readable (another user's process)."""
    try:
        data = read_small(f"{proc_root}/{pid}/io")  # read for every process on every tick
    except PermissionError:
        return None
    except OSError as exc:
        _reraise(exc, pid)
    fields: dict[bytes, int] = {}
    for line in data.splitlines():
        key, _, value = line.partition(b":")
        try:
            fields[key] = int(value)
        except ValueError:
            continue
    if b"read_bytes" in fields and b"write_bytes" in fields:
        return IoCounters(fields[b"read_bytes"], fields[b"write_bytes"], True)
    if b"rchar" in fields and b"wchar" in fields:
        return IoCounters(fields[b"rchar"], fields[b"wchar"], False)
    return None


def read_run_wait(pid: int | str, proc_root: str = "/proc") -> float | None:
    """Seconds pid's main thread has spent runnable but waiting on a run queue since it
    started (/proc/PID/schedstat, second field). None when the kernel has no schedstat
    (CONFIG_SCHED_INFO off) or it cannot be read: never raises. Only the main thread:
    the whole group would cost a read per thread per tick."""
    try:
        return int(read_small(f"{proc_root}/{pid}/schedstat").split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


_VOLUNTARY = b"\nvoluntary_ctxt_switches:"


def read_voluntary_switches(pid: int | str, proc_root: str = "/proc") -> int | None:
    """How many times pid's main thread has gone to sleep of its own accord since it
    started (/proc/PID/status, voluntary_ctxt_switches): a wait for I/O, a timer, a
    lock or a child. A loop never does; being preempted is not counted here. None when
    it cannot be read: never raises. The main thread only, like `read_run_wait`."""
    try:
        data = read_small(f"{proc_root}/{pid}/status")
        at = data.find(_VOLUNTARY)
        if at < 0:
            return None
        at += len(_VOLUNTARY)
        end = data.find(b"\n", at)
        return int(data[at:end if end >= 0 else len(data)])
    except (OSError, ValueError):
        return None


def read_wchan(pid: int, proc_root: str = "/proc") -> str | None:
    """Where pid sleeps in the kernel ("ep_poll", "do_select", ...); "0" while running;
    None when unreadable or hidden (kernels may hide it from other users)."""
    try:
        with open(f"{proc_root}/{pid}/wchan", "rb") as fh:
            value = fh.read().decode("ascii", "replace").strip()
    except OSError as exc:
        if exc.errno in _GONE_ERRNOS:
            raise ProcessGone(pid) from None
        return None
    return value or None


def owner_uid(pid: int, proc_root: str = "/proc") -> int:
    """The owner of pid: the uid of its /proc directory, which the kernel sets to the
    effective uid (root for non-dumpable processes). Raises ProcessGone."""
    try:
        return os.stat(f"{proc_root}/{pid}").st_uid
    except OSError as exc:
        _reraise(exc, pid)


def tcp_peer_uid(peer: tuple[str, int], local: tuple[str, int], proc_root: str = "/proc") -> int | None:
    """The uid owning the client end of a loopback TCP connection to us, or None.

    `peer` is the client's (address, port) as accept() gave it, `local` our own end.
    The client's socket is the one in our namespace's table whose local end is
    `peer` and whose remote end is `local`; /proc/net/tcp{,6} gives its owner
    (the identd question, answered from the kernel instead of the client). An
    IPv4 client of an IPv6 listener shows as ::ffff:a.b.c.d in tcp6. None when
    the socket is not found (the client already closed): callers fail closed.
    """
    entry = tcp_peer_socket(peer, local, proc_root)
    return None if entry is None else entry[0]


def tcp_peer_socket(peer: tuple[str, int], local: tuple[str, int],
                    proc_root: str = "/proc") -> tuple[int, int] | None:
    """(uid, socket inode) of the client end of a loopback TCP connection to us, or None
    (as `tcp_peer_uid`); the inode names the socket in its owner's /proc/PID/fd."""
    want_local = _endpoint_key(*peer)
    want_remote = _endpoint_key(*local)
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"{proc_root}/net/{name}", "rb") as fh:
                for line in fh:
                    f = line.split()
                    if len(f) < 10 or not f[0].endswith(b":"):
                        continue
                    try:
                        laddr, lport = _hex_endpoint(f[1].decode(), v6)
                        raddr, rport = _hex_endpoint(f[2].decode(), v6)
                    except (ValueError, struct.error):
                        continue
                    if (_mapped(laddr), lport) == want_local and (_mapped(raddr), rport) == want_remote:
                        return int(f[7]), int(f[9])
        except FileNotFoundError:
            continue
    return None


def _endpoint_key(host: str, port: int) -> tuple[bytes, int]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _mapped(socket.inet_pton(family, host.split("%")[0])), int(port)


def _mapped(addr: bytes) -> bytes:
    """IPv4 as the IPv6-mapped form, so ::ffff:127.0.0.1 and 127.0.0.1 compare equal."""
    return b"\0" * 10 + b"\xff\xff" + addr if len(addr) == 4 else addr
