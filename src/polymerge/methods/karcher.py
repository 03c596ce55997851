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
from polymerge.methods.chunks import dot, float_chunks, worth_chunking
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
    """:func:`karcher_mean` with equal weights, holding only the direction (the output) in
    float32: norms and every dot product are summed over chunks of the inputs as stored (see
    :mod:`polymerge.methods.chunks`). The tangent ``sum_i c_i (u_i - cos_i m)`` is computed as
    ``sum_i c_i u_i - (sum_i c_i cos_i) m``, the same vector; three passes an iteration."""
    squares = [0.0] * len(experts)
    for _, _, xs in float_chunks(experts):
        for i, x in enumerate(xs):
            squares[i] += dot(x, x)
    norms = [math.sqrt(s) for s in squares]
    scale = sum(norms) / len(experts)
    taking_part = [i for i, r in enumerate(norms) if r > tol]
    out = torch.zeros(experts[0].shape, dtype=torch.float32)
    if not taking_part:
        return out
    weight = 1.0 / len(taking_part)
    mean = out.view(-1)

    def combine(coefs: dict[int, float], xs: list[torch.Tensor]) -> torch.Tensor:
        """sum_i coefs[i] u_i of one chunk, products rounded before they are added."""
        items = iter(coefs.items())
        first, c = next(items)
        total = xs[first] * (c / norms[first])
        for i, c in items:
            total += xs[i] * (c / norms[i])
        return total

    mean_square = 0.0
    for b, e, xs in float_chunks(experts):
        mean[b:e] = combine({i: weight for i in taking_part}, xs)
        mean_square += dot(mean[b:e], mean[b:e])
    if math.sqrt(mean_square) < tol:
        mean.copy_(experts[taking_part[0]].reshape(-1)).div_(norms[taking_part[0]])
    else:
        mean.div_(math.sqrt(mean_square))

    for _ in range(max_iter):
        cosines = dict.fromkeys(taking_part, 0.0)
        for b, e, xs in float_chunks(experts):
            for i in taking_part:
                cosines[i] += dot(mean[b:e], xs[i]) / norms[i]
        coefs: dict[int, float] = {}
        for i in taking_part:
            cosines[i] = min(1.0, max(-1.0, cosines[i]))
            theta = math.acos(cosines[i])
            if theta >= tol:
                coefs[i] = weight * theta / math.sin(theta)
        if not coefs:
            break
        along = sum(c * cosines[i] for i, c in coefs.items())

        def tangent(b: int, e: int, xs: list[torch.Tensor], coefs: dict[int, float] = coefs,
                    along: float = along) -> torch.Tensor:
            return combine(coefs, xs).sub_(mean[b:e], alpha=along)

        step = math.sqrt(sum(dot(t, t) for t in (tangent(*c) for c in float_chunks(experts))))
        if step < tol:
            break
        length_square = 0.0
        for b, e, xs in float_chunks(experts):
            t = tangent(b, e, xs)
            mean[b:e] = mean[b:e] * math.cos(step) + t * (math.sin(step) / step)
            length_square += dot(mean[b:e], mean[b:e])
        if math.sqrt(length_square) > tol:
            mean.div_(math.sqrt(length_square))
    return out.mul_(scale)


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
)

METHODS = (KARCHER,)
