"""The dynamic runtime of twin stores: one model whose layers mix the experts per input.

Twin-Merging answers an input ``x`` with ``theta(x) = shared + sum_t w_t(x) (theta_t - shared)``
where ``w(x)`` are the router's soft weights. Nothing per input is materialized here:

* every ``nn.Linear`` (and GPT-2 ``Conv1D``) whose weight has low-rank exclusive factors becomes
  a :class:`TwinLinear`: ``y = x W_shared^T + b + sum_t w[b, t] ((x V_t^T) U_t^T)``, computed as
  two GEMMs over the experts' stacked factors (``V = [V_1; ...; V_T]``, ``U = [U_1 ... U_T]``)
  with the row weights applied in between. Experts whose weight is 0 on every row (top-k) are
  left out. Per-expert biases add ``sum_t w[b, t] (b_t - b_shared)`` per row; out-of-scope
  weights kept per expert (``others: expert``) add ``sum_t w[b, t] x (W_t - W_shared)^T``;
* row-sparse weights (top-k routing with mixed routes: each row needs only its k experts) may
  take a *grouped path* instead, computing each expert's term only on the rows that weight it.
  A group is a set of rows and experts: its rows are gathered (``index_select`` on the
  (B, L, in) input), run through the experts' stacked factors (two GEMMs, the row weights
  applied in between) and added back (``index_add_``); a group of every row works in place.
  ``"experts"`` makes one group per active expert (its rows); ``"sets"`` one group per set of
  experts that some rows use exactly (top-2 of 4: up to 6 pairs), so that each row is gathered
  and added back once and its k experts run as one GEMM of width k r (their columns are a view
  when the experts are consecutive, else copied). The dense stacked path is the one group of
  every row and every active expert. :func:`choose_path` picks, per module, batch size and
  tokens per row, the cheapest of the three by one cost estimate, in multiply-adds
  (:func:`path_cost`; ``W = in + out``, ``L`` tokens per row, ``r`` the rank)::

      sum over groups (n rows, k experts):
          n L (k r + GEMM_OVERHEAD + ROUTE_COST [unless n is every row]) W
          + ROUTE_COST (columns copied) W + CALL_COST

  ``GEMM_OVERHEAD`` = 32 (a GEMM of width k r runs like one of width k r + 32: narrow GEMMs
  are slow), ``ROUTE_COST`` = 8 (gathering and adding back one element, measured at 4-6 on
  one CPU thread) and ``CALL_COST`` = 1e6 (a group's ten-odd calls, about 40 us), all measured
  on CPU. Dense per-row softmax weights thus stay on the dense path, top-1 takes ``experts``
  (= ``sets``) and top-2 of 4 ``sets`` at the benchmark's shapes (MiniLM, rank 38, 64 tokens
  per row), and decoding a small batch (one token per row, batch 8) stays dense, where the
  calls would cost more than the multiply-adds saved. Dense per-expert weights
  (``others: expert``) count as rank ``in out / (in + out)``. Every path gives the same
  numbers up to float rounding; ``Mixture.path`` forces one for every module (tests,
  benchmarks);
* embeddings become :class:`TwinEmbedding` (a gather of the stacked ``U`` rows, then ``V``);
  a tied output layer shares the embedding's factors. Row-sparse weights may take the
  ``"experts"`` path there too (same rule, width ``H``; no ``"sets"``: copying a set's
  columns would copy the vocabulary); ids shared by every row (BERT's position ids) are
  embedded once per active expert and mixed per row, whatever the weights;
* norms with per-expert weights (LayerNorm, RMSNorm, ...) become :class:`TwinNorm`: they are
  affine in their weight and bias for a fixed input, so ``y_b = y_shared + g(x) dw_b + db_b``
  with ``g(x)`` the norm's output per unit of weight (``layer_norm`` without affine for
  ``nn.LayerNorm``; for other norms the difference of two calls, weight + 1 minus weight).
  Every row thus gets exactly its own mixed model, and the batched forward equals running each
  input alone through its materialized weights (to float rounding);
* when every row of the batch has the same weights, a module folds them into its weight once
  (``W = W_shared + sum_t w_t U_t V_t``) and runs a plain layer: with ``fold=True`` at once,
  with ``fold=None`` (auto) as soon as the tokens it has processed under those weights make
  folding cheaper than the low-rank path (``tokens (in + out) >= in out`` for a linear: ski
  rental, so at most twice the better choice), which is what makes generation with one weight
  vector run at the plain model's speed after a few steps; ``fold=False`` never folds. An
  embedding folds only once the tokens outnumber its rows, even with ``fold=True``: gathering
  the tokens' rows of the factors is cheaper than rebuilding the whole table.

Routing takes two passes. Pass 1 runs the same model with all weights 0, which *is* the shared
model (no second model in memory), and mean-pools its backbone's last hidden state; the router
(trained on those very features by ``polymerge router train``, which records
``feature.model = "store:shared"``) gives ``w = softmax(logits / temperature)``, top-k
optionally. Pass 2 runs the mixed model. ``expert=`` / ``experts=`` give one-hot weights
(oracle routing), ``weights=`` any weights.

Memory: the model holds the shared weights and the stacked factors; the store's pieces are
re-pointed at them (views), so nothing is held twice, except the experts' copies of
``others: expert`` tensors (their differences to the shared merge are kept for mixing).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polymerge.errors import PolymergeError
from polymerge.routing.features import DEFAULT_MAX_LENGTH, FeatureModel
from polymerge.runtime.routed import StoreRuntime, empty_model
from polymerge.stores.base import Store, expert_part, open_store, piece_name

SHARED_FEATURES = "store:shared"
"""``feature.model`` of a router trained on a twin store's shared model."""

WeightsLike = torch.Tensor | Sequence[float] | Sequence[Sequence[float]] | Mapping[str, float]


# ----------------------------------------------------------------------------- mixing state


class Mixture:
    """The mixing weights every twin module of one model reads.

    ``weights`` is (B, T) float32, or None for the shared model (no weights, or all zero).
    ``active`` lists the experts with a nonzero weight on some row; ``rows_equal`` says whether
    every row has the same weights (then modules may fold them into their weights).
    ``path``: None (default) lets each module pick the cheapest of its paths by
    :func:`choose_path`; ``"dense"``, ``"experts"`` or ``"sets"`` forces one (embeddings have no
    ``"sets"`` path and take ``"experts"``).
    """

    def __init__(self, experts: int) -> None:
        if experts < 1:
            raise PolymergeError("a mixture needs at least one expert")
        self.experts = experts
        self.weights: torch.Tensor | None = None
        self.active: list[int] = []
        self.rows_equal = True
        self.fold: bool | None = None
        self.path: str | None = None
        self.version = 0
        self._routes: dict[tuple[int, str], Routes] = {}
        self._groups: dict[tuple[Any, ...], list[Any]] = {}

    def set(self, weights: torch.Tensor | Sequence[Any] | None, *,
            fold: bool | None = None) -> None:
        """Set (B, T) or (T,) weights for the next forward passes; None: the shared model."""
        w = None
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
            if w.dim() == 1:
                w = w.unsqueeze(0)
            if w.dim() != 2 or w.shape[1] != self.experts or w.shape[0] < 1:
                raise PolymergeError(f"mixing weights must have shape ({self.experts},) or "
                                     f"(batch, {self.experts}), got {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()):
                raise PolymergeError("mixing weights must be finite")
        rows_equal = w is None or bool((w == w[:1]).all())
        if fold and not rows_equal:
            raise PolymergeError("fold=True needs one weight vector for the whole batch; the "
                                 "rows' weights differ")
        self.version += 1
        self.fold = fold
        self.rows_equal = rows_equal
        active = [] if w is None else (w != 0).any(0).nonzero().flatten().tolist()
        self.active = active
        self.weights = w if active else None
        self._routes, self._groups = {}, {}

    def routes(self, batch: int, device: torch.device) -> Routes:
        """Which rows need which experts, for a module input of ``batch`` rows (cached per
        weights, batch size and device; every module of the model shares it)."""
        key = (batch, str(device))
        found = self._routes.get(key)
        if found is None:
            assert self.weights is not None
            nonzero = _row_weights(self.weights[:, self.active], batch) != 0
            sets: dict[tuple[int, ...], list[int]] = {}
            for row, mask in enumerate(nonzero.tolist()):
                js = tuple(j for j, on in enumerate(mask) if on)
                if js:
                    sets.setdefault(js, []).append(row)

            def group(js: tuple[int, ...], rows: list[int]) -> RouteGroup:
                return RouteGroup(js, tuple(self.active[j] for j in js), len(rows),
                                  torch.tensor(rows, dtype=torch.long, device=device))

            found = Routes(int(nonzero.shape[0]), int(nonzero.sum()),
                           [group((j,), col.nonzero().flatten().tolist())
                            for j, col in enumerate(nonzero.T) if bool(col.any())],
                           [group(js, sets[js]) for js in sorted(sets)])
            self._routes[key] = found
        return found

    def groups(self, batch: int, path: str, device: torch.device, dtype: torch.dtype
               ) -> list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor, torch.Tensor]]:
        """``(js, experts, rows, weights (n, len(js)))`` per group of ``path`` ("experts" or
        "sets") for ``batch`` input rows (cached like :meth:`routes`)."""
        key = (batch, str(device), path, dtype)
        found = self._groups.get(key)
        if found is None:
            assert self.weights is not None
            routes = self.routes(batch, device)
            w = _row_weights(self.weights[:, self.active], batch)
            found = [(g.js, g.experts, g.rows,
                      w[g.rows.cpu()][:, list(g.js)].to(device=device, dtype=dtype))
                     for g in (routes.by_set if path == "sets" else routes.by_expert)]
            self._groups[key] = found
        return found


@dataclass
class RouteGroup:
    """Rows computed together on a grouped path: ``js`` index the active experts (the
    columns of a module's weights), ``experts`` are their store indices, ``rows`` (int64, on
    the modules' device) the ``size`` input rows."""

    js: tuple[int, ...]
    experts: tuple[int, ...]
    size: int
    rows: torch.Tensor

    @property
    def contiguous(self) -> bool:
        """Whether the experts' stacked factor columns are one block (a view, no copy)."""
        return self.experts == tuple(range(self.experts[0], self.experts[0] + len(self.experts)))


@dataclass
class Routes:
    """The nonzero pattern of a batch's weights: ``rows`` weight rows, ``pairs`` nonzero (row,
    active expert) pairs; ``by_expert``: one group per active expert that some row uses (its
    rows); ``by_set``: one group per set of experts that some rows use exactly."""

    rows: int
    pairs: int
    by_expert: list[RouteGroup]
    by_set: list[RouteGroup]


GEMM_OVERHEAD = 32.0
"""A GEMM of inner or outer size k r costs as if it were ``k r + GEMM_OVERHEAD`` (narrow
GEMMs run below the machine's peak; see the module docstring)."""
ROUTE_COST = 8.0
"""Gathering an input row and adding its output back (``index_select``, ``index_add_``), or
copying a factor column, per element of the layer's width, in multiply-adds."""
CALL_COST = 1e6
"""The fixed cost of one group's calls (about ten tensor ops), in multiply-adds."""


def path_cost(groups: Iterable[tuple[int, int, int]], rows: int, tokens_per_row: int,
              rank: float, width: int) -> float:
    """Estimated multiply-adds of a module's exclusive terms computed group by group.

    ``groups``: ``(n, k, copied)`` per group: ``n`` of the ``rows`` input rows, ``k`` experts,
    ``copied`` factor columns it copies (0 when its experts' columns are one block). ``rank``:
    multiply-adds per token and expert per unit of ``width`` (``in + out`` for a linear).
    """
    total = 0.0
    for n, k, copied in groups:
        route = 0.0 if n == rows else ROUTE_COST  # a group of every row gathers nothing
        total += (n * tokens_per_row * (k * rank + GEMM_OVERHEAD + route)
                  + ROUTE_COST * copied) * width + CALL_COST
    return total


def choose_path(routes: Routes, *, rank: float, width: int, tokens_per_row: int,
                dense_experts: int, factor_rank: int | None = None, sets: bool = True) -> str:
    """The cheapest way to compute a module's exclusive terms by :func:`path_cost`:
    ``"dense"`` (every row against the ``dense_experts`` stacked experts), ``"experts"`` (each
    expert on the rows that weight it) or ``"sets"`` (each set of experts on the rows that
    use exactly that set, its factors stacked; only if ``sets``). Ties go to the dense path.
    ``factor_rank``: the factors' rank, for the columns a set copies (default ``rank``).
    """
    fr = int(rank) if factor_rank is None else factor_rank
    costs = {"dense": path_cost([(routes.rows, dense_experts, 0)], routes.rows,
                                tokens_per_row, rank, width),
             "experts": path_cost([(g.size, 1, 0) for g in routes.by_expert], routes.rows,
                                  tokens_per_row, rank, width)}
    if sets:
        costs["sets"] = path_cost([(g.size, len(g.js), 0 if g.contiguous else len(g.js) * fr)
                                   for g in routes.by_set], routes.rows, tokens_per_row, rank,
                                  width)
    return min(costs, key=lambda k: costs[k])


def _row_weights(w: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, k) weights for a module input with ``batch`` rows (broadcast, or repeated when the
    model expanded the batch, e.g. beam search)."""
    b = w.shape[0]
    if b == batch or b == 1 or batch == 1:
        return w
    if batch % b == 0:
        return w.repeat_interleave(batch // b, dim=0)
    raise PolymergeError(f"twin runtime: a layer got {batch} rows but mixing weights were set "
                         f"for {b}")


@dataclass
class LowRank:
    """Experts' stacked factors of one weight (rows x cols): ``u_cat`` (rows, T r) is
    ``[U_1 ... U_T]``, ``v_cat`` (T r, cols) is ``[V_1; ...; V_T]``; expert t's exclusive part is
    ``U_t V_t``."""

    u_cat: torch.Tensor
    v_cat: torch.Tensor
    rank: int
    experts: int

    @classmethod
    def from_stacked(cls, u: torch.Tensor, v: torch.Tensor) -> LowRank:
        """From ``u`` (T, rows, r) and ``v`` (T, r, cols)."""
        if u.dim() != 3 or v.dim() != 3 or u.shape[0] != v.shape[0] or u.shape[2] != v.shape[1]:
            raise PolymergeError(f"low-rank factors must be (T, rows, r) and (T, r, cols), got "
                                 f"{tuple(u.shape)} and {tuple(v.shape)}")
        t, rows, r = u.shape
        return cls(u.permute(1, 0, 2).reshape(rows, t * r).contiguous(),
                   v.reshape(t * r, v.shape[2]).contiguous(), r, t)

    @classmethod
    def from_lists(cls, us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]) -> LowRank:
        """From per-expert ``u_t`` (rows, r_t) and ``v_t`` (r_t, cols); ranks are zero-padded
        to the largest."""
        r = max(u.shape[1] for u in us)
        pu = [u if u.shape[1] == r else torch.cat([u, u.new_zeros(u.shape[0], r - u.shape[1])],
                                                  1) for u in us]
        pv = [v if v.shape[0] == r else torch.cat([v, v.new_zeros(r - v.shape[0], v.shape[1])],
                                                  0) for v in vs]
        return cls(torch.cat(pu, 1).contiguous(), torch.cat(pv, 0).contiguous(), r, len(us))

    def u(self, t: int) -> torch.Tensor:
        return self.u_cat[:, t * self.rank:(t + 1) * self.rank]

    def v(self, t: int) -> torch.Tensor:
        return self.v_cat[t * self.rank:(t + 1) * self.rank]


def _columns(active: Sequence[int], rank: int, device: torch.device) -> torch.Tensor:
    """Columns of the stacked factors that belong to the ``active`` experts."""
    return torch.cat([torch.arange(t * rank, (t + 1) * rank) for t in active]).to(device)


def _experts_of(*items: Any) -> int:
    for item in items:
        if isinstance(item, LowRank):
            return item.experts
        if isinstance(item, tuple):
            return int(item[0].shape[0])
        if isinstance(item, torch.Tensor):
            return int(item.shape[0])
    raise PolymergeError("a twin module needs factors or per-expert deltas")


class _TwinModule(nn.Module):
    """Shared machinery: the mixture, a per-weights cache and the fold decision."""

    fold_threshold: float = 0.0

    def __init__(self, mixture: Mixture | None, experts: int) -> None:
        super().__init__()
        if mixture is not None and mixture.experts != experts:
            raise PolymergeError(f"the mixture has {mixture.experts} experts, the module "
                                 f"{experts}")
        self.mixture = mixture if mixture is not None else Mixture(experts)
        self.experts = experts
        self._version = -1
        self._state: dict[str, Any] = {}
        self.last_path: str | None = None  # the last forward's path (None: shared or folded)

    def set_weights(self, weights: torch.Tensor | Sequence[Any] | None, *,
                    fold: bool | None = None) -> None:
        """Weights (B, T) or (T,) for the next forward passes (None: the shared layer)."""
        self.mixture.set(weights, fold=fold)

    def _current(self) -> dict[str, Any] | None:
        m = self.mixture
        if m.weights is None:
            if self._state:  # drop what the last weights cached (folded weights)
                self._state, self._version = {}, -1
            return None
        if self._version != m.version:
            self._state = self._prepare(m)
            self._version = m.version
        return self._state

    def _prepare(self, m: Mixture) -> dict[str, Any]:
        ref = next(iter(self.parameters()))
        w = m.weights
        assert w is not None
        return {"w": w[:, m.active].to(ref.device, ref.dtype), "active": m.active,
                "tokens": 0, "folded": None}

    def _should_fold(self, state: dict[str, Any], tokens: int) -> bool:
        m = self.mixture
        if state["folded"] is not None:
            return True
        if not m.rows_equal or m.fold is False:
            return False
        state["tokens"] += tokens
        return bool(m.fold) or state["tokens"] >= self.fold_threshold

    def _plan(self, state: dict[str, Any], w: torch.Tensor, *, tokens_per_row: int, width: int,
              rank: float, factor_rank: int, dense_experts: int, sets: bool = True
              ) -> list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor, torch.Tensor]] | None:
        """How to compute this forward's exclusive terms, ``w`` (rows, k) being the row weights
        with one row per input row: None for the dense path, else ``(js, experts, rows,
        weights (n, len(js)))`` per group (see :func:`choose_path`, which picks the path unless
        ``Mixture.path`` does; the choice is cached per weights, batch size and tokens per
        row, the groups by the mixture)."""
        m = self.mixture
        rows = w.shape[0]
        path = m.path
        if path is None:
            chosen = state.setdefault("paths", {})
            key = (rows, tokens_per_row)
            if key not in chosen:
                chosen[key] = choose_path(m.routes(rows, w.device), rank=rank, width=width,
                                          tokens_per_row=tokens_per_row,
                                          dense_experts=dense_experts, factor_rank=factor_rank,
                                          sets=sets)
            path = chosen[key]
        if path == "sets" and not sets:
            path = "experts"
        self.last_path = path
        if path == "dense":
            return None
        if path not in ("experts", "sets"):
            raise PolymergeError(f"twin runtime: unknown path {path!r} (dense, experts, sets)")
        return m.groups(rows, path, w.device, w.dtype)


def _select(t: torch.Tensor | None, active: Sequence[int], experts: int) -> torch.Tensor | None:
    if t is None or len(active) == experts:
        return t
    return t.index_select(0, torch.tensor(active, device=t.device))


class TwinLinear(_TwinModule):
    """A linear layer mixing the experts per input (see the module docstring).

    ``factors``: a :class:`LowRank` of the weight's layout, or ``(U (T, out, r), V (T, r, in))``;
    ``weight_delta`` (T, *weight.shape) and ``bias_delta`` (T, out): per-expert differences to
    the shared weight and bias. GPT-2 ``Conv1D`` layers (weight stored in x out) are accepted;
    their factors follow their weight's layout.
    """

    def __init__(self, linear: nn.Module, *, factors: LowRank | tuple[torch.Tensor, torch.Tensor]
                 | None = None, weight_delta: torch.Tensor | None = None,
                 bias_delta: torch.Tensor | None = None, mixture: Mixture | None = None) -> None:
        super().__init__(mixture, _experts_of(factors, weight_delta, bias_delta))
        self.transposed = type(linear).__name__ == "Conv1D"
        if not (isinstance(linear, nn.Linear) or self.transposed):
            raise PolymergeError(f"TwinLinear wraps nn.Linear or Conv1D, not "
                                 f"{type(linear).__name__}")
        self.weight = linear.weight
        self.bias = linear.bias
        rows, cols = self.weight.shape
        self.in_features, self.out_features = (rows, cols) if self.transposed else (cols, rows)
        if isinstance(factors, tuple):
            factors = LowRank.from_stacked(*factors)
        if factors is not None and (factors.u_cat.shape[0] != rows
                                    or factors.v_cat.shape[1] != cols):
            raise PolymergeError(f"factors of shape {tuple(factors.u_cat.shape)} x "
                                 f"{tuple(factors.v_cat.shape)} do not fit a {rows}x{cols} "
                                 "weight")
        self.rank = factors.rank if factors is not None else 0
        self.register_buffer("u_cat", factors.u_cat if factors else None, persistent=False)
        self.register_buffer("v_cat", factors.v_cat if factors else None, persistent=False)
        self.register_buffer("weight_delta", weight_delta, persistent=False)
        self.register_buffer("bias_delta", bias_delta, persistent=False)
        n_in, n_out = self.in_features, self.out_features
        self.fold_threshold = n_in * n_out / (n_in + n_out)
        # multiply-adds per token and expert, per unit of in + out (see choose_path)
        self._cost_rank = self.rank + (self.fold_threshold if weight_delta is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"experts={self.experts}, rank={self.rank}, dense={self.weight_delta is not None}, "
                f"bias_delta={self.bias_delta is not None}")

    def _plain(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
        if self.transposed:
            y = x @ weight
            return y if bias is None else y + bias
        return F.linear(x, weight, bias)

    def _prepare(self, m: Mixture) -> dict[str, Any]:
        s = super()._prepare(m)
        active = s["active"]
        if self.rank:
            if len(active) == self.experts:
                s["u"], s["v"] = self.u_cat, self.v_cat
            else:
                cols = _columns(active, self.rank, self.u_cat.device)
                s["u"] = self.u_cat.index_select(1, cols)
                s["v"] = self.v_cat.index_select(0, cols)
            s["wr"] = s["w"].repeat_interleave(self.rank, dim=1)
        s["dw"] = _select(self.weight_delta, active, self.experts)
        s["db"] = _select(self.bias_delta, active, self.experts)
        return s

    def _fold(self, s: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = s["w"][0]
        weight = self.weight.detach()
        if self.rank:
            weight = weight + (s["u"] * s["wr"][0]) @ s["v"]
        if s["dw"] is not None:
            weight = weight + torch.tensordot(w, s["dw"], dims=1)
        bias = self.bias.detach() if self.bias is not None else None
        if s["db"] is not None:
            bias = w @ s["db"] if bias is None else bias + w @ s["db"]
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._current()
        self.last_path = None
        if s is None:
            return self._plain(x, self.weight, self.bias)
        if self._should_fold(s, x.numel() // x.shape[-1]):
            self.last_path = "folded"
            if s["folded"] is None:
                s["folded"] = self._fold(s)
            return self._plain(x, *s["folded"])
        b = x.shape[0]
        w = _row_weights(s["w"], b)  # (B, k)
        if w.shape[0] != b:  # one input row for several weight rows
            x = x.expand(w.shape[0], *x.shape[1:])
            b = w.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        y = self._plain(x2, self.weight, self.bias)  # (tokens, out), a new tensor
        y3 = y.view(b, -1, y.shape[-1])
        plan = None
        self.last_path = "dense"
        if w.shape[0] == b:
            plan = self._plan(s, w, tokens_per_row=x2.shape[0] // b,
                              width=self.in_features + self.out_features, rank=self._cost_rank,
                              factor_rank=self.rank, dense_experts=len(s["active"]))
        if plan is not None:
            self._grouped(x2.view(b, -1, x2.shape[-1]), y3, s, plan)
        else:
            if self.rank:
                wr = _row_weights(s["wr"], b).unsqueeze(1)  # (B, 1, k r)
                if self.transposed:  # weight (in, out): x U_t then V_t
                    z, second = x2 @ s["u"], s["v"]
                else:  # weight (out, in): x V_t^T then U_t^T
                    z, second = F.linear(x2, s["v"]), s["u"].T
                z.view(b, -1, z.shape[-1]).mul_(wr)
                y.addmm_(z, second)  # the sum over experts and ranks is this GEMM's inner sum
            if s["dw"] is not None:
                eq = "bli,kio->blko" if self.transposed else "bli,koi->blko"
                y3.add_(torch.einsum(eq, x2.view(b, -1, x2.shape[-1]), s["dw"])
                        .mul_(w[:, None, :, None]).sum(2))
        if s["db"] is not None:
            y3.add_((w @ s["db"]).unsqueeze(1))
        return y.view(*x.shape[:-1], y.shape[-1])

    def _stacked(self, experts: tuple[int, ...], s: dict[str, Any]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' stacked factors as (in, k r) and (k r, out): x first second. Views when
        the experts are consecutive (one block of columns), else copies."""
        assert self.u_cat is not None and self.v_cat is not None
        r = self.rank
        if experts == tuple(range(experts[0], experts[0] + len(experts))):
            cols = slice(experts[0] * r, (experts[-1] + 1) * r)
            u, v = self.u_cat[:, cols], self.v_cat[cols]
        else:
            indices = s.setdefault("columns", {})
            index = indices.get(experts)
            if index is None:
                index = indices[experts] = _columns(experts, r, self.u_cat.device)
            u, v = self.u_cat.index_select(1, index), self.v_cat.index_select(0, index)
        if self.transposed:  # weight (in, out) = U V
            return u, v
        return v.T, u.T  # weight (out, in) = U V

    def _grouped(self, x3: torch.Tensor, y3: torch.Tensor, s: dict[str, Any],
                 plan: list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor, torch.Tensor]]
                 ) -> None:
        """y3 (B, L, out) += each group's experts' terms on the group's rows: the rows are
        gathered, run through the stacked factors (the row weights applied in between) and
        added back; a group of every row works in place."""
        b, n_in, n_out = x3.shape[0], x3.shape[-1], y3.shape[-1]
        y2 = y3.view(-1, n_out)
        for js, experts, rows, wg in plan:
            n, k = wg.shape
            every = n == b
            xs = (x3 if every else x3.index_select(0, rows)).reshape(-1, n_in)
            part = None  # the group's terms (n L, out), when they are added back by row
            if self.rank:
                first, second = self._stacked(experts, s)
                z = xs @ first
                z.view(n, -1, k, self.rank).mul_(wg.view(n, 1, k, 1))
                if every:
                    y2.addmm_(z, second)
                else:
                    part = z @ second
            if s["dw"] is not None:
                for i, j in enumerate(js):
                    d = xs @ s["dw"][j] if self.transposed else F.linear(xs, s["dw"][j])
                    d.view(n, -1, n_out).mul_(wg[:, i].view(n, 1, 1))
                    if every:
                        y2.add_(d)
                    elif part is None:
                        part = d
                    else:
                        part.add_(d)
            if part is not None:
                y3.index_add_(0, rows, part.view(n, -1, n_out))


class TwinEmbedding(_TwinModule):
    """An embedding mixing the experts per input: rows of the stacked ``U`` are gathered for
    the tokens, weighted per row and projected by the stacked ``V``."""

    def __init__(self, embedding: nn.Embedding, *, factors: LowRank | tuple[torch.Tensor,
                 torch.Tensor] | None = None, weight_delta: torch.Tensor | None = None,
                 mixture: Mixture | None = None) -> None:
        super().__init__(mixture, _experts_of(factors, weight_delta))
        self.weight = embedding.weight
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self._options = dict(padding_idx=embedding.padding_idx, max_norm=embedding.max_norm,
                             norm_type=embedding.norm_type,
                             scale_grad_by_freq=embedding.scale_grad_by_freq,
                             sparse=embedding.sparse)
        self.padding_idx = embedding.padding_idx
        if isinstance(factors, tuple):
            factors = LowRank.from_stacked(*factors)
        if factors is not None and tuple(factors.u_cat.shape[:1] + factors.v_cat.shape[1:]) \
                != tuple(self.weight.shape):
            raise PolymergeError("embedding factors do not fit the embedding's weight")
        self.rank = factors.rank if factors is not None else 0
        self.register_buffer("u_cat", factors.u_cat if factors else None, persistent=False)
        self.register_buffer("v_cat", factors.v_cat if factors else None, persistent=False)
        self.register_buffer("weight_delta", weight_delta, persistent=False)
        self.fold_threshold = float(self.num_embeddings)
        # multiply-adds per token and expert in units of H (a dense delta: one add)
        self._cost_rank = self.rank + (1.0 if weight_delta is not None else 0.0)

    def _should_fold(self, state: dict[str, Any], tokens: int) -> bool:
        # Gathering the tokens' rows costs k r H per token; folding rebuilds the whole table.
        # So an embedding folds only once the tokens seen under these weights outnumber its
        # rows, even with fold=True.
        m = self.mixture
        if state["folded"] is not None:
            return True
        if not m.rows_equal or m.fold is False:
            return False
        state["tokens"] += tokens
        return state["tokens"] >= self.fold_threshold

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, experts={self.experts}, "
                f"rank={self.rank}, dense={self.weight_delta is not None}")

    def _prepare(self, m: Mixture) -> dict[str, Any]:
        s = super()._prepare(m)
        # A gather is cheap whatever the number of experts: inactive ones get weight 0.
        full = torch.zeros((s["w"].shape[0], self.experts), dtype=s["w"].dtype,
                           device=s["w"].device)
        full[:, s["active"]] = s["w"]
        s["w_all"] = full
        if self.rank:
            s["wr"] = full.repeat_interleave(self.rank, dim=1)
        return s

    def _fold(self, s: dict[str, Any]) -> torch.Tensor:
        weight = self.weight.detach()
        if self.rank:
            weight = weight + (self.u_cat * s["wr"][0]) @ self.v_cat
        if self.weight_delta is not None:
            weight = weight + torch.tensordot(s["w_all"][0], self.weight_delta, dims=1)
        return weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s = self._current()
        self.last_path = None
        if s is None:
            return F.embedding(ids, self.weight, **self._options)
        if self._should_fold(s, ids.numel()):
            self.last_path = "folded"
            if s["folded"] is None:
                s["folded"] = self._fold(s)
            return F.embedding(ids, s["folded"], **self._options)
        y = F.embedding(ids, self.weight, **self._options)
        if ids.dim() < 2:  # no batch dimension: one row of weights only
            if s["w_all"].shape[0] != 1:
                raise PolymergeError("twin runtime: an embedding got ids without a batch "
                                     "dimension while rows have different weights")
            ids = ids.reshape(1, -1)
        b = ids.shape[0]
        ids2 = ids.reshape(b, -1)
        out = y.reshape(b, -1, y.shape[-1])
        w = _row_weights(s["w_all"], b)  # (b, T), or (B, T) for ids shared by every row
        plan = None
        self.last_path = "dense"
        if w.shape[0] == b:
            plan = self._plan(s, _row_weights(s["w"], b), tokens_per_row=ids2.shape[1],
                              width=self.embedding_dim, rank=self._cost_rank, factor_rank=0,
                              dense_experts=self.experts, sets=False)
        if w.shape[0] != b:  # b == 1: each active expert's rows once, mixed per weight row
            self.last_path = "shared ids"
            terms = torch.stack([self._term(ids2, t) for t in s["active"]])  # (k, 1, L, H)
            out = out + torch.einsum("klh,bk->blh", terms[:, 0], s["w"])
        elif plan is not None:
            for _, experts, rows, wt in plan:
                every = wt.shape[0] == b
                term = self._term(ids2 if every else ids2.index_select(0, rows), experts[0])
                term.mul_(wt.view(-1, 1, 1))
                if every:
                    out.add_(term)
                else:
                    out.index_add_(0, rows, term)
        else:
            if self.rank:
                wr = _row_weights(s["wr"], b).unsqueeze(1)
                out = out + (F.embedding(ids2, self.u_cat) * wr) @ self.v_cat
            if self.weight_delta is not None:
                gathered = self.weight_delta[:, ids2]  # (T, b, L, H)
                out = out + torch.einsum("tblh,bt->blh", gathered, w)
        if y.dim() == 2:  # ids had no batch dimension
            return out.reshape(y.shape)
        return out.reshape(out.shape[0], *y.shape[1:-1], out.shape[-1])

    def _term(self, ids: torch.Tensor, t: int) -> torch.Tensor:
        """Expert t's exclusive rows for ``ids`` (n, L): (n, L, H), a new tensor."""
        term = None
        if self.rank:
            assert self.u_cat is not None and self.v_cat is not None
            cols = slice(t * self.rank, (t + 1) * self.rank)
            term = F.embedding(ids, self.u_cat[:, cols]) @ self.v_cat[cols]
        if self.weight_delta is not None:
            rows = F.embedding(ids, self.weight_delta[t])
            term = rows if term is None else term.add_(rows)
        assert term is not None
        return term


class TwinNorm(_TwinModule):
    """A norm layer (LayerNorm, RMSNorm, ...) with per-expert weight and bias, mixed per row.

    The norm is affine in its weight and bias for a fixed input, so each row's output is the
    shared output plus ``g(x) * dweight + dbias`` (see the module docstring).
    """

    def __init__(self, norm: nn.Module, *, weight_delta: torch.Tensor | None = None,
                 bias_delta: torch.Tensor | None = None, mixture: Mixture | None = None) -> None:
        super().__init__(mixture, _experts_of(weight_delta, bias_delta))
        # The wrapped norm computes; it is kept out of the module tree so that the parameters
        # (the same objects, registered here) keep their names in state_dict().
        object.__setattr__(self, "_norm", norm)
        self.weight = getattr(norm, "weight", None)
        self.bias = getattr(norm, "bias", None)
        if weight_delta is not None and self.weight is None:
            raise PolymergeError(f"{type(norm).__name__} has no weight to mix")
        self.register_buffer("weight_delta", weight_delta, persistent=False)
        self.register_buffer("bias_delta", bias_delta, persistent=False)
        self.fold_threshold = 0.0

    def extra_repr(self) -> str:
        return f"{type(self._norm).__name__}, experts={self.experts}"

    def _params(self, weight: torch.Tensor | None, bias: torch.Tensor | None
                ) -> dict[str, torch.Tensor]:
        out = {}
        if weight is not None:
            out["weight"] = weight
        if bias is not None:
            out["bias"] = bias
        return out

    def _call(self, x: torch.Tensor, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        params = self._params(self.weight if weight is None else weight,
                              self.bias if bias is None else bias)
        return torch.func.functional_call(self._norm, params, (x,))

    def _prepare(self, m: Mixture) -> dict[str, Any]:
        s = super()._prepare(m)
        s["dw"] = _select(self.weight_delta, s["active"], self.experts)
        s["db"] = _select(self.bias_delta, s["active"], self.experts)
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._current()
        if s is None:
            return self._call(x)
        if self._should_fold(s, 0):
            w = s["w"][0]
            weight = self.weight + w @ s["dw"] if s["dw"] is not None else None
            bias = self.bias + w @ s["db"] if s["db"] is not None else None
            return self._call(x, weight, bias)
        b = x.shape[0]
        w = _row_weights(s["w"], b)
        shape = (w.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        norm = self._norm
        if isinstance(norm, nn.LayerNorm):
            g = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
            y = g * self.weight + self.bias if self.bias is not None else g * self.weight
        else:
            y = self._call(x)
            g = self._call(x, self.weight + 1) - y if s["dw"] is not None else None
        if s["dw"] is not None:
            y = y + g * (w @ s["dw"]).reshape(shape)
        if s["db"] is not None:
            y = y + (w @ s["db"]).reshape(shape)
        return y


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm):
        return True
    params = dict(module.named_parameters(recurse=False))
    return "Norm" in type(module).__name__ and bool(params) \
        and set(params) <= {"weight", "bias"} and all(p.dim() == 1 for p in params.values())


# ----------------------------------------------------------------------------- building


@dataclass
class _Coverage:
    """What the working model mixes: module path -> (kind, {param: store tensor})."""

    modules: dict[str, tuple[str, dict[str, str]]]


def build_shared_model(store: Store, *, device: str | torch.device | None = None
                       ) -> nn.Module:
    """A plain model from the store's config with the shared model's weights loaded."""
    _check_twin(store)
    model = empty_model(store, device if device is not None else store.device)
    targets = store.targets(model)
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(store.shared_tensor(name))  # type: ignore[attr-defined]
    return model


def shared_feature_model(store: str | Path | Store, *, device: str | torch.device = "cpu",
                         max_length: int = DEFAULT_MAX_LENGTH) -> FeatureModel:
    """The router's feature model of a twin store: the shared model's backbone."""
    loaded = store if isinstance(store, Store) else open_store(store, device=device)
    model = build_shared_model(loaded, device=device)
    backbone = getattr(model, "base_model", model)
    return FeatureModel(loaded.path, tokenizer_path=loaded.path, device=device,
                        max_length=max_length, model=backbone)


def _check_twin(store: Store) -> None:
    if store.method != "twin":
        raise PolymergeError(f"{store.path.name} is a {store.method} store, not a twin store")


# ----------------------------------------------------------------------------- the runtime


@dataclass
class TwinOutput:
    """One input's answer: its mixing weights, the expert weighted most, the model output
    (logits or last hidden state of the text's own tokens, (tokens, dim))."""

    text: str
    expert: str
    weights: dict[str, float]
    output: torch.Tensor


@dataclass
class TwinGeneration:
    text: str
    expert: str
    weights: dict[str, float]
    completion: str


def check_routing(temperature: float, top_k: int | None, experts: int) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise PolymergeError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= experts):
        raise PolymergeError(f"top_k must be an integer from 1 to {experts} (the number of "
                             f"experts), got {top_k!r}")


class TwinModel(StoreRuntime):
    """What :func:`polymerge.load_store` returns for a twin store: one model mixing the
    experts per input, and the router that weights them."""

    def __init__(self, store: Store, *, device: str | torch.device = "cpu",
                 max_length: int = DEFAULT_MAX_LENGTH, temperature: float = 1.0,
                 top_k: int | None = None, fold: bool | None = None) -> None:
        _check_twin(store)
        check_routing(temperature, top_k, len(store.experts))
        self.store = store
        self.device = torch.device(device)
        if store.device != self.device:
            store.to(self.device)
        self.max_length = max_length
        self.temperature = float(temperature)
        self.top_k = top_k
        self.fold = fold
        self.mixture = Mixture(len(store.experts))
        self.twin_modules: dict[str, _TwinModule] = {}
        self.routing_passes = 0
        self.mixed_passes = 0
        self._model: nn.Module | None = None
        self._tokenizer: Any = None
        self._features: FeatureModel | None = None

    def __repr__(self) -> str:
        return (f"<TwinModel {self.store.path} experts={self.experts} "
                f"temperature={self.temperature} top_k={self.top_k}>")

    @property
    def experts(self) -> list[str]:
        return self.store.experts

    # -- the working model
    @property
    def model(self) -> nn.Module:
        """The working model: the shared weights, covered layers replaced by twin layers."""
        if self._model is None:
            self._model = self._build()
        return self._model

    def _build(self) -> nn.Module:
        store = self.store
        model = build_shared_model(store, device=self.device)
        targets = store.targets(model)
        mixed = {n for n, e in store.entries.items()
                 if e.kind in ("twin", "expert") and n in targets}
        by_ptr = {targets[n].data_ptr(): n for n in mixed}
        factors: dict[str, LowRank] = {}
        deltas: dict[str, torch.Tensor] = {}
        covered: set[str] = set()
        for path, module in list(model.named_modules()):
            hits = {p: by_ptr[t.data_ptr()] for p, t in module.named_parameters(recurse=False)
                    if t.data_ptr() in by_ptr}
            if not hits:
                continue
            new = self._twin_module(module, path, hits, factors, deltas)
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            self.twin_modules[path] = new
            covered |= set(hits.values())
        missing = sorted(mixed - covered)
        if missing:
            raise PolymergeError(f"twin runtime: the model has no layer holding {missing[0]!r} "
                                 f"as a parameter, so it cannot be mixed per input; rebuild "
                                 f"the store with others: shared or a scope without it")
        # The store's pieces become views of what the model holds (nothing kept twice).
        for name, target in targets.items():
            entry = store.entries[name]
            part = "merged" if entry.kind == "merged" else "shared"
            key = piece_name(name, part)
            piece = store.pieces.get(key)
            if piece is not None and piece.shape == target.shape \
                    and piece.dtype == target.dtype:
                store.pieces[key] = target
        for name, lr in factors.items():
            for t in range(lr.experts):
                store.pieces[piece_name(name, f"u.{t}")] = lr.u(t)
                store.pieces[piece_name(name, f"v.{t}")] = lr.v(t)
        return model.eval()

    def _twin_module(self, module: nn.Module, path: str, hits: dict[str, str],
                     factors: dict[str, LowRank], deltas: dict[str, torch.Tensor]
                     ) -> _TwinModule:
        store = self.store

        def low_rank(name: str) -> LowRank | None:
            if store.entries[name].kind != "twin":
                return None
            if name not in factors:
                us, vs = zip(*(store.factors(name, t)  # type: ignore[attr-defined]
                               for t in range(len(self.experts))), strict=True)
                factors[name] = LowRank.from_lists(us, vs)
            return factors[name]

        def delta(name: str | None) -> torch.Tensor | None:
            if name is None or store.entries[name].kind != "expert":
                return None
            if name not in deltas:
                shared = store.shared_tensor(name)  # type: ignore[attr-defined]
                deltas[name] = torch.stack([store.pieces[piece_name(name, expert_part(t))]
                                            - shared for t in range(len(self.experts))])
            return deltas[name]

        weight, bias = hits.get("weight"), hits.get("bias")
        unknown = set(hits) - {"weight", "bias"}
        kind = type(module).__name__
        if not unknown:
            if isinstance(module, nn.Linear) or kind == "Conv1D":
                return TwinLinear(module, factors=low_rank(weight) if weight else None,
                                  weight_delta=delta(weight), bias_delta=delta(bias),
                                  mixture=self.mixture)
            if isinstance(module, nn.Embedding) and bias is None:
                return TwinEmbedding(module, factors=low_rank(weight) if weight else None,
                                     weight_delta=delta(weight), mixture=self.mixture)
            if _is_norm(module) and all(store.entries[n].kind == "expert"
                                        for n in hits.values()):
                return TwinNorm(module, weight_delta=delta(weight), bias_delta=delta(bias),
                                mixture=self.mixture)
        raise PolymergeError(f"twin runtime: cannot mix {path or 'the model'} ({kind}) per "
                             f"input (tensors {sorted(hits.values())}); rebuild the store with "
                             "others: shared or a scope without them")

    # -- weights
    def set_weights(self, weights: WeightsLike | None, *, fold: bool | None = None) -> None:
        """Mixing weights for the next calls of :attr:`model`: (B, T), (T,), a mapping expert ->
        weight, or None (the shared model)."""
        self.model  # noqa: B018  (built before weights are set)
        self.mixture.set(None if weights is None else self._as_tensor(weights, None),
                         fold=self.fold if fold is None else fold)

    @contextlib.contextmanager
    def mixed(self, weights: WeightsLike | None, *, fold: bool | None = None) -> Iterator[None]:
        """``with rt.mixed(w): rt.model(...)``: weights set for the block, then the shared
        model again."""
        self.set_weights(weights, fold=fold)
        try:
            yield
        finally:
            self.mixture.set(None)

    def _as_tensor(self, weights: WeightsLike, n: int | None) -> torch.Tensor:
        t = len(self.experts)
        if isinstance(weights, Mapping):
            w = torch.zeros(t)
            for name, value in weights.items():
                w[self.store.expert_index(name)] = float(value)
        else:
            try:
                w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
            except (TypeError, ValueError, RuntimeError) as exc:
                raise PolymergeError(f"mixing weights must be numbers ({exc})") from None
        if w.dim() == 1 and w.shape[0] == t:
            w = w.unsqueeze(0).expand(n or 1, t)
        if w.dim() != 2 or w.shape[1] != t or (n is not None and w.shape[0] != n):
            want = f"({t},) or ({n if n is not None else 'batch'}, {t})"
            raise PolymergeError(f"weights must have shape {want} for {t} experts, got "
                                 f"{tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise PolymergeError("weights must be finite")
        return w.float().contiguous()

    def one_hot(self, names: Sequence[str | int]) -> torch.Tensor:
        """(len(names), T) one-hot weights: oracle routing to the named experts."""
        w = torch.zeros(len(names), len(self.experts))
        for row, name in enumerate(names):
            w[row, self.store.expert_index(name)] = 1.0
        return w

    def resolve(self, n: int, *, texts: Sequence[str] | None = None,
                weights: WeightsLike | None = None, expert: str | None = None,
                experts: Sequence[str] | None = None) -> torch.Tensor:
        """The (n, T) weights for n inputs: given, one-hot, or the router's for ``texts``."""
        given = [x is not None for x in (weights, expert, experts)]
        if sum(given) > 1:
            raise PolymergeError("give one of weights=, expert= or experts=")
        if expert is not None:
            return self.one_hot([expert] * n)
        if experts is not None:
            if len(experts) != n:
                raise PolymergeError(f"{len(experts)} experts for {n} inputs")
            return self.one_hot(list(experts))
        if weights is not None:
            return self._as_tensor(weights, n)
        assert texts is not None
        return self.route(texts)

    # -- routing (pass 1: the shared model)
    @property
    def router(self) -> Any:
        return self.store.router

    def _require_router(self) -> Any:
        router = self.router
        if router is None:
            raise PolymergeError(f"{self.store.path.name} has no router; train one with "
                                 f"`polymerge router train {self.store.path}` or give "
                                 "expert=, experts= or weights=")
        recorded = (getattr(router, "info", {}) or {}).get("feature", {})
        if recorded.get("model") != SHARED_FEATURES:
            raise PolymergeError(f"{self.store.path.name}'s router was trained on features of "
                                 f"{recorded.get('model')!r}, but a twin store routes on its "
                                 "shared model; retrain it with `polymerge router train "
                                 f"{self.store.path}`")
        return router

    @property
    def features(self) -> FeatureModel:
        """Pass 1's feature model: the working model's backbone, run with no weights set."""
        if self._features is None:
            recorded = (getattr(self.router, "info", {}) or {}).get("feature", {}) \
                if self.router is not None else {}
            backbone = getattr(self.model, "base_model", self.model)
            self._features = FeatureModel(
                self.store.path, tokenizer_path=self.store.path, device=self.device,
                max_length=int(recorded.get("max_length", self.max_length)), model=backbone)
        return self._features

    def _weights_from(self, feats: torch.Tensor) -> torch.Tensor:
        return self._require_router().weights(feats, temperature=self.temperature,
                                              top_k=self.top_k).float().cpu()

    def route(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), T) router weights (one expert: all ones)."""
        if len(self.experts) == 1:
            return torch.ones(len(texts), 1)
        self._require_router()
        with self.mixed(None):
            feats = self.features(list(texts))
        self.routing_passes += 1
        return self._weights_from(feats)

    def route_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, T) router weights of a tokenized batch (left padding is undone first)."""
        if len(self.experts) == 1:
            return torch.ones(input_ids.shape[0], 1)
        self._require_router()
        ids, mask = _right_aligned(input_ids, attention_mask)
        with self.mixed(None):
            feats = self.features.from_ids(ids, mask)
        self.routing_passes += 1
        return self._weights_from(feats)

    # -- answering (pass 2: the mixed model)
    def _named(self, w: torch.Tensor) -> tuple[str, dict[str, float]]:
        top = int(w.argmax())
        return self.experts[top], {e: round(float(v), 6) for e, v in
                                   zip(self.experts, w.tolist(), strict=True)}

    @torch.inference_mode()
    def forward(self, texts: Sequence[str], *, weights: WeightsLike | None = None,
                expert: str | None = None, experts: Sequence[str] | None = None,
                batch_size: int = 16, **kwargs: Any) -> list[TwinOutput]:
        """Run each text through its own mixture of the experts; outputs in input order."""
        texts = list(texts)
        w = self.resolve(len(texts), texts=texts, weights=weights, expert=expert,
                         experts=experts)
        tok = self.tokenizer
        tok.padding_side = "right"
        out: list[TwinOutput] = []
        for s in range(0, len(texts), batch_size):
            chunk = list(range(s, min(s + batch_size, len(texts))))
            enc = tok([texts[i] for i in chunk], padding=True, truncation=True,
                      max_length=self.max_length, return_tensors="pt").to(self.device)
            with self.mixed(w[chunk]):
                main = _primary(self.model(**enc, **kwargs))
            self.mixed_passes += 1
            for row, i in enumerate(chunk):
                n_tok = int(enc["attention_mask"][row].sum())
                name, named = self._named(w[i])
                out.append(TwinOutput(texts[i], name, named, main[row, :n_tok].float().cpu()))
        return out

    @torch.inference_mode()
    def generate(self, texts: Sequence[str], *, weights: WeightsLike | None = None,
                 expert: str | None = None, experts: Sequence[str] | None = None,
                 batch_size: int = 8, **kwargs: Any) -> list[TwinGeneration]:
        """Generate a completion for each text with its own mixture (greedy unless told)."""
        if not self.is_causal:
            raise PolymergeError(f"{type(self.model).__name__} does not generate text; use "
                                 "forward()")
        texts = list(texts)
        w = self.resolve(len(texts), texts=texts, weights=weights, expert=expert,
                         experts=experts)
        tok = self.tokenizer
        kwargs.setdefault("max_new_tokens", 32)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", tok.pad_token_id)
        out: list[TwinGeneration] = []
        tok.padding_side = "left"
        try:
            for s in range(0, len(texts), batch_size):
                chunk = list(range(s, min(s + batch_size, len(texts))))
                enc = tok([texts[i] for i in chunk], padding=True, truncation=True,
                          max_length=self.max_length, return_tensors="pt").to(self.device)
                with self.mixed(w[chunk]):
                    seqs = self.model.generate(**enc, **kwargs)
                self.mixed_passes += 1
                new = seqs[:, enc["input_ids"].shape[1]:]
                for row, i in enumerate(chunk):
                    name, named = self._named(w[i])
                    out.append(TwinGeneration(texts[i], name, named,
                                              tok.decode(new[row], skip_special_tokens=True)))
        finally:
            tok.padding_side = "right"
        return out

    def __call__(self, texts: str | Sequence[str], **kwargs: Any) -> list[Any]:
        batch = [texts] if isinstance(texts, str) else list(texts)
        return self.generate(batch, **kwargs) if self.is_causal else \
            self.forward(batch, **kwargs)

    def as_module(self, *, expert: str | None = None,
                  weights: WeightsLike | None = None) -> TwinModule:
        """An ``nn.Module`` taking token ids: each row mixed by the router's weights (or
        ``expert``'s one-hot weights, or fixed ``weights``)."""
        return TwinModule(self, expert=expert, weights=weights)

    # -- accounting
    def memory(self) -> dict[str, int]:
        """Bytes held, each storage counted once: the working model (shared weights, stacked
        factors, per-expert differences), the store's pieces not shared with it, and the
        feature model (0: pass 1 runs the working model)."""
        seen: set[int] = set()

        def unique(tensors: Any) -> int:
            total = 0
            for t in tensors:
                storage = t.untyped_storage()
                if storage.data_ptr() in seen:
                    continue
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            return total

        model = unique([*self.model.parameters(), *self.model.buffers()])
        store = unique(self.store.pieces.values())
        return {"store": store, "working_model": model, "feature_model": 0,
                "total": store + model}


def _right_aligned(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows moved to the left edge (router features are taken right-padded)."""
    if mask.shape[1] == 0 or bool(mask[:, 0].all()):
        return ids, mask
    ids, mask = ids.clone(), mask.clone()
    for row in range(ids.shape[0]):
        pad = int((mask[row].cumsum(0) == 0).sum())
        if pad:
            ids[row] = torch.roll(ids[row], -pad)
            mask[row] = torch.roll(mask[row], -pad)
    return ids, mask


def _primary(res: Any) -> torch.Tensor:
    from polymerge.runtime.routed import _primary as primary

    return primary(res)


class TwinModule(nn.Module):
    """Token ids in, the mixed model's outputs out (the zoo's evaluation contract).

    ``expert`` (one-hot, oracle routing) or ``weights`` (fixed) bypass the router; otherwise
    each row is routed by pass 1. ``last_weights`` / ``last_routes``: the last batch's weights
    and top experts.
    """

    def __init__(self, runtime: TwinModel, *, expert: str | None = None,
                 weights: WeightsLike | None = None) -> None:
        super().__init__()
        self.runtime = runtime
        self.expert = expert
        self.weights = weights
        self.last_weights: torch.Tensor | None = None
        self.last_routes: list[str] = []

    @property
    def config(self) -> Any:
        return self.runtime.model.config

    def _weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                 ) -> torch.Tensor:
        rt = self.runtime
        b = input_ids.shape[0]
        if self.expert is not None:
            w = rt.one_hot([self.expert] * b)
        elif self.weights is not None:
            w = rt._as_tensor(self.weights, b)
        else:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            w = rt.route_ids(input_ids, mask)
        self.last_weights = w
        self.last_routes = [rt.experts[int(i)] for i in w.argmax(-1)]
        return w

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        rt = self.runtime
        w = self._weights(input_ids, attention_mask)
        with rt.mixed(w):
            out = rt.model(input_ids=input_ids.to(rt.device),
                           attention_mask=None if attention_mask is None
                           else attention_mask.to(rt.device), **kwargs)
        rt.mixed_passes += 1
        return out

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        rt = self.runtime
        w = self._weights(input_ids, attention_mask)
        with rt.mixed(w):
            out = rt.model.generate(input_ids=input_ids.to(rt.device),
                                    attention_mask=None if attention_mask is None
                                    else attention_mask.to(rt.device), **kwargs)
        rt.mixed_passes += 1
        return out
