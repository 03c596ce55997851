"""One call's mixing weights, made current for the mixing layers by a context variable.

``with mixing(w): model(...)`` makes a :class:`Mixture` current in this context (this thread)
for the block; every mixing layer (:mod:`.mixing_layers`) reads it, so calls from several
threads each mix with their own weights. Whatever a call caches (each layer's prepared factors
and folded weights, the tokens seen for the fold rule, the routes of row-sparse weights, the
path each layer took) lives in its Mixture and goes with it: nothing is kept between calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from polymerge.errors import PolymergeError
from polymerge.runtime.mixing_cost import PATHS, Routes, routes_of

Plan = list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor, torch.Tensor]]
"""A grouped path's groups: ``(js, experts, rows, weights (n, len(js)))`` each."""


class Mixture:
    """One call's mixing weights, and what the call's layers cache for them.

    ``weights`` is (B, T) float32, or None for the shared model (no weights, or all zero).
    ``active`` lists the experts with a nonzero weight on some row; ``rows_equal`` says whether
    every row has the same weights (then layers may fold them into their weights). ``path``:
    None lets each layer pick the cheapest of its paths by the cost rule
    (:func:`~.mixing_cost.choose_path`); ``"dense"``, ``"experts"`` or ``"sets"`` forces one
    for every layer (embeddings have no ``"sets"`` path and take ``"experts"``). ``paths``:
    the path each layer took last in this call.
    """

    def __init__(self, weights: torch.Tensor | Sequence[Any], *, fold: bool | None = None,
                 path: str | None = None) -> None:
        w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
        if w.dim() == 1:
            w = w.unsqueeze(0)
        if w.dim() != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise PolymergeError(f"mixing weights must have shape (experts,) or (batch, "
                                 f"experts), got {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise PolymergeError("mixing weights must be finite")
        if path is not None and path not in PATHS:
            raise PolymergeError(f"twin runtime: unknown path {path!r} (dense, experts, sets)")
        self.rows_equal = bool((w == w[:1]).all())
        if fold and not self.rows_equal:
            raise PolymergeError("fold=True needs one weight vector for the whole batch; the "
                                 "rows' weights differ")
        self.experts = int(w.shape[1])
        self.fold = fold
        self.path = path
        self.active: list[int] = (w != 0).any(0).nonzero().flatten().tolist()
        self.weights = w if self.active else None
        self.paths: dict[nn.Module, str] = {}
        self._routes: dict[tuple[int, str], Routes] = {}
        self._groups: dict[tuple[Any, ...], Plan] = {}
        self._states: dict[int, dict[str, Any]] = {}

    def routes(self, batch: int, device: torch.device) -> Routes:
        """Which rows need which experts, for a layer input of ``batch`` rows (cached per
        batch size and device; every layer of the call shares it)."""
        key = (batch, str(device))
        found = self._routes.get(key)
        if found is None:
            assert self.weights is not None
            nonzero = row_weights(self.weights[:, self.active], batch) != 0
            found = self._routes[key] = routes_of(nonzero, self.active, device)
        return found

    def groups(self, batch: int, path: str, device: torch.device, dtype: torch.dtype) -> Plan:
        """``(js, experts, rows, weights (n, len(js)))`` per group of ``path`` ("experts" or
        "sets") for ``batch`` input rows (cached like :meth:`routes`)."""
        key = (batch, str(device), path, dtype)
        found = self._groups.get(key)
        if found is None:
            assert self.weights is not None
            routes = self.routes(batch, device)
            w = row_weights(self.weights[:, self.active], batch)
            found = [(g.js, g.experts, g.rows,
                      w[g.rows.cpu()][:, list(g.js)].to(device=device, dtype=dtype))
                     for g in (routes.by_set if path == "sets" else routes.by_expert)]
            self._groups[key] = found
        return found

    def state(self, module: nn.Module) -> dict[str, Any] | None:
        """What ``module`` prepared for these weights (None before its first forward)."""
        return self._states.get(id(module))

    def keep(self, module: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
        """Keep what ``module`` prepared for these weights, for the rest of the call."""
        self._states[id(module)] = state
        return state


_CURRENT: ContextVar[Mixture | None] = ContextVar("polymerge_mixture", default=None)


@contextlib.contextmanager
def mixing(weights: torch.Tensor | Sequence[Any] | None, *, fold: bool | None = None,
           path: str | None = None) -> Iterator[Mixture | None]:
    """``with mixing(w): model(...)``: the mixing layers run with ``w`` ((B, T) or (T,)) in
    this context (this thread) for the block; None: the shared model. Yields the Mixture."""
    mixture = None if weights is None else Mixture(weights, fold=fold, path=path)
    token = _CURRENT.set(mixture)
    try:
        yield mixture
    finally:
        _CURRENT.reset(token)


def current_mixture() -> Mixture | None:
    """The Mixture of the innermost ``mixing`` block of this context, or None."""
    return _CURRENT.get()


def row_weights(w: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, k) weights for a layer input with ``batch`` rows (broadcast, or repeated when the
    model expanded the batch, e.g. beam search)."""
    b = w.shape[0]
    if b == batch or b == 1 or batch == 1:
        return w
    if batch % b == 0:
        return w.repeat_interleave(batch // b, dim=0)
    raise PolymergeError(f"twin runtime: a layer got {batch} rows but mixing weights were set "
                         f"for {b}")
