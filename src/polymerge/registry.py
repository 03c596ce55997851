"""The one registry of merge methods: static (per-tensor), expert stores and learned merges.

Each entry says its kind, its parameter schema, how it plans (validation before any tensor is
read) and how it writes its output. ``polymerge merge``, ``--dry-run``, ``polymerge methods``,
the zoo report and the docs all read this registry.

Built-in static methods are registered here from :mod:`polymerge.methods`; stores and learned
merges register themselves when their package is imported (the package root imports them).
Third-party methods come through the ``polymerge.methods`` entry point group: each entry point
names a :class:`Method`, a :class:`~polymerge.methods.schema.MergeMethod` (registered as a
static method) or an iterable of those, so a plugin adds a method without touching polymerge.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from polymerge.engine import resolve_device, write_folder
from polymerge.errors import PolymergeError, RecipeError
from polymerge.io.hf_files import tokenizer_source_dir, write_output_extras
from polymerge.io.writer import AtomicOutputDir, check_output_target
from polymerge.layout import build_layout_plan, needs_layout, write_layout_extras
from polymerge.methods import builtin_methods
from polymerge.methods.schema import MergeMethod, Schema
from polymerge.plan import MergePlan, TensorJob, build_plan
from polymerge.recipe import Recipe, load_recipe

Kind = Literal["tensor", "store", "learned"]
KIND_LABELS: dict[str, str] = {"tensor": "static merge", "store": "expert store",
                               "learned": "learned merge"}
ENTRY_POINT_GROUP = "polymerge.methods"
DEFAULT_SHARD_SIZE = "5GB"
HEADS_METHOD = "merged"
"""The store method that writes a static or learned merge whose experts have task heads: the
merged body once plus each expert's head (registered by :mod:`polymerge.stores.merged`, looked
up here by name: the registry imports no store)."""
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


@dataclass(frozen=True)
class RunOptions:
    """How to run a method, whatever its kind (the ``polymerge merge`` options)."""

    force: bool = False
    device: str = "cpu"
    dtype: str | None = None
    shard_size: int = 5 * 10**9
    allow_pickle: bool = False
    progress: bool = True
    data_sources: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    """Named sources of labelled examples a learned merge may train on (``data: NAME``); the
    caller supplies them (the package API adds the zoo's suites), so tuning imports no zoo."""


class Method(ABC):
    """A registered merge method of any kind."""

    name: str
    kind: ClassVar[Kind]
    description: str = ""
    reference: str = ""

    @abstractmethod
    def schema(self, recipe: Recipe) -> Schema:
        """The parameters this method takes for ``recipe`` (a store may take those of an
        inner static method the recipe names)."""

    def validate(self, recipe: Recipe) -> None:  # noqa: B027 (optional hook)
        """Checks a schema cannot express (choices, regexes); RecipeError names the culprit."""

    def plan(self, recipe: Recipe, *, out_dir: Path | None = None, allow_pickle: bool = False,
             dtype: str | None = None) -> MergePlan:
        """Validate the recipe and every input (headers only) against this method."""
        self.validate(recipe)
        if needs_layout(recipe):  # slices, merged vocabularies
            return build_layout_plan(recipe, self.schema(recipe), out_dir=out_dir,
                                     allow_pickle=allow_pickle, dtype=dtype)
        return build_plan(recipe, self.schema(recipe), out_dir=out_dir,
                          allow_pickle=allow_pickle, dtype=dtype)

    @abstractmethod
    def write(self, plan: MergePlan, folder: Path, options: RunOptions) -> None:
        """Write the method's output into ``folder`` (a fresh temporary folder, renamed into
        place by :func:`run` only when this returns)."""


class TensorMethod(Method):
    """A static method: one pure tensor function run per tensor into an HF checkpoint."""

    kind = "tensor"

    def __init__(self, method: MergeMethod) -> None:
        self.method = method
        self.name = method.name
        self.description = method.description
        self.reference = method.reference

    def schema(self, recipe: Recipe) -> Schema:
        return self.method

    def write(self, plan: MergePlan, folder: Path, options: RunOptions) -> None:
        fn = self.method.fn

        def compute(job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                    generator: torch.Generator) -> torch.Tensor:
            return fn(base, inputs, generator=generator, **job.params)

        write_folder(plan, folder, compute, [job.out for job in plan.jobs],
                     max_shard_bytes=options.shard_size,
                     metadata={"polymerge_method": self.name}, device=options.device,
                     progress=options.progress, pure=True,
                     chunkable=lambda job: self.method.is_elementwise(job.params),
                     native_inputs=self.method.converts_inputs,
                     propagates_nonfinite=self.method.propagates_nonfinite)
        write_plan_extras(plan, folder, description=self.description)


def write_plan_extras(plan: MergePlan, folder: Path, *, description: str,
                      card_extra: str = "") -> None:
    """Config, tokenizer, recipe and model card of a planned output."""
    write_output_extras(
        folder, config=plan.reference.config, dtype=plan.out_dtype,
        support_dir=tokenizer_source_dir(plan.recipe.tokenizer_source, plan.reference.path),
        method=plan.schema.name, description=description, base=plan.recipe.base_model,
        inputs=[(n, str(c.path)) for n, c in zip(plan.input_names, plan.inputs, strict=True)],
        recipe_yaml=plan.recipe.to_yaml(), card_extra=card_extra)
    write_layout_extras(plan, folder)


# ----------------------------------------------------------------------------- the registry

_REGISTRY: dict[str, Method] = {}
_plugins_loaded = False


def register(entry: Method | MergeMethod) -> Method:
    """Add a method (a static :class:`MergeMethod` is wrapped); names are unique."""
    method = TensorMethod(entry) if isinstance(entry, MergeMethod) else entry
    if not isinstance(method, Method):
        raise TypeError(f"cannot register {entry!r}: not a Method or MergeMethod")
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def load_plugins(*, reload: bool = False) -> None:
    """Register the methods that installed packages publish under ``polymerge.methods``."""
    global _plugins_loaded
    if _plugins_loaded and not reload:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not break polymerge
            raise PolymergeError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") \
                from None
        items = obj if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)) \
            else [obj]
        for item in items:
            name = getattr(item, "name", None)
            if name in _REGISTRY and _REGISTRY[name] is not item:
                continue  # already registered (a reload, or a name taken by a built-in)
            register(item)


def get(name: str) -> Method:
    """The method called ``name``, with every known name in the error."""
    load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown merge_method {name!r}; known methods: "
                          f"{', '.join(sorted(_REGISTRY))}") from None


def method_for(recipe: Recipe) -> Method:
    """The recipe's method; slices and merged vocabularies only with a static method."""
    method = get(recipe.merge_method)
    if method.kind != "tensor" and needs_layout(recipe):
        raise RecipeError(f"merge_method {method.name} is an {KIND_LABELS[method.kind]}; slices "
                          "and vocabulary merges (tokenizer:, tokenizer_source over different "
                          "vocabularies) work with static merge methods only")
    return method


def get_tensor_method(name: str) -> MergeMethod:
    """The static method ``name`` (what stores merge with and ``merge_tensors`` runs)."""
    entry = get(name)
    if not isinstance(entry, TensorMethod):
        raise RecipeError(f"{name} is a {KIND_LABELS[entry.kind]}, not a per-tensor method")
    return entry.method


def all_methods(kind: Kind | None = None) -> list[Method]:
    """Registered methods (of one kind), sorted by name."""
    load_plugins()
    return [m for _, m in sorted(_REGISTRY.items()) if kind is None or m.kind == kind]


def tensor_methods() -> list[MergeMethod]:
    """Every registered static method's definition, sorted by name."""
    return [m.method for m in all_methods("tensor") if isinstance(m, TensorMethod)]


def method_names(kind: Kind | None = None) -> list[str]:
    return [m.name for m in all_methods(kind)]


for _builtin in builtin_methods():
    register(_builtin)


# ----------------------------------------------------------------------------- running


def plan(recipe: str | Path | dict[str, Any] | Recipe, out: str | Path | None = None, *,
         dtype: str | None = None, allow_pickle: bool = False, force: bool = False
         ) -> MergePlan:
    """Validate a recipe of any kind and plan it without writing anything (``--dry-run``).

    The caller owns the plan (``plan.close()`` releases its readers)."""
    parsed = load_recipe(recipe)
    out_dir = None if out is None else Path(out).expanduser().absolute()
    if out_dir is not None:
        check_output_target(out_dir, force=force)
    return method_for(parsed).plan(parsed, out_dir=out_dir, allow_pickle=allow_pickle,
                                         dtype=dtype)


def output_method(method: Method, planned: MergePlan) -> Method:
    """What writes ``planned``: the method itself, or, when the experts have task heads and
    the method is not a store, the :data:`HEADS_METHOD` store wrapping it (its body merged by
    the method, stored once, plus each expert's head: a routed artifact)."""
    if not planned.heads or method.kind == "store":
        return method
    wrap = getattr(_REGISTRY.get(HEADS_METHOD), "wrapping", None)
    if wrap is None:
        raise RecipeError(f"the experts have task heads, so {method.name} writes an expert "
                          f"store, but the {HEADS_METHOD!r} store method is not registered "
                          "(import polymerge.stores)")
    return wrap(method)


def run(recipe: str | Path | dict[str, Any] | Recipe, out: str | Path,
        options: RunOptions = RunOptions()) -> Path:
    """Plan and run a recipe of any kind into ``out``, atomically; return the output path.

    Experts with task heads (``...ForSequenceClassification``) make every method write an
    expert store: see :func:`output_method`."""
    out_path = Path(out).expanduser().absolute()
    check_output_target(out_path, force=options.force)
    resolve_device(options.device)
    parsed = load_recipe(recipe)
    method = method_for(parsed)
    planned = method.plan(parsed, out_dir=out_path, allow_pickle=options.allow_pickle,
                          dtype=options.dtype)
    try:
        writer = output_method(method, planned)
        with AtomicOutputDir(out_path, force=options.force, kind=writer.kind) as tmp:
            writer.write(planned, tmp, options)
    finally:
        planned.close()
    return out_path
