"""1bit-Merging (Liu et al., arXiv 2502.10743): 1-bit task vectors where an expert's knowledge
lives, one static merge for the rest, a router picks the expert.

The paper observes that fine-tuned experts keep their task knowledge in different modules
(chat experts mostly in the attention layers, math and code experts in the MLP layers). So per
expert, the task vectors of those modules are kept compressed to 1 bit, BitDelta style: a weight
matrix's task vector ``tau = expert - base`` becomes ``scale * sign(tau)`` with one scale per
matrix, ``scale = mean |tau|`` (the least-squares scale for fixed signs; BitDelta's starting
point, before its optional distillation, which is not done here). Every other tensor is one
static merge of all experts (``merged_method``: ``ties`` by default, ``task_arithmetic`` or any
method of that family, with its parameters). A router then picks the expert per input and the
switch runtime writes its weights by lookup.

Which modules an expert keeps, ``modules`` (a per-model parameter, so each expert may differ):

* ``auto`` (the default): the paper's split: ``attention`` for a chat expert (its name matches
  :data:`CHAT_NAMES`), ``mlp`` for any other (the math and code experts' case);
* ``mlp``, ``attention``, ``all`` (both), ``none``, or a regular expression of tensor names.

Only 2-D weights in the transformer blocks are ever binarized (``mlp`` and ``attention`` match
block module names of Llama, BERT and GPT-2 style models; a regex can reach the embeddings).
Signs: bit 1 where ``tau >= 0`` (+scale), bit 0 where ``tau < 0`` (-scale); packed 8 to a byte
(:mod:`polymerge.stores.bits`) and counted by their bytes in the size.

Per binarized tensor the store keeps ``@base`` (the base's weights, when some expert keeps it),
``@merged`` (when some expert does not), ``@bits`` (K x ceil(numel / 8) bytes for the K experts
that keep it) and ``@scale`` (K float32). Expert t's tensor is ``base + scale_t * (2 bits_t -
1)`` if it keeps the tensor, else the merged tensor.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from polymerge.errors import PolymergeError, RecipeError
from polymerge.io.checkpoint import TensorInfo
from polymerge.methods.schema import MergeMethod, Param
from polymerge.plan import MergePlan, TensorJob
from polymerge.recipe import Recipe, possible_values
from polymerge.registry import register
from polymerge.stores.bits import pack_bits, packed_size, unpack_bits
from polymerge.stores.build import (
    TASK_ARITHMETIC_FAMILY,
    StoreMethod,
    compile_scope,
    inner_method,
)
from polymerge.stores.manifest import TensorEntry, merged_entry, piece_name
from polymerge.stores.store import Store

ATTENTION = r"(?:^|\.)(?:self_attn|attention|attn|self_attention|cross_attn)\."
"""Attention modules: Llama ``self_attn.q_proj``, BERT ``attention.self.query`` and
``attention.output.dense``, GPT-2 ``attn.c_attn``."""
MLP = r"(?:^|\.)(?:mlp|intermediate|ffn|feed_forward|block_sparse_moe)\.|" \
      r"(?:^|\.)(?:layer|layers|h|blocks?)\.\d+\.output\."
"""MLP modules: Llama ``mlp.up_proj``, GPT-2 ``mlp.c_fc``, BERT ``intermediate.dense`` and
the block's ``output.dense`` (not ``attention.output.dense``)."""
CHAT_NAMES = r"(?i)chat|instruct|assistant|dialog|conversation"
"""Expert names treated as chat experts by ``modules: auto``."""
MODULE_WORDS = ("auto", "mlp", "attention", "all", "none")
MERGED_METHODS = TASK_ARITHMETIC_FAMILY

ONEBIT_PARAMS = (
    Param("modules", str, default="auto", scope="per_model",
          help="2-D weights an expert keeps as a 1-bit task vector: auto (the paper: "
               "attention for chat experts, mlp for others) | mlp | attention | all | none | "
               "a regex of tensor names"),
    Param("merged_method", str, default="ties",
          help="static method merging every other tensor: " + ", ".join(MERGED_METHODS)),
)


def module_pattern(value: str, expert: str) -> re.Pattern[str] | None:
    """The compiled pattern an expert's ``modules`` value stands for (None: no module)."""
    if value == "auto":
        value = "attention" if re.search(CHAT_NAMES, expert) else "mlp"
    if value == "none":
        return None
    text = {"mlp": MLP, "attention": ATTENTION, "all": f"{ATTENTION}|{MLP}"}.get(value, value)
    return compile_scope(text, f"onebit: modules of {expert}")


def binarize(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A task vector's signs (bool: ``tau >= 0``) and its scale ``mean |tau|`` (float32)."""
    return tau >= 0, tau.abs().mean(dtype=torch.float32)


def merged_method_of(recipe: Recipe) -> MergeMethod:
    return inner_method(recipe, "merged_method", "ties", "onebit")


def onebit_params(recipe: Recipe) -> tuple[Param, ...]:
    return ONEBIT_PARAMS + merged_method_of(recipe).params


def validate_onebit(recipe: Recipe, n_experts: int) -> None:
    merged_method_of(recipe)
    values = [recipe.parameters.get("modules")]
    values += [m.parameters.get("modules") for m in recipe.models]
    for value in values:
        if value is None:
            continue
        for item in possible_values(value):
            if not isinstance(item, str):
                raise RecipeError(f"onebit: modules must be {', '.join(MODULE_WORDS)} or a "
                                  f"regular expression, got {item!r}")
            if item not in MODULE_WORDS:
                compile_scope(item, "onebit: modules")


class OnebitBuilder:
    """Per-tensor work of a 1bit-Merging store (see the module docstring)."""

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self.n = len(plan.inputs)
        self.names = list(plan.input_names)
        self.inner = merged_method_of(plan.recipe)
        self.inner_names = [p.name for p in self.inner.params]
        self.kept_tensors = [0] * self.n
        self.kept_params = [0] * self.n
        self.errors: list[list[float]] = [[] for _ in range(self.n)]

    def keepers(self, job: TensorJob) -> list[int]:
        """The experts that keep this tensor as a 1-bit task vector."""
        if len(job.out.shape) != 2 or not job.out.dtype.is_floating_point:
            return []
        out = []
        for t, value in enumerate(job.per_model["modules"]):
            pattern = module_pattern(str(value), self.names[t])
            if pattern is not None and pattern.search(job.name):
                out.append(t)
        return out

    def entry(self, job: TensorJob) -> TensorEntry:
        keep = self.keepers(job)
        if not keep:
            return merged_entry(job)
        shape, dtype = job.out.shape, job.out.dtype
        bits = TensorInfo(piece_name(job.name, "bits"),
                          (len(keep), packed_size(math.prod(shape))), torch.uint8)
        pieces = [TensorInfo(piece_name(job.name, "base"), shape, dtype)]
        if len(keep) < self.n:
            pieces.append(TensorInfo(piece_name(job.name, "merged"), shape, dtype))
        pieces += [bits, TensorInfo(piece_name(job.name, "scale"), (len(keep),), torch.float32)]
        return TensorEntry(job.name, "onebit", shape, dtype, tuple(pieces),
                           extra={"experts": keep}, packed=(bits.name,))

    def compute(self, job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        assert base is not None
        keep = self.keepers(job)
        params = {k: job.params[k] for k in self.inner_names}
        if not keep:
            return {piece_name(job.name, "merged"):
                    self.inner.fn(base, inputs, generator=generator, **params)}
        out = {piece_name(job.name, "base"): base}
        if len(keep) < self.n:
            out[piece_name(job.name, "merged")] = self.inner.fn(base, inputs,
                                                                generator=generator, **params)
        signs, scales = [], []
        for t in keep:
            tau = inputs[t] - base
            sign, scale = binarize(tau)
            signs.append(sign.reshape(-1))
            scales.append(scale)
            den = float(tau.norm())
            err = float((tau - torch.where(sign, scale, -scale)).norm())
            self.errors[t].append(err / den if den > 0 else 0.0)
            self.kept_tensors[t] += 1
            self.kept_params[t] += tau.numel()
        out[piece_name(job.name, "bits")] = pack_bits(torch.stack(signs))
        out[piece_name(job.name, "scale")] = torch.stack(scales).float()
        return out

    def finalize(self) -> dict[str, Any]:
        return {"merged_method": self.inner.name,
                "experts": {name: {"tensors": self.kept_tensors[t],
                                   "parameters": self.kept_params[t],
                                   "sign_error": (sum(self.errors[t]) / len(self.errors[t])
                                                  if self.errors[t] else 0.0)}
                            for t, name in enumerate(self.names)}}


class OnebitStore(Store):
    """A loaded 1bit-Merging store: a keeper's tensor is ``base + scale * sign``, any other
    expert's the merged tensor."""

    method = "onebit"

    def keepers(self, tensor: str) -> list[int]:
        entry = self.entries[tensor]
        return [int(t) for t in entry.extra.get("experts", [])] if entry.kind == "onebit" \
            else []

    def signs(self, tensor: str, expert: str | int) -> torch.Tensor | None:
        """Expert ``expert``'s signs of a binarized tensor (bool: True = +), or None when the
        expert takes the merged tensor there."""
        t = self.expert_index(expert)
        keep = self.keepers(tensor)
        if t not in keep:
            return None
        entry = self.entries[tensor]
        packed = self.pieces[piece_name(tensor, "bits")][keep.index(t)]
        return unpack_bits(packed, entry.numel).reshape(entry.shape)

    def _rebuild(self, entry: TensorEntry, expert: int) -> torch.Tensor:
        if entry.kind != "onebit":
            return super()._rebuild(entry, expert)
        keep = self.keepers(entry.name)
        if expert not in keep:
            return self.pieces[piece_name(entry.name, "merged")].clone()
        if not keep:
            raise PolymergeError(f"{entry.name!r}: malformed onebit entry")
        k = keep.index(expert)
        base = self.pieces[piece_name(entry.name, "base")].float()
        scale = self.pieces[piece_name(entry.name, "scale")][k].float()
        sign = self.signs(entry.name, expert)
        assert sign is not None
        return (base + torch.where(sign, scale, -scale)).to(entry.dtype)

    def describe_extra(self) -> str:
        s = self.summary
        lines = [f"merged method (other tensors): {s.get('merged_method')}"]
        for name, info in s.get("experts", {}).items():
            lines.append(f"  {name}: {info['tensors']} tensors ({info['parameters']:,} "
                         f"parameters) as 1-bit task vectors, mean relative error "
                         f"{info['sign_error']:.3f}")
        return "\n".join(lines)


ONEBIT = register(StoreMethod(
    name="onebit",
    description="1bit-Merging: per expert, 1-bit task vectors (sign x one scale per matrix) "
                "of the modules holding its knowledge; the rest merged once; a router.",
    params=onebit_params,
    make_builder=OnebitBuilder,
    store_cls=OnebitStore,
    validate=validate_onebit,
    reference="https://arxiv.org/abs/2502.10743",
))
