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
    mixes; no float32 copy of the inputs is held.
    """
    if base is None:
        raise RecipeError("ram: needs a base model")
    if not experts:
        return base.float().clone()
    n = len(experts)
    inputs = [base, *experts]

    def changes(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        deltas = block[1:].sub_(block[0])
        changed = deltas.abs() > epsilon
        counts = changed[0].to(torch.int32)  # row by row: a reduction along dim 0 is slow
        for row in changed[1:]:
            counts += row
        return deltas, changed, counts

    boost = None
    if r is not None:
        shared_counts = torch.zeros(n, dtype=torch.int64, device=base.device)
        unique_counts = torch.zeros(n, dtype=torch.int64, device=base.device)
        for _, _, block in float_chunks(inputs):
            _, changed, counts = changes(block)
            shared_counts += (changed & (counts > 1)).sum(dim=1)
            unique_counts += (changed & (counts == 1)).sum(dim=1)
        rho = shared_counts / unique_counts.clamp(min=epsilon)
        boost = (rho.clamp(min=0, max=alpha) * r).reshape(-1, 1)
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    flat_out = out.view(-1)
    for b, e, block in float_chunks(inputs):
        deltas, changed, counts = changes(block)
        deltas.mul_(changed)
        # Entries changed by one expert: its change; by several: their mean; by none: 0.
        mixed = deltas.sum(dim=0).div_(counts.clamp(min=1))
        if boost is not None:
            # Unique entries get lambda_i = 1 + boost_i: add boost_i * d_i where i is alone.
            mixed.add_((deltas * boost * (counts == 1)).sum(dim=0))
        flat_out[b:e] = mixed.add_(block[0])
    return out


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
