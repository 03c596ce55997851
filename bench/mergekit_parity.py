#!/usr/bin/env python
"""Parity with mergekit 0.1.5: every deterministic merge method, same recipe, both tools.

What it does:

1. builds (once, in ``--workdir``) small random Llama checkpoints with transformers, float32,
   about 4 MB each: a base and three experts, each expert the base plus Gaussian changes on a
   random half of the entries (so RAM's "changed by one / by several" and SCE's variance
   selection both have something to select);
2. creates a virtual environment with mergekit 0.1.5 (``bench/merge_speed.py``'s
   ``mergekit_env``: torch==2.13.0 first, then mergekit);
3. for each recipe below, runs ``polymerge merge`` and ``mergekit-yaml`` on the same YAML file
   (``dtype: float32``, so both compute in float32) and compares the outputs tensor by tensor;
4. prints a markdown table: per recipe, the largest |polymerge - mergekit| over all tensors and
   the largest relative difference (max |diff| / max |mergekit| of a tensor), and exits 1 when a
   recipe's outputs differ above ``--rtol`` (1e-5) relative, or their tensor names or shapes
   differ, or a tool fails.

Recipe features have rows too (``--only`` with their names): ``slices`` (gradient slerp over two
slices, a passthrough frankenmerge), gradients outside the layers (the ties and slerp examples
of issue 10: ``lm_head`` at t = 0), a parameter the method ignores (per-model ``weight`` with
slerp: a warning), a ``tokenizer:`` union of tiny WordLevel tokenizers (an expert that added
tokens, ``pad_to_multiple_of``, a forced token, ``chat_template``) and a ``model+lora`` input
(a PEFT adapter; mergekit merges it into ``--lora-merge-cache``). For these the config's layer
count and vocabulary size, and the saved tokenizer's vocabulary, must match too.

The random methods (dare_*, della*) are left out: their parity is in distribution and is tested
on statistics in the test suite. ``arcee_fusion`` is random only on tensors of more than a
million entries; none is that large here.

Usage::

    python bench/mergekit_parity.py                   # every recipe
    python bench/mergekit_parity.py --only nuslerp,sce
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import MERGEKIT_VERSION, mergekit_env, polymerge_cmd  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
N_EXPERTS = 3
RTOL = 1e-5
MODEL_META = {"hidden": 128, "intermediate": 352, "layers": 4, "heads": 4, "kv_heads": 2,
              "vocab": 1024, "experts": N_EXPERTS, "delta": 0.01, "changed": 0.5, "seed": 0}


# ---------------------------------------------------------------------------------------------
# Models


def build_models(root: Path) -> tuple[Path, list[Path]]:
    """Base and experts under ``root``, built once (a stamp records how)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dirs = [root / "base"] + [root / f"expert{i + 1}" for i in range(N_EXPERTS)]
    stamp = root / "COMPLETE.json"
    if stamp.exists() and json.loads(stamp.read_text()) == MODEL_META:
        return dirs[0], dirs[1:]
    if root.exists():
        shutil.rmtree(root)
    m = MODEL_META
    config = LlamaConfig(vocab_size=m["vocab"], hidden_size=m["hidden"],
                         intermediate_size=m["intermediate"], num_hidden_layers=m["layers"],
                         num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
                         max_position_embeddings=128, tie_word_embeddings=False,
                         torch_dtype="float32")
    torch.manual_seed(m["seed"])
    model = LlamaForCausalLM(config).float().eval()
    # Norm weights start at exactly 1; spread them so that they are not all equal.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(dirs[0])
    gen = torch.Generator().manual_seed(m["seed"] + 1)
    for folder in dirs[1:]:
        state = {}
        for name, value in base_state.items():
            changed = torch.rand(value.shape, generator=gen) < m["changed"]
            delta = m["delta"] * torch.randn(value.shape, generator=gen)
            state[name] = value + delta * changed
        model.load_state_dict(state)
        model.save_pretrained(folder)
    stamp.write_text(json.dumps(MODEL_META))
    return dirs[0], dirs[1:]


FEATURE_META = {"added_tokens": 3, "lora_r": 8, "seed": 5, "version": 1}


def build_feature_models(root: Path, base: Path, experts: list[Path]) -> dict[str, Path]:
    """Tokenizer models (the base and two experts with a WordLevel tokenizer; expert 1 added
    three tokens and grew its embedding and head) and a PEFT LoRA adapter of the base."""
    import torch
    from safetensors.torch import load_file, save_file

    out = {"tok_base": root / "tok_base", "tok_e1": root / "tok_e1", "tok_e2": root / "tok_e2",
           "lora": root / "lora"}
    stamp = root / "FEATURES.json"
    if stamp.exists() and json.loads(stamp.read_text()) == FEATURE_META:
        return out
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(MODEL_META["vocab"] - 3)]

    def tokenizer(extra: list[str], added: list[str]) -> Any:
        core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + extra)},
                                          unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                      bos_token="<s>", eos_token="</s>")
        if added:
            tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added],
                           special_tokens=True)
        return tok

    gen = torch.Generator().manual_seed(FEATURE_META["seed"])
    specials = ["<|im_end|>", "<|im_start|>"]
    for key, source, extra, added in [("tok_base", base, [], []),
                                      ("tok_e1", experts[0], ["neu"], specials),
                                      ("tok_e2", experts[1], [], [])]:
        folder = out[key]
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(source, folder)
        tokenizer(extra, added).save_pretrained(folder)
        grow = len(extra) + len(added)
        if grow:
            state = load_file(folder / "model.safetensors")
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                rows = 0.02 * torch.randn(grow, state[name].shape[1], generator=gen)
                state[name] = torch.cat([state[name], rows]).contiguous()
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
            config = json.loads((folder / "config.json").read_text())
            config["vocab_size"] = MODEL_META["vocab"] + grow
            (folder / "config.json").write_text(json.dumps(config, indent=2))
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=FEATURE_META["lora_r"], lora_alpha=16,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    if out["lora"].exists():
        shutil.rmtree(out["lora"])
    peft_model.save_pretrained(out["lora"])
    stamp.write_text(json.dumps(FEATURE_META))
    return out


def feature_recipes(base: Path, experts: list[Path], feat: dict[str, Path]
                    ) -> dict[str, dict[str, Any]]:
    """Name -> recipe for the recipe features (slices, gradients, tokenizer, model+lora)."""
    b, e = str(base), [str(p) for p in experts]
    t = {k: str(v) for k, v in feat.items()}
    gradient_t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                  {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
    r: dict[str, dict[str, Any]] = {
        "slices gradient slerp": {
            "merge_method": "slerp", "base_model": b,
            "slices": [{"sources": [{"model": b, "layer_range": [0, 2]},
                                    {"model": e[0], "layer_range": [0, 2]}]},
                       {"sources": [{"model": b, "layer_range": [2, 4]},
                                    {"model": e[0], "layer_range": [2, 4]}],
                        "parameters": {"t": [{"filter": "mlp", "value": 0.2}]}}],
            "parameters": {"t": gradient_t}},
        "slices passthrough stack": {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": b, "layer_range": [0, 3]}]},
                       {"sources": [{"model": e[1], "layer_range": [1, 4]}]}]},
        "slices ties per slice": {
            "merge_method": "ties", "base_model": b,
            "slices": [{"sources": [{"model": b, "layer_range": [0, 4]},
                                    {"model": e[0], "layer_range": [0, 4],
                                     "parameters": {"density": 0.6}},
                                    {"model": e[1], "layer_range": [0, 4]}],
                        "parameters": {"weight": [0.2, 1.0], "density": 0.4}}]},
        "ties gradient (lm_head t=0)": {
            "merge_method": "ties", "base_model": b,
            "models": [{"model": p, "parameters": {"density": [1, 0.7, 0.1],
                                                   "weight": [0, 0.3, 0.7, 1]}} for p in e]},
        "slerp gradient + ignored weight": {
            "merge_method": "slerp", "base_model": b,
            "models": [{"model": b, "parameters": {"weight": 0.5}},
                       {"model": e[0], "parameters": {"weight": 0.5}}],
            "parameters": {"t": [0, 0.3, 0.8, 1]}},
        "tokenizer union": {
            "merge_method": "linear",
            "models": [{"model": t["tok_base"], "parameters": {"weight": 0.2}},
                       {"model": t["tok_e1"], "parameters": {"weight": 0.5}},
                       {"model": t["tok_e2"], "parameters": {"weight": 0.3}}],
            "tokenizer": {"source": "union", "pad_to_multiple_of": 64,
                          "tokens": {"w7": {"source": {"kind": "zero"}, "force": True},
                                     "<|im_start|>": {"source": t["tok_e1"], "force": True}}},
            "chat_template": "chatml"},
        # ties without padding: 61 identical padding rows would tie in its top-k, where any
        # choice among equal magnitudes is as right as another
        "tokenizer union ties": {
            "merge_method": "ties", "base_model": t["tok_base"],
            "models": [{"model": t["tok_e1"], "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": t["tok_e2"], "parameters": {"weight": 0.4, "density": 0.5}}],
            "tokenizer": {"source": "union",
                          "tokens": {"w7": {"source": {"kind": "zero"}, "force": True}}}},
        "tokenizer source base": {
            "merge_method": "task_arithmetic", "base_model": t["tok_base"],
            "models": [{"model": t["tok_e1"], "parameters": {"weight": 0.5}},
                       {"model": t["tok_e2"], "parameters": {"weight": 0.5}}],
            "tokenizer": {"source": "base"}},
        "model+lora": {
            "merge_method": "task_arithmetic", "base_model": b,
            "models": [{"model": f"{b}+{t['lora']}", "parameters": {"weight": 0.7}},
                       {"model": e[1], "parameters": {"weight": 0.3}}]},
    }
    return {name: {**rec, "dtype": "float32"} for name, rec in r.items()}


MERGEKIT_EXTRA = {"model+lora": ["--lora-merge-cache", "{work}/lora-cache"]}


# ---------------------------------------------------------------------------------------------
# Recipes


def recipes(base: Path, experts: list[Path]) -> dict[str, dict[str, Any]]:
    """Name -> recipe: every deterministic method, and the edge cases of the new ones."""
    b, e = str(base), [str(p) for p in experts]
    common = {"dtype": "float32"}

    def models(paths: list[str], **per: list[Any]) -> list[dict[str, Any]]:
        out = []
        for i, path in enumerate(paths):
            params = {k: v[i] for k, v in per.items()}
            out.append({"model": path, **({"parameters": params} if params else {})})
        return out

    weights = [0.5, 0.3, 0.2]
    r: dict[str, dict[str, Any]] = {
        "linear": {"merge_method": "linear",
                   "models": models([b, *e], weight=[0.4, 0.3, 0.2, 0.1])},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b,
                            "models": models(e, weight=weights), "parameters": {"lambda": 0.8}},
        "ties": {"merge_method": "ties", "base_model": b,
                 "models": models(e, weight=weights, density=[0.5, 0.7, 0.3])},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": b,
                        "models": models(e, weight=weights, density=[0.8, 0.8, 0.8])},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": b,
                             "models": models(e, weight=weights, density=[0.8, 0.8, 0.8])},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": models(e)},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": models([b, e[0]]),
                  "parameters": {"t": 0.35}},
        "nuslerp": {"merge_method": "nuslerp", "models": models(e[:2], weight=[0.3, 0.7])},
        "nuslerp rows + base": {"merge_method": "nuslerp", "base_model": b,
                               "models": models(e[:2], weight=[1.0, 2.0]),
                               "parameters": {"nuslerp_flatten": False}},
        "nuslerp columns": {"merge_method": "nuslerp", "models": models(e[:2], weight=[2.0, 1.0]),
                            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "nuslerp weights sum to 0": {"merge_method": "nuslerp",
                                     "models": models(e[:2], weight=[1.0, -1.0])},
        "multislerp": {"merge_method": "multislerp", "models": models(e, weight=weights)},
        "multislerp + base": {"merge_method": "multislerp", "base_model": b,
                             "models": models(e, weight=[1.0, 2.0, 3.0])},
        "karcher": {"merge_method": "karcher", "models": models(e)},
        "karcher + base": {"merge_method": "karcher", "base_model": b, "models": models(e)},
        "sce": {"merge_method": "sce", "base_model": b, "models": models(e)},
        "sce select_topk 0.3": {"merge_method": "sce", "base_model": b, "models": models(e),
                                "parameters": {"select_topk": 0.3}},
        "ram": {"merge_method": "ram", "base_model": b, "models": models(e)},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": b, "models": models(e),
                       "parameters": {"r": 0.5, "alpha": 0.8}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": b,
                         "models": models([b, e[0]])},
        "nearswap": {"merge_method": "nearswap", "base_model": b, "models": models([b, e[0]]),
                     "parameters": {"t": 0.005}},
        "passthrough scale filter": {
            "merge_method": "passthrough",
            "models": [{"model": e[0], "parameters": {"scale": [
                {"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.5}]}}]},
    }
    return {name: {**rec, **common} for name, rec in r.items()}


# ---------------------------------------------------------------------------------------------
# Comparison


def load_folder(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare_extras(ours: Path, theirs: Path) -> str | None:
    """The config's layer count and vocabulary size, and a saved tokenizer's vocabulary."""
    ca = json.loads((ours / "config.json").read_text())
    cb = json.loads((theirs / "config.json").read_text())
    for key in ("num_hidden_layers", "vocab_size"):
        if ca.get(key) != cb.get(key):
            return f"config {key}: {ca.get(key)} vs {cb.get(key)}"
    if (theirs / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        va = AutoTokenizer.from_pretrained(ours).get_vocab()
        vb = AutoTokenizer.from_pretrained(theirs).get_vocab()
        if va != vb:
            return f"tokenizer vocabularies differ ({len(va)} vs {len(vb)} tokens)"
    return None


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    """Largest absolute and relative difference over all tensors; names and shapes checked."""
    extra = compare_extras(ours, theirs)
    if extra:
        return {"error": extra}
    a, b = load_folder(ours), load_folder(theirs)
    if set(a) != set(b):
        only_a = sorted(set(a) - set(b))[:3]
        only_b = sorted(set(b) - set(a))[:3]
        return {"error": f"tensor names differ: only polymerge {only_a}, only mergekit {only_b}"}
    worst_abs, worst_rel, where = 0.0, 0.0, ""
    for name in sorted(a):
        x, y = a[name].double(), b[name].double()
        if x.shape != y.shape:
            return {"error": f"{name}: shape {list(x.shape)} vs {list(y.shape)}"}
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        scale = float(y.abs().max()) if y.numel() else 0.0
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        if rel > worst_rel:
            worst_rel, where = rel, name
        worst_abs = max(worst_abs, diff)
    return {"max_abs": worst_abs, "max_rel": worst_rel, "worst_tensor": where,
            "tensors": len(a)}


# ---------------------------------------------------------------------------------------------
# Main


def run(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[bool, float]:
    start = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc.returncode == 0, time.perf_counter() - start


def last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(no output)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run every deterministic merge method with polymerge and mergekit "
                    f"{MERGEKIT_VERSION} on small random Llama checkpoints and compare outputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=Path, default=REPO / "bench" / "_work",
                   help="models, the mergekit venv (shared with merge_speed.py), outputs, logs")
    p.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    p.add_argument("--rtol", type=float, default=RTOL,
                   help="largest relative difference accepted")
    p.add_argument("--polymerge", default=shlex.join(polymerge_cmd()),
                   help="command that runs the polymerge CLI")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir: Path = args.workdir.expanduser().absolute()
    root = workdir / "parity"
    base, experts = build_models(root / "models")
    mk_bin = mergekit_env(workdir)
    all_recipes = recipes(base, experts)
    feat = build_feature_models(root / "models", base, experts)
    all_recipes.update(feature_recipes(base, experts, feat))
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(all_recipes)
    unknown = [n for n in names if n not in all_recipes]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; choose from {list(all_recipes)}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    rows = []
    failed = False
    for i, name in enumerate(names):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace(" + ", "_"))
        folder = root / "runs" / slug
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        rec = folder / "recipe.yml"
        rec.write_text(yaml.safe_dump(all_recipes[name], sort_keys=False))
        outs = {"polymerge": folder / "polymerge", "mergekit": folder / "mergekit"}
        cmds = {
            "polymerge": shlex.split(args.polymerge) + ["merge", str(rec), "-o",
                                                        str(outs["polymerge"]), "-q"],
            "mergekit": [str(mk_bin / "mergekit-yaml"), str(rec), str(outs["mergekit"]),
                         "--no-copy-tokenizer", "--quiet",
                         *(a.format(work=root) for a in MERGEKIT_EXTRA.get(name, []))],
        }
        status: dict[str, str] = {}
        order = ["polymerge", "mergekit"] if i % 2 == 0 else ["mergekit", "polymerge"]
        for tool in order:
            log = folder / f"{tool}.log"
            ok, seconds = run(cmds[tool], log, env)
            status[tool] = "ok" if ok else f"failed: {last_line(log)}"
            print(f"  {name:26s} {tool:9s} {seconds:6.1f} s  {status[tool]}", flush=True)
        if all(s == "ok" for s in status.values()):
            result = compare(outs["polymerge"], outs["mergekit"])
        else:
            result = {"error": "; ".join(f"{t} {s}" for t, s in status.items() if s != "ok")}
        bad = "error" in result or result["max_rel"] > args.rtol
        failed |= bad
        rows.append((name, all_recipes[name]["merge_method"], result, bad))

    print()
    print(f"polymerge vs mergekit {MERGEKIT_VERSION}, float32 compute, Llama {MODEL_META['layers']}"
          f" layers / hidden {MODEL_META['hidden']} / vocab {MODEL_META['vocab']}, base + "
          f"{N_EXPERTS} experts; fails above {args.rtol:g} relative")
    print()
    print("| recipe | method | max abs diff | max rel diff | worst tensor | parity |")
    print("|---|---|---:|---:|---|---|")
    for name, method, result, bad in rows:
        if "error" in result:
            print(f"| {name} | {method} | - | - | {result['error']} | FAIL |")
        else:
            print(f"| {name} | {method} | {result['max_abs']:.3g} | {result['max_rel']:.3g} | "
                  f"{result['worst_tensor'] or '-'} | {'FAIL' if bad else 'ok'} |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
