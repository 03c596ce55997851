"""What the torch operations the methods are built from cost on this CPU, one thread.

The chunked methods (TIES, RAM+, Arcee Fusion, ...) are sequences of torch operations over
cache-sized chunks, so the choice between two ways of writing a step is a choice between
operations whose costs differ by an order of magnitude (a ``torch.where`` against an in-place
product). This prints those costs, in nanoseconds an entry, on 2^18 float32 entries (one chunk
of :mod:`polymerge.methods.chunks`), and the two whole-tensor selections Arcee Fusion makes on a
million sampled scores.

    python bench/torch_ops.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from polymerge.methods.sparsify import order_statistics


def per_call(fn: Callable[[], object], repeat: int) -> float:
    """Mean seconds a call over ``repeat`` calls, after three warm-up calls."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    n = 1 << 18
    x, y = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    mask = x > 0.5
    scratch = torch.empty(n)
    one = torch.tensor(1.0)
    half = x.to(torch.bfloat16)
    rows = torch.randn(4, n, generator=gen)  # four models' deltas, one chunk
    panels = rows.view(4, n // 1024, 1024).transpose(0, 1)
    block = torch.randn(5, n, generator=gen)  # a base and four models
    block_panels = block.view(5, n // 1024, 1024).transpose(0, 1)
    weights = torch.randn(1, 5, generator=gen)
    batch_weights = weights.view(1, 1, 5).expand(n // 1024, 1, 5)
    chunk_ops: dict[str, Callable[[], object]] = {
        "torch.where(x >= 0, 1.0, -1.0)": lambda: torch.where(x >= 0, 1.0, -1.0),
        "torch.where(mask, x, y)": lambda: torch.where(mask, x, y),
        "x * mask (float * bool)": lambda: x * mask,
        "x == 0.5 (comparison)": lambda: x == 0.5,
        "x > 0.5 (comparison)": lambda: x > 0.5,
        "x * y (new tensor)": lambda: x * y,
        "scratch.mul_(1.0) (in place)": lambda: scratch.mul_(1.0),
        "scratch.add_(y) (in place)": lambda: scratch.add_(y),
        "F.hardshrink(x, 0.5)": lambda: F.hardshrink(x, 0.5),
        "F.threshold_(scratch, 0.5, 0.0)": lambda: F.threshold_(scratch, 0.5, 0.0),
        "torch.copysign(1, x)": lambda: torch.copysign(one, x),
        "scratch.masked_fill_(y == 0, 1.0)": lambda: scratch.masked_fill_(y == 0, 1.0),
        "torch.aminmax(x) (the NaN/Inf check)": lambda: torch.aminmax(x),
        "torch.aminmax(x in bf16)": lambda: torch.aminmax(half),
        "x.to(torch.bfloat16) (the output cast)": lambda: x.to(torch.bfloat16),
        "rows @ rows.T (Gram of 4 rows, one product)": lambda: rows @ rows.T,
        "the same as 1024-entry panels (bmm, float64 sum)":
            lambda: torch.bmm(panels, panels.transpose(1, 2)).sum(0, dtype=torch.float64),
        "weights @ block (5 rows combined, one product)": lambda: weights @ block,
        "the same as 1024-entry panels (bmm)": lambda: torch.bmm(batch_weights, block_panels),
    }
    print(f"one thread, {n} float32 entries, mean of {args.repeat} calls")
    print("| operation | ns an entry |")
    print("|---|---:|")
    for name, fn in chunk_ops.items():
        scratch.copy_(x)
        print(f"| `{name}` | {per_call(fn, args.repeat) / n * 1e9:.3f} |")

    sample = torch.rand(1_000_000, generator=gen) * 1e-4
    ranks = [250_001, 500_001, 750_001]
    table = torch.randn(11_534_336, generator=gen)
    picks = torch.randint(table.numel(), (1_000_000,), generator=gen)
    whole_ops: dict[str, Callable[[], object]] = {
        "three torch.kthvalue (quartiles of 1 M scores)":
            lambda: [torch.kthvalue(sample, r) for r in ranks],
        "order_statistics (the same three)": lambda: order_statistics(sample, ranks),
        "table[picks] (1 M of 11.5 M entries)": lambda: table[picks],
        "table.index_select(0, picks)": lambda: table.index_select(0, picks),
    }
    print()
    print("| operation | ms a call |")
    print("|---|---:|")
    for name, fn in whole_ops.items():
        print(f"| {name} | {per_call(fn, max(3, args.repeat // 20)) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
