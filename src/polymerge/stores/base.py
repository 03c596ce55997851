"""The expert-store protocol: one folder format, one build path, one loader for every store.

An expert store is a folder::

    polymerge_store.json   manifest: format version, method, experts, base, parameters,
                           every tensor's kind and pieces, parameter counts
    pieces/                safetensors shard(s) of the stored pieces (``<tensor>@<part>``)
    config.json, tokenizer files, polymerge_recipe.yaml, README.md
    router/                optional task router (see :mod:`polymerge.routing`)

Pieces live under ``pieces/`` so the folder is never mistaken for a model checkpoint.

A store method registers a :class:`StoreMethod`: its parameter schema (checked by the recipe
validator before any tensor is read), a per-tensor :class:`TensorBuilder` run through the
engine's one loop (:func:`polymerge.engine.stream`), and the :class:`Store` class that reads
the pieces back. Kinds every store can use are built in: ``shared`` (non-float buffers copied
from the base), ``expert`` (one copy per expert) and ``merged`` (one static merge of all
experts); a store adds its own kinds (``channel``: K merged groups plus an index).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from polymerge.builders import Builder, register_builder
from polymerge.engine import check_finite, resolve_device, stream
from polymerge.errors import CheckpointError, PolymergeError, RecipeError
from polymerge.io.checkpoint import TensorInfo, open_checkpoint
from polymerge.io.dtypes import dtype_name, element_size, parse_dtype
from polymerge.io.hf_files import (
    TOKENIZER_FILES,
    copy_support_files,
    tokenizer_source_dir,
    write_config,
    write_model_card,
)
from polymerge.io.writer import AtomicOutputDir, ShardedWriter, check_output_target
from polymerge.methods.registry import MergeMethod, Param, get_method
from polymerge.plan import MergePlan, TensorJob, build_plan
from polymerge.recipe import Recipe, load_recipe

FORMAT_VERSION = 1
FORMAT_NAME = "polymerge-expert-store"
MANIFEST_NAME = "polymerge_store.json"
PIECES_DIR = "pieces"
ROUTER_DIR = "router"
DEFAULT_SHARD_BYTES = 5 * 10**9
_PIECE_SEP = "@"


def piece_name(tensor: str, part: str) -> str:
    """Name of one stored piece of a tensor, e.g. ``model.layers.0.mlp.up_proj.weight@groups``."""
    return f"{tensor}{_PIECE_SEP}{part}"


def expert_part(index: int) -> str:
    return f"expert.{index}"


# ----------------------------------------------------------------------------- tensor entries


@dataclass(frozen=True)
class TensorEntry:
    """How one model tensor is stored: its kind and the pieces written for it.

    ``index`` names the pieces that are lookup metadata (not weights); they are counted apart
    from the stored parameters.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[TensorInfo, ...]
    index: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "shape": list(self.shape),
                               "dtype": dtype_name(self.dtype),
                               "pieces": {p.name: {"shape": list(p.shape),
                                                   "dtype": dtype_name(p.dtype)}
                                          for p in self.pieces}}
        if self.index:
            out["index"] = list(self.index)
        if self.extra:
            out["extra"] = self.extra
        return out

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> TensorEntry:
        pieces = tuple(TensorInfo(p, tuple(v["shape"]), _dtype(v["dtype"]))
                       for p, v in data["pieces"].items())
        return cls(name, data["kind"], tuple(data["shape"]), _dtype(data["dtype"]), pieces,
                   tuple(data.get("index", ())), dict(data.get("extra", {})))


def _dtype(name: str) -> torch.dtype:
    try:
        return parse_dtype(name)
    except RecipeError:
        dt = getattr(torch, name, None)
        if not isinstance(dt, torch.dtype):
            raise CheckpointError(f"unknown dtype {name!r} in a store manifest") from None
        return dt


def shared_entry(job: TensorJob) -> TensorEntry:
    """A tensor copied unchanged from the base (non-float buffers)."""
    info = TensorInfo(piece_name(job.name, "shared"), job.out.shape, job.out.dtype)
    return TensorEntry(job.name, "shared", job.out.shape, job.out.dtype, (info,))


def expert_entry(job: TensorJob, n: int) -> TensorEntry:
    """A tensor stored once per expert (exact)."""
    pieces = tuple(TensorInfo(piece_name(job.name, expert_part(i)), job.out.shape,
                              job.out.dtype) for i in range(n))
    return TensorEntry(job.name, "expert", job.out.shape, job.out.dtype, pieces)


def merged_entry(job: TensorJob) -> TensorEntry:
    """A tensor stored once, as a static merge of every expert."""
    info = TensorInfo(piece_name(job.name, "merged"), job.out.shape, job.out.dtype)
    return TensorEntry(job.name, "merged", job.out.shape, job.out.dtype, (info,))


# ----------------------------------------------------------------------------- store methods


class TensorBuilder(Protocol):
    """What a store method runs per tensor, inside the engine's loop.

    ``entry`` is called for every merged job before the pass (it lays out the output shards);
    ``compute`` receives float32 tensors and returns every piece ``entry`` announced.
    """

    def entry(self, job: TensorJob) -> TensorEntry: ...

    def compute(self, job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                generator: torch.Generator) -> dict[str, torch.Tensor]: ...

    def summary(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StoreMethod:
    """A registered store method.

    ``params(recipe)`` is the full parameter schema for that recipe (a store may take the
    parameters of an inner static method, chosen by the recipe); ``validate(recipe, n)`` checks
    what a schema cannot (choices, regexes, ranges that depend on the number of experts).
    """

    name: str
    description: str
    params: Callable[[Recipe], tuple[Param, ...]]
    make_builder: Callable[[MergePlan], TensorBuilder]
    store_cls: type[Store]
    validate: Callable[[Recipe, int], None] | None = None
    reference: str = ""

    def plan_method(self, recipe: Recipe) -> MergeMethod:
        """A MergeMethod stand-in so the plan validates and resolves this store's parameters."""

        def not_static(*_args: Any, **_kwargs: Any) -> torch.Tensor:
            raise PolymergeError(f"{self.name} builds an expert store, not a single tensor")

        return MergeMethod(name=self.name, fn=not_static, params=self.params(recipe),
                           description=self.description, base_policy="required",
                           min_experts=1, reference=self.reference,
                           extra={"store_method": self.name})


_STORE_METHODS: dict[str, StoreMethod] = {}


def register_store_method(method: StoreMethod) -> StoreMethod:
    """Register a store method and the builder that makes ``polymerge merge`` build it."""
    if method.name in _STORE_METHODS:
        raise ValueError(f"store method {method.name!r} is already registered")
    _STORE_METHODS[method.name] = method

    def build(recipe: Recipe, out: Path, **options: Any) -> Path:
        return build_store(recipe, out, **options)

    register_builder(Builder(name=method.name, fn=build, description=method.description,
                             kind="store"))
    return method


def get_store_method(name: str) -> StoreMethod:
    _ensure_loaded()
    try:
        return _STORE_METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_STORE_METHODS)) or "none"
        raise RecipeError(f"{name!r} is not a store method; store methods: {known}") from None


def store_method_names() -> list[str]:
    _ensure_loaded()
    return sorted(_STORE_METHODS)


def _ensure_loaded() -> None:
    import polymerge.stores  # noqa: F401  (registers the built-in store methods)


def plan_store(recipe: str | Path | dict[str, Any] | Recipe, *, out_dir: str | Path | None = None,
               allow_pickle: bool = False, dtype: str | None = None) -> MergePlan:
    """Validate a store recipe and plan it (no tensor is read)."""
    parsed = load_recipe(recipe)
    spec = get_store_method(parsed.merge_method)
    if spec.validate is not None:
        spec.validate(parsed, len(parsed.experts()))
    return build_plan(parsed, out_dir=out_dir, allow_pickle=allow_pickle, dtype=dtype,
                      method=spec.plan_method(parsed))


# ----------------------------------------------------------------------------- building


def build_store(recipe: str | Path | dict[str, Any] | Recipe, out: str | Path, *,
                force: bool = False, device: str = "cpu", dtype: str | None = None,
                shard_size: int | str = DEFAULT_SHARD_BYTES, allow_pickle: bool = False,
                progress: bool = True) -> Path:
    """Build the recipe's store into ``out`` (atomically) through the engine's per-tensor loop."""
    from polymerge.merge import parse_size

    out_path = Path(out).expanduser().absolute()
    check_output_target(out_path, force=force)
    max_shard = parse_size(shard_size)
    resolve_device(device)
    start = time.perf_counter()
    plan = plan_store(recipe, out_dir=out_path, allow_pickle=allow_pickle, dtype=dtype)
    spec = get_store_method(plan.recipe.merge_method)
    try:
        builder = spec.make_builder(plan)
        entries = [builder.entry(job) if job.merge else shared_entry(job) for job in plan.jobs]
        _check_disk(out_path, sum(p.nbytes for e in entries for p in e.pieces))
        by_name = {e.name: e for e in entries}
        with AtomicOutputDir(out_path, force=force) as tmp:
            (tmp / PIECES_DIR).mkdir()
            writer = ShardedWriter(tmp / PIECES_DIR, [p for e in entries for p in e.pieces],
                                   max_shard, metadata={"polymerge_store": spec.name})

            def compute(job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
                return builder.compute(job, base, inputs, generator)

            def consume(job: TensorJob, result: dict[str, torch.Tensor] | torch.Tensor) -> None:
                entry = by_name[job.name]
                if isinstance(result, torch.Tensor):  # a copied (non-merged) tensor
                    result = {entry.pieces[0].name: result}
                expected = {p.name: p for p in entry.pieces}
                if set(result) != set(expected):
                    raise PolymergeError(f"internal: {spec.name} produced pieces "
                                         f"{sorted(result)} for {job.name!r}, planned "
                                         f"{sorted(expected)}")
                for name, tensor in result.items():
                    check_finite(tensor, f"{spec.name} store", name)
                    writer.write(name, tensor.to(expected[name].dtype))

            try:
                stats = stream(plan, compute, consume, device=device, progress=progress,
                               desc=f"building {spec.name} store")
            except BaseException:
                writer.abort()
                raise
            writer.close()
            seconds = time.perf_counter() - start
            manifest = _manifest(plan, spec, entries, builder.summary(),
                                 engine={"tensors": stats.tensors, "bytes_read": stats.bytes_read,
                                         "seconds": round(stats.seconds, 3)},
                                 build_seconds=seconds, files=writer.file_names)
            _write_extras(plan, spec, tmp, manifest)
            write_manifest(tmp, manifest)
    finally:
        plan.close()
    return out_path


def _check_disk(out_dir: Path, needed: int) -> None:
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * 1.05:
        raise CheckpointError(f"not enough free disk for the store: {needed / 1e9:.2f} GB "
                              f"needed, {free / 1e9:.2f} GB free at {probe}")


def parameter_counts(entries: Iterable[TensorEntry], n_experts: int) -> dict[str, Any]:
    """Stored parameters against the ensemble of ``n_experts`` full models.

    ``model``: parameters of one model (every tensor, buffers included); ``ensemble``: N times
    that; ``stored``: numbers in the stored pieces except lookup indexes, which are counted
    apart (``index_entries``, ``index_bytes``); byte counts cover everything stored.
    """
    entries = list(entries)
    model = sum(e.numel for e in entries)
    model_bytes = sum(e.numel * element_size(e.dtype) for e in entries)
    stored = index_entries = stored_bytes = index_bytes = 0
    by_kind: dict[str, int] = {}
    for e in entries:
        for p in e.pieces:
            stored_bytes += p.nbytes
            if p.name in e.index:
                index_entries += p.numel
                index_bytes += p.nbytes
            else:
                stored += p.numel
                by_kind[e.kind] = by_kind.get(e.kind, 0) + p.numel
    ensemble = n_experts * model
    return {"experts": n_experts, "model": model, "ensemble": ensemble, "stored": stored,
            "stored_by_kind": by_kind, "index_entries": index_entries,
            "index_bytes": index_bytes, "stored_bytes": stored_bytes,
            "ensemble_bytes": n_experts * model_bytes,
            "ratio": stored / ensemble if ensemble else float("nan"),
            "bytes_ratio": stored_bytes / (n_experts * model_bytes) if model_bytes else
            float("nan")}


def _manifest(plan: MergePlan, spec: StoreMethod, entries: list[TensorEntry],
              summary: dict[str, Any], *, engine: dict[str, Any], build_seconds: float,
              files: list[str]) -> dict[str, Any]:
    from polymerge import __version__

    recipe = plan.recipe
    cfg = plan.reference.config or {}
    params = {p.name: _jsonable(recipe.parameters.get(p.name, p.default))
              for p in plan.method.params}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": spec.name,
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
        "parameter_counts": parameter_counts(entries, len(plan.inputs)),
        "build_seconds": round(build_seconds, 3),
        "engine": engine,
        "summary": summary,
        "files": [f"{PIECES_DIR}/{f}" for f in files],
        "tensors": {e.name: e.to_json() for e in entries},
    }


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _write_extras(plan: MergePlan, spec: StoreMethod, folder: Path,
                  manifest: dict[str, Any]) -> None:
    write_config(folder, plan.reference.config, plan.out_dtype)
    copy_support_files(folder, tokenizer_source_dir(plan.recipe.tokenizer_source,
                                                    plan.reference.path))
    recipe_yaml = plan.recipe.to_yaml()
    (folder / "polymerge_recipe.yaml").write_text(recipe_yaml)
    counts = manifest["parameter_counts"]
    extra = (f"\n## Expert store\n\nThis folder is a polymerge **expert store** "
             f"({spec.name}), not a model: load it with `polymerge.load_store(path)`, or "
             f"write one expert as a checkpoint with `polymerge export {folder.name} --expert "
             f"NAME -o DIR`.\n\nExperts: {', '.join(manifest['experts'])}. Stored parameters: "
             f"{counts['stored']:,} ({counts['ratio']:.1%} of the ensemble's "
             f"{counts['ensemble']:,}).\n")
    write_model_card(folder, method=spec.name, description=spec.description,
                     base=plan.recipe.base_model,
                     inputs=[(n, str(c.path)) for n, c in
                             zip(plan.input_names, plan.inputs, strict=True)],
                     recipe_yaml=recipe_yaml, extra=extra)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")


# ----------------------------------------------------------------------------- loading


def is_store(path: str | Path) -> bool:
    """True when ``path`` is a folder with a store manifest."""
    return (Path(path).expanduser() / MANIFEST_NAME).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a store folder, checked: format, version and every listed file."""
    folder = Path(path).expanduser()
    file = folder / MANIFEST_NAME
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such store")
    if not file.is_file():
        raise CheckpointError(f"{folder}: not an expert store (no {MANIFEST_NAME})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable store manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{file}: not a polymerge store manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{file}: the manifest has no format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}: store format version {version} is newer than this polymerge reads "
            f"(up to {FORMAT_VERSION}); upgrade polymerge to load it")
    missing = [f for f in manifest.get("files", []) if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: the store is incomplete: {missing[0]} is missing "
                              f"({len(missing)} missing file(s)); rebuild or re-copy it")
    return manifest


class Store:
    """A loaded expert store: its pieces in memory and the lookup that rebuilds an expert.

    Subclasses implement :meth:`_rebuild` (and may speed up :meth:`_write_into`) for their own
    tensor kinds; ``shared``, ``expert`` and ``merged`` tensors are handled here.
    """

    method: ClassVar[str] = ""

    def __init__(self, path: Path, manifest: dict[str, Any],
                 pieces: dict[str, torch.Tensor]) -> None:
        self.path = path
        self.manifest = manifest
        self.pieces = pieces
        self.experts: list[str] = list(manifest["experts"])
        self.entries = {name: TensorEntry.from_json(name, data)
                        for name, data in manifest["tensors"].items()}
        self._targets_cache: weakref.WeakKeyDictionary[torch.nn.Module,
                                                      dict[str, torch.Tensor]] = \
            weakref.WeakKeyDictionary()
        self._router: Any = None

    # -- identity
    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.path} method={self.method} "
                f"experts={self.experts}>")

    @property
    def dtype(self) -> torch.dtype:
        return _dtype(self.manifest["dtype"])

    @property
    def device(self) -> torch.device:
        for t in self.pieces.values():
            return t.device
        return torch.device("cpu")

    @property
    def config(self) -> dict[str, Any] | None:
        cfg = self.path / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else None

    @property
    def base_path(self) -> Path | None:
        base = self.manifest.get("base", {}).get("path")
        return Path(base) if base else None

    def expert_index(self, name: str | int) -> int:
        if isinstance(name, int):
            if not 0 <= name < len(self.experts):
                raise PolymergeError(f"expert index {name} is out of range (0 to "
                                     f"{len(self.experts) - 1})")
            return name
        try:
            return self.experts.index(name)
        except ValueError:
            raise PolymergeError(f"no expert named {name!r} in {self.path.name}; experts: "
                                 f"{', '.join(self.experts)}") from None

    # -- lookup
    def tensor(self, name: str, expert: str | int) -> torch.Tensor:
        """Expert ``expert``'s tensor ``name``, rebuilt from the pieces (a new tensor)."""
        i = self.expert_index(expert)
        entry = self.entries[name]
        if entry.kind == "shared":
            return self.pieces[piece_name(name, "shared")].clone()
        if entry.kind == "merged":
            return self.pieces[piece_name(name, "merged")].clone()
        if entry.kind == "expert":
            return self.pieces[piece_name(name, expert_part(i))].clone()
        return self._rebuild(entry, i)

    def _rebuild(self, entry: TensorEntry, expert: int) -> torch.Tensor:
        raise PolymergeError(f"{type(self).__name__} cannot rebuild tensors of kind "
                             f"{entry.kind!r}")

    def _write_into(self, target: torch.Tensor, entry: TensorEntry, expert: int,
                    previous: int | None = None) -> None:
        """Write expert ``expert``'s tensor into ``target`` in place (same shape).

        ``previous``: the expert whose tensor ``target`` holds now (a store may then write
        only what differs)."""
        if entry.kind in ("shared", "merged", "expert"):
            part = {"shared": "shared", "merged": "merged"}.get(entry.kind, expert_part(expert))
            target.copy_(self.pieces[piece_name(entry.name, part)])
            return
        target.copy_(self._rebuild(entry, expert))

    def expert_state_dict(self, name: str | int) -> dict[str, torch.Tensor]:
        """Every tensor of expert ``name``, as in its checkpoint (names, shapes, dtypes)."""
        i = self.expert_index(name)
        return {t: self.tensor(t, i) for t in self.entries}

    COMMON_KINDS: ClassVar[frozenset[str]] = frozenset({"shared", "merged"})
    """Kinds whose tensor is the same for every expert."""

    def apply(self, model: torch.nn.Module, name: str | int, *,
              previous: str | int | None = None) -> None:
        """Load expert ``name``'s weights into ``model`` in place (no new model is made).

        ``previous``: the expert this store last applied to this model; tensors common to all
        experts are then left as they are.
        """
        i = self.expert_index(name)
        skip = self.COMMON_KINDS if previous is not None else frozenset()
        before = self.expert_index(previous) if previous is not None else None
        targets = self.targets(model)
        with torch.no_grad():
            for tname, target in targets.items():
                entry = self.entries[tname]
                if entry.kind not in skip:
                    self._write_into(target, entry, i, before)

    def targets(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Store tensor name -> the model's tensor it goes into (found once per model).

        Names match exactly, or with one common prefix (``bert.`` when a bare encoder's store
        is applied to a model with a head). Model tensors the store lacks (a task head) are
        left alone; a stored float tensor the model lacks is an error.
        """
        cached = self._targets_cache.get(model)
        if cached is not None:
            return cached
        state = model.state_dict(keep_vars=True)
        plain = {k: (v.data if isinstance(v, torch.nn.Parameter) else v)
                 for k, v in state.items()}
        prefix = _common_prefix(self.entries, plain)
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, entry in self.entries.items():
            target = plain.get(prefix + name)
            if target is None:
                if entry.dtype.is_floating_point:
                    raise PolymergeError(f"the model has no tensor {prefix + name!r} for the "
                                         f"store's {name!r}; is it the same architecture?")
                continue  # a buffer the model no longer keeps (e.g. position_ids)
            if tuple(target.shape) != entry.shape:
                raise PolymergeError(f"model tensor {prefix + name!r} has shape "
                                     f"{list(target.shape)}, the store has {list(entry.shape)}")
            ptr = target.data_ptr()
            if ptr in seen:  # tied weights: write once
                continue
            seen.add(ptr)
            out[name] = target
        self._targets_cache[model] = out
        return out

    # -- accounting
    def stored_parameters(self) -> int:
        """Numbers held in the stored pieces, lookup indexes excluded."""
        return int(self.parameter_counts()["stored"])

    def parameter_counts(self) -> dict[str, Any]:
        return parameter_counts(self.entries.values(), len(self.experts))

    def nbytes(self) -> int:
        """Bytes of the pieces held in memory."""
        return sum(t.numel() * t.element_size() for t in self.pieces.values())

    # -- moving and saving
    def to(self, device: str | torch.device) -> Store:
        dev = resolve_device(device)
        self.pieces = {k: v.to(dev) for k, v in self.pieces.items()}
        self._targets_cache.clear()
        return self

    def save(self, out: str | Path, *, force: bool = False,
             shard_size: int | str = DEFAULT_SHARD_BYTES) -> Path:
        """Write this store (pieces, manifest, config, tokenizer, router) to a new folder."""
        from polymerge.merge import parse_size

        out_path = Path(out).expanduser().absolute()
        if out_path == self.path.absolute():
            raise PolymergeError("save: the target is the store's own folder")
        infos = [p for e in self.entries.values() for p in e.pieces]
        with AtomicOutputDir(out_path, force=force) as tmp:
            (tmp / PIECES_DIR).mkdir()
            writer = ShardedWriter(tmp / PIECES_DIR, infos, parse_size(shard_size),
                                   metadata={"polymerge_store": self.method})
            for info in infos:
                writer.write(info.name, self.pieces[info.name].to("cpu", info.dtype))
            writer.close()
            for item in self.path.iterdir():
                if item.name in (PIECES_DIR, MANIFEST_NAME):
                    continue
                if item.is_dir():
                    shutil.copytree(item, tmp / item.name)
                else:
                    shutil.copy2(item, tmp / item.name)
            manifest = dict(self.manifest)
            manifest["files"] = [f"{PIECES_DIR}/{f}" for f in writer.file_names]
            write_manifest(tmp, manifest)
        return out_path

    # -- router
    @property
    def router(self) -> Any:
        """The store's task router, or None (loaded on first use)."""
        if self._router is None and (self.path / ROUTER_DIR).is_dir():
            from polymerge.routing import load_router

            self._router = load_router(self.path / ROUTER_DIR, experts=self.experts)
        return self._router

    def describe(self) -> str:
        """What ``polymerge inspect STORE`` prints."""
        m = self.manifest
        c = self.parameter_counts()
        kinds: dict[str, int] = {}
        for e in self.entries.values():
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        lines = [f"path: {self.path}", f"expert store: {m['method']} (format version "
                 f"{m['format_version']})", f"base: {m.get('base', {}).get('path')}",
                 f"experts ({len(self.experts)}): {', '.join(self.experts)}",
                 "parameters: " + ", ".join(f"{k}={v}" for k, v in m["parameters"].items()),
                 f"dtype: {m['dtype']}",
                 f"tensors: {len(self.entries)} ("
                 + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) + ")",
                 f"one model: {c['model']:,} parameters",
                 f"ensemble of {c['experts']}: {c['ensemble']:,} parameters, "
                 f"{c['ensemble_bytes'] / 1e6:,.1f} MB",
                 f"stored: {c['stored']:,} parameters = {c['ratio']:.1%} of the ensemble "
                 f"(+ {c['index_entries']:,} index entries, {c['index_bytes'] / 1e6:,.2f} MB)",
                 f"stored bytes: {c['stored_bytes'] / 1e6:,.1f} MB = {c['bytes_ratio']:.1%} "
                 "of the ensemble's"]
        for kind, n in sorted(c["stored_by_kind"].items()):
            lines.append(f"  {kind:8s} {n:>14,} parameters")
        if m.get("build_seconds") is not None:
            lines.append(f"build time: {m['build_seconds']:.1f} s")
        router_json = self.path / ROUTER_DIR / "router.json"
        if router_json.is_file():
            info = json.loads(router_json.read_text())
            acc = info.get("metrics", {})
            lines.append("router: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float)
                                                else f"{k}={v}" for k, v in acc.items()))
        else:
            lines.append("router: none (train one with `polymerge router train`)")
        lines.append(self.describe_extra())
        return "\n".join(x for x in lines if x)

    def describe_extra(self) -> str:
        return ""


def _common_prefix(entries: Mapping[str, TensorEntry], model: Mapping[str, torch.Tensor]) -> str:
    float_names = [n for n, e in entries.items() if e.dtype.is_floating_point]
    probe = float_names[0] if float_names else next(iter(entries), "")
    if not probe or probe in model:
        return ""
    candidates = sorted({k[: -len(probe)] for k in model if k.endswith("." + probe)})
    for prefix in candidates:
        if all(prefix + n in model for n in float_names):
            return prefix
    return ""


def open_store(path: str | Path, *, device: str | torch.device = "cpu") -> Store:
    """Load a store folder: check its manifest, read every piece into memory."""
    folder = Path(path).expanduser().absolute()
    manifest = read_manifest(folder)
    spec = get_store_method(manifest.get("method", "?"))
    reader = open_checkpoint(folder / PIECES_DIR, label=f"{folder.name}/{PIECES_DIR}")
    try:
        available = reader.tensors()
        pieces: dict[str, torch.Tensor] = {}
        dev = resolve_device(device)
        for name, data in manifest["tensors"].items():
            for piece in data["pieces"]:
                if piece not in available:
                    raise CheckpointError(f"{folder}: the store is incomplete: piece {piece!r} "
                                          f"of tensor {name!r} is missing")
                pieces[piece] = reader.read(piece).to(dev)
    finally:
        reader.close()
    return spec.store_cls(folder, manifest, pieces)


# ----------------------------------------------------------------------------- export


def export_expert(store: Store | str | Path, expert: str, out: str | Path, *,
                  force: bool = False, shard_size: int | str = DEFAULT_SHARD_BYTES,
                  dtype: str | None = None) -> Path:
    """Write one expert of a store as a standalone HF checkpoint folder."""
    from polymerge.merge import parse_size

    loaded = store if isinstance(store, Store) else open_store(store)
    i = loaded.expert_index(expert)
    out_dtype = parse_dtype(dtype) if dtype else loaded.dtype
    infos = [TensorInfo(n, e.shape, out_dtype if e.dtype.is_floating_point else e.dtype)
             for n, e in loaded.entries.items()]
    out_path = Path(out).expanduser().absolute()
    with AtomicOutputDir(out_path, force=force) as tmp:
        writer = ShardedWriter(tmp, infos, parse_size(shard_size),
                               metadata={"polymerge_store": loaded.method,
                                         "polymerge_expert": loaded.experts[i]})
        for info in infos:
            writer.write(info.name, loaded.tensor(info.name, i).to("cpu", info.dtype))
        writer.close()
        write_config(tmp, loaded.config, out_dtype)
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (loaded.path / name).is_file():
                shutil.copy2(loaded.path / name, tmp / name)
        params = loaded.manifest.get("parameters", {})
        write_model_card(tmp, method=f"{loaded.method} store, expert {loaded.experts[i]}",
                         description=f"expert {loaded.experts[i]!r} rebuilt by lookup from "
                                     f"the store {loaded.path.name}",
                         base=loaded.manifest.get("base", {}).get("path"),
                         inputs=[(loaded.experts[i], str(loaded.path))],
                         recipe_yaml=json.dumps(params, indent=2))
    return out_path


def with_defaults(params: Iterable[Param], **defaults: Any) -> tuple[Param, ...]:
    """The same parameters with some defaults changed (a store's own defaults)."""
    return tuple(replace(p, default=defaults[p.name]) if p.name in defaults else p
                 for p in params)


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
    method = get_method(name)
    if "sparsification" not in method.extra:
        raise RecipeError(f"{store}: {name} is not a task-arithmetic-family method")
    return method


def compile_scope(pattern: str, where: str = "scope") -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RecipeError(f"{where}: {pattern!r} is not a valid regular expression ({exc})") \
            from None
