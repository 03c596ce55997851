"""Task arithmetic: add the (weighted) sum of the experts' task vectors to the base."""

from __future__ import annotations

from polymerge.methods.gta import make_gta_method

TASK_ARITHMETIC = make_gta_method(
    "task_arithmetic",
    sparsification=None,
    consensus=False,
    default_normalize=False,
    default_rescale=False,
    description="Base plus the weighted sum of task vectors (expert - base), scaled by lambda.",
    reference="https://arxiv.org/abs/2212.04089",
)

METHODS = (TASK_ARITHMETIC,)
