"""polymerge: merge fine-tuned experts of one base model into one artifact."""

from polymerge.errors import CheckpointError, PolymergeError, RecipeError
from polymerge.merge import dry_run, merge, merge_tensors
from polymerge.recipe import Recipe, load_recipe

__version__ = "0.1.0"


def load_store(path, **kwargs):  # type: ignore[no-untyped-def]
    """Open an expert store and return its routed runtime (see :mod:`polymerge.runtime`)."""
    from polymerge.runtime import load_store as _load_store

    return _load_store(path, **kwargs)


__all__ = [
    "CheckpointError",
    "PolymergeError",
    "Recipe",
    "RecipeError",
    "dry_run",
    "load_recipe",
    "load_store",
    "merge",
    "merge_tensors",
]
