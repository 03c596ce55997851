"""A channel store's mixed batch in one forward pass: each row with its own expert, no weight
written.

A switching runtime serves a batch whose rows want different experts by grouping the rows by
expert and switching the working model's weights before each group (:mod:`.switch`). This
module is the other way, the *gather path*: the working model's layers that hold per-expert
tensors are wrapped so that, inside a ``with gathering(experts):`` block (one expert index per
row), each row runs with its own expert's weights, read from the store's pieces as they are:

* a channel-merged linear weight (rows = output channels) keeps K merged rows per channel and
  an index ``expert x channel -> group``. The layer runs one of two ways, whichever costs less
  for the call's tokens ``T`` and the ``E`` experts its rows want
  (:func:`~.channel_cost.materializes`):

  - *materialized*: per expert, its weight is gathered from the groups' rows stacked
    (``groups.view(K * out, in).index_select(0, flat[e])``, ``flat`` the index
    ``group * out + channel`` precomputed at install) and the expert's rows go through it:
    the plain model's multiply-adds plus ``E`` weight copies, the cheaper when ``T`` is
    large (a forward pass, the prompt of a generation);
  - *K outputs*: the K group outputs at once, one GEMM against the stacked groups (a view,
    nothing copied), and each row takes, per output channel, its expert's group's output (a
    ``gather`` along K with the precomputed int64 index): K times the multiply-adds, no copy,
    the cheaper for a few tokens (a decoding step). The K GEMMs run one per group into a
    scratch tensor the call keeps for its next steps: one GEMM against the groups stacked as
    (K * out, in) ran up to 2.7x slower than K of the plain shape on one CPU thread.

  A GPT-2 ``Conv1D`` keeps its weight as (in, out), so its channels are its inputs: the
  materialized weight gathers input rows the same way; the K-output way splits each row's
  input features by group (a mask per group) and runs the K masked inputs through the stacked
  groups in one GEMM of inner size ``K * in``;
* a channel-merged embedding looks each token up in its row's group: one lookup in the
  stacked table at ``group * vocab + id``;
* tensors kept per expert (``others: expert``: norms, biases, out-of-scope weights) are
  applied per group of rows that share an expert (biases: one gather of the stacked
  biases);
* tensors common to every expert (``merged``) are the working model's own.

Outside a ``gathering`` block the wrapped layers run exactly as the modules they wrap, on the
working model's (switched) weights, so the switch path is unchanged. The gather path reads no
weight that a switch writes (channel and per-expert tensors come from the store's pieces,
common ones never change after the first switch), so it needs no lock. Which of the two
paths a call takes is a cost rule (:mod:`.channel_cost`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polymerge.errors import PolymergeError
from polymerge.runtime.channel_cost import materializes

# ----------------------------------------------------------------------------- one call


class Gather:
    """One call's expert per row, and what its layers cache for it (the index rows each
    channel-merged tensor selects, the rows of each expert, scratch space for K outputs)."""

    def __init__(self, experts: torch.Tensor | Sequence[int]) -> None:
        e = torch.as_tensor(experts, dtype=torch.long).flatten().cpu()
        if e.numel() == 0:
            raise PolymergeError("gathering needs at least one row")
        self.experts = e
        self.batch = int(e.numel())
        self._rows: dict[tuple[int, str], torch.Tensor] = {}
        self._groups: dict[tuple[int, str], list[tuple[int, torch.Tensor | None]]] = {}
        self._selected: dict[tuple[int, int, str], torch.Tensor] = {}
        self._buffers: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def buffer(self, key: int, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
        """A scratch tensor for a layer's K outputs, kept for the call's next passes of the
        same shape (a generation's steps); its contents are the caller's to overwrite."""
        found = self._buffers.get((key, shape))
        if found is None or found.dtype != dtype or found.device != device:
            found = self._buffers[(key, shape)] = torch.empty(shape, dtype=dtype,
                                                              device=device)
        return found

    def rows(self, batch: int, device: torch.device) -> torch.Tensor:
        """The expert of each of ``batch`` input rows (repeated when the model expanded the
        batch, e.g. beam search), on ``device``."""
        key = (batch, str(device))
        found = self._rows.get(key)
        if found is None:
            e = self.experts
            if batch != self.batch:
                if batch % self.batch:
                    raise PolymergeError(f"channel runtime: a layer got {batch} rows but "
                                         f"experts were given for {self.batch}")
                e = e.repeat_interleave(batch // self.batch)
            found = self._rows[key] = e.to(device)
        return found

    def groups(self, batch: int, device: torch.device) -> list[tuple[int, torch.Tensor | None]]:
        """``(expert, rows)`` per expert present (rows None: every row)."""
        key = (batch, str(device))
        found = self._groups.get(key)
        if found is None:
            e = self.rows(batch, device).cpu()
            present = sorted(set(e.tolist()))
            if len(present) == 1:
                found = [(present[0], None)]
            else:
                found = [(x, (e == x).nonzero().flatten().to(device)) for x in present]
            self._groups[key] = found
        return found

    def selected(self, index: torch.Tensor, batch: int) -> torch.Tensor:
        """``index[expert of row]`` (batch, channels) as int64: each row's group per channel
        (cached per index tensor and batch size)."""
        key = (id(index), batch, str(index.device))
        found = self._selected.get(key)
        if found is None:
            found = self._selected[key] = index.index_select(
                0, self.rows(batch, index.device))
        return found


_CURRENT: ContextVar[Gather | None] = ContextVar("polymerge_gather", default=None)


@contextlib.contextmanager
def gathering(experts: torch.Tensor | Sequence[int] | None) -> Iterator[Gather | None]:
    """``with gathering(e): model(...)``: wrapped layers run row b with expert ``e[b]`` in this
    context (this thread) for the block; None: the working model's own weights."""
    g = None if experts is None else Gather(experts)
    token = _CURRENT.set(g)
    try:
        yield g
    finally:
        _CURRENT.reset(token)


def current_gather() -> Gather | None:
    return _CURRENT.get()


# ----------------------------------------------------------------------------- tensors


@dataclass
class Part:
    """How one tensor of a wrapped layer is held for the gather path: ``channel`` (``groups``
    (K, rows, ...) and ``index`` (N, rows)), ``expert`` (``per_expert``: one tensor per
    expert) or ``common`` (the module's own tensor)."""

    kind: str
    groups: torch.Tensor | None = None
    index: torch.Tensor | None = None
    per_expert: tuple[torch.Tensor, ...] = ()
    flat: torch.Tensor | None = None
    """(N, rows) int64: ``index * rows + row``, each expert's rows of ``groups`` flattened to
    (K * rows, ...) (built by :meth:`prepare`)."""

    def prepare(self) -> Part:
        """The precomputed indices (``index`` as int64 and ``flat``) of a channel part."""
        if self.kind == "channel" and self.groups is not None and self.index is not None:
            self.index = self.index.long()
            rows = self.index.shape[1]
            self.flat = self.index * rows + torch.arange(rows, device=self.index.device)
        return self

    @property
    def k(self) -> int:
        assert self.groups is not None
        return int(self.groups.shape[0])


COMMON = Part("common")



def _keep_out_of_tree(wrapper: nn.Module, inner: nn.Module) -> None:
    # The wrapped module computes outside a gathering block; it is kept out of the module tree
    # so that its parameters (the same objects, registered on the wrapper) keep their names.
    object.__setattr__(wrapper, "_inner", inner)


def _stack(part: Part) -> torch.Tensor | None:
    return torch.stack(list(part.per_expert)) if part.kind == "expert" else None


class GatherLayer(nn.Module):
    """Shared machinery of the wrapped layers."""

    _inner: nn.Module

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        _keep_out_of_tree(self, inner)

    def extra_repr(self) -> str:
        return type(self._inner).__name__


class GatherLinear(GatherLayer):
    """An ``nn.Linear`` (or GPT-2 ``Conv1D``) whose weight and bias may differ per row."""

    def __init__(self, inner: nn.Module, weight: Part, bias: Part) -> None:
        super().__init__(inner)
        self.transposed = type(inner).__name__ == "Conv1D"
        self.weight = inner.weight
        self.bias = inner.bias
        self.weight_part = weight
        self.bias_part = bias
        self.register_buffer("bias_stack", _stack(bias), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = current_gather()
        if g is None:
            return self._inner(x)
        squeeze = x.dim() == 1
        if squeeze:
            x = x.unsqueeze(0)
        b = x.shape[0]
        x3 = x.reshape(b, -1, x.shape[-1])
        part = self.weight_part
        if part.kind == "channel":
            y = self._channel(g, x3, part)
        elif part.kind == "expert":
            y = self._per_expert(g, x3, part)
        else:
            y = x3 @ self.weight if self.transposed else F.linear(x3, self.weight)
        if self.bias_stack is not None:
            y = y + self.bias_stack.index_select(0, g.rows(b, y.device)).unsqueeze(1)
        elif self.bias is not None:
            y = y + self.bias
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y.squeeze(0) if squeeze else y

    def _channel(self, g: Gather, x3: torch.Tensor, part: Part) -> torch.Tensor:
        assert part.groups is not None and part.index is not None
        b, length, width = x3.shape
        k = part.k
        groups = g.groups(b, x3.device)
        if part.flat is not None and materializes(k, b * length, len(groups)):
            return self._materialized(groups, x3, part)
        sel = g.selected(part.index, b)  # (B, channels): each row's group per channel
        if self.transposed:  # weight (in, out): the channels are the inputs
            mask = F.one_hot(sel, k).to(x3.dtype).transpose(1, 2)  # (B, K, in)
            xs = (x3.unsqueeze(2) * mask.unsqueeze(1)).reshape(b * length, k * width)
            out = xs @ part.groups.reshape(k * width, -1)
            return out.view(b, length, -1)
        n_out = part.groups.shape[1]
        x2 = x3.reshape(b * length, width)
        ys = g.buffer(id(part), (k, b * length, n_out), x3.dtype, x3.device)
        for j in range(k):  # K GEMMs of the plain layer's shape (one of K * out runs slower)
            torch.mm(x2, part.groups[j].T, out=ys[j])
        pick = sel.view(1, b, 1, n_out).expand(1, b, length, n_out)
        return ys.view(k, b, length, n_out).gather(0, pick).squeeze(0)

    def _materialized(self, groups: list[tuple[int, torch.Tensor | None]], x3: torch.Tensor,
                      part: Part) -> torch.Tensor:
        """Each expert's rows through its own weight, gathered from the stacked groups."""
        assert part.groups is not None and part.flat is not None
        stacked = part.groups.reshape(part.k * part.groups.shape[1], -1)
        out: torch.Tensor | None = None
        for e, rows in groups:
            w = stacked.index_select(0, part.flat[e])
            xs = x3 if rows is None else x3.index_select(0, rows)
            y = xs @ w if self.transposed else F.linear(xs, w)
            if rows is None:
                return y
            if out is None:
                out = y.new_empty((x3.shape[0], *y.shape[1:]))
            out.index_copy_(0, rows, y)
        assert out is not None
        return out

    def _per_expert(self, g: Gather, x3: torch.Tensor, part: Part) -> torch.Tensor:
        b = x3.shape[0]
        out: torch.Tensor | None = None
        for e, rows in g.groups(b, x3.device):
            w = part.per_expert[e]
            xs = x3 if rows is None else x3.index_select(0, rows)
            y = xs @ w if self.transposed else F.linear(xs, w)
            if rows is None:
                return y
            if out is None:
                out = y.new_empty((b, *y.shape[1:]))
            out.index_copy_(0, rows, y)
        assert out is not None
        return out


class GatherEmbedding(GatherLayer):
    """An ``nn.Embedding`` whose table may differ per row."""

    def __init__(self, inner: nn.Embedding, weight: Part) -> None:
        super().__init__(inner)
        if inner.max_norm is not None:
            raise PolymergeError("embeddings with max_norm are not gathered")
        self.weight = inner.weight
        self.weight_part = weight
        self.num_embeddings = inner.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        g = current_gather()
        if g is None or self.weight_part.kind == "common":
            return self._inner(ids)
        no_batch = ids.dim() == 1
        ids2 = ids.reshape(1, -1) if no_batch else ids.reshape(ids.shape[0], -1)
        if ids2.shape[0] == 1 and g.batch > 1:  # ids shared by every row (position ids)
            ids2 = ids2.expand(g.batch, ids2.shape[1])
        b = ids2.shape[0]
        part = self.weight_part
        if part.kind == "channel":
            assert part.groups is not None and part.index is not None
            sel = g.selected(part.index, b)  # (B, vocab)
            flat = part.groups.reshape(part.k * self.num_embeddings, -1)
            out = F.embedding(sel.gather(1, ids2) * self.num_embeddings + ids2, flat)
        else:
            out = None
            for e, rows in g.groups(b, ids2.device):
                sub = ids2 if rows is None else ids2.index_select(0, rows)
                y = F.embedding(sub, part.per_expert[e])
                if rows is None:
                    out = y
                    break
                if out is None:
                    out = y.new_empty((b, *y.shape[1:]))
                out.index_copy_(0, rows, y)
            assert out is not None
        if no_batch and b == 1:
            return out[0]
        if ids.dim() > 2:
            return out.reshape(*ids.shape, out.shape[-1])
        return out


class GatherNorm(GatherLayer):
    """A norm (LayerNorm, RMSNorm, ...) whose 1-D weight and bias may differ per row: rows are
    normalized by groups that share an expert, each with its expert's weight and bias."""

    def __init__(self, inner: nn.Module, parts: dict[str, Part]) -> None:
        super().__init__(inner)
        for name, p in inner.named_parameters(recurse=False):
            setattr(self, name, p)
        self.parts = parts
        self._views: dict[int, nn.Module] = {}

    def _view(self, e: int) -> nn.Module:
        """The norm with expert ``e``'s tensors: a shallow copy built once (the norm itself is
        left alone: the switch path runs it), never changed after."""
        view = self._views.get(e)
        if view is None:
            norm = self._inner
            view = copy.copy(norm)
            params = dict(norm._parameters)
            for name, part in self.parts.items():
                if part.kind == "expert":
                    params[name] = part.per_expert[e]  # type: ignore[assignment]
            object.__setattr__(view, "_parameters", params)
            view = self._views.setdefault(e, view)
        return view

    def _call(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self._view(e)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = current_gather()
        if g is None or x.dim() < 2:
            return self._inner(x)
        b = x.shape[0]
        out: torch.Tensor | None = None
        for e, rows in g.groups(b, x.device):
            if rows is None:
                return self._call(x, e)
            y = self._call(x.index_select(0, rows), e)
            if out is None:
                out = y.new_empty((b, *y.shape[1:]))
            out.index_copy_(0, rows, y)
        assert out is not None
        return out


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a norm layer whose only parameters are 1-D."""
    if isinstance(module, nn.LayerNorm):
        return True
    params = dict(module.named_parameters(recurse=False))
    return "Norm" in type(module).__name__ and bool(params) \
        and all(p.dim() == 1 for p in params.values())


def wrap(module: nn.Module, parts: dict[str, Part]) -> GatherLayer:
    """The gathering wrapper of ``module`` for its tensors' ``parts`` (by parameter name);
    raises :class:`PolymergeError` for a layer the gather path cannot run."""
    kind = type(module).__name__
    names = set(parts)
    if isinstance(module, nn.Linear) or kind == "Conv1D":
        if names <= {"weight", "bias"}:
            return GatherLinear(module, parts.get("weight", COMMON), parts.get("bias", COMMON))
    elif isinstance(module, nn.Embedding):
        if names <= {"weight"} and module.max_norm is None:
            return GatherEmbedding(module, parts.get("weight", COMMON))
    elif is_norm(module) and all(p.kind != "channel" for p in parts.values()):
        return GatherNorm(module, parts)
    raise PolymergeError(f"a {kind} holding per-expert tensors ({', '.join(sorted(names))})")


# ----------------------------------------------------------------------------- installing


GATHERED_KINDS = frozenset({"channel", "expert", "merged", "shared"})
"""Store tensor kinds the gather path knows (per-expert rows, per-expert tensors, common)."""


def _parts(store: Any, targets: dict[str, torch.Tensor]) -> dict[int, Part]:
    """Per model tensor (by data pointer) its :class:`Part`, for tensors that differ by expert."""
    from polymerge.stores import expert_part, piece_name

    n = len(store.experts)
    out: dict[int, Part] = {}
    for name, target in targets.items():
        entry = store.entries[name]
        if entry.kind == "channel":
            part = Part("channel", groups=store.pieces[piece_name(name, "groups")],
                        index=store.pieces[piece_name(name, "index")]).prepare()
        elif entry.kind == "expert":
            pieces = tuple(store.pieces[piece_name(name, expert_part(t))] for t in range(n))
            if not entry.dtype.is_floating_point \
                    or all(torch.equal(pieces[0], p) for p in pieces[1:]):
                continue  # the same for every expert: the working model's own is right
            part = Part("expert", per_expert=pieces)
        else:
            continue
        out[target.data_ptr()] = part
    return out


def install(model: nn.Module, store: Any) -> dict[str, GatherLayer]:
    """Wrap every layer of ``model`` (the working model, with an expert's weights written)
    holding a tensor that differs by expert; returns the wrappers by module path. Raises
    :class:`PolymergeError` naming what the gather path cannot run (nothing is changed then)."""
    unknown = sorted({e.kind for e in store.entries.values()} - GATHERED_KINDS)
    if unknown:
        raise PolymergeError(f"tensor kind(s) {', '.join(unknown)}")
    parts = _parts(store, store.targets(model))
    plan: list[tuple[str, nn.Module, dict[str, Part]]] = []
    covered: set[int] = set()
    for path, module in model.named_modules():
        if isinstance(module, GatherLayer):
            continue
        hits = {p: parts[t.data_ptr()] for p, t in module.named_parameters(recurse=False)
                if t.data_ptr() in parts}
        if hits:
            plan.append((path, module, hits))
            covered |= {t.data_ptr() for _, t in module.named_parameters(recurse=False)}
    missing = set(parts) - covered
    if missing:
        raise PolymergeError(f"{len(missing)} per-expert tensor(s) not held as a parameter")
    wrappers = {path: wrap(module, hits) for path, module, hits in plan}  # may raise
    for path, wrapper in wrappers.items():
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, wrapper)
    return wrappers


def model_costs(model: nn.Module, store: Any, wrappers: dict[str, GatherLayer]) -> Any:
    """The :class:`~.channel_cost.ModelCosts` of a model whose layers :func:`install` wrapped."""
    from polymerge.runtime.channel_cost import GATHER_SELECT, ModelCosts
    from polymerge.stores import piece_name

    linear = 0.0
    extra = 0.0
    elements = 0.0
    head_extra = 0.0
    head_elements = 0.0
    k = 1
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for module in model.modules():
        if isinstance(module, GatherLinear):
            n_in, n_out = ((module.weight.shape[0], module.weight.shape[1]) if module.transposed
                           else (module.weight.shape[1], module.weight.shape[0]))
            part = module.weight_part
            if part.kind == "channel":
                more = (part.k - 1) * n_in * n_out + GATHER_SELECT * part.k \
                    * (n_in if module.transposed else n_out)
                extra += more
                elements += n_in * n_out
                k = max(k, part.k)
                if module is head:
                    head_extra, head_elements = more, n_in * n_out
        elif isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            n_in, n_out = module.weight.shape[1], module.weight.shape[0]
        else:
            continue
        linear += n_in * n_out
    cfg = getattr(model, "config", None)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 0)
    calls = sum(1 for m in model.modules() if not any(True for _ in m.children()))
    looping = sum(1 for w in wrappers.values()
                  if any(p.kind == "expert" for p in _parts_of(w)))
    n = len(store.experts)
    written = torch.zeros(n + 1, n, dtype=torch.float64)
    for name, entry in store.entries.items():
        numel = float(torch.Size(entry.shape).numel())
        if entry.kind == "channel":
            index = store.pieces[piece_name(name, "index")].long().cpu()
            rows = index.shape[1]
            per_row = numel / rows
            changed = (index[:, None, :] != index[None, :, :]).sum(-1).double()  # (N, N)
            cost = torch.where(changed * 2 < rows, changed * per_row,
                               torch.full_like(changed, numel))
            written[:n] += torch.where(changed == 0, torch.zeros_like(cost), cost)
            written[n] += numel
        elif entry.kind == "expert":
            written[:n] += numel * (1 - torch.eye(n, dtype=torch.float64))
            written[n] += numel
        else:
            written[n] += numel
    return ModelCosts(linear_per_token=linear,
                      attention_per_token_and_position=2.0 * hidden * layers,
                      extra_per_token=extra, calls=calls, per_expert_modules=looping,
                      written=written, gathered=len(wrappers), channel_elements=elements, k=k,
                      head_elements=head_elements, head_extra=head_extra)


def _parts_of(wrapper: GatherLayer) -> list[Part]:
    if isinstance(wrapper, GatherLinear):
        return [wrapper.weight_part, wrapper.bias_part]
    if isinstance(wrapper, GatherEmbedding):
        return [wrapper.weight_part]
    if isinstance(wrapper, GatherNorm):
        return list(wrapper.parts.values())
    return []
