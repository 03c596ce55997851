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
from polymerge.methods.chunks import combine, gram, worth_chunking
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
    if worth_chunking(experts[0]):
        return _karcher_in_chunks(experts, max_iter=int(max_iter), tol=float(tol))
    shape = experts[0].shape
    vectors = [e.float().reshape(-1) for e in experts]
    alphas = [1.0 / len(vectors)] * len(vectors)
    return karcher_mean(vectors, alphas, max_iter=int(max_iter), tol=float(tol)).reshape(shape)


def _karcher_in_chunks(experts: Sequence[torch.Tensor], *, max_iter: int, tol: float
                       ) -> torch.Tensor:
    """:func:`karcher_mean` with equal weights from the Gram matrix of the inputs (one pass),
    then the result as a linear combination of them (another); no float32 copy of the inputs
    is held (see :mod:`polymerge.methods.chunks`).

    The direction always lies in the span of the unit vectors ``u_i`` (it starts as their mean
    and every tangent is a combination of them), so it is kept as coefficients ``a`` with
    ``m = sum_i a_i u_i``, and every dot product the iteration needs comes from the Gram
    matrix, in double precision.
    """
    n = len(experts)
    g = gram(experts).tolist()
    norms = [math.sqrt(g[i][i]) for i in range(n)]
    scale = sum(norms) / n
    part = [i for i, r in enumerate(norms) if r > tol]
    if not part:
        return torch.zeros(experts[0].shape, dtype=torch.float32)
    units = [[g[i][j] / (norms[i] * norms[j]) for j in part] for i in part]  # u_i . u_j

    def dots(a: list[float]) -> list[float]:  # u_i . m for every i taking part
        return [sum(row[j] * a[j] for j in range(len(part))) for row in units]

    def length(a: list[float]) -> float:
        return math.sqrt(max(0.0, sum(x * d for x, d in zip(a, dots(a), strict=True))))

    weight = 1.0 / len(part)
    a = [weight] * len(part)
    norm = length(a)
    a = [1.0] + [0.0] * (len(part) - 1) if norm < tol else [x / norm for x in a]
    for _ in range(max_iter):
        cosines = [min(1.0, max(-1.0, c)) for c in dots(a)]
        coefs = [0.0] * len(part)
        for i, c in enumerate(cosines):
            theta = math.acos(c)
            if theta >= tol:
                coefs[i] = weight * theta / math.sin(theta)
        along = sum(c * cos for c, cos in zip(coefs, cosines, strict=True))
        tangent = [c - along * x for c, x in zip(coefs, a, strict=True)]
        step = length(tangent)
        if step < tol:
            break
        a = [x * math.cos(step) + t * (math.sin(step) / step)
             for x, t in zip(a, tangent, strict=True)]
        norm = length(a)
        if norm > tol:
            a = [x / norm for x in a]
    coefficients = [0.0] * n
    for x, i in zip(a, part, strict=True):
        coefficients[i] = scale * x / norms[i]
    return combine(experts, coefficients)


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
    converts_inputs=True,
    propagates_nonfinite=True,
)

METHODS = (KARCHER,)
