"""Atomic, streaming output: shards laid out from the plan and filled one tensor at a time.

Because the engine knows every output tensor's name, shape and dtype before it starts, the shard
layout and safetensors headers are written up front and each tensor's bytes go straight to their
offset. Memory never holds a shard buffer, and tensors may arrive in any order.
Everything goes to a temporary folder beside the target that is renamed into place at the end,
so a failure or Ctrl-C never leaves a partial output.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from polymerge.errors import CheckpointError, PolymergeError
from polymerge.io.checkpoint import INDEX_NAME, SINGLE_NAME, TensorInfo
from polymerge.io.dtypes import TORCH_TO_SAFETENSORS

_ALIGN = 8


class AtomicOutputDir:
    """A temporary folder that becomes ``target`` only if the ``with`` block succeeds."""

    def __init__(self, target: str | Path, *, force: bool = False) -> None:
        self.target = Path(target).expanduser().absolute()
        self.force = force
        check_output_target(self.target, force=force)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide the output
        # from other users. mkdir honours the umask like any other folder.
        name = f".{self.target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp = self.target.parent / name
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            # Only reached with force: move the old output aside, then swap.
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            self.target.rename(old)
            self.tmp.rename(self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.target)


def check_output_target(target: Path, *, force: bool) -> None:
    """Refuse an existing non-empty target unless forced, and a target that is a file."""
    if target.exists():
        if not target.is_dir():
            raise PolymergeError(f"output {target} exists and is not a folder")
        if any(target.iterdir()) and not force:
            raise PolymergeError(f"output folder {target} is not empty; pass --force to "
                                 "replace it")


def plan_shards(infos: list[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Greedy contiguous packing in the given order; a tensor bigger than a shard gets its own."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


class ShardedWriter:
    """Writes planned tensors into pre-laid-out safetensors shards inside ``folder``."""

    def __init__(self, folder: Path, infos: list[TensorInfo], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> None:
        if max_shard_bytes <= 0:
            raise PolymergeError("shard size must be positive")
        self.folder = folder
        self._shards = plan_shards(infos, max_shard_bytes)
        n = len(self._shards)
        self.file_names = [SINGLE_NAME] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._where: dict[str, tuple[int, int, TensorInfo]] = {}
        self._files: list[BinaryIO] = []
        self._written: set[str] = set()
        meta = {"format": "pt", **(metadata or {})}
        pairs = zip(self._shards, self.file_names, strict=True)
        for index, (shard, file_name) in enumerate(pairs):
            header: dict[str, object] = {"__metadata__": meta}
            relative: dict[str, int] = {}
            offset = 0
            for info in shard:
                header[info.name] = {"dtype": TORCH_TO_SAFETENSORS[info.dtype],
                                     "shape": list(info.shape),
                                     "data_offsets": [offset, offset + info.nbytes]}
                relative[info.name] = offset
                offset += info.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % _ALIGN)
            data_start = 8 + len(raw)
            f = (folder / file_name).open("wb")
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(data_start + offset)  # sparse until written; size is final from the start
            self._files.append(f)
            for info in shard:
                self._where[info.name] = (index, data_start + relative[info.name], info)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (already in its output dtype) at its offset."""
        try:
            index, offset, info = self._where[name]
        except KeyError:
            raise PolymergeError(f"internal: tensor {name!r} was not planned") from None
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise PolymergeError(f"internal: tensor {name!r} is {tuple(tensor.shape)} "
                                 f"{tensor.dtype}, planned {info.shape} {info.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        f = self._files[index]
        f.seek(offset)
        f.write(memoryview(data))
        self._written.add(name)

    def close(self) -> None:
        """Flush and close every shard; write the index when there are several shards."""
        missing = set(self._where) - self._written
        for f in self._files:
            f.close()
        self._files = []
        if missing:
            raise CheckpointError(f"internal: {len(missing)} planned tensors were never written, "
                                  f"e.g. {sorted(missing)[0]!r}")
        if len(self.file_names) > 1:
            total = sum(info.nbytes for _, _, info in self._where.values())
            weight_map = {name: self.file_names[idx]
                          for name, (idx, _, _) in sorted(self._where.items())}
            (self.folder / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

    def abort(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
