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
import datetime as _dt
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="cls")
    ap.add_argument("--scale", default="full")
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--groups", default="1,2,3,N", help="comma-separated K values (N = all)")
    ap.add_argument("--methods", default="ties,dare_ties")
    ap.add_argument("--density", type=float, default=0.7,
                    help="fraction of each delta kept (paper: 0.7, i.e. 30%% trimmed/dropped)")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.5,
                    help="scale of each group's merged delta (paper: 0.5)")
    ap.add_argument("--router", action="store_true", help="also train and score routers (K=2)")
    ap.add_argument("--no-static", action="store_true", help="skip the static baselines")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import polymerge
    from polymerge.stores.zoo import (
        ROUTER,
        ZOO_SCOPE,
        channel_recipe,
        store_params_ratio,
        store_weights,
        train_suite_router,
    )
    from polymerge.zoo import evaluate as ev
    from polymerge.zoo.report import plan_method, stored_params_ratio
    from polymerge.zoo.suite import get_suite

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started = time.time()
    suite = get_suite(args.suite, args.cache, scale=args.scale)
    suite.require_built()
    n = len(suite.tasks)
    refs = ev.reference_rows(suite, progress=False)
    ensemble = refs["ensemble"]
    ks = [n if k.strip().upper() == "N" else int(k) for k in args.groups.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    label = {"ties": "TIES-CM", "dare_ties": "DARE-CM"}
    rows: list[list[str]] = []
    work = suite.root / "k_sweep"

    def add(name: str, scores: dict, ratio: float, seconds: float, note: str = "") -> None:
        s = ev.summary(suite, scores, ensemble)
        rows.append([name] + [ev.fmt(suite, suite.primary, s["primary"].get(t))
                              for t in suite.tasks]
                    + [f"{s['normalized_mean']:.1f}", f"{ratio:.3f}", f"{seconds:.1f}", note])
        print(rows[-1], flush=True)

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
            add(f"{label.get(method, method)} K={k} (oracle)", scores, ratio, build)
            if args.router and k == 2:
                start = time.time()
                metrics = train_suite_router(out, suite)
                router_s = time.time() - start
                scores = suite.evaluate(store_weights(out, suite, ROUTER), progress=False)
                add(f"{label.get(method, method)} K={k} (router)", scores, ratio,
                    build + router_s,
                    f"routing accuracy {metrics.get('test_accuracy', math.nan):.3f}")
    if not args.no_static:
        from polymerge.methods import get_method

        same = {"density": args.density, "lambda": args.lam}
        for name, params in (("ties", same), ("dare_ties", same),
                             ("task_arithmetic", {"lambda": args.lam})):
            plan = plan_method(get_method(name), suite, params, label=name)
            out = work / f"static-{name}"
            start = time.time()
            polymerge.merge(plan.recipe, out, force=True, progress=False)
            build = time.time() - start
            scores = suite.evaluate(lambda _t, _o=out: _o, progress=False)
            add(f"{name} (static)", scores, stored_params_ratio(suite, out), build)
    base = ev.summary(suite, refs["base"], ensemble)
    header = (["model"] + list(suite.tasks)
              + ["normalized", "params vs ensemble", "build s", "note"])
    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = "\n".join([
        f"## Channel Merging on the {suite.name} suite ({suite.scale}): K against score and "
        "size",
        "",
        f"{_dt.date.today().isoformat()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} cores ({cpu}), load {load}; torch {torch.__version__}. "
        f"Command: `{command}` ({time.time() - started:.0f} s).",
        "",
        f"Scores: test {suite.primary} per task; normalized = mean of score / own expert x 100 "
        f"(the base scores {base['normalized_mean']:.1f}, the ensemble 100 at ratio 1). "
        f"Stores use density {args.density:g} and lambda {args.lam:g} (the paper's defaults: "
        "0.7 and 0.5), every 2-D weight channel-merged (scope `.`), norms and biases per "
        "expert; static merges use the same density and lambda.",
        "",
        ev.markdown_table(header, rows),
        "",
    ])
    tag = "" if (args.density, args.lam) == (0.7, 0.5) else f"-d{args.density:g}-l{args.lam:g}"
    out_md = args.out or ROOT / "bench" / "results" / \
        f"channel_k_sweep_{suite.name}{'' if suite.scale == 'full' else '-' + suite.scale}{tag}.md"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
