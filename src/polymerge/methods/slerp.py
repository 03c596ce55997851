"""SLERP between the base and one other model, over the whole tensor.

As in mergekit 0.1.5, each tensor is one vector (all its entries, whatever its shape): the two
vectors are interpolated along the great circle between their directions, with the coefficients
``sin((1-t) theta) / sin(theta)`` and ``sin(t theta) / sin(theta)`` applied to the unnormalized
tensors. Nearly collinear or antipodal pairs (|cos theta| > 0.9995) fall back to linear
interpolation, and a vector of norm <= 1e-8 is not normalized (its norm counts as 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polymerge.errors import RecipeError
from polymerge.methods.schema import REQUIRED, MergeMethod, Param

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
_CHUNK = 1 << 20
"""Entries per step of the reductions: the products stay in cache instead of a full-size
temporary per tensor."""


def _norm(x: torch.Tensor) -> float:
    norm = float(torch.linalg.vector_norm(x))
    return norm if norm > NORM_EPS else 1.0


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), the whole tensor as one vector."""
    a = a.float()
    b = b.float()
    if a.numel() == 0:
        return (1 - t) * a + t * b
    va = a.reshape(-1)
    vb = b.reshape(-1)
    norm_a = _norm(va)
    norm_b = _norm(vb)
    dot = 0.0
    for start in range(0, va.numel(), _CHUNK):
        xa = va[start:start + _CHUNK] / norm_a
        xb = vb[start:start + _CHUNK] / norm_b
        dot += float(torch.dot(xa, xb))
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        coef_a, coef_b = 1.0 - t, t
    else:
        theta = torch.acos(torch.tensor(dot, dtype=torch.float32))
        sin_theta = torch.sin(theta)
        coef_a = float(torch.sin((1 - t) * theta) / sin_theta)
        coef_b = float(torch.sin(t * theta) / sin_theta)
    return torch.add(a * coef_a, b, alpha=coef_b)


def slerp_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    t: float,
) -> torch.Tensor:
    """SLERP from ``base`` (t=0) to the single expert (t=1)."""
    del generator
    if base is None or len(experts) != 1:
        raise RecipeError("slerp: needs a base model and exactly one other model")
    if experts[0].shape != base.shape:
        raise RecipeError(f"slerp: shapes differ, {tuple(base.shape)} vs "
                          f"{tuple(experts[0].shape)}")
    return slerp(float(t), base, experts[0])


SLERP = MergeMethod(
    name="slerp",
    fn=slerp_merge,
    params=(
        Param("t", float, default=REQUIRED, low=0.0, high=1.0,
              help="interpolation factor: 0 gives the base, 1 the other model"),
    ),
    description="Spherical linear interpolation over each whole tensor, from the base (t=0) "
                "to one other model (t=1).",
    base_policy="required",
    min_experts=1,
    max_experts=1,
    reference="https://doi.org/10.1145/325165.325242",
    converts_inputs=True,
)

METHODS = (SLERP,)
