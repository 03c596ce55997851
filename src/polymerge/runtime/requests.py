"""The request-level code every runtime shares: tokenizing, padding, batching, generating, the
module wrapper, and the empty working model built from a folder's config.

A runtime built on :class:`RequestRuntime` implements how one batch runs with its rows' weights
(``_run``, ``_generate``) and how texts or token ids are routed (``route``, ``route_ids``);
everything else is here. Nothing is kept between calls: tokenizers come as two instances, one
padding on the right (forward passes, router features) and one on the left (generation), so no
call flips a padding side that another thread could see.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from polymerge.engine import resolve_device
from polymerge.errors import CheckpointError, PolymergeError
from polymerge.io.checkpoint import first_line, read_model_config
from polymerge.io.pretrained import contained_dir, load_config, load_pretrained
from polymerge.routing import Router, load_router, load_tokenizer
from polymerge.routing.features import check_max_length
from polymerge.runtime.base import Routing, RunOutput, Runtime, routing_weights
from polymerge.runtime.heads import Heads, is_task_checkpoint

# ----------------------------------------------------------------------------- models


def model_class(config: Any) -> Any:
    """The transformers class named by a config's ``architectures`` (``AutoModel`` if none)."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def empty_model(folder: str | Path, dtype: torch.dtype, device: str | torch.device, *,
                backbone: bool = False) -> torch.nn.Module:
    """A model of the folder's config (its architecture), in ``dtype``, in eval mode, weights
    unset (to be written); the global random state is left as it was. The config must be a
    regular file inside the folder; one transformers cannot build is a one-line error.
    ``backbone``: only its backbone (``model.base_model``: what task heads run on)."""
    if not dtype.is_floating_point:
        raise CheckpointError(f"{folder}: a model cannot run in {dtype} (not a float dtype)")
    cfg = load_config(folder)
    cls = model_class(cfg)
    try:
        with torch.random.fork_rng(devices=[]):
            model = cls(cfg).to(dtype)
    except Exception as exc:  # a config transformers parses but cannot build a model of
        raise CheckpointError(f"{Path(folder) / 'config.json'}: cannot build a "
                              f"{cls.__name__} from it ({first_line(exc)})") from None
    if backbone:
        model = model.base_model
    return model.to(device).eval()


def load_model(folder: str | Path, *, device: str | torch.device, allow_pickle: bool = False
               ) -> torch.nn.Module:
    """The folder's model with its weights (class by its config), in eval mode on ``device``;
    pickled weights only with ``allow_pickle`` (see :mod:`polymerge.io.pretrained`)."""
    cls = model_class(load_config(folder))
    return load_pretrained(cls, folder, allow_pickle=allow_pickle).to(device).eval()


def generates(folder: str | Path) -> bool:
    """Whether the folder's architecture generates text (a causal LM head)."""
    cls = model_class(load_config(folder))
    return bool(getattr(cls, "can_generate", lambda: False)())


def check_new_tokens(value: object) -> int:
    """A number of tokens to generate: an integer of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PolymergeError(f"max_new_tokens must be a whole number >= 1, got {value!r}")
    return value


def primary(res: Any) -> torch.Tensor:
    """A model output's main tensor: ``logits``, else ``last_hidden_state``, else the first."""
    if isinstance(res, torch.Tensor):
        return res
    for key in ("logits", "last_hidden_state"):
        value = getattr(res, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return res[0]


def reassemble(results: list[tuple[list[int], Any]], batch: int) -> Any:
    """One output for the whole batch from the outputs of groups of its rows: every tensor
    whose first dimension is the group's rows is put back in row order (others dropped)."""
    if len(results) == 1 and len(results[0][0]) == batch \
            and results[0][0] == list(range(batch)):
        return results[0][1]
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


def pad_sequences(parts: list[tuple[list[int], torch.Tensor]], batch: int, pad: int
                  ) -> torch.Tensor:
    """Generated sequences of groups of rows, in row order, right-padded with ``pad``."""
    width = max(t.shape[1] for _, t in parts)
    out = torch.full((batch, width), int(pad), dtype=parts[0][1].dtype,
                     device=parts[0][1].device)
    for idx, t in parts:
        out[torch.tensor(idx, device=out.device), : t.shape[1]] = t
    return out


def select_rows(inputs: Mapping[str, Any], rows: list[int], batch: int) -> dict[str, Any]:
    """The given rows of every tensor whose first dimension is the batch (others as they are)."""
    if rows == list(range(batch)):
        return dict(inputs)
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            v = v.index_select(0, torch.tensor(rows, device=v.device))
        out[k] = v
    return out


# ----------------------------------------------------------------------------- tokenizers


class Tokenizers:
    """A folder's tokenizer as two instances, right- and left-padding, loaded on first use.

    Tokenizing is serialized (fast tokenizers refuse concurrent use of one instance)."""

    def __init__(self, folder: str | Path, max_length: int) -> None:
        self.folder = Path(folder)
        self.max_length = max_length
        self._lock = threading.RLock()
        self._right: Any = None
        self._left: Any = None

    @property
    def right(self) -> Any:
        with self._lock:
            if self._right is None:
                self._right = load_tokenizer(self.folder, padding_side="right")
            return self._right

    @property
    def left(self) -> Any:
        with self._lock:
            if self._left is None:
                self._left = load_tokenizer(self.folder, padding_side="left")
            return self._left

    @property
    def pad_token_id(self) -> int:
        return int(self.right.pad_token_id)

    def encode(self, texts: Sequence[str], *, left: bool = False) -> dict[str, torch.Tensor]:
        tok = self.left if left else self.right
        with self._lock:
            enc = tok(list(texts), padding=True, truncation=True, max_length=self.max_length,
                      return_tensors="pt")
        return dict(enc)

    def decode(self, ids: torch.Tensor) -> str:
        with self._lock:
            return self.right.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- the runtime


class RequestRuntime(Runtime):
    """``forward``, ``generate`` and ``as_module`` over a runtime's per-batch hooks.

    ``folder`` holds the config and tokenizer; ``router_dir`` the router, if any. Subclasses
    implement ``experts``, ``route``, ``route_ids``, ``_run`` and ``_generate``;
    ``RUN_OPTIONS`` names the keyword arguments that go to the hooks instead of the model (a
    mixing runtime's ``fold`` and ``path``). What is built on first use (model, tokenizers,
    router) is built under a lock.
    """

    RUN_OPTIONS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, folder: Path, *, device: str | torch.device, max_length: int,
                 label: str, router_dir: Path | None = None) -> None:
        self.folder = folder
        self.device = resolve_device(device)
        self.max_length = check_max_length(max_length)
        self.label = label
        self.tokenizers = Tokenizers(folder, max_length)
        self._init = threading.RLock()
        self._causal: bool | None = None
        self._router_dir = router_dir
        self._router: Router | None = None
        self._router_loaded = False
        self._heads: Heads | None = None
        self._heads_loaded = False

    @property
    def is_causal(self) -> bool:
        with self._init:
            if self._causal is None:
                self._causal = not self.classifies and generates(self.folder)
            return self._causal

    # -- task heads (see :mod:`polymerge.runtime.heads`)
    @property
    def classifies(self) -> bool:
        """Whether the experts have task heads: the working model is then the backbone, and
        answers carry each row's routed head's label and score."""
        store = getattr(self, "store", None)
        if store is not None:
            return bool(store.has_heads)
        return is_task_checkpoint(read_model_config(self.folder))

    @property
    def heads(self) -> Heads | None:
        """The experts' task heads (built on first use), or None."""
        with self._init:
            if not self._heads_loaded:
                store = getattr(self, "store", None)
                if store is not None and store.has_heads:
                    self._heads = Heads.from_store(store, self.device)
                elif store is None and self.classifies:
                    self.model  # noqa: B018  (loading a task checkpoint splits off its head)
                self._heads_loaded = True
            return self._heads

    def _take_heads(self, model: torch.nn.Module) -> torch.nn.Module:
        """A loaded plain checkpoint's model: a task class gives its backbone, its head kept
        as this runtime's one head."""
        config = model.config.to_dict()  # type: ignore[operator]
        if not is_task_checkpoint(config):
            return model
        backbone, self._heads = Heads.split_model(model, config, self.experts[0])
        self._heads_loaded = True
        return backbone

    @property
    def router(self) -> Router | None:
        """The router (loaded on first use), or None."""
        with self._init:
            if not self._router_loaded:
                if self._router_dir is not None and self._router_dir.is_dir():
                    # the router is the folder's own: not a link out of it
                    contained_dir(self.folder, self._router_dir.name, str(self.label))
                    self._router = load_router(self._router_dir, experts=self.experts)
                self._router_loaded = True
            return self._router

    @property
    def tokenizer(self) -> Any:
        """The right-padding tokenizer (for callers that tokenize themselves; leave its
        settings as they are: the runtime uses it too)."""
        return self.tokenizers.right

    # -- hooks
    @abstractmethod
    def route_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                  top_k: int | None = None, temperature: float | None = None) -> torch.Tensor:
        """(batch, N) router weights of a tokenized batch."""

    @abstractmethod
    def _run(self, inputs: dict[str, Any], weights: torch.Tensor, **options: Any) -> Any:
        """The model's output for one batch (inputs on the device), rows in order."""

    @abstractmethod
    def _generate(self, inputs: dict[str, Any], weights: torch.Tensor, **options: Any
                  ) -> torch.Tensor:
        """Generated sequences (prompt included) for one batch, rows in order."""

    def _served(self, weights: torch.Tensor) -> torch.Tensor:
        """The weights the rows actually run with (switching: top-1)."""
        return weights

    def _batches(self, weights: torch.Tensor, batch_size: int) -> list[list[int]]:
        """Rows of each batch, in the order they run (here: input order)."""
        n = weights.shape[0]
        return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]

    # -- routing
    def weights(self, routing: Routing, rows: int, *, texts: Sequence[str] | None = None,
                ids: tuple[torch.Tensor, torch.Tensor] | None = None, top_k: int | None = None,
                temperature: float | None = None) -> torch.Tensor:
        """The (rows, N) weights a call runs with, from ``routing`` (the router's on
        ``texts`` or tokenized ``ids`` = (input_ids, attention_mask) when it asks)."""

        def route() -> torch.Tensor:
            if texts is not None:
                return self.route(texts, top_k=top_k, temperature=temperature)
            assert ids is not None
            return self.route_ids(*ids, top_k=top_k, temperature=temperature)

        if rows == 0:
            return torch.zeros(0, len(self.experts))
        return self._served(routing_weights(routing, rows, self.experts, route,
                                            where=f" in {self.label}" if self.label else ""))

    def _split(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        options = {k: kwargs.pop(k) for k in self.RUN_OPTIONS if k in kwargs}
        return options, kwargs

    def _on_device(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items()}

    # -- answering
    @torch.inference_mode()
    def forward(self, inputs: Sequence[str] | Mapping[str, Any] | torch.Tensor,
                routing: Routing = None, *, top_k: int | None = None,
                temperature: float | None = None, batch_size: int = 16,
                **kwargs: Any) -> RunOutput:
        options, model_kwargs = self._split(kwargs)
        if isinstance(inputs, (Mapping, torch.Tensor)):
            batch = dict(inputs) if isinstance(inputs, Mapping) else {"input_ids": inputs}
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            if mask is None:
                mask = batch["attention_mask"] = torch.ones_like(ids)
            w = self.weights(routing, ids.shape[0], ids=(ids, mask), top_k=top_k,
                             temperature=temperature)
            on_device = self._on_device({**batch, **model_kwargs})
            res = self._run(on_device, w, **options)
            if self.heads is not None:
                ans = self.heads.answer(res, on_device, w, self.experts)
                return RunOutput(list(self.experts), w, None, ans.logits, labels=ans.labels,
                                 scores=ans.scores, expert_answers=ans.per_expert)
            main = primary(res)
            outputs = [main[row][mask[row].to(main.device).bool()].float().cpu()
                       for row in range(ids.shape[0])]
            return RunOutput(list(self.experts), w, None, outputs)
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        w = self.weights(routing, len(texts), texts=texts, top_k=top_k, temperature=temperature)
        out: list[torch.Tensor | None] = [None] * len(texts)
        heads = self.heads
        labels: list[str | None] = [None] * len(texts)
        scores: list[float | None] = [None] * len(texts)
        per: list[dict[str, dict[str, Any]]] = [{} for _ in texts]
        for chunk in self._batches(w, batch_size):
            enc = self.tokenizers.encode([texts[i] for i in chunk])
            on_device = self._on_device({**enc, **model_kwargs})
            res = self._run(on_device, w[chunk], **options)
            if heads is not None:
                ans = heads.answer(res, on_device, w[chunk], self.experts)
                for row, i in enumerate(chunk):
                    out[i], labels[i], scores[i] = ans.logits[row], ans.labels[row], \
                        ans.scores[row]
                    per[i] = ans.per_expert[row]
                continue
            main = primary(res)
            for row, i in enumerate(chunk):
                n_tok = int(enc["attention_mask"][row].sum())
                out[i] = main[row, :n_tok].float().cpu()
        outputs = [o for o in out if o is not None]
        if heads is not None:
            return RunOutput(list(self.experts), w, texts, outputs, labels=labels,
                             scores=scores, expert_answers=per)
        return RunOutput(list(self.experts), w, texts, outputs)

    @torch.inference_mode()
    def generate(self, texts: Sequence[str], routing: Routing = None, *,
                 top_k: int | None = None, temperature: float | None = None,
                 max_new_tokens: int = 32, batch_size: int = 8, **sampling: Any) -> RunOutput:
        if not self.is_causal:
            raise PolymergeError(f"{self.label or 'this model'} does not generate text; use "
                                 "forward()")
        options, sampling = self._split(sampling)
        check_new_tokens(max_new_tokens)
        texts = [texts] if isinstance(texts, str) else list(texts)
        w = self.weights(routing, len(texts), texts=texts, top_k=top_k, temperature=temperature)
        sampling.setdefault("do_sample", False)
        sampling.setdefault("pad_token_id", self.tokenizers.pad_token_id)
        completions: list[str | None] = [None] * len(texts)
        new_ids: list[torch.Tensor | None] = [None] * len(texts)
        for chunk in self._batches(w, batch_size):
            enc = self.tokenizers.encode([texts[i] for i in chunk], left=True)
            enc.pop("token_type_ids", None)  # one segment: all zeros; causal LMs take none
            seqs = self._generate(self._on_device(enc), w[chunk],
                                  max_new_tokens=max_new_tokens, **sampling, **options)
            new = seqs[:, enc["input_ids"].shape[1]:].cpu()
            for row, i in enumerate(chunk):
                new_ids[i] = new[row]
                completions[i] = self.tokenizers.decode(new[row])
        return RunOutput(list(self.experts), w, texts,
                         completions=[c for c in completions if c is not None],
                         token_ids=[t for t in new_ids if t is not None])

    def as_module(self, routing: Routing = None, *, expert: str | None = None,
                  **options: Any) -> RuntimeModule:
        """An ``nn.Module`` taking token ids whose rows run with ``routing`` (default: the
        router's, per row); ``expert`` (settable on the module) overrides it. ``options``:
        ``top_k``, ``temperature`` and the runtime's own (a mixing runtime's ``fold``,
        ``path``)."""
        return RuntimeModule(self, routing, expert=expert, **options)


class RuntimeModule(torch.nn.Module):
    """Token ids in, the routed model's outputs out, batch order kept (the zoo's evaluation
    contract).

    ``forward`` accepts what the underlying model accepts (``input_ids``, ``attention_mask``,
    ...) and returns its output; ``generate`` returns sequences (a switching store's groups
    right-padded with the pad id). Rows run with ``expert`` when it is set, else with
    ``routing``. ``last_weights`` and ``last_routes`` (each row's top expert) describe the
    last batch; one module serves one caller at a time (make one per thread).
    """

    def __init__(self, runtime: RequestRuntime, routing: Routing = None, *,
                 expert: str | None = None, **options: Any) -> None:
        super().__init__()
        unknown = set(options) - {"top_k", "temperature", *runtime.RUN_OPTIONS}
        if unknown:
            raise PolymergeError(f"as_module: unknown option(s) {', '.join(sorted(unknown))}")
        self.runtime = runtime
        self.routing = routing
        self.expert = expert
        self.options = options
        self.last_weights: torch.Tensor | None = None
        self.last_routes: list[str] = []

    @property
    def config(self) -> Any:
        return self.runtime.model.config  # type: ignore[attr-defined]

    def _weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
        options = dict(self.options)
        soft = {k: options.pop(k) for k in ("top_k", "temperature") if k in options}
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        routing = self.expert if self.expert is not None else self.routing
        w = self.runtime.weights(routing, input_ids.shape[0], ids=(input_ids, mask), **soft)
        self.last_weights = w
        self.last_routes = [self.runtime.experts[int(i)] for i in w.argmax(-1)]
        return w, options

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                kwargs: dict[str, Any]) -> dict[str, Any]:
        inputs = {"input_ids": input_ids, **kwargs}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return self.runtime._on_device(inputs)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        w, options = self._weights(input_ids, attention_mask)
        return self.runtime._run(self._inputs(input_ids, attention_mask, kwargs), w, **options)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        w, options = self._weights(input_ids, attention_mask)
        return self.runtime._generate(self._inputs(input_ids, attention_mask, kwargs), w,
                                      **options)
