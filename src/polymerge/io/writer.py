"""Atomic, streaming output: shards laid out from the plan and filled one tensor at a time.

Because the engine knows every output tensor's name, shape and dtype before it starts, the shard
layout and safetensors headers are written up front and each tensor's bytes go straight to their
offset. Memory never holds a shard buffer, and tensors may arrive in any order.
Everything goes to a temporary folder beside the target that is renamed into place at the end,
so a failure, Ctrl-C or SIGTERM never leaves a partial output. While it is written the target is
locked (``.NAME.lock`` beside it), so a second run into the same folder fails instead of racing.
Every output carries a marker file (:data:`MARKER_NAME`): ``--force`` replaces only folders that
have one, i.e. that polymerge wrote.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import struct
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, BinaryIO

import torch

from polymerge.errors import CheckpointError, PolymergeError
from polymerge.io.checkpoint import INDEX_NAME, SINGLE_NAME, TensorInfo
from polymerge.io.dtypes import TORCH_TO_SAFETENSORS
from polymerge.version import __version__

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, the rest still holds
    fcntl = None  # type: ignore[assignment]

_ALIGN = 8
MARKER_NAME = ".polymerge-output"
_MARKER_MAX_BYTES = 4096


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while an output was being written; raised so the temporary folder is
    removed on the way out, exactly as for Ctrl-C."""

    def __str__(self) -> str:
        return "terminated by SIGTERM"


def write_output_marker(folder: Path, kind: str = "model") -> None:
    """Mark ``folder`` as polymerge's output, so a later ``--force`` may replace it."""
    (folder / MARKER_NAME).write_text(json.dumps(
        {"tool": "polymerge", "version": __version__, "kind": kind}) + "\n")


def is_polymerge_output(folder: Path) -> bool:
    """Whether ``folder`` holds polymerge's marker (a small regular file, not a link)."""
    marker = folder / MARKER_NAME
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MARKER_MAX_BYTES:
            return False
        data = json.loads(os.read(fd, _MARKER_MAX_BYTES))
    except (OSError, ValueError, RecursionError):
        return False
    finally:
        os.close(fd)
    return isinstance(data, dict) and data.get("tool") == "polymerge"


def _describe(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = len(names) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def check_output_target(target: Path, *, force: bool) -> None:
    """Refuse a target that is a file, a non-empty folder (unless forced and written by
    polymerge), or a place no folder can be created in."""
    target = Path(target)
    if target.is_symlink() and not target.exists():
        raise PolymergeError(f"output {target} is a broken symbolic link")
    if target.exists():
        if not target.is_dir():
            raise PolymergeError(f"output {target} exists and is not a folder")
        try:
            entries = sorted(os.listdir(target))
        except OSError as exc:
            raise PolymergeError(f"cannot list the output folder {target} "
                                 f"({exc.strerror or exc})") from None
        if entries:
            if not is_polymerge_output(target):
                raise PolymergeError(
                    f"output folder {target} is not empty and polymerge did not write it (it "
                    f"holds {_describe(entries)}); --force replaces only polymerge's own "
                    "outputs, so choose another folder or empty it yourself")
            if not force:
                raise PolymergeError(f"output folder {target} is not empty; pass --force to "
                                     "replace it")
    _check_can_create(target)


def _check_can_create(target: Path) -> None:
    """The nearest existing folder above the target must be one we can write in, on a real
    filesystem (``-o /proc/x`` is refused here, not reported as a lack of disk space)."""
    parent = target.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PolymergeError(f"cannot create output {target}: {parent} is not a folder")
    try:
        fs = os.statvfs(parent)
    except OSError as exc:
        raise PolymergeError(f"cannot create output {target}: {parent} is unreadable "
                             f"({exc.strerror or exc})") from None
    if fs.f_flag & getattr(os, "ST_RDONLY", 1):
        raise PolymergeError(f"cannot create output {target}: {parent} is on a read-only "
                             "filesystem")
    if fs.f_blocks == 0:
        raise PolymergeError(f"cannot create output {target}: {parent} is on a filesystem "
                             "that cannot hold files (such as /proc)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PolymergeError(f"cannot create output {target}: permission denied in {parent}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process: leave its files alone
    return True


def _remove(path: Path) -> None:
    """Delete a file, a link (not what it points to) or a folder tree."""
    with contextlib.suppress(OSError):
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(target: Path) -> list[str]:
    """Remove ``.NAME.tmp-PID-*`` and ``.NAME.old-PID`` beside ``target`` left by runs whose
    process is gone (SIGKILL, power loss); return their names."""
    parent = target.parent
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp-(\d+)-[0-9a-f]+|old-(\d+))")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        _remove(parent / name)
        removed.append(name)
    return removed


class AtomicOutputDir:
    """A temporary folder that becomes ``target`` only if the ``with`` block succeeds.

    On entry the target is locked against other polymerge runs, rechecked, and stale
    temporaries of dead runs beside it are removed; the temporary folder gets polymerge's
    marker (``kind`` says what it holds: ``model``, ``store``, ...). SIGTERM during the block
    raises :class:`Terminated` so the temporary folder is removed. On success the folder is
    renamed onto the target; a target that gained files meanwhile is never replaced without
    ``force``. A target that is a symbolic link to a folder is written where the link points.
    """

    def __init__(self, target: str | Path, *, force: bool = False, kind: str = "model") -> None:
        path = Path(target).expanduser().absolute()
        if path.is_symlink() and path.exists():
            path = path.resolve()
        self.target = path
        self.force = force
        self.kind = kind
        check_output_target(self.target, force=force)
        self.tmp: Path | None = None
        self._lock_fd: int | None = None
        self._lock_path = self.target.with_name(f".{self.target.name}.lock")
        self._previous_handler: Any = None
        self._handler_installed = False
        self._deferred: list[int] = []

    # -- entering
    def __enter__(self) -> Path:
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PolymergeError(f"cannot create the output's folder {parent} "
                                 f"({exc.strerror or exc})") from None
        self._lock()
        try:
            self._install_handler()  # before the temporary folder exists
            check_output_target(self.target, force=self.force)
            remove_stale_temporaries(self.target)
            # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide the output
            # from other users. mkdir honours the umask like any other folder.
            name = f".{self.target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            self.tmp = parent / name
            self.tmp.mkdir()
            write_output_marker(self.tmp, self.kind)
        except BaseException as exc:
            self._defer_signals()
            if self.tmp is not None:
                _remove(self.tmp)
            self._unlock()
            self._restore_handler()
            if isinstance(exc, OSError):
                raise PolymergeError(f"cannot write the output beside {self.target} "
                                     f"({exc.strerror or exc})") from None
            raise
        return self.tmp

    def _lock(self) -> None:
        if fcntl is None:
            return
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        while True:
            try:
                fd = os.open(self._lock_path, flags, 0o644)
            except OSError as exc:
                raise PolymergeError(f"cannot lock the output {self.target}: "
                                     f"{self._lock_path} ({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise PolymergeError(
                    f"another polymerge run is writing {self.target} (it holds "
                    f"{self._lock_path}); wait for it or choose another output") from None
            # The previous holder unlinks the file before unlocking: if that happened after
            # we opened it, our lock is on a dead file; open the new one and retry.
            try:
                on_disk = os.stat(self._lock_path, follow_symlinks=False)
            except FileNotFoundError:
                on_disk = None
            mine = os.fstat(fd)
            if on_disk is not None and (on_disk.st_ino, on_disk.st_dev) == (mine.st_ino,
                                                                           mine.st_dev):
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            self._lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)  # closing releases the flock
        self._lock_fd = None

    # -- SIGTERM
    def _install_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            previous = signal.getsignal(signal.SIGTERM)
            if previous is None:  # set outside Python: leave it alone
                return
            signal.signal(signal.SIGTERM, _raise_terminated)
        except (ValueError, OSError):
            return
        self._previous_handler = previous
        self._handler_installed = True

    def _defer_signals(self) -> None:
        """While cleaning up or committing, a SIGTERM is remembered, not raised mid-way."""
        if self._handler_installed:
            signal.signal(signal.SIGTERM, self._remember)

    def _remember(self, signum: int, frame: FrameType | None) -> None:
        self._deferred.append(signum)

    def _restore_handler(self) -> None:
        if not self._handler_installed:
            return
        signal.signal(signal.SIGTERM, self._previous_handler)
        self._handler_installed = False
        if self._deferred:
            self._deferred.clear()
            signal.raise_signal(signal.SIGTERM)  # now handled as it was before we started

    # -- leaving
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self.tmp is not None
        self._defer_signals()
        try:
            if exc_type is not None:
                _remove(self.tmp)
                if isinstance(exc, OSError):  # disk full, quota, I/O error: one line
                    raise PolymergeError(f"cannot write the output {self.target} "
                                         f"({_os_reason(exc)})") from exc
                return
            try:
                self._commit(self.tmp)
            except BaseException:
                _remove(self.tmp)
                raise
        finally:
            self._unlock()
            self._restore_handler()

    def _commit(self, tmp: Path) -> None:
        target = self.target
        if self.force and target.is_dir() and not target.is_symlink() and os.listdir(target):
            # Recheck under the lock: only polymerge's own output is replaced.
            check_output_target(target, force=True)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            _remove(old)
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old, target)
                raise
            _remove(old)
            return
        try:
            os.rename(tmp, target)  # replaces an empty folder; never a non-empty one
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                held = sorted(os.listdir(target)) if target.is_dir() else []
                raise PolymergeError(
                    f"output folder {target} received files while polymerge was writing (it "
                    f"holds {_describe(held)}); it was left as it is and the new output was "
                    "discarded") from None
            if exc.errno == errno.ENOTDIR:
                raise PolymergeError(f"output {target} became a file while polymerge was "
                                     "writing; the new output was discarded") from None
            raise PolymergeError(f"cannot move the output into place at {target} "
                                 f"({exc.strerror or exc})") from None


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason}: {exc.filename}" if exc.filename else reason


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
            try:
                f = (folder / file_name).open("wb")
                self._files.append(f)
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(data_start + offset)  # sparse until written; final size at once
            except OSError as exc:
                self.abort()
                raise PolymergeError(f"cannot write {folder / file_name} "
                                     f"({exc.strerror or exc})") from exc
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
        try:
            f.seek(offset)
            f.write(memoryview(data))
        except OSError as exc:  # e.g. no space left on the device
            raise PolymergeError(f"cannot write tensor {name!r} to "
                                 f"{self.folder / self.file_names[index]} "
                                 f"({exc.strerror or exc})") from exc
        self._written.add(name)

    def close(self) -> None:
        """Flush and close every shard; write the index when there are several shards."""
        missing = set(self._where) - self._written
        try:
            for f in self._files:
                f.close()  # flushes: a full disk shows here
        except OSError as exc:
            self.abort()
            raise PolymergeError(f"cannot write the shards in {self.folder} "
                                 f"({exc.strerror or exc})") from exc
        self._files = []
        if missing:
            raise CheckpointError(f"internal: {len(missing)} planned tensors were never written, "
                                  f"e.g. {sorted(missing)[0]!r}")
        if len(self.file_names) > 1:
            total = sum(info.nbytes for _, _, info in self._where.values())
            weight_map = {name: self.file_names[idx]
                          for name, (idx, _, _) in sorted(self._where.items())}
            try:
                (self.folder / INDEX_NAME).write_text(json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": weight_map},
                    indent=2) + "\n")
            except OSError as exc:
                raise PolymergeError(f"cannot write {self.folder / INDEX_NAME} "
                                     f"({exc.strerror or exc})") from exc

    def abort(self) -> None:
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close()
        self._files = []
