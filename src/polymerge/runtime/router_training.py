"""Training a store's router: the store picks the feature model, the router goes in the store.

A store served by switching routes on features of its base model (the experts' common
ancestor, so features do not depend on the active expert); a store served by mixing routes on
its own shared model, which its runtime runs anyway as pass 1 (recorded as
``feature.model = "store:shared"``). The router is saved in ``STORE/router``.
"""

from __future__ import annotations

from pathlib import Path

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
from polymerge.runtime.mix import SHARED_FEATURES, shared_feature_model
from polymerge.stores import ROUTER_DIR, Store, open_store


def base_feature_model(store: Store, *, base: str | Path | None = None, device: str = "cpu",
                       max_length: int = DEFAULT_MAX_LENGTH) -> FeatureModel:
    """The base model's backbone (``base``, else the base recorded in the store)."""
    path = Path(base).expanduser() if base else (store.base_path or Path(""))
    if not str(path) or not (path / "config.json").is_file():
        raise PolymergeError(f"the router's feature model (the base model) was not found at "
                             f"{path or '(none recorded)'}; pass --base PATH")
    return FeatureModel(path, tokenizer_path=store.path, device=device, max_length=max_length)


def store_feature_model(store: Store, *, base: str | Path | None = None, device: str = "cpu",
                        max_length: int = DEFAULT_MAX_LENGTH) -> tuple[FeatureModel, str]:
    """The feature model a store's router reads, and the label recorded with the router."""
    if store.serving == "mix":
        if base is not None:
            raise PolymergeError(f"{store.path.name} is served by mixing: its router's "
                                 "features come from the store's own shared model; --base "
                                 "does not apply")
        return (shared_feature_model(store, device=device, max_length=max_length),
                SHARED_FEATURES)
    fm = base_feature_model(store, base=base, device=device, max_length=max_length)
    return fm, str(fm.path)


def train_store_router(store: str | Path | Store, data: LabelledTexts, *,
                       test: LabelledTexts | None = None, base: str | Path | None = None,
                       device: str = "cpu", max_length: int = DEFAULT_MAX_LENGTH,
                       seed: int = 0, hidden: int = 256, val_fraction: float = 0.2,
                       max_epochs: int = 300, patience: int = 25,
                       features: FeatureModel | None = None, source: str = "") -> TrainResult:
    """Train a router for ``store`` on ``data`` and save it inside the store (``router/``).

    ``features``: a feature model to use instead of the store's own (recorded by its path).
    ``test`` (optional) is scored after training and reported as ``test_accuracy``.
    """
    loaded = store if isinstance(store, Store) else open_store(store, device=device)
    check_coverage(data, loaded.experts)
    if features is not None:
        fm, label = features, str(features.path)
    else:
        fm, label = store_feature_model(loaded, base=base, device=device,
                                        max_length=max_length)
    result, info = train_text_router(fm, data, loaded.experts, feature_label=label, test=test,
                                     seed=seed, hidden=hidden, val_fraction=val_fraction,
                                     max_epochs=max_epochs, patience=patience, source=source)
    save_router(loaded.path / ROUTER_DIR, result.router, info)
    return result
