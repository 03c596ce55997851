"""The cost rule by which a mixing layer picks how to compute its experts' terms.

Row-sparse weights (top-k routing with mixed routes: each row needs only its k experts) may take
a *grouped path* instead of the dense one, computing each expert's term only on the rows that
weight it. A group is a set of rows and experts: its rows are gathered (``index_select`` on the
(B, L, in) input), run through the experts' stacked factors (two GEMMs, the row weights applied
in between) and added back (``index_add_``); a group of every row works in place. ``"experts"``
makes one group per active expert (its rows); ``"sets"`` one group per set of experts that some
rows use exactly (top-2 of 4: up to 6 pairs), so that each row is gathered and added back once
and its k experts run as one GEMM of width k r (their columns are a view when the experts are
consecutive, else copied). The dense stacked path is the one group of every row and every
active expert. :func:`choose_path` picks, per module, batch size and tokens per row, the
cheapest of the three by one cost estimate, in multiply-adds (:func:`path_cost`; ``W = in +
out``, ``L`` tokens per row, ``r`` the rank)::

    sum over groups (n rows, k experts):
        n L (k r + GEMM_OVERHEAD + ROUTE_COST [unless n is every row]) W
        + ROUTE_COST (columns copied) W + CALL_COST

``GEMM_OVERHEAD`` = 32 (a GEMM of width k r runs like one of width k r + 32: narrow GEMMs are
slow), ``ROUTE_COST`` = 8 (gathering and adding back one element, measured at 4-6 on one CPU
thread) and ``CALL_COST`` = 1e6 (a group's ten-odd calls, about 40 us), all measured on CPU.
Dense per-row softmax weights thus stay on the dense path, top-1 takes ``experts`` (=
``sets``) and top-2 of 4 ``sets`` at the benchmark's shapes (MiniLM, rank 38, 64 tokens per
row), and decoding a small batch (one token per row, batch 8) stays dense, where the calls
would cost more than the multiply-adds saved. Dense per-expert weights (``others: expert``)
count as rank ``in out / (in + out)``. Every path gives the same numbers up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

GEMM_OVERHEAD = 32.0
"""A GEMM of inner or outer size k r costs as if it were ``k r + GEMM_OVERHEAD`` (narrow
GEMMs run below the machine's peak; see the module docstring)."""
ROUTE_COST = 8.0
"""Gathering an input row and adding its output back (``index_select``, ``index_add_``), or
copying a factor column, per element of the layer's width, in multiply-adds."""
CALL_COST = 1e6
"""The fixed cost of one group's calls (about ten tensor ops), in multiply-adds."""

PATHS = ("dense", "experts", "sets")


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


def routes_of(nonzero: torch.Tensor, active: Sequence[int], device: torch.device) -> Routes:
    """The routes of a (rows, k) mask of nonzero weights over the ``active`` experts."""
    sets: dict[tuple[int, ...], list[int]] = {}
    for row, mask in enumerate(nonzero.tolist()):
        js = tuple(j for j, on in enumerate(mask) if on)
        if js:
            sets.setdefault(js, []).append(row)

    def group(js: tuple[int, ...], rows: list[int]) -> RouteGroup:
        return RouteGroup(js, tuple(active[j] for j in js), len(rows),
                          torch.tensor(rows, dtype=torch.long, device=device))

    return Routes(int(nonzero.shape[0]), int(nonzero.sum()),
                  [group((j,), col.nonzero().flatten().tolist())
                   for j, col in enumerate(nonzero.T) if bool(col.any())],
                  [group(js, sets[js]) for js in sorted(sets)])


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
