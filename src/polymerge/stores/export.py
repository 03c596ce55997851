"""Write one expert of a store as a standalone HF checkpoint folder.

An expert with a task head comes out as an ordinary checkpoint of its own class
(``...ForSequenceClassification`` with its labels): the body the store rebuilds for it, under
the names its class uses, plus its head, with its own config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from polymerge.engine import write_tensors
from polymerge.errors import PolymergeError
from polymerge.io.checkpoint import TensorInfo
from polymerge.io.dtypes import parse_dtype
from polymerge.io.hf_files import write_output_extras
from polymerge.io.writer import AtomicOutputDir, check_output_target
from polymerge.registry import DEFAULT_SHARD_SIZE, parse_size
from polymerge.stores.store import Store, open_store


def export_target(store: Store | str | Path, out: str | Path, *, force: bool) -> Path:
    """The absolute output path of an export, checked: it may not be, contain or sit inside
    the store (``--force`` would destroy it), and it must be a valid target."""
    out_path = Path(out).expanduser().absolute()
    source = Path(store.path if isinstance(store, Store) else store).expanduser().resolve()
    target = out_path.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise PolymergeError(f"output {out} overlaps the store {source}; choose another output "
                             "folder (the store is never modified)")
    check_output_target(out_path, force=force)
    return out_path


def export_expert(store: Store | str | Path, expert: str, out: str | Path, *,
                  force: bool = False, shard_size: int | str = DEFAULT_SHARD_SIZE,
                  dtype: str | None = None) -> Path:
    """Write expert ``expert`` of a store as an HF checkpoint folder at ``out`` (atomically)."""
    out_path = export_target(store, out, force=force)
    max_shard = parse_size(shard_size)
    loaded = store if isinstance(store, Store) else open_store(store)
    i = loaded.expert_index(expert)
    name = loaded.experts[i]
    out_dtype = parse_dtype(dtype) if dtype else loaded.dtype

    def typed(dt: torch.dtype) -> torch.dtype:
        return out_dtype if dt.is_floating_point else dt

    head = loaded.heads.get(name)
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    infos = []
    for n, e in loaded.entries.items():  # the body, under the expert's own names
        own = head.expert_name(n) if head is not None else n
        readers[own] = lambda _n=n: loaded.tensor(_n, i)
        infos.append(TensorInfo(own, e.shape, typed(e.dtype)))
    if head is not None:  # its head, as it came
        for own, piece in head.tensors.items():
            readers[own] = lambda _p=piece.name: loaded.pieces[_p]
            infos.append(TensorInfo(own, piece.shape, typed(piece.dtype)))
    with AtomicOutputDir(out_path, force=force, kind="model") as tmp:
        write_tensors(tmp, infos, lambda tensor: readers[tensor](),
                      max_shard_bytes=max_shard,
                      metadata={"polymerge_store": loaded.method, "polymerge_expert": name})
        params = loaded.manifest.get("parameters", {})
        write_output_extras(
            tmp, config=loaded.expert_config(i), dtype=out_dtype, support_dir=loaded.path,
            method=f"{loaded.method} store, expert {name}",
            description=f"expert {name!r} rebuilt by lookup from the store {loaded.path.name}",
            base=loaded.manifest.get("base", {}).get("path"),
            inputs=[(name, str(loaded.path))], recipe_yaml=json.dumps(params, indent=2),
            write_recipe=False)
    return out_path
