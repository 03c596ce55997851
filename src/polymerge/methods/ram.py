"""RAM and RAM+ (tensor-local): keep what one agent changed, average what several changed.

Reinforced Agent Merging, as mergekit 0.1.5 implements it on each tensor, with task vectors
``d_i = expert_i - base``: an entry counts as changed by expert ``i`` when ``|d_i| > epsilon``.
Where exactly one expert changed it, that expert's change is kept; where several did, their
changes are averaged; where none did, the base stays. Changes of at most ``epsilon`` are dropped.

``ramplus_tl`` also rescales each expert's unique changes by ``1 + r * clamp(rho_i, 0, alpha)``,
``rho_i`` being the number of its changed entries shared with another expert over the number of
its unique ones (the latter floored at ``epsilon``). The paper's RAM+ measures ``rho_i`` over the
whole model; mergekit's ``ramplus_tl`` ("tensor-local"), and this one, measure it per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polymerge.errors import RecipeError
from polymerge.methods.chunks import float_chunks
from polymerge.methods.schema import MergeMethod, Param


def _ram(base: torch.Tensor, experts: Sequence[torch.Tensor], *, epsilon: float,
         r: float | None = None, alpha: float = 0.0) -> torch.Tensor:
    """RAM (``r is None``) or tensor-local RAM+ of one tensor.

    Computed chunk by chunk from the inputs as stored (see :mod:`polymerge.methods.chunks`):
    RAM+ first counts each expert's shared and unique changes over the whole tensor, then
    mixes; no float32 copy of the inputs is held. Every step is float arithmetic on the
    chunk's (N, chunk) block: on CPU a comparison, a boolean mask or a float-bool product
    costs several times an in-place float operation.
    """
    if base is None:
        raise RecipeError("ram: needs a base model")
    if not experts:
        return base.float().clone()
    n = len(experts)
    inputs = [base, *experts]

    boost = None
    if r is not None:
        shared_counts = torch.zeros(n, dtype=torch.float64, device=base.device)
        unique_counts = torch.zeros(n, dtype=torch.float64, device=base.device)
        for _, _, block in float_chunks(inputs):
            changed = _changed(block[1:].sub_(block[0]).abs_(), epsilon)
            alone = _alone(changed.sum(dim=0))
            # float32 counts are exact up to 2^24, far above a chunk's length
            unique = changed @ alone
            unique_counts += unique
            shared_counts += changed.sum(dim=1).sub_(unique)
        rho = shared_counts / unique_counts.clamp(min=epsilon)
        boost = (rho.clamp(min=0, max=alpha) * r).float().reshape(-1, 1)
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    flat_out = out.view(-1)
    for b, e, block in float_chunks(inputs):
        # Changes of more than epsilon, the others 0.
        kept = torch.nn.functional.hardshrink(block[1:].sub_(block[0]), epsilon)
        counts = _changed(kept.abs(), 0.0).sum(dim=0)
        # Entries changed by one expert: its change; by several: their mean; by none: 0.
        mixed = torch.sum(kept, dim=0, out=flat_out[b:e])
        if boost is not None:
            # Unique entries get lambda_i = 1 + boost_i: add boost_i * d_i where i is alone.
            mixed.div_(counts.clamp(min=1)).add_(kept.mul_(boost).sum(dim=0).mul_(_alone(counts)))
        else:
            mixed.div_(counts.clamp_(min=1))
        mixed.add_(block[0])
    return out


def _changed(magnitudes: torch.Tensor, epsilon: float) -> torch.Tensor:
    """1.0 where a magnitude exceeds ``epsilon`` (>= 0), else 0.0, in place."""
    return torch.nn.functional.threshold_(magnitudes, epsilon, 0.0).sign_()


def _alone(counts: torch.Tensor) -> torch.Tensor:
    """1.0 where exactly one expert changed the entry, else 0.0 (``counts`` are integers)."""
    return (counts - 1).abs_().neg_().add_(1).clamp_(min=0)


def ram_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM of one tensor (see the module docstring)."""
    del generator
    return _ram(base, experts, epsilon=float(epsilon))


def ramplus_tl_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """Tensor-local RAM+ of one tensor (see the module docstring)."""
    del generator
    return _ram(base, experts, epsilon=float(epsilon), r=float(r), alpha=float(alpha))


EPSILON = Param("epsilon", float, default=1e-5, low=0.0,
                help="a change of at most this magnitude does not count and is dropped")

RAM = MergeMethod(
    name="ram",
    fn=ram_merge,
    params=(EPSILON,),
    description="Keep task-vector entries changed by one expert, average those changed by "
                "several (Reinforced Agent Merging).",
    base_policy="required",
    min_experts=1,
    reference="https://arxiv.org/abs/2601.13572",
    elementwise=lambda params: True,
    converts_inputs=True,
)

RAMPLUS_TL = MergeMethod(
    name="ramplus_tl",
    fn=ramplus_tl_merge,
    params=(
        Param("r", float, default=0.1, help="strength of the boost of an expert's unique entries"),
        Param("alpha", float, default=0.2, low=0.0,
              help="cap of the shared/unique ratio in the boost"),
        EPSILON,
    ),
    description="RAM with each expert's unique entries boosted by its shared/unique ratio, "
                "measured per tensor (RAM+, tensor-local).",
    base_policy="required",
    min_experts=1,
    reference="https://arxiv.org/abs/2601.13572",
    converts_inputs=True,
)

METHODS = (RAM, RAMPLUS_TL)
