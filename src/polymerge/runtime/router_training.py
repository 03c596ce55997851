"""Training a store's router: the store picks the feature model, the router goes in the store.

A store served by switching routes on features of its base model (the experts' common
ancestor, so features do not depend on the active expert); a store served by mixing routes on
its own shared model, which its runtime runs anyway as pass 1 (recorded as
``feature.model = "store:shared"``). The router is saved in ``STORE/router``.

A store refers only to files inside itself: the base model is not inside a switching store, so
its folder is always the caller's (``base``, ``--base``). The path the store recorded when it
was built, and the one a router recorded, are only named in the error that asks for it; they
are never opened on the store's word.
"""

from __future__ import annotations

from pathlib import Path

import torch

from polymerge.errors import PolymergeError
from polymerge.routing import (
    DEFAULT_MAX_LENGTH,
    FeatureModel,
    LabelledTexts,
    TrainResult,
    check_coverage,
    save_router,
    train_text_router,
)
from polymerge.routing.features import check_max_length
from polymerge.routing.router import check_train_settings
from polymerge.runtime.mix import SHARED_FEATURES, shared_feature_model
from polymerge.stores import ROUTER_DIR, Store, open_store


def recorded_base(store: Store) -> str | None:
    """The base folder the store recorded when it was built (a hint for messages only)."""
    base = store.manifest.get("base")
    path = base.get("path") if isinstance(base, dict) else None
    return path if isinstance(path, str) and path else None


def base_feature_model(store: Store, *, base: str | Path | None = None,
                       device: str | torch.device = "cpu", max_length: int = DEFAULT_MAX_LENGTH,
                       allow_pickle: bool = False) -> FeatureModel:
    """The base model's backbone, from ``base``: the folder the caller names (the store's own
    record of its base is not followed; see the module docstring)."""
    if base is None or not str(base):
        hint = recorded_base(store)
        raise PolymergeError(
            f"{store.path.name}: the router's features come from the base model, which is not "
            "inside the store; pass its folder with --base PATH (base=PATH)"
            + (f" (the store was built from {hint})" if hint else ""))
    path = Path(base).expanduser()
    if not (path / "config.json").is_file():
        raise PolymergeError(f"the router's feature model (the base model) was not found at "
                             f"{path} (no config.json); pass the base model's folder as --base")
    return FeatureModel(path, tokenizer_path=store.path, device=device, max_length=max_length,
                        allow_pickle=allow_pickle)


def store_feature_model(store: Store, *, base: str | Path | None = None, device: str = "cpu",
                        max_length: int = DEFAULT_MAX_LENGTH, allow_pickle: bool = False
                        ) -> tuple[FeatureModel, str]:
    """The feature model a store's router reads, and the label recorded with the router."""
    if store.serving == "mix":
        if base is not None:
            raise PolymergeError(f"{store.path.name} is served by mixing: its router's "
                                 "features come from the store's own shared model; --base "
                                 "does not apply")
        return (shared_feature_model(store, device=device, max_length=max_length),
                SHARED_FEATURES)
    fm = base_feature_model(store, base=base, device=device, max_length=max_length,
                            allow_pickle=allow_pickle)
    return fm, str(fm.path)


def train_store_router(store: str | Path | Store, data: LabelledTexts, *,
                       test: LabelledTexts | None = None, base: str | Path | None = None,
                       device: str = "cpu", max_length: int = DEFAULT_MAX_LENGTH,
                       seed: int = 0, hidden: int = 256, val_fraction: float = 0.2,
                       max_epochs: int = 300, patience: int = 25,
                       features: FeatureModel | None = None, source: str = "",
                       allow_pickle: bool = False) -> TrainResult:
    """Train a router for ``store`` on ``data`` and save it inside the store (``router/``).

    ``base``: the base model's folder (needed by a store served by switching; its pickled
    weights load only with ``allow_pickle``). ``features``: a feature model to use instead of
    the store's own (recorded by its path).
    ``test`` (optional) is scored after training and reported as ``test_accuracy``.
    """
    check_train_settings(hidden=hidden, val_fraction=val_fraction, max_epochs=max_epochs,
                         patience=patience)
    check_max_length(max_length)
    loaded = store if isinstance(store, Store) else open_store(store, device=device)
    check_coverage(data, loaded.experts)
    if features is not None:
        fm, label = features, str(features.path)
    else:
        fm, label = store_feature_model(loaded, base=base, device=device,
                                        max_length=max_length, allow_pickle=allow_pickle)
    result, info = train_text_router(fm, data, loaded.experts, feature_label=label, test=test,
                                     seed=seed, hidden=hidden, val_fraction=val_fraction,
                                     max_epochs=max_epochs, patience=patience, source=source)
    save_router(loaded.path / ROUTER_DIR, result.router, info)
    return result
