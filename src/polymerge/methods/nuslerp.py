"""NuSLERP: spherical interpolation of two models by their weights, optionally around a base.

With weights ``w0, w1`` of the two models, ``t = w1 / (w0 + w1)``; weights summing to zero
(|sum| < 1e-6) give ``t = 0.5``, as in mergekit 0.1.5. With a base, the two task vectors
``model_i - base`` are interpolated and the base added back; without one, the models themselves.

The vectors interpolated are, as in mergekit:

* ``nuslerp_flatten: true`` (the default): the whole tensor, one vector;
* ``nuslerp_flatten: false``: each slice along the last dimension (each row of a 2-d weight), or
  with ``nuslerp_row_wise: true`` each slice along the first dimension (each column).

Each vector is normalized by max(|v|, 1e-7), so a zero vector has cos theta = 0 with anything.
Pairs whose ``1 - cos^2 theta`` is at most 1e-16 (exactly collinear in float32) are interpolated
linearly; every other pair by ``(sin((1-t) theta) v0 + sin(t theta) v1) / sin theta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from polymerge.errors import RecipeError
from polymerge.methods.gta import per_model
from polymerge.methods.schema import REQUIRED, MergeMethod, Param

ZERO_SUM = 1e-6
NORMALIZE_EPS = 1e-7
COLINEAR_EPS = 1e-8


def nuslerp_t(weights: Sequence[float]) -> float:
    """The interpolation factor of two weights: w1 / (w0 + w1), 0.5 when they cancel out."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < ZERO_SUM else weights[1] / total


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Interpolate each pair of vectors along the last dimension of ``v0`` and ``v1``."""
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp_(min=NORMALIZE_EPS)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp_(min=NORMALIZE_EPS)
    cos = ((v0 / n0) * (v1 / n1)).sum(dim=-1, keepdim=True).clamp_(-1.0, 1.0)
    colinear = (1 - cos.square()) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    # On colinear vectors sin(theta) = 0; the ones keep the unused branch finite.
    safe_sin = torch.where(colinear, torch.ones_like(sin_theta), sin_theta)
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / safe_sin)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / safe_sin)
    return c0 * v0 + c1 * v1


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False,
            flatten: bool = True) -> torch.Tensor:
    """NuSLERP of two same-shaped tensors (see the module docstring for the vectors used)."""
    shape = v0.shape
    if flatten or v0.dim() == 0:
        return nuslerp_vectors(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
    if row_wise and v0.dim() > 1:
        out = nuslerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1))
        return out.transpose(0, -1).reshape(shape)
    return nuslerp_vectors(t, v0, v1)


def nuslerp_merge(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    weight: Any,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> torch.Tensor:
    """NuSLERP of exactly two models, of their task vectors when ``base`` is given."""
    del generator
    if len(experts) != 2:
        raise RecipeError(f"nuslerp: needs exactly two models other than the base, "
                          f"got {len(experts)}")
    t = nuslerp_t(per_model(weight, 2, "weight"))
    a, b = experts[0].float(), experts[1].float()
    if base is None:
        return nuslerp(t, a, b, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    base = base.float()
    mixed = nuslerp(t, a - base, b - base, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    return mixed.add_(base)


NUSLERP = MergeMethod(
    name="nuslerp",
    fn=nuslerp_merge,
    params=(
        Param("weight", float, default=REQUIRED, scope="per_model",
              help="relative weight of this model: t = w1 / (w0 + w1), 0.5 if they sum to 0"),
        Param("nuslerp_row_wise", bool, default=False,
              help="without flatten: interpolate columns (slices along dim 0) instead of rows"),
        Param("nuslerp_flatten", bool, default=True,
              help="interpolate each tensor as one vector"),
    ),
    description="Spherical interpolation of two models (or of their task vectors around an "
                "optional base) by their relative weights.",
    base_policy="optional",
    min_experts=2,
    max_experts=2,
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    converts_inputs=True,
)

METHODS = (NUSLERP,)
