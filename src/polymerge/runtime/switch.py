"""Serving by switching: one working model whose weights are one expert's at a time.

:class:`SwitchRuntime` serves every store whose ``serving`` is ``"switch"`` (channel stores):
switching to an expert writes its tensors into the working model in place by lookup
(``Store.apply``: a gather per channel-merged tensor), and only when the expert changes. Each
row runs with one expert, its top-1 (soft weights become their largest); rows are grouped by
expert, the group of the expert already loaded first. The working model's weights are shared
state, so a lock is held around each group's switch and forward pass: concurrent calls are
safe, and take turns. Routing uses the store's router on features of the base model.

:class:`CheckpointRuntime` serves a plain checkpoint folder the same way: one expert (named
after the folder), no routing, no lock (nothing is written into its model).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polymerge.errors import PolymergeError
from polymerge.routing import DEFAULT_MAX_LENGTH, FeatureModel, Router
from polymerge.runtime.base import check_soft_routing
from polymerge.runtime.requests import (
    RequestRuntime,
    empty_model,
    model_class,
    pad_sequences,
    reassemble,
    select_rows,
)
from polymerge.stores import ROUTER_DIR, Store


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class SwitchRuntime(RequestRuntime):
    """A store served by switching (see the module docstring)."""

    serving = "switch"

    def __init__(self, store: Store, *, device: str | torch.device = "cpu",
                 base: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        super().__init__(store.path, device=device, max_length=max_length,
                         label=store.path.name, router_dir=store.path / ROUTER_DIR)
        self.store = store
        if store.device != self.device:
            store.to(self.device)
        self.base = Path(base).expanduser() if base else None
        self.switches = 0
        self.switch_seconds = 0.0
        self._active: str | None = None
        self._lock = threading.Lock()  # the working model's weights: switch + forward
        self._model: torch.nn.Module | None = None
        self._features: FeatureModel | None = None

    def __repr__(self) -> str:
        return f"<SwitchRuntime {self.store.path} experts={self.experts} active={self.active}>"

    @property
    def experts(self) -> list[str]:
        return self.store.experts

    @property
    def active(self) -> str | None:
        """The expert whose weights the working model holds (None before the first switch)."""
        return self._active

    # -- the working model
    @property
    def model(self) -> torch.nn.Module:
        """The working model, built from the store's config on first use (weights unset until
        the first switch). Its weights change with every switch: run it through the runtime."""
        with self._init:
            if self._model is None:
                self._model = empty_model(self.store.path, self.store.dtype, self.device)
            return self._model

    def switch(self, expert: str) -> bool:
        """Make ``expert`` the active expert; returns False when it already was."""
        model = self.model
        with self._lock:
            return self._switch(model, expert)

    def _switch(self, model: torch.nn.Module, expert: str) -> bool:
        """Switch with the lock held."""
        name = self.store.experts[self.store.expert_index(expert)]
        if name == self._active:
            return False
        start = time.perf_counter()
        self.store.apply(model, name, previous=self._active)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.switch_seconds += time.perf_counter() - start
        self._active = name
        self.switches += 1
        return True

    # -- routing
    def _require_router(self) -> Router:
        router = self.router
        if router is None:
            raise PolymergeError(f"{self.label} has no router; train one with "
                                 "`polymerge router train` or name the expert")
        return router

    @property
    def features(self) -> FeatureModel:
        """The router's feature model: the base model, loaded on first use."""
        with self._init:
            if self._features is None:
                router = self.router
                recorded = (getattr(router, "info", {}) or {}).get("feature", {}) \
                    if router else {}
                path = self.base or Path(recorded.get("model") or self.store.base_path or "")
                if not str(path) or not (path / "config.json").is_file():
                    raise PolymergeError(f"the router's feature model (the base model) was not "
                                         f"found at {path or '(none recorded)'}; pass base=PATH")
                self._features = FeatureModel(
                    path, tokenizer_path=self.store.path, device=self.device,
                    max_length=int(recorded.get("max_length", self.max_length)))
            return self._features

    def _soft(self, feats: torch.Tensor, top_k: int | None, temperature: float | None
              ) -> torch.Tensor:
        check_soft_routing(1.0 if temperature is None else temperature, top_k,
                           len(self.experts))
        return self._require_router().weights(
            feats, temperature=1.0 if temperature is None else temperature,
            top_k=top_k).float().cpu()

    def route(self, texts: Sequence[str], *, top_k: int | None = None,
              temperature: float | None = None) -> torch.Tensor:
        """(len(texts), N) router weights; rows run with their largest (top-1)."""
        if len(self.experts) == 1:
            return torch.ones(len(texts), 1)
        self._require_router()
        return self._soft(self.features(list(texts)), top_k, temperature)

    def route_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                  top_k: int | None = None, temperature: float | None = None) -> torch.Tensor:
        if len(self.experts) == 1:
            return torch.ones(input_ids.shape[0], 1)
        self._require_router()
        return self._soft(self.features.from_ids(input_ids, attention_mask), top_k,
                          temperature)

    # -- running
    def _served(self, weights: torch.Tensor) -> torch.Tensor:
        """Top-1: each row runs with its largest weight's expert."""
        if weights.shape[0] and not bool((weights.max(-1).values > 0).all()):
            raise PolymergeError("a switching store runs each row with one expert; a row's "
                                 "weights have no positive entry")
        top = weights.argmax(-1)
        return torch.nn.functional.one_hot(top, weights.shape[1]).float()

    def groups(self, weights: torch.Tensor) -> list[tuple[str, list[int]]]:
        """Row indices grouped by expert (top-1), the active expert's group first."""
        order: dict[str, list[int]] = {}
        for i, e in enumerate(weights.argmax(-1).tolist()):
            order.setdefault(self.experts[e], []).append(i)
        active = self._active
        return sorted(order.items(), key=lambda kv: kv[0] != active)

    def _batches(self, weights: torch.Tensor, batch_size: int) -> list[list[int]]:
        return [idx[s:s + batch_size] for _, idx in self.groups(weights)
                for s in range(0, len(idx), batch_size)]

    def _run(self, inputs: dict[str, Any], weights: torch.Tensor, **options: Any) -> Any:
        model = self.model
        batch = inputs["input_ids"].shape[0]
        results = []
        for name, idx in self.groups(weights):
            sub = select_rows(inputs, idx, batch)
            with self._lock:
                self._switch(model, name)
                results.append((idx, model(**sub, **options)))
        return reassemble(results, batch)

    def _generate(self, inputs: dict[str, Any], weights: torch.Tensor, **options: Any
                  ) -> torch.Tensor:
        model = self.model
        batch = inputs["input_ids"].shape[0]
        parts = []
        for name, idx in self.groups(weights):
            sub = select_rows(inputs, idx, batch)
            with self._lock:
                self._switch(model, name)
                parts.append((idx, model.generate(**sub, **options)))  # type: ignore[operator]
        if len(parts) == 1:
            return parts[0][1]
        pad = options.get("pad_token_id")
        return pad_sequences(parts, batch, self.tokenizers.pad_token_id if pad is None else pad)

    # -- accounting
    def memory(self) -> dict[str, int]:
        """Bytes held: the store's pieces, the working model, the router's feature model."""
        model = _bytes(self.model.parameters()) + _bytes(self.model.buffers())
        feats = _bytes(self._features.model.parameters()) if self._features is not None else 0
        store = self.store.nbytes()
        return {"store": store, "working_model": model, "feature_model": feats,
                "total": store + model + feats}


class CheckpointRuntime(RequestRuntime):
    """A plain checkpoint folder (config.json + weights) served as one expert, no routing."""

    serving = "plain"

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu",
                 max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.path = Path(path).expanduser().absolute()
        if not (self.path / "config.json").is_file():
            raise PolymergeError(f"{self.path} is not a model folder (no config.json)")
        super().__init__(self.path, device=device, max_length=max_length, label=self.path.name)
        self._model: torch.nn.Module | None = None

    def __repr__(self) -> str:
        return f"<CheckpointRuntime {self.path}>"

    @property
    def experts(self) -> list[str]:
        return [self.path.name]

    @property
    def model(self) -> torch.nn.Module:
        """The checkpoint's model, loaded on first use."""
        with self._init:
            if self._model is None:
                from transformers import AutoConfig

                cls = model_class(AutoConfig.from_pretrained(str(self.path)))
                self._model = cls.from_pretrained(str(self.path)).to(self.device).eval()
            return self._model

    def route(self, texts: Sequence[str], *, top_k: int | None = None,
              temperature: float | None = None) -> torch.Tensor:
        return torch.ones(len(texts), 1)

    def route_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                  top_k: int | None = None, temperature: float | None = None) -> torch.Tensor:
        return torch.ones(input_ids.shape[0], 1)

    def _run(self, inputs: dict[str, Any], weights: torch.Tensor, **options: Any) -> Any:
        return self.model(**inputs, **options)

    def _generate(self, inputs: dict[str, Any], weights: torch.Tensor, **options: Any
                  ) -> torch.Tensor:
        return self.model.generate(**inputs, **options)  # type: ignore[operator]

    def memory(self) -> dict[str, int]:
        model = _bytes(self.model.parameters()) + _bytes(self.model.buffers())
        return {"store": 0, "working_model": model, "feature_model": 0, "total": model}
