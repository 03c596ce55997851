"""A routed runtime over an expert store: route each request, switch weights by lookup, run.

One working model is built from the store's config; switching to an expert writes that
expert's tensors into it in place (:meth:`Store.apply`: a gather per channel-merged tensor),
and only when the expert changes. Requests in a batch are grouped by expert, and the group of
the expert already loaded goes first. Routing uses the store's router on features of the base
model, computed once per query; ``expert=`` or ``experts=`` bypass the router (oracle routing).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from polymerge.errors import PolymergeError
from polymerge.routing.features import DEFAULT_MAX_LENGTH, FeatureModel, load_tokenizer
from polymerge.stores.base import Store, open_store

if TYPE_CHECKING:
    from polymerge.runtime.twin import TwinModel


@dataclass
class RoutedOutput:
    """One request's answer: the expert that served it and the model's output for it.

    ``output`` is the logits (causal LMs, heads) or the last hidden state (bare encoders) of
    the text's own tokens, shape (tokens, dim).
    """

    text: str
    expert: str
    output: torch.Tensor


@dataclass
class RoutedGeneration:
    text: str
    expert: str
    completion: str


def _model_class(config: Any) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def empty_model(store: Store, device: str | torch.device) -> torch.nn.Module:
    """A model of the store's architecture and dtype in eval mode (its weights are to be set);
    the global random state is left as it was."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(store.path))
    with torch.random.fork_rng(devices=[]):
        model = _model_class(cfg)(cfg).to(store.dtype)
    return model.to(device).eval()


class StoreRuntime:
    """What every store runtime shares: the store's tokenizer and whether its model generates.

    Subclasses set ``store``, ``_tokenizer`` (None until first use) and a ``model`` property.
    """

    store: Store
    model: torch.nn.Module
    _tokenizer: Any

    @property
    def is_causal(self) -> bool:
        return hasattr(self.model, "generate") and \
            type(self.model).__name__.endswith("ForCausalLM")

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.store.path)
        return self._tokenizer


class RoutedModel(StoreRuntime):
    """What :func:`polymerge.load_store` returns: a store, one working model and a router."""

    def __init__(self, store: Store, *, device: str | torch.device = "cpu",
                 base: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.store = store
        self.device = torch.device(device)
        if store.device != self.device:
            store.to(self.device)
        self.base = Path(base).expanduser() if base else None
        self.max_length = max_length
        self.active: str | None = None
        self.switches = 0
        self.switch_seconds = 0.0
        self._model: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._features: FeatureModel | None = None

    def __repr__(self) -> str:
        return f"<RoutedModel {self.store.path} experts={self.experts} active={self.active}>"

    @property
    def experts(self) -> list[str]:
        return self.store.experts

    # -- the working model
    @property
    def model(self) -> torch.nn.Module:
        """The working model, built from the store's config on first use (weights unset until
        the first switch)."""
        if self._model is None:
            self._model = empty_model(self.store, self.device)
            self.active = None
        return self._model

    def switch(self, expert: str) -> bool:
        """Make ``expert`` the active expert; returns False when it already was."""
        name = self.store.experts[self.store.expert_index(expert)]
        model = self.model
        if name == self.active:
            return False
        start = time.perf_counter()
        self.store.apply(model, name, previous=self.active)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.switch_seconds += time.perf_counter() - start
        self.active = name
        self.switches += 1
        return True

    # -- routing
    @property
    def router(self) -> Any:
        return self.store.router

    @property
    def features(self) -> FeatureModel:
        if self._features is None:
            router = self.router
            recorded = (getattr(router, "info", {}) or {}).get("feature", {}) if router else {}
            path = self.base or Path(recorded.get("model") or self.store.base_path or "")
            if not str(path) or not (path / "config.json").is_file():
                raise PolymergeError(f"the router's feature model (the base model) was not "
                                     f"found at {path or '(none recorded)'}; pass base=PATH")
            self._features = FeatureModel(path, tokenizer_path=self.store.path,
                                          device=self.device,
                                          max_length=int(recorded.get("max_length",
                                                                      self.max_length)))
        return self._features

    def route(self, texts: Sequence[str]) -> list[str]:
        """The expert for each text (the router's choice; the only expert when there is one)."""
        if len(self.experts) == 1:
            return [self.experts[0]] * len(texts)
        if self.router is None:
            raise PolymergeError(f"{self.store.path.name} has no router; train one with "
                                 "`polymerge router train` or name the expert")
        return self.router.predict(self.features(list(texts)))

    def route_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """The expert for each row of a tokenized batch (same tokenizer as the base)."""
        if len(self.experts) == 1:
            return [self.experts[0]] * input_ids.shape[0]
        if self.router is None:
            raise PolymergeError(f"{self.store.path.name} has no router; train one with "
                                 "`polymerge router train` or name the expert")
        return self.router.predict(self.features.from_ids(input_ids, attention_mask))

    def _assign(self, n: int, texts: Sequence[str] | None, expert: str | None,
                experts: Sequence[str] | None) -> list[str]:
        if expert is not None and experts is not None:
            raise PolymergeError("give expert= or experts=, not both")
        if expert is not None:
            return [expert] * n
        if experts is not None:
            if len(experts) != n:
                raise PolymergeError(f"{len(experts)} experts for {n} requests")
            return list(experts)
        assert texts is not None
        return self.route(texts)

    def groups(self, chosen: Sequence[str]) -> list[tuple[str, list[int]]]:
        """Request indices grouped by expert, the active expert's group first."""
        order: dict[str, list[int]] = {}
        for i, e in enumerate(chosen):
            order.setdefault(e, []).append(i)
        items = list(order.items())
        items.sort(key=lambda kv: kv[0] != self.active)
        return items

    # -- answering
    @torch.inference_mode()
    def forward(self, texts: Sequence[str], *, expert: str | None = None,
                experts: Sequence[str] | None = None, batch_size: int = 16,
                **kwargs: Any) -> list[RoutedOutput]:
        """Run the model on each text with its expert; outputs come back in input order."""
        texts = list(texts)
        chosen = self._assign(len(texts), texts, expert, experts)
        tok = self.tokenizer
        tok.padding_side = "right"
        out: list[RoutedOutput | None] = [None] * len(texts)
        for name, idx in self.groups(chosen):
            self.switch(name)
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                enc = tok([texts[i] for i in chunk], padding=True, truncation=True,
                          max_length=self.max_length, return_tensors="pt").to(self.device)
                res = self.model(**enc, **kwargs)
                main = _primary(res)
                for row, i in enumerate(chunk):
                    n_tok = int(enc["attention_mask"][row].sum())
                    out[i] = RoutedOutput(texts[i], name, main[row, :n_tok].float().cpu())
        return [o for o in out if o is not None]

    @torch.inference_mode()
    def generate(self, texts: Sequence[str], *, expert: str | None = None,
                 experts: Sequence[str] | None = None, batch_size: int = 8,
                 **kwargs: Any) -> list[RoutedGeneration]:
        """Generate a completion for each text with its expert (greedy unless told)."""
        if not self.is_causal:
            raise PolymergeError(f"{type(self.model).__name__} does not generate text; use "
                                 "forward()")
        texts = list(texts)
        chosen = self._assign(len(texts), texts, expert, experts)
        tok = self.tokenizer
        tok.padding_side = "left"
        kwargs.setdefault("max_new_tokens", 32)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", tok.pad_token_id)
        out: list[RoutedGeneration | None] = [None] * len(texts)
        try:
            for name, idx in self.groups(chosen):
                self.switch(name)
                for s in range(0, len(idx), batch_size):
                    chunk = idx[s:s + batch_size]
                    enc = tok([texts[i] for i in chunk], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt").to(self.device)
                    seqs = self.model.generate(**enc, **kwargs)
                    new = seqs[:, enc["input_ids"].shape[1]:]
                    for row, i in enumerate(chunk):
                        out[i] = RoutedGeneration(
                            texts[i], name, tok.decode(new[row], skip_special_tokens=True))
        finally:
            tok.padding_side = "right"
        return [o for o in out if o is not None]

    def __call__(self, texts: str | Sequence[str], **kwargs: Any) -> list[Any]:
        batch = [texts] if isinstance(texts, str) else list(texts)
        return self.generate(batch, **kwargs) if self.is_causal else \
            self.forward(batch, **kwargs)

    def as_module(self, *, expert: str | None = None) -> RoutedModule:
        """An ``nn.Module`` taking token ids that routes each row (or always uses ``expert``)."""
        return RoutedModule(self, expert=expert)

    # -- accounting
    def memory(self) -> dict[str, int]:
        """Bytes held: the store's pieces, the working model, the router's feature model."""
        model = sum(p.numel() * p.element_size() for p in self.model.parameters()) + \
            sum(b.numel() * b.element_size() for b in self.model.buffers())
        feats = 0
        if self._features is not None:
            feats = sum(p.numel() * p.element_size() for p in self._features.model.parameters())
        return {"store": self.store.nbytes(), "working_model": model, "feature_model": feats,
                "total": self.store.nbytes() + model + feats}


def _primary(res: Any) -> torch.Tensor:
    if isinstance(res, torch.Tensor):
        return res
    for key in ("logits", "last_hidden_state"):
        value = getattr(res, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return res[0]


class RoutedModule(torch.nn.Module):
    """Token ids in, the routed experts' outputs out, batch order kept.

    ``forward`` accepts what the underlying model accepts (``input_ids``, ``attention_mask``,
    ...); every output tensor whose first dimension is the batch is reassembled in order.
    ``generate`` does the same for causal LMs (sequences right-padded with the pad id).
    """

    def __init__(self, runtime: RoutedModel, *, expert: str | None = None) -> None:
        super().__init__()
        self.runtime = runtime
        self.expert = expert
        self.last_routes: list[str] = []

    @property
    def config(self) -> Any:
        return self.runtime.model.config

    def _route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[str]:
        if self.expert is not None:
            routes = [self.expert] * input_ids.shape[0]
        else:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            routes = self.runtime.route_ids(input_ids, mask)
        self.last_routes = routes
        return routes

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        rt = self.runtime
        routes = self._route(input_ids, attention_mask)
        results: list[tuple[list[int], Any]] = []
        for name, idx in rt.groups(routes):
            rt.switch(name)
            sel = torch.tensor(idx, device=input_ids.device)
            sub = {k: (v.index_select(0, sel) if isinstance(v, torch.Tensor)
                       and v.shape[:1] == input_ids.shape[:1] else v) for k, v in kwargs.items()}
            mask = attention_mask.index_select(0, sel) if attention_mask is not None else None
            results.append((idx, rt.model(input_ids=input_ids.index_select(0, sel).to(rt.device),
                                          attention_mask=None if mask is None
                                          else mask.to(rt.device), **sub)))
        return _reassemble(results, input_ids.shape[0])

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        rt = self.runtime
        routes = self._route(input_ids, attention_mask)
        pad = kwargs.get("pad_token_id", rt.tokenizer.pad_token_id)
        parts: list[tuple[list[int], torch.Tensor]] = []
        for name, idx in rt.groups(routes):
            rt.switch(name)
            sel = torch.tensor(idx, device=input_ids.device)
            mask = attention_mask.index_select(0, sel) if attention_mask is not None else None
            parts.append((idx, rt.model.generate(input_ids=input_ids.index_select(0, sel),
                                                 attention_mask=mask, **kwargs)))
        width = max(t.shape[1] for _, t in parts)
        out = torch.full((input_ids.shape[0], width), int(pad), dtype=parts[0][1].dtype,
                         device=parts[0][1].device)
        for idx, t in parts:
            out[torch.tensor(idx, device=out.device), : t.shape[1]] = t
        return out


def _reassemble(results: list[tuple[list[int], Any]], batch: int) -> Any:
    first = results[0][1]
    if isinstance(first, torch.Tensor):
        full = first.new_zeros((batch, *first.shape[1:]))
        for idx, t in results:
            full[torch.tensor(idx, device=full.device)] = t
        return full
    fields: dict[str, torch.Tensor] = {}
    for key, value in first.items():
        if isinstance(value, torch.Tensor) and value.shape[:1] == (len(results[0][0]),) \
                and all(isinstance(r.get(key), torch.Tensor) for _, r in results):
            shapes = {tuple(r[key].shape[1:]) for _, r in results}
            if len(shapes) != 1:
                continue
            full = value.new_zeros((batch, *value.shape[1:]))
            for idx, r in results:
                full[torch.tensor(idx, device=full.device)] = r[key]
            fields[key] = full
    return type(first)(**fields)


def load_store(path: str | Path, *, device: str | torch.device = "cpu",
               base: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH,
               **options: Any) -> RoutedModel | TwinModel:
    """Open a store folder and return its runtime: a :class:`RoutedModel` (switch weights by
    lookup) for channel stores, a :class:`~polymerge.runtime.twin.TwinModel` (mix the experts
    per input) for twin stores, which also takes ``temperature``, ``top_k`` and ``fold``."""
    store = open_store(path, device=device)
    if store.method == "twin":
        from polymerge.runtime.twin import TwinModel

        if base is not None:
            raise PolymergeError(f"{store.path.name} is a twin store: its router's features "
                                 "come from its own shared model, base= does not apply")
        return TwinModel(store, device=device, max_length=max_length, **options)
    if options:
        raise PolymergeError(f"{store.method} stores take no option(s) "
                             f"{', '.join(sorted(options))}")
    return RoutedModel(store, device=device, base=base, max_length=max_length)
