"""The one runtime interface, its output type and the per-call routing it takes.

Every runtime (a store served by switching or by mixing, a plain checkpoint) answers the same
stateless calls: ``forward(texts_or_batch, routing=...)``, ``generate(texts, routing=...)``,
``route(texts)``, all safe to call from several threads at once, each returning a
:class:`RunOutput`.

``routing`` (per call) says which experts answer each row:

* ``None`` or ``"route"``: the store's router (soft weights; ``top_k``, ``temperature``);
* an expert name: that expert for every row (oracle routing);
* a list of names, one per row;
* weights: a tensor or nested list, ``(N,)`` for every row or ``(rows, N)`` one per row, or a
  mapping expert name -> weight (the others 0).

A store served by *mixing* runs each row with its own mixture of the experts. A store served by
*switching* runs each row with one expert: soft weights become top-1 (the row's largest
weight), whatever ``top_k`` and ``temperature`` say, and the output records the one-hot weights
actually used.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from polymerge.errors import PolymergeError

ROUTE = "route"
"""The routing that asks the store's router."""

Routing = (str | Sequence[str] | Sequence[float] | Sequence[Sequence[float]] | torch.Tensor
           | Mapping[str, float] | None)
"""What ``routing=`` takes (see the module docstring)."""


@dataclass
class RunOutput:
    """What every runtime call returns, one entry per row in input order.

    ``weights`` (rows, N) are the routing weights each row ran with, over ``experts`` (one-hot
    for a switching store). ``forward`` fills ``outputs``: per row the logits (models with an
    output head) or the last hidden state (bare encoders) of the row's own tokens, (tokens,
    dim), float32 on the CPU. ``generate`` fills ``completions`` (decoded, special tokens
    skipped) and ``token_ids`` (the new tokens per row, as generated). ``inputs``: the texts,
    when the call was given texts.

    Experts with task heads (classifiers): ``outputs`` holds each row's routed expert's head
    logits, ``(num_labels,)``; ``labels`` and ``scores`` its top label name and score (as
    transformers' text-classification pipeline reports them); ``expert_answers``, for rows
    that mix several experts (soft weights), every such expert's own answer on its own label
    space. :attr:`answers` gives ``{"expert", "label", "score", "routing"}`` per row.
    """

    experts: list[str]
    weights: torch.Tensor
    inputs: list[str] | None = None
    outputs: list[torch.Tensor] | None = None
    completions: list[str] | None = None
    token_ids: list[torch.Tensor] | None = None
    labels: list[str | None] | None = None
    scores: list[float | None] | None = None
    expert_answers: list[dict[str, dict[str, Any]]] | None = None

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    @property
    def chosen(self) -> list[str]:
        """Each row's expert: the one weighted most (the first of equals)."""
        return [self.experts[int(i)] for i in self.weights.argmax(-1)]

    def routing(self, row: int) -> dict[str, float]:
        """Row ``row``'s weights by expert name (rounded to 6 decimals)."""
        return {e: round(float(v), 6)
                for e, v in zip(self.experts, self.weights[row].tolist(), strict=True)}

    @property
    def routings(self) -> list[dict[str, float]]:
        return [self.routing(i) for i in range(len(self))]

    def answer(self, row: int) -> dict[str, Any]:
        """Row ``row``'s classification: ``{"expert", "label", "score", "routing"}`` (plus
        ``"experts"``: each mixed expert's own answer, with soft weights)."""
        if self.labels is None or self.scores is None:
            raise PolymergeError("this output has no labels: the experts have no task heads")
        out: dict[str, Any] = {"expert": self.chosen[row], "label": self.labels[row],
                               "score": self.scores[row], "routing": self.routing(row)}
        if self.expert_answers is not None and len(self.expert_answers[row]) > 1:
            out["experts"] = self.expert_answers[row]
        return out

    @property
    def answers(self) -> list[dict[str, Any]]:
        return [self.answer(i) for i in range(len(self))]


def check_soft_routing(temperature: float, top_k: int | None, experts: int) -> None:
    """Refuse a temperature that is not a number > 0 and a top_k outside 1..experts."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise PolymergeError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= experts):
        raise PolymergeError(f"top_k must be an integer from 1 to {experts} (the number of "
                             f"experts), got {top_k!r}")


def expert_index(experts: Sequence[str], name: str, where: str = "") -> int:
    try:
        return list(experts).index(name)
    except ValueError:
        raise PolymergeError(f"no expert named {name!r}{where}; experts: "
                             f"{', '.join(experts)}") from None


def one_hot(experts: Sequence[str], names: Sequence[str], where: str = "") -> torch.Tensor:
    """(len(names), N) one-hot weights for the named experts."""
    w = torch.zeros(len(names), len(experts))
    for row, name in enumerate(names):
        w[row, expert_index(experts, name, where)] = 1.0
    return w


def routing_weights(routing: Routing, rows: int, experts: Sequence[str],
                    route: Callable[[], torch.Tensor], *, where: str = "") -> torch.Tensor:
    """The (rows, N) float32 weights a routing spec gives (see the module docstring);
    ``route()`` computes the router's weights when the spec asks for them."""
    n = len(experts)
    if routing is None or (isinstance(routing, str) and routing == ROUTE):
        w = route()
    elif isinstance(routing, str):
        w = one_hot(experts, [routing] * rows, where)
    elif isinstance(routing, Mapping):
        w = torch.zeros(n)
        for name, value in routing.items():
            w[expert_index(experts, name, where)] = float(value)
    elif isinstance(routing, Sequence) and len(routing) > 0 \
            and all(isinstance(x, str) for x in routing):
        if len(routing) != rows:
            raise PolymergeError(f"{len(routing)} experts for {rows} inputs")
        w = one_hot(experts, list(routing), where)  # type: ignore[arg-type]
    else:
        try:
            w = torch.as_tensor(routing, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise PolymergeError(f"routing weights must be numbers ({exc})") from None
    w = w.detach().float().cpu()
    if w.dim() == 1 and w.shape[0] == n:
        w = w.unsqueeze(0).expand(rows, n)
    if w.dim() != 2 or w.shape[1] != n or w.shape[0] != rows:
        raise PolymergeError(f"weights must have shape ({n},) or ({rows}, {n}) for {n} "
                             f"experts, got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise PolymergeError("weights must be finite")
    return w.contiguous()


class Runtime(ABC):
    """One interface for every store and plain checkpoint (see the module docstring).

    ``serving``: ``"switch"`` (one expert per row, weights written by lookup), ``"mix"`` (a
    mixture of the experts per row) or ``"plain"`` (a checkpoint: one expert, no routing).
    """

    serving: ClassVar[str] = ""

    @property
    @abstractmethod
    def experts(self) -> list[str]:
        """The experts, in the order of the weights' columns."""

    @property
    @abstractmethod
    def is_causal(self) -> bool:
        """Whether the model generates text (``generate``); else ``forward`` only."""

    @abstractmethod
    def route(self, texts: Sequence[str], *, top_k: int | None = None,
              temperature: float | None = None) -> torch.Tensor:
        """(len(texts), N) router weights (one expert: all ones)."""

    @abstractmethod
    def forward(self, inputs: Sequence[str] | Mapping[str, Any] | torch.Tensor,
                routing: Routing = None, *, top_k: int | None = None,
                temperature: float | None = None, batch_size: int = 16,
                **kwargs: Any) -> RunOutput:
        """Run each row (texts, or a tokenized batch: ``input_ids`` and ``attention_mask``)
        with its routing; ``outputs`` hold each row's own tokens' outputs."""

    @abstractmethod
    def generate(self, texts: Sequence[str], routing: Routing = None, *,
                 top_k: int | None = None, temperature: float | None = None,
                 max_new_tokens: int = 32, batch_size: int = 8, **sampling: Any) -> RunOutput:
        """Generate a completion for each text with its routing (greedy unless told)."""

    @abstractmethod
    def as_module(self, routing: Routing = None, **options: Any) -> torch.nn.Module:
        """An ``nn.Module`` taking token ids, routing each row (or always ``routing``)."""

    @abstractmethod
    def memory(self) -> dict[str, int]:
        """Bytes held: ``store``, ``working_model``, ``feature_model`` and ``total``."""

    @property
    def classifies(self) -> bool:
        """Whether the experts have task heads (answers are labels, see :meth:`classify`)."""
        return False

    def classify(self, texts: str | Sequence[str], routing: Routing = None,
                 **kwargs: Any) -> list[dict[str, Any]]:
        """Per text ``{"expert", "label", "score", "routing"}``: the routed expert's head's
        top label (and, with soft weights, ``"experts"``: each mixed expert's own answer)."""
        if not self.classifies:
            raise PolymergeError("classify() needs experts with task heads "
                                 "(...ForSequenceClassification); use forward() or generate()")
        batch = [texts] if isinstance(texts, str) else list(texts)
        return self.forward(batch, routing, **kwargs).answers

    def __call__(self, texts: str | Sequence[str], routing: Routing = None,
                 **kwargs: Any) -> RunOutput:
        """``generate`` for causal LMs, else ``forward``; one text or several."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if self.is_causal:
            return self.generate(batch, routing, **kwargs)
        return self.forward(batch, routing, **kwargs)
