"""Plans for recipes whose output is laid out differently from their inputs: ``slices`` (layer
ranges of models stacked into the output, mergekit's frankenmerges and gradient merges) and
vocabulary alignment (a ``tokenizer:`` section or ``tokenizer_source``). Like
:func:`polymerge.plan.build_plan`, everything is validated from headers and configs before any
tensor is read; each job carries a reader that says which tensor of which model it reads.

The rules are mergekit 0.1.5's:

* a plain ``models:`` recipe is one slice whose sources are the models over all their layers
  (plus the base, for a method that takes one);
* the sources of a slice must have the same number of layers; a ``layer_range`` beyond a model's
  layers is an error naming the model and its depth;
* within a slice of ``n`` layers, layer ``k`` is merged at ``t = k / (n - 1)`` (1 when
  ``n = 1``): a gradient restarts in every slice; output layers are numbered consecutively and
  the output config's layer count is their total;
* tensors outside the blocks are merged at ``t = 0``: those before the blocks (embeddings) from
  the first slice's sources with its parameters, those after (final norm, LM head) from the last
  slice's;
* a parameter is looked up in the source's ``parameters`` (per-model parameters), then the
  slice's, then the recipe's; a filter list that matches nothing falls through to the next;
* the method's base in a slice is the slice's ``base_model`` (else the recipe's), which must be
  one of the slice's sources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymerge.errors import CheckpointError, RecipeError
from polymerge.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint, read_model_config
from polymerge.io.checkpoint import split_model_ref as _split
from polymerge.io.dtypes import dtype_name, parse_dtype
from polymerge.layout.vocab import Vocabulary, build_vocabulary, canonical
from polymerge.methods.schema import REQUIRED, Schema
from polymerge.plan import (
    MergePlan,
    ReadTensor,
    TensorJob,
    check_free_disk,
    check_output_not_input,
    check_parameter_names,
)
from polymerge.recipe import (
    ParamValue,
    Recipe,
    is_before_layers,
    load_recipe,
    resolve_first,
    split_layer_name,
    warn_recipe,
)

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
VOCAB_HINTS = ("embed", "lm_head", "wte", "word_embeddings", "output")


# ----------------------------------------------------------------------------- when


def aligns_vocabulary(recipe: Recipe) -> bool:
    """Whether the output's vocabulary is built (and every model's rows aligned to it)."""
    return recipe.tokenizer is not None or recipe.tokenizer_source is not None


def needs_layout(recipe: Recipe) -> bool:
    """Whether the recipe needs this planner: slices, a tokenizer section, ``tokenizer_source:
    union``, or a ``tokenizer_source`` over models whose vocabulary sizes differ."""
    if recipe.slices or recipe.tokenizer is not None or recipe.tokenizer_source == "union":
        return True
    if recipe.tokenizer_source is None:
        return False
    sizes = set()
    for path in recipe.referenced_models():
        model, _ = _split(path)
        try:
            config = read_model_config(Path(model).expanduser())
        except CheckpointError:
            config = None
        if config and isinstance(config.get("vocab_size"), int):
            sizes.add(config["vocab_size"])
    return len(sizes) > 1


# ----------------------------------------------------------------------------- the plan


@dataclass
class LayoutPlan(MergePlan):
    """A :class:`~polymerge.plan.MergePlan` whose jobs read through their own readers, with the
    output's config (layer count, vocabulary size) and vocabulary."""

    out_config: dict[str, Any] | None = None
    vocabulary: Vocabulary | None = None
    layout: list[str] = field(default_factory=list)
    input_bytes: int = 0
    checkpoints: list[Checkpoint] = field(default_factory=list)

    @property
    def bytes_read(self) -> int:
        return self.input_bytes

    def close(self) -> None:
        for ckpt in self.checkpoints:
            ckpt.close()

    def summary(self) -> str:
        lines = super().summary().splitlines()
        return "\n".join(lines[:4] + self.layout + lines[4:])


@dataclass
class _Source:
    key: str
    path: str
    label: str
    start: int
    end: int | None  # None: every layer of the model (a plain models: recipe)
    parameters: dict[str, ParamValue]


@dataclass
class _Slice:
    label: str
    sources: list[_Source]
    base_path: str | None
    parameters: dict[str, ParamValue]
    base: _Source | None = None
    inputs: list[_Source] = field(default_factory=list)

    @property
    def length(self) -> int:
        first = self.sources[0]
        assert first.end is not None
        return first.end - first.start


class _Reader:
    """A job's reads: the base's and the inputs' tensors (each its own name), optionally
    passed through the vocabulary alignment."""

    def __init__(self, base: tuple[Checkpoint, str] | None, inputs: list[tuple[Checkpoint, str]],
                 align: Callable[[list[str], list[torch.Tensor]], list[torch.Tensor]] | None
                 = None, keys: list[str] | None = None) -> None:
        self.base = base
        self.inputs = inputs
        self.align = align
        self.keys = keys or []

    def __call__(self, read: ReadTensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        base = read(*self.base) if self.base is not None else None
        inputs = [read(ckpt, name) for ckpt, name in self.inputs]
        if self.align is None:
            return base, inputs
        aligned = self.align(self.keys, ([base] if base is not None else []) + inputs)
        if base is not None:
            return aligned[0], aligned[1:]
        return None, aligned


def build_layout_plan(recipe_source: str | Path | dict[str, Any] | Recipe, schema: Schema, *,
                      out_dir: str | Path | None = None, allow_pickle: bool = False,
                      dtype: str | None = None) -> LayoutPlan:
    """Validate a slices / vocabulary recipe against its inputs; one job per output tensor."""
    recipe = load_recipe(recipe_source)
    if out_dir is not None:
        check_output_not_input(Path(out_dir), recipe)
    _check_names(recipe, schema)
    slices = _slices(recipe, schema)
    opened: dict[str, Checkpoint] = {}
    try:
        plan = _Planner(recipe, schema, slices, opened, allow_pickle).plan(dtype)
    except BaseException:
        for ckpt in opened.values():
            ckpt.close()
        raise
    if out_dir is not None:
        check_free_disk(Path(out_dir), plan.bytes_written)
    return plan


def _check_names(recipe: Recipe, schema: Schema) -> None:
    check_parameter_names(schema, "parameters", recipe.parameters, per_model=False)
    for entry in recipe.models:
        check_parameter_names(schema, f"model {entry.display_name}", entry.parameters,
                              per_model=True)
    for i, piece in enumerate(recipe.slices or []):
        check_parameter_names(schema, f"slice {i}", piece.parameters, per_model=False)
        for src in piece.sources:
            check_parameter_names(schema, f"slice {i} source {src.display_name}",
                                  src.parameters, per_model=True)
        if piece.residual_weight is not None:
            warn_recipe(f"slice {i}: residual_weight is ignored (mergekit ignores it too)")


def _slices(recipe: Recipe, schema: Schema) -> list[_Slice]:
    if recipe.slices:
        return [_Slice(f"slice {i}",
                       [_Source(canonical(s.model), s.model, s.display_name, s.layer_range[0],
                                s.layer_range[1], dict(s.parameters)) for s in piece.sources],
                       piece.base_model or recipe.base_model, dict(piece.parameters))
                for i, piece in enumerate(recipe.slices)]
    if not recipe.models:
        raise RecipeError("the recipe lists no models and no slices")
    sources = [_Source(canonical(m.model), m.model, m.display_name, 0, None,
                       dict(m.parameters)) for m in recipe.models]
    takes_base = schema.base_policy == "required" or (
        schema.base_policy == "optional" and recipe.base_model is not None)
    if takes_base and recipe.base_model is not None and \
            canonical(recipe.base_model) not in {s.key for s in sources}:
        sources.append(_Source(canonical(recipe.base_model), recipe.base_model, "base_model", 0,
                               None, {}))
    return [_Slice("the models", sources, recipe.base_model, {})]


class _Planner:
    def __init__(self, recipe: Recipe, schema: Schema, slices: list[_Slice],
                 opened: dict[str, Checkpoint], allow_pickle: bool) -> None:
        self.recipe = recipe
        self.schema = schema
        self.slices = slices
        self.opened = opened
        self.allow_pickle = allow_pickle
        self.infos: dict[str, dict[str, TensorInfo]] = {}
        self.layers: dict[str, dict[int, dict[tuple[str, str], str]]] = {}
        self.bytes = 0
        self.out_dtype = torch.float32

    # -- inputs
    def open(self) -> Checkpoint | None:
        base = None
        if self.recipe.base_model is not None:
            key = canonical(self.recipe.base_model)
            base = open_checkpoint(self.recipe.base_model, allow_pickle=self.allow_pickle,
                                   label="base_model")
            self.opened[key] = base
        for piece in self.slices:
            for src in piece.sources:
                if src.key not in self.opened:
                    self.opened[src.key] = open_checkpoint(
                        src.path, allow_pickle=self.allow_pickle, label=src.label, base=base)
        for key, ckpt in self.opened.items():
            infos = ckpt.tensors()
            self.infos[key] = infos
            per_layer: dict[int, dict[tuple[str, str], str]] = {}
            for name in infos:
                parts = split_layer_name(name)
                if parts is not None:
                    prefix, index, suffix = parts
                    per_layer.setdefault(index, {})[(prefix, suffix)] = name
            self.layers[key] = per_layer
        return base

    def depth(self, key: str) -> int:
        config = self.opened[key].config or {}
        for k in LAYER_KEYS:
            if isinstance(config.get(k), int):
                return int(config[k])
        return max(self.layers[key]) + 1 if self.layers[key] else 0

    def check_slices(self) -> None:
        policy = self.schema.base_policy
        for piece in self.slices:
            for src in piece.sources:
                depth = self.depth(src.key)
                if src.end is None:
                    src.end = depth
                    if depth == 0:
                        raise CheckpointError(f"model {src.label}: no transformer layers found "
                                              "(no layer count in its config.json and no "
                                              "layers.N. in its tensor names)")
                elif src.end > depth:
                    raise RecipeError(
                        f"{piece.label} source {src.label}: layer_range [{src.start}, "
                        f"{src.end}] is out of bounds: {src.path} has {depth} layers "
                        f"(a range ends at most at {depth})")
            lengths = [s.end - s.start for s in piece.sources if s.end is not None]
            if len(set(lengths)) > 1:
                raise RecipeError(f"{piece.label}: its sources have {lengths} layers; every "
                                  "source of a slice must have the same number of layers "
                                  "(mergekit requires it too)")
            separate = policy == "required" or (policy == "optional" and
                                                piece.base_path is not None)
            if policy == "required" and piece.base_path is None:
                raise RecipeError(f"merge_method {self.schema.name} needs a base_model")
            if separate:
                assert piece.base_path is not None
                key = canonical(piece.base_path)
                found = [s for s in piece.sources if s.key == key]
                if not found:
                    raise RecipeError(f"{piece.label}: its base_model {piece.base_path} is not "
                                      f"among its sources; {self.schema.name} merges each "
                                      "slice against its base's layers, so list the base with "
                                      "a layer_range")
                piece.base = found[0]
                piece.inputs = [s for s in piece.sources if s.key != key]
            else:
                piece.inputs = list(piece.sources)
            n = len(piece.inputs)
            what = "models other than the base" if separate else "models"
            if n < self.schema.min_experts:
                raise RecipeError(f"{piece.label}: merge_method {self.schema.name} needs at "
                                  f"least {self.schema.min_experts} {what}, it has {n}")
            if self.schema.max_experts is not None and n > self.schema.max_experts:
                raise RecipeError(f"{piece.label}: merge_method {self.schema.name} takes at "
                                  f"most {self.schema.max_experts} {what}, it has {n}")

    # -- parameters
    def params(self, piece: _Slice, out_name: str, in_names: list[str], t: float
               ) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        shared: dict[str, Any] = {}
        per_model: dict[str, list[Any]] = {}
        for param in self.schema.params:
            if param.scope == "shared":
                value = resolve_first([piece.parameters.get(param.name),
                                       self.recipe.parameters.get(param.name)], out_name, t)
                shared[param.name] = self._value(param, value, out_name, "parameters")
                continue
            values = []
            for src, name in zip(piece.inputs, in_names, strict=True):
                own = [s.parameters.get(param.name) for s in piece.sources if s.key == src.key]
                value = resolve_first([*own, piece.parameters.get(param.name),
                                       self.recipe.parameters.get(param.name)], name, t)
                values.append(self._value(param, value, name, f"{piece.label} model "
                                                              f"{src.label}"))
            per_model[param.name] = values
        return shared, per_model

    @staticmethod
    def _value(param: Any, value: Any, tensor: str, where: str) -> Any:
        if value is None:
            if param.default is REQUIRED:
                raise RecipeError(f"{where}: parameter {param.name!r} has no value for tensor "
                                  f"{tensor!r}")
            return param.default
        return param.check(value, where)

    # -- jobs
    def job(self, piece: _Slice, out_name: str, reads: list[tuple[_Source, str]], t: float,
            vocabulary: Vocabulary | None, reference: TensorInfo | None) -> TensorJob:
        infos = [self.infos[src.key].get(name) for src, name in reads]
        for (src, name), info in zip(reads, infos, strict=True):
            if info is None:
                raise CheckpointError(f"model {src.label}: tensor {name!r} is missing (needed "
                                      f"for output tensor {out_name!r} of {piece.label})")
        first = reference or infos[0]
        assert first is not None
        vocab_rows = vocabulary is not None and self.is_vocab(out_name, reads)
        for (src, name), info in zip(reads, infos, strict=True):
            assert info is not None
            same = info.shape[1:] == first.shape[1:] if vocab_rows else info.shape == first.shape
            if not same:
                raise CheckpointError(f"model {src.label}: tensor {name!r} has shape "
                                      f"{list(info.shape)}, but {out_name!r} is "
                                      f"{list(first.shape)} in {reads[0][0].label}")
            if info.dtype != first.dtype:
                raise CheckpointError(f"model {src.label}: tensor {name!r} is "
                                      f"{dtype_name(info.dtype)}, {reads[0][0].label} has "
                                      f"{dtype_name(first.dtype)}; convert the inputs to one "
                                      "dtype first")
            self.bytes += info.nbytes
        shape = first.shape
        if vocab_rows:
            assert vocabulary is not None
            shape = (vocabulary.size, *first.shape[1:])
            vocabulary.check([src.key for src, _ in reads], f"{piece.label} ({out_name})")
        ckpts = [(self.opened[src.key], name) for src, name in reads]
        has_base = piece.base is not None
        if not first.dtype.is_floating_point:
            return TensorJob(out_name, TensorInfo(out_name, shape, first.dtype), merge=False,
                             reader=_Reader(None, ckpts[:1]))
        shared, per_model = self.params(piece, out_name,
                                        [n for _, n in reads[1 if has_base else 0:]], t)
        reader = _Reader(ckpts[0] if has_base else None, ckpts[1 if has_base else 0:],
                         vocabulary.align if vocab_rows and vocabulary is not None else None,
                         [src.key for src, _ in reads])
        job = TensorJob(out_name, TensorInfo(out_name, shape, self.out_dtype), merge=True,
                        shared=shared, per_model=per_model, reader=reader)
        if self.schema.check_params is not None:
            try:
                self.schema.check_params(job.params)
            except RecipeError as exc:
                raise RecipeError(f"tensor {out_name!r}: {exc}") from None
        return job

    def is_vocab(self, name: str, reads: list[tuple[_Source, str]]) -> bool:
        if not any(h in name for h in VOCAB_HINTS):
            return False
        for src, own in reads:
            info = self.infos[src.key][own]
            rows = (self.opened[src.key].config or {}).get("vocab_size")
            if len(info.shape) != 2 or info.shape[0] != rows:
                return False
        return True

    def plan(self, dtype: str | None) -> LayoutPlan:
        base = self.open()
        self.check_slices()
        first, last = self.slices[0], self.slices[-1]
        ref_key = canonical(self.recipe.base_model) if self.recipe.base_model else \
            first.sources[0].key
        reference = self.opened[ref_key]
        ref_infos = self.infos[ref_key]
        name = dtype or self.recipe.output_dtype_name
        self.out_dtype = parse_dtype(name) if name else _dominant(ref_infos)
        vocabulary = self.vocabulary()
        outside = [n for n in ref_infos if split_layer_name(n) is None]
        pre = [n for n in outside if is_before_layers(n)]
        post = [n for n in outside if not is_before_layers(n)]

        def sources(piece: _Slice) -> list[_Source]:
            return ([piece.base] if piece.base is not None else []) + piece.inputs

        jobs: list[TensorJob] = []
        for n in pre:
            jobs.append(self.job(first, n, [(s, n) for s in sources(first)], 0.0, vocabulary,
                                 None))
        out_index = 0
        lines = []
        for piece in self.slices:
            length = piece.length
            reads_of = sources(piece)
            if self.recipe.slices:
                lines.append(f"{piece.label}: " + " + ".join(
                    f"{s.label} layers {s.start}-{(s.end or 0) - 1}" for s in piece.sources)
                    + f" -> output layers {out_index}-{out_index + length - 1}")
            for k in range(length):
                t = k / (length - 1) if length > 1 else 1.0
                lead = reads_of[0]
                templates = self.layers[lead.key].get(lead.start + k, {})
                if not templates:
                    raise CheckpointError(f"model {lead.label}: no tensors of layer "
                                          f"{lead.start + k}")
                for src in reads_of[1:]:
                    own = self.layers[src.key].get(src.start + k, {})
                    if set(own) != set(templates):
                        extra = sorted(set(own) ^ set(templates))[0]
                        raise CheckpointError(
                            f"model {src.label}: layer {src.start + k} does not have the same "
                            f"tensors as {lead.label}'s layer {lead.start + k} (differs at "
                            f"{extra[0]}N{extra[1]})")
                for (prefix, suffix) in templates:
                    out_name = f"{prefix}{out_index}{suffix}"
                    reads = [(s, self.layers[s.key][s.start + k][(prefix, suffix)])
                             for s in reads_of]
                    jobs.append(self.job(piece, out_name, reads, t, None, None))
                out_index += 1
        for n in post:
            jobs.append(self.job(last, n, [(s, n) for s in sources(last)], 0.0, vocabulary,
                                 None))
        config = dict(reference.config) if reference.config else None
        if config is not None:
            key = next((k for k in LAYER_KEYS if k in config), None)
            if key is not None:
                config[key] = out_index
            if vocabulary is not None:
                config["vocab_size"] = vocabulary.size
        if self.recipe.slices:
            lines.append(f"output layers: {out_index} (in {len(self.slices)} slices; "
                         f"{reference.label} has {self.depth(ref_key)})")
        if vocabulary is not None:
            aligned = [j.name for j in jobs if isinstance(j.reader, _Reader)
                       and j.reader.align is not None]
            lines.append(f"vocabulary: {vocabulary.tokens} tokens ({self.vocab_source()}), "
                         f"{vocabulary.size} rows; aligned: {', '.join(aligned) or 'none'}")
        inputs = [c for c in self.opened.values() if c is not base]
        return LayoutPlan(self.recipe, self.schema, reference,
                          base if self.schema.base_policy != "input" else None, inputs,
                          [c.label for c in inputs], jobs, self.out_dtype,
                          out_config=config, vocabulary=vocabulary, layout=lines,
                          input_bytes=self.bytes, checkpoints=list(self.opened.values()))

    # -- vocabulary
    def vocab_source(self) -> str:
        if self.recipe.tokenizer is not None:
            return self.recipe.tokenizer.source
        return str(self.recipe.tokenizer_source)

    def vocabulary(self) -> Vocabulary | None:
        if not aligns_vocabulary(self.recipe):
            return None
        models = []
        for key, ckpt in self.opened.items():
            rows = (ckpt.config or {}).get("vocab_size")
            if not isinstance(rows, int):
                raise CheckpointError(f"model {ckpt.label}: merging vocabularies needs its "
                                      "config.json with vocab_size")
            models.append((self._path_of(key), rows))
        section = self.recipe.tokenizer
        source = self.vocab_source()
        return build_vocabulary(models, self.recipe.base_model, source,
                                section.tokens if section is not None else None,
                                section.pad_to_multiple_of if section is not None else None)

    def _path_of(self, key: str) -> str:
        for piece in self.slices:
            for src in piece.sources:
                if src.key == key:
                    return src.path
        assert self.recipe.base_model is not None
        return self.recipe.base_model


def _dominant(infos: dict[str, TensorInfo]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for info in infos.values():
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=counts.__getitem__) if counts else torch.float32
