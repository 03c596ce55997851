"""Per-tensor cost of the whole-tensor methods: chunked path against whole tensors.

One bf16 tensor of 2816 x 1024 entries by default (an MLP weight of the 0.5 B benchmark
model; ``--shape``), a base (N(0, 1), ``--base-std``) and four experts (base + N(0, 0.002)),
one torch thread. With the default base most deltas are 0 or one bf16 ulp, so the top-k
threshold falls on long runs of ties; ``--base-std 0.02`` is bench/merge_speed.py's model,
whose deltas spread over many values. Each
method's function runs on the inputs as stored twice: with its cache-sized chunks (what a
merge runs on CPU) and with chunking turned off (the whole-tensor path, what polymerge ran
before and still runs on small or GPU tensors). Prints the median of a few calls and the
largest difference between the two.

    python bench/method_kernels.py [--repeat 5] [--shape 2816x1024] [--base-std 1.0]
                                   [--methods ties,...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from polymerge.methods import chunks
from polymerge.registry import get_tensor_method

CASES = {
    "ties": {"weight": [1.0] * 4, "density": [0.3] * 4, "normalize": True},
    "model_stock": {},
    "multislerp": {"weight": [0.25] * 4},
    "karcher": {},
    "sce": {"select_topk": 0.5},
    "ramplus_tl": {},
    "arcee_fusion": {},  # the base and one other model
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--shape", default="2816x1024", help="ROWSxCOLS of the tensor")
    parser.add_argument("--base-std", type=float, default=1.0,
                        help="standard deviation of the base's entries")
    parser.add_argument("--methods", default=",".join(CASES), help="comma-separated methods")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    shape = tuple(int(n) for n in args.shape.split("x"))
    base = (torch.randn(shape, generator=gen) * args.base_std).to(torch.bfloat16)
    experts = [(base.float() + torch.randn(shape, generator=gen) * 0.002).to(torch.bfloat16)
               for _ in range(4)]
    default = chunks.CHUNK
    print(f"{'method':12s} {'whole s':>8s} {'chunked s':>10s} {'speed-up':>9s} {'max |diff|':>11s}")
    for name in args.methods.split(","):
        params = CASES[name]
        fn = get_tensor_method(name).fn
        others = experts[:1] if name == "arcee_fusion" else experts
        seconds, outs = {}, {}
        for label, chunk in (("whole", 1 << 40), ("chunked", None)):
            chunks.CHUNK = default if chunk is None else chunk
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                outs[label] = fn(base, others, generator=torch.Generator().manual_seed(1),
                                 **params)
                times.append(time.perf_counter() - start)
            seconds[label] = statistics.median(times)
        chunks.CHUNK = default
        diff = float((outs["whole"] - outs["chunked"]).abs().max())
        print(f"{name:12s} {seconds['whole']:8.3f} {seconds['chunked']:10.3f} "
              f"{seconds['whole'] / seconds['chunked']:8.1f}x {diff:11.2e}")


if __name__ == "__main__":
    main()
