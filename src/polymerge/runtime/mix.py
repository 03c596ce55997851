"""Serving by mixing: one model whose layers mix the experts per input (twin stores).

Twin-Merging answers an input ``x`` with ``theta(x) = shared + sum_t w_t(x) (theta_t -
shared)``, ``w(x)`` the router's soft weights. :class:`MixRuntime` serves every store whose
``serving`` is ``"mix"``: it builds the shared model and replaces each layer holding a mixed
tensor by a mixing layer (:mod:`.mixing_layers`) over the store's factors and per-expert
differences. A call passes its rows' weights to the layers through a context variable
(:func:`~polymerge.runtime.mixing_layers.mixing`), so concurrent calls each mix with their own
weights and nothing is kept between calls.

Routing takes two passes. Pass 1 runs the same model with no weights, which *is* the shared
model (no second model in memory), and mean-pools its backbone's last hidden state; the router
(trained on those very features, recorded as ``feature.model = "store:shared"``) gives ``w =
softmax(logits / temperature)``, top-k optionally. Pass 2 runs the mixed model.

Memory: the model holds the shared weights and the stacked factors; the store's pieces are
re-pointed at them (views), so nothing is held twice, except the experts' copies of
``others: expert`` tensors (their differences to the shared merge are kept for mixing).

A store served by mixing provides, besides :class:`~polymerge.stores.Store`'s lookup,
``shared_tensor(name)`` (the shared model's tensor) and ``factors(name, expert)`` (``(u, v)``
of its ``twin`` tensors).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polymerge.errors import PolymergeError
from polymerge.routing import DEFAULT_MAX_LENGTH, FeatureModel, Router
from polymerge.runtime.base import ROUTE, Routing, check_soft_routing
from polymerge.runtime.mixing_layers import (
    LowRank,
    TwinEmbedding,
    TwinLayer,
    TwinLinear,
    TwinNorm,
    is_norm,
)
from polymerge.runtime.mixture import Mixture, mixing
from polymerge.runtime.requests import RequestRuntime, empty_model
from polymerge.stores import ROUTER_DIR, Store, expert_part, open_store, piece_name

SHARED_FEATURES = "store:shared"
"""``feature.model`` of a router trained on a mixing store's shared model."""


def _check_mix(store: Store) -> None:
    if store.serving != "mix":
        raise PolymergeError(f"{store.path.name} is a {store.method} store, served by "
                             f"{store.serving}ing, not by mixing")


def build_shared_model(store: Store, *, device: str | torch.device | None = None
                       ) -> nn.Module:
    """A plain model from the store's config with the shared model's weights loaded."""
    _check_mix(store)
    model = empty_model(store.path, store.dtype, device if device is not None else store.device,
                        backbone=store.has_heads)
    with torch.no_grad():
        for name, target in store.targets(model).items():
            target.copy_(store.shared_tensor(name))  # type: ignore[attr-defined]
    return model


def shared_feature_model(store: str | Path | Store, *, device: str | torch.device = "cpu",
                         max_length: int = DEFAULT_MAX_LENGTH) -> FeatureModel:
    """The router's feature model of a mixing store: the shared model's backbone."""
    loaded = store if isinstance(store, Store) else open_store(store, device=device)
    model = build_shared_model(loaded, device=device)
    return FeatureModel(loaded.path, tokenizer_path=loaded.path, device=device,
                        max_length=max_length, model=getattr(model, "base_model", model))


def right_aligned(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows moved to the left edge (router features are taken right-padded)."""
    if mask.shape[1] == 0 or bool(mask[:, 0].all()):
        return ids, mask
    ids, mask = ids.clone(), mask.clone()
    for row in range(ids.shape[0]):
        pad = int((mask[row].cumsum(0) == 0).sum())
        if pad:
            ids[row] = torch.roll(ids[row], -pad)
            mask[row] = torch.roll(mask[row], -pad)
    return ids, mask


class MixRuntime(RequestRuntime):
    """A store served by mixing (see the module docstring).

    ``temperature`` and ``top_k``: the router's defaults (each call may override them);
    ``fold`` (None: auto, True, False) and ``path`` (None: by the cost rule, or ``"dense"``,
    ``"experts"``, ``"sets"``): the layers' defaults, which calls may override too
    (``forward(..., fold=..., path=...)``).
    """

    serving = "mix"
    RUN_OPTIONS = ("fold", "path")

    def __init__(self, store: Store, *, device: str | torch.device = "cpu",
                 max_length: int = DEFAULT_MAX_LENGTH, temperature: float = 1.0,
                 top_k: int | None = None, fold: bool | None = None,
                 path: str | None = None) -> None:
        _check_mix(store)
        check_soft_routing(temperature, top_k, len(store.experts))
        super().__init__(store.path, device=device, max_length=max_length,
                         label=store.path.name, router_dir=store.path / ROUTER_DIR)
        self.store = store
        if store.device != self.device:
            store.to(self.device)
        self.temperature = float(temperature)
        self.top_k = top_k
        self.fold = fold
        self.path = path
        self.twin_modules: dict[str, TwinLayer] = {}
        self.routing_passes = 0
        self.mixed_passes = 0
        self._count = threading.Lock()
        self._model: nn.Module | None = None
        self._features: FeatureModel | None = None

    def __repr__(self) -> str:
        return (f"<MixRuntime {self.store.path} experts={self.experts} "
                f"temperature={self.temperature} top_k={self.top_k}>")

    @property
    def experts(self) -> list[str]:
        return self.store.experts

    # -- the working model
    @property
    def model(self) -> nn.Module:
        """The working model: the shared weights, covered layers replaced by mixing layers.
        Outside a ``mixed`` block it is the shared model."""
        with self._init:
            if self._model is None:
                self._model = self._build()
            return self._model

    def _build(self) -> nn.Module:
        store = self.store
        model = build_shared_model(store, device=self.device)
        targets = store.targets(model)
        mixed = {n for n, e in store.entries.items()
                 if e.kind in ("twin", "expert") and n in targets}
        by_ptr = {targets[n].data_ptr(): n for n in mixed}
        factors: dict[str, LowRank] = {}
        deltas: dict[str, torch.Tensor] = {}
        covered: set[str] = set()
        for path, module in list(model.named_modules()):
            hits = {p: by_ptr[t.data_ptr()] for p, t in module.named_parameters(recurse=False)
                    if t.data_ptr() in by_ptr}
            if not hits:
                continue
            new = self._twin_module(module, path, hits, factors, deltas)
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            self.twin_modules[path] = new
            covered |= set(hits.values())
        missing = sorted(mixed - covered)
        if missing:
            raise PolymergeError(f"twin runtime: the model has no layer holding {missing[0]!r} "
                                 f"as a parameter, so it cannot be mixed per input; rebuild "
                                 f"the store with others: shared or a scope without it")
        # The store's pieces become views of what the model holds (nothing kept twice).
        for name, target in targets.items():
            entry = store.entries[name]
            key = piece_name(name, "merged" if entry.kind == "merged" else "shared")
            piece = store.pieces.get(key)
            if piece is not None and piece.shape == target.shape \
                    and piece.dtype == target.dtype:
                store.pieces[key] = target
        for name, lr in factors.items():
            for t in range(lr.experts):
                store.pieces[piece_name(name, f"u.{t}")] = lr.u(t)
                store.pieces[piece_name(name, f"v.{t}")] = lr.v(t)
        return model.eval()

    def _twin_module(self, module: nn.Module, path: str, hits: dict[str, str],
                     factors: dict[str, LowRank], deltas: dict[str, torch.Tensor]
                     ) -> TwinLayer:
        store = self.store
        n = len(self.experts)

        def low_rank(name: str) -> LowRank | None:
            if store.entries[name].kind != "twin":
                return None
            if name not in factors:
                us, vs = zip(*(store.factors(name, t)  # type: ignore[attr-defined]
                               for t in range(n)), strict=True)
                factors[name] = LowRank.from_lists(us, vs)
            return factors[name]

        def delta(name: str | None) -> torch.Tensor | None:
            if name is None or store.entries[name].kind != "expert":
                return None
            if name not in deltas:
                shared = store.shared_tensor(name)  # type: ignore[attr-defined]
                deltas[name] = torch.stack([store.pieces[piece_name(name, expert_part(t))]
                                            - shared for t in range(n)])
            return deltas[name]

        weight, bias = hits.get("weight"), hits.get("bias")
        unknown = set(hits) - {"weight", "bias"}
        kind = type(module).__name__
        if not unknown:
            if isinstance(module, nn.Linear) or kind == "Conv1D":
                return TwinLinear(module, factors=low_rank(weight) if weight else None,
                                  weight_delta=delta(weight), bias_delta=delta(bias))
            if isinstance(module, nn.Embedding) and bias is None:
                return TwinEmbedding(module, factors=low_rank(weight) if weight else None,
                                     weight_delta=delta(weight))
            if is_norm(module) and all(store.entries[n].kind == "expert"
                                       for n in hits.values()):
                return TwinNorm(module, weight_delta=delta(weight), bias_delta=delta(bias))
        raise PolymergeError(f"twin runtime: cannot mix {path or 'the model'} ({kind}) per "
                             f"input (tensors {sorted(hits.values())}); rebuild the store with "
                             "others: shared or a scope without them")

    @contextlib.contextmanager
    def mixed(self, routing: Routing, *, fold: bool | None = None, path: str | None = None
              ) -> Iterator[Mixture | None]:
        """``with rt.mixed(w): rt.model(...)``: the working model mixes with ``routing``'s
        weights in this thread for the block: an expert name, names (one per row), a mapping,
        or weights (N,) or (rows, N); not the router. Yields the call's Mixture (``paths``:
        the path each layer took)."""
        if routing is None or isinstance(routing, str) and routing == ROUTE:
            raise PolymergeError("mixed() needs weights, names or a mapping (the router "
                                 "needs inputs: use forward())")
        self.model  # noqa: B018  (built before the block)
        if isinstance(routing, (str, Mapping)):
            rows = 1
        elif isinstance(routing, Sequence) and all(isinstance(x, str) for x in routing):
            rows = len(routing)
        else:
            t = torch.as_tensor(routing)
            rows = int(t.shape[0]) if t.dim() == 2 else 1
        w = self.weights(routing, rows)
        with mixing(w, fold=self.fold if fold is None else fold,
                    path=self.path if path is None else path) as mixture:
            yield mixture

    # -- routing (pass 1: the shared model)
    def _require_router(self) -> Router:
        router = self.router
        if router is None:
            raise PolymergeError(f"{self.label} has no router; train one with "
                                 f"`polymerge router train {self.store.path}` or give "
                                 "routing (an expert, names or weights)")
        recorded = (getattr(router, "info", {}) or {}).get("feature", {})
        if recorded.get("model") != SHARED_FEATURES:
            raise PolymergeError(f"{self.label}'s router was trained on features of "
                                 f"{recorded.get('model')!r}, but a mixing store routes on its "
                                 "shared model; retrain it with `polymerge router train "
                                 f"{self.store.path}`")
        return router

    @property
    def features(self) -> FeatureModel:
        """Pass 1's feature model: the working model's backbone, run with no weights."""
        with self._init:
            if self._features is None:
                router = self.router
                recorded = (getattr(router, "info", {}) or {}).get("feature", {}) \
                    if router is not None else {}
                backbone = getattr(self.model, "base_model", self.model)
                self._features = FeatureModel(
                    self.store.path, tokenizer_path=self.store.path, device=self.device,
                    max_length=int(recorded.get("max_length", self.max_length)),
                    model=backbone)
            return self._features

    def _weights_from(self, feats: torch.Tensor, top_k: int | None,
                      temperature: float | None) -> torch.Tensor:
        temperature = self.temperature if temperature is None else temperature
        top_k = self.top_k if top_k is None else top_k
        check_soft_routing(temperature, top_k, len(self.experts))
        with self._count:
            self.routing_passes += 1
        return self._require_router().weights(feats, temperature=temperature,
                                              top_k=top_k).float().cpu()

    def route(self, texts: Sequence[str], *, top_k: int | None = None,
              temperature: float | None = None) -> torch.Tensor:
        """(len(texts), N) router weights (one expert: all ones)."""
        if len(self.experts) == 1:
            return torch.ones(len(texts), 1)
        self._require_router()
        with mixing(None):
            feats = self.features(list(texts))
        return self._weights_from(feats, top_k, temperature)

    def route_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                  top_k: int | None = None, temperature: float | None = None) -> torch.Tensor:
        """(batch, N) router weights of a tokenized batch (left padding is undone first)."""
        if len(self.experts) == 1:
            return torch.ones(input_ids.shape[0], 1)
        self._require_router()
        ids, mask = right_aligned(input_ids, attention_mask)
        with mixing(None):
            feats = self.features.from_ids(ids, mask)
        return self._weights_from(feats, top_k, temperature)

    # -- running (pass 2: the mixed model)
    def _mixing(self, weights: torch.Tensor, fold: bool | None, path: str | None) -> Any:
        with self._count:
            self.mixed_passes += 1
        return mixing(weights, fold=self.fold if fold is None else fold,
                      path=self.path if path is None else path)

    def _run(self, inputs: dict[str, Any], weights: torch.Tensor, *, fold: bool | None = None,
             path: str | None = None, **options: Any) -> Any:
        model = self.model
        with self._mixing(weights, fold, path):
            return model(**inputs, **options)

    def _generate(self, inputs: dict[str, Any], weights: torch.Tensor, *,
                  fold: bool | None = None, path: str | None = None, **options: Any
                  ) -> torch.Tensor:
        model = self.model
        with self._mixing(weights, fold, path):
            return model.generate(**inputs, **options)  # type: ignore[operator]

    # -- accounting
    def memory(self) -> dict[str, int]:
        """Bytes held, each storage counted once: the working model (shared weights, stacked
        factors, per-expert differences), the store's pieces not shared with it, and the
        feature model (0: pass 1 runs the working model)."""
        seen: set[int] = set()

        def unique(tensors: Any) -> int:
            total = 0
            for t in tensors:
                storage = t.untyped_storage()
                if storage.data_ptr() in seen:
                    continue
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            return total

        model = unique([*self.model.parameters(), *self.model.buffers()])
        store = unique(self.store.pieces.values())
        return {"store": store, "working_model": model, "feature_model": 0,
                "total": store + model}
