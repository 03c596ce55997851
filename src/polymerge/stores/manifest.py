"""The expert-store folder format: manifest, piece names, tensor entries, parameter counts.

An expert store is a folder::

    polymerge_store.json   manifest: format version, method, experts, base, parameters,
                           every tensor's kind and pieces, parameter counts
    pieces/                safetensors shard(s) of the stored pieces (``<tensor>@<part>``)
    config.json, tokenizer files, polymerge_recipe.yaml, README.md
    router/                optional task router (see :mod:`polymerge.routing`)

Pieces live under ``pieces/`` so the folder is never mistaken for a model checkpoint. Kinds
every store can use: ``shared`` (non-float buffers copied from the base), ``expert`` (one copy
per expert) and ``merged`` (one static merge of all experts); a store adds its own kinds.

Format version 2 adds an optional ``heads`` section, written when the experts are task classes
(``...ForSequenceClassification``...): per expert, its config (labels and all) and its head
tensors under the names its own class uses, each stored as the piece ``<tensor>@head.<i>``;
``prefix`` / ``base_prefix`` map the body's names (the base's) onto the expert's own. A store
without heads is still written as version 1, so older readers open it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymerge.errors import CheckpointError, RecipeError
from polymerge.io.checkpoint import TensorInfo, contained_file, read_json_file
from polymerge.io.dtypes import dtype_name, element_size, parse_dtype
from polymerge.plan import TensorJob

FORMAT_VERSION = 2
"""The newest format this code reads and writes (2: with task heads)."""
BASE_VERSION = 1
"""The version of a store without heads."""
FORMAT_NAME = "polymerge-expert-store"
MANIFEST_NAME = "polymerge_store.json"
PIECES_DIR = "pieces"
ROUTER_DIR = "router"
_PIECE_SEP = "@"


def piece_name(tensor: str, part: str) -> str:
    """Name of one stored piece of a tensor, e.g. ``model.layers.0.mlp.up_proj.weight@groups``."""
    return f"{tensor}{_PIECE_SEP}{part}"


def expert_part(index: int) -> str:
    return f"expert.{index}"


def head_part(index: int) -> str:
    """The piece part of expert ``index``'s head tensors."""
    return f"head.{index}"



@dataclass(frozen=True)
class TensorEntry:
    """How one model tensor is stored: its kind and the pieces written for it.

    ``index`` names the pieces that are lookup metadata (not weights); they are counted apart
    from the stored parameters. ``packed`` names the ``uint8`` pieces that hold bits packed 8
    to a byte (1-bit masks and signs, :mod:`polymerge.stores.bits`); they count by their bytes.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[TensorInfo, ...]
    index: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    packed: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "shape": list(self.shape),
                               "dtype": dtype_name(self.dtype),
                               "pieces": {p.name: {"shape": list(p.shape),
                                                   "dtype": dtype_name(p.dtype)}
                                          for p in self.pieces}}
        if self.index:
            out["index"] = list(self.index)
        if self.packed:
            out["packed"] = list(self.packed)
        if self.extra:
            out["extra"] = self.extra
        return out

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> TensorEntry:
        pieces = tuple(TensorInfo(p, tuple(v["shape"]), parse_manifest_dtype(v["dtype"]))
                       for p, v in data["pieces"].items())
        return cls(name, data["kind"], tuple(data["shape"]),
                   parse_manifest_dtype(data["dtype"]), pieces,
                   tuple(data.get("index", ())), dict(data.get("extra", {})),
                   tuple(data.get("packed", ())))


def parse_manifest_dtype(name: str) -> torch.dtype:
    """A dtype named in a manifest (one of ours, or any torch dtype name)."""
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


def parameter_counts(entries: Iterable[TensorEntry], n_experts: int,
                     heads: Iterable[TensorInfo] = ()) -> dict[str, Any]:
    """Stored parameters against the ensemble of ``n_experts`` full models.

    ``model``: parameters of one model's body (every tensor, buffers included); ``ensemble``:
    N times that plus every expert's head (``heads``: the stored head pieces); ``stored``:
    numbers in the stored pieces (heads included, also counted as ``heads``) except lookup
    indexes, which are counted apart (``index_entries``, ``index_bytes``); byte counts cover
    everything stored.
    Packed pieces (bits, 8 to a byte) count as the parameters of the tensor's dtype their bytes
    would hold, rounded up per piece: a 1-bit mask of a float32 tensor of n entries is n/8
    bytes, n/32 parameters; ``packed_bits`` and ``packed_bytes`` count them apart too.
    """
    entries = list(entries)
    heads = list(heads)
    model = sum(e.numel for e in entries)
    model_bytes = sum(e.numel * element_size(e.dtype) for e in entries)
    stored = index_entries = stored_bytes = index_bytes = packed_bytes = 0
    by_kind: dict[str, int] = {}
    for e in entries:
        for p in e.pieces:
            stored_bytes += p.nbytes
            if p.name in e.index:
                index_entries += p.numel
                index_bytes += p.nbytes
                continue
            count = p.numel
            if p.name in e.packed:
                packed_bytes += p.nbytes
                count = -(-p.nbytes // element_size(e.dtype))
            stored += count
            by_kind[e.kind] = by_kind.get(e.kind, 0) + count
    head_numel = sum(h.numel for h in heads)
    head_bytes = sum(h.nbytes for h in heads)
    if heads:
        by_kind["head"] = head_numel
    stored += head_numel
    stored_bytes += head_bytes
    ensemble = n_experts * model + head_numel
    ensemble_bytes = n_experts * model_bytes + head_bytes
    counts = {"experts": n_experts, "model": model, "ensemble": ensemble, "stored": stored,
              "stored_by_kind": by_kind, "index_entries": index_entries,
              "index_bytes": index_bytes, "packed_bits": 8 * packed_bytes,
              "packed_bytes": packed_bytes, "stored_bytes": stored_bytes,
              "ensemble_bytes": ensemble_bytes,
              "ratio": stored / ensemble if ensemble else float("nan"),
              "bytes_ratio": stored_bytes / ensemble_bytes if ensemble_bytes else
              float("nan")}
    if heads:
        counts["heads"] = head_numel
        counts["head_bytes"] = head_bytes
    return counts


@dataclass(frozen=True)
class HeadEntry:
    """One expert's head in a store: its config and tensors (own names -> stored pieces)."""

    expert: str
    config: dict[str, Any]
    prefix: str
    base_prefix: str
    tensors: dict[str, TensorInfo]
    """The expert's own tensor name -> the stored piece (its name, shape and dtype)."""

    def expert_name(self, body: str) -> str:
        """The expert's own name of the body tensor ``body`` (a base name)."""
        if body.startswith(self.base_prefix):
            return self.prefix + body[len(self.base_prefix):]
        return body

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "base_prefix": self.base_prefix, "config": self.config,
                "tensors": {n: {"piece": p.name, "shape": list(p.shape),
                                "dtype": dtype_name(p.dtype)} for n, p in self.tensors.items()}}

    @classmethod
    def from_json(cls, expert: str, data: Mapping[str, Any]) -> HeadEntry:
        tensors = {n: TensorInfo(v["piece"], tuple(v["shape"]), parse_manifest_dtype(v["dtype"]))
                   for n, v in data["tensors"].items()}
        return cls(expert, dict(data["config"]), str(data.get("prefix", "")),
                   str(data.get("base_prefix", "")), tensors)


def head_entries(heads: Iterable[Any], out_dtype: torch.dtype) -> list[HeadEntry]:
    """The manifest entries of a plan's heads (:class:`polymerge.plan.HeadSpec`): float
    tensors stored in the output dtype, others as they are."""
    out = []
    for h in heads:
        tensors = {n: TensorInfo(piece_name(n, head_part(h.index)), i.shape,
                                 out_dtype if i.dtype.is_floating_point else i.dtype)
                   for n, i in h.tensors.items()}
        out.append(HeadEntry(h.expert, dict(h.config or {}), h.prefix, h.base_prefix, tensors))
    return out



def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")



def is_store(path: str | Path) -> bool:
    """True when ``path`` is a folder with a store manifest."""
    return (Path(path).expanduser() / MANIFEST_NAME).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a store folder, checked: format, version and every listed file."""
    folder = Path(path).expanduser()
    file = folder / MANIFEST_NAME
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such store")
    if not os.path.lexists(file):
        raise CheckpointError(f"{folder}: not an expert store (no {MANIFEST_NAME})")
    manifest = read_json_file(contained_file(folder, MANIFEST_NAME, "store manifest"),
                              "store manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{file}: not a polymerge store manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{file}: the manifest has no valid format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}: store format version {version} is newer than this polymerge reads "
            f"(up to {FORMAT_VERSION}); upgrade polymerge to load it")
    check_manifest(manifest, file)
    missing = [f for f in manifest["files"] if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: the store is incomplete: {missing[0]} is missing "
                              f"({len(missing)} missing file(s)); rebuild or re-copy it")
    return manifest


EXPERT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
"""A plain expert name: a store uses it as a folder name (``export --expert all``), so it may
not hold a path separator, start with a dot or a dash, or be empty."""


def check_expert_name(name: Any, where: str) -> str:
    """``name`` when it is a plain name, else a one-line error naming ``where``."""
    if not isinstance(name, str) or not EXPERT_NAME.match(name):
        raise CheckpointError(f"{where}: expert name {name!r} is not a plain name (letters, "
                              "digits, '_', '.', '+', '-'; no path separators); set `name:` "
                              "in the recipe")
    return name


def check_manifest(manifest: dict[str, Any], where: Path) -> None:
    """The manifest's structure, before anything trusts it: plain unique expert names, every
    tensor entry well formed, and listed files that stay inside the store's ``pieces/``."""
    experts = manifest.get("experts")
    if not isinstance(experts, list) or not experts:
        raise CheckpointError(f"{where}: the manifest lists no experts")
    for name in experts:
        check_expert_name(name, str(where))
    if len(set(experts)) != len(experts):
        raise CheckpointError(f"{where}: the manifest names an expert twice")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise CheckpointError(f"{where}: the manifest's 'files' is not a list of file names")
    for f in files:
        parts = Path(f).parts
        if len(parts) != 2 or parts[0] != PIECES_DIR or parts[1] in (".", "..") \
                or Path(f).is_absolute():
            raise CheckpointError(f"{where}: listed file {f!r} is not inside {PIECES_DIR}/")
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        raise CheckpointError(f"{where}: the manifest lists no tensors")
    if not isinstance(manifest.get("dtype"), str):
        raise CheckpointError(f"{where}: the manifest has no dtype")
    if not parse_manifest_dtype(manifest["dtype"]).is_floating_point:
        raise CheckpointError(f"{where}: the manifest's dtype {manifest['dtype']!r} is not a "
                              "float dtype")
    if not isinstance(manifest.get("method"), str):
        raise CheckpointError(f"{where}: the manifest names no method")
    for key in ("base", "parameters", "summary", "parameter_counts", "engine"):
        if not isinstance(manifest.get(key, {}), dict):
            raise CheckpointError(f"{where}: the manifest's {key!r} is not an object")
    base_path = manifest.get("base", {}).get("path")
    if base_path is not None and not isinstance(base_path, str):
        raise CheckpointError(f"{where}: the manifest's base path is not a string")
    seconds = manifest.get("build_seconds")
    if seconds is not None and (isinstance(seconds, bool)
                                or not isinstance(seconds, (int, float))):
        raise CheckpointError(f"{where}: the manifest's build_seconds is not a number")
    for name, data in tensors.items():
        try:
            entry = TensorEntry.from_json(name, data)
            ok = all(isinstance(d, int) and d >= 0 for d in entry.shape) and \
                all(isinstance(d, int) and d >= 0 for p in entry.pieces for d in p.shape)
        except (KeyError, TypeError, AttributeError, ValueError):
            ok = False
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: tensor {name!r}: {exc}") from None
        if not ok or not isinstance(data.get("kind"), str):
            raise CheckpointError(f"{where}: tensor {name!r} has a malformed entry")
        pieces = {p.name: p for p in entry.pieces}
        for packed in entry.packed:
            if packed not in pieces or pieces[packed].dtype != torch.uint8:
                raise CheckpointError(f"{where}: tensor {name!r}: packed piece {packed!r} is "
                                      "not one of its uint8 pieces")
    _check_heads(manifest, experts, where)


def _check_heads(manifest: dict[str, Any], experts: list[str], where: Path) -> None:
    heads = manifest.get("heads")
    if heads is None:
        return
    if manifest.get("format_version", 0) < 2:
        raise CheckpointError(f"{where}: a version {manifest.get('format_version')} manifest "
                              "cannot have heads")
    if not isinstance(heads, dict):
        raise CheckpointError(f"{where}: the manifest's 'heads' is not an object")
    seen: set[str] = {p for data in manifest["tensors"].values() for p in data["pieces"]}
    for expert, data in heads.items():
        if expert not in experts:
            raise CheckpointError(f"{where}: a head for {expert!r}, which is not an expert")
        try:
            entry = HeadEntry.from_json(expert, data)
            ok = isinstance(data["config"], dict) and isinstance(data.get("prefix", ""), str) \
                and isinstance(data.get("base_prefix", ""), str) and all(
                    isinstance(d, int) and d >= 0 for p in entry.tensors.values()
                    for d in p.shape)
        except (KeyError, TypeError, AttributeError, ValueError):
            ok = False
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: head of {expert!r}: {exc}") from None
        if not ok:
            raise CheckpointError(f"{where}: the head of {expert!r} has a malformed entry")
        for info in entry.tensors.values():
            if info.name in seen:
                raise CheckpointError(f"{where}: head piece {info.name!r} is listed twice")
            seen.add(info.name)
