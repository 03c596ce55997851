"""Static merges: the checkpoint-to-checkpoint path, and an in-memory entry for research."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from polymerge.builders import build, get_builder
from polymerge.engine import EngineStats, check_finite, resolve_device, stream, tensor_seed
from polymerge.errors import PolymergeError, RecipeError
from polymerge.io.hf_files import (
    copy_support_files,
    tokenizer_source_dir,
    write_config,
    write_model_card,
)
from polymerge.io.writer import AtomicOutputDir, ShardedWriter, check_output_target
from polymerge.methods.registry import MergeMethod, get_method
from polymerge.plan import MergePlan, TensorJob, build_plan
from polymerge.recipe import Recipe, load_recipe

DEFAULT_SHARD_SIZE = "5GB"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)


def parse_size(size: str | int) -> int:
    """Bytes from ``5GB``, ``500MB``, ``1GiB`` or a plain integer."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(size)
    if match is None:
        raise PolymergeError(f"cannot read size {size!r}; use e.g. 5GB or 500MB")
    unit = (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("B").rstrip("I")]
    return int(float(match.group(1)) * base**power)


def merge(recipe: str | Path | dict[str, Any] | Recipe, out: str | Path, *,
          force: bool = False, device: str = "cpu", dtype: str | None = None,
          shard_size: str | int = DEFAULT_SHARD_SIZE, allow_pickle: bool = False,
          progress: bool = True) -> Path:
    """Merge the recipe's models into an HF model folder at ``out`` and return its path.

    Everything is validated first; the output appears only when complete.
    """
    out_path = Path(out).expanduser().absolute()
    check_output_target(out_path, force=force)
    max_shard = parse_size(shard_size)
    parsed = load_recipe(recipe)
    if get_builder(parsed.merge_method) is not None:
        return build(parsed, out_path, force=force, device=device, dtype=dtype,
                     shard_size=max_shard, allow_pickle=allow_pickle, progress=progress)
    recipe = parsed
    plan = build_plan(recipe, out_dir=out_path, allow_pickle=allow_pickle, dtype=dtype)
    resolve_device(device)
    try:
        with AtomicOutputDir(out_path, force=force) as tmp:
            run_static_merge(plan, tmp, device=device, max_shard_bytes=max_shard,
                             progress=progress)
            write_output_extras(plan, tmp)
    finally:
        plan.close()
    return out_path


def dry_run(recipe: str | Path | dict[str, Any] | Recipe, out: str | Path | None = None, *,
            dtype: str | None = None, allow_pickle: bool = False,
            force: bool = False) -> MergePlan:
    """Validate and plan without writing anything (the output target is checked too)."""
    if out is not None:
        check_output_target(Path(out).expanduser().absolute(), force=force)
    builder = get_builder(load_recipe(recipe).merge_method)
    if builder is not None and builder.kind == "store":
        from polymerge.stores.base import plan_store

        plan = plan_store(recipe, out_dir=out, allow_pickle=allow_pickle, dtype=dtype)
    else:
        plan = build_plan(recipe, out_dir=out, allow_pickle=allow_pickle, dtype=dtype)
    plan.close()
    return plan


def run_static_merge(plan: MergePlan, folder: Path, *, device: str, max_shard_bytes: int,
                     progress: bool) -> EngineStats:
    """Stream the plan through its method and into sharded safetensors in ``folder``."""
    writer = ShardedWriter(folder, [job.out for job in plan.jobs], max_shard_bytes,
                           metadata={"polymerge_method": plan.method.name})
    fn = plan.method.fn

    def compute(job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                generator: torch.Generator) -> torch.Tensor:
        return fn(base, inputs, generator=generator, **job.params)

    def consume(job: TensorJob, result: torch.Tensor) -> None:
        check_finite(result, "merged output", job.name)
        writer.write(job.name, result.to(job.out.dtype))

    try:
        stats = stream(plan, compute, consume, device=device, progress=progress)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return stats


def write_output_extras(plan: MergePlan, folder: Path) -> None:
    """config.json, tokenizer and generation config, the recipe, and the model card."""
    write_config(folder, plan.reference.config, plan.out_dtype)
    copy_support_files(folder, tokenizer_source_dir(plan.recipe.tokenizer_source,
                                                    plan.reference.path))
    recipe_yaml = plan.recipe.to_yaml()
    (folder / "polymerge_recipe.yaml").write_text(recipe_yaml)
    write_model_card(folder, method=plan.method.name, description=plan.method.description,
                     base=plan.recipe.base_model,
                     inputs=[(n, str(c.path)) for n, c in
                             zip(plan.input_names, plan.inputs, strict=True)],
                     recipe_yaml=recipe_yaml)


TensorOrDict = torch.Tensor | Mapping[str, torch.Tensor]


def merge_tensors(method: str | MergeMethod, base: TensorOrDict | None,
                  experts: Sequence[TensorOrDict], *, seed: int = 0,
                  device: str | None = None, **params: Any) -> Any:
    """Merge in memory: tensors, or state dicts with the same keys, for research use.

    Per-model parameters may be a scalar (same for every expert) or one value per expert.
    The result has the dtype of the base (or of the first expert) and lives on its device
    unless ``device`` is given.
    """
    spec = get_method(method) if isinstance(method, str) else method
    if not experts:
        raise RecipeError(f"{spec.name}: no experts given")
    if isinstance(experts[0], Mapping):
        keys = list(experts[0])
        for i, expert in enumerate(experts):
            if not isinstance(expert, Mapping) or set(expert) != set(keys):
                raise RecipeError(f"expert {i}: keys differ from expert 0's")
        if base is not None and (not isinstance(base, Mapping) or set(base) != set(keys)):
            missing = sorted(set(keys) - set(base)) if isinstance(base, Mapping) else keys
            raise RecipeError(f"base: keys differ from the experts' (e.g. {missing[:1]})")
        return {k: merge_tensors(spec, None if base is None else base[k],  # type: ignore[index]
                                 [e[k] for e in experts], seed=seed, device=device,  # type: ignore[index]
                                 _name=k, **params) for k in keys}
    name = params.pop("_name", "tensor")
    resolved = _resolve_params(spec, len(experts), params)
    if spec.base_policy == "required" and base is None:
        raise RecipeError(f"{spec.name} needs a base tensor")
    ref = base if base is not None else experts[0]
    assert isinstance(ref, torch.Tensor)
    for i, t in enumerate(experts):
        assert isinstance(t, torch.Tensor)
        if t.shape != ref.shape:
            raise RecipeError(f"{name}: expert {i} has shape {list(t.shape)}, expected "
                              f"{list(ref.shape)}")
    dev = torch.device(device) if device else ref.device
    generator = torch.Generator(device=dev)
    generator.manual_seed(tensor_seed(seed, name))
    result = spec.fn(
        base.to(dev, torch.float32) if (base is not None and spec.base_policy == "required")
        else None,
        [t.to(dev, torch.float32) for t in experts],  # type: ignore[union-attr]
        generator=generator, **resolved)
    return result.to(ref.dtype)


def _resolve_params(spec: MergeMethod, n: int, params: dict[str, Any]) -> dict[str, Any]:
    unknown = set(params) - spec.param_names
    if unknown:
        raise RecipeError(f"{spec.name} has no parameter {sorted(unknown)[0]!r}; it takes "
                          f"{', '.join(sorted(spec.param_names)) or 'none'}")
    out: dict[str, Any] = {}
    for p in spec.params:
        value = params.get(p.name, p.default)
        if p.required and p.name not in params:
            raise RecipeError(f"{spec.name}: parameter {p.name!r} is required")
        if p.scope == "per_model":
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise RecipeError(f"{spec.name}: {p.name!r} has {len(values)} values for "
                                  f"{n} experts")
            out[p.name] = [p.check(v, spec.name) for v in values]
        else:
            out[p.name] = p.check(value, spec.name)
    return out
