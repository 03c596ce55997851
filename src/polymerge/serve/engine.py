"""Running a batch of rows on the runtime: one routing pass, then one forward pass or one
generation for every row, each row with its own routing.

Rows of one batch come from different requests and may want different experts: their weights
are stacked into one (rows, N) matrix (explicit weights as given, the router's for rows that
ask for it, one router call per distinct ``top_k``/``temperature``) and the runtime runs the
batch with per-row routing: a mixing store mixes each row with its weights in one pass; a
switching store picks, by its cost rule, one gathered pass or groups switched in turn
(``path="auto"``). Generation goes through the runtime's ``generate`` with per-row hooks
(:mod:`.generation`), so a row's answer is what the runtime gives that row.

A forward batch is cut into chunks of rows of similar length (:func:`chunks`) on a CPU: a
forward pass costs about what its padded tokens cost, so one batch of a 6-token and a
60-token input would run 120 tokens for 66; each chunk costs a fixed ``CHUNK_TOKENS`` more (a
forward pass's own cost: Python, dispatch, the runtime's routing of the chunk), and the cut
minimizes the sum. On an accelerator padding costs little and the batch runs whole.

A batch that fails is run again row by row, so one row's failure is its own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from polymerge.errors import PolymergeError
from polymerge.routing import load_tokenizer
from polymerge.serve.errors import bad_request, internal
from polymerge.serve.generation import Decoding, RowSampler, RowStops
from polymerge.serve.metrics import Metrics
from polymerge.serve.work import Answer, Row

CHUNK_TOKENS = 32
"""The fixed cost of one forward pass, in tokens of the padded batch (about 10-20 ms on one CPU
thread for a MiniLM-size model, what it spends on 30-40 tokens)."""


def chunks(lengths: Sequence[int], fixed: float = CHUNK_TOKENS) -> list[list[int]]:
    """Indices of ``lengths`` cut into chunks that minimize ``sum(fixed + rows * longest)``
    over the chunks (each chunk runs padded to its longest row): rows sorted by length, the
    best cut of the sorted order by dynamic programming; each chunk's indices in input
    order, chunks by increasing length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: the cheapest cut of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + fixed + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out: list[list[int]] = []
    j = n
    while j > 0:
        out.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return out[::-1]


class Engine:
    """Runs batches of rows on ``runtime`` (always from one thread, the model thread)."""

    def __init__(self, runtime: Any, metrics: Metrics) -> None:
        self.rt = runtime
        self.metrics = metrics
        self.experts: list[str] = list(runtime.experts)
        self.options: dict[str, Any] = {"path": "auto"} if runtime.serving == "switch" else {}
        self.tokenizer = load_tokenizer(runtime.folder)  # this thread's own instance
        self.eos: set[int] = set()  # what generate stops a row on
        if runtime.is_causal:
            eos = getattr(getattr(runtime.model, "generation_config", None), "eos_token_id", None)
            self.eos = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])
                        if e is not None}

    # -- routing
    def routed(self, rows: Sequence[Row]) -> torch.Tensor:
        """The (rows, N) weights asked for: explicit, or the router's (grouped by settings)."""
        w = torch.zeros(len(rows), len(self.experts))
        groups: dict[tuple[Any, Any], list[int]] = {}
        for i, row in enumerate(rows):
            if row.routing.weights is not None:
                w[i] = torch.tensor(row.routing.weights)
            else:
                groups.setdefault((row.routing.top_k, row.routing.temperature), []).append(i)
        for (top_k, temperature), idx in groups.items():
            texts = [rows[i].route_text or rows[i].text for i in idx]
            w[idx] = self.rt.route(texts, top_k=top_k, temperature=temperature).float()
        return w

    def served(self, w: torch.Tensor) -> torch.Tensor:
        """The weights rows actually run with (a switching store: top-1)."""
        weights = getattr(self.rt, "weights", None)
        return weights(w, w.shape[0]) if callable(weights) else w

    def _routing(self, w: torch.Tensor, i: int) -> tuple[str, dict[str, float]]:
        row = w[i]
        return (self.experts[int(row.argmax())],
                {e: round(float(v), 6) for e, v in zip(self.experts, row.tolist(), strict=True)})

    # -- running
    def run(self, rows: Sequence[Row]) -> None:
        """Answer every row of one batch (all of one kind)."""
        start = time.perf_counter()
        try:
            self._run(rows)
        except Exception as exc:  # noqa: BLE001 - isolated below, reported per row
            if len(rows) == 1:
                rows[0].fail(_client_error(exc))
            else:
                for row in rows:
                    if row.future.done():
                        continue
                    if row.streamed:  # part of its answer is out: it cannot start over
                        row.fail(internal())
                    else:
                        self.run([row])
        finally:
            self.metrics.batch(rows[0].kind, len(rows), time.perf_counter() - start)

    def _path(self) -> Any:
        """A snapshot of the runtime's pass counters (which path each batch took)."""
        passes = getattr(self.rt, "passes", None)
        return dict(passes) if isinstance(passes, dict) else None

    def _count_path(self, before: Any) -> None:
        after = self._path()
        if after is None or before is None:
            self.metrics.paths.labels(self.rt.serving).inc()
            return
        for path, n in after.items():
            if n > before.get(path, 0):
                self.metrics.paths.labels(path).inc(n - before.get(path, 0))

    def _run(self, rows: Sequence[Row]) -> None:
        kind = rows[0].kind
        w = self.routed(rows)
        if kind != "route":
            before = self._path()
            try:
                self._model_pass(kind, rows, w)
            finally:
                self._count_path(before)
            return
        for i, row in enumerate(rows):
            row.answer(Answer(*self._routing(w, i)))

    def _model_pass(self, kind: str, rows: Sequence[Row], w: torch.Tensor) -> None:
        if kind == "forward":
            parts = [list(range(len(rows)))]
            if getattr(self.rt, "device", torch.device("cpu")).type == "cpu" \
                    and all(r.prompt_tokens for r in rows):
                parts = chunks([r.prompt_tokens for r in rows])
            for part in parts:
                out = self.rt.forward([rows[i].text for i in part], w[part],
                                      batch_size=len(part), **self.options)
                for j, i in enumerate(part):
                    rows[i].answer(Answer(out.chosen[j], out.routing(j),
                                          output=out.outputs[j] if out.outputs else None))
            return
        self._generate(rows, w)

    def _generate(self, rows: Sequence[Row], w: torch.Tensor) -> None:
        served = self.served(w)
        start = time.perf_counter()

        def finished(i: int) -> None:
            row = rows[i]
            reason = decoding.finish[i]
            if reason == "cancelled":
                row.fail(TimeoutError("cancelled"))
                return
            expert, weights = self._routing(served, i)
            row.answer(Answer(expert, weights, text=decoding.text[i],
                              tokens=len(decoding.tokens[i]), finish_reason=reason))

        decoding = Decoding(rows, self.tokenizer, self.eos, finished)
        hooks: dict[str, Any] = {"stopping_criteria": _stopping([RowStops(decoding)])}
        if decoding.samples:
            hooks["logits_processor"] = _processors([RowSampler(decoding)])
        longest = max(r.sampling.max_tokens for r in rows if r.sampling is not None)
        try:
            self.rt.generate([r.text for r in rows], w, batch_size=len(rows),
                             max_new_tokens=longest, **hooks, **self.options)
        finally:
            self.metrics.generated(sum(len(t) for t in decoding.tokens),
                                   time.perf_counter() - start)
        decoding.close()


def _stopping(items: list[Any]) -> Any:
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList(items)


def _processors(items: list[Any]) -> Any:
    from transformers import LogitsProcessorList

    return LogitsProcessorList(items)


def _client_error(exc: BaseException) -> BaseException:
    """A runtime error as the client sees it: the runtime's own checks are the request's
    fault (400); anything else is the server's (500, no details)."""
    if isinstance(exc, PolymergeError):
        return bad_request(str(exc))
    return internal()
