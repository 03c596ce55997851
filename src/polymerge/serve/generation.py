"""Per-row generation settings inside one batched ``generate`` call.

The runtime generates a batch with transformers' ``generate``; rows of one batch come from
different requests, so each row keeps its own ``max_tokens``, ``temperature``, ``top_p``,
``stop`` and ``seed``, and streams its own text. Two hooks carry that per-row state:

* :class:`RowSampler` (a logits processor) draws each sampling row's next token from its own
  ``torch.Generator`` (seeded by the request's ``seed``: the same request gives the same text
  whatever it is batched with), after its temperature and top-p, and leaves that token the
  only one allowed; greedy rows are left to ``generate``'s argmax;
* :class:`RowStops` (a stopping criterion) reads each new token: end of sequence, a stop
  sequence in the decoded text (the text is cut before it), ``max_tokens`` or a cancelled
  request finishes the row (``generate`` then pads it) and answers it at once; it also sends
  the decoded text's new part to a streaming row's sink, holding back what could still change
  (a possible start of a stop sequence, trailing whitespace, an incomplete character).

Both take ``select_rows(rows)``, the narrowing a switching runtime applies when it runs the
rows by expert group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from polymerge.serve.work import Row

Answered = Callable[[int], None]


class Decoding:
    """The per-row state of one generate batch (see the module docstring). ``on_finish(i)``
    is called once when row ``i`` finishes."""

    def __init__(self, rows: Sequence[Row], tokenizer: Any, eos_ids: set[int],
                 on_finish: Answered) -> None:
        self.rows = list(rows)
        self.tokenizer = tokenizer
        self.eos = eos_ids
        self.on_finish = on_finish
        n = len(self.rows)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.text = [""] * n
        self.sent = [0] * n
        self.finish: list[str | None] = [None] * n
        self.generators: list[torch.Generator | None] = []
        for row in self.rows:
            s = row.sampling
            if s is not None and s.temperature > 0:
                g = torch.Generator()
                g.manual_seed(s.seed if s.seed is not None
                              else int(torch.randint(0, 2**62, (1,)).item()))
                self.generators.append(g)
            else:
                self.generators.append(None)

    @property
    def samples(self) -> bool:
        return any(g is not None for g in self.generators)

    def done(self, i: int) -> bool:
        return self.finish[i] is not None

    # -- per step
    def step(self, i: int, token: int) -> bool:
        """Row ``i`` produced ``token``; returns whether it is finished."""
        if self.finish[i] is not None:
            return True
        row = self.rows[i]
        s = row.sampling
        assert s is not None
        if not row.live:
            return self._finish(i, "cancelled")
        if token in self.eos:
            return self._finish(i, "stop")
        self.tokens[i].append(token)
        text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
        for stop in s.stop:
            at = text.find(stop, max(0, self.sent[i] - len(stop)))
            if at >= 0:
                text = text[:at]
                self.text[i] = text
                return self._finish(i, "stop")
        self.text[i] = text
        if len(self.tokens[i]) >= s.max_tokens:
            return self._finish(i, "length")
        if row.sink is not None:
            self._send(i, self._safe_end(text, s.stop))
        return False

    def close(self) -> None:
        """After ``generate`` returned: rows it ended (its own length limit) are finished."""
        for i in range(len(self.rows)):
            if self.finish[i] is None:
                self._finish(i, "length")

    def _finish(self, i: int, reason: str) -> bool:
        self.finish[i] = reason
        if self.rows[i].sink is not None:
            self._send(i, len(self.text[i]))
        self.on_finish(i)
        return True

    def _send(self, i: int, end: int) -> None:
        if end > self.sent[i]:
            row = self.rows[i]
            assert row.sink is not None
            row.streamed = True
            row.sink(self.text[i][self.sent[i]:end])
            self.sent[i] = end

    @staticmethod
    def _safe_end(text: str, stops: Sequence[str]) -> int:
        end = len(text.rstrip())  # cleanup of spaces may still change trailing whitespace
        while end and text[end - 1] == "\ufffd":  # an incomplete multi-byte character
            end -= 1
        for stop in stops:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
        return max(end, 0)


class RowSampler(LogitsProcessor):
    """Each sampling row's next token from its own generator (see the module docstring)."""

    def __init__(self, decoding: Decoding, rows: Sequence[int] | None = None) -> None:
        self.decoding = decoding
        self.rows = list(range(len(decoding.rows))) if rows is None else list(rows)

    def select_rows(self, rows: Sequence[int]) -> RowSampler:
        return RowSampler(self.decoding, [self.rows[i] for i in rows])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = None
        for local, i in enumerate(self.rows):
            g = self.decoding.generators[i]
            if g is None or self.decoding.done(i):
                continue
            s = self.decoding.rows[i].sampling
            assert s is not None
            logits = scores[local].float() / s.temperature
            probs = torch.softmax(logits, -1)
            if s.top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                keep = ordered.cumsum(0) - ordered < s.top_p  # the smallest set reaching top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], ordered[keep])
            token = int(torch.multinomial(probs.cpu(), 1, generator=g))
            if out is None:
                out = scores.clone()
            out[local].fill_(float("-inf"))
            out[local, token] = 0.0
        return scores if out is None else out


class RowStops(StoppingCriteria):
    """Per-row ends and streaming (see the module docstring)."""

    def __init__(self, decoding: Decoding, rows: Sequence[int] | None = None) -> None:
        self.decoding = decoding
        self.rows = list(range(len(decoding.rows))) if rows is None else list(rows)

    def select_rows(self, rows: Sequence[int]) -> RowStops:
        return RowStops(self.decoding, [self.rows[i] for i in rows])

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        done = [self.decoding.step(i, int(last[local])) for local, i in enumerate(self.rows)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
