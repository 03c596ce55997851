"""Read-only access to a checkpoint's tensors, one at a time, through memory-mapped safetensors.

A checkpoint is an HF model folder (``model.safetensors`` or shards with an index), a bare
``.safetensors`` file, a PEFT LoRA adapter folder (see :mod:`polymerge.io.lora`) or, only when
explicitly allowed, a pickled ``.bin``/``.pt`` file. Headers are read without touching tensor
data, so validation is cheap; ``read`` materializes a single tensor.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from polymerge.errors import CheckpointError
from polymerge.io.dtypes import SAFETENSORS_TO_TORCH, element_size

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


class Checkpoint(Protocol):
    """Anything polymerge can read tensors from."""

    path: Path
    label: str

    @property
    def config(self) -> dict[str, Any] | None: ...

    def tensors(self) -> dict[str, TensorInfo]: ...

    def read(self, name: str) -> torch.Tensor: ...

    def close(self) -> None: ...


def read_safetensors_layout(path: Path) -> dict[str, tuple[TensorInfo, int, int]]:
    """Parse a safetensors header (8-byte length + JSON) without reading tensor data.

    Returns, per tensor, its info and its absolute byte range in the file.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 1024 * 1024:
                raise CheckpointError(f"{path}: safetensors header too large ({length} bytes)")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors header ({exc})") from exc
    data_start = 8 + length
    layout: dict[str, tuple[TensorInfo, int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_TO_TORCH.get(entry.get("dtype", ""))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype "
                                  f"{entry.get('dtype')!r}")
        info = TensorInfo(name, tuple(entry["shape"]), dtype)
        begin, end = entry["data_offsets"]
        if end - begin != info.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} header size does not match its shape")
        layout[name] = (info, data_start + begin, data_start + end)
    return layout


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of a safetensors file, from its header alone."""
    return {name: info for name, (info, _, _) in read_safetensors_layout(path).items()}


class SafetensorsCheckpoint:
    """An HF model folder or bare safetensors file.

    Tensors are read with positional reads into fresh buffers rather than through a memory map:
    the bytes still come from the page cache, but pages already consumed do not accumulate in
    the process's resident set, so peak memory stays a few tensors whatever the model size.
    """

    def __init__(self, path: Path, files: dict[str, Path], label: str | None = None) -> None:
        self.path = path
        self.label = label or path.name
        self._file_of = files  # tensor name -> shard file
        self._layout: dict[str, tuple[TensorInfo, int, int]] | None = None
        self._fds: dict[Path, int] = {}

    @property
    def config(self) -> dict[str, Any] | None:
        cfg = self.path / "config.json" if self.path.is_dir() else None
        if cfg is None or not cfg.exists():
            return None
        try:
            return json.loads(cfg.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{cfg}: invalid JSON ({exc})") from exc

    def _tensor_layout(self) -> dict[str, tuple[TensorInfo, int, int]]:
        if self._layout is None:
            layout: dict[str, tuple[TensorInfo, int, int]] = {}
            for shard in sorted(set(self._file_of.values())):
                for name, entry in read_safetensors_layout(shard).items():
                    if self._file_of.get(name) == shard:
                        layout[name] = entry
            missing = set(self._file_of) - set(layout)
            if missing:
                name = sorted(missing)[0]
                raise CheckpointError(f"{self.label}: index lists tensor {name!r} but "
                                      f"{self._file_of[name].name} does not contain it")
            self._layout = layout
        return self._layout

    def tensors(self) -> dict[str, TensorInfo]:
        return {name: info for name, (info, _, _) in self._tensor_layout().items()}

    def read(self, name: str) -> torch.Tensor:
        try:
            info, begin, end = self._tensor_layout()[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: no tensor named {name!r}") from None
        shard = self._file_of[name]
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(shard, os.O_RDONLY)
            self._fds[shard] = fd
        out = torch.empty(info.shape, dtype=info.dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < end - begin:
            got = os.preadv(fd, [buffer[done:]], begin + done)
            if got <= 0:
                raise CheckpointError(f"{self.label}: {shard.name} is truncated at tensor "
                                      f"{name!r}")
            done += got
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class PickleCheckpoint:
    """A pickled state dict, loaded with ``weights_only=True`` (only when the user allows it)."""

    def __init__(self, path: Path, files: list[Path], label: str | None = None) -> None:
        self.path = path
        self.label = label or path.name
        self._state: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types here
                raise CheckpointError(f"{file}: cannot load with weights_only=True ({exc})") \
                    from exc
            if not isinstance(state, dict):
                raise CheckpointError(f"{file}: expected a state dict, got {type(state).__name__}")
            self._state.update(state)

    @property
    def config(self) -> dict[str, Any] | None:
        cfg = self.path / "config.json" if self.path.is_dir() else None
        return json.loads(cfg.read_text()) if cfg is not None and cfg.exists() else None

    def tensors(self) -> dict[str, TensorInfo]:
        return {n: TensorInfo(n, tuple(t.shape), t.dtype) for n, t in self._state.items()}

    def read(self, name: str) -> torch.Tensor:
        try:
            return self._state[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: no tensor named {name!r}") from None

    def close(self) -> None:
        self._state.clear()


def _index_files(folder: Path, index_path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{index_path}: invalid index ({exc})") from exc
    files = {name: folder / shard for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
        if not shard.exists():
            raise CheckpointError(f"{folder}: shard {shard.name} listed in the index is missing")
    return files


def _single_file(path: Path) -> dict[str, Path]:
    return {name: path for name in read_safetensors_header(path)}


def is_lora_adapter(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").exists()


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False, label: str | None = None,
                    base: Checkpoint | None = None) -> Checkpoint:
    """Open a checkpoint for streaming reads; refuse pickles unless ``allow_pickle``.

    ``base`` is needed only for LoRA adapters, whose weights are defined relative to it.
    """
    path = Path(path).expanduser()
    label = label or path.name
    if not path.exists():
        raise CheckpointError(f"{label}: path {path} does not exist")
    if is_lora_adapter(path):
        from polymerge.io.lora import LoraCheckpoint

        if base is None:
            raise CheckpointError(f"{label}: {path} is a LoRA adapter; it needs a base_model")
        return LoraCheckpoint(path, base, label=label)
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint(path, _single_file(path), label)
        if path.suffix in PICKLE_SUFFIXES:
            return _pickle_or_refuse(path, [path], allow_pickle, label)
        raise CheckpointError(f"{label}: {path} is not a .safetensors file")
    if (path / INDEX_NAME).exists():
        return SafetensorsCheckpoint(path, _index_files(path, path / INDEX_NAME), label)
    if (path / SINGLE_NAME).exists():
        return SafetensorsCheckpoint(path, _single_file(path / SINGLE_NAME), label)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return _pickle_or_refuse(path, pickles, allow_pickle, label)
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return SafetensorsCheckpoint(path, _single_file(singles[0]), label)
    raise CheckpointError(f"{label}: no model.safetensors, {INDEX_NAME} or adapter_config.json "
                          f"in {path}")


def _pickle_or_refuse(path: Path, files: list[Path], allow: bool, label: str) -> Checkpoint:
    if not allow:
        raise CheckpointError(
            f"{label}: {files[0].name} is a pickled checkpoint, which can run arbitrary code when "
            "loaded; convert it to safetensors, or pass --allow-pickle to load it with "
            "torch.load(weights_only=True)")
    return PickleCheckpoint(path, files, label)
