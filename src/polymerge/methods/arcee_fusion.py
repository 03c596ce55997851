"""Arcee Fusion: take the other model's value only where it changed the base importantly.

As in mergekit 0.1.5, on each tensor: the importance of an entry is ``|x - b|`` times the KL
divergence between ``softmax(x)`` and ``softmax(b)`` of its row (softmax over the last
dimension, each probability plus 1e-8; a 1-d tensor is one row). The threshold is
``median + 1.5 (q3 - q1)`` of the importances, the quartiles read from the sorted importances at
index ``floor(q (n - 1))``; entries at or above it take the other model's value, the rest keep the
base's.

Tensors of more than a million entries estimate the quartiles from a million importances drawn
with replacement, as mergekit does; the draw comes from the engine's per-tensor generator, so it
is reproducible for a seed (mergekit draws from torch's global generator), and such tensors
differ from mergekit's draw by draw. Smaller tensors are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from polymerge.errors import RecipeError
from polymerge.methods import chunks
from polymerge.methods.schema import MergeMethod
from polymerge.methods.sparsify import order_statistics

QUANTILE_SAMPLE = 1_000_000
PROB_EPS = 1e-8
QUARTILES = (0.25, 0.5, 0.75)


def _row_kl(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The KL divergence of ``softmax(other)`` against ``softmax(base)`` of each row (float32
    rows, the last dimension), each probability plus 1e-8."""
    p = F.softmax(other, dim=-1).add_(PROB_EPS)
    q = F.softmax(base, dim=-1).add_(PROB_EPS)
    return p.div(q).log_().mul_(p).sum(dim=-1)


def fusion_threshold(sample: torch.Tensor) -> float:
    """``median + 1.5 IQR`` of the scores ``sample``, the quartiles read from the sorted
    scores at index ``floor(q (n - 1))`` (float32 positions, as mergekit computes them)."""
    positions = (torch.tensor(QUARTILES, dtype=torch.float32) * (sample.numel() - 1)).long()
    q1, median, q3 = order_statistics(sample.reshape(-1).float(),
                                      [int(p) + 1 for p in positions])
    return float(torch.tensor(median) + 1.5 * (torch.tensor(q3) - torch.tensor(q1)))


def arcee_fusion_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Arcee Fusion of the base and one other model (see the module docstring).

    Two passes over blocks of whole rows that stay in the CPU's caches (see
    :mod:`polymerge.methods.chunks`): every score, written where the result will go, then
    each entry taken from the other model or the base by its score against the threshold,
    in place of the score. No tensor-sized temporary is made.
    """
    if base is None or len(experts) != 1:
        raise RecipeError("arcee_fusion: needs a base model and exactly one other model")
    other = experts[0]
    numel = base.numel()
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    if numel == 0:
        return out
    width = base.shape[-1] if base.dim() > 0 else 1
    rows_b, rows_o, rows_out = (t.reshape(-1, width) for t in (base, other, out))
    step = max(1, chunks.CHUNK // width) if chunks.worth_chunking(base) else rows_b.shape[0]
    blocks = [(r, min(rows_b.shape[0], r + step)) for r in range(0, rows_b.shape[0], step)]
    for r0, r1 in blocks:
        b, o = rows_b[r0:r1].float(), rows_o[r0:r1].float()
        scores = torch.sub(o, b, out=rows_out[r0:r1]).abs_()
        scores.mul_(_row_kl(o, b).unsqueeze(-1))
    sample = out.view(-1)
    if numel > QUANTILE_SAMPLE:
        device = generator.device if generator is not None else base.device
        picks = torch.randint(numel, (QUANTILE_SAMPLE,), generator=generator, device=device)
        sample = sample.index_select(0, picks.to(base.device))  # faster than [picks]
    threshold = fusion_threshold(sample)
    below = torch.nextafter(torch.tensor(threshold), torch.tensor(-math.inf)).item()
    for r0, r1 in blocks:
        b, o = rows_b[r0:r1].float(), rows_o[r0:r1].float()
        scores = rows_out[r0:r1]
        if threshold > 0:  # 1.0 where score >= threshold (> 0), cheaper than >= and .float()
            take = F.threshold_(scores, below, 0.0).sign_()
        else:
            take = (scores >= threshold).float()
        # lerp with a weight of exactly 0 or 1 returns ``b`` or ``o`` exactly
        torch.lerp(b, o, take, out=scores)
    return out


ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    fn=arcee_fusion_merge,
    params=(),
    description="Take the other model's entries whose change, weighted by the KL divergence of "
                "their row, is an outlier (above median + 1.5 IQR); keep the base elsewhere.",
    base_policy="required",
    min_experts=1,
    max_experts=1,
    random=True,
    reference="https://arcee.ai",
    converts_inputs=True,
)

METHODS = (ARCEE_FUSION,)
