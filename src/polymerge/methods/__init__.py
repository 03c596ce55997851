"""Static merge methods; importing this package registers every built-in method."""

from __future__ import annotations

# Imported for their registration side effect; order is irrelevant (the registry sorts).
from polymerge.methods import (
    breadcrumbs,
    dare,
    della,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)
from polymerge.methods.registry import (
    MergeMethod,
    Param,
    all_methods,
    get_method,
    method_names,
    register,
)

__all__ = [
    "MergeMethod",
    "Param",
    "all_methods",
    "breadcrumbs",
    "dare",
    "della",
    "get_method",
    "linear",
    "method_names",
    "model_stock",
    "register",
    "slerp",
    "task_arithmetic",
    "ties",
]
