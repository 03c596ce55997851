"""Whole-tensor methods computed in cache-sized chunks.

Methods such as TIES, Model Stock and Multi-SLERP need a few statistics of the whole tensor
(a top-k threshold, norms, dot products) and are otherwise per entry. Computing them on whole
float32 copies holds N float32 tensors at once and streams each through memory several times;
computing them a chunk at a time from the inputs as stored (bf16 in the usual recipe) holds
only the output, and every pass stays in the CPU's caches. A chunk of 2^18 float32 entries is
1 MiB, which fits a core's L2 with room for the temporaries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

CHUNK = 1 << 18


def worth_chunking(tensor: torch.Tensor) -> bool:
    """Chunk large CPU tensors only: on a GPU whole-tensor kernels are the fast path."""
    return tensor.device.type == "cpu" and tensor.numel() > CHUNK


def spans(numel: int) -> list[tuple[int, int]]:
    """``(begin, end)`` of each chunk of ``numel`` entries."""
    return [(b, min(numel, b + CHUNK)) for b in range(0, numel, CHUNK)]


def float_chunks(tensors: Sequence[torch.Tensor]
                 ) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """Each span with the tensors' entries in it, flattened and converted to float32 (new
    tensors, free to modify in place); one span of everything where chunking is not worth it
    (small or GPU tensors)."""
    flat = [t.reshape(-1) for t in tensors]
    numel = flat[0].numel()
    for b, e in spans(numel) if worth_chunking(tensors[0]) else [(0, numel)]:
        yield b, e, [t[b:e].to(torch.float32, copy=True) for t in flat]


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dot product of two chunks, to be summed over chunks as a Python float (double)."""
    return float(torch.dot(a, b))
