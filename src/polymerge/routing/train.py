"""Training a router on labelled texts, with features from a feature model given by the caller.

Which feature model a store's router reads, and where the router is saved, is the runtime's
business (:func:`polymerge.runtime.train_store_router`); this module only turns texts into
features, trains and scores.
"""

from __future__ import annotations

from collections.abc import Sequence

from polymerge.errors import PolymergeError
from polymerge.routing.data import LabelledTexts
from polymerge.routing.features import FeatureModel
from polymerge.routing.router import (
    TrainResult,
    accuracy,
    per_expert_accuracy,
    train_router,
)


def check_coverage(data: LabelledTexts, experts: Sequence[str]) -> None:
    """Every text names one of ``experts``, and every expert has texts."""
    unknown = sorted({e for e in data.experts if e not in experts})
    if unknown:
        raise PolymergeError(f"router data names expert(s) {unknown} that are not among the "
                             f"experts {', '.join(experts)}")
    missing = [e for e in experts if e not in set(data.experts)]
    if missing:
        raise PolymergeError(f"router data has no queries for expert(s) {missing}")


def train_text_router(features: FeatureModel, data: LabelledTexts, experts: Sequence[str], *,
                      feature_label: str | None = None, test: LabelledTexts | None = None,
                      seed: int = 0, hidden: int = 256, val_fraction: float = 0.2,
                      max_epochs: int = 300, patience: int = 25, source: str = ""
                      ) -> tuple[TrainResult, dict]:
    """Train a router for ``experts`` on the features of ``data``'s texts.

    ``test`` (optional) is scored after training (``test_accuracy``, ``test_per_expert``).
    Returns the result and the record to save with the router (:func:`save_router`): the
    feature model (``feature_label``, default its path), training settings and metrics.
    """
    experts = list(experts)
    check_coverage(data, experts)
    result = train_router(features(data.texts), data.experts, experts, hidden=hidden,
                          seed=seed, val_fraction=val_fraction, max_epochs=max_epochs,
                          patience=patience)
    if test is not None and len(test):
        tf = features(test.texts)
        result.metrics["test_examples"] = len(test)
        result.metrics["test_accuracy"] = accuracy(result.router, tf, test.experts)
        result.metrics["test_per_expert"] = per_expert_accuracy(result.router, tf, test.experts)
    info = {"feature": {"model": feature_label or str(features.path), "pooling": "mean",
                        "layer": "last", "max_length": features.max_length},
            "training": {"seed": seed, "hidden": hidden, "val_fraction": val_fraction,
                         "max_epochs": max_epochs, "patience": patience, "source": source},
            "metrics": result.metrics}
    return result, info
