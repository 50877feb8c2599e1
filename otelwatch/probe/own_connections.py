"""An agent's connections to otelwatch itself are not the agent's network.

An agent whose own OpenTelemetry points at otelwatch ([sources.otlp]) keeps a
keep-alive connection to otelwatch's listener. Counted as the agent's TCP, it
would read as "sleeping on an open connection" (`waiting_on_network`) while the
agent is really retrying a dead API or doing nothing at all, and it would keep
the stuck gate's "zero TCP" from ever holding. So the daemon removes, from each
sample, the connections whose remote end is one of its own listeners on
loopback, before the sample is classified.

Pure: works on a `TreeSample`, returns it unchanged (the same object) when there
is nothing to remove.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace

from otelwatch.model import ProcessSample, TcpConnection, TreeSample

__all__ = ["to_self", "without_own_connections"]


def to_self(conn: TcpConnection, ports: Collection[int]) -> bool:
    """Whether `conn` goes to one of otelwatch's listeners (`ports`) on loopback."""
    host, sep, port = conn.remote.rpartition(":")
    if not sep or not port.isdigit() or int(port) not in ports:
        return False
    host = host.strip("[]").lower()
    return host.startswith("127.") or host == "::1" or host.startswith("::ffff:127.")


def without_own_connections(sample: TreeSample, ports: Collection[int]) -> TreeSample:
    if not ports or not any(to_self(c, ports) for p in sample.processes for c in p.connections):
        return sample
    removed: dict[str, int] = {}
    processes: list[ProcessSample] = []
    for p in sample.processes:
        mine = [c for c in p.connections if to_self(c, ports)]
        if not mine:
            processes.append(p)
            continue
        for c in mine:
            removed[c.state] = removed.get(c.state, 0) + 1
        processes.append(replace(p, connections=tuple(c for c in p.connections if not to_self(c, ports)),
                                 tcp=None if p.tcp is None else _minus(p.tcp, mine)))
    tcp = None if sample.tcp is None else _minus_counts(sample.tcp, removed)
    return replace(sample, processes=tuple(processes), tcp=tcp)


def _minus(tcp: Mapping[str, int], conns: list[TcpConnection]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in conns:
        counts[c.state] = counts.get(c.state, 0) + 1
    return _minus_counts(tcp, counts)


def _minus_counts(tcp: Mapping[str, int], counts: Mapping[str, int]) -> dict[str, int]:
    out = {state: n - counts.get(state, 0) for state, n in tcp.items()}
    return {state: n for state, n in out.items() if n > 0}
