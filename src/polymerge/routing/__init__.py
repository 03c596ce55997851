"""Task routers: features from a feature model given by the caller, a small MLP, training with
early stopping, and the labelled-text JSONL format.

Nothing here imports transformers until a feature model is actually loaded, and nothing here
imports stores or runtimes: which model gives a store's router its features is the runtime's
choice (:func:`polymerge.runtime.train_store_router`).
"""

from polymerge.routing.data import LabelledTexts, read_labelled_jsonl, suite_texts
from polymerge.routing.features import DEFAULT_MAX_LENGTH, FeatureModel, load_tokenizer, mean_pool
from polymerge.routing.router import (
    Router,
    TrainResult,
    accuracy,
    load_router,
    per_expert_accuracy,
    save_router,
    stratified_split,
    train_router,
)
from polymerge.routing.train import check_coverage, train_text_router

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "FeatureModel",
    "LabelledTexts",
    "Router",
    "TrainResult",
    "accuracy",
    "check_coverage",
    "load_router",
    "load_tokenizer",
    "mean_pool",
    "per_expert_accuracy",
    "read_labelled_jsonl",
    "save_router",
    "stratified_split",
    "suite_texts",
    "train_router",
    "train_text_router",
]
