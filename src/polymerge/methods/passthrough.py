"""Passthrough: copy the one listed model, each tensor optionally multiplied by ``scale``.

As in mergekit 0.1.5, ``scale`` is a per-model parameter with no default: a tensor for which it
has no value (none given, or a filter list with no entry matching the tensor and no fallback) is
copied unchanged. A filter list such as ``[{filter: o_proj, value: 0}, {filter: down_proj,
value: 0}]`` zeroes those projections and copies everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from polymerge.errors import RecipeError
from polymerge.methods.schema import MergeMethod, Param


def passthrough_merge(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    scale: Any = None,
) -> torch.Tensor:
    """The single model's tensor, times its ``scale`` when it has one for this tensor."""
    del base, generator
    if len(experts) != 1:
        raise RecipeError(f"passthrough: takes exactly one model, got {len(experts)}")
    if isinstance(scale, (list, tuple)):
        scale = scale[0]
    tensor = experts[0].float()
    return tensor.clone() if scale is None else tensor * float(scale)


PASSTHROUGH = MergeMethod(
    name="passthrough",
    fn=passthrough_merge,
    params=(
        Param("scale", float, default=None, scope="per_model",
              help="multiply the tensor by this (none: copy it unchanged)"),
    ),
    description="Copy the one listed model, tensors optionally scaled (a filter list of scale "
                "values selects which).",
    base_policy="input",
    min_experts=1,
    max_experts=1,
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    elementwise=lambda params: True,
    converts_inputs=True,
)

METHODS = (PASSTHROUGH,)
