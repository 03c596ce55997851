"""DELLA: magnitude-ranked random drop (MagPrune), survivors rescaled by 1/keep-probability."""

from __future__ import annotations

from polymerge.methods.gta import make_gta_method
from polymerge.methods.sparsify import Sparsification

DELLA = make_gta_method(
    "della",
    sparsification=Sparsification.della_magprune,
    consensus=True,
    default_normalize=True,
    default_rescale=True,
    description="Drop task-vector entries with probability falling with magnitude rank, "
                "then TIES sign election and disjoint mean.",
    reference="https://arxiv.org/abs/2406.11617",
)

DELLA_LINEAR = make_gta_method(
    "della_linear",
    sparsification=Sparsification.della_magprune,
    consensus=False,
    default_normalize=False,
    default_rescale=True,
    description="DELLA MagPrune sparsification followed by task arithmetic (no sign election).",
    reference="https://arxiv.org/abs/2406.11617",
)

METHODS = (DELLA, DELLA_LINEAR)
