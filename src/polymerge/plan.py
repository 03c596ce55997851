"""Turn a recipe into a checked plan: every input opened, every problem found before any tensor.

Validation reads only headers and configs. It fails fast, naming the model and tensor at fault,
on missing paths, missing or extra tensors, shape and dtype mismatches, different architectures
or vocabularies, parameters out of range and too little free disk for the output.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymerge.errors import CheckpointError, RecipeError
from polymerge.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint, split_model_ref
from polymerge.io.dtypes import dtype_name, parse_dtype
from polymerge.io.heads import label_names, task_class
from polymerge.io.hf_files import tokenizer_source_dir
from polymerge.methods import builtin_methods
from polymerge.methods.schema import REQUIRED, MergeMethod, Param, Schema
from polymerge.recipe import (
    ModelEntry,
    Recipe,
    depth_position,
    layer_index,
    load_recipe,
    possible_values,
    resolve_first,
    resolve_value,
    warn_recipe,
)

ReadTensor = Callable[[Checkpoint, str], torch.Tensor]

_VOCAB_HINTS = ("embed", "lm_head", "wte", "word_embeddings", "output.weight")
# mergekit options that only change how it computes, not what: accepted and ignored.
IGNORED_MERGEKIT_PARAMS = frozenset({"int8_mask"})
_ARCH_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers",
              "intermediate_size", "num_attention_heads", "num_key_value_heads", "n_embd",
              "n_layer")


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where it comes from and the parameters it is merged with."""

    name: str
    out: TensorInfo
    merge: bool  # False: copied from the reference model (non-float buffers)
    shared: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, list[Any]] = field(default_factory=dict)
    reader: Callable[[ReadTensor], tuple[torch.Tensor | None, list[torch.Tensor]]] | None = None
    """Where the job's tensors come from when not from the plan's base and inputs under the
    job's name (slices, vocabulary alignment: :mod:`polymerge.layout`): called with the
    engine's checked read, it returns ``(base, inputs)``; a copied job's tensor is
    ``inputs[0]``."""

    @property
    def params(self) -> dict[str, Any]:
        return {**self.shared, **self.per_model}


@dataclass(frozen=True)
class HeadSpec:
    """One expert's task head: the tensors only it has (or whose shape differs across the
    experts), kept apart from the merge with the expert's config.

    Names are the expert's own (``classifier.weight``, ``bert.pooler.dense.weight``);
    ``prefix`` is the expert's backbone prefix and ``base_prefix`` the reference's, so the
    body tensor ``base_prefix + x`` is the expert's ``prefix + x``.
    """

    expert: str
    index: int
    checkpoint: Checkpoint
    prefix: str
    base_prefix: str
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None

    @property
    def architecture(self) -> str | None:
        return task_class(self.config)

    @property
    def labels(self) -> list[str]:
        return label_names(self.config)

    def expert_name(self, body: str) -> str:
        """The expert's own name of the body tensor ``body`` (a reference name)."""
        if body.startswith(self.base_prefix):
            return self.prefix + body[len(self.base_prefix):]
        return body

    def read(self, name: str) -> torch.Tensor:
        return self.checkpoint.read(name)

    def describe(self) -> str:
        labels = self.labels
        shown = ", ".join(labels[:6]) + (", ..." if len(labels) > 6 else "")
        tensors = ", ".join(f"{n} {list(i.shape)}" for n, i in self.tensors.items())
        return (f"{self.expert} ({self.architecture or 'no task class'}, {len(labels)} "
                f"label(s){': ' + shown if labels else ''}): {tensors}")


class BodyView:
    """An expert's body under the reference's names: what the engine and every method read.

    ``read(name)`` reads the expert's own tensor ``prefix + rest`` for the reference's
    ``base_prefix + rest``; head tensors are not listed.
    """

    def __init__(self, checkpoint: Checkpoint, body: Mapping[str, str],
                 infos: Mapping[str, TensorInfo]) -> None:
        self.checkpoint = checkpoint
        self.path = checkpoint.path
        self.label = checkpoint.label
        self._own = dict(body)  # reference name -> the expert's name
        self._infos = {n: TensorInfo(n, infos[n].shape, infos[n].dtype) for n in body}

    @property
    def config(self) -> dict[str, Any] | None:
        return self.checkpoint.config

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def read(self, name: str) -> torch.Tensor:
        try:
            own = self._own[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: no body tensor named {name!r}") from None
        return self.checkpoint.read(own)

    def close(self) -> None:
        self.checkpoint.close()


@dataclass
class MergePlan:
    """Everything the engine needs, already validated.

    With experts of task classes, ``jobs`` cover the body only; ``heads`` holds each expert's
    head (kept per expert, never merged) and ``dropped`` the reference's tensors no expert
    has (its own head, e.g. an LM head), which the output leaves out.
    """

    recipe: Recipe
    schema: Schema  # what the method accepts; its name is the recipe's merge_method
    reference: Checkpoint  # the base, or the first model when the method takes no base
    base: Checkpoint | None  # passed to the method as ``base`` (None for base_policy="input")
    inputs: list[Checkpoint]  # passed to the method as ``experts``
    input_names: list[str]
    jobs: list[TensorJob]
    out_dtype: torch.dtype
    heads: list[HeadSpec] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def has_heads(self) -> bool:
        return bool(self.heads)

    @property
    def readers(self) -> list[Checkpoint]:
        return ([self.base] if self.base is not None else []) + self.inputs

    @property
    def bytes_read(self) -> int:
        per_tensor = {n: i.nbytes for n, i in self.reference.tensors().items()}
        merged = sum(per_tensor[j.name] for j in self.jobs if j.merge)
        copied = sum(per_tensor[j.name] for j in self.jobs if not j.merge)
        return merged * len(self.readers) + copied

    @property
    def bytes_written(self) -> int:
        return sum(j.out.nbytes for j in self.jobs)

    @property
    def peak_bytes_estimate(self) -> int:
        """Two tensors in flight (one computed, one prefetched) of every input, in float32,
        plus the method's working copies (deltas stacked, masks) and the output."""
        if not self.jobs:
            return 0
        largest = max(j.out.numel for j in self.jobs)
        n = len(self.readers)
        return largest * 4 * (2 * n + 2 * n + 2)

    @property
    def head_bytes(self) -> int:
        return sum(i.nbytes for h in self.heads for i in h.tensors.values())

    def close(self) -> None:
        for reader in {id(r): r for r in [self.reference, *self.readers]}.values():
            reader.close()

    def summary(self) -> str:
        gib = 1024**3
        lines = [
            f"method: {self.schema.name}",
            f"reference model: {self.reference.path}",
            *(f"input {name}: {ckpt.path}" for name, ckpt in
              zip(self.input_names, self.inputs, strict=True)),
            f"tensors: {len(self.jobs)} ({sum(j.merge for j in self.jobs)} merged, "
            f"{sum(not j.merge for j in self.jobs)} copied)",
            f"parameters: {sum(j.out.numel for j in self.jobs):,}",
            f"output dtype: {dtype_name(self.out_dtype)}",
            f"read: {self.bytes_read / gib:.3f} GiB, write: {self.bytes_written / gib:.3f} GiB",
            f"estimated peak memory: {self.peak_bytes_estimate / gib:.3f} GiB",
        ]
        if self.heads:
            at = 2 + len(self.inputs)
            lines[at:at] = self._head_lines()
        return "\n".join(lines)

    def _head_lines(self) -> list[str]:
        mapped: dict[str, list[str]] = {}
        for h in self.heads:
            if h.prefix != h.base_prefix:
                key = f"{h.prefix or '(none)'} -> {h.base_prefix or '(none)'}"
                mapped.setdefault(key, []).append(h.expert)
        names = "; ".join(f"names {k} for {', '.join(v)}" for k, v in mapped.items())
        lines = [f"body: {len(self.jobs)} tensors shared with {self.reference.label}"
                 + (f" ({names})" if names else ""),
                 f"heads: {sum(len(h.tensors) for h in self.heads)} tensors kept per expert, "
                 "never merged"]
        lines += [f"  {h.describe()}" for h in self.heads]
        if self.dropped:
            shown = ", ".join(self.dropped[:4]) + (", ..." if len(self.dropped) > 4 else "")
            lines.append(f"left out: {len(self.dropped)} tensor(s) only {self.reference.label} "
                         f"has ({shown})")
        lines.append("output: an expert store with each expert's head (a static or learned "
                     "merge's body stored once, shared by every expert), served with routing")
        return lines


def build_plan(recipe_source: str | Path | dict[str, Any] | Recipe, schema: Schema, *,
               out_dir: str | Path | None = None, allow_pickle: bool = False,
               dtype: str | None = None) -> MergePlan:
    """Validate a recipe against its inputs and ``schema``; resolve every tensor's parameters.

    Every kind of method plans here: a store or a learned merge passes its own schema.
    """
    recipe = load_recipe(recipe_source)
    method = schema
    if out_dir is not None:
        check_output_not_input(Path(out_dir), recipe)
    entries = _method_inputs(recipe, method)
    _check_parameters(recipe, method, entries)

    base = None
    if recipe.base_model is not None:
        base = open_checkpoint(recipe.base_model, allow_pickle=allow_pickle, label="base_model")
    inputs = [open_checkpoint(e.model, allow_pickle=allow_pickle, label=e.display_name,
                              base=base) for e in entries]
    reference = base if base is not None else inputs[0]
    _check_configs(reference, inputs)
    infos, inputs, heads, dropped = split_heads(
        reference, inputs, [e.display_name for e in entries])

    out_dtype = parse_dtype(dtype or recipe.output_dtype_name) if (
        dtype or recipe.output_dtype_name) else _dominant_dtype(infos)
    num_layers = _num_layers(reference.config) or _num_layers_from_names(infos)
    jobs = [_job(name, info, recipe, method, entries, out_dtype, num_layers)
            for name, info in infos.items()]
    _check_job_params(method, jobs)
    if recipe.tokenizer_source not in (None, "base"):
        tokenizer_source_dir(recipe.tokenizer_source, reference.path)
    plan = MergePlan(recipe, method, reference,
                     base if method.base_policy != "input" else None,
                     inputs, [e.display_name for e in entries], jobs, out_dtype, heads,
                     dropped)
    if out_dir is not None:
        check_free_disk(Path(out_dir), plan.bytes_written + plan.head_bytes)
    return plan


def _method_inputs(recipe: Recipe, method: Schema) -> list[ModelEntry]:
    if method.base_policy == "required" and recipe.base_model is None:
        raise RecipeError(f"merge_method {method.name} needs a base_model")
    separate_base = method.base_policy == "required" or (
        method.base_policy == "optional" and recipe.base_model is not None)
    entries = recipe.experts() if separate_base else list(recipe.models)
    n = len(entries)
    what = "models other than the base" if separate_base else "models"
    if n < method.min_experts:
        raise RecipeError(f"merge_method {method.name} needs at least {method.min_experts} "
                          f"{what}, the recipe lists {n}")
    if method.max_experts is not None and n > method.max_experts:
        raise RecipeError(f"merge_method {method.name} takes at most {method.max_experts} "
                          f"{what}, the recipe lists {n}")
    return entries


def _any_method_params() -> frozenset[str]:
    return frozenset(p.name for m in builtin_methods() for p in m.params)


def check_parameter_names(method: Schema, where: str, params: Mapping[str, Any], *,
                          per_model: bool) -> None:
    """Refuse a parameter no merge method has (a typo such as ``densty``); for a static
    (mergekit) method, warn on one line about one mergekit accepts and the method ignores
    (``weight`` with ``slerp``, a shared parameter such as ``t`` set per model): mergekit
    ignores those silently. Stores and learned merges (not mergekit's) refuse both."""
    lenient = isinstance(method, MergeMethod)
    for key in params:
        if key in IGNORED_MERGEKIT_PARAMS and (lenient or not per_model):
            continue
        if key in method.param_names:
            if per_model and method.param(key).scope == "shared":
                if not lenient:
                    raise RecipeError(f"{where}: parameter {key!r} applies to the whole merge; "
                                      "set it under the top-level parameters")
                warn_recipe(f"{where}: {method.name} ignores parameter {key!r} set per model "
                            "(it applies to the whole merge; set it under the top-level "
                            "parameters)")
            continue
        if lenient and key in _any_method_params():
            warn_recipe(f"{where}: {method.name} ignores parameter {key!r} (a parameter of "
                        "other merge methods; mergekit ignores it too)")
            continue
        raise RecipeError(f"{where}: {method.name} has no parameter {key!r}; it takes "
                          f"{', '.join(sorted(method.param_names)) or 'none'}")


def _check_parameters(recipe: Recipe, method: Schema, entries: list[ModelEntry]) -> None:
    check_parameter_names(method, "parameters", recipe.parameters, per_model=False)
    for entry in recipe.models:
        check_parameter_names(method, f"model {entry.display_name}", entry.parameters,
                              per_model=True)
    for param in method.params:
        if param.scope == "shared":
            _check_values(param, recipe.parameters.get(param.name), "parameters")
            continue
        for entry in entries:
            value = entry.parameters.get(param.name, recipe.parameters.get(param.name))
            _check_values(param, value, f"model {entry.display_name}")


def _check_values(param: Param, value: Any, where: str) -> None:
    if value is None:
        if param.required:
            raise RecipeError(f"{where}: parameter {param.name!r} is required")
        return
    for item in possible_values(value):
        param.check(item, where)


def _check_configs(reference: Checkpoint, inputs: list[Checkpoint]) -> None:
    ref_cfg = reference.config or {}
    for ckpt in inputs:
        cfg = ckpt.config
        if cfg is None or not ref_cfg:
            continue
        # A task class (XForSequenceClassification...) of the base's backbone: its head is
        # kept apart, so only the backbone's shape must match, not the class.
        keys = _ARCH_KEYS[1:] if task_class(cfg) else _ARCH_KEYS
        for key in keys:
            if key in ref_cfg and key in cfg and ref_cfg[key] != cfg[key]:
                raise CheckpointError(f"model {ckpt.label}: {key} is {cfg[key]!r} but "
                                      f"{reference.label} has {ref_cfg[key]!r}: different "
                                      "architectures cannot be merged")
        if ref_cfg.get("vocab_size") != cfg.get("vocab_size"):
            raise CheckpointError(
                f"model {ckpt.label}: vocabulary size {cfg.get('vocab_size')} differs from "
                f"{reference.label}'s {ref_cfg.get('vocab_size')}; merging embeddings of "
                "different vocabularies would silently misalign tokens: add a tokenizer "
                "section (tokenizer: {source: union}) to merge the vocabularies")


def _check_tensors(reference: Checkpoint, inputs: list[Checkpoint]) -> dict[str, TensorInfo]:
    ref = reference.tensors()
    if not ref:
        raise CheckpointError(f"{reference.label}: no tensors")
    for ckpt in inputs:
        if ckpt is reference:
            continue
        infos = ckpt.tensors()
        missing = [n for n in ref if n not in infos]
        if missing:
            raise CheckpointError(f"model {ckpt.label}: tensor {missing[0]!r} is missing "
                                  f"({len(missing)} missing in all)")
        extra = [n for n in infos if n not in ref]
        if extra:
            raise CheckpointError(f"model {ckpt.label}: tensor {extra[0]!r} is not in "
                                  f"{reference.label} ({len(extra)} extra in all)")
        for name, info in ref.items():
            other = infos[name]
            if other.shape != info.shape:
                _shape_error(ckpt, name, other, reference, info)
            if other.dtype != info.dtype:
                raise CheckpointError(f"model {ckpt.label}: tensor {name!r} is "
                                      f"{dtype_name(other.dtype)}, {reference.label} has "
                                      f"{dtype_name(info.dtype)}; convert the inputs to one "
                                      "dtype first")
    return ref


# ----------------------------------------------------------------------------- heads


def _first(name: str) -> str:
    return name.split(".", 1)[0] + "." if "." in name else ""


def _candidates(names: Iterable[str], limit: int = 8) -> list[str]:
    """Backbone prefix candidates of a name set: none, and the most common first components."""
    counts = Counter(_first(n) for n in names)
    counts.pop("", None)
    return [""] + [p for p, _ in counts.most_common(limit)]


def prefix_pair(own: Iterable[str], base: Iterable[str]) -> tuple[str, str]:
    """``(prefix, base_prefix)`` mapping an expert's names onto the reference's: the pair of
    backbone prefixes (``bert.`` and none, for a ``BertForSequenceClassification`` expert of a
    ``BertModel`` base) under which most names coincide; the identity on a tie."""
    own, base_set = list(own), set(base)
    best, best_overlap = ("", ""), len(set(own) & base_set)
    for pe in _candidates(own):
        for pb in _candidates(base_set):
            if (pe, pb) == ("", "") or (pe and pb and pe != pb):
                continue
            overlap = len({pb + n[len(pe):] for n in own if n.startswith(pe)} & base_set)
            if overlap > best_overlap:
                best, best_overlap = (pe, pb), overlap
    return best


def _backbone(names: Iterable[str], prefix: str) -> str:
    """The backbone prefix of a task-class expert: its mapping prefix, else the first
    component most of its names share (``bert.``, ``model.``, ``transformer.``)."""
    if prefix:
        return prefix
    counts = Counter(_first(n) for n in names)
    total = sum(counts.values())
    top, n = counts.most_common(1)[0] if counts else ("", 0)
    return top if top and len(counts) > 1 and n * 2 >= total else ""


def split_heads(reference: Checkpoint, inputs: list[Checkpoint], names: list[str]
                ) -> tuple[dict[str, TensorInfo], list[Checkpoint], list[HeadSpec], list[str]]:
    """Classify every tensor as body or head, from headers and configs alone.

    Experts whose config names no task class must match the reference exactly (every tensor,
    shape and dtype). For an expert of a task class (``...ForSequenceClassification``...):
    its names are mapped onto the reference's (``bert.x`` onto ``x`` for a bare base); a
    tensor the reference lacks, or one outside the backbone whose shape differs across the
    experts, is the expert's head; a tensor of the reference that no expert's backbone has
    (the reference's own head: ``lm_head``, ``cls.predictions``, an unused pooler) is left
    out. Returns the body's infos (reference names), the inputs as body views, the heads and
    the left-out names.
    """
    ref = reference.tensors()
    if not ref:
        raise CheckpointError(f"{reference.label}: no tensors")
    tasks = [task_class(c.config) for c in inputs]
    if not any(tasks):
        return _check_tensors(reference, inputs), inputs, [], []
    own = [c.tensors() for c in inputs]
    mapping: list[tuple[str, str]] = []
    keyed: list[dict[str, tuple[str, TensorInfo, bool]]] = []  # key -> (own, info, outside)
    for i, ckpt in enumerate(inputs):
        pe, pb = ("", "") if ckpt is reference else prefix_pair(own[i], ref)
        mapping.append((pe, pb))
        backbone = _backbone(own[i], pe) if tasks[i] else ""
        table: dict[str, tuple[str, TensorInfo, bool]] = {}
        for name, info in own[i].items():
            key = pb + name[len(pe):] if name.startswith(pe) else name
            outside = bool(backbone) and not name.startswith(backbone)
            table[key] = (name, info, outside)
        keyed.append(table)
    roots = {_root(k, pb) for t, (_, pb) in zip(keyed, mapping, strict=True) for k in t}
    body: dict[str, TensorInfo] = {}
    head_names: list[dict[str, TensorInfo]] = [{} for _ in inputs]
    dropped: list[str] = []
    keys = list(ref) + [k for t in keyed for k in t if k not in ref]
    for key in dict.fromkeys(keys):
        base_info = ref.get(key)
        have = [i for i, t in enumerate(keyed) if key in t]
        shapes = {keyed[i][key][1].shape for i in have}
        if base_info is None:
            for i in have:
                if not tasks[i]:
                    raise CheckpointError(
                        f"model {inputs[i].label}: tensor {keyed[i][key][0]!r} is not in "
                        f"{reference.label} (an extra tensor; experts of a task class such as "
                        "...ForSequenceClassification keep such tensors as their head)")
                head_names[i][keyed[i][key][0]] = keyed[i][key][1]
            continue
        if not have:
            # The reference's own head (a module no expert has any tensor of) is left out.
            if all(tasks) and _root(key, mapping[0][1]) not in roots:
                dropped.append(key)
                continue
            raise CheckpointError(f"model {inputs[0].label}: tensor "
                                  f"{_own_name(key, mapping[0])!r} is missing")
        odd = [i for i in have if keyed[i][key][1].shape != base_info.shape]
        outside = [i for i in have if keyed[i][key][2] and tasks[i]]
        if odd or len(have) < len(inputs):
            if set(have) <= set(outside) and (len(shapes) > 1 or len(have) < len(inputs)):
                for i in have:  # task-specific: a per-expert head
                    head_names[i][keyed[i][key][0]] = keyed[i][key][1]
                continue
            if odd and set(odd) <= set(outside):
                i = odd[0]
                raise CheckpointError(
                    f"model {inputs[i].label}: head tensor {keyed[i][key][0]!r} has shape "
                    f"{list(keyed[i][key][1].shape)} in every expert, but {reference.label} "
                    f"has {list(base_info.shape)}: a head name present in the base with "
                    "another shape cannot be merged with it, and the experts agree, so it is "
                    "no per-expert head; use a base without that head (XModel or "
                    "XForMaskedLM) or one with the experts' shape")
            if odd:
                i = odd[0]
                _shape_error(inputs[i], keyed[i][key][0], keyed[i][key][1], reference,
                             base_info)
            missing = next(i for i in range(len(inputs)) if key not in keyed[i])
            raise CheckpointError(f"model {inputs[missing].label}: tensor "
                                  f"{_own_name(key, mapping[missing])!r} is missing")
        for i in have:
            other = keyed[i][key][1]
            if other.dtype != base_info.dtype:
                raise CheckpointError(f"model {inputs[i].label}: tensor {keyed[i][key][0]!r} "
                                      f"is {dtype_name(other.dtype)}, {reference.label} has "
                                      f"{dtype_name(base_info.dtype)}; convert the inputs to "
                                      "one dtype first")
        body[key] = base_info
    views: list[Checkpoint] = []
    heads: list[HeadSpec] = []
    for i, ckpt in enumerate(inputs):
        pe, pb = mapping[i]
        own_of = {k: keyed[i][k][0] for k in body}
        if ckpt is reference or (not head_names[i] and all(k == v for k, v in own_of.items())
                                 and len(own_of) == len(own[i])):
            views.append(ckpt)
        else:
            views.append(BodyView(ckpt, own_of, ref))
        if tasks[i] or head_names[i]:
            heads.append(HeadSpec(names[i], i, ckpt, pe, pb, head_names[i], ckpt.config))
    if not any(h.tensors for h in heads):
        heads = []
    elif not body:
        raise CheckpointError(f"the experts share no tensor with {reference.label}: nothing "
                              "to merge")
    return body, views, heads, dropped


def _root(key: str, prefix: str) -> str:
    """The top module of a reference name below the backbone prefix (``pooler``, ``lm_head``)."""
    rest = key[len(prefix):] if prefix and key.startswith(prefix) else key
    return rest.split(".", 1)[0]


def _own_name(key: str, mapping: tuple[str, str]) -> str:
    pe, pb = mapping
    return pe + key[len(pb):] if key.startswith(pb) else key


def _shape_error(ckpt: Checkpoint, name: str, other: TensorInfo, reference: Checkpoint,
                 info: TensorInfo) -> None:
    if any(h in name for h in _VOCAB_HINTS) and other.shape[1:] == info.shape[1:]:
        raise CheckpointError(
            f"model {ckpt.label}: tensor {name!r} has {other.shape[0]} vocabulary "
            f"rows, {reference.label} has {info.shape[0]}: different vocabularies "
            "cannot be merged")
    raise CheckpointError(f"model {ckpt.label}: tensor {name!r} has shape "
                          f"{list(other.shape)}, {reference.label} has "
                          f"{list(info.shape)}")


def _dominant_dtype(infos: dict[str, TensorInfo]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for info in infos.values():
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _num_layers(config: dict[str, Any] | None) -> int | None:
    if not config:
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def _num_layers_from_names(infos: dict[str, TensorInfo]) -> int | None:
    """Depth from tensor names, for bare safetensors files that come without a config."""
    indices = [i for i in map(layer_index, infos) if i is not None]
    return max(indices) + 1 if indices else None


def _check_job_params(method: Schema, jobs: list[TensorJob]) -> None:
    if method.check_params is None:
        return
    for job in jobs:
        if not job.merge:
            continue
        try:
            method.check_params(job.params)
        except RecipeError as exc:
            raise RecipeError(f"tensor {job.name!r}: {exc}") from None


def _job(name: str, info: TensorInfo, recipe: Recipe, method: Schema,
         entries: list[ModelEntry], out_dtype: torch.dtype, num_layers: int | None) -> TensorJob:
    if not info.dtype.is_floating_point:
        return TensorJob(name, info, merge=False)
    position = depth_position(name, num_layers)
    shared: dict[str, Any] = {}
    per_model: dict[str, list[Any]] = {}
    for param in method.params:
        if param.scope == "shared":
            value = recipe.parameters.get(param.name)
            resolved = None if value is None else resolve_value(value, name, position)
            shared[param.name] = param.default if resolved is None else resolved
            if shared[param.name] is REQUIRED:
                raise RecipeError(f"parameter {param.name!r} has no value for tensor {name!r}")
            continue
        values = []
        for entry in entries:
            resolved = resolve_first([entry.parameters.get(param.name),
                                      recipe.parameters.get(param.name)], name, position)
            if resolved is None:
                if param.required:
                    raise RecipeError(f"model {entry.display_name}: parameter {param.name!r} "
                                      f"has no value for tensor {name!r} (no filter matches)")
                resolved = param.default
            values.append(resolved)
        per_model[param.name] = values
    return TensorJob(name, TensorInfo(name, info.shape, out_dtype), merge=True,
                     shared=shared, per_model=per_model)


def check_output_not_input(out_dir: Path, recipe: Recipe) -> None:
    """The output may not be, contain or sit inside an input: --force would destroy it."""
    out = out_dir.expanduser().resolve()
    paths = recipe.referenced_models()
    if recipe.tokenizer_source not in (None, "base", "union"):
        paths.append(recipe.tokenizer_source)
    if recipe.tokenizer is not None and recipe.tokenizer.source not in ("base", "union"):
        paths.append(recipe.tokenizer.source)
    for raw in [part for p in paths for part in split_model_ref(p) if part is not None]:
        path = Path(raw).expanduser().resolve()
        if out == path or out in path.parents or path in out.parents:
            raise RecipeError(f"output {out_dir} overlaps input {raw}; choose another output "
                              "folder (inputs are never modified)")


def check_free_disk(out_dir: Path, needed: int) -> None:
    """Stop before any tensor is read when the output would not fit."""
    probe = out_dir.expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * 1.05:
        raise CheckpointError(f"not enough free disk for the output: {needed / 1e9:.2f} GB "
                              f"needed, {free / 1e9:.2f} GB free at {probe}")
