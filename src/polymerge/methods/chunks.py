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
PANEL = 1 << 10
"""Products over a chunk run as a batch of panels this long (see :func:`_panels`)."""


def worth_chunking(tensor: torch.Tensor) -> bool:
    """Chunk large CPU tensors only: on a GPU whole-tensor kernels are the fast path."""
    return tensor.device.type == "cpu" and tensor.numel() > CHUNK


def spans(numel: int) -> list[tuple[int, int]]:
    """``(begin, end)`` of each chunk of ``numel`` entries."""
    return [(b, min(numel, b + CHUNK)) for b in range(0, numel, CHUNK)]


def float_chunks(tensors: Sequence[torch.Tensor]
                 ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Each span with the tensors' entries in it as the rows of a float32 block
    ``(len(tensors), end - begin)``, free to modify in place until the next span is drawn
    (converted straight into place: no per-input copy to stack); one span of everything
    where chunking is not worth it (small or GPU tensors).

    One buffer serves every span: a fresh block per chunk is fresh memory from the
    allocator each time, and its page faults cost more system time than the chunk's math.
    """
    flat = [t.reshape(-1) for t in tensors]
    numel = flat[0].numel()
    bounds = spans(numel) if worth_chunking(tensors[0]) else [(0, numel)]
    buffer = torch.empty(len(flat), max((e - b for b, e in bounds), default=0),
                         dtype=torch.float32, device=flat[0].device)
    for b, e in bounds:
        block = buffer[:, :e - b]
        for row, t in zip(block, flat, strict=True):
            row.copy_(t[b:e])
        yield b, e, block


def gram(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 Gram matrix ``G[i, j] = v_i . v_j`` of ``v_i = tensors[i] - base`` (or the
    tensors themselves), every entry of each tensor one coordinate.

    One pass over the inputs and one small matrix product per chunk: Model Stock, Multi-SLERP
    and the Karcher mean only need these dot products, because their results are linear
    combinations of the inputs.
    """
    inputs = list(tensors) if base is None else [base, *tensors]
    n = len(tensors)
    total = torch.zeros(n, n, dtype=torch.float64)
    for _, _, block in float_chunks(inputs):
        vectors = block if base is None else block[1:].sub_(block[0])
        panels = _panels(vectors)
        if panels is None:
            total += (vectors @ vectors.T).double().cpu()
        else:
            total += torch.bmm(panels, panels.transpose(1, 2)).sum(0, dtype=torch.float64).cpu()
    return total


def _panels(rows: torch.Tensor) -> torch.Tensor | None:
    """The rows ``(n, width)`` as a batch of ``(n, PANEL)`` panels, ``(width / PANEL, n,
    PANEL)`` (a view), or None when the width is not a whole number of panels.

    A product of a few long rows (``n`` is the number of models) is much faster on CPU as a
    batch of short ones: the Gram matrix of four rows as one product takes 1.6 times as long
    as the batch, their weighted sum as one vector-matrix product 1.2 times
    (``python bench/torch_ops.py``). The Gram matrix's sums over the panels go in float64, no
    less exact than one long float32 product; the weighted sum is the same sum per entry.
    """
    width = rows.shape[1]
    if width % PANEL or rows.stride(1) != 1:
        return None
    return rows.view(rows.shape[0], width // PANEL, PANEL).transpose(0, 1)


def combine(tensors: Sequence[torch.Tensor], coefs: Sequence[float],
            around: torch.Tensor | None = None) -> torch.Tensor:
    """``around + sum_i coefs[i] * (tensors[i] - around)`` (without ``around``: the plain
    weighted sum) as a new float32 tensor, chunk by chunk.

    Each chunk is one vector-matrix product of the weights ``(1 - sum_i coefs[i], coefs...)``
    with the block of inputs, written straight into the output: faster than subtracting,
    scaling and adding row by row (bench/method_kernels.py, Model Stock). The sum is then
    taken around 0 rather than around ``around``, which moves the float32 rounding from the
    offsets' scale to the result's (a few float32 ulps of the result, far below the bf16
    outputs' rounding).
    """
    inputs = list(tensors) if around is None else [around, *tensors]
    weights = list(coefs) if around is None else [1.0 - sum(coefs), *coefs]
    out = torch.empty(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    flat_out = out.view(-1)
    row = torch.tensor(weights, dtype=torch.float32, device=out.device)
    for b, e, block in float_chunks(inputs):
        panels = _panels(block)
        if panels is None:
            torch.matmul(row.unsqueeze(0), block, out=flat_out[b:e].unsqueeze(0))
        else:  # (panels, 1, n) @ (panels, n, PANEL): the same sums, a panel at a time
            torch.bmm(row.view(1, 1, -1).expand(panels.shape[0], 1, -1), panels,
                      out=flat_out[b:e].view(panels.shape[0], 1, PANEL))
    return out
