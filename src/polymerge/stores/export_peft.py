"""A twin store as the engines that serve many adapters take it: the shared model as an ordinary
HF checkpoint plus one PEFT LoRA adapter per expert.

A twin store keeps ``shared`` and, per expert t, ``u_t v_t`` for every low-rank tensor; expert
t is ``shared + u_t v_t``. That is exactly a LoRA adapter of the shared model with
``lora_B = u_t``, ``lora_A = v_t`` and scaling 1 (``lora_alpha = r``, one rank per tensor via
``rank_pattern``/``alpha_pattern``); embeddings get ``lora_embedding_A = u_t^T``,
``lora_embedding_B = v_t^T``, GPT-2 ``Conv1D`` layers (weight stored in x out) ``lora_A =
u_t^T``, ``lora_B = v_t^T``; an output layer tied to a low-rank embedding gets the same
factors.

What LoRA cannot hold, the tensors kept per expert (``others: expert``: norms, biases,
out-of-scope weights), depends on ``mode``:

* ``exact`` (default): every expert's adapter equals the store's top-1 expert. Biases of
  LoRA-targeted layers go into ``lora_B``'s bias (``lora_bias``, one flag for the whole
  adapter, which peft does not allow on embeddings: then the embeddings are saved whole per
  expert instead); every other module with per-expert tensors (norms, out-of-scope layers) is
  saved whole per expert (``modules_to_save``). peft loads all of it, mixed batches included
  (``adapter_names=``); engines that take only ``lora_A``/``lora_B`` (vLLM) may refuse or
  ignore ``lora_bias`` and ``modules_to_save``;
* ``lora``: adapters hold ``lora_A``/``lora_B`` only; per-expert tensors are replaced by the
  shared model's, an approximation reported per tensor (relative difference ``|e_t - shared| /
  |e_t|``, the largest over experts) in ``polymerge_peft.json`` and returned. A store built
  with ``others: shared`` has none, so its ``lora`` export is exact.

The folder: ``base/`` (the shared model, with config, tokenizer and generation config),
``adapters/<expert>/`` (``adapter_config.json``, ``adapter_model.safetensors``) and
``polymerge_peft.json`` (experts, adapter folders, ranks, mode, what is saved whole, what is
approximated). It is written atomically like every polymerge output; the store is not touched.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymerge.engine import write_tensors
from polymerge.errors import PolymergeError
from polymerge.io.checkpoint import TensorInfo
from polymerge.io.dtypes import parse_dtype
from polymerge.io.hf_files import write_output_extras
from polymerge.io.pretrained import load_config
from polymerge.io.writer import AtomicOutputDir
from polymerge.registry import DEFAULT_SHARD_SIZE, parse_size
from polymerge.stores.export import export_target
from polymerge.stores.manifest import expert_part, piece_name
from polymerge.stores.store import Store, open_store

PEFT_MODES = ("exact", "lora")
MANIFEST = "polymerge_peft.json"
BASE_DIR = "base"
ADAPTERS_DIR = "adapters"


@dataclass
class PeftExport:
    """What :func:`export_peft` wrote (also saved as ``polymerge_peft.json``)."""

    path: Path
    experts: list[str]
    mode: str
    targets: dict[str, int]
    """LoRA-targeted module -> rank."""
    lora_bias: bool
    modules_to_save: list[str]
    approximated: dict[str, float] = field(default_factory=dict)
    """Tensor -> the largest relative difference of an expert's own to the shared one
    (``lora`` mode only)."""

    def adapter(self, expert: str) -> Path:
        return self.path / ADAPTERS_DIR / expert

    @property
    def base(self) -> Path:
        return self.path / BASE_DIR

    def to_json(self) -> dict[str, Any]:
        return {"format": "polymerge-peft", "version": 1, "mode": self.mode,
                "base": BASE_DIR, "experts": self.experts,
                "adapters": {e: f"{ADAPTERS_DIR}/{e}" for e in self.experts},
                "targets": self.targets, "lora_bias": self.lora_bias,
                "modules_to_save": self.modules_to_save,
                "approximated": {k: round(v, 6) for k, v in self.approximated.items()}}


@dataclass
class _Plan:
    targets: dict[str, tuple[str, str]] = field(default_factory=dict)
    """module path -> (store tensor, layer kind: linear | conv1d | embedding)"""
    biases: dict[str, str] = field(default_factory=dict)
    """module path of a LoRA target -> its per-expert bias tensor"""
    whole: set[str] = field(default_factory=set)
    approximated: dict[str, float] = field(default_factory=dict)


def _model(store: Store) -> torch.nn.Module:
    """The store's architecture with the shared model's weights."""
    import transformers

    cfg = load_config(store.path, "store")  # a regular config.json inside the store
    cls = next((getattr(transformers, a) for a in (cfg.architectures or [])
                if hasattr(transformers, a)), transformers.AutoModel)
    with torch.random.fork_rng(devices=[]):
        model = (cls.from_config(cfg) if cls is transformers.AutoModel else cls(cfg))
    model = model.to(store.dtype).eval()
    with torch.no_grad():
        for name, target in store.targets(model).items():
            target.copy_(store.shared_tensor(name))  # type: ignore[attr-defined]
    return model


def _holders(model: torch.nn.Module) -> dict[int, list[tuple[str, torch.nn.Module, str]]]:
    """Tensor data pointer -> every (module path, module, parameter name) holding it."""
    out: dict[int, list[tuple[str, torch.nn.Module, str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            out.setdefault(p.data_ptr(), []).append((path, module, pname))
    return out


def _layer_kind(module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D":
        return "conv1d"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return None


def _plan(store: Store, model: torch.nn.Module, mode: str) -> _Plan:
    plan = _Plan()
    holders = _holders(model)
    n = len(store.experts)
    per_expert: list[tuple[str, list[tuple[str, torch.nn.Module, str]]]] = []
    for name, target in store.targets(model).items():
        entry = store.entries[name]
        found = holders.get(target.data_ptr(), [])
        if entry.kind == "twin":
            for path, module, pname in found:
                kind = _layer_kind(module)
                if kind is None or pname != "weight":
                    raise PolymergeError(f"peft export: {name!r} is held by {path} "
                                         f"({type(module).__name__}), which LoRA cannot adapt")
                plan.targets[path] = (name, kind)
        elif entry.kind == "expert" and entry.dtype.is_floating_point:
            shared = store.shared_tensor(name)  # type: ignore[attr-defined]
            pieces = [store.pieces[piece_name(name, expert_part(t))] for t in range(n)]
            if all(torch.equal(p, shared) for p in pieces):
                continue
            if mode == "lora":
                plan.approximated[name] = max(
                    float((p.float() - shared.float()).norm() / p.float().norm().clamp_min(1e-12))
                    for p in pieces)
            else:
                per_expert.append((name, found))
    for name, found in per_expert:
        for path, _, pname in found:
            if path in plan.targets and pname == "bias" \
                    and plan.targets[path][1] in ("linear", "conv1d"):
                plan.biases[path] = name
            else:
                plan.whole.add(path)
    if plan.biases and any(k == "embedding" for _, k in plan.targets.values()):
        # lora_bias is one flag per adapter and peft refuses it on embeddings: those are
        # saved whole instead (with every module sharing their weight).
        embedded = {t for t, (_, k) in plan.targets.items() if k == "embedding"}
        names = {plan.targets[p][0] for p in embedded}
        for p in [p for p, (t, _) in plan.targets.items() if t in names]:
            del plan.targets[p]
            plan.whole.add(p)
    overlap = plan.whole & set(plan.targets)
    if overlap:
        raise PolymergeError(f"peft export: {sorted(overlap)[0]} would be both a LoRA target "
                             "and saved whole")
    return plan


def export_peft(store: Store | str | Path, out: str | Path, *, mode: str = "exact",
                force: bool = False, dtype: str | None = None) -> PeftExport:
    """Write a twin store as ``out/base`` + ``out/adapters/<expert>`` (see the module
    docstring); returns what was written."""
    if mode not in PEFT_MODES:
        raise PolymergeError(f"peft export: mode must be one of {', '.join(PEFT_MODES)}, got "
                             f"{mode!r}")
    out_path = export_target(store, out, force=force)
    loaded = store if isinstance(store, Store) else open_store(store)
    if not hasattr(loaded, "factors") or loaded.serving != "mix":
        raise PolymergeError(f"peft export takes a twin store (shared model + low-rank "
                             f"factors per expert); {loaded.path.name} is a {loaded.method} "
                             "store: export its experts with --expert instead")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise PolymergeError("peft export needs peft: pip install peft") from None
    out_dtype = parse_dtype(dtype) if dtype else loaded.dtype
    model = _model(loaded)
    plan = _plan(loaded, model, mode)
    names = {t.data_ptr(): n for n, t in loaded.targets(model).items()}
    if not plan.targets:
        raise PolymergeError(f"{loaded.path.name} has no low-rank tensor a LoRA adapter can "
                             "hold")
    ranks = {path: int(loaded.entries[t].extra["rank"]) for path, (t, _) in plan.targets.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    causal = bool(getattr(type(model), "can_generate", lambda: False)())
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(plan.targets),
        rank_pattern={p: k for p, k in ranks.items() if k != r},
        alpha_pattern={p: k for p, k in ranks.items() if k != r},
        lora_dropout=0.0, bias="none", lora_bias=bool(plan.biases),
        modules_to_save=sorted(plan.whole) or None,
        fan_in_fan_out=any(k == "conv1d" for _, k in plan.targets.values()),
        task_type="CAUSAL_LM" if causal else None, init_lora_weights=True)
    experts = list(loaded.experts)
    result = PeftExport(out_path, experts, mode, dict(sorted(ranks.items())), bool(plan.biases),
                        sorted(plan.whole), dict(sorted(plan.approximated.items())))
    with AtomicOutputDir(out_path, force=force, kind="model") as tmp:
        _write_base(loaded, tmp / BASE_DIR, out_dtype)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fan_in_fan_out per layer type, tied layers
            peft_model = get_peft_model(model, config, adapter_name=experts[0])
            for name in experts[1:]:
                peft_model.add_adapter(name, config)
        _fill(peft_model, loaded, plan, names, out_dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft mistakes lora_B biases for unsharded state
            peft_model.save_pretrained(str(tmp / ADAPTERS_DIR), selected_adapters=experts,
                                       save_embedding_layers=False)  # they are in base/
        for name in experts:
            cfg_file = tmp / ADAPTERS_DIR / name / "adapter_config.json"
            data = json.loads(cfg_file.read_text())
            data["base_model_name_or_path"] = str(out_path / BASE_DIR)
            cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _write_base(store: Store, folder: Path, dtype: torch.dtype) -> None:
    folder.mkdir()
    infos = [TensorInfo(n, e.shape, dtype if e.dtype.is_floating_point else e.dtype)
             for n, e in store.entries.items()]
    write_tensors(folder, infos, lambda name: store.shared_tensor(name),  # type: ignore[attr-defined]
                  max_shard_bytes=parse_size(DEFAULT_SHARD_SIZE),
                  metadata={"polymerge_store": store.method, "polymerge_part": "shared"})
    write_output_extras(
        folder, config=store.config, dtype=dtype, support_dir=store.path,
        method=f"{store.method} store, shared model",
        description=f"the shared model of the store {store.path.name}; one PEFT LoRA adapter "
                    f"per expert in ../{ADAPTERS_DIR}/",
        base=store.manifest.get("base", {}).get("path"),
        inputs=[(e, str(store.path)) for e in store.experts],
        recipe_yaml=json.dumps(store.manifest.get("parameters", {}), indent=2),
        write_recipe=False)


@torch.no_grad()
def _fill(peft_model: Any, store: Store, plan: _Plan, names: dict[int, str],
          dtype: torch.dtype) -> None:
    """Each adapter's LoRA factors, biases and whole modules from the store; ``names``: the
    store tensor of each model tensor (by data pointer, taken before peft wrapped it)."""
    inner = peft_model.base_model.model
    for t, expert in enumerate(store.experts):
        for path, (tensor, kind) in plan.targets.items():
            layer = inner.get_submodule(path)
            u, v = store.factors(tensor, t)  # type: ignore[attr-defined]
            if kind == "embedding":
                layer.lora_embedding_A[expert].copy_(u.T.to(dtype))
                layer.lora_embedding_B[expert].copy_(v.T.to(dtype))
                continue
            a, b = (u.T, v.T) if kind == "conv1d" else (v, u)
            layer.lora_A[expert].weight.copy_(a.to(dtype))
            layer.lora_B[expert].weight.copy_(b.to(dtype))
            bias = layer.lora_B[expert].bias
            if bias is not None:
                name = plan.biases.get(path)
                if name is None:
                    bias.zero_()
                else:
                    own = store.pieces[piece_name(name, expert_part(t))]
                    bias.copy_((own.float() - store.shared_tensor(name).float())  # type: ignore[attr-defined]
                               .to(dtype))
        for path in plan.whole:
            wrapper = inner.get_submodule(path)
            copy = wrapper.modules_to_save[expert]
            original = wrapper.original_module
            for pname, p in copy.named_parameters(recurse=False):
                src = getattr(original, pname)
                name = names.get(src.data_ptr())
                if name is None:
                    continue  # not a store tensor (a head the store lacks): as it is
                p.copy_(store.tensor(name, t).to(dtype))


def describe(result: PeftExport) -> str:
    """What ``polymerge export --format peft`` prints."""
    ranks = sorted(set(result.targets.values()))
    lines = [f"wrote {result.base} (the shared model) and {len(result.experts)} LoRA "
             f"adapter(s) under {result.path / ADAPTERS_DIR}: {', '.join(result.experts)}",
             f"LoRA on {len(result.targets)} module(s), rank "
             + (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}")
             + (", with per-expert biases (lora_bias)" if result.lora_bias else "")]
    if result.modules_to_save:
        lines.append(f"saved whole per expert (modules_to_save): "
                     f"{', '.join(result.modules_to_save[:6])}"
                     + (f" and {len(result.modules_to_save) - 6} more"
                        if len(result.modules_to_save) > 6 else ""))
    if result.approximated:
        worst = max(result.approximated, key=lambda k: result.approximated[k])
        lines.append(f"warning: {len(result.approximated)} per-expert tensor(s) approximated by "
                     f"the shared model's (--peft-mode lora): "
                     f"{', '.join(list(result.approximated)[:6])}"
                     + (" ..." if len(result.approximated) > 6 else "")
                     + f"; largest relative difference {result.approximated[worst]:.3g} "
                       f"({worst}). Build the store with `others: shared` to make the LoRA-only "
                       "export exact, or use --peft-mode exact (peft loads it; vLLM may not)")
    return "\n".join(lines)


__all__ = ["PEFT_MODES", "PeftExport", "describe", "export_peft"]
