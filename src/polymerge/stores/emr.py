"""EMR-Merging (Huang et al., NeurIPS 2024): elect, mask, rescale; tuning-free.

Per tensor in scope (every float tensor by default), with task vectors ``tau_t = expert_t -
base`` computed in float32:

* **elect** a unified task vector: per entry the sign of ``sum_t tau_t``, and the largest
  magnitude among the experts whose ``tau_t`` has that sign (0 where the sum is 0);
* **mask** per expert: 1 where ``tau_t * unified > 0`` (the expert agrees with the elected
  sign), kept as bits packed 8 to a byte (:mod:`polymerge.stores.bits`; counted by their bytes
  in the size, see :func:`~polymerge.stores.manifest.parameter_counts`);
* **rescale** per expert: ``scale_t = sum |tau_t| / sum |mask_t * unified|``, summed over the
  whole model (``rescaler: model``, the paper's choice and the default) or per tensor
  (``rescaler: tensor``). The whole-model sums are known only after the last tensor: the
  builder accumulates them and writes every tensor's ``@scale`` piece in the engine's final
  step (``final_pieces``). A scale whose denominator is 0 (an empty mask) is 0.

Expert t is rebuilt as ``base + scale_t * (mask_t * unified)``. The store keeps, per tensor,
``@base`` and ``@unified`` (the store's dtype), ``@mask`` (N x ceil(numel / 8) bytes) and
``@scale`` (N float32 numbers). Tensors out of ``scope`` are kept per expert.

With one expert, the unified vector is that expert's task vector, its mask is 1 wherever the
task vector is not 0, and its scale is exactly 1 (both sums add the same numbers in the same
order), so the store rebuilds ``base + (expert - base)``: the expert itself, to the rounding
of that one subtraction in float32 (exactly, for half-precision experts stored in float32).
"""

from __future__ import annotations

from typing import Any

import torch

from polymerge.errors import PolymergeError, RecipeError
from polymerge.io.checkpoint import TensorInfo
from polymerge.methods.schema import Param
from polymerge.plan import MergePlan, TensorJob
from polymerge.recipe import Recipe
from polymerge.registry import register
from polymerge.stores.bits import pack_bits, packed_size, unpack_bits
from polymerge.stores.build import StoreMethod, compile_scope
from polymerge.stores.manifest import TensorEntry, expert_entry, expert_part, piece_name
from polymerge.stores.store import Store

DEFAULT_SCOPE = "."
"""Every float tensor (1-D ones included): the paper elects over the whole model."""
RESCALERS = ("model", "tensor")

EMR_PARAMS = (
    Param("rescaler", str, default="model",
          help="model: one rescaler per expert over the whole model (the paper) | tensor: one "
               "per expert and tensor"),
    Param("scope", str, default=DEFAULT_SCOPE,
          help="regex of float tensor names to elect, mask and rescale (others: per expert)"),
)


def elect(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unified task vector and the experts' masks of stacked task vectors ``(N, ...)``.

    ``unified``: per entry the sign of the sum, times the largest magnitude among the experts
    with that sign; ``masks`` (N, ...) bool: where ``tau_t * unified > 0``.
    """
    sign = torch.sign(taus.sum(0))
    masks = taus * sign > 0
    unified = sign * torch.where(masks, taus.abs(), torch.zeros((), dtype=taus.dtype,
                                                                 device=taus.device)).amax(0)
    return unified, masks


def rescaler(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` per expert (float64 sums), 0 where the denominator is 0."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))


def validate_emr(recipe: Recipe, n_experts: int) -> None:
    p = recipe.parameters
    value = p.get("rescaler")
    if value is not None and (not isinstance(value, str) or value not in RESCALERS):
        raise RecipeError(f"emr: rescaler must be one of {', '.join(RESCALERS)}, got {value!r}")
    scope = p.get("scope")
    if scope is not None:
        if not isinstance(scope, str):
            raise RecipeError("emr: scope must be one regular expression")
        compile_scope(scope, "emr: scope")


class EmrBuilder:
    """Per-tensor work of an EMR store (see the module docstring)."""

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self.n = len(plan.inputs)
        params = plan.recipe.parameters
        self.mode = str(params.get("rescaler", "model"))
        self.scope_text = str(params.get("scope", DEFAULT_SCOPE))
        self.scope = compile_scope(self.scope_text, "emr: scope")
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """tensor -> (sum |tau_t|, sum |mask_t * unified|) per expert, float64, in order."""
        self.kept = torch.zeros(self.n, dtype=torch.float64)
        self.entries = 0
        self._scales: torch.Tensor | None = None

    def in_scope(self, job: TensorJob) -> bool:
        return job.out.dtype.is_floating_point and self.scope.search(job.name) is not None

    def entry(self, job: TensorJob) -> TensorEntry:
        if not self.in_scope(job):
            return expert_entry(job, self.n)
        shape, dtype = job.out.shape, job.out.dtype
        numel = 1
        for d in shape:
            numel *= d
        mask = TensorInfo(piece_name(job.name, "mask"), (self.n, packed_size(numel)),
                          torch.uint8)
        pieces = (TensorInfo(piece_name(job.name, "base"), shape, dtype),
                  TensorInfo(piece_name(job.name, "unified"), shape, dtype), mask,
                  TensorInfo(piece_name(job.name, "scale"), (self.n,), torch.float32))
        return TensorEntry(job.name, "emr", shape, dtype, pieces, packed=(mask.name,))

    def compute(self, job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        assert base is not None
        if not self.in_scope(job):
            return {piece_name(job.name, expert_part(i)): t for i, t in enumerate(inputs)}
        taus = torch.stack([t - base for t in inputs])
        unified, masks = elect(taus)
        flat_masks = masks.reshape(self.n, -1)
        num = taus.abs().reshape(self.n, -1).sum(1, dtype=torch.float64)
        den = (flat_masks * unified.abs().reshape(1, -1)).sum(1, dtype=torch.float64)
        self.sums[job.name] = (num.cpu(), den.cpu())
        self.kept += flat_masks.sum(1, dtype=torch.float64).cpu()
        self.entries += flat_masks.shape[1]
        return {piece_name(job.name, "base"): base,
                piece_name(job.name, "unified"): unified,
                piece_name(job.name, "mask"): pack_bits(flat_masks)}

    def model_scales(self) -> torch.Tensor:
        """Per expert, ``sum |tau_t| / sum |mask_t * unified|`` over every tensor in scope."""
        num = torch.zeros(self.n, dtype=torch.float64)
        den = torch.zeros(self.n, dtype=torch.float64)
        for n_, d_ in self.sums.values():  # in the engine's tensor order
            num += n_
            den += d_
        return rescaler(num, den)

    def final_pieces(self) -> dict[str, torch.Tensor]:
        """Every in-scope tensor's ``@scale`` (N,), once the whole model was seen."""
        self._scales = self.model_scales()
        out = {}
        for name, (num, den) in self.sums.items():
            scale = self._scales if self.mode == "model" else rescaler(num, den)
            out[piece_name(name, "scale")] = scale.to(torch.float32)
        return out

    def finalize(self) -> dict[str, Any]:
        names = self.plan.input_names
        scales = self._scales if self._scales is not None else self.model_scales()
        out: dict[str, Any] = {
            "rescaler": self.mode, "scope": self.scope_text, "emr_tensors": len(self.sums),
            "model_rescalers": {n: float(s) for n, s in zip(names, scales.tolist(),
                                                            strict=True)},
            "mask_density": {n: (float(k) / self.entries if self.entries else 0.0)
                             for n, k in zip(names, self.kept.tolist(), strict=True)}}
        if self.mode == "tensor":
            per = torch.stack([rescaler(n_, d_) for n_, d_ in self.sums.values()]) \
                if self.sums else torch.zeros(0, self.n, dtype=torch.float64)
            out["tensor_rescalers"] = {
                n: {"mean": float(per[:, i].mean()) if len(per) else 0.0,
                    "min": float(per[:, i].min()) if len(per) else 0.0,
                    "max": float(per[:, i].max()) if len(per) else 0.0}
                for i, n in enumerate(names)}
        return out


class EmrStore(Store):
    """A loaded EMR store: expert t's tensor is ``base + scale_t * (mask_t * unified)``."""

    method = "emr"

    def mask(self, tensor: str, expert: str | int) -> torch.Tensor:
        """Expert ``expert``'s mask of an EMR tensor (bool, the tensor's shape)."""
        entry = self.entries[tensor]
        if entry.kind != "emr":
            raise PolymergeError(f"{tensor!r} has no EMR mask (kind {entry.kind})")
        t = self.expert_index(expert)
        packed = self.pieces[piece_name(tensor, "mask")][t]
        return unpack_bits(packed, entry.numel).reshape(entry.shape)

    def scale(self, tensor: str, expert: str | int) -> float:
        """Expert ``expert``'s rescaler of an EMR tensor."""
        entry = self.entries[tensor]
        if entry.kind != "emr":
            raise PolymergeError(f"{tensor!r} has no EMR rescaler (kind {entry.kind})")
        return float(self.pieces[piece_name(tensor, "scale")][self.expert_index(expert)])

    def _rebuild(self, entry: TensorEntry, expert: int) -> torch.Tensor:
        if entry.kind != "emr":
            return super()._rebuild(entry, expert)
        base = self.pieces[piece_name(entry.name, "base")].float()
        unified = self.pieces[piece_name(entry.name, "unified")].float()
        scale = self.pieces[piece_name(entry.name, "scale")][expert].float()
        mask = self.mask(entry.name, expert)
        return (base + scale * (mask * unified)).to(entry.dtype)

    def describe_extra(self) -> str:
        s = self.summary
        lines = [f"rescaler: {s.get('rescaler')} (scope {s.get('scope')!r}), elected tensors: "
                 f"{s.get('emr_tensors', 0)}"]
        scales = s.get("model_rescalers", {})
        dens = s.get("mask_density", {})
        for name in self.experts:
            lines.append(f"  {name}: whole-model rescaler {scales.get(name, float('nan')):.4f}, "
                         f"mask keeps {dens.get(name, float('nan')):.1%} of the entries")
        return "\n".join(lines)


EMR = register(StoreMethod(
    name="emr",
    description="EMR-Merging: one elected unified task vector, a 1-bit mask and a rescaler per "
                "expert; tuning-free, experts rebuilt by lookup.",
    params=lambda recipe: EMR_PARAMS,
    make_builder=EmrBuilder,
    store_cls=EmrStore,
    validate=validate_emr,
    reference="https://arxiv.org/abs/2405.17461",
))
