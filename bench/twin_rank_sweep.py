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
    ap.add_argument("--ranks", default="0.02,0.05,0.1,0.2,0.5",
                    help="comma-separated ranks (<= 1: fraction of the full rank)")
    ap.add_argument("--shared-lambda", type=float, default=0.3)
    ap.add_argument("--router", action="store_true",
                    help="also train a router per store and score its soft weights")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import polymerge
    from polymerge.stores.base import read_manifest
    from polymerge.stores.zoo import (
        ROUTER,
        ZOO_SCOPE,
        store_params_ratio,
        store_recipe,
        store_weights,
        train_suite_router,
    )
    from polymerge.zoo import evaluate as ev
    from polymerge.zoo.suite import get_suite

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started = time.time()
    suite = get_suite(args.suite, args.cache, scale=args.scale)
    suite.require_built()
    refs = ev.reference_rows(suite, progress=False)
    ensemble = refs["ensemble"]
    rows: list[list[str]] = []
    work = suite.root / "twin_sweep"

    def add(name: str, scores: dict, ratio: float, seconds: float, note: str = "") -> None:
        s = ev.summary(suite, scores, ensemble)
        rows.append([name] + [ev.fmt(suite, suite.primary, s["primary"].get(t))
                              for t in suite.tasks]
                    + [f"{s['normalized_mean']:.1f}", f"{ratio:.3f}", f"{seconds:.1f}", note])
        print(rows[-1], flush=True)

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
        add(f"Twin rank {rank:g} (oracle)", scores, ratio, build,
            f"exclusive-part error {err:.3f}")
        if args.router:
            start = time.time()
            metrics = train_suite_router(out, suite)
            router_s = time.time() - start
            scores = suite.evaluate(store_weights(out, suite, ROUTER), progress=False)
            add(f"Twin rank {rank:g} (router)", scores, ratio, build + router_s,
                f"routing accuracy {metrics.get('test_accuracy', math.nan):.3f}")
    base = ev.summary(suite, refs["base"], ensemble)
    header = (["model"] + list(suite.tasks)
              + ["normalized", "params vs ensemble", "build s", "note"])
    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = "\n".join([
        f"## Twin-Merging on the {suite.name} suite ({suite.scale}): rank against score and "
        "size",
        "",
        f"{_dt.date.today().isoformat()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} cores ({cpu}), load {load}; torch {torch.__version__}. "
        f"Command: `{command}` ({time.time() - started:.0f} s).",
        "",
        f"Scores: test {suite.primary} per task; normalized = mean of score / own expert x 100 "
        f"(the base scores {base['normalized_mean']:.1f}, the ensemble 100 at ratio 1). "
        f"Shared expert: task arithmetic, lambda {args.shared_lambda:g}; every 2-D weight's "
        "exclusive part compressed (scope `.`), 1-D tensors per expert. *oracle*: one-hot "
        "weights of each task's expert; *router*: the router's softmax weights per input. "
        "*error*: mean relative Frobenius error of the exclusive parts.",
        "",
        ev.markdown_table(header, rows),
        "",
    ])
    out_md = args.out or ROOT / "bench" / "results" / \
        f"twin_rank_sweep_{suite.name}{'' if suite.scale == 'full' else '-' + suite.scale}.md"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
