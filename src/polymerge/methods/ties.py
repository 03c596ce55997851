"""TIES: trim each task vector to its largest entries, elect a sign, average the agreeing ones.

The paper's "disjoint mean" is ``normalize=True``: each entry is divided by the summed weights of
the experts whose sign agrees with the elected one.
"""

from __future__ import annotations

from polymerge.methods.gta import make_gta_method
from polymerge.methods.sparsify import Sparsification

TIES = make_gta_method(
    "ties",
    sparsification=Sparsification.magnitude,
    consensus=True,
    default_normalize=True,
    default_rescale=False,
    description="Trim task vectors to the top-density magnitudes, elect signs, "
                "disjoint-mean the agreeing entries.",
    reference="https://arxiv.org/abs/2306.01708",
)

METHODS = (TIES,)
