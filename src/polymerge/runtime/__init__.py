"""Runtimes: one interface (:class:`Runtime`) serving expert stores and plain checkpoints.

``load_runtime(path)`` / ``load_store(path)`` open a folder; every runtime answers
``forward``, ``generate`` and ``route`` with per-call ``routing`` and returns a
:class:`RunOutput`, safe to call from several threads. Stores served by switching run on
:class:`SwitchRuntime`, stores served by mixing on :class:`MixRuntime`, plain checkpoints on
:class:`CheckpointRuntime`.
"""

from polymerge.runtime.base import ROUTE, Routing, RunOutput, Runtime, routing_weights
from polymerge.runtime.loader import load_runtime, load_store
from polymerge.runtime.mix import (
    SHARED_FEATURES,
    MixRuntime,
    build_shared_model,
    shared_feature_model,
)
from polymerge.runtime.mixture import Mixture, mixing
from polymerge.runtime.requests import RuntimeModule
from polymerge.runtime.router_training import store_feature_model, train_store_router
from polymerge.runtime.switch import CheckpointRuntime, SwitchRuntime

__all__ = [
    "ROUTE",
    "SHARED_FEATURES",
    "CheckpointRuntime",
    "MixRuntime",
    "Mixture",
    "Routing",
    "RunOutput",
    "Runtime",
    "RuntimeModule",
    "SwitchRuntime",
    "build_shared_model",
    "load_runtime",
    "load_store",
    "mixing",
    "routing_weights",
    "shared_feature_model",
    "store_feature_model",
    "train_store_router",
]
