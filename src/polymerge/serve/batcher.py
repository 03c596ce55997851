"""The queue of rows and the one model thread that runs them in batches.

Requests put rows in a bounded queue (:meth:`Batcher.submit`: refused with 503 when full, or
while shutting down). The model thread takes the oldest row and waits, up to ``max_wait_ms``
after that row arrived, for rows of the same kind (generate, forward, route) to join it, up to
``max_batch``; then it runs every queued row of that kind (up to ``max_batch``) as one batch
(:class:`~.engine.Engine`). A row that arrives while a batch runs joins the next one.

**Returning clients.** The rows a batch answers usually come back: a client sends its next
request when it has its answer, a few tens of milliseconds later (the response is written, read,
and the next request parsed). Started at once, the next batch would hold only the few rows that
arrived while the last one ran, and the returning rows would wait for that small batch to end:
under a closed loop the batches alternate big and small, each small one costing almost what a
big one costs (a generation step's cost is mostly fixed). So while fewer rows of a kind are
queued than the last batch of that kind answered plus those that were waiting when it ended,
the model thread waits for more, at most ``RETURN_SHARE`` of that kind's batch time (a running
estimate) after the last batch ended, and never more than ``RETURN_CAP`` seconds; it starts as
soon as that many rows are queued (or ``max_batch``). With ``max_wait_ms`` 0 it never waits.
One client alone never waits for this (its batches have one row). Rows cancelled or past their
deadline are dropped unrun. :meth:`Batcher.close` stops taking rows and, with ``drain``, runs
what is queued before the thread ends.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Sequence

from polymerge.serve.engine import Engine
from polymerge.serve.errors import bad_request, queue_full, shutting_down
from polymerge.serve.metrics import Metrics
from polymerge.serve.work import Row

RETURN_SHARE = 0.25
"""The longest wait for returning rows, as a share of a batch's running time."""
RETURN_CAP = 0.5
"""The longest wait for returning rows, in seconds."""


class Batcher:
    """See the module docstring."""

    def __init__(self, engine: Engine, metrics: Metrics, *, max_batch: int,
                 max_wait_ms: float, max_queue: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: collections.deque[Row] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._drain = True
        self._batch_seconds = 0.5  # a running estimate, for Retry-After
        self._last: dict[str, tuple[int, float, float]] = {}
        """Per kind: (rows expected, end, running estimate of the seconds per batch) after the
        last batch: the rows expected are its own and those that were waiting when it ended."""
        self._thread = threading.Thread(target=self._loop, name="polymerge-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, rows: Sequence[Row]) -> None:
        """Queue a request's rows (all or none)."""
        if len(rows) > self.max_queue:
            raise bad_request(f"{len(rows)} prompts in one request; the queue holds "
                              f"{self.max_queue}")
        with self._cond:
            if self._closed:
                raise shutting_down()
            if len(self._queue) + len(rows) > self.max_queue:
                batches = math.ceil((len(self._queue) + len(rows)) / self.max_batch)
                raise queue_full(max(1, math.ceil(batches * self._batch_seconds)))
            self._queue.extend(rows)
            self.metrics.queue.set(len(self._queue))
            self._cond.notify_all()

    def wake(self) -> None:
        """Let the model thread look at the queue again (a row was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking rows; with ``drain`` run the queued ones first; wait for the thread."""
        with self._cond:
            self._closed = True
            self._drain = drain
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the model thread
    def _prune(self) -> None:
        """Drop rows nobody waits for any more (lock held)."""
        if any(not r.live for r in self._queue):
            for r in [r for r in self._queue if not r.live]:
                r.fail(TimeoutError("cancelled"))
            self._queue = collections.deque(r for r in self._queue if r.live)
            self.metrics.queue.set(len(self._queue))

    def _take(self) -> list[Row] | None:
        with self._cond:
            while True:
                self._prune()
                if self._queue and not (self._closed and not self._drain):
                    break
                if self._closed:
                    for r in self._queue:
                        r.fail(shutting_down())
                    self._queue.clear()
                    return None
                self._cond.wait(0.5)
            kind = self._queue[0].kind
            while not self._closed:
                count = sum(1 for r in self._queue if r.kind == kind)
                if count >= self.max_batch:
                    break
                left = self._until(kind, count) - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                self._prune()
                if not self._queue:
                    return []
                kind = self._queue[0].kind
            batch: list[Row] = []
            rest: collections.deque[Row] = collections.deque()
            for r in self._queue:
                if r.kind == kind and len(batch) < self.max_batch:
                    batch.append(r)
                else:
                    rest.append(r)
            self._queue = rest
            self.metrics.queue.set(len(self._queue))
            return batch

    def _until(self, kind: str, count: int) -> float:
        """When the batch of ``kind`` whose oldest row is first in the queue starts, ``count``
        rows of that kind being queued (lock held; see the module docstring)."""
        until = self._queue[0].enqueued + self.max_wait
        last = self._last.get(kind)
        if self.max_wait > 0 and last is not None and count < last[0]:
            _, end, seconds = last
            until = max(until, end + min(RETURN_SHARE * seconds, RETURN_CAP))
        return until

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            start = time.monotonic()
            self.engine.run(batch)
            end = time.monotonic()
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (end - start)
            kind = batch[0].kind
            previous = self._last.get(kind)
            seconds = end - start if previous is None else 0.8 * previous[2] + 0.2 * (end - start)
            with self._cond:  # the rows to expect: those waiting, and the batch's coming back
                waiting = sum(1 for r in self._queue if r.kind == kind)
                self._last[kind] = (len(batch) + waiting, end, seconds)
