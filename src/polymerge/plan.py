"""Turn a recipe into a checked plan: every input opened, every problem found before any tensor.

Validation reads only headers and configs. It fails fast, naming the model and tensor at fault,
on missing paths, missing or extra tensors, shape and dtype mismatches, different architectures
or vocabularies, parameters out of range and too little free disk for the output.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymerge.errors import CheckpointError, RecipeError
from polymerge.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from polymerge.io.dtypes import dtype_name, parse_dtype
from polymerge.io.hf_files import tokenizer_source_dir
from polymerge.methods.schema import REQUIRED, Param, Schema
from polymerge.recipe import (
    ModelEntry,
    Recipe,
    depth_position,
    layer_index,
    load_recipe,
    possible_values,
    resolve_value,
)

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

    @property
    def params(self) -> dict[str, Any]:
        return {**self.shared, **self.per_model}


@dataclass
class MergePlan:
    """Everything the engine needs, already validated."""

    recipe: Recipe
    schema: Schema  # what the method accepts; its name is the recipe's merge_method
    reference: Checkpoint  # the base, or the first model when the method takes no base
    base: Checkpoint | None  # passed to the method as ``base`` (None for base_policy="input")
    inputs: list[Checkpoint]  # passed to the method as ``experts``
    input_names: list[str]
    jobs: list[TensorJob]
    out_dtype: torch.dtype

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
        return "\n".join(lines)


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
    infos = _check_tensors(reference, inputs)

    out_dtype = parse_dtype(dtype or recipe.output_dtype_name) if (
        dtype or recipe.output_dtype_name) else _dominant_dtype(infos)
    num_layers = _num_layers(reference.config) or _num_layers_from_names(infos)
    jobs = [_job(name, info, recipe, method, entries, out_dtype, num_layers)
            for name, info in infos.items()]
    _check_job_params(method, jobs)
    if recipe.tokenizer_source not in (None, "base"):
        tokenizer_source_dir(recipe.tokenizer_source, reference.path)
    plan = MergePlan(recipe, method, reference,
                     base if method.base_policy == "required" else None,
                     inputs, [e.display_name for e in entries], jobs, out_dtype)
    if out_dir is not None:
        check_free_disk(Path(out_dir), plan.bytes_written)
    return plan


def _method_inputs(recipe: Recipe, method: Schema) -> list[ModelEntry]:
    if method.base_policy == "required":
        if recipe.base_model is None:
            raise RecipeError(f"merge_method {method.name} needs a base_model")
        entries = recipe.experts()
    else:
        entries = list(recipe.models)
    n = len(entries)
    what = "models other than the base" if method.base_policy == "required" else "models"
    if n < method.min_experts:
        raise RecipeError(f"merge_method {method.name} needs at least {method.min_experts} "
                          f"{what}, the recipe lists {n}")
    if method.max_experts is not None and n > method.max_experts:
        raise RecipeError(f"merge_method {method.name} takes at most {method.max_experts} "
                          f"{what}, the recipe lists {n}")
    return entries


def _check_parameters(recipe: Recipe, method: Schema, entries: list[ModelEntry]) -> None:
    known = method.param_names | IGNORED_MERGEKIT_PARAMS
    for key in recipe.parameters:
        if key not in known:
            raise RecipeError(f"parameters: {method.name} has no parameter {key!r}; it takes "
                              f"{', '.join(sorted(method.param_names)) or 'none'}")
    for entry in recipe.models:
        for key in entry.parameters:
            if key not in method.param_names:
                raise RecipeError(f"model {entry.display_name}: {method.name} has no "
                                  f"parameter {key!r}")
            if method.param(key).scope == "shared":
                raise RecipeError(f"model {entry.display_name}: parameter {key!r} applies to "
                                  "the whole merge; set it under the top-level parameters")
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
        for key in _ARCH_KEYS:
            if key in ref_cfg and key in cfg and ref_cfg[key] != cfg[key]:
                raise CheckpointError(f"model {ckpt.label}: {key} is {cfg[key]!r} but "
                                      f"{reference.label} has {ref_cfg[key]!r}: different "
                                      "architectures cannot be merged")
        if ref_cfg.get("vocab_size") != cfg.get("vocab_size"):
            raise CheckpointError(
                f"model {ckpt.label}: vocabulary size {cfg.get('vocab_size')} differs from "
                f"{reference.label}'s {ref_cfg.get('vocab_size')}; merging embeddings of "
                "different vocabularies would silently misalign tokens")


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
                if any(h in name for h in _VOCAB_HINTS) and other.shape[1:] == info.shape[1:]:
                    raise CheckpointError(
                        f"model {ckpt.label}: tensor {name!r} has {other.shape[0]} vocabulary "
                        f"rows, {reference.label} has {info.shape[0]}: different vocabularies "
                        "cannot be merged")
                raise CheckpointError(f"model {ckpt.label}: tensor {name!r} has shape "
                                      f"{list(other.shape)}, {reference.label} has "
                                      f"{list(info.shape)}")
            if other.dtype != info.dtype:
                raise CheckpointError(f"model {ckpt.label}: tensor {name!r} is "
                                      f"{dtype_name(other.dtype)}, {reference.label} has "
                                      f"{dtype_name(info.dtype)}; convert the inputs to one "
                                      "dtype first")
    return ref


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
            value = entry.parameters.get(param.name, recipe.parameters.get(param.name))
            resolved = None if value is None else resolve_value(value, name, position)
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
    paths = [recipe.base_model, *(m.model for m in recipe.models)]
    if recipe.tokenizer_source not in (None, "base"):
        paths.append(recipe.tokenizer_source)
    for raw in paths:
        if raw is None:
            continue
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
