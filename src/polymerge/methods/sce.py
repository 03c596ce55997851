"""SCE: Select task-vector entries by variance, Calculate weights from energy, Erase sign conflicts.

Following mergekit 0.1.5 on each tensor, with task vectors ``d_i = expert_i - base``:

1. Select: with ``select_topk < 1``, only the ``k = int(select_topk * nnz)`` entries with the
   largest variance across the experts (population variance; ``nnz`` counts entries of non-zero
   variance) are kept in every task vector; ``select_topk <= 0`` keeps none;
2. Calculate: expert ``i`` weighs ``mean(d_i^2) / sum_j mean(d_j^2)`` (equal weights when that sum
   is below 1e-6);
3. Erase: the elected sign of an entry is that of ``sum_i d_i`` (0 counts as +); an expert takes
   part in an entry only where its sign agrees (zero entries never do), and the result is
   ``base + sum_i w_i a_i d_i / max(sum_i w_i a_i, 1e-6)`` with ``a_i`` the agreement mask.

Deterministic: no random draw, and no parameter per model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polymerge.errors import RecipeError
from polymerge.methods.chunks import float_chunks, spans, worth_chunking
from polymerge.methods.schema import MergeMethod, Param
from polymerge.methods.sparsify import top_k_in_chunks

WEIGHT_SUM_EPS = 1e-6
DIVISOR_FLOOR = 1e-6


def population_variance(deltas: torch.Tensor, out: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Variance across experts (dim 0, divided by N) of each entry.

    Written out over the few experts: ``torch.var(dim=0)`` reduces along the slow axis, which
    on CPU cost most of SCE's time.
    """
    mean = deltas.sum(dim=0).div_(deltas.shape[0])
    total = torch.zeros_like(mean) if out is None else out.zero_()
    for delta in deltas:
        total.add_((delta - mean).square_())
    return total.div_(deltas.shape[0])


def variance_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the ``int(fraction * nnz)`` entries of largest variance across experts."""
    if fraction >= 1:
        return torch.ones(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    if fraction <= 0:
        return torch.zeros(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    var = population_variance(deltas)
    k = int(int(torch.count_nonzero(var)) * fraction)
    mask = torch.zeros(var.numel(), dtype=torch.bool, device=deltas.device)
    if k > 0:
        mask[torch.topk(var.reshape(-1), k, largest=True).indices] = True
    return mask.reshape(var.shape)


def sce_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    select_topk: float = 1.0,
) -> torch.Tensor:
    """Merge one tensor by SCE (see the module docstring)."""
    del generator
    if base is None:
        raise RecipeError("sce: needs a base model")
    if not experts:
        return base.float().clone()
    if worth_chunking(base):
        return _sce_in_chunks(base, experts, float(select_topk))
    base = base.float()
    deltas = torch.stack([e.float() - base for e in experts])
    if select_topk < 1:
        deltas.mul_(variance_mask(deltas, float(select_topk)))

    energy = torch.stack([d.square().mean() for d in deltas])
    total = float(energy.sum())
    weights = (torch.full_like(energy, 1.0 / len(experts)) if abs(total) < WEIGHT_SUM_EPS
               else energy / total)

    return _erase(deltas, weights.tolist(), base)


def _erase(deltas: torch.Tensor, weights: list[float], base: torch.Tensor) -> torch.Tensor:
    """Step 3 on (N, ...) deltas: the weighted mean of the entries that agree with the
    elected sign, added to ``base``. Expert by expert: one tensor-sized temporary at a time
    instead of (N, ...) ones."""
    elected_positive = deltas.sum(dim=0) >= 0
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for w, delta in zip(weights, deltas, strict=True):
        agree = torch.where(elected_positive, delta > 0, delta < 0)
        mixed.add_(delta * agree, alpha=w)
        divisor.add_(agree, alpha=w)
    return mixed.div_(divisor.clamp_(min=DIVISOR_FLOOR)).add_(base)


def _deltas(block: torch.Tensor) -> torch.Tensor:
    """(N, chunk) task vectors, in place, from one block of [base, expert_1, ..., expert_N]."""
    return block[1:].sub_(block[0])


def _sce_in_chunks(base: torch.Tensor, experts: Sequence[torch.Tensor],
                   fraction: float) -> torch.Tensor:
    """The same three steps with the whole-tensor quantities (the variance threshold and
    count, the energies) summed over chunks, so no float32 copy of the inputs is held (see
    :mod:`polymerge.methods.chunks`). Ties at the variance threshold go to the lowest
    positions (``topk`` on whole tensors picks among them in no defined order)."""
    inputs = [base, *experts]
    n, numel = len(experts), base.numel()
    keep = torch.full((numel,), fraction >= 1, dtype=torch.bool)
    if 0 < fraction < 1:
        # The variances are kept (one float32 tensor, not N+1): computing them is the
        # expensive step, and the threshold needs two passes over them.
        variance = torch.empty(numel, dtype=torch.float32)
        for b, e, block in float_chunks(inputs):
            population_variance(_deltas(block), out=variance[b:e])
        k = int(int(torch.count_nonzero(variance)) * fraction)
        if k > 0:
            pieces = [variance[b:e] for b, e in spans(numel)]
            top = top_k_in_chunks(lambda: pieces, k)
            for (b, e), var in zip(spans(numel), pieces, strict=True):
                keep[b:e] = top.mask(var, b)
    squares = torch.zeros(n, dtype=torch.float64)
    for b, e, block in float_chunks(inputs):
        deltas = _deltas(block).mul_(keep[b:e])
        squares += deltas.square().sum(dim=1, dtype=torch.float64)
    energy = squares / numel
    total = float(energy.sum())
    weights = [1.0 / n] * n if abs(total) < WEIGHT_SUM_EPS else (energy / total).tolist()
    out = torch.empty(base.shape, dtype=torch.float32)
    flat_out = out.view(-1)
    for b, e, block in float_chunks(inputs):
        flat_out[b:e] = _erase(_deltas(block).mul_(keep[b:e]), weights, block[0])
    return out


SCE = MergeMethod(
    name="sce",
    fn=sce_merge,
    params=(
        Param("select_topk", float, default=1.0, low=0.0, high=1.0,
              help="fraction of entries kept, those of largest variance across the experts"),
    ),
    description="Keep the highest-variance task-vector entries, weight experts by their "
                "energy, erase sign conflicts, average.",
    base_policy="required",
    min_experts=1,
    reference="https://arxiv.org/abs/2408.07990",
    converts_inputs=True,
)

METHODS = (SCE,)
