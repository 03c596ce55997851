"""Task routers: features from the base model, a small MLP, training with early stopping.

Nothing here imports transformers until a feature model is actually loaded.
"""

from polymerge.routing.features import FeatureModel, load_tokenizer, mean_pool
from polymerge.routing.router import (
    Router,
    TrainResult,
    accuracy,
    load_router,
    per_expert_accuracy,
    router_info,
    save_router,
    stratified_split,
    train_router,
)
from polymerge.routing.train import (
    LabelledTexts,
    read_jsonl,
    suite_texts,
    train_store_router,
)

__all__ = [
    "FeatureModel",
    "LabelledTexts",
    "Router",
    "TrainResult",
    "accuracy",
    "load_router",
    "load_tokenizer",
    "mean_pool",
    "per_expert_accuracy",
    "read_jsonl",
    "router_info",
    "save_router",
    "stratified_split",
    "suite_texts",
    "train_router",
    "train_store_router",
]
