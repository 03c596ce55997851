"""Independent references for the runtime tests: model weights computed by plain torch from the
experts' own files (never through a store's lookup or export), and models loaded with them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from conftest import load_state
from test_store_common import make_family

import polymerge

TEXTS = ["apple banana cherry", "car bus", "red blue green black", "one two three"]


def family(root: Path, kind: str, **kwargs: Any) -> tuple[Path, list[Path], dict, list[dict]]:
    """A base and four experts (see test_store_common), with their tensors read from disk."""
    base, experts = make_family(root, kind, **kwargs)
    return base, experts, load_state(base), [load_state(e) for e in experts]


def build(recipe: dict[str, Any], out: Path) -> Path:
    polymerge.merge(recipe, out, progress=False)
    return out


def store_recipe(method: str, base: Path, experts: list[Path], **params: Any) -> dict[str, Any]:
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e), "name": e.name} for e in experts],
            "parameters": params}


def model_with(folder: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The folder's architecture (transformers' own loader) with ``state`` loaded instead."""
    import transformers
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, cfg.architectures[0])
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()},
                                                strict=False)
    assert not unexpected and not [k for k in missing if "lm_head" not in k], (missing,
                                                                               unexpected)
    return model


def channel_state(base: dict[str, torch.Tensor], experts: Sequence[dict[str, torch.Tensor]],
                  index: dict[str, torch.Tensor], i: int, lam: float) -> dict[str, torch.Tensor]:
    """Expert ``i`` of a task-arithmetic channel store: per channel-merged row, ``base +
    lam * sum of the deltas of the experts in i's group`` (the partition ``index`` (N, rows)
    per tensor, as clustered by the store); other tensors as the expert's own."""
    out = {}
    for name, b in base.items():
        if name not in index:
            out[name] = experts[i][name].clone()
            continue
        groups = index[name]
        merged = b.double().clone()
        for j, e in enumerate(experts):
            same = (groups[j] == groups[i]).double().reshape(-1, *[1] * (b.dim() - 1))
            merged += lam * same * (e[name].double() - b.double())
        out[name] = merged.to(b.dtype)
    return out


def shared_state(base: dict[str, torch.Tensor], experts: Sequence[dict[str, torch.Tensor]],
                 lam: float = 0.3) -> dict[str, torch.Tensor]:
    """Twin's shared expert by default: task arithmetic, ``base + lam sum_t (e_t - base)``."""
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b.clone()
            continue
        acc = b.double().clone()
        for e in experts:
            acc += lam * (e[name].double() - b.double())
        out[name] = acc
    return out


def mixed_state(shared: dict[str, torch.Tensor], experts: Sequence[dict[str, torch.Tensor]],
                w: Sequence[float] | torch.Tensor) -> dict[str, torch.Tensor]:
    """``shared + sum_t w_t (expert_t - shared)``, tensor by tensor (buffers as they are)."""
    out = {}
    for name, s in shared.items():
        if not s.is_floating_point():
            out[name] = s.clone()
            continue
        acc = s.double().clone()
        for t, e in enumerate(experts):
            acc += float(w[t]) * (e[name].double() - s.double())
        out[name] = acc.float()
    return out


def tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def main_output(model: torch.nn.Module, tok: Any, text: str) -> torch.Tensor:
    """The model's logits or last hidden state for one text alone (no padding)."""
    with torch.inference_mode():
        out = model(**tok([text], return_tensors="pt"))
    main = out.logits if hasattr(out, "logits") and out.logits is not None \
        else out.last_hidden_state
    return main[0].float()


def greedy(model: torch.nn.Module, tok: Any, text: str, n: int) -> str:
    enc = tok([text], return_tensors="pt")
    with torch.inference_mode():
        seq = model.generate(**enc, max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(seq[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
