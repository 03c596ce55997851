"""The coefficient training loop: merged weights rebuilt from the coefficients every step.

Each step builds ``base + sum_i c(i, layer) * tau_i`` for the tensors that have task vectors
(autograd flows into the coefficients only: base and task vectors need no gradient), runs the
objective's model on them with ``torch.func.functional_call``, and takes an Adam step. A
held-out part of the data is scored every ``eval_every`` steps; training stops after
``patience`` evaluations without improvement and the best coefficients are kept. Everything
random (coefficient order, batches) is drawn from generators seeded by the recipe seed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from polymerge.errors import CheckpointError
from polymerge.tuning.coefficients import Coefficients, layer_of
from polymerge.tuning.objectives import Item, Objective, mean_over_tasks, task_losses
from polymerge.tuning.params import Criterion, Granularity
from polymerge.tuning.task_vectors import TaskVectors

EVAL_BATCH = 64


@dataclass
class TrainResult:
    """The best coefficients found and how training went."""

    coefficients: Coefficients
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0
    best_heldout: float = float("nan")
    initial_heldout: float = float("nan")
    steps_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


def base_tensors(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The model's own (base) weights for the merged tensors, without copying them."""
    state = model.state_dict(keep_vars=True)
    missing = [n for n in names if n not in state]
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} of the checkpoints is not a weight of the "
                              f"{type(model).__name__} loaded from the base ({len(missing)} "
                              "such tensors); the tensor names must match the model's")
    return {n: state[n].detach() for n in names}


def merged_weights(base: dict[str, torch.Tensor], tv: TaskVectors, coefs: Coefficients,
                   layer_index: dict[str, int]) -> dict[str, torch.Tensor]:
    """``base + sum_i c(i, layer) * tau_i`` per tensor, differentiable in the coefficients."""
    values = coefs.values()
    out: dict[str, torch.Tensor] = {}
    for name in tv.names:
        j = layer_index[name]
        w = base[name]
        for i, taus in enumerate(tv.taus):
            tau = taus.get(name)
            if tau is not None:
                w = w + values[i, j] * tau
        out[name] = w
    return out


class BatchSampler:
    """``batch_size`` items per task per step, cycling through seeded permutations."""

    def __init__(self, items: Sequence[Item], batch_size: int, generator: torch.Generator
                 ) -> None:
        self.by_task: dict[str, list[Item]] = {}
        for it in items:
            self.by_task.setdefault(it.task, []).append(it)
        self.batch_size = batch_size
        self.generator = generator
        self.queues: dict[str, list[int]] = {t: [] for t in self.by_task}

    def next(self) -> list[Item]:
        batch: list[Item] = []
        for task, pool in self.by_task.items():
            queue = self.queues[task]
            take = min(self.batch_size, len(pool))
            while len(queue) < take:
                queue += torch.randperm(len(pool), generator=self.generator).tolist()
            batch += [pool[i] for i in queue[:take]]
            del queue[:take]
        return batch


def train_coefficients(objective: Objective, tv: TaskVectors, coefs: Coefficients,
                       train_items: Sequence[Item], heldout_items: Sequence[Item], *,
                       criterion: Criterion, granularity: Granularity, steps: int, lr: float,
                       batch_size: int, eval_every: int, patience: int, seed: int,
                       progress: bool = True, desc: str = "tuning") -> TrainResult:
    """Learn ``coefs`` for the task vectors ``tv`` (see the module docstring)."""
    torch.manual_seed(seed)
    model = objective.model
    base = base_tensors(model, tv.names)
    layer_index = {n: coefs.index[layer_of(n, granularity)] for n in tv.names}
    sampler = BatchSampler(train_items, batch_size, torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam([coefs.raw], lr=lr)

    def forward_with(weights: dict[str, torch.Tensor]):  # noqa: ANN202 - a closure
        def forward(**kwargs: torch.Tensor):  # noqa: ANN202
            return functional_call(model, weights, args=(), kwargs=kwargs, strict=False)
        return forward

    @torch.no_grad()
    def heldout_loss() -> float:
        weights = merged_weights(base, tv, coefs, layer_index)
        sums: dict[str, list[float]] = {}
        for s in range(0, len(heldout_items), EVAL_BATCH):
            chunk = heldout_items[s: s + EVAL_BATCH]
            losses = task_losses(objective.outputs(forward_with(weights), chunk), criterion)
            for task, (total, n) in losses.items():
                acc = sums.setdefault(task, [0.0, 0])
                acc[0] += float(total)
                acc[1] += n
        return sum(t / n for t, n in sums.values()) / max(1, len(sums))

    start = time.perf_counter()
    result = TrainResult(coefs)
    best = heldout_loss()
    result.initial_heldout = best
    best_raw = coefs.raw.detach().clone()
    result.history.append({"step": 0, "heldout": best})
    bad_evals = 0
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, dynamic_ncols=True,
               leave=False)
    for step in bar:
        weights = merged_weights(base, tv, coefs, layer_index)
        outputs = objective.outputs(forward_with(weights), sampler.next())
        loss = mean_over_tasks(task_losses(outputs, criterion))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        coefs.project()
        result.steps_run = step
        record: dict[str, float] = {"step": step, "loss": loss.item()}
        if step % eval_every == 0 or step == steps:
            held = heldout_loss()
            record["heldout"] = held
            if held < best - 1e-7:
                best, best_raw, bad_evals = held, coefs.raw.detach().clone(), 0
                result.best_step = step
            else:
                bad_evals += 1
        result.history.append(record)
        bar.set_postfix_str(f"loss {record['loss']:.4f} held-out best {best:.4f}")
        if bad_evals >= patience:
            result.stopped_early = True
            break
    bar.close()
    with torch.no_grad():
        coefs.raw.copy_(best_raw)
    result.best_heldout = best
    result.seconds = time.perf_counter() - start
    return result
