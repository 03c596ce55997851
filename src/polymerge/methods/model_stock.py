"""Model Stock: move from the base towards the experts' average by an angle-derived ratio.

With N experts and the mean cosine ``c`` between their pairwise offsets from the base,
``t = N c / (1 + (N - 1) c)`` and the result is ``t * mean(experts) + (1 - t) * base``. Where the
denominator vanishes (|.| < 1e-6) no finite estimate exists, and the base is kept (t = 0), as in
mergekit 0.1.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from polymerge.errors import RecipeError
from polymerge.methods.chunks import combine, gram, worth_chunking
from polymerge.methods.schema import MergeMethod, Param


def model_stock_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    filter_wise: bool = False,
) -> torch.Tensor:
    """Model Stock over the whole tensor, or per row of the last dimension if ``filter_wise``."""
    del generator
    if base is None or len(experts) < 2:
        raise RecipeError("model_stock: needs a base model and at least two other models")
    if not filter_wise and worth_chunking(base):
        return _model_stock_in_chunks(base, experts)
    w0 = base.float()
    shape = w0.shape
    # filter_wise: each slice along the last dimension (a row of a 2-d weight) gets its own
    # ratio; a 0-d or 1-d tensor is one such slice.
    if not filter_wise:
        w0 = w0.reshape(-1)
    elif w0.dim() < 2:
        w0 = w0.reshape(1, -1)
    ws = torch.stack([e.float().reshape(w0.shape) for e in experts])
    offsets = ws - w0
    n = len(experts)
    norms = torch.linalg.vector_norm(offsets, dim=-1)
    # A loop over the few expert pairs keeps scratch memory at one tensor per pair.
    cos = [
        ((offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6))
        .clamp(-1, 1)
        for i in range(n) for j in range(i + 1, n)
    ]
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), n * cos_theta / safe)
    average = ws.mean(dim=0)
    return (t * average + (1 - t) * w0).reshape(shape)


def _ratio(n: int, mean_cos: float) -> float:
    denominator = 1 + (n - 1) * mean_cos
    return 0.0 if abs(denominator) < 1e-6 else n * mean_cos / denominator


def _model_stock_in_chunks(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The whole-tensor ratio from the Gram matrix of the offsets (one pass), then
    ``base + t * mean(offsets)`` (another); no float32 copy of the inputs is held (see
    :mod:`polymerge.methods.chunks`)."""
    n = len(experts)
    g = gram(experts, base).tolist()
    norms = [math.sqrt(g[i][i]) for i in range(n)]
    cosines = [max(-1.0, min(1.0, g[i][j] / max(norms[i] * norms[j], 1e-6)))
               for i in range(n) for j in range(i + 1, n)]
    t = _ratio(n, sum(cosines) / len(cosines))
    return combine(experts, [t / n] * n, around=base)


MODEL_STOCK = MergeMethod(
    name="model_stock",
    fn=model_stock_merge,
    params=(
        Param("filter_wise", bool, default=False,
              help="one interpolation ratio per row instead of per tensor"),
    ),
    description="Interpolate from the base towards the experts' mean by a ratio derived from "
                "the angle between their offsets.",
    base_policy="required",
    min_experts=2,
    reference="https://arxiv.org/abs/2403.19522",
    converts_inputs=True,
    propagates_nonfinite=True,
)

METHODS = (MODEL_STOCK,)
