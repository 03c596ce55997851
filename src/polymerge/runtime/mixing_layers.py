"""Layers that mix experts per input: ``theta(x) = shared + sum_t w_t(x) (theta_t - shared)``.

Nothing per input is materialized:

* every ``nn.Linear`` (and GPT-2 ``Conv1D``) whose weight has low-rank exclusive factors becomes
  a :class:`TwinLinear`: ``y = x W_shared^T + b + sum_t w[b, t] ((x V_t^T) U_t^T)``, computed as
  two GEMMs over the experts' stacked factors (``V = [V_1; ...; V_T]``, ``U = [U_1 ... U_T]``)
  with the row weights applied in between. Experts whose weight is 0 on every row (top-k) are
  left out. Per-expert biases add ``sum_t w[b, t] (b_t - b_shared)`` per row; out-of-scope
  weights kept per expert (``others: expert``) add ``sum_t w[b, t] x (W_t - W_shared)^T``.
  Row-sparse weights may take a grouped path instead (see :mod:`.mixing_cost` for the paths
  and the cost rule that picks one per module);
* embeddings become :class:`TwinEmbedding` (a gather of the stacked ``U`` rows, then ``V``);
  a tied output layer shares the embedding's factors. Row-sparse weights may take the
  ``"experts"`` path there too (no ``"sets"``: copying a set's columns would copy the
  vocabulary); ids shared by every row (BERT's position ids) are embedded once per active
  expert and mixed per row, whatever the weights;
* norms with per-expert weights (LayerNorm, RMSNorm, ...) become :class:`TwinNorm`: they are
  affine in their weight and bias for a fixed input, so ``y_b = y_shared + g(x) dw_b + db_b``
  with ``g(x)`` the norm's output per unit of weight (``layer_norm`` without affine for
  ``nn.LayerNorm``; for other norms the difference of two calls, weight + 1 minus weight).
  Every row thus gets exactly its own mixed model, and the batched forward equals running each
  input alone through its materialized weights (to float rounding);
* when every row of the batch has the same weights, a module folds them into its weight once
  (``W = W_shared + sum_t w_t U_t V_t``) and runs a plain layer: with ``fold=True`` at once,
  with ``fold=None`` (auto) as soon as the tokens it has processed under those weights make
  folding cheaper than the low-rank path (``tokens (in + out) >= in out`` for a linear: ski
  rental, so at most twice the better choice), which is what makes generation with one weight
  vector run at the plain model's speed after a few steps; ``fold=False`` never folds. An
  embedding folds only once the tokens outnumber its rows, even with ``fold=True``: gathering
  the tokens' rows of the factors is cheaper than rebuilding the whole table.

The weights come per call (:mod:`.mixture`): each layer reads the :class:`Mixture` of the
innermost ``with mixing(w):`` block of its thread, and keeps what it prepares for those
weights there; outside any block (or with weights None or all zero) the layers are the shared
model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polymerge.errors import PolymergeError
from polymerge.runtime.mixing_cost import choose_path
from polymerge.runtime.mixture import Mixture, Plan, current_mixture, row_weights

# ----------------------------------------------------------------------------- factors


@dataclass
class LowRank:
    """Experts' stacked factors of one weight (rows x cols): ``u_cat`` (rows, T r) is
    ``[U_1 ... U_T]``, ``v_cat`` (T r, cols) is ``[V_1; ...; V_T]``; expert t's exclusive part is
    ``U_t V_t``."""

    u_cat: torch.Tensor
    v_cat: torch.Tensor
    rank: int
    experts: int

    @classmethod
    def from_stacked(cls, u: torch.Tensor, v: torch.Tensor) -> LowRank:
        """From ``u`` (T, rows, r) and ``v`` (T, r, cols)."""
        if u.dim() != 3 or v.dim() != 3 or u.shape[0] != v.shape[0] or u.shape[2] != v.shape[1]:
            raise PolymergeError(f"low-rank factors must be (T, rows, r) and (T, r, cols), got "
                                 f"{tuple(u.shape)} and {tuple(v.shape)}")
        t, rows, r = u.shape
        return cls(u.permute(1, 0, 2).reshape(rows, t * r).contiguous(),
                   v.reshape(t * r, v.shape[2]).contiguous(), r, t)

    @classmethod
    def from_lists(cls, us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]) -> LowRank:
        """From per-expert ``u_t`` (rows, r_t) and ``v_t`` (r_t, cols); ranks are zero-padded
        to the largest."""
        r = max(u.shape[1] for u in us)
        pu = [u if u.shape[1] == r else torch.cat([u, u.new_zeros(u.shape[0], r - u.shape[1])],
                                                  1) for u in us]
        pv = [v if v.shape[0] == r else torch.cat([v, v.new_zeros(r - v.shape[0], v.shape[1])],
                                                  0) for v in vs]
        return cls(torch.cat(pu, 1).contiguous(), torch.cat(pv, 0).contiguous(), r, len(us))

    def u(self, t: int) -> torch.Tensor:
        return self.u_cat[:, t * self.rank:(t + 1) * self.rank]

    def v(self, t: int) -> torch.Tensor:
        return self.v_cat[t * self.rank:(t + 1) * self.rank]


def _columns(active: Sequence[int], rank: int, device: torch.device) -> torch.Tensor:
    """Columns of the stacked factors that belong to the ``active`` experts."""
    return torch.cat([torch.arange(t * rank, (t + 1) * rank) for t in active]).to(device)


def _experts_of(*items: Any) -> int:
    for item in items:
        if isinstance(item, LowRank):
            return item.experts
        if isinstance(item, tuple):
            return int(item[0].shape[0])
        if isinstance(item, torch.Tensor):
            return int(item.shape[0])
    raise PolymergeError("a twin module needs factors or per-expert deltas")


def _select(t: torch.Tensor | None, active: Sequence[int], experts: int) -> torch.Tensor | None:
    if t is None or len(active) == experts:
        return t
    return t.index_select(0, torch.tensor(active, device=t.device))


# ----------------------------------------------------------------------------- layers


class TwinLayer(nn.Module):
    """Shared machinery: reading the call's Mixture, its per-layer state, the fold decision
    and the path plan."""

    fold_threshold: float = 0.0

    def __init__(self, experts: int) -> None:
        super().__init__()
        self.experts = experts

    def _current(self) -> tuple[Mixture, dict[str, Any]] | None:
        m = current_mixture()
        if m is None or m.weights is None:
            return None
        s = m.state(self)
        if s is None:
            if m.experts != self.experts:
                raise PolymergeError(f"mixing weights for {m.experts} experts, the layer mixes "
                                     f"{self.experts}")
            s = m.keep(self, self._prepare(m))
        return m, s

    def _prepare(self, m: Mixture) -> dict[str, Any]:
        ref = next(iter(self.parameters()))
        w = m.weights
        assert w is not None
        return {"w": w[:, m.active].to(ref.device, ref.dtype), "active": m.active,
                "tokens": 0, "folded": None}

    def _should_fold(self, m: Mixture, state: dict[str, Any], tokens: int) -> bool:
        if state["folded"] is not None:
            return True
        if not m.rows_equal or m.fold is False:
            return False
        state["tokens"] += tokens
        return bool(m.fold) or state["tokens"] >= self.fold_threshold

    def _plan(self, m: Mixture, state: dict[str, Any], w: torch.Tensor, *,
              tokens_per_row: int, width: int, rank: float, factor_rank: int,
              dense_experts: int, sets: bool = True) -> Plan | None:
        """How to compute this forward's exclusive terms, ``w`` (rows, k) being the row weights
        with one row per input row: None for the dense path, else ``(js, experts, rows,
        weights (n, len(js)))`` per group (see :func:`choose_path`, which picks the path unless
        the Mixture forces one; the choice is cached per batch size and tokens per row)."""
        rows = w.shape[0]
        path = m.path
        if path is None:
            chosen = state.setdefault("paths", {})
            key = (rows, tokens_per_row)
            if key not in chosen:
                chosen[key] = choose_path(m.routes(rows, w.device), rank=rank, width=width,
                                          tokens_per_row=tokens_per_row,
                                          dense_experts=dense_experts, factor_rank=factor_rank,
                                          sets=sets)
            path = chosen[key]
        if path == "sets" and not sets:
            path = "experts"
        m.paths[self] = path
        if path == "dense":
            return None
        return m.groups(rows, path, w.device, w.dtype)


class TwinLinear(TwinLayer):
    """A linear layer mixing the experts per input (see the module docstring).

    ``factors``: a :class:`LowRank` of the weight's layout, or ``(U (T, out, r), V (T, r, in))``;
    ``weight_delta`` (T, *weight.shape) and ``bias_delta`` (T, out): per-expert differences to
    the shared weight and bias. GPT-2 ``Conv1D`` layers (weight stored in x out) are accepted;
    their factors follow their weight's layout.
    """

    def __init__(self, linear: nn.Module, *, factors: LowRank | tuple[torch.Tensor, torch.Tensor]
                 | None = None, weight_delta: torch.Tensor | None = None,
                 bias_delta: torch.Tensor | None = None) -> None:
        super().__init__(_experts_of(factors, weight_delta, bias_delta))
        self.transposed = type(linear).__name__ == "Conv1D"
        if not (isinstance(linear, nn.Linear) or self.transposed):
            raise PolymergeError(f"TwinLinear wraps nn.Linear or Conv1D, not "
                                 f"{type(linear).__name__}")
        self.weight = linear.weight
        self.bias = linear.bias
        rows, cols = self.weight.shape
        self.in_features, self.out_features = (rows, cols) if self.transposed else (cols, rows)
        if isinstance(factors, tuple):
            factors = LowRank.from_stacked(*factors)
        if factors is not None and (factors.u_cat.shape[0] != rows
                                    or factors.v_cat.shape[1] != cols):
            raise PolymergeError(f"factors of shape {tuple(factors.u_cat.shape)} x "
                                 f"{tuple(factors.v_cat.shape)} do not fit a {rows}x{cols} "
                                 "weight")
        self.rank = factors.rank if factors is not None else 0
        self.register_buffer("u_cat", factors.u_cat if factors else None, persistent=False)
        self.register_buffer("v_cat", factors.v_cat if factors else None, persistent=False)
        self.register_buffer("weight_delta", weight_delta, persistent=False)
        self.register_buffer("bias_delta", bias_delta, persistent=False)
        n_in, n_out = self.in_features, self.out_features
        self.fold_threshold = n_in * n_out / (n_in + n_out)
        # multiply-adds per token and expert, per unit of in + out (see choose_path)
        self._cost_rank = self.rank + (self.fold_threshold if weight_delta is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"experts={self.experts}, rank={self.rank}, dense={self.weight_delta is not None}, "
                f"bias_delta={self.bias_delta is not None}")

    def _plain(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.Tensor:
        if self.transposed:
            y = x @ weight
            return y if bias is None else y + bias
        return F.linear(x, weight, bias)

    def _prepare(self, m: Mixture) -> dict[str, Any]:
        s = super()._prepare(m)
        active = s["active"]
        if self.rank:
            if len(active) == self.experts:
                s["u"], s["v"] = self.u_cat, self.v_cat
            else:
                cols = _columns(active, self.rank, self.u_cat.device)
                s["u"] = self.u_cat.index_select(1, cols)
                s["v"] = self.v_cat.index_select(0, cols)
            s["wr"] = s["w"].repeat_interleave(self.rank, dim=1)
        s["dw"] = _select(self.weight_delta, active, self.experts)
        s["db"] = _select(self.bias_delta, active, self.experts)
        return s

    def _fold(self, s: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = s["w"][0]
        weight = self.weight.detach()
        if self.rank:
            weight = weight + (s["u"] * s["wr"][0]) @ s["v"]
        if s["dw"] is not None:
            weight = weight + torch.tensordot(w, s["dw"], dims=1)
        bias = self.bias.detach() if self.bias is not None else None
        if s["db"] is not None:
            bias = w @ s["db"] if bias is None else bias + w @ s["db"]
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = self._current()
        if current is None:
            return self._plain(x, self.weight, self.bias)
        m, s = current
        if self._should_fold(m, s, x.numel() // x.shape[-1]):
            m.paths[self] = "folded"
            if s["folded"] is None:
                s["folded"] = self._fold(s)
            return self._plain(x, *s["folded"])
        b = x.shape[0]
        w = row_weights(s["w"], b)  # (B, k)
        if w.shape[0] != b:  # one input row for several weight rows
            x = x.expand(w.shape[0], *x.shape[1:])
            b = w.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        y = self._plain(x2, self.weight, self.bias)  # (tokens, out), a new tensor
        y3 = y.view(b, -1, y.shape[-1])
        plan = self._plan(m, s, w, tokens_per_row=x2.shape[0] // b,
                          width=self.in_features + self.out_features, rank=self._cost_rank,
                          factor_rank=self.rank, dense_experts=len(s["active"]))
        if plan is not None:
            self._grouped(x2.view(b, -1, x2.shape[-1]), y3, s, plan)
        else:
            if self.rank:
                wr = row_weights(s["wr"], b).unsqueeze(1)  # (B, 1, k r)
                if self.transposed:  # weight (in, out): x U_t then V_t
                    z, second = x2 @ s["u"], s["v"]
                else:  # weight (out, in): x V_t^T then U_t^T
                    z, second = F.linear(x2, s["v"]), s["u"].T
                z.view(b, -1, z.shape[-1]).mul_(wr)
                y.addmm_(z, second)  # the sum over experts and ranks is this GEMM's inner sum
            if s["dw"] is not None:
                eq = "bli,kio->blko" if self.transposed else "bli,koi->blko"
                y3.add_(torch.einsum(eq, x2.view(b, -1, x2.shape[-1]), s["dw"])
                        .mul_(w[:, None, :, None]).sum(2))
        if s["db"] is not None:
            y3.add_((w @ s["db"]).unsqueeze(1))
        return y.view(*x.shape[:-1], y.shape[-1])

    def _stacked(self, experts: tuple[int, ...], s: dict[str, Any]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' stacked factors as (in, k r) and (k r, out): x first second. Views when
        the experts are consecutive (one block of columns), else copies."""
        assert self.u_cat is not None and self.v_cat is not None
        r = self.rank
        if experts == tuple(range(experts[0], experts[0] + len(experts))):
            cols = slice(experts[0] * r, (experts[-1] + 1) * r)
            u, v = self.u_cat[:, cols], self.v_cat[cols]
        else:
            indices = s.setdefault("columns", {})
            index = indices.get(experts)
            if index is None:
                index = indices[experts] = _columns(experts, r, self.u_cat.device)
            u, v = self.u_cat.index_select(1, index), self.v_cat.index_select(0, index)
        if self.transposed:  # weight (in, out) = U V
            return u, v
        return v.T, u.T  # weight (out, in) = U V

    def _grouped(self, x3: torch.Tensor, y3: torch.Tensor, s: dict[str, Any], plan: Plan
                 ) -> None:
        """y3 (B, L, out) += each group's experts' terms on the group's rows: the rows are
        gathered, run through the stacked factors (the row weights applied in between) and
        added back; a group of every row works in place."""
        b, n_in, n_out = x3.shape[0], x3.shape[-1], y3.shape[-1]
        y2 = y3.view(-1, n_out)
        for js, experts, rows, wg in plan:
            n, k = wg.shape
            every = n == b
            xs = (x3 if every else x3.index_select(0, rows)).reshape(-1, n_in)
            part = None  # the group's terms (n L, out), when they are added back by row
            if self.rank:
                first, second = self._stacked(experts, s)
                z = xs @ first
                z.view(n, -1, k, self.rank).mul_(wg.view(n, 1, k, 1))
                if every:
                    y2.addmm_(z, second)
                else:
                    part = z @ second
            if s["dw"] is not None:
                for i, j in enumerate(js):
                    d = xs @ s["dw"][j] if self.transposed else F.linear(xs, s["dw"][j])
                    d.view(n, -1, n_out).mul_(wg[:, i].view(n, 1, 1))
                    if every:
                        y2.add_(d)
                    elif part is None:
                        part = d
                    else:
                        part.add_(d)
            if part is not None:
                y3.index_add_(0, rows, part.view(n, -1, n_out))


class TwinEmbedding(TwinLayer):
    """An embedding mixing the experts per input: rows of the stacked ``U`` are gathered for
    the tokens, weighted per row and projected by the stacked ``V``."""

    def __init__(self, embedding: nn.Embedding, *, factors: LowRank | tuple[torch.Tensor,
                 torch.Tensor] | None = None, weight_delta: torch.Tensor | None = None) -> None:
        super().__init__(_experts_of(factors, weight_delta))
        self.weight = embedding.weight
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self._options = dict(padding_idx=embedding.padding_idx, max_norm=embedding.max_norm,
                             norm_type=embedding.norm_type,
                             scale_grad_by_freq=embedding.scale_grad_by_freq,
                             sparse=embedding.sparse)
        self.padding_idx = embedding.padding_idx
        if isinstance(factors, tuple):
            factors = LowRank.from_stacked(*factors)
        if factors is not None and tuple(factors.u_cat.shape[:1] + factors.v_cat.shape[1:]) \
                != tuple(self.weight.shape):
            raise PolymergeError("embedding factors do not fit the embedding's weight")
        self.rank = factors.rank if factors is not None else 0
        self.register_buffer("u_cat", factors.u_cat if factors else None, persistent=False)
        self.register_buffer("v_cat", factors.v_cat if factors else None, persistent=False)
        self.register_buffer("weight_delta", weight_delta, persistent=False)
        self.fold_threshold = float(self.num_embeddings)
        # multiply-adds per token and expert in units of H (a dense delta: one add)
        self._cost_rank = self.rank + (1.0 if weight_delta is not None else 0.0)

    def _should_fold(self, m: Mixture, state: dict[str, Any], tokens: int) -> bool:
        # Gathering the tokens' rows costs k r H per token; folding rebuilds the whole table.
        # So an embedding folds only once the tokens seen under these weights outnumber its
        # rows, even with fold=True.
        if state["folded"] is not None:
            return True
        if not m.rows_equal or m.fold is False:
            return False
        state["tokens"] += tokens
        return state["tokens"] >= self.fold_threshold

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, experts={self.experts}, "
                f"rank={self.rank}, dense={self.weight_delta is not None}")

    def _prepare(self, m: Mixture) -> dict[str, Any]:
        s = super()._prepare(m)
        # A gather is cheap whatever the number of experts: inactive ones get weight 0.
        full = torch.zeros((s["w"].shape[0], self.experts), dtype=s["w"].dtype,
                           device=s["w"].device)
        full[:, s["active"]] = s["w"]
        s["w_all"] = full
        if self.rank:
            s["wr"] = full.repeat_interleave(self.rank, dim=1)
        return s

    def _fold(self, s: dict[str, Any]) -> torch.Tensor:
        weight = self.weight.detach()
        if self.rank:
            weight = weight + (self.u_cat * s["wr"][0]) @ self.v_cat
        if self.weight_delta is not None:
            weight = weight + torch.tensordot(s["w_all"][0], self.weight_delta, dims=1)
        return weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        current = self._current()
        if current is None:
            return F.embedding(ids, self.weight, **self._options)
        m, s = current
        if self._should_fold(m, s, ids.numel()):
            m.paths[self] = "folded"
            if s["folded"] is None:
                s["folded"] = self._fold(s)
            return F.embedding(ids, s["folded"], **self._options)
        y = F.embedding(ids, self.weight, **self._options)
        if ids.dim() < 2:  # no batch dimension: one row of weights only
            if s["w_all"].shape[0] != 1:
                raise PolymergeError("twin runtime: an embedding got ids without a batch "
                                     "dimension while rows have different weights")
            ids = ids.reshape(1, -1)
        b = ids.shape[0]
        ids2 = ids.reshape(b, -1)
        out = y.reshape(b, -1, y.shape[-1])
        w = row_weights(s["w_all"], b)  # (b, T), or (B, T) for ids shared by every row
        plan = None
        if w.shape[0] == b:
            plan = self._plan(m, s, row_weights(s["w"], b), tokens_per_row=ids2.shape[1],
                              width=self.embedding_dim, rank=self._cost_rank, factor_rank=0,
                              dense_experts=self.experts, sets=False)
        if w.shape[0] != b:  # b == 1: each active expert's rows once, mixed per weight row
            m.paths[self] = "shared ids"
            terms = torch.stack([self._term(ids2, t) for t in s["active"]])  # (k, 1, L, H)
            out = out + torch.einsum("klh,bk->blh", terms[:, 0], s["w"])
        elif plan is not None:
            for _, experts, rows, wt in plan:
                every = wt.shape[0] == b
                term = self._term(ids2 if every else ids2.index_select(0, rows), experts[0])
                term.mul_(wt.view(-1, 1, 1))
                if every:
                    out.add_(term)
                else:
                    out.index_add_(0, rows, term)
        else:
            if self.rank:
                wr = row_weights(s["wr"], b).unsqueeze(1)
                out = out + (F.embedding(ids2, self.u_cat) * wr) @ self.v_cat
            if self.weight_delta is not None:
                gathered = self.weight_delta[:, ids2]  # (T, b, L, H)
                out = out + torch.einsum("tblh,bt->blh", gathered, w)
        if y.dim() == 2:  # ids had no batch dimension
            return out.reshape(y.shape)
        return out.reshape(out.shape[0], *y.shape[1:-1], out.shape[-1])

    def _term(self, ids: torch.Tensor, t: int) -> torch.Tensor:
        """Expert t's exclusive rows for ``ids`` (n, L): (n, L, H), a new tensor."""
        term = None
        if self.rank:
            assert self.u_cat is not None and self.v_cat is not None
            cols = slice(t * self.rank, (t + 1) * self.rank)
            term = F.embedding(ids, self.u_cat[:, cols]) @ self.v_cat[cols]
        if self.weight_delta is not None:
            rows = F.embedding(ids, self.weight_delta[t])
            term = rows if term is None else term.add_(rows)
        assert term is not None
        return term


class TwinNorm(TwinLayer):
    """A norm layer (LayerNorm, RMSNorm, ...) with per-expert weight and bias, mixed per row.

    The norm is affine in its weight and bias for a fixed input, so each row's output is the
    shared output plus ``g(x) * dweight + dbias`` (see the module docstring).
    """

    def __init__(self, norm: nn.Module, *, weight_delta: torch.Tensor | None = None,
                 bias_delta: torch.Tensor | None = None) -> None:
        super().__init__(_experts_of(weight_delta, bias_delta))
        # The wrapped norm computes; it is kept out of the module tree so that the parameters
        # (the same objects, registered here) keep their names in state_dict().
        object.__setattr__(self, "_norm", norm)
        self.weight = getattr(norm, "weight", None)
        self.bias = getattr(norm, "bias", None)
        if weight_delta is not None and self.weight is None:
            raise PolymergeError(f"{type(norm).__name__} has no weight to mix")
        self.register_buffer("weight_delta", weight_delta, persistent=False)
        self.register_buffer("bias_delta", bias_delta, persistent=False)
        self.fold_threshold = 0.0

    def extra_repr(self) -> str:
        return f"{type(self._norm).__name__}, experts={self.experts}"

    def _call(self, x: torch.Tensor, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """The wrapped norm's forward with ``weight`` and ``bias`` in place of its own. The
        norm is not touched (another thread may be running it): a shallow copy with its own
        parameter table runs instead."""
        norm = self._norm
        if weight is None and bias is None:
            return norm(x)
        view = copy.copy(norm)
        params = dict(norm._parameters)
        if weight is not None:
            params["weight"] = weight
        if bias is not None:
            params["bias"] = bias
        object.__setattr__(view, "_parameters", params)
        return view(x)

    def _prepare(self, m: Mixture) -> dict[str, Any]:
        s = super()._prepare(m)
        s["dw"] = _select(self.weight_delta, s["active"], self.experts)
        s["db"] = _select(self.bias_delta, s["active"], self.experts)
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = self._current()
        if current is None:
            return self._call(x)
        m, s = current
        if self._should_fold(m, s, 0):
            w = s["w"][0]
            weight = self.weight + w @ s["dw"] if s["dw"] is not None else None
            bias = self.bias + w @ s["db"] if s["db"] is not None else None
            return self._call(x, weight, bias)
        b = x.shape[0]
        w = row_weights(s["w"], b)
        shape = (w.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        norm = self._norm
        if isinstance(norm, nn.LayerNorm):
            g = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
            y = g * self.weight + self.bias if self.bias is not None else g * self.weight
        else:
            y = self._call(x)
            g = self._call(x, self.weight + 1) - y if s["dw"] is not None else None
        if s["dw"] is not None:
            y = y + g * (w @ s["dw"]).reshape(shape)
        if s["db"] is not None:
            y = y + (w @ s["db"]).reshape(shape)
        return y


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a norm layer whose only parameters are a 1-D weight and bias."""
    if isinstance(module, nn.LayerNorm):
        return True
    params = dict(module.named_parameters(recurse=False))
    return "Norm" in type(module).__name__ and bool(params) \
        and set(params) <= {"weight", "bias"} and all(p.dim() == 1 for p in params.values())
