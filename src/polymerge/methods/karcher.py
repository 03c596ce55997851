"""Karcher mean: the Riemannian centre of mass of the models' directions, times their mean norm.

Following mergekit 0.1.5, on each tensor as one vector, every listed model weighing the same
(``alpha = 1/N``):

1. each model's vector ``x_i`` has norm ``r_i`` and direction ``u_i = x_i / r_i``; models with
   ``r_i <= tol`` take no part in the direction (all of them: the result is zero);
2. the direction starts at the normalized mean of the ``u_i`` (the first direction if that mean
   is shorter than ``tol``), then takes up to ``max_iter`` Riemannian gradient steps: the tangent
   ``sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m)`` (``a_i`` renormalized over the
   taking part; ``theta_i < tol`` skipped) is followed along the great circle by its length,
   stopping when that length is below ``tol``;
3. the result is the direction times ``sum_i r_i / N`` (every model's norm counts).

The base model takes no part unless it is listed among the models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from polymerge.errors import RecipeError
from polymerge.methods.schema import MergeMethod, Param


def karcher_mean(vectors: Sequence[torch.Tensor], alphas: Sequence[float], *, max_iter: int,
                 tol: float) -> torch.Tensor:
    """Weighted Karcher mean on the sphere, scaled by ``sum_i alpha_i |x_i|`` (1-d inputs)."""
    norms = [float(torch.linalg.vector_norm(x)) for x in vectors]
    taking_part = [i for i, r in enumerate(norms) if r > tol]
    scale = sum(a * r for a, r in zip(alphas, norms, strict=True))
    if not taking_part:
        return torch.zeros_like(vectors[0])
    total = sum(alphas[i] for i in taking_part)
    weights = [alphas[i] / total for i in taking_part]
    units = [vectors[i] / norms[i] for i in taking_part]

    mean = torch.zeros_like(units[0])
    for w, u in zip(weights, units, strict=True):
        mean.add_(u, alpha=w)
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units, strict=True):
            cos = min(1.0, max(-1.0, float(torch.dot(mean, u))))
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent.add_(u - cos * mean, alpha=w * theta / math.sin(theta))
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        mean = mean * math.cos(step) + tangent * (math.sin(step) / step)
        length = float(torch.linalg.vector_norm(mean))
        if length > tol:
            mean = mean / length
    return mean * scale


def karcher_merge(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Karcher mean of the listed models, each tensor taken as one vector; ``base`` unused."""
    del base, generator
    if not experts:
        raise RecipeError("karcher: needs at least one model")
    if len(experts) == 1:
        return experts[0].float().clone()
    shape = experts[0].shape
    vectors = [e.float().reshape(-1) for e in experts]
    alphas = [1.0 / len(vectors)] * len(vectors)
    return karcher_mean(vectors, alphas, max_iter=int(max_iter), tol=float(tol)).reshape(shape)


KARCHER = MergeMethod(
    name="karcher",
    fn=karcher_merge,
    params=(
        Param("max_iter", int, default=10, low=0, help="most Riemannian gradient steps"),
        Param("tol", float, default=1e-5, low=0.0,
              help="convergence tolerance (step length, angle and norm floor)"),
    ),
    description="Karcher (Riemannian) mean of the listed models' directions on the hypersphere, "
                "scaled by their mean norm.",
    base_policy="input",
    min_experts=1,
    reference="https://arxiv.org/abs/2603.04972",
)

METHODS = (KARCHER,)
