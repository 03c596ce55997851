"""Building an expert store: the store method's registry entry and the one build loop.

A store method is one module that registers a :class:`StoreMethod`: its parameter schema
(checked with the recipe before any tensor is read), a per-tensor :class:`TensorBuilder` run
through the engine's one output path (:func:`polymerge.engine.write_folder`), the
:class:`~polymerge.stores.store.Store` class that reads the pieces back, and how a runtime
serves it (the store class's ``serving``: ``switch`` or ``mix``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from polymerge.engine import write_folder
from polymerge.errors import RecipeError
from polymerge.io.dtypes import dtype_name
from polymerge.methods.schema import REQUIRED, MergeMethod, Param, Schema
from polymerge.plan import MergePlan, TensorJob, check_free_disk
from polymerge.recipe import Recipe
from polymerge.registry import Method, RunOptions, get_tensor_method, write_plan_extras
from polymerge.stores.manifest import (
    BASE_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    PIECES_DIR,
    HeadEntry,
    TensorEntry,
    check_expert_name,
    head_entries,
    parameter_counts,
    piece_name,
    shared_entry,
    write_manifest,
)
from polymerge.stores.store import Store
from polymerge.version import __version__


class TensorBuilder(Protocol):
    """What a store method runs per tensor, inside the engine's loop.

    ``entry`` is called for every merged job before the pass (it lays out the output shards);
    ``compute`` receives float32 tensors and returns every piece ``entry`` announced;
    ``finalize`` runs after the last tensor and returns what needs the whole model
    (statistics such as reconstruction errors or global rescalers), recorded in the manifest's
    ``summary`` and given back by :attr:`Store.summary`. A builder may also define
    ``final_pieces() -> dict[str, Tensor]``: pieces announced by ``entry`` but computed only
    once every tensor was seen (EMR's whole-model rescalers); the engine writes them after the
    pass, before ``finalize`` is called.
    """

    def entry(self, job: TensorJob) -> TensorEntry: ...

    def compute(self, job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                generator: torch.Generator) -> dict[str, torch.Tensor]: ...

    def finalize(self) -> dict[str, Any]: ...


class StoreMethod(Method):
    """A registered store method (kind ``store``)."""

    kind = "store"

    def __init__(self, *, name: str, description: str,
                 params: Callable[[Recipe], tuple[Param, ...]],
                 make_builder: Callable[[MergePlan], TensorBuilder], store_cls: type[Store],
                 validate: Callable[[Recipe, int], None] | None = None,
                 reference: str = "") -> None:
        self.name = name
        self.description = description
        self.reference = reference
        self.params = params
        self.make_builder = make_builder
        self.store_cls = store_cls
        self._validate = validate

    @property
    def serving(self) -> str:
        """``switch`` or ``mix``: how a runtime serves stores of this method."""
        return self.store_cls.serving

    def schema(self, recipe: Recipe) -> Schema:
        return Schema(name=self.name, params=self.params(recipe), description=self.description,
                      base_policy="required", min_experts=1, reference=self.reference)

    def validate(self, recipe: Recipe) -> None:
        for entry in recipe.experts():
            check_expert_name(entry.display_name, f"model {entry.model}")
        if self._validate is not None:
            self._validate(recipe, len(recipe.experts()))

    def write(self, plan: MergePlan, folder: Path, options: RunOptions) -> None:
        """The build loop: lay out every piece, stream the engine into ``pieces/``, finalize,
        then the manifest and the HF side files."""
        self.build(plan, folder, options, self.make_builder(plan))

    def build(self, plan: MergePlan, folder: Path, options: RunOptions,
              builder: TensorBuilder) -> None:
        """The build loop with a given builder (see :meth:`write`); every expert's task head,
        if any, is stored beside the pieces as it came."""
        start = time.perf_counter()
        entries = [builder.entry(job) if job.merge else shared_entry(job) for job in plan.jobs]
        heads = head_entries(plan.heads, plan.out_dtype)
        pieces = [p for e in entries for p in e.pieces] + \
            [p for h in heads for p in h.tensors.values()]
        check_free_disk(folder, sum(p.nbytes for p in pieces))
        (folder / PIECES_DIR).mkdir()
        stats, files = write_folder(
            plan, folder / PIECES_DIR, builder.compute, pieces,
            max_shard_bytes=options.shard_size, metadata={"polymerge_store": self.name},
            copied_name=lambda name: piece_name(name, "shared"),
            finalize=with_heads(getattr(builder, "final_pieces", None), plan, heads),
            device=options.device, progress=options.progress,
            desc=f"building {self.name} store", what=f"{self.name} store")
        manifest = store_manifest(
            plan, self.name, entries, builder.finalize(),
            engine={"tensors": stats.tensors, "bytes_read": stats.bytes_read,
                    "seconds": round(stats.seconds, 3)},
            build_seconds=time.perf_counter() - start, files=files, heads=heads)
        write_plan_extras(plan, folder, description=self.description,
                          card_extra=_card(self.name, folder.name, manifest))
        write_manifest(folder, manifest)


def with_heads(final: Callable[[], dict[str, torch.Tensor]] | None, plan: MergePlan,
               heads: list[HeadEntry]) -> Callable[[], dict[str, torch.Tensor]] | None:
    """The build's last step: the builder's ``final_pieces`` (if any), then every expert's
    head tensors, read from the expert as they are (never merged)."""
    if not heads:
        return final

    def finalize() -> dict[str, torch.Tensor]:
        out = dict(final()) if final is not None else {}
        for spec, entry in zip(plan.heads, heads, strict=True):
            for name, piece in entry.tensors.items():
                out[piece.name] = spec.read(name)
        return out

    return finalize


def store_manifest(plan: MergePlan, method: str, entries: list[TensorEntry],
                   summary: dict[str, Any], *, engine: dict[str, Any], build_seconds: float,
                   files: list[str], heads: list[HeadEntry] | None = None) -> dict[str, Any]:
    """The manifest of a freshly built store (see :mod:`polymerge.stores.manifest`): format
    version 1 without heads, 2 with them."""
    heads = heads or []
    recipe = plan.recipe
    cfg = plan.reference.config or {}
    params = {p.name: _jsonable(recipe.parameters.get(p.name, p.default))
              for p in plan.schema.params}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION if heads else BASE_VERSION,
        "method": method,
        "polymerge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "experts": list(plan.input_names),
        "expert_paths": {n: str(c.path) for n, c in
                         zip(plan.input_names, plan.inputs, strict=True)},
        "base": {"path": str(Path(recipe.base_model).expanduser().absolute())
                 if recipe.base_model else None,
                 "architectures": cfg.get("architectures"), "model_type": cfg.get("model_type")},
        "dtype": dtype_name(plan.out_dtype),
        "parameters": params,
        "seed": recipe.seed,
        "parameter_counts": parameter_counts(entries, len(plan.inputs),
                                             [p for h in heads for p in h.tensors.values()]),
        "build_seconds": round(build_seconds, 3),
        "engine": engine,
        "summary": summary,
        "files": [f"{PIECES_DIR}/{f}" for f in files],
        "tensors": {e.name: e.to_json() for e in entries},
        **({"heads": {h.expert: h.to_json() for h in heads}} if heads else {}),
    }


def _jsonable(value: Any) -> Any:
    if value is REQUIRED:  # a per-model parameter without a recipe-wide value
        return None
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _card(method: str, folder_name: str, manifest: dict[str, Any]) -> str:
    counts = manifest["parameter_counts"]
    return (f"\n## Expert store\n\nThis folder is a polymerge **expert store** "
            f"({method}), not a model: load it with `polymerge.load_store(path)`, or "
            f"write one expert as a checkpoint with `polymerge export {folder_name} --expert "
            f"NAME -o DIR`.\n\nExperts: {', '.join(manifest['experts'])}. Stored parameters: "
            f"{counts['stored']:,} ({counts['ratio']:.1%} of the ensemble's "
            f"{counts['ensemble']:,}).\n")


# ----------------------------------------------------------------------------- helpers


TASK_ARITHMETIC_FAMILY = ("ties", "dare_ties", "dare_linear", "task_arithmetic", "breadcrumbs",
                          "breadcrumbs_ties", "della", "della_linear")
"""Static methods a store can run inside itself: those built on the task-arithmetic core."""


def inner_method(recipe: Recipe, key: str, default: str, store: str) -> MergeMethod:
    """The task-arithmetic-family method a store's recipe names under ``key``, checked."""
    name = recipe.parameters.get(key, default)
    if not isinstance(name, str):
        raise RecipeError(f"{store}: {key} must be one method name, not a per-tensor list")
    if name not in TASK_ARITHMETIC_FAMILY:
        raise RecipeError(f"{store}: {key} {name!r} is not supported; use one of "
                          f"{', '.join(TASK_ARITHMETIC_FAMILY)}")
    method = get_tensor_method(name)
    if "sparsification" not in method.extra:
        raise RecipeError(f"{store}: {name} is not a task-arithmetic-family method")
    return method


def compile_scope(pattern: str, where: str = "scope") -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RecipeError(f"{where}: {pattern!r} is not a valid regular expression ({exc})") \
            from None
