"""polymerge: merge fine-tuned experts of one base model into one artifact.

The package root re-exports the Python API (:mod:`polymerge.api`). Importing it also imports
the built-in stores and learned merges, which register themselves in the one registry
(:mod:`polymerge.registry`); plugins come through the ``polymerge.methods`` entry points.
"""

import gc as _gc

# Importing torch and the rest makes about a million objects, none of them garbage; the
# collector would walk them all again and again while they come (0.1 s of every command:
# BENCHMARKS.md, "Start-up and exit"). It runs as before once the imports are done.
_collecting = _gc.isenabled()
_gc.disable()
try:
    from polymerge.api import (
        dry_run,
        export_expert,
        load_store,
        merge,
        merge_tensors,
        open_store,
    )
    from polymerge.errors import CheckpointError, PolymergeError, RecipeError
    from polymerge.recipe import Recipe, load_recipe
    from polymerge.version import __version__
finally:
    if _collecting:
        _gc.enable()

__all__ = [
    "CheckpointError",
    "PolymergeError",
    "Recipe",
    "RecipeError",
    "__version__",
    "dry_run",
    "export_expert",
    "load_recipe",
    "load_store",
    "merge",
    "merge_tensors",
    "open_store",
]
