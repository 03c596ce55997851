"""NearSwap: take the other model's value where it is near the base's, interpolate elsewhere.

As in mergekit 0.1.5, entry by entry: with ``d = |base - other|`` (floored at 1e-6), the other
model weighs ``w = clamp(t / d, 0, 1)`` and the result is ``w * other + (1 - w) * base``. Entries
that differ by at most ``t`` are swapped outright; the further apart, the closer to the base.
``t = 0`` gives the base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polymerge.errors import RecipeError
from polymerge.methods.schema import REQUIRED, MergeMethod, Param

DISTANCE_FLOOR = 1e-6


def nearswap_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    t: float,
) -> torch.Tensor:
    """NearSwap of the base and one other model (see the module docstring)."""
    del generator
    if base is None or len(experts) != 1:
        raise RecipeError("nearswap: needs a base model and exactly one other model")
    base = base.float()
    other = experts[0].float()
    weight = (base - other).abs_().clamp_(min=DISTANCE_FLOOR).reciprocal_().mul_(float(t))
    weight.clamp_(min=0.0, max=1.0)
    return torch.lerp(base, other, weight)


NEARSWAP = MergeMethod(
    name="nearswap",
    fn=nearswap_merge,
    params=(
        Param("t", float, default=REQUIRED, low=0.0,
              help="distance under which the other model's value is taken outright"),
    ),
    description="Per entry, take the other model's value where it is within t of the base's, "
                "and move towards it by t / distance elsewhere.",
    base_policy="required",
    min_experts=1,
    max_experts=1,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    elementwise=lambda params: True,
    converts_inputs=True,
)

METHODS = (NEARSWAP,)
