"""Merge methods that are more than a per-tensor function: expert stores and learned merges.

A builder takes the whole recipe and writes its artifact (a store folder, or a checkpoint plus
learned coefficients). It reuses the plan, the engine and the writers; registering it here is
all ``polymerge merge`` needs to dispatch to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polymerge.recipe import Recipe

BuildFn = Callable[..., Path]
"""``fn(recipe, out, *, force, device, dtype, shard_size, allow_pickle, progress) -> Path``"""


@dataclass(frozen=True)
class Builder:
    name: str
    fn: BuildFn
    description: str
    kind: str  # "store" or "checkpoint"


_BUILDERS: dict[str, Builder] = {}
_PLUGINS = ("polymerge.stores", "polymerge.tuning")


def register_builder(builder: Builder) -> Builder:
    if builder.name in _BUILDERS:
        raise ValueError(f"builder {builder.name!r} is already registered")
    _BUILDERS[builder.name] = builder
    return builder


def _load_plugins() -> None:
    import importlib

    for module in _PLUGINS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def get_builder(name: str) -> Builder | None:
    _load_plugins()
    return _BUILDERS.get(name)


def all_builders() -> list[Builder]:
    _load_plugins()
    return [_BUILDERS[n] for n in sorted(_BUILDERS)]


def build(recipe: Recipe, out: Path, **options: Any) -> Path:
    builder = get_builder(recipe.merge_method)
    assert builder is not None
    return builder.fn(recipe, out, **options)
