"""polymerge: merge fine-tuned experts of one base model into one artifact."""

from polymerge.errors import CheckpointError, PolymergeError, RecipeError
from polymerge.merge import dry_run, merge, merge_tensors
from polymerge.recipe import Recipe, load_recipe

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "PolymergeError",
    "Recipe",
    "RecipeError",
    "dry_run",
    "load_recipe",
    "merge",
    "merge_tensors",
]
