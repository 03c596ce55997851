"""Read-only access to a checkpoint's tensors, one at a time.

A checkpoint is an HF model folder (``model.safetensors`` or shards with an index), a bare
``.safetensors`` file, a PEFT LoRA adapter folder (see :mod:`polymerge.io.lora`) or, only when
explicitly allowed, a pickled ``.bin``/``.pt`` file. Headers are read without touching tensor
data, so validation is cheap; ``read`` materializes a single tensor, and a safetensors file
also lends one tensor's pages without a copy (``mapped`` / ``release``).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import stat
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


MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024 * 1024  # config.json, index and adapter configs
_MAX_NUMEL = 2**62  # beyond this torch cannot even lay out the strides
_MAX_DIMS = 64


def _short(text: str, limit: int = 80) -> str:
    """A name as it appears in a one-line message: quoted, escaped and shortened."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 4] + "...'"


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """An fd of ``path`` if it is a regular file; a FIFO or device never blocks the open."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, min(size, 1 << 24), offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_json_file(path: Path, what: str = "JSON file") -> Any:
    """Parse a small JSON file; every failure (not a regular file, too large, not UTF-8, not
    JSON, nested too deeply) is a one-line :class:`CheckpointError` naming the file."""
    try:
        fd, st = _open_regular(path)
        try:
            if st.st_size > MAX_JSON_BYTES:
                raise CheckpointError(f"{path}: {what} too large ({st.st_size} bytes)")
            raw = _pread_exact(fd, st.st_size, 0)
        finally:
            os.close(fd)
        return json.loads(raw)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: invalid {what} (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: invalid {what} ({reason})") from None


def _hub_blobs(root: Path) -> Path | None:
    """The blob folder of a Hugging Face cache snapshot (``.../snapshots/<rev>``), whose files
    are links into ``../../blobs``."""
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        return (root.parent.parent / "blobs").resolve()
    return None


def contained_file(folder: Path, relative: str | Path, what: str = "file") -> Path:
    """``folder / relative``, checked to be a regular file that stays inside ``folder``.

    A symbolic link is followed only when it ends inside the folder (or, for a Hugging Face
    cache snapshot, in that repository's blob folder); an absolute path, a ``..`` that leaves
    the folder, a FIFO or device, or a missing file is a :class:`CheckpointError`.
    """
    rel = Path(relative)
    if str(relative) == "" or rel.is_absolute():
        raise CheckpointError(f"{folder}: {what} {_short(str(relative))} must be a path "
                              "relative to the model folder")
    candidate = folder / rel
    try:
        root = Path(os.path.realpath(folder, strict=True))
        # strict: every component must exist, and `..` is taken after links, as the kernel
        # will when the file is opened
        real = Path(os.path.realpath(candidate, strict=True))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: {what} {_short(str(relative))} is missing") from None
    except (OSError, RuntimeError, ValueError) as exc:  # a loop of links, a NUL
        raise CheckpointError(f"{folder}: cannot resolve {what} {_short(str(relative))} "
                              f"({getattr(exc, 'strerror', None) or exc})") from None
    if not real.is_relative_to(root):
        blobs = _hub_blobs(root)
        if blobs is None or not real.is_relative_to(blobs):
            raise CheckpointError(f"{folder}: {what} {_short(str(relative))} points outside "
                                  f"the model folder (to {real}); polymerge reads only files "
                                  "inside it")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: {what} {_short(str(relative))} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{folder}: cannot read {what} {_short(str(relative))} "
                              f"({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{folder}: {what} {_short(str(relative))} is not a regular file")
    return candidate


def _check_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(path: Path, name: str, entry: Any, data_size: int
                  ) -> tuple[TensorInfo, int, int]:
    where = f"{path}: tensor {_short(name)}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype_code = entry.get("dtype")
    dtype = SAFETENSORS_TO_TORCH.get(dtype_code) if isinstance(dtype_code, str) else None
    if dtype is None:
        raise CheckpointError(f"{where} has unsupported dtype {_short(str(dtype_code))}")
    shape = entry.get("shape")
    if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
            or not all(_check_int(d) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got "
                              f"{_short(json.dumps(shape))}")
    if math.prod(d for d in shape if d) > _MAX_NUMEL:
        raise CheckpointError(f"{where}: shape {shape} is too large")
    offsets = entry.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_check_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets must be two integers, got "
                              f"{_short(json.dumps(offsets))}")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise CheckpointError(f"{where}: data_offsets {offsets} are negative or reversed")
    if end > data_size:
        raise CheckpointError(f"{where}: data_offsets {offsets} run past the end of the file "
                              f"({data_size} data bytes)")
    info = TensorInfo(name, tuple(shape), dtype)
    if end - begin != info.nbytes:
        raise CheckpointError(f"{where} header size does not match its shape "
                              f"({end - begin} bytes for {list(shape)} {dtype_code})")
    return info, begin, end


def read_safetensors_layout(path: Path) -> dict[str, tuple[TensorInfo, int, int]]:
    """Parse and validate a safetensors header (8-byte length + JSON) without reading data.

    Returns, per tensor, its info and its absolute byte range in the file. As the safetensors
    library does, the header must be a JSON object of tensor entries (plus an optional
    ``__metadata__`` object of strings), each with a known dtype, a shape of non-negative
    integers and data offsets that lie inside the file, match the shape and overlap no other.
    """
    try:
        fd, st = _open_regular(path)
        try:
            raw = _pread_exact(fd, 8, 0)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: safetensors header too large ({length} bytes)")
            if 8 + length > st.st_size:
                raise CheckpointError(f"{path}: safetensors header length {length} runs past "
                                      f"the end of the file ({st.st_size} bytes)")
            text = _pread_exact(fd, length, 8)
        finally:
            os.close(fd)
        header = json.loads(text)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read safetensors header "
                              f"({exc.strerror or exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: cannot read safetensors header (nested too "
                              "deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read safetensors header ({reason})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_start = 8 + length
    data_size = st.st_size - data_start
    layout: dict[str, tuple[TensorInfo, int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info, begin, end = _tensor_entry(path, name, entry, data_size)
        layout[name] = (info, data_start + begin, data_start + end)
    previous: tuple[str, int] | None = None
    for name, (_, begin, end) in sorted(layout.items(), key=lambda kv: (kv[1][1], kv[1][2])):
        if begin == end:
            continue
        if previous is not None and begin < previous[1]:
            raise CheckpointError(f"{path}: tensors {_short(previous[0])} and {_short(name)} "
                                  "overlap in the file")
        previous = (name, end)
    return layout


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of a safetensors file, from its header alone."""
    return {name: info for name, (info, _, _) in read_safetensors_layout(path).items()}


class SafetensorsCheckpoint:
    """An HF model folder or bare safetensors file.

    ``read`` copies a tensor with positional reads into a buffer of its own. ``mapped`` lends
    the tensor's pages of the file instead: a private (copy-on-write) mapping, so nothing is
    copied, a write to the tensor stays in this process and the file is never modified; the
    call starts the read-ahead of the pages, which fault in as the tensor is first used, and
    ``release`` drops them from the process once it is used, so mapped pages do not pile up
    in the resident set (what that saves a merge: BENCHMARKS.md, "Static merge speed").
    """

    def __init__(self, path: Path, files: dict[str, Path], label: str | None = None) -> None:
        self.path = path
        self.label = label or path.name
        self._file_of = files  # tensor name -> shard file
        self._layout: dict[str, tuple[TensorInfo, int, int]] | None = None
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}

    @property
    def config(self) -> dict[str, Any] | None:
        return read_model_config(self.path)

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
        """The tensor ``name``, copied into a buffer of its own."""
        try:
            info, begin, end = self._tensor_layout()[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: no tensor named {name!r}") from None
        shard = self._file_of[name]
        fd = self._fd(shard)
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

    def _fd(self, shard: Path) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd, _ = _open_regular(shard)
            except OSError as exc:
                raise CheckpointError(f"{self.label}: cannot read {shard} "
                                      f"({exc.strerror or exc})") from None
            self._fds[shard] = fd
        return fd

    def _map(self, shard: Path) -> mmap.mmap:
        mapping = self._maps.get(shard)
        if mapping is None:
            try:
                mapping = mmap.mmap(self._fd(shard), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{self.label}: cannot map {shard} ({exc})") from None
            self._maps[shard] = mapping
        return mapping

    def mapped(self, name: str) -> torch.Tensor:
        """The tensor ``name`` on the file's own pages (no copy; see the class docstring), their
        read-ahead started. A tensor the mapping cannot hold aligned is read instead. Call
        :meth:`release` once the tensor is no longer used."""
        try:
            info, begin, end = self._tensor_layout()[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: no tensor named {name!r}") from None
        if end == begin:
            return torch.empty(info.shape, dtype=info.dtype)
        mapping = self._map(self._file_of[name])
        flat = torch.frombuffer(mapping, dtype=torch.uint8, count=end - begin, offset=begin)
        if flat.data_ptr() % element_size(info.dtype):
            return self.read(name)
        start = begin - begin % mmap.PAGESIZE
        # Read-ahead of the whole range in large requests (what a cold file needs), and no
        # more: faulting the pages in here as well (MADV_POPULATE_READ) made whole merges from
        # a cold page cache 1.4-1.7x slower and saved nothing warm (BENCHMARKS.md, "Cold
        # reads").
        mapping.madvise(mmap.MADV_WILLNEED, start, end - start)
        return flat.view(info.dtype).view(info.shape)

    def release(self, name: str) -> None:
        """Drop the pages only tensor ``name`` lies on from this process (the page cache keeps
        them; touching them again faults them back in, unchanged). Pages it shares with a
        neighbouring tensor stay, so a tensor another thread still uses is never affected."""
        _info, begin, end = self._tensor_layout()[name]
        mapping = self._maps.get(self._file_of[name])
        page = mmap.PAGESIZE
        first, last = -(-begin // page) * page, end // page * page
        if mapping is not None and last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        for mapping in self._maps.values():
            with contextlib.suppress(BufferError):  # a tensor still lives on it: left to GC
                mapping.close()
        self._maps.clear()
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
                raise CheckpointError(f"{file}: cannot load with weights_only=True "
                                      f"({first_line(exc)})") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{file}: expected a state dict, got {type(state).__name__}")
            for key, value in state.items():
                if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{file}: expected a flat state dict of tensors, but "
                                          f"{_short(str(key))} holds a "
                                          f"{type(value).__name__}")
            self._state.update(state)

    @property
    def config(self) -> dict[str, Any] | None:
        return read_model_config(self.path)

    def tensors(self) -> dict[str, TensorInfo]:
        return {n: TensorInfo(n, tuple(t.shape), t.dtype) for n, t in self._state.items()}

    def read(self, name: str) -> torch.Tensor:
        try:
            return self._state[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: no tensor named {name!r}") from None

    def close(self) -> None:
        self._state.clear()


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal colour codes."""
    for line in _ANSI.sub("", str(exc)).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def read_model_config(path: Path) -> dict[str, Any] | None:
    """A model folder's config.json (a JSON object inside the folder), or None without one."""
    if not path.is_dir() or not os.path.lexists(path / "config.json"):
        return None
    cfg = read_json_file(contained_file(path, "config.json", "config"), "config.json")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path / 'config.json'}: config is not a JSON object")
    return cfg


def _index_files(folder: Path, index_path: Path) -> dict[str, Path]:
    """Tensor -> shard file from an index whose every shard is a regular file in ``folder``."""
    index = read_json_file(contained_file(folder, index_path.name, "index"), "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: invalid index (no weight_map object)")
    shards: dict[str, Path] = {}
    files: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index_path}: invalid index (tensor {_short(name)} maps to "
                                  f"{_short(json.dumps(shard))}, not a file name)")
        if shard not in shards:
            shards[shard] = contained_file(folder, shard, "shard listed in the index")
        files[name] = shards[shard]
    return files


def _single_file(path: Path) -> dict[str, Path]:
    return {name: path for name in read_safetensors_header(path)}


def is_lora_adapter(path: Path) -> bool:
    return path.is_dir() and os.path.lexists(path / "adapter_config.json")


def split_model_ref(value: str | Path) -> tuple[str, str | None]:
    """mergekit's ``path/to/model+path/to/adapter`` (a model with a LoRA adapter applied):
    ``(model, adapter)``; ``(value, None)`` for a plain path. A path that exists as written is
    always a plain path, even with a ``+`` in it."""
    text = str(value)
    if "+" not in text or os.path.lexists(Path(text).expanduser()):
        return text, None
    parts = text.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise CheckpointError(f"{_short(text)} is neither an existing path nor "
                              "model+adapter (one '+' between two paths)")
    return parts[0], parts[1]


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False, label: str | None = None,
                    base: Checkpoint | None = None) -> Checkpoint:
    """Open a checkpoint for streaming reads; refuse pickles unless ``allow_pickle``.

    ``base`` is needed only for LoRA adapters, whose weights are defined relative to it.
    Inside a folder, only regular files that stay inside it are read (see
    :func:`contained_file`).
    """
    model, adapter = split_model_ref(path)
    if adapter is not None:
        return _open_with_adapter(model, adapter, allow_pickle=allow_pickle,
                                  label=label or Path(adapter).name)
    path = Path(path).expanduser()
    label = label or path.name
    try:
        return _open(path, allow_pickle=allow_pickle, label=label, base=base)
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot read {path} ({exc.strerror or exc})") from None


def _open_with_adapter(model: str, adapter: str, *, allow_pickle: bool, label: str
                       ) -> Checkpoint:
    """``model+adapter``: the model with the adapter applied on read. Its ``path`` is the
    model's folder (its config, tokenizer and generation config are the combination's, as in
    mergekit); ``adapter_path`` is the adapter's."""
    from polymerge.io.lora import LoraCheckpoint

    adapter_path = Path(adapter).expanduser()
    if not is_lora_adapter(adapter_path):
        raise CheckpointError(f"{label}: {_short(adapter)} (after the '+') is not a LoRA "
                              "adapter folder (no adapter_config.json)")
    inner = open_checkpoint(model, allow_pickle=allow_pickle, label=f"{label} (model)")
    try:
        combined = LoraCheckpoint(adapter_path, inner, label=label)
    except BaseException:
        inner.close()
        raise
    combined.adapter_path = adapter_path
    combined.path = Path(model).expanduser()
    combined.owns_base = True
    return combined


def _open(path: Path, *, allow_pickle: bool, label: str, base: Checkpoint | None) -> Checkpoint:
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
    if not path.is_dir():
        raise CheckpointError(f"{label}: {path} is neither a file nor a folder")
    if os.path.lexists(path / INDEX_NAME):
        return SafetensorsCheckpoint(path, _index_files(path, path / INDEX_NAME), label)
    if os.path.lexists(path / SINGLE_NAME):
        single = contained_file(path, SINGLE_NAME, "weights file")
        return SafetensorsCheckpoint(path, _single_file(single), label)
    names = sorted(p.name for p in path.iterdir())
    pickles = [n for n in names if Path(n).suffix in PICKLE_SUFFIXES]
    if pickles:
        files = [contained_file(path, n, "weights file") for n in pickles]
        return _pickle_or_refuse(path, files, allow_pickle, label)
    singles = [n for n in names if n.endswith(".safetensors")]
    if len(singles) == 1:
        single = contained_file(path, singles[0], "weights file")
        return SafetensorsCheckpoint(path, _single_file(single), label)
    raise CheckpointError(f"{label}: no model.safetensors, {INDEX_NAME} or adapter_config.json "
                          f"in {path}")


def _pickle_or_refuse(path: Path, files: list[Path], allow: bool, label: str) -> Checkpoint:
    if not allow:
        raise CheckpointError(
            f"{label}: {files[0].name} is a pickled checkpoint, which can run arbitrary code when "
            "loaded; convert it to safetensors, or pass --allow-pickle to load it with "
            "torch.load(weights_only=True)")
    return PickleCheckpoint(path, files, label)
