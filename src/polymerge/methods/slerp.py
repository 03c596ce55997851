"""SLERP between the base and one other model, row by row.

As in mergekit 0.1.5, each tensor is viewed as rows ``reshape(shape[0], -1)`` (so a 1-d tensor of
n entries is n rows of one entry, whose interpolation is linear unless the signs differ; a 0-d
tensor is one row of one entry). Each row pair is interpolated along the great circle between
their directions with coefficients applied to the unnormalized rows; nearly collinear rows
(|cos| > 0.9995) fall back to linear interpolation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polymerge.errors import RecipeError
from polymerge.methods.schema import REQUIRED, MergeMethod, Param

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), one coefficient pair per row."""
    a = a.float()
    b = b.float()
    shape = a.shape
    if a.numel() == 0:
        return (1 - t) * a + t * b
    rows_a = a.reshape(1, 1) if a.dim() == 0 else a.reshape(shape[0], -1)
    rows_b = b.reshape(rows_a.shape)
    norm_a = torch.linalg.vector_norm(rows_a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(rows_b, dim=1, keepdim=True)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, torch.ones_like(norm_b))
    dot = ((rows_a / norm_a) * (rows_b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    # acos(0) on the linear rows keeps sin(theta) away from 0 on the branch torch.where drops.
    theta = torch.acos(torch.where(linear, torch.zeros_like(dot), dot))
    sin_theta = torch.sin(theta)
    lin_a = torch.full_like(dot, 1 - t)
    lin_b = torch.full_like(dot, t)
    coef_a = torch.where(linear, lin_a, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, lin_b, torch.sin(t * theta) / sin_theta)
    return (coef_a * rows_a + coef_b * rows_b).reshape(shape)


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
    description="Spherical linear interpolation, per row, from the base (t=0) to one other "
                "model (t=1).",
    base_policy="required",
    min_experts=1,
    max_experts=1,
    reference="https://doi.org/10.1145/325165.325242",
)

METHODS = (SLERP,)
