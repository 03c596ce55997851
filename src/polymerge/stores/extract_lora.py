"""``polymerge extract-lora``: a PEFT LoRA adapter that approximates a fine-tune as its base
plus low-rank updates, ``W_finetuned ~ W_base + B A``.

Per tensor, streamed through the engine (one tensor of each model in memory at a time):

* the 2-D weights of linear layers (``nn.Linear``, GPT-2's ``Conv1D``) and embeddings selected
  by ``include`` / ``exclude`` (regexes searched in the tensor name) get LoRA factors: the
  truncated SVD of the delta ``W_finetuned - W_base`` (:mod:`polymerge.methods.lowrank`, the
  twin store's code), its singular values split evenly between ``B = U sqrt(S)`` and
  ``A = sqrt(S) Vh``, with ``lora_alpha = r`` so that PEFT's scale is 1;
* ``rank``: an integer is the rank of every module (capped at the module's full rank); a
  fraction in (0, 1] is an energy fraction: each module gets the smallest rank that keeps that
  share of its delta's squared Frobenius norm (1.0: the full rank, an exact copy). An energy
  fraction costs one more read of both models (the singular values decide the ranks, and the
  adapter's file is laid out before it is written);
* other selected tensors that changed (norms, 1-D tensors) are saved whole as PEFT
  ``modules_to_save`` when their module is not a LoRA target; a changed bias of a LoRA target
  cannot be expressed and is listed as not captured, as are changed tensors left out by
  ``include`` / ``exclude``;
* modules whose delta is exactly zero are left out;
* a tied embedding (GPT-2's ``wte`` is also its LM head) gets its factors once; the adapter
  config lists the head as a target too with ``ensure_weight_tying``, so PEFT ties the head's
  adapter to the embedding's and its (unmerged) outputs are the fine-tune's. (PEFT 0.21's own
  ``merge_and_unload`` then adds the tied update twice, for any adapter of tied weights;
  polymerge's ``base+adapter`` reading applies it once.)

The reconstruction error of each module, ``|delta - B A|_F / |delta|_F``, is returned, printed
by the CLI and tabulated in the adapter's README.md. The adapter folder (``adapter_config.json``,
``adapter_model.safetensors``, README.md) is written atomically.

Which layers are linear, Conv1D or embeddings is read from the model class transformers builds
for the config (on the meta device: no memory); without transformers or a known class, names
decide (``embed``, ``wte``, ``wpe``, ... are embeddings, other 2-D weights linear).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from polymerge.engine import resolve_device, stream, write_folder
from polymerge.errors import PolymergeError, RecipeError
from polymerge.io.checkpoint import SINGLE_NAME, TensorInfo
from polymerge.io.writer import AtomicOutputDir, check_output_target
from polymerge.methods.lowrank import energy_rank, fit_factors, relative_error, truncated_svd
from polymerge.methods.schema import Schema
from polymerge.plan import (
    MergePlan,
    TensorJob,
    build_plan,
    check_free_disk,
    check_output_not_input,
)
from polymerge.recipe import ModelEntry, Recipe

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
LORA_KINDS = ("linear", "conv1d", "embedding")
_EMBEDDING_NAMES = re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.|word_embeddings|"
                              r"position_embeddings|token_type_embeddings")
SCHEMA = Schema(name="extract-lora", params=(), base_policy="required", min_experts=1,
                max_experts=1, description="LoRA factors of a fine-tune's delta")


def parse_rank(value: str | int | float) -> int | float:
    """``16`` is a rank; ``0.9`` (a number with a decimal point, in (0, 1]) an energy
    fraction."""
    if isinstance(value, bool):
        raise RecipeError(f"rank must be a number, got {value!r}")
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        raise RecipeError(f"rank {text!r} is neither an integer rank nor an energy fraction "
                          "in (0, 1]") from None
    integral = isinstance(value, int) or re.fullmatch(r"[+]?\d+", text) is not None
    if integral:
        if number < 1:
            raise RecipeError(f"rank must be at least 1, got {text}")
        return int(number)
    if not (math.isfinite(number) and 0.0 < number <= 1.0):
        raise RecipeError(f"rank {text}: an energy fraction is in (0, 1]; an integer rank "
                          "is written without a decimal point")
    return number


@dataclass
class ModuleReport:
    """One module of the adapter (or a tensor saved whole)."""

    module: str
    kind: str  # linear | conv1d | embedding | full (modules_to_save)
    rank: int
    full_rank: int
    error: float
    shape: tuple[int, ...]


@dataclass
class ExtractReport:
    """What ``extract_lora`` wrote."""

    path: Path
    rank: int | float
    modules: list[ModuleReport]
    saved_whole: list[str]
    not_captured: list[str]
    unchanged: int
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def lora_modules(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.kind in LORA_KINDS]

    def lines(self) -> list[str]:
        """One line per LoRA module and a summary (what the CLI prints)."""
        out = [f"{m.module}: {m.kind} rank {m.rank}/{m.full_rank}, relative error "
               f"{m.error:.4g}" for m in self.lora_modules]
        errors = [m.error for m in self.lora_modules]
        if errors:
            out.append(f"{len(errors)} LoRA modules, relative error mean "
                       f"{sum(errors) / len(errors):.4g}, max {max(errors):.4g}")
        if self.saved_whole:
            out.append(f"saved whole (modules_to_save): {', '.join(self.saved_whole)}")
        if self.not_captured:
            out.append(f"changed but not in the adapter: {', '.join(self.not_captured)}")
        return out


# ----------------------------------------------------------------------------- modules


def module_kinds(config: dict[str, Any] | None, names: list[str]) -> dict[str, str]:
    """``weight name -> linear | conv1d | embedding | other`` for 2-D weights ``names``."""
    found = _model_info(config)[0]
    return {name: found.get(name) or ("embedding" if _EMBEDDING_NAMES.search(name) else "linear")
            for name in names}


def tied_head(config: dict[str, Any] | None) -> tuple[str, str] | None:
    """``(input embedding module, output head module)`` when the model ties them (GPT-2):
    the head has no tensor of its own, and PEFT must tie its adapter to the embedding's."""
    return _model_info(config)[1]


_INFO_CACHE: dict[str, tuple[dict[str, str], tuple[str, str] | None]] = {}


def _model_info(config: dict[str, Any] | None
                ) -> tuple[dict[str, str], tuple[str, str] | None]:
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _INFO_CACHE:
        _INFO_CACHE[key] = _read_model_info(config)
    return _INFO_CACHE[key]


def _read_model_info(config: dict[str, Any] | None
                     ) -> tuple[dict[str, str], tuple[str, str] | None]:
    if not config or not config.get("architectures"):
        return {}, None
    try:
        import transformers
        from transformers.pytorch_utils import Conv1D

        cls = getattr(transformers, str(config["architectures"][0]))
        cfg = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = cls(cfg)
    except Exception:  # no transformers, an unknown class: names decide
        return {}, None
    kinds = {f"{name}.weight": ("embedding" if isinstance(module, torch.nn.Embedding) else
                                "linear" if isinstance(module, torch.nn.Linear) else
                                "conv1d" if isinstance(module, Conv1D) else "other")
             for name, module in model.named_modules()}
    names = {id(m): n for n, m in model.named_modules()}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = None
    if head is not None and embedding is not None and head.weight is embedding.weight:
        tied = (names[id(embedding)], names[id(head)])
    return kinds, tied


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _search(pattern: str | None, what: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RecipeError(f"{what} {pattern!r} is not a regular expression ({exc})") from None


# ----------------------------------------------------------------------------- extraction


def _matrix(kind: str, delta: torch.Tensor) -> torch.Tensor:
    """The delta as PEFT's ``B @ A`` sees it: (out, in) for linear; Conv1D and embeddings store
    the update transposed."""
    return delta if kind == "linear" else delta.T


def _matrix_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, int]:
    rows, cols = shape
    return (rows, cols) if kind == "linear" else (cols, rows)


def _keys(kind: str, module: str) -> tuple[str, str]:
    if kind == "embedding":
        return (f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B")
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


class _Extractor:
    def __init__(self, plan: MergePlan, rank: int | float, include: re.Pattern[str] | None,
                 exclude: re.Pattern[str] | None) -> None:
        self.plan = plan
        self.rank = rank
        infos = {j.name: j.out for j in plan.jobs if j.merge}
        selected = [n for n in infos
                    if (include is None or include.search(n))
                    and not (exclude is not None and exclude.search(n))]
        two_d = [n for n in selected if len(infos[n].shape) == 2]
        kinds = module_kinds(plan.reference.config, two_d)
        if "conv1d" in kinds.values() and "linear" in kinds.values():
            # PEFT has one fan_in_fan_out flag: keep the Conv1D layers (the model's blocks)
            for n, k in kinds.items():
                if k == "linear":
                    kinds[n] = "other"
        self.kind = {n: k for n, k in kinds.items() if k in LORA_KINDS}
        targets = {_module(n) for n in self.kind}
        self.whole = [n for n in selected if n not in self.kind and _module(n) not in targets]
        self.selected = set(selected)
        self.infos = infos
        self.ranks: dict[str, int] = {}
        self.reports: dict[str, ModuleReport] = {}
        self.changed: set[str] = set()

    def full_rank(self, name: str) -> int:
        rows, cols = self.infos[name].shape
        return min(rows, cols)

    # pass 1 (energy fractions): the singular values decide each module's rank
    def measure(self, device: str, progress: bool) -> None:
        plan = replace(self.plan, jobs=[j for j in self.plan.jobs if j.name in self.kind])

        def compute(job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                    generator: torch.Generator) -> torch.Tensor:
            assert base is not None
            return torch.linalg.svdvals(_matrix(self.kind[job.name], inputs[0] - base))

        def consume(job: TensorJob, values: torch.Tensor) -> None:
            self.ranks[job.name] = energy_rank(values, float(self.rank))

        stream(plan, compute, consume, device=device, progress=progress,
               desc="singular values")

    def layout(self) -> list[TensorInfo]:
        dtype = self.plan.out_dtype
        out = []
        for name, kind in self.kind.items():
            if isinstance(self.rank, float):
                r = self.ranks.get(name, 0)
                if r == 0:
                    continue
            else:
                r = min(int(self.rank), self.full_rank(name))
            self.ranks[name] = r
            a_key, b_key = _keys(kind, _module(name))
            m_rows, m_cols = _matrix_shape(kind, self.infos[name].shape)
            out.append(TensorInfo(a_key, (r, m_cols), dtype))
            out.append(TensorInfo(b_key, (m_rows, r), dtype))
        for name in self.whole:
            info = self.infos[name]
            out.append(TensorInfo(PREFIX + name, info.shape, dtype))
        return out

    def compute(self, job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        assert base is not None
        name, tuned = job.name, inputs[0]
        delta = tuned - base
        if bool(delta.any()):
            self.changed.add(name)
        if name in self.kind and name in self.ranks:
            kind, r = self.kind[name], self.ranks[name]
            matrix = _matrix(kind, delta)
            u, s, vh, _ = truncated_svd(matrix, r, generator)
            b, a = fit_factors(u, s, vh, r, balanced=True)
            self.reports[name] = ModuleReport(_module(name), kind, r, self.full_rank(name),
                                              relative_error(matrix, b, a), tuple(delta.shape))
            a_key, b_key = _keys(kind, _module(name))
            return {a_key: a, b_key: b}
        if name in self.whole:
            return {PREFIX + name: tuned}
        return {}


def _task_type(config: dict[str, Any] | None) -> str | None:
    archs = [str(a) for a in (config or {}).get("architectures") or []]
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "CAUSAL_LM"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "SEQ_CLS"
    return None


def adapter_config(base: str, modules: dict[str, tuple[str, int]], whole: list[str],
                   task_type: str | None, tied: tuple[str, str] | None = None
                   ) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` for ``modules`` (``module -> (kind, rank)``): the most common rank
    as ``r`` (with ``lora_alpha = r``), the others in ``rank_pattern``/``alpha_pattern``. With
    a tied embedding among them, its head is a target too and PEFT ties their adapters
    (``ensure_weight_tying``), so the head sees the embedding's update."""
    counts = Counter(r for _, r in modules.values())
    common = counts.most_common(1)[0][0] if counts else 1
    others = {re.escape(m): r for m, (_, r) in sorted(modules.items()) if r != common}
    targets = set(modules)
    tie = tied is not None and tied[0] in modules
    if tie:
        assert tied is not None
        targets.add(tied[1])
        if modules[tied[0]][1] != common:
            others[re.escape(tied[1])] = modules[tied[0]][1]
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": sorted(targets),
        "ensure_weight_tying": tie,
        "modules_to_save": sorted({_module(n) for n in whole}) or None,
        "fan_in_fan_out": any(k == "conv1d" for k, _ in modules.values()),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _readme(report: ExtractReport, base: str, finetuned: str) -> str:
    rows = "\n".join(f"| `{m.module}` | {m.kind} | {list(m.shape)} | {m.rank} | {m.full_rank} "
                     f"| {m.error:.4g} |" for m in report.lora_modules)
    extra = ""
    if report.saved_whole:
        extra += "\nSaved whole (`modules_to_save`): " + ", ".join(
            f"`{n}`" for n in report.saved_whole) + "\n"
    if report.not_captured:
        extra += ("\nChanged in the fine-tune but not in this adapter: "
                  + ", ".join(f"`{n}`" for n in report.not_captured) + "\n")
    errors = [m.error for m in report.lora_modules]
    summary = (f"{len(errors)} LoRA modules; relative reconstruction error "
               f"|delta - B A| / |delta| (Frobenius): mean {sum(errors) / len(errors):.4g}, "
               f"max {max(errors):.4g}." if errors else "No module changed.")
    return f"""---
library_name: peft
base_model: {base}
tags:
- polymerge
- lora
---

# LoRA adapter extracted by polymerge

`polymerge extract-lora {finetuned} --base {base} --rank {report.rank}`: the truncated SVD of
each weight's delta (fine-tune minus base), `B = U sqrt(S)`, `A = sqrt(S) Vh`,
`lora_alpha = r`.

{summary} Modules left unchanged by the fine-tune: {report.unchanged}.

| module | kind | shape | rank | full rank | relative error |
|---|---|---|---:|---:|---:|
{rows}
{extra}"""


def extract_lora(finetuned: str | Path, base: str | Path, out: str | Path, *,
                 rank: int | float | str, include: str | None = None,
                 exclude: str | None = None, dtype: str | None = None, device: str = "cpu",
                 force: bool = False, allow_pickle: bool = False,
                 progress: bool = True) -> ExtractReport:
    """Write a PEFT LoRA adapter approximating ``finetuned`` as ``base`` + B A into ``out``
    (see the module docstring); return what was written, with each module's error."""
    start = time.perf_counter()
    rank_value = parse_rank(rank)
    inc = _search(include, "--include")
    exc = _search(exclude, "--exclude")
    out_path = Path(out).expanduser().absolute()
    check_output_target(out_path, force=force)
    resolve_device(device)
    recipe = Recipe(merge_method=SCHEMA.name, base_model=str(base),
                    models=[ModelEntry(model=str(finetuned), name="finetuned")])
    plan = build_plan(recipe, SCHEMA, allow_pickle=allow_pickle, dtype=dtype)
    try:
        if plan.heads:
            raise PolymergeError("extract-lora: the fine-tune has a task head the base lacks; "
                                 "use a base of the same class")
        check_output_not_input(out_path, recipe)
        work = _Extractor(plan, rank_value, inc, exc)
        if not work.kind and not work.whole:
            raise RecipeError("extract-lora: no tensor is selected (check --include and "
                              "--exclude)")
        if isinstance(rank_value, float):
            work.measure(device, progress)
        outputs = work.layout()
        check_free_disk(out_path, sum(i.nbytes for i in outputs))
        float_jobs = replace(plan, jobs=[j for j in plan.jobs if j.merge])
        with AtomicOutputDir(out_path, force=force, kind="adapter") as tmp:
            write_folder(float_jobs, tmp, work.compute, outputs, max_shard_bytes=2**62,
                         metadata={"polymerge": "extract-lora"}, device=device,
                         progress=progress, desc="extracting LoRA")
            report = _finish(work, tmp, out_path, rank_value, str(base), str(finetuned))
    finally:
        plan.close()
    report.seconds = time.perf_counter() - start
    return report


def _finish(work: _Extractor, tmp: Path, out_path: Path, rank: int | float, base: str,
            finetuned: str) -> ExtractReport:
    """Drop what did not change, then the config and the README."""
    unchanged_lora = [n for n in work.reports if n not in work.changed]
    changed_modules = {_module(n) for n in work.whole if n in work.changed}
    whole = [n for n in work.whole if _module(n) in changed_modules]
    drop = set()
    for name in unchanged_lora:
        drop.update(_keys(work.kind[name], _module(name)))
    drop.update(PREFIX + n for n in work.whole if n not in whole)
    weights = tmp / SINGLE_NAME
    if drop:
        from safetensors.torch import load_file, save_file

        kept = {k: v for k, v in load_file(weights).items() if k not in drop}
        weights.unlink()
        save_file(kept, tmp / WEIGHTS_NAME, metadata={"format": "pt",
                                                       "polymerge": "extract-lora"})
    else:
        weights.rename(tmp / WEIGHTS_NAME)
    reports = [work.reports[n] for n in work.reports if n in work.changed]
    targets = {_module(n): n for n in work.reports if n in work.changed}
    covered = set(work.reports) | set(whole)
    not_captured = sorted(n for n in work.changed if n not in covered)
    for n in whole:
        info = work.infos[n]
        reports.append(ModuleReport(n, "full", 0, 0, 0.0, info.shape))
    config = adapter_config(base, {m: (work.kind[n], work.ranks[n]) for m, n in targets.items()},
                            whole, _task_type(work.plan.reference.config),
                            tied_head(work.plan.reference.config))
    report = ExtractReport(out_path, rank, reports, whole, not_captured,
                           unchanged=len(unchanged_lora), config=config)
    if not targets and not whole:
        raise PolymergeError("extract-lora: the fine-tune equals the base in every selected "
                             "tensor; there is nothing to extract")
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").write_text(_readme(report, base, finetuned))
    return report


__all__ = ["ExtractReport", "ModuleReport", "adapter_config", "extract_lora", "module_kinds",
           "parse_rank"]
