"""The probe's worker pool: daemon threads that run one tick's reads, and retire a worker hung in the kernel.

Why not concurrent.futures: see `Pool`. Owns threads and job states only; what a
job reads is the prober's (probe.py).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

__all__ = ["CANCELLED", "DONE", "PENDING", "RUNNING", "Batch", "Job", "Pool"]

PENDING, RUNNING, DONE, CANCELLED = range(4)


class Batch:
    """Counts the unfinished jobs of one tick so the coordinator can wait for all at once."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition()
        self.pending = n

    def finish(self) -> None:
        with self.cond:
            self.pending -= 1
            if self.pending <= 0:
                self.cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """True when every job of the batch has finished."""
        with self.cond:
            return self.cond.wait_for(lambda: self.pending <= 0, timeout=max(0.0, timeout))


class Job:
    __slots__ = ("args", "batch", "error", "fn", "result", "started", "state", "worker")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], batch: Batch) -> None:
        self.fn = fn
        self.args = args
        self.batch = batch
        self.state = PENDING
        self.result: Any = None
        self.error: BaseException | None = None
        self.worker: threading.Thread | None = None
        self.started = 0.0  # monotonic time it started running


class Pool:
    """Daemon threads fed from one queue.

    Not concurrent.futures: its threads are joined at interpreter exit, so one read
    hung in the kernel would keep the daemon from ever exiting; and its pool cannot
    replace a stuck worker. Here a worker stuck past its job's deadline is retired
    and replaced, so a hung read costs one thread while it lasts, not the pool.
    """

    def __init__(self, size: int, name: str) -> None:
        self._size = max(1, size)
        self._name = name
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._healthy: set[threading.Thread] = set()
        self._current: dict[threading.Thread, Job] = {}  # what each worker runs now
        self._retired: set[threading.Thread] = set()
        self._closed = False
        self._started = 0

    def submit(self, jobs: Collection[Job]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("pool is shut down")
            while len(self._healthy) < min(self._size, len(jobs)):
                self._start_locked()
        for job in jobs:
            self._queue.put(job)

    def _start_locked(self) -> None:
        self._started += 1
        t = threading.Thread(target=self._run, name=f"{self._name}-{self._started}", daemon=True)
        self._healthy.add(t)
        t.start()

    def _retire_locked(self, worker: threading.Thread) -> None:
        """Set aside a worker stuck in a job and start a replacement; it exits when the job ends."""
        self._healthy.discard(worker)
        self._retired.add(worker)
        if not self._closed:
            self._start_locked()

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            job = self._queue.get()
            if job is None:
                break
            with self._lock:
                if job.state != PENDING:
                    continue  # cancelled at its deadline before it started
                job.state, job.worker, job.started = RUNNING, me, time.monotonic()
                self._current[me] = job
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # one job's failure must not kill the worker
                job.error = exc
            with self._lock:
                job.state = DONE
                self._current.pop(me, None)
                retired = me in self._retired
            job.batch.finish()
            if retired:
                break
        with self._lock:
            self._healthy.discard(me)
            self._retired.discard(me)

    def abandon(self, job: Job) -> int:
        """At a job's deadline: cancel it if it has not started; if it is running, retire its
        worker and start a replacement. Returns the job's state after that."""
        with self._lock:
            if job.state == PENDING:
                job.state = CANCELLED
            elif job.state == RUNNING and job.worker in self._healthy:
                self._retire_locked(job.worker)
            return job.state

    def unblock(self, budget: float) -> None:
        """Retire every healthy worker whose job has run longer than `budget` and start a
        replacement, so the jobs queued behind a hung read go on at once. The slow job
        keeps running and still counts if it finishes before the tick's deadline."""
        now = time.monotonic()
        with self._lock:
            for worker, job in list(self._current.items()):
                if worker in self._healthy and now - job.started > budget:
                    self._retire_locked(worker)

    def hung_threads(self) -> int:
        with self._lock:
            return len(self._retired)

    def shutdown(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._healthy)
        for _ in threads:
            self._queue.put(None)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        # Retired workers are daemon threads stuck in the kernel; they cannot be
        # interrupted and do not keep the process alive.
