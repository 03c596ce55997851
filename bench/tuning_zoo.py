"""SuperMerge and AdaMerging on a zoo suite, next to task arithmetic and TIES, with the peak
memory of flat against hierarchical merging.

Every merge runs as ``polymerge merge`` in a fresh process, so the peak RSS it reports (from
``coefficients.json``; ``ru_maxrss`` of that process) is its own. Every output is scored by the
suite's own ``evaluate`` (the same code ``polymerge eval`` runs), against the suite's cached
reference rows. Results go to a markdown file with the date, machine and exact command.

    python bench/tuning_zoo.py --suite cls --cache /tmp/zoo --steps 100 \
        --out bench/results/tuning.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from polymerge.stores import is_store
from polymerge.zoo import get_suite
from polymerge.zoo.evaluate import markdown_table, reference_rows, summary
from polymerge.zoo.learned import learned_recipes, learned_summary
from polymerge.zoo.stores import score_store

BASELINES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # label -> (method, shared parameters, per-model parameters)
    "task_arithmetic (defaults: lambda=1)": ("task_arithmetic", {}, {}),
    "task_arithmetic lambda=0.3": ("task_arithmetic", {"lambda": 0.3}, {}),
    "ties (defaults: density=1)": ("ties", {}, {}),
    "ties density=0.2": ("ties", {}, {"density": 0.2}),
}


def baseline_recipe(suite: Any, method: str, shared: dict, per_model: dict) -> dict[str, Any]:
    return {"merge_method": method, "base_model": str(suite.base_dir),
            "models": [{"model": str(suite.expert_dir(t)), "name": t,
                        "parameters": dict(per_model)} for t in suite.tasks],
            "parameters": dict(shared), "dtype": "float32", "seed": 0}


def run_merge(recipe: dict[str, Any], out: Path, work: Path, threads: int) -> float:
    """``polymerge merge`` in a fresh process; returns its wall time."""
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", POLYMERGE_ZOO_CACHE=str(recipe_cache(recipe)))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "polymerge.cli", "merge", str(path), "-o", str(out),
                    "--force", "-q"], check=True, env=env)
    return time.perf_counter() - start


def recipe_cache(recipe: dict[str, Any]) -> Path:
    return Path(recipe["base_model"]).parent.parent


def machine() -> str:
    import torch

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores shared with "
            f"other jobs, Python {platform.python_version()}, torch {torch.__version__}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="cls")
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--scale", default="full")
    p.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
    p.add_argument("--steps", type=int, help="override every learned variant's steps")
    p.add_argument("--variants", help="comma-separated labels of learned variants to run")
    p.add_argument("--baselines", help="comma-separated labels of static baselines to run "
                   "(default: all; 'none' for none)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each merge")
    p.add_argument("--work", type=Path, default=Path("/tmp/polymerge-tuning-bench"))
    p.add_argument("--out", type=Path, default=Path("bench/results/tuning.md"))
    p.add_argument("--json", type=Path, help="also write the raw rows as JSON")
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    kwargs: dict[str, Any] = {"scale": args.scale}
    suite = get_suite(args.suite, args.cache, **kwargs)
    if args.tasks:
        suite = type(suite)(args.cache, scale=args.scale, **{
            "tasks" if args.suite == "cls" else "domains": tuple(args.tasks.split(","))})
    args.work.mkdir(parents=True, exist_ok=True)
    refs = reference_rows(suite, progress=False)
    ensemble = refs["ensemble"]

    jobs: list[tuple[str, dict[str, Any]]] = []
    wanted = list(BASELINES) if not args.baselines else [
        b for b in args.baselines.split(",") if b != "none"]
    jobs += [(label, baseline_recipe(suite, *BASELINES[label])) for label in wanted]
    overrides = {"steps": args.steps} if args.steps else {}
    learned = learned_recipes(suite, **overrides)
    chosen = args.variants.split(",") if args.variants else list(learned)
    jobs += [(label, learned[label]) for label in chosen]

    rows: list[dict[str, Any]] = []
    for label, recipe in jobs:
        out = args.work / label.replace(" ", "_").replace("(", "").replace(")", "").replace(
            ":", "").replace("=", "")
        print(f"== {label}", flush=True)
        seconds = run_merge(recipe, out, args.work, args.threads)
        if is_store(out):  # experts with task heads: a merged body plus their heads
            scores = score_store(suite, out, progress=False)
        else:
            scores = suite.evaluate(lambda _t, _o=out: _o, progress=False)
        s = summary(suite, scores, ensemble)
        row = {"label": label, "seconds": seconds, "scores": scores, **s,
               "learned": learned_summary(out)}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("label", "mean", "normalized_mean", "seconds")}),
              flush=True)

    ref_rows = []
    for name in ("base", "ensemble"):
        s = summary(suite, refs[name], ensemble)
        ref_rows.append({"label": name, "seconds": None, "learned": None, **s})
    text = render(suite, ref_rows[:1] + rows + ref_rows[1:], command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    marker_start = f"<!-- tuning:{suite.name}:start -->"
    marker_end = f"<!-- tuning:{suite.name}:end -->"
    block = f"{marker_start}\n{text}\n{marker_end}"
    old = args.out.read_text() if args.out.exists() else "# Learned merges: measured\n"
    if marker_start in old and marker_end in old:
        before, rest = old.split(marker_start, 1)
        new = before + block + rest.split(marker_end, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    args.out.write_text(new)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    print(text)
    return 0


def render(suite: Any, rows: list[dict[str, Any]], command: str) -> str:
    metric = suite.metric(suite.primary)
    header = (["model"] + list(suite.tasks)
              + ["mean", "normalized", "coefficients", "tuning s", "merge s", "peak RSS GB",
                 "task vectors GB"])
    cells = []
    for r in rows:
        learned = r["learned"] or {}
        cells.append(
            [r["label"]]
            + [format(r["primary"][t] * metric.scale, metric.fmt) for t in suite.tasks]
            + [format(r["mean"] * metric.scale, metric.fmt), f"{r['normalized_mean']:.1f}",
               f"{learned['trainable_coefficients']:,}" if learned else "–",
               f"{learned['tuning_seconds']:.0f}" if learned else "–",
               "–" if r["seconds"] is None else f"{r['seconds']:.0f}",
               f"{learned['peak_rss_bytes'] / 1e9:.2f}" if learned else "–",
               f"{learned['peak_task_vector_bytes'] / 1e9:.3f}" if learned else "–"])
    return "\n".join([
        f"## {suite.name} suite ({suite.scale}): learned merges against static ones",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {machine()}.",
        "",
        f"Command: `{command}`",
        "",
        f"Test {suite.primary} per task ({'x100, ' if metric.scale == 100 else ''}"
        f"{'higher' if metric.higher_is_better else 'lower'} is better), scored by the suite's "
        "own evaluation; *normalized*: mean over tasks of score / own expert's score x 100. "
        "Learned merges train on the suite's validation split (never the test split). "
        "*peak RSS*: the merge process's own peak resident set (ru_maxrss); *task vectors*: "
        "the most task-vector bytes resident at once (float32).",
        "",
        markdown_table(header, cells),
    ])


if __name__ == "__main__":
    sys.exit(main())
