"""DARE: drop task-vector entries at random and rescale survivors by 1/density.

``dare_linear`` then sums like task arithmetic; ``dare_ties`` adds TIES sign election.
"""

from __future__ import annotations

from polymerge.methods.gta import make_gta_method
from polymerge.methods.sparsify import Sparsification

DARE_LINEAR = make_gta_method(
    "dare_linear",
    sparsification=Sparsification.random,
    consensus=False,
    default_normalize=False,
    default_rescale=True,
    description="Randomly drop task-vector entries (keep prob. density, rescale 1/density), "
                "then task arithmetic.",
    reference="https://arxiv.org/abs/2311.03099",
)

DARE_TIES = make_gta_method(
    "dare_ties",
    sparsification=Sparsification.random,
    consensus=True,
    default_normalize=False,
    default_rescale=True,
    description="Randomly drop task-vector entries (rescale 1/density), then TIES sign "
                "election.",
    reference="https://arxiv.org/abs/2311.03099",
)

METHODS = (DARE_LINEAR, DARE_TIES)
