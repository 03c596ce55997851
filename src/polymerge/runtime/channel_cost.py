"""The cost rule by which a switching runtime serves a batch whose rows want different experts.

Two paths give the same numbers (to float rounding):

* **switch**: group the rows by expert; per group, write the expert's weights into the working
  model (a store lookup: only the channels whose group changes, when fewer than half do) and
  run the group alone; the expert already loaded goes first;
* **gather** (:mod:`.channel_batch`): one pass over every row, each channel-merged layer
  computing its K groups' outputs and each row taking its expert's, nothing written.

:func:`choose` estimates both in multiply-adds and takes the cheaper (ties: switch)::

    switch = sum over groups g:  written(previous, g) * SWITCH_COPY
                                 + [steps > 1] * GENERATE_CALL
                                 + steps * (STEP_COST + calls * MODULE_CALL
                                            + PASS_ROWS * linear_per_token)
                                 + rows_g * tokens * per_token
    gather = [steps > 1] * GENERATE_CALL
             + steps * (STEP_COST + (calls + GATHER_CALLS * gathered
                                   + (G - 1) * 3 * per_expert_modules) * MODULE_CALL
                      + PASS_ROWS * linear_per_token)
             + rows * tokens * per_token + sum over passes of linears(T, G)
    linears(T, G) = G * channel_elements * GATHER_COPY           if materializes(K, T, G)
                    + (G - 1) * PASS_ROWS * channel_elements
                    T * extra_per_token                          otherwise
                    + (K - 1) * PASS_ROWS * channel_elements

``per_token``: the plain model's multiply-adds per token (its linear layers, and attention
over the row's length); ``channel_elements``: the weight elements of the channel-merged linear
layers; ``extra_per_token``: what their K-output way adds (K - 1 more GEMMs per channel-merged
linear, the selection along K); ``T``: the tokens of one pass (a forward: ``rows * tokens``;
a generation: the prompts' tokens, then ``rows`` per new token); ``G``: the experts the batch's
rows want; ``calls``: leaf modules per forward pass; ``gathered``: wrapped layers (a few more
calls each); ``per_expert_modules``: wrapped layers that loop over the batch's experts (three
calls per extra expert); ``steps``: forward passes (1 for a forward, 1 + new tokens when
generating, with ``tokens`` = prompt + new tokens per row); ``PASS_ROWS``: what reading a
weight once per pass costs, in rows of its GEMM (a GEMM of a few rows is bound by reading the
weight: a decoding step of SmolLM2-4L costs 38 ms for 8 rows and 66 ms for 32, 1.2 ms per row
and about 19 rows' worth besides, of which STEP_COST is 6 ms).
``written(a, b)``: elements a switch from expert a to b writes (everything from no
expert). Each channel-merged linear of a
gathered pass materializes its experts' weights when that is cheaper than its K outputs
(:func:`materializes`, the same test the layers make).

Constants, from measurements on the development machine (2 shared cores, one CPU thread,
torch 2.13, float32, a GEMM doing 20-40 multiply-adds per ns; ``bench/serve_load.py`` times
both paths on real stores): ``SWITCH_COPY`` = 25 multiply-adds per element written (a MiniLM
lookup writes its ~20M elements in 26 ms, about 1 ns each), ``GATHER_COPY`` = 60 per element
of a materialized weight (an ``index_select`` of rows: 1.5 ns per element for a MiniLM FFN
weight, 5 ns for SmolLM2's 28M-element vocabulary), ``PASS_ROWS`` = 16, ``STEP_COST`` = 2e8
(the fixed cost of one forward pass through transformers, a generate step's bookkeeping
included: about 7 ms), ``GENERATE_CALL`` = 3e8 (setting up one ``generate`` call: about 10 ms;
SmolLM2-4L generating 1 token for 1 row takes 32 ms, a decoding step 19 ms),
``MODULE_CALL`` = 2.5e5 (about 10 us of Python and dispatch per module call),
``GATHER_CALLS`` = 4 extra calls per wrapped layer, ``GATHER_SELECT`` = 6 per output element
and group. So a forward pass over several experts is gathered with materialized weights (the
plain model's multiply-adds, plus a weight copy per expert: 32 MiniLM rows of 64 tokens over 4
experts) unless the rows want one or two experts and the switches write little, and decoding
a mixed batch is gathered (one decode loop instead of one per expert).
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
STEP_COST = 2e8
"""The fixed cost of one forward pass (a generate step's bookkeeping included)."""
GENERATE_CALL = 3e8
"""The fixed cost of one ``generate`` call (its setup), besides its steps."""
PASS_ROWS = 16.0
"""Reading a weight once per pass, in rows of its GEMM (multiply-adds per weight element)."""
GATHER_CALLS = 4
"""Extra calls per wrapped layer on the gather path."""
GATHER_COPY = 60.0
"""Copying one weight element into an expert's materialized weight (an ``index_select`` of
rows), in multiply-adds."""


def materializes(k: int, tokens: int, experts: int) -> bool:
    """Whether a channel-merged linear with ``k`` groups runs a pass of ``tokens`` tokens whose
    rows want ``experts`` experts cheaper by materializing each expert's weight (per weight
    element: ``tokens`` multiply-adds and ``experts`` copies) than by computing its ``k`` group
    outputs (``k * tokens`` multiply-adds)."""
    return experts * GATHER_COPY < (k - 1) * tokens


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
    channel_elements: float = 0.0
    """Weight elements of the channel-merged linear layers (0: they never materialize)."""
    k: int = 2
    """Groups per channel (the largest of the channel-merged layers)."""
    head_elements: float = 0.0
    """Of ``channel_elements``, the output head's (a generation runs it on one token per row
    and pass, the prompt's last)."""
    head_extra: float = 0.0
    """Of ``extra_per_token``, the output head's."""

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
        total += (GENERATE_CALL if steps > 1 else 0.0) \
            + steps * (STEP_COST + costs.calls * MODULE_CALL + PASS_ROWS * costs.linear_per_token) \
            + rows * tokens_per_row * per_token
        previous = expert
    return total


def _linears(costs: ModelCosts, tokens: float, experts: int, *, head: bool | None = None
             ) -> float:
    """What the channel-merged linears add to one gathered pass of ``tokens`` tokens (``head``
    True: the output head's alone, False: the others', None: all)."""
    elements, extra = costs.channel_elements, costs.extra_per_token
    if head is not None:
        elements = costs.head_elements if head else elements - costs.head_elements
        extra = costs.head_extra if head else extra - costs.head_extra
    if not elements:
        return tokens * extra
    if materializes(costs.k, int(tokens), experts):
        return experts * elements * GATHER_COPY + (experts - 1) * PASS_ROWS * elements
    return tokens * extra + (costs.k - 1) * PASS_ROWS * elements


def gather_cost(costs: ModelCosts, groups: Sequence[tuple[int, int]], tokens_per_row: float,
                steps: int) -> float:
    """Estimated multiply-adds of the gather path for the same rows (``steps`` > 1: a
    generation of ``steps - 1`` tokens after a prompt of ``tokens_per_row - steps + 1``, the
    output head running on one token per row and pass)."""
    rows = sum(n for _, n in groups)
    experts = len(groups)
    calls = costs.calls + GATHER_CALLS * costs.gathered \
        + (experts - 1) * 3 * costs.per_expert_modules
    if steps > 1:
        prompt = max(1.0, tokens_per_row - (steps - 1))
        linears = (_linears(costs, rows * prompt, experts, head=False)
                   + steps * _linears(costs, rows, experts, head=True)
                   + (steps - 1) * _linears(costs, rows, experts, head=False))
    else:
        linears = _linears(costs, rows * tokens_per_row, experts)
    return ((GENERATE_CALL if steps > 1 else 0.0)
            + steps * (STEP_COST + calls * MODULE_CALL + PASS_ROWS * costs.linear_per_token)
            + rows * tokens_per_row * costs.per_token(tokens_per_row) + linears)


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
