"""The cost rule by which a switching runtime serves a batch whose rows want different experts.

Two paths give the same numbers (to float rounding):

* **switch**: group the rows by expert; per group, write the expert's weights into the working
  model (a store lookup: only the channels whose group changes, when fewer than half do) and
  run the group alone; the expert already loaded goes first;
* **gather** (:mod:`.channel_batch`): one pass over every row, each channel-merged layer
  computing its K groups' outputs and each row taking its expert's, nothing written.

:func:`choose` estimates both in multiply-adds and takes the cheaper (ties: switch)::

    switch = sum over groups g:  written(previous, g) * SWITCH_COPY
                                 + steps * (STEP_COST + calls * MODULE_CALL)
                                 + rows_g * tokens * per_token
    gather = steps * (STEP_COST + (calls + GATHER_CALLS * gathered
                                   + (G - 1) * 3 * per_expert_modules) * MODULE_CALL)
             + rows * tokens * (per_token + extra_per_token)

``per_token``: the plain model's multiply-adds per token (its linear layers, and attention
over the row's length); ``extra_per_token``: what the gather path adds (K - 1 more GEMMs per
channel-merged linear, the selection along K); ``calls``: leaf modules per forward pass;
``gathered``: wrapped layers (a few more calls each); ``per_expert_modules``: wrapped layers
that loop over the batch's experts (three calls per extra expert); ``steps``: forward passes
(1 for a forward, 1 + new tokens when generating, with ``tokens`` = prompt + new tokens per
row). ``written(a, b)``: elements a switch from
expert a to b writes (everything from no expert).

Constants, from measurements on the development machine (one CPU thread, torch 2.13,
float32, a GEMM doing about 25 multiply-adds per ns; ``bench/serve_load.py`` times both paths
on real stores): ``SWITCH_COPY`` = 25 multiply-adds per element written (a MiniLM lookup writes
its ~20M elements in 26 ms, about 1 ns each), ``STEP_COST`` = 1.5e8 (the fixed cost of one
forward pass through transformers, a generate step's bookkeeping included: about 6 ms),
``MODULE_CALL`` = 2.5e5 (about 10 us of Python and dispatch per module call),
``GATHER_CALLS`` = 4 extra calls per wrapped layer, ``GATHER_SELECT`` = 6 per output element
and group. So decoding a mixed batch is gathered (one decode loop instead of one per expert:
SmolLM2 cut to 4 layers, 8 rows over 4 experts, 16 tokens: 3.4 s gathered against 11.3 s
switched), and a large forward batch over few experts is switched (32 rows of 64 tokens over
4 MiniLM experts: four switches cost less than K - 1 more GEMMs for every row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SWITCH_COPY = 25.0
"""Multiply-adds per element written by a switch (a memory-bound copy)."""
MODULE_CALL = 2.5e5
"""The fixed cost of one module call (Python, dispatch, kernel launch), in multiply-adds."""
GATHER_SELECT = 6.0
"""Selecting each row's group along K, per output element and group."""
STEP_COST = 1.5e8
"""The fixed cost of one forward pass (a generate step's bookkeeping included)."""
GATHER_CALLS = 4
"""Extra calls per wrapped layer on the gather path."""

PATHS = ("switch", "gather")


@dataclass
class ModelCosts:
    """What the rule needs to know about a model and its store (see the module docstring)."""

    linear_per_token: float
    attention_per_token_and_position: float
    extra_per_token: float
    calls: int
    per_expert_modules: int
    written: torch.Tensor
    """(N + 1, N): elements written switching from expert a (row N: no expert) to b."""
    gathered: int = 0
    """Layers wrapped for the gather path."""

    def per_token(self, tokens_per_row: float) -> float:
        return self.linear_per_token + self.attention_per_token_and_position * tokens_per_row


def switch_cost(costs: ModelCosts, groups: Sequence[tuple[int, int]], active: int | None,
                tokens_per_row: float, steps: int) -> float:
    """Estimated multiply-adds of the switch path: ``groups`` are (expert, rows), in the order
    they run; ``active`` the expert loaded before (None: none)."""
    total = 0.0
    previous = costs.written.shape[0] - 1 if active is None else active
    per_token = costs.per_token(tokens_per_row)
    for expert, rows in groups:
        total += float(costs.written[previous, expert]) * SWITCH_COPY
        total += steps * (STEP_COST + costs.calls * MODULE_CALL) \
            + rows * tokens_per_row * per_token
        previous = expert
    return total


def gather_cost(costs: ModelCosts, groups: Sequence[tuple[int, int]], tokens_per_row: float,
                steps: int) -> float:
    """Estimated multiply-adds of the gather path for the same rows."""
    rows = sum(n for _, n in groups)
    calls = costs.calls + GATHER_CALLS * costs.gathered \
        + (len(groups) - 1) * 3 * costs.per_expert_modules
    return (steps * (STEP_COST + calls * MODULE_CALL)
            + rows * tokens_per_row * (costs.per_token(tokens_per_row) + costs.extra_per_token))


def choose(costs: ModelCosts | None, groups: Sequence[tuple[int, int]], active: int | None,
           tokens_per_row: float, steps: int = 1) -> str:
    """``"switch"`` or ``"gather"``, whichever :func:`switch_cost` / :func:`gather_cost`
    estimate lower (``costs`` None: the gather path is unavailable, switch)."""
    if costs is None or not groups:
        return "switch"
    s = switch_cost(costs, ordered(groups, active), active, tokens_per_row, steps)
    g = gather_cost(costs, groups, tokens_per_row, steps)
    return "gather" if g < s else "switch"


def ordered(groups: Sequence[tuple[int, int]], active: int | None) -> list[tuple[int, int]]:
    """The groups in the order the switch path runs them: the loaded expert's first."""
    return sorted(groups, key=lambda g: g[0] != active)
