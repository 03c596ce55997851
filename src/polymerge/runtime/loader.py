"""Opening what a runtime serves: a store (by how it is served) or a plain checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from polymerge.errors import PolymergeError
from polymerge.routing import DEFAULT_MAX_LENGTH
from polymerge.routing.features import check_max_length
from polymerge.runtime.base import Runtime
from polymerge.runtime.mix import MixRuntime
from polymerge.runtime.switch import CheckpointRuntime, SwitchRuntime
from polymerge.stores import is_store, open_store


def load_store(path: str | Path, *, device: str | torch.device = "cpu",
               base: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH,
               allow_pickle: bool = False, **options: Any) -> SwitchRuntime | MixRuntime:
    """Open a store folder and return its runtime, by the store's ``serving``: a
    :class:`SwitchRuntime` (switch weights by lookup: channel stores; ``base``: the base
    model's folder, which its router's features come from: a store refers only to files
    inside itself, so routing needs it; its pickled weights load only with ``allow_pickle``)
    or a :class:`MixRuntime` (mix the experts per input: twin stores), which also takes
    ``temperature``, ``top_k``, ``fold`` and ``path``."""
    check_max_length(max_length)
    store = open_store(path, device=device)
    if store.serving == "mix":
        if base is not None:
            raise PolymergeError(f"{store.path.name} is served by mixing: its router's "
                                 "features come from its own shared model, base= does not "
                                 "apply")
        return MixRuntime(store, device=device, max_length=max_length, **options)
    if store.serving == "switch":
        if options:
            raise PolymergeError(f"{store.method} stores take no option(s) "
                                 f"{', '.join(sorted(options))}")
        return SwitchRuntime(store, device=device, base=base, max_length=max_length,
                             allow_pickle=allow_pickle)
    raise PolymergeError(f"{store.path.name}: no runtime serves {store.method} stores "
                         f"(serving {store.serving!r})")


def load_runtime(path: str | Path, *, device: str | torch.device = "cpu",
                 base: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                 allow_pickle: bool = False, **options: Any) -> Runtime:
    """The runtime of a store folder (:func:`load_store`) or of a plain checkpoint folder
    (config.json + weights: one expert named after the folder, no routing; pickled weights
    only with ``allow_pickle``)."""
    folder = Path(path).expanduser()
    if is_store(folder):
        return load_store(folder, device=device, base=base, max_length=max_length,
                          allow_pickle=allow_pickle, **options)
    if (folder / "config.json").is_file():
        if base is not None or options:
            given = sorted([*options, *(["base"] if base is not None else [])])
            raise PolymergeError(f"{folder.name} is a plain checkpoint: option(s) "
                                 f"{', '.join(given)} do not apply")
        return CheckpointRuntime(folder, device=device, max_length=max_length,
                                 allow_pickle=allow_pickle)
    raise PolymergeError(f"{folder} is neither an expert store nor a model folder "
                         "(no polymerge_store.json, no config.json)")
