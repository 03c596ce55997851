#!/usr/bin/env python
"""Twin-Merging on a zoo suite: how the rank of the exclusive parts changes score and size.

For each rank (default 0.02, 0.05, 0.1, 0.2, 0.5 of the full rank) it builds a twin store of the
suite's experts (task-arithmetic shared expert, lambda 0.3, every 2-D weight compressed), scores
it with oracle one-hot weights (each task's own expert) and, with ``--router``, with the soft
weights of a router trained on the suite's validation queries (features of the shared model).
Normalized score = mean over tasks of score / own expert's score x 100. Writes
``bench/results/twin_rank_sweep_<suite>.md``.

Usage::

    polymerge zoo build cls                                  # once (the experts)
    python bench/twin_rank_sweep.py --suite cls --router
    python bench/twin_rank_sweep.py --suite cls --scale mini --ranks 0.1   # smoke run
"""

from __future__ import annotations

import argparse
import math
import time

from zoo_sweep import Sweep, add_suite_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_suite_args(ap)
    ap.add_argument("--ranks", default="0.02,0.05,0.1,0.2,0.5",
                    help="comma-separated ranks (<= 1: fraction of the full rank)")
    ap.add_argument("--shared-lambda", type=float, default=0.3)
    ap.add_argument("--router", action="store_true",
                    help="also train a router per store and score its soft weights")
    args = ap.parse_args()
    sweep = Sweep(args)

    import polymerge
    from polymerge.stores import read_manifest
    from polymerge.zoo.stores import (
        ROUTER,
        ZOO_SCOPE,
        store_params_ratio,
        store_recipe,
        store_weights,
        train_suite_router,
    )

    suite = sweep.suite
    work = suite.root / "twin_sweep"
    for rank in (float(r) for r in args.ranks.split(",")):
        out = work / f"rank{rank:g}-l{args.shared_lambda:g}"
        start = time.time()
        polymerge.merge(store_recipe(suite, "twin", rank=rank, scope=ZOO_SCOPE,
                                     shared_lambda=args.shared_lambda),
                        out, force=True, progress=False)
        build = time.time() - start
        ratio = store_params_ratio(suite, out)
        err = read_manifest(out)["summary"]["recon_error"]["mean"]
        scores = suite.evaluate(store_weights(out, suite), progress=False)
        sweep.add(f"Twin rank {rank:g} (oracle)", scores, ratio, build,
                  f"exclusive-part error {err:.3f}")
        if args.router:
            start = time.time()
            metrics = train_suite_router(out, suite)
            router_s = time.time() - start
            scores = suite.evaluate(store_weights(out, suite, ROUTER), progress=False)
            sweep.add(f"Twin rank {rank:g} (router)", scores, ratio, build + router_s,
                      f"routing accuracy {metrics.get('test_accuracy', math.nan):.3f}")
    sweep.write(
        f"Twin-Merging on the {suite.name} suite ({suite.scale}): rank against score and size",
        f"Shared expert: task arithmetic, lambda {args.shared_lambda:g}; every 2-D weight's "
        "exclusive part compressed (scope `.`), 1-D tensors per expert. *oracle*: one-hot "
        "weights of each task's expert; *router*: the router's softmax weights per input. "
        "*error*: mean relative Frobenius error of the exclusive parts.",
        args.out, "twin_rank_sweep")


if __name__ == "__main__":
    main()
