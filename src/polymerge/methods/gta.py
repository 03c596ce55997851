"""Generalized task arithmetic: one core behind task_arithmetic, TIES, DARE, Breadcrumbs and DELLA.

It follows mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge`` step for step, so a recipe ported
from mergekit gives the same result (in distribution for the random sparsifications):

1. ``delta_i = expert_i - base``, thinned by the method's sparsification;
2. ``delta_i *= weight_i``;
3. with consensus, the sign of ``sum_i delta_i`` (0 counts as +) is elected, only agreeing
   entries are summed and the divisor is ``sum_i weight_i * agree_i`` (0 -> 1); without,
   everything is summed and the divisor is ``sum_i weight_i`` (|.| < 1e-8 -> 1);
4. the sum is divided by the divisor if ``normalize``, times ``lambda``, added to the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from polymerge.errors import RecipeError
from polymerge.methods import chunks
from polymerge.methods.schema import MergeMethod, Param
from polymerge.methods.sparsify import (
    Sparsification,
    TopK,
    sparsify,
    top_k_in_chunks,
)

WEIGHT = Param("weight", float, default=1.0, scope="per_model",
               help="scale of this expert's task vector")
DENSITY = Param("density", float, default=1.0, scope="per_model", low=0.0, high=1.0,
                low_open=True, help="fraction of the task vector kept by sparsification")
LAMBDA = Param("lambda", float, default=1.0,
               help="scale of the mixed task vector before it is added to the base")
GAMMA = Param("gamma", float, default=0.01, scope="per_model", low=0.0, high=1.0,
              high_open=True, help="fraction of largest-magnitude outliers removed")
EPSILON = Param("epsilon", float, default=0.15, scope="per_model", low=0.0, high=0.5,
                high_open=True,
                help="spread of keep probabilities around density (density ± epsilon in (0,1))")


def _normalize_param(default: bool) -> Param:
    return Param("normalize", bool, default=default,
                 help="divide the mixed task vector by the sum of the (agreeing) weights")


def _rescale_param(default: bool) -> Param:
    return Param("rescale", bool, default=default,
                 help="rescale surviving entries after sparsification")


def per_model(value: Any, n: int, name: str) -> list[float]:
    """One float per expert; a scalar is broadcast, a list of the wrong length is an error."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise RecipeError(f"parameter {name!r} has {len(values)} values for {n} experts")
    return values


def gta_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    sparsification: Sparsification | None = None,
    consensus: bool = False,
    weight: Any = 1.0,
    density: Any = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
    gamma: Any = 0.01,
    epsilon: Any = 0.15,
) -> torch.Tensor:
    """Merge one tensor by generalized task arithmetic (see the module docstring)."""
    if base is None:
        raise RecipeError("task-arithmetic methods need a base model")
    base_in, base = base, base.float()
    n = len(experts)
    if n == 0:
        return base.clone()
    weights = per_model(weight, n, "weight")
    densities = per_model(density, n, "density")
    gammas = per_model(gamma, n, "gamma")
    epsilons = per_model(epsilon, n, "epsilon")
    if sparsification in (None, Sparsification.magnitude) and not rescale \
            and chunks.worth_chunking(base):
        return _topk_mix_in_chunks(base_in, experts, weights, densities, consensus=consensus,
                                   normalize=normalize, lam=lam)
    # Expert by expert with in-place accumulation: stacking N whole deltas would copy every
    # input once more. Without sign election nothing needs all deltas at once, so they are
    # summed as they come (the same sums in the same order as mix_weighted's sum over the
    # rows of a chunk, so results are bit-identical: Channel Merging's K = 1 is tested so).
    weighted: list[torch.Tensor] = []
    mixed: torch.Tensor | None = None
    for i, expert in enumerate(experts):
        delta = expert.float() - base
        if sparsification is not None:
            delta = sparsify(delta, sparsification, density=densities[i], rescale=rescale,
                             generator=generator, gamma=gammas[i], epsilon=epsilons[i])
        delta.mul_(weights[i])
        if consensus:
            weighted.append(delta)
        elif mixed is None:
            mixed = delta
        else:
            mixed.add_(delta)
    if consensus:
        return mix_weighted(base, weighted, weights, consensus=True, normalize=normalize,
                            lam=lam)
    assert mixed is not None
    if normalize:
        total_weight = sum(weights)
        mixed.div_(1.0 if abs(total_weight) < 1e-8 else total_weight)
    return mixed.mul_(lam).add_(base)


def mix_weighted(base: torch.Tensor, weighted: Sequence[torch.Tensor], weights: Sequence[float],
                 *, consensus: bool, normalize: bool, lam: float) -> torch.Tensor:
    """Steps 3-4 on weighted, thinned deltas (left as they are); shared with Channel
    Merging's per-group merges.

    Every step is per entry, so a big CPU tensor is mixed in chunks that stay in the CPU's
    caches, each chunk of the deltas copied into the rows of one block.
    """
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_deltas = [d.reshape(-1) for d in weighted]
    numel = base.numel()
    for b, e in chunks.spans(numel) if chunks.worth_chunking(base) else [(0, numel)]:
        block = torch.stack([d[b:e] for d in flat_deltas]).float()
        _mix_into(flat_out[b:e], flat_base[b:e], block, weights, consensus=consensus,
                  normalize=normalize, lam=lam)
    return out


def _topk_mix_in_chunks(base: torch.Tensor, experts: Sequence[torch.Tensor],
                        weights: Sequence[float], densities: Sequence[float], *,
                        consensus: bool, normalize: bool, lam: float) -> torch.Tensor:
    """TIES (magnitude top-k, then steps 2-4) without holding a float32 delta of the tensor.

    Passes over the inputs in chunks that stay in the CPU's caches: two per expert find its
    top k by a radix select over ``|expert - base|`` computed a chunk at a time, a last one
    recomputes each chunk's deltas, keeps the top-k entries and mixes them. Memory is the
    inputs (bf16 when the recipe computes in bf16) plus the float32 output, not N float32
    deltas; the result equals sparsifying whole tensors (same operations per entry, same
    ties kept). Every step works in place in the block of chunk-sized rows that
    :func:`chunks.float_chunks` reuses: on CPU an operation that allocates its output costs
    two to four in-place ones (bench/torch_ops.py).
    """
    numel = base.numel()

    def magnitudes(expert: torch.Tensor):  # noqa: ANN202 - a generator of chunks
        for _, _, block in chunks.float_chunks([base, expert]):  # one reused buffer
            yield block[1].sub_(block[0]).abs_()

    tops: list[TopK | None] = []
    for expert, density in zip(experts, densities, strict=True):
        k = max(1, int(density * numel))
        tops.append(None if density >= 1 or k >= numel
                    else top_k_in_chunks(lambda e=expert: magnitudes(e), k))
    scales = None if all(w == 1 for w in weights) else torch.tensor(weights).unsqueeze(1)
    out = torch.empty(base.shape, dtype=torch.float32)
    flat_out = out.view(-1)
    for b, e, block in chunks.float_chunks([base, *experts]):
        deltas = block[1:].sub_(block[0])
        for row, top in zip(deltas, tops, strict=True):
            if top is not None:
                top.keep(row, b)
        if scales is not None:
            deltas.mul_(scales)
        _mix_into(flat_out[b:e], block[0], deltas, weights, consensus=consensus,
                  normalize=normalize, lam=lam)
    return out


_ONE = torch.tensor(1.0)


def _mix_into(out: torch.Tensor, base: torch.Tensor, deltas: torch.Tensor,
              weights: Sequence[float], *, consensus: bool, normalize: bool,
              lam: float) -> None:
    """Steps 3-4 into ``out`` from the weighted deltas as the rows of one block, which is
    overwritten: a few operations over the whole block, in place, and no ``torch.where``
    (tens of times the cost of an in-place product on CPU: bench/torch_ops.py)."""
    torch.sum(deltas, dim=0, out=out)
    if consensus:
        # The sign of the sum, a sum of 0 electing + (adding +0 turns -0 into +0).
        elected = torch.copysign(_ONE.to(out.device), out.add_(0.0))
        # |delta| where its sign is the elected one, else 0 (zero entries agree with
        # neither sign). All float arithmetic: a product with +-1 is exact.
        agreeing = deltas.mul_(elected).clamp_(min=0)
        torch.sum(agreeing, dim=0, out=out).mul_(elected)
        if normalize:
            divisor = torch.tensor(weights, dtype=out.dtype, device=out.device) \
                @ agreeing.sign_()
            if min(weights) >= 0:  # divisor >= 0: the same as the next line, 15x cheaper
                torch.nn.functional.threshold_(divisor, 0.0, 1.0)
            else:
                divisor.masked_fill_(divisor == 0, 1.0)
            out.div_(divisor)
    elif normalize:
        total_weight = sum(weights)
        out.div_(torch.tensor(1.0 if abs(total_weight) < 1e-8 else total_weight))
    if lam != 1:
        out.mul_(lam)
    out.add_(base)


def make_gta_method(
    name: str,
    *,
    sparsification: Sparsification | None,
    consensus: bool,
    default_normalize: bool,
    default_rescale: bool,
    description: str,
    reference: str,
) -> MergeMethod:
    """Build a registered method from the core; parameters follow mergekit's names/defaults.

    ``density`` and ``rescale`` exist only where the method sparsifies (mergekit accepts and
    ignores them for task_arithmetic), ``gamma`` only for Breadcrumbs and ``epsilon`` only for
    DELLA.
    """
    params: list[Param] = [WEIGHT]
    if sparsification is not None:
        params.append(DENSITY)
    params += [_normalize_param(default_normalize)]
    if sparsification is not None:
        params.append(_rescale_param(default_rescale))
    params.append(LAMBDA)
    if sparsification is Sparsification.magnitude_outliers:
        params.append(GAMMA)
    if sparsification is Sparsification.della_magprune:
        params.append(EPSILON)
    defaults = {p.name: p.default for p in params}

    def fn(
        base: torch.Tensor,
        experts: Sequence[torch.Tensor],
        *,
        generator: torch.Generator | None = None,
        **given: Any,
    ) -> torch.Tensor:
        # Defaults are filled here so the function is usable on its own; ``lambda`` is a
        # Python keyword, hence the dict.
        unknown = set(given) - set(defaults)
        if unknown:
            raise RecipeError(f"{name}: unknown parameter(s): {', '.join(sorted(unknown))}")
        p = {**defaults, **given}
        return gta_merge(
            base, experts, generator=generator, sparsification=sparsification,
            consensus=consensus, weight=p["weight"], density=p.get("density", 1.0),
            normalize=p["normalize"], rescale=p.get("rescale", False), lam=p["lambda"],
            gamma=p.get("gamma", 0.01), epsilon=p.get("epsilon", 0.15))

    fn.__name__ = fn.__qualname__ = f"{name}_merge"
    random = sparsification in (Sparsification.random, Sparsification.della_magprune)

    def elementwise(params: dict[str, Any]) -> bool:
        """Sign election and mixing are per entry; a sparsification that keeps everything
        (density 1) leaves nothing that looks at the whole tensor."""
        density = params.get("density", 1.0)
        densities = density if isinstance(density, (list, tuple)) else [density]
        return sparsification is None or all(float(d) >= 1 for d in densities)

    return MergeMethod(
        name=name,
        fn=fn,
        params=tuple(params),
        description=description,
        base_policy="required",
        min_experts=1,
        random=random,
        elementwise=elementwise,
        converts_inputs=True,
        propagates_nonfinite=sparsification is None and not consensus,
        reference=reference,
        extra={"sparsification": None if sparsification is None else sparsification.value,
               "consensus": "sum" if consensus else None},
    )
