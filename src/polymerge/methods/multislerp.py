"""Multi-SLERP: a weighted barycentre of any number of models on the hypersphere.

Following mergekit 0.1.5, on each tensor as one vector (task vectors ``model_i - base`` when a
base is given):

1. the weights are divided by their sum (``normalize_weights``, default true);
2. each vector ``v_i`` is projected on the unit sphere, ``u_i = v_i / (|v_i| + eps)``;
3. ``m`` is the normalized weighted mean of the ``u_i``; each ``u_i`` is projected onto the tangent
   space at ``m`` and the weighted sum ``r`` of the projections is mapped back to the sphere by
   the exponential map, ``m cos|r| + r sin|r| / |r|`` (with ``|r| + eps`` in place of ``|r|``);
4. the result is scaled by the weighted mean norm ``sum_i w_i |v_i|`` (and the base added back).

A single model is returned as is. When the weighted mean of the unit vectors vanishes
(``|m| < eps``, e.g. two opposite vectors with equal weights) two models are mixed linearly,
``w_0 v_0 + w_1 v_1``; with more there is no answer and the merge stops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from polymerge.errors import RecipeError
from polymerge.methods.chunks import combine, gram, worth_chunking
from polymerge.methods.gta import per_model
from polymerge.methods.schema import REQUIRED, MergeMethod, Param


def multislerp_merge(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    weight: Any,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Weighted spherical barycentre of the experts (of their task vectors around ``base``)."""
    del generator
    n = len(experts)
    if n == 0:
        raise RecipeError("multislerp: needs at least one model")
    if n == 1:
        return experts[0].float().clone()
    shape = experts[0].shape
    weights = torch.tensor(per_model(weight, n, "weight"), dtype=torch.float32)
    if normalize_weights:
        if float(weights.sum()) == 0:
            raise RecipeError("multislerp: the weights sum to 0, cannot normalize "
                              "(set normalize_weights: false or change the weights)")
        weights = weights / weights.sum()
    if worth_chunking(experts[0]):
        return _multislerp_in_chunks(base, experts, weights.tolist(), eps)
    device = experts[0].device
    weights = weights.to(device)
    if base is None:
        vectors = torch.stack([e.float().reshape(-1) for e in experts])
    else:
        flat_base = base.float().reshape(-1)
        vectors = torch.stack([e.float().reshape(-1) - flat_base for e in experts])
    norms = torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    units = vectors / (norms + eps)
    w = weights.unsqueeze(1)
    mean = (units * w).sum(dim=0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if n != 2:
            raise RecipeError(
                "multislerp: the weighted mean of the models' directions is zero (opposite "
                "models whose weights cancel out); change the weights")
        out = vectors[0] * weights[0] + vectors[1] * weights[1]
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(dim=1, keepdim=True) * mean
        del units
        tangent = (tangents * w).sum(dim=0)
        del tangents
        tangent_norm = torch.linalg.vector_norm(tangent) + eps
        out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
        out = out * (norms.squeeze(1) * weights).sum()
    out = out.reshape(shape)
    return out if base is None else out.add_(base.float())


def _multislerp_in_chunks(base: torch.Tensor | None, experts: Sequence[torch.Tensor],
                          weights: list[float], eps: float) -> torch.Tensor:
    """The same steps from the Gram matrix of the vectors (one pass over the inputs), then the
    result as a linear combination of them (another); no float32 copy of the inputs is held
    (see :mod:`polymerge.methods.chunks`).

    Every quantity lives in the span of the ``v_i``: the mean is ``sum_i c_i v_i`` with
    ``c_i = w_i / (|v_i| + eps)``, its dot products come from the Gram matrix, and the tangent
    ``sum_i w_i (u_i - (u_i . m) m)`` is the mean times ``1 - along / |mean|`` (zero but for
    rounding: the weighted projections add up to the mean itself).
    """
    n = len(experts)
    g = gram(experts, base).tolist()
    norms = [math.sqrt(g[i][i]) for i in range(n)]
    coef = [w / (r + eps) for w, r in zip(weights, norms, strict=True)]
    with_mean = [sum(g[i][j] * coef[j] for j in range(n)) for i in range(n)]  # v_i . mean
    mean_norm = math.sqrt(max(0.0, sum(c * d for c, d in zip(coef, with_mean, strict=True))))
    if mean_norm < eps:
        if n != 2:
            raise RecipeError(
                "multislerp: the weighted mean of the models' directions is zero (opposite "
                "models whose weights cancel out); change the weights")
        return combine(experts, weights, around=base)
    along = sum(w * d / (r + eps)
                for w, d, r in zip(weights, with_mean, norms, strict=True)) / mean_norm
    shrink = 1.0 - along / mean_norm  # tangent = shrink * mean
    tangent_norm = abs(shrink) * mean_norm + eps
    scale = sum(r * w for r, w in zip(norms, weights, strict=True))
    # m cos|t| + t sin|t| / |t|, with m = mean / |mean| and t = shrink * mean
    factor = (math.cos(tangent_norm) / mean_norm
              + shrink * math.sin(tangent_norm) / tangent_norm) * scale
    return combine(experts, [factor * c for c in coef], around=base)


def check_multislerp_params(params: dict[str, Any]) -> None:
    """Normalizing weights that cancel out has no answer; say so before merging."""
    if params.get("normalize_weights", True) and sum(params["weight"]) == 0:
        raise RecipeError("multislerp: the weights sum to 0, cannot normalize "
                          "(set normalize_weights: false or change the weights)")


MULTISLERP = MergeMethod(
    name="multislerp",
    fn=multislerp_merge,
    params=(
        Param("weight", float, default=REQUIRED, scope="per_model",
              help="weight of this model in the spherical barycentre"),
        Param("normalize_weights", bool, default=True, help="divide the weights by their sum"),
        Param("eps", float, default=1e-8, low=0.0, help="numerical floor of norms"),
    ),
    description="Weighted barycentre of any number of models (or task vectors around an "
                "optional base) on the hypersphere, via the tangent space at their mean.",
    base_policy="optional",
    min_experts=1,
    check_params=check_multislerp_params,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    converts_inputs=True,
    propagates_nonfinite=True,
)

METHODS = (MULTISLERP,)
