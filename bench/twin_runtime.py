#!/usr/bin/env python
"""Twin-Merging runtime costs: batched per-input mixing against per-input materialization.

What it does, in one run (nothing is downloaded):

1. builds a random ``BertModel`` of the all-MiniLM-L6-v2 shape (hidden 384, 6 layers,
   intermediate 1536, vocabulary 30522) as the base and ``--experts`` synthetic experts: base +
   seeded deltas of 1% of each tensor's spread, half a component common to all experts and
   half each expert's own, every 2-D delta with a decaying singular spectrum (s_i ~ 1/i, as
   fine-tuning deltas have; pure Gaussian deltas would make every low-rank truncation equally
   bad). Timing does not depend on what the experts learned; the error curve does, so it
   describes these synthetic deltas only;
2. builds a twin store (task-arithmetic shared expert, lambda 0.3, rank ``--rank`` of every
   2-D weight, embeddings included) with ``polymerge.merge``;
3. times, on ``--threads`` torch threads (1 by default), the median latency of one batch of
   ``--seq`` random tokens at each batch size in ``--batches`` for:

   * **plain**: the plain model (nn.Linear layers, the shared weights);
   * **twin batched**: the twin runtime's model with a different random softmax weight vector
     per input (two extra GEMMs per covered layer over the stacked factors);
   * **per-input materialization**: for each input, build every mixed tensor
     ``W_shared + sum_t w_t U_t V_t`` (embeddings and per-expert norms and biases included, so
     the outputs are the same as the batched path's) into a plain model and run that input
     alone, as the paper's code does. It is timed on at most ``--materialize-inputs`` inputs
     of the batch and scaled to the batch size (each input costs the same);
   * **folded**: one weight vector for the whole batch, folded into the weights once per
     batch (``fold=True``; the fold is inside the timed region);
   * **twin batched, top-k** for each k in ``--top-k`` (1 and 2 by default): random per-row
     softmax weights with only each row's k largest kept and renormalized, so routes are
     mixed across the batch; each layer picks the dense stacked path or a grouped path (each
     expert, or each set of experts, only on the rows that use it) by the runtime's cost
     rule, and the report counts the paths taken;

   and checks that the batched outputs equal the materialized ones (top-k weights included);
4. builds one store per rank in ``--ranks`` and reads the mean and max relative Frobenius error
   of the exclusive parts (recorded by the builder); plots the curve (``--png``);
5. writes a markdown report with the date, machine, torch version and exact command to
   ``bench/results/twin_runtime.md`` (``--out``).

Usage::

    python bench/twin_runtime.py                         # about 3-4 minutes on one thread
    python bench/twin_runtime.py --batches 1 8 --ranks 0.1 0.5 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- models


def minilm_config() -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                      num_attention_heads=12, intermediate_size=1536,
                      max_position_embeddings=512, type_vocab_size=2)


def _decaying(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """A random matrix whose singular values fall off like 1/i, unit RMS."""
    k = min(rows, cols)
    scales = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    m = (torch.randn(rows, k, generator=g) * scales) @ torch.randn(k, cols, generator=g)
    return m / m.square().mean().sqrt().clamp_min(1e-12)


def _unit(shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    if len(shape) == 2:
        return _decaying(shape[0], shape[1], g)
    return torch.randn(shape, generator=g)


def make_models(workdir: Path, experts: int, seed: int) -> tuple[Path, list[Path]]:
    """The base and the synthetic experts as HF folders (see the module docstring)."""
    from safetensors.torch import save_file
    from transformers import BertModel

    torch.manual_seed(seed)
    base = BertModel(minilm_config()).eval()
    base_dir = workdir / "base"
    base.save_pretrained(base_dir)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    common = {k: _unit(v.shape, g) for k, v in state.items() if v.is_floating_point()}
    out = []
    for t in range(experts):
        new = {}
        for k, v in state.items():
            if not v.is_floating_point():
                new[k] = v
                continue
            spread = float(v.std()) if v.numel() > 1 and float(v.std()) > 0 else \
                float(v.abs().mean()) or 1.0
            delta = 0.5 * common[k] + 0.5 * _unit(v.shape, g)
            new[k] = (v + 0.01 * spread * delta).contiguous()
        folder = workdir / f"expert{t}"
        folder.mkdir()
        save_file(new, str(folder / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(base_dir / "config.json", folder / "config.json")
        out.append(folder)
    return base_dir, out


def build_twin(base: Path, experts: list[Path], out: Path, rank: float) -> float:
    import polymerge

    recipe = {"merge_method": "twin", "base_model": str(base),
              "models": [{"model": str(e), "name": e.name} for e in experts],
              "parameters": {"shared_method": "task_arithmetic", "shared_lambda": 0.3,
                             "rank": rank, "scope": "."},
              "dtype": "float32", "seed": 0}
    start = time.perf_counter()
    polymerge.merge(recipe, out, force=True, progress=False)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- timing


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (allocations, first-call paths)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Materializer:
    """Per-input materialization into a plain model: every mixed tensor rebuilt for one
    weight vector, then a plain forward pass."""

    def __init__(self, store: Any) -> None:
        from polymerge.runtime import build_shared_model
        from polymerge.runtime.mixing_layers import LowRank
        from polymerge.stores import expert_part, piece_name

        self.model = build_shared_model(store)
        targets = store.targets(self.model)
        n = len(store.experts)
        self.low_rank: list[tuple[torch.Tensor, torch.Tensor, Any]] = []
        self.dense: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for name, entry in store.entries.items():
            if name not in targets:
                continue
            shared = store.shared_tensor(name)
            if entry.kind == "twin":
                us, vs = zip(*(store.factors(name, t) for t in range(n)), strict=True)
                self.low_rank.append((targets[name], shared, LowRank.from_lists(us, vs)))
            elif entry.kind == "expert":
                delta = torch.stack([store.pieces[piece_name(name, expert_part(t))] - shared
                                     for t in range(n)])
                self.dense.append((targets[name], shared, delta))

    def materialize(self, w: torch.Tensor) -> None:
        for target, shared, lr in self.low_rank:
            torch.addmm(shared, lr.u_cat * w.repeat_interleave(lr.rank), lr.v_cat, out=target)
        for target, shared, delta in self.dense:
            torch.add(shared, torch.tensordot(w, delta, dims=1), out=target)

    def run(self, ids: torch.Tensor, mask: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for b in range(ids.shape[0]):
            self.materialize(w[b])
            outs.append(self.model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1])
                        .last_hidden_state[0])
        return outs


def softmax_weights(rows: int, experts: int, g: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, experts, generator=g), -1)


def top_k_weights(rows: int, experts: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Per-row softmax weights, each row's k largest kept and renormalized (a top-k router
    on random logits: the rows' routes differ)."""
    w = softmax_weights(rows, experts, g)
    top = w.topk(min(k, experts), -1)
    w = torch.zeros_like(w).scatter_(1, top.indices, top.values)
    return w / w.sum(-1, keepdim=True)


def paths_taken(mixture: Any) -> dict[str, int]:
    """How many mixed linears and embeddings took each path in a call (its Mixture)."""
    counts: dict[str, int] = {}
    for path in mixture.paths.values():
        counts[path] = counts.get(path, 0) + 1
    return counts


def describe_paths(counts: dict[str, int]) -> str:
    order = ["dense", "experts", "sets", "shared ids", "folded"]
    return ", ".join(f"{counts[p]} {p}" for p in sorted(counts, key=lambda p: (
        order.index(p) if p in order else len(order), p)))


def time_twin(rt: Any, ids: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
              repeats: int) -> float:
    def run() -> Any:
        with rt.mixed(w, fold=False):
            return rt.model(input_ids=ids, attention_mask=mask)

    with torch.inference_mode():
        return median_time(run, repeats)


def extra_flops(store: Any) -> float:
    """Multiply-adds of the low-rank path over those of the plain linears, per token
    (every expert active): sum T r (rows + cols) / sum rows cols over low-rank linears."""
    n = len(store.experts)
    extra = plain = 0
    for name, entry in store.entries.items():
        if entry.kind == "twin" and "embeddings" not in name:
            rows, cols = entry.shape
            extra += n * int(entry.extra["rank"]) * (rows + cols)
            plain += rows * cols
    return extra / plain if plain else float("nan")


def time_batches(rt: Any, mat: Materializer, batches: list[int], seq: int, repeats: int,
                 limit: int, seed: int, top_ks: list[int]) -> list[dict[str, Any]]:
    plain = mat.model
    n = len(rt.experts)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in batches:
        ids = torch.randint(1000, 30000, (b, seq), generator=g)
        mask = torch.ones_like(ids)
        w = softmax_weights(b, n, g)
        one = softmax_weights(1, n, g)[0]
        routed = {k: top_k_weights(b, n, k, g) for k in top_ks}
        k = min(b, limit)

        def run_plain(ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> Any:
            return plain(input_ids=ids, attention_mask=mask)

        def run_twin(ids: torch.Tensor = ids, mask: torch.Tensor = mask,
                     w: torch.Tensor = w) -> Any:
            with rt.mixed(w, fold=False):
                return rt.model(input_ids=ids, attention_mask=mask)

        def mixed_paths(w: torch.Tensor, ids: torch.Tensor = ids,
                        mask: torch.Tensor = mask) -> tuple[Any, dict[str, int]]:
            with rt.mixed(w, fold=False) as mixture:
                out = rt.model(input_ids=ids, attention_mask=mask)
            return out, paths_taken(mixture)

        def run_fold(ids: torch.Tensor = ids, mask: torch.Tensor = mask,
                     one: torch.Tensor = one) -> Any:
            with rt.mixed(one, fold=True):
                return rt.model(input_ids=ids, attention_mask=mask)

        def run_mat(ids: torch.Tensor = ids[:k], mask: torch.Tensor = mask[:k],
                    w: torch.Tensor = w[:k]) -> Any:
            return mat.run(ids, mask, w)

        with torch.inference_mode():
            t_plain = median_time(run_plain, repeats)
            t_twin = median_time(run_twin, repeats)
            t_fold = median_time(run_fold, repeats)
            t_mat = median_time(run_mat, repeats) * b / k
            out, dense_paths = mixed_paths(w)
            batched = out.last_hidden_state[:k]
            per_input = torch.stack(mat.run(ids[:k], mask[:k], w[:k]))
            diff = float((batched - per_input).abs().max())
            top: dict[int, dict[str, Any]] = {}
            for topk, wk in routed.items():
                t_k = median_time(partial(run_twin, w=wk), repeats)
                out, paths = mixed_paths(wk)
                batched = out.last_hidden_state[:k]
                per_input = torch.stack(mat.run(ids[:k], mask[:k], wk[:k]))
                top[topk] = {"twin": t_k, "diff": float((batched - per_input).abs().max()),
                             "paths": paths, "routes": int((wk != 0).any(0).sum())}
        rows.append({"batch": b, "plain": t_plain, "twin": t_twin, "materialized": t_mat,
                     "folded": t_fold, "diff": diff, "measured_inputs": k, "top": top,
                     "paths": dense_paths})
        print(f"batch {b:4d}: plain {t_plain * 1e3:9.1f} ms  twin {t_twin * 1e3:9.1f} ms  "
              f"materialized {t_mat * 1e3:10.1f} ms  folded {t_fold * 1e3:9.1f} ms  "
              f"max diff {diff:.2e}" + "".join(f"  top-{topk} {r['twin'] * 1e3:9.1f} ms"
                                               for topk, r in top.items()), flush=True)
    return rows


# ----------------------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), load "
            f"average {load}; Python {platform.python_version()}, torch {torch.__version__}")


def plot_curve(curve: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = [c["rank"] for c in curve]
    ax.plot(x, [c["mean"] for c in curve], "o-", label="mean over tensors")
    ax.plot(x, [c["max"] for c in curve], "s--", label="max over tensors")
    ax.set_xlabel("rank (fraction of min(rows, cols))")
    ax.set_ylabel("relative Frobenius error\nof the exclusive parts")
    ax.set_title("Twin store: reconstruction error vs rank (synthetic deltas)", fontsize=9)
    ax.set_ylim(0, 1.1 * max(max(c["max"] for c in curve), 1e-3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def report(args: argparse.Namespace, info: dict[str, Any], rows: list[dict[str, Any]],
           curve: list[dict[str, Any]], seconds: float) -> str:
    ms = 1e3
    lines = ["<!-- twin_runtime:minilm -->",
             f"## Twin-Merging runtime: MiniLM shape, {args.experts} experts, rank {args.rank}",
             "",
             f"{_dt.date.today().isoformat()}, {machine()}, {args.threads} torch thread(s).",
             "",
             f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}` "
             f"({seconds:.0f} s in all).",
             "",
             f"Base: random `BertModel` of the all-MiniLM-L6-v2 shape ({info['model']:,} "
             f"parameters, float32); experts: base + seeded synthetic deltas (decaying "
             f"spectrum, half shared). Store recipe: twin, task_arithmetic shared expert "
             f"(lambda 0.3), rank {args.rank} of every 2-D weight (embeddings included), 1-D "
             f"tensors per expert. Inputs: random token ids, {args.seq} tokens, no padding. "
             f"Latency per batch, median of {args.repeats} after a warm-up.",
             "",
             "| batch | plain model | twin batched (per-input weights) | per-input "
             "materialization | folded (one weight vector) | batched vs materialized, max "
             "abs diff |",
             "| --: | --: | --: | --: | --: | --: |"]
    for r in rows:
        p = r["plain"]
        note = "" if r["measured_inputs"] == r["batch"] else \
            f" (timed on {r['measured_inputs']}, scaled)"
        lines.append(f"| {r['batch']} | {p * ms:.1f} ms | {r['twin'] * ms:.1f} ms "
                     f"({r['twin'] / p:.2f}x) | {r['materialized'] * ms:.1f} ms "
                     f"({r['materialized'] / p:.2f}x){note} | {r['folded'] * ms:.1f} ms "
                     f"({r['folded'] / p:.2f}x) | {r['diff']:.1e} |")
    top_ks = sorted({k for r in rows for k in r["top"]})
    if top_ks:
        lines += ["", "Twin batched by routing: dense per-row softmax weights (the table "
                  "above) against top-k routing (per-row softmax, each row's k largest "
                  "weights kept and renormalized, routes mixed across the batch). Each mixed "
                  "linear and embedding picks its path by the runtime's cost rule "
                  "(`polymerge.runtime.mixing_cost.choose_path`): *dense* (every row against the "
                  "stacked factors of every active expert), *experts* (each expert on the rows "
                  "that weight it: gather, two GEMMs, index_add) or *sets* (each set of "
                  "experts on the rows routed to exactly that set, their factors stacked); "
                  "*shared ids*: an embedding whose ids every row shares (position ids). Max "
                  "abs diff against per-input materialization on the first "
                  f"{args.materialize_inputs} inputs.", "",
                  "| batch | weights | experts routed to | plain model | twin batched | "
                  "paths taken (mixed linears and embeddings) | max abs diff |",
                  "| --: | :-- | --: | --: | --: | :-- | --: |"]
        for r in rows:
            p = r["plain"]
            lines.append(f"| {r['batch']} | dense softmax | {args.experts} | {p * ms:.1f} ms | "
                         f"{r['twin'] * ms:.1f} ms ({r['twin'] / p:.2f}x) | "
                         f"{describe_paths(r['paths'])} | {r['diff']:.1e} |")
            for k in top_ks:
                t = r["top"][k]
                lines.append(f"| {r['batch']} | top-{k} | {t['routes']} | {p * ms:.1f} ms | "
                             f"{t['twin'] * ms:.1f} ms ({t['twin'] / p:.2f}x) | "
                             f"{describe_paths(t['paths'])} | {t['diff']:.1e} |")
    by_batch = {r["batch"]: r for r in rows}
    lines += ["", "Targets:"]
    if 32 in by_batch:
        r = by_batch[32]
        for label, t in [("dense softmax weights", r["twin"]),
                         *((f"top-{k} routing", r["top"][k]["twin"]) for k in top_ks)]:
            ratio = t / r["plain"]
            lines.append(f"* twin batched <= 1.5x the plain model at batch 32, {label}: "
                         f"{'met' if ratio <= 1.5 else 'missed'} ({ratio:.2f}x).")
    big = [r for r in rows if r["batch"] >= 8]
    if big:
        ok = all(r["twin"] < r["materialized"] for r in big)
        worst = min(r["materialized"] / r["twin"] for r in big)
        lines.append(f"* twin batched faster than per-input materialization from batch 8 up: "
                     f"{'met' if ok else 'missed'} (at least {worst:.1f}x faster).")
    c = info["counts"]
    lines += ["", "| store | value |", "| :-- | --: |",
              f"| stored parameters vs the ensemble of {args.experts} | {c['stored']:,} / "
              f"{c['ensemble']:,} = {c['ratio']:.1%} |",
              f"| of which low-rank factors (U, V) | {info['factor_params']:,} |",
              f"| build (rank {args.rank}) | {info['build']:.1f} s |",
              f"| runtime memory (working model with stacked factors + store pieces, each "
              f"storage once) | {info['memory'] / 1e6:.1f} MB vs {args.experts} experts' "
              f"{info['ensemble_bytes'] / 1e6:.1f} MB |",
              f"| fold: one weight vector into every mixed linear and norm (embeddings keep "
              f"gathering), with a 1-token forward pass | {info['fold_ms']:.1f} ms |",
              f"| per-input materialization of every mixed tensor for one input, without the "
              f"forward pass (word embeddings included) | {info['materialize_ms']:.1f} ms |",
              f"| multiply-adds of the low-rank path / the plain linears' (all {args.experts} "
              f"experts active) | {info['flops']:.0%} |"]
    if curve:
        lines += ["", "Reconstruction error of the exclusive parts against rank (relative "
                  "Frobenius, over every low-rank tensor; synthetic deltas, so the numbers "
                  "describe the method on a decaying spectrum, not real fine-tunes):", "",
                  f"| rank | mean error | max error (tensor) | stored / ensemble | build | "
                  "low-rank "
                  f"multiply-adds / plain linears' | twin batched at batch {args.curve_batch} "
                  "/ plain |",
                  "| --: | --: | --: | --: | --: | --: | --: |"]
        for p in curve:
            speed = f"{p['twin'] * 1e3:.0f} ms / {p['plain'] * 1e3:.0f} ms = " \
                f"{p['twin'] / p['plain']:.2f}x" if "twin" in p else "–"
            lines.append(f"| {p['rank']} | {p['mean']:.4f} | {p['max']:.4f} "
                         f"(`{p['max_tensor'].replace('.weight', '')}`) | "
                         f"{p['ratio']:.1%} | {p['build']:.1f} s | {p['flops']:.0%} | "
                         f"{speed} |")
        lines += ["", f"![error vs rank]({args.png.name})"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for what is measured.")
    ap.add_argument("--experts", type=int, default=4, help="number of experts (default 4)")
    ap.add_argument("--rank", type=float, default=0.1, help="store rank (default 0.1)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128],
                    help="batch sizes (default 1 8 32 128)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per input (default 64)")
    ap.add_argument("--top-k", type=int, nargs="*", default=[1, 2],
                    help="top-k routings timed next to dense softmax weights (default 1 2; "
                         "none: skip)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median; default 3)")
    ap.add_argument("--materialize-inputs", type=int, default=8,
                    help="per-input materialization is timed on at most this many inputs of a "
                         "batch, then scaled to the batch (default 8)")
    ap.add_argument("--ranks", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.5, 1.0],
                    help="ranks of the error curve (default 0.05 0.1 0.2 0.5 1.0; none: skip)")
    ap.add_argument("--curve-batch", type=int, default=32,
                    help="batch size at which each rank of the curve is timed (twin batched "
                         "against plain; 0: skip; default 32)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="where models and stores go (default: a "
                                                 "temporary folder, removed at the end)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/twin_runtime.md",
                    help="markdown report (default bench/results/twin_runtime.md)")
    ap.add_argument("--png", type=Path, default=ROOT / "bench/results/twin_runtime_rank.png",
                    help="error-vs-rank plot (default bench/results/twin_runtime_rank.png)")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    import polymerge
    from polymerge.stores import open_store

    start = time.perf_counter()
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="twin_runtime-")
        workdir = Path(tmp)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print("making the base and experts ...", flush=True)
        base, experts = make_models(workdir, args.experts, args.seed)
        store_dir = workdir / "store"
        build = build_twin(base, experts, store_dir, args.rank)
        print(f"twin store built in {build:.1f} s", flush=True)
        rt = polymerge.load_store(store_dir)
        rt.model  # noqa: B018  (built now, not in a timed region)
        mat = Materializer(open_store(store_dir))
        store = open_store(store_dir)
        counts = store.parameter_counts()
        factor_params = sum(p.numel for e in store.entries.values() if e.kind == "twin"
                            for p in e.pieces if "@u." in p.name or "@v." in p.name)
        with torch.inference_mode():
            one = torch.full((args.experts,), 1.0 / args.experts)
            ids = torch.randint(1000, 30000, (1, 1))

            def fold_once(rt: Any = rt) -> None:
                with rt.mixed(one, fold=True):
                    rt.model(input_ids=ids)

            fold_ms = median_time(fold_once, args.repeats) * 1e3
        info = {"model": counts["model"], "counts": counts, "factor_params": factor_params,
                "build": build, "memory": rt.memory()["total"],
                "ensemble_bytes": counts["ensemble_bytes"], "fold_ms": fold_ms}
        rows = time_batches(rt, mat, args.batches, args.seq, args.repeats,
                            args.materialize_inputs, args.seed, args.top_k)
        with torch.inference_mode():
            w1 = softmax_weights(1, args.experts, torch.Generator().manual_seed(1))[0]
            info["materialize_ms"] = median_time(lambda: mat.materialize(w1),
                                                 args.repeats) * 1e3
        info["flops"] = extra_flops(store)
        plain = mat.model
        del rt
        curve = []
        g = torch.Generator().manual_seed(args.seed + 7)
        cb = args.curve_batch
        cids = torch.randint(1000, 30000, (cb, args.seq), generator=g)
        cmask = torch.ones_like(cids)
        cw = softmax_weights(cb, args.experts, g)
        plain_cb = None
        if cb:
            with torch.inference_mode():
                plain_cb = median_time(lambda: plain(input_ids=cids, attention_mask=cmask),
                                       args.repeats)
        for rank in args.ranks:
            if rank == args.rank:
                path, seconds = store_dir, build
            else:
                path = workdir / f"store-{rank}"
                seconds = build_twin(base, experts, path, rank)
            s = open_store(path)
            err = s.recon_error()
            point = {"rank": rank, "mean": err["mean"], "max": err["max"],
                     "max_tensor": err.get("max_tensor") or "",
                     "ratio": s.parameter_counts()["ratio"], "build": seconds,
                     "flops": extra_flops(s)}
            if cb and rank < 1.0:
                point["twin"] = time_twin(polymerge.load_store(path), cids, cmask, cw,
                                          args.repeats)
                point["plain"] = plain_cb
            curve.append(point)
            print(f"rank {rank}: mean error {err['mean']:.4f}, max {err['max']:.4f} "
                  f"({seconds:.1f} s)" + (f", batch {cb}: {point['twin'] / plain_cb:.2f}x "
                                          "plain" if "twin" in point else ""), flush=True)
            if path != store_dir:
                shutil.rmtree(path, ignore_errors=True)
        if curve:
            plot_curve(curve, args.png)
        text = report(args, info, rows, curve, time.perf_counter() - start)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(text)
        print(f"wrote {args.out}" + (f" and {args.png}" if curve else ""))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
