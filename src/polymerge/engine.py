"""The per-tensor loop every merge and store builder runs through.

For each planned tensor the engine reads the base's and the inputs' tensors (the next tensor is
prefetched on a background thread while the current one is computed; a static method's inputs
are lent by the files' mappings instead of copied), checks them for NaN/Inf,
moves them to the compute device in float32, calls ``compute`` and hands its result to
``consume``. Peak memory is a few tensors per input, never whole models.

A compute that is *elementwise* (its result at each position depends only on the inputs at that
position: linear, task arithmetic, RAM, ...) runs on chunks of the flattened tensors instead:
each chunk of every input is converted to float32 into a reused scratch buffer small enough to
stay in the CPU cache, computed, and cast straight into the output's dtype, on as many threads
as torch may use. The math is the same float32 math; what goes away is converting and
allocating whole float32 copies of every input (memory traffic, page faults), and one core
idling. Writing the output happens on its own thread too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch
from tqdm.auto import tqdm

from polymerge.errors import CheckpointError, PolymergeError
from polymerge.io.checkpoint import Checkpoint, SafetensorsCheckpoint, TensorInfo
from polymerge.io.writer import ShardedWriter
from polymerge.plan import MergePlan, TensorJob

R = TypeVar("R")
Compute = Callable[[TensorJob, "torch.Tensor | None", list[torch.Tensor], torch.Generator], R]
Consume = Callable[[TensorJob, "R | torch.Tensor"], None]
Pieces = dict[str, torch.Tensor]
Chunkable = Callable[[TensorJob], bool]

CHUNK_ELEMENTS = 1 << 18
"""Elements per chunk of an elementwise compute: 1 MiB of float32 per input, so a chunk of every
input and the temporaries stay in the CPU's caches (measured fastest of 2^12 to 2^18 for task
arithmetic over 5 bf16 inputs: 4x faster than whole tensors on one thread)."""
PIECE_CHUNKS = 4
"""Chunks per piece, at least, when an elementwise tensor is split among the workers (an
embedding or LM head alone would otherwise keep one core busy and the others idle)."""
WRITES_IN_FLIGHT = 2
"""Results queued for the writer thread before the computing thread waits (bounds memory)."""
ComputePieces = Callable[[TensorJob, "torch.Tensor | None", list[torch.Tensor], torch.Generator],
                         "Pieces | torch.Tensor"]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_FREED_BYTES = 256 << 20
"""Freed heap memory glibc keeps for reuse instead of returning it to the kernel (see
:func:`_reuse_freed_memory`)."""


@functools.cache
def _reuse_freed_memory() -> None:
    """Have glibc serve the chunk-sized temporaries of the computes (up to 32 MiB) from memory
    freed earlier, once per process.

    By default it hands large freed blocks back to the kernel at once, so the next
    temporary faults its pages in again: measured on a 0.5 B-parameter RAM+ merge, 2.2
    million page faults and 4.1-4.8 s of system time, against 0.24 million and 1.5-1.7 s
    with this (BENCHMARKS.md); the price is up to :data:`KEEP_FREED_BYTES` more resident
    memory. Not glibc (or no ``mallopt``): nothing changes.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    mallopt = getattr(ctypes.CDLL(libc_name), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's ceiling on 64-bit


@dataclass
class EngineStats:
    """What one pass over the plan did."""

    tensors: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Loaded(Generic[R]):
    job: TensorJob
    base: torch.Tensor | None
    inputs: list[torch.Tensor]
    nbytes: int
    unchecked: list[str] | None = None
    """Labels of the base (if any) and inputs, in order, when their NaN/Inf check is still to
    be done (by the chunked compute on each chunk while it is in cache, or before the
    compute)."""
    mapped: list[tuple[SafetensorsCheckpoint, str]] = field(default_factory=list)
    """Tensors lent by a file mapping; released once the job's result is out of them."""


def resolve_device(device: str | torch.device) -> torch.device:
    """A usable torch device, with a clear error when the name is unknown (``tpu``) or CUDA is
    asked for but absent (or has no such index)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise PolymergeError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N"
                             ) from None
    if dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise PolymergeError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PolymergeError("--device cuda was requested but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PolymergeError(f"--device {dev} was requested but there are only "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PolymergeError("--device mps was requested but MPS is not available here")
    return dev


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: random methods give the same result whatever the processing order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _finite(tensor: torch.Tensor) -> bool:
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_finite(tensor: torch.Tensor, model: str, name: str) -> None:
    """Stop on NaN/Inf. ``aminmax`` propagates both and is a single fast reduction (about 40x
    cheaper than ``isfinite().all()``), with no false alarms from overflow."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if not _finite(tensor):
        raise CheckpointError(f"model {model}: tensor {name!r} holds NaN or Inf; the merge "
                              "stopped")


def _read(ckpt: Checkpoint, name: str) -> torch.Tensor:
    tensor = ckpt.read(name)
    check_finite(tensor, ckpt.label, name)
    return tensor


def _map(ckpt: Checkpoint, name: str, mapped: list[tuple[SafetensorsCheckpoint, str]]
         ) -> torch.Tensor:
    if not isinstance(ckpt, SafetensorsCheckpoint):
        return ckpt.read(name)
    mapped.append((ckpt, name))
    return ckpt.mapped(name)


def _load(plan: MergePlan, job: TensorJob, lend: bool = False) -> _Loaded:
    """Read the job's tensors. With ``lend``, a merged tensor's sources are lent by their
    files' mappings (no copy) where they are safetensors, and their NaN/Inf check is left to
    the compute."""
    if job.reader is not None:  # slices, vocabulary alignment: the job says what to read
        base, inputs = job.reader(_read)
        if not job.merge:
            return _Loaded(job, None, inputs[:1], inputs[0].nbytes)
        nbytes = sum(t.nbytes for t in inputs) + (base.nbytes if base is not None else 0)
        return _Loaded(job, base, inputs, nbytes)
    if not job.merge:
        ref = _read(plan.reference, job.name)
        return _Loaded(job, None, [ref], ref.nbytes)
    sources = ([plan.base] if plan.base is not None else []) + list(plan.inputs)
    if not lend:
        tensors = [_read(ckpt, job.name) for ckpt in sources]
        base = tensors.pop(0) if plan.base is not None else None
        return _Loaded(job, base, tensors, sum(t.nbytes for t in tensors) + (
            base.nbytes if base is not None else 0))
    mapped: list[tuple[SafetensorsCheckpoint, str]] = []
    try:
        tensors = [_map(ckpt, job.name, mapped) for ckpt in sources]
    except BaseException:
        _release(mapped)
        raise
    base = tensors.pop(0) if plan.base is not None else None
    return _Loaded(job, base, tensors, sum(t.nbytes for t in tensors) + (
        base.nbytes if base is not None else 0),
        unchecked=[c.label for c in sources], mapped=mapped)


def _release(mapped: list[tuple[SafetensorsCheckpoint, str]]) -> None:
    for ckpt, name in mapped:
        ckpt.release(name)
    mapped.clear()


def _owned(result: R, sources: list[torch.Tensor]) -> R:
    """``result``, with any tensor of it that shares memory with a source (a method may return
    an input as is, or a view of it) copied, so the sources' pages can be released."""
    lent = {t.untyped_storage().data_ptr() for t in sources if t.numel()}

    def own(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.numel() and t.untyped_storage().data_ptr() in lent else t

    if isinstance(result, torch.Tensor):
        return own(result)  # type: ignore[return-value]
    if isinstance(result, dict):
        return {k: own(v) if isinstance(v, torch.Tensor) else v  # type: ignore[return-value]
                for k, v in result.items()}
    return result


def _prefetched(plan: MergePlan, jobs: list[TensorJob], lend: bool) -> Iterator[_Loaded]:
    """Yield loaded jobs in order, reading job i+1 while the caller works on job i."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="polymerge-read") as pool:

        def load(index: int) -> Future[_Loaded] | None:
            return pool.submit(_load, plan, jobs[index], lend) if index < len(jobs) else None

        pending = load(0)
        for index in range(len(jobs)):
            assert pending is not None
            loaded = pending.result()
            pending = load(index + 1)
            yield loaded


_scratch = threading.local()


def _scratch_rows(rows: int) -> torch.Tensor:
    """This thread's float32 scratch of ``rows`` chunks (allocated once, reused)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != CHUNK_ELEMENTS:
        buf = _scratch.buf = torch.empty(rows, CHUNK_ELEMENTS)
    return buf


def _pieces(numel: int, workers: int) -> list[tuple[int, int]]:
    """Chunk-aligned ranges that split an elementwise tensor among ``workers`` (one range when
    it is too small for each piece to have :data:`PIECE_CHUNKS` chunks)."""
    chunks = -(-numel // CHUNK_ELEMENTS)
    count = max(1, min(workers, chunks // PIECE_CHUNKS))
    step = -(-chunks // count) * CHUNK_ELEMENTS
    return [(begin, min(numel, begin + step)) for begin in range(0, numel, step)]


def _fill_chunked(compute: Compute[torch.Tensor], loaded: _Loaded, generator: torch.Generator,
                  flat_out: torch.Tensor, first: int, last: int,
                  check_result: bool = False) -> None:
    """An elementwise compute of entries ``first:last`` over cache-sized chunks, cast straight
    into the output ``flat_out`` (the job's output, flattened).

    ``check_result``: a NaN or Inf in any input shows in the result (linear, task arithmetic),
    so each chunk's result is checked instead of every input's chunk (one row, not N+1), and
    the inputs only when it fails, to name the model at fault. It is checked as written, in
    the output dtype (a NaN or Inf stays one through the cast; a bf16 row is checked in two
    thirds of a float32 row's time, bench/torch_ops.py); a result that overflowed from finite
    inputs, or in the cast, is left to the output check."""
    job = loaded.job
    has_base = loaded.base is not None
    sources = [t.reshape(-1) for t in
               ([loaded.base] if loaded.base is not None else []) + loaded.inputs]
    for begin in range(first, last, CHUNK_ELEMENTS):
        end = min(last, begin + CHUNK_ELEMENTS)
        block = _scratch_rows(len(sources))[:len(sources), :end - begin]
        for row, source in zip(block, sources, strict=True):
            row.copy_(source[begin:end])
        if loaded.unchecked is not None and not check_result:
            _check_rows(block, loaded.unchecked, job.name)
        rows = list(block)
        base = rows.pop(0) if has_base else None
        written = flat_out[begin:end]
        written.copy_(compute(job, base, rows, generator).reshape(-1))
        if loaded.unchecked is not None and check_result and not _finite(written):
            for source, label in zip(sources, loaded.unchecked, strict=True):
                check_finite(source[begin:end], label, job.name)


def _check_rows(block: torch.Tensor, labels: list[str], name: str) -> None:
    """``check_finite`` for one chunk of every source at once, naming the model at fault."""
    if not _finite(block):
        for row, label in zip(block, labels, strict=True):
            check_finite(row, label, name)


def _same_sizes(loaded: _Loaded) -> bool:
    numel = loaded.job.out.numel
    return all(t.numel() == numel for t in loaded.inputs) and (
        loaded.base is None or loaded.base.numel() == numel)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads (the engine's own workers are the parallelism;
    nested OpenMP teams would fight them for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stream(plan: MergePlan, compute: Compute[R], consume: Consume[R], *,
           device: str | torch.device = "cpu", progress: bool = True,
           desc: str = "merging", pure: bool = False,
           chunkable: Chunkable | None = None, native_inputs: bool = False,
           propagates_nonfinite: bool = False) -> EngineStats:
    """Run ``compute`` on every merged tensor of the plan and ``consume`` every result, in the
    plan's order.

    Copied tensors (non-float buffers) go to ``consume`` unchanged, as read from the reference.
    ``pure``: ``compute`` depends on nothing but its arguments (a static method's function), so
    on the CPU several tensors are computed at once, one per torch thread, each single-threaded
    (independent tensors scale better than one tensor's operations split across threads);
    tensors in flight are bounded to the plan's largest and a quarter, so peak memory stays
    about that of one tensor at a time. A pure compute also keeps nothing of its inputs, so
    their safetensors pages are lent to it without a copy and released after it (a result
    that is an input, or a view of one, is copied first). Jobs for which ``chunkable(job)``
    holds (needs ``pure``) are computed in cache-sized chunks (see the module docstring):
    ``compute`` must then be elementwise. A pure compute's results reach ``consume`` already
    in the job's output dtype (cast on the worker).
    ``propagates_nonfinite``: a NaN or Inf in an input always shows in ``compute``'s result
    (at that position, for a chunked job) or makes it raise, so results are checked rather
    than inputs, and the inputs only to name the model at fault (see :func:`_fill_chunked`).
    ``native_inputs``: the base and the inputs reach ``compute`` in their stored dtype, for a
    compute that converts them a piece at a time itself.
    """
    dev = resolve_device(device)
    _reuse_freed_memory()
    stats = EngineStats()
    start = time.perf_counter()
    parallel = pure and dev.type == "cpu"
    workers = max(1, torch.get_num_threads()) if parallel else 1

    def chunked(job: TensorJob) -> bool:
        return parallel and chunkable is not None and job.merge and job.reader is None \
            and chunkable(job)

    def generator_of(job: TensorJob) -> torch.Generator:
        generator = torch.Generator(device=dev)
        generator.manual_seed(tensor_seed(plan.recipe.seed, job.name))
        return generator

    def in_pieces(loaded: _Loaded) -> bool:
        return chunked(loaded.job) and _same_sizes(loaded)

    def run(loaded: _Loaded) -> object:
        job = loaded.job
        if not job.merge:
            return loaded.inputs[0]
        generator = generator_of(job)
        if in_pieces(loaded):
            out = torch.empty(job.out.shape, dtype=job.out.dtype)
            _fill_chunked(compute, loaded, generator, out.view(-1),  # type: ignore[arg-type]
                          0, out.numel(), propagates_nonfinite)
            return out
        sources = ([loaded.base] if loaded.base is not None else []) + loaded.inputs

        def check_sources() -> None:  # lent inputs only: the others were checked when read
            if loaded.unchecked is not None:
                for tensor, label in zip(sources, loaded.unchecked, strict=True):
                    check_finite(tensor, label, job.name)

        if not propagates_nonfinite:
            check_sources()
        dtype = None if native_inputs else torch.float32
        base = loaded.base.to(dev, dtype) if loaded.base is not None else None
        inputs = [t.to(dev, dtype) for t in loaded.inputs]
        try:
            result = compute(job, base, inputs, generator)
        except PolymergeError:
            check_sources()  # a non-finite input, rather than what it made the method say
            raise
        if propagates_nonfinite and loaded.unchecked is not None and not _finite(
                result):  # type: ignore[arg-type]
            check_sources()
        if pure and isinstance(result, torch.Tensor):
            # Cast here, on the worker: cast by the consumer, on the one thread that also
            # hands out the work, it left the workers waiting (BENCHMARKS.md).
            result = result.to(job.out.dtype)
        return _owned(result, sources) if loaded.mapped else result

    # Tensors in flight hold at most the largest tensor's elements and a quarter more: with
    # exactly the largest, nothing else ran beside an embedding or LM head, which are half of a
    # small model (one core idle for that half); a quarter more lets the layers' tensors run on
    # the other cores meanwhile.
    largest = max((job.out.numel for job in plan.jobs), default=0)
    budget = largest + largest // 4
    in_flight: deque[tuple[_Loaded, Callable[[], object]]] = deque()

    def submit(loaded: _Loaded) -> Callable[[], object]:
        """Start the job on the workers; returns what waits for its result. An elementwise
        job is split into pieces that run side by side, filling one output."""
        assert pool is not None
        if not in_pieces(loaded):
            return pool.submit(run, loaded).result
        job = loaded.job
        out = torch.empty(job.out.shape, dtype=job.out.dtype)
        flat, generator = out.view(-1), generator_of(job)
        futures = [pool.submit(_fill_chunked, compute, loaded, generator,  # type: ignore[arg-type]
                               flat, first, last, propagates_nonfinite)
                   for first, last in _pieces(flat.numel(), workers)]

        def result() -> object:
            for future in futures:
                future.result()
            return out

        return result

    def finish(loaded: _Loaded, result: object) -> None:
        consume(loaded.job, result)  # type: ignore[arg-type]
        _release(loaded.mapped)
        stats.tensors += 1
        stats.bytes_read += loaded.nbytes
        bar.update(loaded.nbytes)
        bar.set_postfix_str(f"{stats.tensors}/{len(plan.jobs)} tensors", refresh=False)

    def finish_oldest() -> None:
        loaded, result = in_flight.popleft()
        finish(loaded, result())

    # Every tensor makes Python objects; without this the collector walks every object the
    # imports made, again and again (measured: 1.4 s of a 0.5 B-parameter merge).
    gc.freeze()
    bar = tqdm(total=plan.bytes_read, unit="B", unit_scale=True, unit_divisor=1000,
               desc=desc, disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="polymerge-compute") \
        if workers > 1 else None
    try:
        with _torch_threads(1) if pool is not None else contextlib.nullcontext():
            for index, loaded in enumerate(_prefetched(plan, plan.jobs, lend=pure)):
                if pool is None:
                    finish(loaded, run(loaded))
                    continue
                if index == len(plan.jobs) - 1 and not in_pieces(loaded):
                    # The last tensor (often the LM head, one of the largest) would otherwise
                    # run alone on one core: once the others are done, it gets every thread.
                    while in_flight:
                        finish_oldest()
                    with _torch_threads(workers):
                        finish(loaded, run(loaded))
                    continue
                # Two jobs a worker: results are taken in order, so with one a worker done
                # early idled while the oldest job still ran (BENCHMARKS.md).
                while in_flight and (len(in_flight) >= 2 * workers or loaded.job.out.numel + sum(
                        lo.job.out.numel for lo, _ in in_flight) > budget):
                    finish_oldest()
                in_flight.append((loaded, submit(loaded)))
            while in_flight:
                finish_oldest()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        gc.unfreeze()
    stats.seconds = time.perf_counter() - start
    return stats


def write_folder(plan: MergePlan, folder: Path, compute: ComputePieces, outputs: list[TensorInfo],
                 *, max_shard_bytes: int, metadata: dict[str, str],
                 copied_name: Callable[[str], str] = lambda name: name,
                 finalize: Callable[[], Pieces] | None = None,
                 device: str | torch.device = "cpu", progress: bool = True,
                 desc: str = "merging", what: str = "merged output", pure: bool = False,
                 chunkable: Chunkable | None = None, native_inputs: bool = False,
                 propagates_nonfinite: bool = False) -> tuple[EngineStats, list[str]]:
    """The one output path: stream the plan through ``compute`` into sharded safetensors.

    ``compute`` returns one tensor (written under the job's name) or named pieces; ``outputs``
    announces every written tensor up front (the shards are laid out before the pass). A copied
    (non-merged) tensor is written as read, under ``copied_name(job.name)``. ``finalize``,
    called after the last tensor, returns pieces that need the whole model (statistics over
    every tensor, such as EMR's rescalers); they must be announced in ``outputs`` too. Each
    tensor is cast to its announced dtype and checked for NaN/Inf *after* the cast, so an
    overflow in a narrower output dtype stops the run too; checking and writing run on a
    thread of their own, a bounded number of tensors behind the computing. ``pure``,
    ``chunkable`` and ``native_inputs``: see :func:`stream`. On any failure the shards are
    closed and the caller's atomic folder is discarded.
    Returns the pass's statistics and the written file names.
    """
    expected = {info.name: info for info in outputs}
    writer = ShardedWriter(folder, outputs, max_shard_bytes, metadata=metadata)
    writing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polymerge-write")
    writes: deque[Future[None]] = deque()

    def check_and_write(name: str, out: torch.Tensor) -> None:
        check_finite(out, what, name)
        writer.write(name, out)

    def put(pieces: Pieces) -> None:
        for name, tensor in pieces.items():
            info = expected.get(name)
            if info is None:
                raise PolymergeError(f"internal: {name!r} was computed but not planned")
            writes.append(writing.submit(check_and_write, name, tensor.to(info.dtype)))
            while len(writes) > WRITES_IN_FLIGHT:
                writes.popleft().result()

    def consume(job: TensorJob, result: Pieces | torch.Tensor) -> None:
        if not job.merge:
            put({copied_name(job.name): result})  # type: ignore[dict-item]
        else:
            put({job.name: result} if isinstance(result, torch.Tensor) else result)

    try:
        stats = stream(plan, compute, consume, device=device, progress=progress, desc=desc,
                       pure=pure, chunkable=chunkable, native_inputs=native_inputs,
                       propagates_nonfinite=propagates_nonfinite)
        if finalize is not None:
            put(finalize())
        while writes:
            writes.popleft().result()
    except BaseException:
        writing.shutdown(wait=True, cancel_futures=True)
        writer.abort()
        raise
    writing.shutdown(wait=True)
    writer.close()
    return stats, list(writer.file_names)


def write_tensors(folder: Path, outputs: list[TensorInfo], read: Callable[[str], torch.Tensor],
                  *, max_shard_bytes: int, metadata: dict[str, str] | None = None) -> list[str]:
    """Write tensors that need no plan (an exported expert, a re-typed copy): each output is
    ``read(name)`` cast to its announced dtype and checked after the cast, into shards."""
    writer = ShardedWriter(folder, outputs, max_shard_bytes, metadata=metadata)
    try:
        for info in outputs:
            out = read(info.name).to("cpu", info.dtype)
            check_finite(out, "output", info.name)
            writer.write(info.name, out)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return list(writer.file_names)
