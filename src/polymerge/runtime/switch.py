"""Serving by switching: one working model whose weights are one expert's at a time.

:class:`SwitchRuntime` serves every store whose ``serving`` is ``"switch"`` (channel stores):
switching to an expert writes its tensors into the working model in place by lookup
(``Store.apply``: a gather per channel-merged tensor), and only when the expert changes. Each
row runs with one expert, its top-1 (soft weights become their largest); rows are grouped by
expert, the group of the expert already loaded first. The working model's weights are shared
state, so a lock is held around each group's switch and forward pass: concurrent calls are
safe, and take turns. Routing uses the store's router on features of the base model.

A batch whose rows want different experts may take the *gather path* instead
(:mod:`.channel_batch`): one forward pass in which each channel-merged layer runs each row with
its expert's channels (each expert's weight materialized from the groups, or the K groups'
outputs gathered per row), nothing written, no lock. ``path`` (the runtime's default, or per
call: ``forward(..., path=...)``, ``as_module(path=...)``) says which: ``"auto"`` (the
default, what the server uses: the cheaper by the cost rule of :mod:`.channel_cost`),
``"switch"`` (group and switch, as above) or ``"gather"``. Both give the same numbers to float
rounding. Options that hold per-row state for ``generate`` (a logits processor or stopping
criterion with a ``select_rows(rows)`` method) are narrowed to each group's rows on the switch
path.

:class:`CheckpointRuntime` serves a plain checkpoint folder the same way: one expert (named
after the folder), no routing, no lock (nothing is written into its model).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from polymerge.errors import PolymergeError
from polymerge.routing import DEFAULT_MAX_LENGTH, FeatureModel, Router
from polymerge.runtime.base import check_soft_routing
from polymerge.runtime.channel_batch import gathering, install, model_costs
from polymerge.runtime.channel_cost import PATHS, ModelCosts, choose
from polymerge.runtime.requests import (
    RequestRuntime,
    empty_model,
    load_model,
    pad_sequences,
    reassemble,
    select_rows,
)
from polymerge.runtime.router_training import base_feature_model
from polymerge.stores import ROUTER_DIR, Store


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


SWITCH_PATHS = (*PATHS, "auto")


def check_path(path: str | None) -> str | None:
    if path is not None and path not in SWITCH_PATHS:
        raise PolymergeError(f"switching runtime: unknown path {path!r} "
                             f"({', '.join(SWITCH_PATHS)})")
    return path


def rows_of(value: Any, rows: list[int]) -> Any:
    """An option narrowed to some rows of the batch: objects with ``select_rows(rows)`` (and
    lists of them, e.g. a ``LogitsProcessorList``) are narrowed, anything else is as is."""
    if hasattr(value, "select_rows"):
        return value.select_rows(rows)
    if isinstance(value, list) and any(hasattr(v, "select_rows") for v in value):
        return type(value)(rows_of(v, rows) for v in value)
    return value


class SwitchRuntime(RequestRuntime):
    """A store served by switching (see the module docstring)."""

    serving = "switch"
    RUN_OPTIONS: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(self, store: Store, *, device: str | torch.device = "cpu",
                 base: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                 path: str = "auto", allow_pickle: bool = False) -> None:
        super().__init__(store.path, device=device, max_length=max_length,
                         label=store.path.name, router_dir=store.path / ROUTER_DIR)
        self.store = store
        self.allow_pickle = allow_pickle  # for the base model (router features)
        if store.device != self.device:
            store.to(self.device)
        self.base = Path(base).expanduser() if base else None
        self.switches = 0
        self.switch_seconds = 0.0
        self._active: str | None = None
        self._lock = threading.Lock()  # the working model's weights: switch + forward
        self._model: torch.nn.Module | None = None
        self._features: FeatureModel | None = None
        self.path = check_path(path) or "auto"
        self.passes = {"switch": 0, "gather": 0}
        """Batches run by each path (counted per ``_run``/``_generate`` call)."""
        self._count = threading.Lock()
        self._costs: ModelCosts | None = None
        self._gather_error: str | None = None

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
                with torch.inference_mode(False):  # plain tensors: switches write into them
                    self._model = empty_model(self.store.path, self.store.dtype, self.device,
                                              backbone=self.store.has_heads)
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
        """The router's feature model: the base model (``base``: the store does not hold it,
        and the path it recorded is not followed), loaded on first use."""
        with self._init:
            if self._features is None:
                router = self.router
                recorded = (getattr(router, "info", {}) or {}).get("feature", {}) \
                    if router else {}
                self._features = base_feature_model(
                    self.store, base=self.base, device=self.device,
                    max_length=recorded.get("max_length") or self.max_length,
                    allow_pickle=self.allow_pickle)
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
        """One batch of every row in input order when they fit (the path is chosen per batch,
        switching groups within it); else batches of one expert's rows, the active expert's
        first."""
        n = weights.shape[0]
        if n <= batch_size:
            return [list(range(n))] if n else []
        return [idx[s:s + batch_size] for _, idx in self.groups(weights)
                for s in range(0, len(idx), batch_size)]

    # -- the gather path
    @property
    def gather_costs(self) -> ModelCosts | None:
        """What the cost rule knows of the gather path (None when it is unavailable: see
        :attr:`gather_unavailable`); installing it wraps the working model's layers once."""
        with self._init:
            if self._costs is None and self._gather_error is None:
                model = self.model
                with self._lock:
                    if self._active is None:  # common tensors are written by a first switch
                        self._switch(model, self.experts[0])
                    try:
                        wrappers = install(model, self.store)
                    except PolymergeError as exc:
                        self._gather_error = str(exc)
                    else:
                        self._costs = model_costs(model, self.store, wrappers)
            return self._costs

    @property
    def gather_unavailable(self) -> str | None:
        """Why the gather path cannot serve this store (None: it can)."""
        return None if self.gather_costs is not None else self._gather_error

    def choose_path(self, weights: torch.Tensor, tokens_per_row: float, steps: int = 1,
                    path: str | None = None) -> str:
        """The path a batch with these (served) weights takes: ``path`` (or the runtime's)
        unless it is ``"auto"``, then the cheaper by :func:`~.channel_cost.choose`."""
        path = check_path(path) or self.path
        if path == "switch":
            return "switch"
        costs = self.gather_costs
        if path == "gather":
            if costs is None:
                raise PolymergeError(f"{self.label}: the gather path is unavailable "
                                     f"({self._gather_error})")
            return "gather"
        groups = [(self.store.expert_index(name), len(idx))
                  for name, idx in self.groups(weights)]
        active = self.store.expert_index(self._active) if self._active is not None else None
        if len(groups) == 1 and groups[0][0] == active:
            return "switch"  # every row wants the loaded expert: nothing to write
        return choose(costs, groups, active, tokens_per_row, steps)

    def _count_pass(self, path: str) -> None:
        with self._count:
            self.passes[path] += 1

    def _run(self, inputs: dict[str, Any], weights: torch.Tensor, *, path: str | None = None,
             **options: Any) -> Any:
        model = self.model
        batch = inputs["input_ids"].shape[0]
        tokens = inputs["input_ids"].shape[1] if inputs["input_ids"].dim() > 1 else 1
        if self.choose_path(weights, tokens, 1, path) == "gather":
            self._count_pass("gather")
            with gathering(weights.argmax(-1)):
                return model(**inputs, **options)
        self._count_pass("switch")
        results = []
        for name, idx in self.groups(weights):
            sub = select_rows(inputs, idx, batch)
            with self._lock:
                self._switch(model, name)
                results.append((idx, model(**sub, **options)))
        return reassemble(results, batch)

    def _generate(self, inputs: dict[str, Any], weights: torch.Tensor, *,
                  path: str | None = None, **options: Any) -> torch.Tensor:
        model = self.model
        batch = inputs["input_ids"].shape[0]
        new = int(options.get("max_new_tokens") or 32)
        if self.choose_path(weights, inputs["input_ids"].shape[1] + new, 1 + new,
                            path) == "gather":
            self._count_pass("gather")
            with gathering(weights.argmax(-1)):
                return model.generate(**inputs, **options)  # type: ignore[operator]
        self._count_pass("switch")
        parts = []
        for name, idx in self.groups(weights):
            sub = select_rows(inputs, idx, batch)
            narrowed = {k: rows_of(v, idx) for k, v in options.items()}
            with self._lock:
                self._switch(model, name)
                parts.append((idx, model.generate(**sub, **narrowed)))  # type: ignore[operator]
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
                 max_length: int = DEFAULT_MAX_LENGTH, allow_pickle: bool = False) -> None:
        self.path = Path(path).expanduser().absolute()
        self.allow_pickle = allow_pickle
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
                self._model = self._take_heads(load_model(
                    self.path, device=self.device, allow_pickle=self.allow_pickle))
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
