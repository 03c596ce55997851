"""A loaded expert store: its pieces in memory and the lookup that rebuilds any expert.

The :class:`Store` only looks up: it rebuilds a tensor of an expert, writes an expert's weights
into a working model in place, and counts what is stored. Building a store is
:mod:`polymerge.stores.build`, writing an expert out is :mod:`polymerge.stores.export`, serving
one is :mod:`polymerge.runtime`.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from polymerge import registry
from polymerge.engine import check_finite, resolve_device
from polymerge.errors import CheckpointError, PolymergeError
from polymerge.io.checkpoint import (
    contained_file,
    open_checkpoint,
    read_json_file,
    read_model_config,
)
from polymerge.io.dtypes import dtype_name
from polymerge.io.pretrained import contained_dir
from polymerge.stores.manifest import (
    PIECES_DIR,
    ROUTER_DIR,
    HeadEntry,
    TensorEntry,
    expert_part,
    parameter_counts,
    parse_manifest_dtype,
    piece_name,
    read_manifest,
)


class Store:
    """A loaded expert store: its pieces in memory and the lookup that rebuilds an expert.

    Subclasses implement :meth:`_rebuild` (and may speed up :meth:`_write_into`) for their own
    tensor kinds; ``shared``, ``expert`` and ``merged`` tensors are handled here.
    """

    method: ClassVar[str] = ""
    serving: ClassVar[str] = "switch"
    """How a runtime serves this store: ``switch`` (one expert's weights written into a
    working model by lookup) or ``mix`` (per-input soft mixtures of experts)."""

    def __init__(self, path: Path, manifest: dict[str, Any],
                 pieces: dict[str, torch.Tensor]) -> None:
        self.path = path
        self.manifest = manifest
        self.pieces = pieces
        self.experts: list[str] = list(manifest["experts"])
        self.entries = {name: TensorEntry.from_json(name, data)
                        for name, data in manifest["tensors"].items()}
        self.heads: dict[str, HeadEntry] = {
            name: HeadEntry.from_json(name, data)
            for name, data in (manifest.get("heads") or {}).items()}
        """Per expert with a task head: its config and head pieces (format version 2)."""
        for entry in self.entries.values():
            why = self.check_entry(entry)
            if why is not None:
                raise CheckpointError(f"{path}: tensor {entry.name!r}: {why}; the store was "
                                      "altered")
        self._targets_cache: weakref.WeakKeyDictionary[torch.nn.Module,
                                                      dict[str, torch.Tensor]] = \
            weakref.WeakKeyDictionary()

    # -- identity
    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.path} method={self.method} "
                f"experts={self.experts}>")

    @property
    def dtype(self) -> torch.dtype:
        return parse_manifest_dtype(self.manifest["dtype"])

    @property
    def device(self) -> torch.device:
        for t in self.pieces.values():
            return t.device
        return torch.device("cpu")

    @property
    def summary(self) -> dict[str, Any]:
        """What the builder's finalize step recorded over the whole model (the manifest's
        ``summary``: reconstruction errors, global rescalers, ...)."""
        return dict(self.manifest.get("summary", {}))

    @property
    def config(self) -> dict[str, Any] | None:
        return read_model_config(self.path)  # a JSON object inside the store, or None

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

    def check_entry(self, entry: TensorEntry) -> str | None:
        """Why ``entry``'s pieces cannot rebuild a tensor of its shape (a tampered manifest),
        or None; checked at open. A subclass checks its own kinds and calls this for the rest
        (an unknown kind is refused when it is looked up)."""
        if entry.kind in ("shared", "merged"):
            need = [piece_name(entry.name, entry.kind)]
        elif entry.kind == "expert":
            need = [piece_name(entry.name, expert_part(i)) for i in range(len(self.experts))]
        else:
            return None
        have = {p.name: p for p in entry.pieces}
        for name in need:
            if name not in have or have[name].shape != entry.shape:
                return f"piece {name!r} is missing or not of shape {list(entry.shape)}"
        return None

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
        """Every tensor of expert ``name``, as in its checkpoint (names, shapes, dtypes): with
        a task head, the body under the names the expert's own class uses plus its head."""
        i = self.expert_index(name)
        head = self.heads.get(self.experts[i])
        if head is None:
            return {t: self.tensor(t, i) for t in self.entries}
        out = {head.expert_name(t): self.tensor(t, i) for t in self.entries}
        out.update(self.head_tensors(i))
        return out

    # -- heads
    @property
    def has_heads(self) -> bool:
        """True for a store of task experts (``...ForSequenceClassification``...)."""
        return bool(self.heads)

    def head_tensors(self, expert: str | int) -> dict[str, torch.Tensor]:
        """Expert ``expert``'s head tensors, under the names its own class uses (copies)."""
        head = self.heads.get(self.experts[self.expert_index(expert)])
        if head is None:
            return {}
        return {n: self.pieces[p.name].clone() for n, p in head.tensors.items()}

    def expert_config(self, expert: str | int) -> dict[str, Any] | None:
        """The config an exported expert gets: its own (labels and all) when it has a head,
        else the store's."""
        head = self.heads.get(self.experts[self.expert_index(expert)])
        return dict(head.config) if head is not None else self.config

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
        prefix, strip = _common_prefix(self.entries, plain)
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, entry in self.entries.items():
            mapped = prefix + name[len(strip):]
            target = plain.get(mapped)
            if target is None:
                if entry.dtype.is_floating_point:
                    raise PolymergeError(f"the model has no tensor {mapped!r} for the "
                                         f"store's {name!r}; is it the same architecture?")
                continue  # a buffer the model no longer keeps (e.g. position_ids)
            if tuple(target.shape) != entry.shape:
                raise PolymergeError(f"model tensor {mapped!r} has shape "
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
        return parameter_counts(self.entries.values(), len(self.experts),
                                [p for h in self.heads.values() for p in h.tensors.values()])

    def nbytes(self) -> int:
        """Bytes of the pieces held in memory."""
        return sum(t.numel() * t.element_size() for t in self.pieces.values())

    # -- moving
    def to(self, device: str | torch.device) -> Store:
        dev = resolve_device(device)
        self.pieces = {k: v.to(dev) for k, v in self.pieces.items()}
        self._targets_cache.clear()
        return self


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
                 "of the ensemble's"
                 + (f" (of which {c['packed_bytes'] / 1e6:,.2f} MB of bits packed 8 to a byte, "
                    "counted by their bytes)" if c.get("packed_bytes") else "")]
        for kind, n in sorted(c["stored_by_kind"].items()):
            lines.append(f"  {kind:8s} {n:>14,} parameters")
        if m.get("build_seconds") is not None:
            lines.append(f"build time: {m['build_seconds']:.1f} s")
        router_json = self.path / ROUTER_DIR / "router.json"
        if os.path.lexists(router_json):
            try:
                info = read_json_file(contained_file(self.path, Path(ROUTER_DIR, "router.json"),
                                                     "router record"), "router record")
                acc = info.get("metrics", {}) if isinstance(info, dict) else None
            except CheckpointError as exc:
                info, acc = None, str(exc)
            if not isinstance(acc, dict):
                acc = {"unreadable": acc if isinstance(acc, str) else "not a JSON object"}
            lines.append("router: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float)
                                                else f"{k}={v}" for k, v in acc.items()))
        else:
            lines.append("router: none (train one with `polymerge router train`)")
        for expert, head in self.heads.items():
            labels = head.config.get("id2label") or {}
            shown = ", ".join(str(v) for v in list(labels.values())[:6]) + \
                (", ..." if len(labels) > 6 else "")
            lines.append(f"head of {expert}: {(head.config.get('architectures') or ['?'])[0]}, "
                         f"{len(labels)} label(s){': ' + shown if labels else ''}; "
                         + ", ".join(f"{n} {list(p.shape)}" for n, p in head.tensors.items()))
        lines.append(self.describe_extra())
        return "\n".join(x for x in lines if x)

    def describe_extra(self) -> str:
        return ""


def _common_prefix(entries: Mapping[str, TensorEntry], model: Mapping[str, torch.Tensor]
                   ) -> tuple[str, str]:
    """``(prefix, strip)``: the model's tensor of the store's ``name`` is
    ``prefix + name[len(strip):]`` (``bert.`` added for a bare encoder's store applied to a
    model with a head; ``model.`` stripped for a causal LM's store applied to its backbone)."""
    float_names = [n for n, e in entries.items() if e.dtype.is_floating_point]
    probe = float_names[0] if float_names else next(iter(entries), "")
    if not probe or probe in model:
        return "", ""
    strip = probe.split(".", 1)[0] + "."
    if "." in probe and all(n.startswith(strip) and n[len(strip):] in model
                            for n in float_names):
        return "", strip
    return _added_prefix(float_names, probe, model), ""


def _added_prefix(float_names: list[str], probe: str, model: Mapping[str, torch.Tensor]) -> str:
    candidates = sorted({k[: -len(probe)] for k in model if k.endswith("." + probe)})
    for prefix in candidates:
        if all(prefix + n in model for n in float_names):
            return prefix
    return ""


def open_store(path: str | Path, *, device: str | torch.device = "cpu") -> Store:
    """Load a store folder: check its manifest, read every piece into memory."""
    folder = Path(path).expanduser().absolute()
    manifest = read_manifest(folder)
    method = manifest.get("method", "?")
    entry = registry.get(method) if method in registry.method_names("store") else None
    if entry is None:
        raise CheckpointError(f"{folder}: store method {method!r} is not known here; store "
                              f"methods: {', '.join(registry.method_names('store'))}")
    contained_dir(folder, PIECES_DIR, "store")  # not a link out of the store
    reader = open_checkpoint(folder / PIECES_DIR, label=f"{folder.name}/{PIECES_DIR}")
    try:
        available = reader.tensors()
        pieces: dict[str, torch.Tensor] = {}
        dev = resolve_device(device)
        wanted = [(name, info) for name, data in manifest["tensors"].items()
                  for info in TensorEntry.from_json(name, data).pieces]
        wanted += [(f"head of {expert}", info) for expert, data in
                   (manifest.get("heads") or {}).items()
                   for info in HeadEntry.from_json(expert, data).tensors.values()]
        for name, info in wanted:
            have = available.get(info.name)
            if have is None:
                raise CheckpointError(f"{folder}: the store is incomplete: piece "
                                      f"{info.name!r} ({name}) is missing")
            if have.shape != info.shape or have.dtype != info.dtype:
                raise CheckpointError(
                    f"{folder}: piece {info.name!r} is {list(have.shape)} "
                    f"{dtype_name(have.dtype)} but the manifest says {list(info.shape)} "
                    f"{dtype_name(info.dtype)}; the store was altered")
            tensor = reader.read(info.name)
            check_finite(tensor, f"store {folder.name}", info.name)
            pieces[info.name] = tensor.to(dev)
    finally:
        reader.close()
    return entry.store_cls(folder, manifest, pieces)  # type: ignore[attr-defined]
