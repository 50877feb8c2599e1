"""The agents' own OpenTelemetry in: the OTLP/HTTP receiver and its join to sessions.

Owns `OtlpReceiver`: `handle()` runs on an HTTP worker for `POST /v1/logs`,
`/v1/metrics` and `/v1/traces` ([sources.otlp]): it decodes the body
(`otlp_decode`), finds which process sent it (the client socket's inode among
the fds of the tracked sessions' process trees), queues its log records for the
loop (bounded), hands the body to the forwarder (`otlp_forward`, bounded) and
answers at once: the agent never waits on otelwatch, and a full queue drops
(counted) rather than slowing it. `drain()` runs on the loop thread: it joins
each record to its session (the agent's session id = a transcript id otelwatch
follows, Codex's conversation id = its rollout id, Gemini's `process.pid`, else
the sender's process), delivers its event (`otlp_events`) and adds its tokens
and cost to the session's `usage` and to the per-agent, per-model counters.

Trust (DESIGN.md "Trust boundaries"): a record is *own* only when the process
that sent it belongs to the joined session's process tree; every other record
is *observed* (source `otlp_observed`, dated by its arrival): it can make the
session look alive, never stand for its processes' reaction to a turn. The
listener's rules hold here too (loopback, allowed users, bounded bodies).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from otelwatch.model import same_process
from otelwatch.sources.otlp_decode import OtlpDecodeError, OtlpRecord, decode_request
from otelwatch.sources.otlp_events import OWN_SOURCE, USAGE_KEYS, meaning, usage_json

if TYPE_CHECKING:
    from otelwatch.probe.proctable import ProcessTable
    from otelwatch.sessions.table import SessionTable, Tracked
    from otelwatch.sources.otlp_forward import Forwarder

__all__ = ["OBSERVED", "OWN", "QUEUE_MAX", "OtlpReceiver", "OtlpStats"]

OWN = OWN_SOURCE  # records from inside the session's own tree
OBSERVED = "otlp_observed"
QUEUE_MAX = 20_000  # log records waiting for the loop
DRAIN_PER_TICK = 10_000
PENDING_USAGE_MAX = 1000  # sessions not (yet) known whose tokens are kept for when they appear
PEER_CACHE = 512
MISS_TTL_S = 10.0  # a client socket found in no candidate process is looked for again after this
MAX_CANDIDATES = 512  # processes whose fds one request's sender is searched among
OLDER_CANDIDATES = 32
# How much CPU one request's sender may be looked for with before it is answered without
# (its records then count as observed): the agent waits for the answer. The budget is the
# worker thread's own CPU time, not the wall clock: on a loaded host a search preempted
# for 20 ms would otherwise end before reading a single fd, and a session's own records
# would read as an outsider's.
SEARCH_BUDGET_S = 0.02
MODELS_MAX = 64  # distinct (agent, model) label pairs on the counters; the rest are "other"
_PB = "application/x-protobuf"


@dataclass
class OtlpStats:
    requests: int = 0
    records: int = 0  # log records queued
    items: int = 0  # log records, metric points and spans received
    dropped: int = 0  # log records not queued (queue full, past a request's bound)
    rejected: int = 0  # requests refused (undecodable)
    own: int = 0
    observed: int = 0
    unjoined: int = 0


class OtlpReceiver:
    """One per daemon. `handle` from HTTP workers, `drain` from the loop."""

    def __init__(self, *, forwarder: Forwarder | None = None, queue_max: int = QUEUE_MAX,
                 usage_counter: Callable[[str, str, Mapping[str, float]], None] | None = None,
                 clock: Callable[[], float] = time.time, proc_root: str = "/proc") -> None:
        self.forwarder = forwarder
        self._queue_max = queue_max
        self._usage_counter = usage_counter
        self._clock = clock
        self._proc = proc_root
        # (arrival time, sender's pid or None, sender's uid or None, record) for the loop;
        # appends and pops are atomic.
        self._queue: deque[tuple[float, int | None, int | None, OtlpRecord]] = deque()
        self.stats = OtlpStats()
        self._lock = threading.Lock()  # stats and the peer cache, shared by the workers
        self._peers: OrderedDict[tuple[int, int], int | None] = OrderedDict()  # (uid, inode) -> pid
        self._missed: OrderedDict[tuple[int, int], float] = OrderedDict()  # (uid, inode) -> when
        # Every pid of every live session's process tree, and every pid of the whole table,
        # published by the loop each tick: a client socket is searched for only among the
        # sessions' processes and those started since (an agent not discovered yet).
        self._root_pids: frozenset[int] = frozenset()
        self._tree_pids: frozenset[int] = frozenset()
        self._known_pids: frozenset[int] | None = None
        self._self_pid = os.getpid()
        self._pending_usage: OrderedDict[str, tuple[dict[str, float], str]] = OrderedDict()
        self._models: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ HTTP worker side

    def handle(self, signal: str, body: bytes, content_type: str, encoding: str,
               peer_socket: tuple[int, int] | None) -> tuple[int, bytes, str]:
        """(status, body, content type) of the answer to one export request. Never raises."""
        media = content_type.split(";", 1)[0].strip().lower()
        answer_type = "application/json" if media == "application/json" else _PB
        try:
            decoded = decode_request(signal, body, content_type, encoding)
        except OtlpDecodeError as exc:
            with self._lock:
                self.stats.rejected += 1
            return exc.status, _error_body(str(exc), answer_type), answer_type
        now = self._clock()
        peer = self._peer_pid(peer_socket) if decoded.records else None
        uid = None if peer_socket is None else peer_socket[0]
        room = max(0, self._queue_max - len(self._queue))
        take = decoded.records[:room]
        for record in take:
            self._queue.append((now, peer, uid, record))
        with self._lock:
            s = self.stats
            s.requests += 1
            s.items += decoded.items
            s.records += len(take)
            s.dropped += decoded.dropped + len(decoded.records) - len(take)
        if self.forwarder is not None:
            # The body as it came (inflated): resources, records and attributes untouched.
            from otelwatch.sources.otlp_decode import inflate

            with contextlib.suppress(OtlpDecodeError):
                self.forwarder.submit(signal, "application/json" if media == "application/json" else _PB,
                                      inflate(body, encoding))
        # An empty export response (full success), in the request's encoding.
        return HTTPStatus.OK, (b"{}" if answer_type == "application/json" else b""), answer_type

    def _peer_pid(self, peer_socket: tuple[int, int] | None) -> int | None:
        """The pid of the tracked process whose fds hold the client's socket; None when it is
        not one of the sessions' processes (or the socket is gone)."""
        if peer_socket is None or peer_socket[1] == 0:
            return None
        now = time.monotonic()
        with self._lock:
            if peer_socket in self._peers:
                self._peers.move_to_end(peer_socket)
                return self._peers[peer_socket]
            if self._missed.get(peer_socket, -math.inf) > now - MISS_TTL_S:
                return None
        target = f"socket:[{peer_socket[1]}]"
        found: int | None = None
        give_up = time.thread_time() + SEARCH_BUDGET_S  # the agent is waiting for its answer
        for pid in self._candidates(peer_socket[0]):
            fd_dir = f"{self._proc}/{pid}/fd"
            try:
                names = os.listdir(fd_dir)
            except OSError:
                continue
            for name in names:
                try:
                    if os.readlink(f"{fd_dir}/{name}") == target:
                        found = pid
                        break
                except OSError:
                    continue
            if found is not None or time.thread_time() > give_up:
                break
        with self._lock:
            if found is not None:  # the socket's owner, whatever it is
                self._peers[peer_socket] = found
                while len(self._peers) > PEER_CACHE:
                    self._peers.popitem(last=False)
            else:  # not one of the candidates: not looked for again on this connection for a while
                self._missed[peer_socket] = now
                self._missed.move_to_end(peer_socket)
                while len(self._missed) > PEER_CACHE:
                    self._missed.popitem(last=False)
        return found

    def _candidates(self, uid: int) -> Iterator[int]:
        """Where the sender is looked for, most likely first: the sessions' root processes,
        the sender's user's processes newer than the loop's last process table (an agent
        started since), the rest of the sessions' trees, then that user's OLDER_CANDIDATES
        newest other processes (an agent the loop has seen but not yet taken for a
        session); at most MAX_CANDIDATES in all, within SEARCH_BUDGET_S (the caller's)."""
        roots, tree = self._root_pids, self._tree_pids
        yield from roots
        known = self._known_pids or frozenset()
        try:
            pids = sorted((int(n) for n in os.listdir(self._proc) if n.isdigit()), reverse=True)
        except OSError:
            return
        rest: list[int] = []
        given = len(roots)
        for pid in pids:
            if pid in roots or pid == self._self_pid:
                continue
            if pid in tree:
                continue  # after the new ones

            try:
                if uid != 0 and os.stat(f"{self._proc}/{pid}").st_uid != uid:
                    continue
            except OSError:
                continue
            if pid in known:
                rest.append(pid)
                continue
            given += 1
            yield pid
            if given >= MAX_CANDIDATES:
                return
        for pid in tree:
            if pid not in roots:
                given += 1
                yield pid
        yield from rest[:min(OLDER_CANDIDATES, max(0, MAX_CANDIDATES - given))]

    def __len__(self) -> int:
        return len(self._queue)

    def health(self) -> dict[str, Any]:
        """The receiver's counts for /healthz: requests, records, own/observed/unjoined, drops,
        and the forwarder's."""
        with self._lock:
            out: dict[str, Any] = dict(self.stats.__dict__)
        out["queued"] = len(self._queue)
        fwd = self.forwarder
        if fwd is not None:
            out["forward"] = {"sent": fwd.sent, "dropped": fwd.dropped, "failures": fwd.failures,
                              "failed_by_signal": dict(fwd.failed_by_signal), "queued_bytes": fwd.queued_bytes}
        return out

    # ------------------------------------------------------------------ loop side

    def drain(self, sessions: SessionTable, table: ProcessTable, now: float) -> None:
        """Join at most DRAIN_PER_TICK queued records to their sessions and deliver them."""
        live = [t for t in sessions.values() if t.ended_at is None and t.spec.pid is not None]
        # Ended sessions (still listed) too: an agent flushes its last records as it exits.
        roots = {t.spec.pid: t for t in sessions.values() if t.ended_at is not None and t.spec.pid is not None}
        roots.update((t.spec.pid, t) for t in live if t.spec.pid is not None)
        tree: set[int] = set()
        for t in live:
            assert t.spec.pid is not None
            tree.update(table.descendants(t.spec.pid))
        self._root_pids = frozenset(t.spec.pid for t in live if t.spec.pid is not None)
        self._tree_pids = frozenset(tree)
        self._known_pids = frozenset(info.pid for info in table)
        for sid, (usage, model) in list(self._pending_usage.items()):
            tracked = sessions.find(sid)
            if tracked is not None:
                del self._pending_usage[sid]
                _add_usage(tracked, usage, model)
        owners: dict[int, int | None] = {}
        counted: dict[tuple[str, str], dict[str, float]] = {}  # usage by (agent, model), added once
        for _ in range(min(len(self._queue), DRAIN_PER_TICK)):
            arrived, peer, uid, record = self._queue.popleft()
            try:
                self._deliver(sessions, table, roots, arrived, peer, uid, record, owners, counted)
            except Exception:  # one bad record never costs the others
                with self._lock:
                    self.stats.dropped += 1
        if self._usage_counter is not None:
            for (agent, model), usage in counted.items():
                with contextlib.suppress(Exception):
                    self._usage_counter(agent, model, usage)

    def _deliver(self, sessions: SessionTable, table: ProcessTable, roots: Mapping[int, Tracked],
                 arrived: float, peer: int | None, uid: int | None, record: OtlpRecord,
                 owners: dict[int, int | None], counted: dict[tuple[str, str], dict[str, float]]) -> None:
        said = meaning(record, arrived, OWN)
        if said.usage and self._usage_counter is not None:
            model = said.model or "unknown"
            if (said.agent, model) not in self._models:
                if len(self._models) >= MODELS_MAX:
                    model = "other"
                else:
                    self._models.add((said.agent, model))
            sums = counted.setdefault((said.agent, model), {})
            for key, value in said.usage.items():
                sums[key] = sums.get(key, 0) + value
        tracked = None
        for sid in said.session_ids:
            tracked = sessions.find(sid)
            if tracked is not None:
                break
        peer_session = _session_of(peer, table, roots)
        if peer_session is not None and peer is not None and not _same(peer_session, peer, table):
            peer_session = None  # the pid of an ended session, reused by another process
        if tracked is None and said.pid is not None:
            claimed = _session_of(said.pid, table, roots)
            # A pid in a record is a claim (Gemini's process.pid): it joins only a process of the
            # sender's own user (root may speak for any), and as observed unless the sender is
            # in that tree.
            if claimed is not None and (claimed is peer_session or uid == 0
                                        or (uid is not None and self._owner(said.pid, owners) == uid)):
                tracked = claimed
        if tracked is None and peer_session is not None:
            tracked = peer_session
        own = tracked is not None and peer_session is tracked
        event = said.event_at(said.time, OWN) if own else said.event_at(arrived, OBSERVED)
        with self._lock:
            if tracked is None:
                self.stats.unjoined += 1
            elif own:
                self.stats.own += 1
            else:
                self.stats.observed += 1
        if tracked is None:
            if said.session_ids:
                if event is not None:
                    sessions.deliver(said.session_ids[0], event, None)  # kept, bounded, for when it appears
                if said.usage:
                    self._keep_pending(said.session_ids[0], said.usage, said.model)
            return
        if own:
            # The session's own process names its ids: they lead to it from now on (records
            # that come before otelwatch matched its transcript, records from other senders).
            for sid in said.session_ids:
                if sessions.find(sid) is None:
                    sessions.adopt(sid, tracked)
        if event is not None:
            sessions.deliver(tracked.key, event, None)
        if said.usage:
            _add_usage(tracked, said.usage, said.model)

    def _owner(self, pid: int, owners: dict[int, int | None]) -> int | None:
        if pid not in owners:
            try:
                owners[pid] = os.stat(f"{self._proc}/{pid}").st_uid
            except OSError:
                owners[pid] = None
        return owners[pid]

    def _keep_pending(self, sid: str, usage: Mapping[str, float], model: str) -> None:
        totals, last_model = self._pending_usage.pop(sid, ({}, ""))
        for key, value in usage.items():
            totals[key] = totals.get(key, 0.0) + value
        self._pending_usage[sid] = (totals, model or last_model)
        while len(self._pending_usage) > PENDING_USAGE_MAX:
            self._pending_usage.popitem(last=False)

    def shutdown(self, timeout: float = 2.0) -> None:
        """Stop the forwarder (sending what is queued within `timeout`)."""
        if self.forwarder is not None:
            self.forwarder.close(timeout)


def _session_of(pid: int | None, table: ProcessTable, roots: Mapping[int, Tracked]) -> Tracked | None:
    """The live session whose process tree holds `pid` (itself or an ancestor is its root)."""
    if pid is None:
        return None
    if pid in roots:
        return roots[pid]
    for ancestor in table.ancestors(pid)[:64]:
        if ancestor in roots:
            return roots[ancestor]
    return None


def _same(tracked: Tracked, pid: int, table: ProcessTable) -> bool:
    """Whether `pid` (in the table now, or gone) can still be the process `tracked` names."""
    if tracked.spec.pid != pid or tracked.identity is None:
        return True
    info = table.get(pid)
    return info is None or same_process(info.identity, tracked.identity)


def _add_usage(tracked: Tracked, usage: Mapping[str, float], model: str) -> None:
    totals = dict(tracked.usage or {})
    for key in USAGE_KEYS:
        if key in usage:
            totals[key] = totals.get(key, 0) + usage[key]
    if model:
        totals["model"] = model
    tracked.usage = usage_json({k: v for k, v in totals.items() if k != "model"},
                               str(totals.get("model") or ""))
    if tracked.ended_at is not None and tracked.snapshot is not None:
        # An ended session is no longer classified: its listed snapshot takes the late figures.
        tracked.snapshot = replace(tracked.snapshot, usage=tracked.usage)


def _error_body(message: str, media: str) -> bytes:
    if media == "application/json":
        import json

        return json.dumps({"code": 3, "message": message[:300]}).encode()
    return b""

