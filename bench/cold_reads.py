"""How the reader's advice on mapped inputs costs a merge, page cache cold and warm.

A merge lends each tensor of its safetensors inputs from the files' mappings: a reader thread
maps job i+1 while the compute converts job i to float32 a chunk at a time (what
``polymerge.engine`` does, without the math). This times that pipeline over every tensor of
the benchmark's five 1 GB inputs with three kinds of advice from the reader:

- ``willneed``: ``MADV_WILLNEED`` (start the read-ahead; the compute faults the pages in);
- ``populate``: ``MADV_WILLNEED`` then ``MADV_POPULATE_READ`` (the reader faults them in);
- ``none``: no advice (the compute's page faults read the file).

Cold runs drop the page cache first (root only: ``echo 3 > /proc/sys/vm/drop_caches``).
Prints the pipeline's wall time and the compute thread's CPU time, per mode and cache state.

    python bench/cold_reads.py --models /work/bench_work/models-0.5B [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

MODES = ("willneed", "populate", "none")
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
CHUNK = 1 << 18


def layout(path: Path) -> dict[str, tuple[int, int]]:
    """Tensor name -> (begin, end) byte offsets in a safetensors file."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    start = 8 + length
    return {name: (start + e["data_offsets"][0], start + e["data_offsets"][1])
            for name, e in header.items() if name != "__metadata__"}


def pipeline(files: list[Path], mode: str) -> tuple[float, float]:
    """(wall seconds, compute thread CPU seconds) of one pass over every tensor."""
    layouts = [layout(f) for f in files]
    fds = [os.open(f, os.O_RDONLY) for f in files]
    maps = [mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) for fd in fds]
    names = sorted(layouts[0], key=lambda n: layouts[0][n][0])
    page = mmap.PAGESIZE

    def load(name: str) -> list[torch.Tensor]:
        tensors = []
        for mapping, table in zip(maps, layouts, strict=True):
            begin, end = table[name]
            start = begin - begin % page
            if mode in ("willneed", "populate"):
                mapping.madvise(mmap.MADV_WILLNEED, start, end - start)
            if mode == "populate":
                mapping.madvise(MADV_POPULATE_READ, start, end - start)
            tensors.append(torch.frombuffer(mapping, dtype=torch.bfloat16,
                                            count=(end - begin) // 2, offset=begin))
        return tensors

    block = torch.empty(len(files), CHUNK)
    cpu = 0.0
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(load, names[0])
        for index in range(len(names)):
            tensors = pending.result()
            if index + 1 < len(names):
                pending = reader.submit(load, names[index + 1])
            before = resource.getrusage(resource.RUSAGE_THREAD)
            numel = tensors[0].numel()
            for b in range(0, numel, CHUNK):
                e = min(numel, b + CHUNK)
                for row, tensor in zip(block, tensors, strict=True):
                    row[:e - b].copy_(tensor[b:e])
            after = resource.getrusage(resource.RUSAGE_THREAD)
            cpu += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            del tensors
    wall = time.perf_counter() - start
    for mapping in maps:
        mapping.close()
    for fd in fds:
        os.close(fd)
    return wall, cpu


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, required=True,
                        help="folder of bench/merge_speed.py's models (base, expert1, ...)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    files = sorted(args.models.glob("*/model.safetensors"))
    if len(files) < 2:
        raise SystemExit(f"no models under {args.models}")
    print(f"{len(files)} inputs, {sum(f.stat().st_size for f in files) / 1e9:.1f} GB; "
          f"{args.repeat} rounds, modes alternating")
    print("| cache | advice | wall s | compute CPU s |")
    print("|---|---|---:|---:|")
    for cache in ("cold", "warm"):
        for _ in range(args.repeat):
            for mode in MODES:
                if cache == "cold":
                    drop_caches()
                else:
                    pipeline(files, "willneed")  # fill the page cache
                wall, cpu = pipeline(files, mode)
                print(f"| {cache} | {mode} | {wall:.2f} | {cpu:.2f} |", flush=True)


if __name__ == "__main__":
    main()
