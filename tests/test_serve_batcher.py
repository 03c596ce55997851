"""The server's batching, without a model: how the model thread forms batches from the queue
(returning clients are waited for, a lone client is not), how a forward batch is cut into
chunks of similar length, and the listening socket (no Nagle delay on its connections)."""

from __future__ import annotations

import itertools
import socket
import statistics
import threading
import time
from typing import Any

from polymerge.serve.batcher import Batcher
from polymerge.serve.catalog import RowRouting
from polymerge.serve.engine import CHUNK_TOKENS, chunks
from polymerge.serve.metrics import Metrics
from polymerge.serve.server import bind
from polymerge.serve.work import Answer, Row


class SlowEngine:
    """Answers every row of a batch after ``seconds``; records (rows, waits) per batch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.batches: list[tuple[int, float]] = []

    def run(self, rows: list[Row]) -> None:
        start = time.monotonic()
        self.batches.append((len(rows), start - min(r.enqueued for r in rows)))
        time.sleep(self.seconds)
        for r in rows:
            r.answer(Answer("e", {"e": 1.0}))


def _closed_loop(clients: int, *, batch_seconds: float, turnaround: float, rounds: int,
                 max_wait_ms: float = 10.0) -> SlowEngine:
    """``clients`` threads, each sending its next row ``turnaround`` seconds after its last
    was answered, ``rounds`` times."""
    engine = SlowEngine(batch_seconds)
    b = Batcher(engine, Metrics(), max_batch=32, max_wait_ms=max_wait_ms,  # type: ignore[arg-type]
                max_queue=256)
    b.start()

    def client(k: int) -> None:
        time.sleep(0.003 * k)  # the first requests trickle in
        for _ in range(rounds):
            row = Row("forward", f"text {k}", RowRouting(), "classify")
            b.submit([row])
            row.future.result(timeout=30)
            time.sleep(turnaround)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close()
    return engine


def test_returning_clients_make_full_batches():
    """Under a closed loop the rows a batch answered come back a little later; the model
    thread waits for them instead of alternating a big batch and a small one."""
    engine = _closed_loop(8, batch_seconds=0.3, turnaround=0.03, rounds=6)
    sizes = [n for n, _ in engine.batches]
    assert sum(sizes) == 48
    # after the first batches (the clients arrive one by one), every batch holds every client
    assert statistics.median(sizes) == 8, sizes
    assert len(sizes) <= 9, sizes


def test_one_client_never_waits_for_others():
    engine = _closed_loop(1, batch_seconds=0.05, turnaround=0.01, rounds=6)
    assert [n for n, _ in engine.batches] == [1] * 6
    # each row starts about max_wait_ms (10 ms) after it arrived, not a share of a batch
    assert statistics.median(w for _, w in engine.batches) < 0.04


def test_no_wait_with_max_wait_zero():
    engine = _closed_loop(4, batch_seconds=0.1, turnaround=0.03, rounds=3, max_wait_ms=0)
    assert sum(n for n, _ in engine.batches) == 12
    assert max(w for _, w in engine.batches[1:]) < 0.12  # nobody waits for returning rows


def _partitions(items: list[int]) -> Any:
    """Every set partition of ``items``."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1:]
        yield [[first], *part]


def _cost(parts: list[list[int]], lengths: list[int], fixed: float) -> float:
    return sum(fixed + len(p) * max(lengths[i] for i in p) for p in parts)


def test_chunks_are_the_cheapest_cut():
    """The cut equals the best of every set partition (brute force), on a few length lists."""
    cases = [[6, 67, 33, 20, 21, 60, 8], [10] * 6, [1, 200], [5, 90, 91, 92, 4, 3, 50],
             [30, 31, 29, 33, 64]]
    for lengths in cases:
        for fixed in (CHUNK_TOKENS, 1.0, 500.0):
            got = chunks(lengths, fixed)
            assert sorted(itertools.chain(*got)) == list(range(len(lengths)))
            best = min(_cost(p, lengths, fixed) for p in _partitions(list(range(len(lengths)))))
            assert abs(_cost(got, lengths, fixed) - best) < 1e-9, (lengths, fixed, got)
    # equal lengths: one chunk; a tiny fixed cost: one chunk per distinct length
    assert chunks([10] * 5) == [[0, 1, 2, 3, 4]]
    assert chunks([3, 9, 3, 9], 0.5) == [[0, 2], [1, 3]]
    assert chunks([]) == []


def test_the_listening_socket_is_tcp_without_nagle():
    """asyncio sets TCP_NODELAY on accepted connections only when the socket's proto says TCP
    (else each kept-alive response waited 40 ms for a delayed ACK)."""
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sock.listen()
        client = socket.create_connection(sock.getsockname())
        conn, _ = sock.accept()
        try:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            conn.close()
            client.close()
    finally:
        sock.close()
