#!/usr/bin/env python
"""Channel Merging on a zoo suite: how K changes score and size, next to static merges.

For each group method (TIES-CM, DARE-CM) and each K (default 1, 2, 3, N) it builds a channel
store of the suite's experts with the paper's defaults (30% trimmed or dropped, lambda 0.5),
scores it with oracle routing (each task's own expert) and, with ``--router``, with a router
trained on the suite's validation queries; it also scores the plain static merges with the same
parameters (TIES, DARE-TIES) and task arithmetic (lambda 0.5). Normalized score = mean over
tasks of score / own expert's score x 100. Writes ``bench/results/channel_k_sweep_<suite>.md``.

Usage::

    polymerge zoo build cls                      # once (the experts)
    python bench/channel_k_sweep.py --suite cls --router
    python bench/channel_k_sweep.py --suite cls --scale mini --groups 1,2   # smoke run
"""

from __future__ import annotations

import argparse
import math
import time

from zoo_sweep import Sweep, add_suite_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_suite_args(ap)
    ap.add_argument("--groups", default="1,2,3,N", help="comma-separated K values (N = all)")
    ap.add_argument("--methods", default="ties,dare_ties")
    ap.add_argument("--density", type=float, default=0.7,
                    help="fraction of each delta kept (paper: 0.7, i.e. 30%% trimmed/dropped)")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.5,
                    help="scale of each group's merged delta (paper: 0.5)")
    ap.add_argument("--router", action="store_true", help="also train and score routers (K=2)")
    ap.add_argument("--no-static", action="store_true", help="skip the static baselines")
    args = ap.parse_args()
    sweep = Sweep(args)

    import polymerge
    from polymerge.stores import is_store
    from polymerge.zoo.report import plan_method, stored_params_ratio
    from polymerge.zoo.stores import (
        ROUTER,
        ZOO_SCOPE,
        channel_recipe,
        score_store,
        store_params_ratio,
        store_weights,
        train_suite_router,
    )

    suite = sweep.suite
    n = len(suite.tasks)
    ks = [n if k.strip().upper() == "N" else int(k) for k in args.groups.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    label = {"ties": "TIES-CM", "dare_ties": "DARE-CM"}
    work = suite.root / "k_sweep"

    for method in methods:
        for k in ks:
            out = work / f"{method}-k{k}-d{args.density:g}-l{args.lam:g}"
            start = time.time()
            polymerge.merge(channel_recipe(suite, groups=k, group_method=method,
                                           scope=ZOO_SCOPE, density=args.density,
                                           **{"lambda": args.lam}),
                            out, force=True, progress=False)
            build = time.time() - start
            ratio = store_params_ratio(suite, out)
            scores = suite.evaluate(store_weights(out, suite), progress=False)
            sweep.add(f"{label.get(method, method)} K={k} (oracle)", scores, ratio, build)
            if args.router and k == 2:
                start = time.time()
                metrics = train_suite_router(out, suite)
                router_s = time.time() - start
                scores = suite.evaluate(store_weights(out, suite, ROUTER), progress=False)
                sweep.add(f"{label.get(method, method)} K={k} (router)", scores, ratio,
                          build + router_s,
                          f"routing accuracy {metrics.get('test_accuracy', math.nan):.3f}")
    if not args.no_static:
        from polymerge.registry import get_tensor_method as get_method

        same = {"density": args.density, "lambda": args.lam}
        for name, params in (("ties", same), ("dare_ties", same),
                             ("task_arithmetic", {"lambda": args.lam})):
            plan = plan_method(get_method(name), suite, params, label=name)
            out = work / f"static-{name}"
            start = time.time()
            polymerge.merge(plan.recipe, out, force=True, progress=False)
            build = time.time() - start
            if is_store(out):  # experts with task heads: the merged body plus their heads
                scores = score_store(suite, out, progress=False)
                ratio = store_params_ratio(suite, out)
            else:
                scores = suite.evaluate(lambda _t, _o=out: _o, progress=False)
                ratio = stored_params_ratio(suite, out)
            sweep.add(f"{name} (static)", scores, ratio, build)
    tag = "" if (args.density, args.lam) == (0.7, 0.5) else f"-d{args.density:g}-l{args.lam:g}"
    sweep.write(
        f"Channel Merging on the {suite.name} suite ({suite.scale}): K against score and size",
        f"Stores use density {args.density:g} and lambda {args.lam:g} (the paper's defaults: "
        "0.7 and 0.5), every 2-D weight channel-merged (scope `.`), norms and biases per "
        "expert; static merges use the same density and lambda.",
        args.out, "channel_k_sweep", tag)


if __name__ == "__main__":
    main()
