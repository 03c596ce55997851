"""Model Breadcrumbs: drop both the smallest entries and the largest outliers of task vectors."""

from __future__ import annotations

from polymerge.methods.gta import make_gta_method
from polymerge.methods.sparsify import Sparsification

BREADCRUMBS = make_gta_method(
    "breadcrumbs",
    sparsification=Sparsification.magnitude_outliers,
    consensus=False,
    default_normalize=False,
    default_rescale=False,
    description="Keep a middle magnitude band of each task vector (drop gamma outliers and "
                "the smallest), then task arithmetic.",
    reference="https://arxiv.org/abs/2312.06795",
)

BREADCRUMBS_TIES = make_gta_method(
    "breadcrumbs_ties",
    sparsification=Sparsification.magnitude_outliers,
    consensus=True,
    default_normalize=False,
    default_rescale=False,
    description="Breadcrumbs band sparsification followed by TIES sign election.",
    reference="https://arxiv.org/abs/2312.06795",
)

METHODS = (BREADCRUMBS, BREADCRUMBS_TIES)
