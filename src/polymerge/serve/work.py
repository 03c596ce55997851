"""One row of work: what a request asks of the model for one prompt or input, and its answer.

A request becomes one :class:`Row` per prompt (or input); rows wait in the batcher's queue,
run in batches with rows of other requests, and each is answered through its own future (and,
when streaming, its ``sink``, called with each piece of text as it is decoded).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from polymerge.serve.catalog import RowRouting

KINDS = ("generate", "forward", "route")


@dataclass
class Sampling:
    """Per-row generation settings: ``temperature`` 0 is greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Answer:
    """A row's answer: the expert that served it (the top weight) and the weights it ran with
    (``weights``; for ``route`` rows, the router's), plus ``text``, ``tokens`` and
    ``finish_reason`` (generate) or ``output`` (forward: the row's outputs, tokens x dim)."""

    expert: str
    weights: dict[str, float]
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    output: Any = None


@dataclass
class Row:
    kind: str
    text: str
    routing: RowRouting
    endpoint: str
    route_text: str | None = None
    sampling: Sampling | None = None
    sink: Callable[[str], None] | None = None
    deadline: float = float("inf")
    prompt_tokens: int = 0
    enqueued: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    streamed: bool = False
    """Whether part of the answer went to the sink already."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown row kind {self.kind!r}")
        if self.route_text is None:
            self.route_text = self.text

    @property
    def live(self) -> bool:
        """Still wanted: not cancelled, not past its deadline, not answered."""
        return not (self.cancelled.is_set() or self.future.done()
                    or time.monotonic() > self.deadline)

    def answer(self, answer: Answer) -> None:
        if not self.future.done():
            self.future.set_result(answer)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
