"""Linear merge (model soup): a weighted average of all listed models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from polymerge.errors import RecipeError
from polymerge.methods.gta import per_model
from polymerge.methods.schema import REQUIRED, MergeMethod, Param


def linear_merge(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    weight: Any,
    normalize: bool = True,
) -> torch.Tensor:
    """``sum(w_i x_i) / sum(w_i)`` (or the plain weighted sum); ``base`` is unused.

    Weights may be negative (extrapolation), but normalizing by a zero sum is an error rather
    than an infinite tensor.
    """
    del base, generator
    if not experts:
        raise RecipeError("linear: needs at least one model")
    n = len(experts)
    weights = per_model(weight, n, "weight")
    if normalize and sum(weights) == 0:
        raise RecipeError("linear: the weights sum to 0, cannot normalize "
                          "(set normalize: false or change the weights)")
    # Accumulate in place rather than stacking: one output-sized buffer instead of N copies.
    result = experts[0].float() * weights[0]
    for x, w in zip(experts[1:], weights[1:], strict=True):
        result.add_(x.float(), alpha=w)
    if normalize:
        result = result.div_(sum(weights))
    return result


def check_linear_params(params: dict[str, Any]) -> None:
    """Normalizing by weights that cancel out has no answer; say so before merging."""
    if params.get("normalize", True) and sum(params["weight"]) == 0:
        raise RecipeError("linear: the weights sum to 0, cannot normalize "
                          "(set normalize: false or change the weights)")


LINEAR = MergeMethod(
    name="linear",
    fn=linear_merge,
    params=(
        Param("weight", float, default=REQUIRED, scope="per_model",
              help="coefficient of this model"),
        Param("normalize", bool, default=True, help="divide by the sum of the weights"),
    ),
    description="Weighted average of the listed models (model soup); normalize divides by "
                "the weight sum.",
    base_policy="input",
    min_experts=1,
    check_params=check_linear_params,
    reference="https://arxiv.org/abs/2203.05482",
    elementwise=lambda params: True,
    propagates_nonfinite=True,
)

METHODS = (LINEAR,)
