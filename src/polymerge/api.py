"""The Python API, as good as the CLI: what ``import polymerge`` gives.

It wires the layers together (the zoo's suites as data sources of the learned merges) and adds
nothing the CLI does not also use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from polymerge.engine import tensor_seed
from polymerge.errors import RecipeError
from polymerge.methods.schema import MergeMethod
from polymerge.plan import MergePlan
from polymerge.recipe import Recipe
from polymerge.registry import DEFAULT_SHARD_SIZE, get_tensor_method, plan
from polymerge.runtime import load_store
from polymerge.stores import export_expert, open_store
from polymerge.zoo.sources import run_merge

RecipeLike = str | Path | dict[str, Any] | Recipe


def merge(recipe: RecipeLike, out: str | Path, *, force: bool = False, device: str = "cpu",
          dtype: str | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE,
          allow_pickle: bool = False, progress: bool = True) -> Path:
    """Run a recipe of any kind (static merge, expert store, learned merge) into ``out``.

    Everything is validated first; the output appears only when complete.
    """
    return run_merge(recipe, out, force=force, device=device, dtype=dtype,
                     shard_size=shard_size, allow_pickle=allow_pickle, progress=progress)


def dry_run(recipe: RecipeLike, out: str | Path | None = None, *, dtype: str | None = None,
            allow_pickle: bool = False, force: bool = False) -> MergePlan:
    """Validate and plan a recipe of any kind without writing anything; ``plan.summary()``."""
    planned = plan(recipe, out, dtype=dtype, allow_pickle=allow_pickle, force=force)
    planned.close()
    return planned


TensorOrDict = torch.Tensor | Mapping[str, torch.Tensor]


def merge_tensors(method: str | MergeMethod, base: TensorOrDict | None,
                  experts: Sequence[TensorOrDict], *, seed: int = 0,
                  device: str | None = None, **params: Any) -> Any:
    """Merge in memory: tensors, or state dicts with the same keys, for research use.

    Per-model parameters may be a scalar (same for every expert) or one value per expert.
    The result has the dtype of the base (or of the first expert) and lives on its device
    unless ``device`` is given.
    """
    spec = get_tensor_method(method) if isinstance(method, str) else method
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
        base.to(dev, torch.float32) if (base is not None and spec.base_policy != "input")
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
        def check(v: Any, p: Any = p) -> Any:  # an absent optional parameter stays None
            return v if v is None and p.default is None else p.check(v, spec.name)

        if p.scope == "per_model":
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise RecipeError(f"{spec.name}: {p.name!r} has {len(values)} values for "
                                  f"{n} experts")
            out[p.name] = [check(v) for v in values]
        else:
            out[p.name] = check(value)
    return out


__all__ = ["dry_run", "export_expert", "load_store", "merge", "merge_tensors", "open_store"]
