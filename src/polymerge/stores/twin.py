"""Twin-Merging (Lu et al., NeurIPS 2024): shared knowledge merged once, exclusive knowledge
compressed per expert, mixed per input at run time.

Per tensor, in the engine's loop (float32):

* ``shared = shared_method(base, experts)``: a static merge of the task-arithmetic family
  (``task_arithmetic`` by default, ``ties``, ``dare_ties``, ...) whose ``lambda`` is the
  recipe's ``shared_lambda`` (0.3 by default) and whose other parameters (``weight``,
  ``density``, ...) are taken from the recipe as the channel store does;
* 2-D float weights whose name matches ``scope`` (every one by default, embeddings included)
  get kind ``twin``: the exclusive part ``E_t = expert_t - shared`` of every expert is
  truncated to rank ``r`` by SVD and stored as two factors, ``<tensor>@u.<t>`` (rows x r, the
  singular values folded in: ``U_r diag(S_r)``) and ``<tensor>@v.<t>`` (r x cols, orthonormal
  rows), next to ``<tensor>@shared``. Expert t is rebuilt as ``shared + u_t @ v_t``;
* other float tensors (1-D tensors, out-of-scope weights) are kept exactly per expert with
  ``others: expert`` (kind ``expert``: ``@expert.<t>`` pieces, plus the ``@shared`` merge, which
  the shared model of the runtime's first pass needs; it is one extra copy of these small
  tensors), or only as the shared merge with ``others: shared`` (kind ``merged``).

``rank``: a value <= 1 is a fraction of the full rank ``min(rows, cols)`` (rounded, at least
1; 1 is the full rank), a value > 1 an integer rank; a rank above a tensor's full rank is an
error naming the tensor, raised while the store is laid out, before any tensor is read.

Which SVD: :func:`polymerge.methods.lowrank.truncated_svd` (shared with ``polymerge
extract-lora``): randomized, seeded from the engine's per-tensor generator, when
``4 * (r + 10) <= min(rows, cols)``, exact otherwise (the measurements are in that module).
Small matrices (the tests' models) always take the exact path.

LoRA experts. The planner turns a PEFT adapter into a full expert tensor on read
(:class:`polymerge.io.lora.LoraCheckpoint`), but the builder can still reach its factors through
``plan.inputs[t].lora_factors(name)``. When every expert is a LoRA adapter of the recipe's base,
the base tensor is float32, no adapter replaces the tensor outright (``modules_to_save``), and
the shared method is ``task_arithmetic``, then ``E_t = s_t B_t A_t - c sum_j w_j s_j B_j A_j``
(``c = lambda``, divided by ``sum_j w_j`` with ``normalize``) is the product of the stacked
factors ``[a_tj s_j B_j]_j @ [A_j]_j``, of rank at most the sum of the LoRA ranks ``k``; where
``2 k <= min(rows, cols)`` its exact SVD comes from :func:`lowrank_svd_of_product` (QR of both
stacked factors, SVD of a k x k core) instead of an SVD of the dense ``E_t``. The shared piece
is still merged from the dense tensors the engine read (that is one elementwise pass), and the
reconstruction error is measured on the dense ``E_t``: what is saved is the SVD, not the read.

Reconstruction error: per tensor ``sqrt(sum_t |E_t - u_t v_t|^2 / sum_t |E_t|^2)`` (Frobenius,
measured on the float32 factors; 0 where every exclusive part is 0), recorded in the manifest's
``summary.recon_error`` with its mean and max over tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from polymerge.errors import PolymergeError, RecipeError
from polymerge.io.checkpoint import TensorInfo
from polymerge.methods.lowrank import (
    fit_factors,
    lowrank_svd_of_product,
    truncated_svd,
)
from polymerge.methods.schema import MergeMethod, Param
from polymerge.plan import MergePlan, TensorJob
from polymerge.recipe import Recipe, possible_values
from polymerge.registry import register
from polymerge.stores.build import (
    TASK_ARITHMETIC_FAMILY,
    StoreMethod,
    compile_scope,
    inner_method,
)
from polymerge.stores.manifest import (
    TensorEntry,
    expert_part,
    merged_entry,
    piece_name,
)
from polymerge.stores.store import (
    Store,
)

DEFAULT_SCOPE = "."
"""Every 2-D float weight (embeddings included) gets low-rank exclusive factors."""
OTHERS = ("expert", "shared")
SHARED_METHODS = TASK_ARITHMETIC_FAMILY
"""Static methods of the task-arithmetic family that can make the shared expert."""

TWIN_PARAMS = (
    Param("shared_method", str, default="task_arithmetic",
          help="static method making the shared expert: " + ", ".join(SHARED_METHODS)),
    Param("shared_lambda", float, default=0.3,
          help="the shared method's lambda (scale of the merged task vector)"),
    Param("rank", float, default=0.1, low=0.0, low_open=True,
          help="rank of each expert's exclusive factors: <= 1 a fraction of the full rank "
               "min(rows, cols), > 1 an integer rank"),
    Param("scope", str, default=DEFAULT_SCOPE,
          help="regex of tensor names whose 2-D weights get low-rank exclusive factors"),
    Param("others", str, default="expert",
          help="1-D and out-of-scope tensors: expert (kept per expert) | shared (the shared "
               "merge only)"),
)


# ----------------------------------------------------------------------------- schema


def shared_method_of(recipe: Recipe) -> MergeMethod:
    return inner_method(recipe, "shared_method", "task_arithmetic", "twin")


def twin_params(recipe: Recipe) -> tuple[Param, ...]:
    """The twin parameters plus the shared method's, less its ``lambda`` (``shared_lambda``)."""
    inner = shared_method_of(recipe)
    return TWIN_PARAMS + tuple(p for p in inner.params if p.name != "lambda")


def _check_rank_value(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{where}: rank must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise RecipeError(f"{where}: rank must be > 0 (a fraction <= 1 of the full rank, or an "
                          f"integer rank), got {value!r}")
    if value > 1 and int(value) != value:
        raise RecipeError(f"{where}: rank {value!r} is neither a fraction <= 1 nor an integer")


def resolve_rank(value: float, rows: int, cols: int, tensor: str = "") -> int:
    """The integer rank of a ``rows x cols`` tensor for a recipe's ``rank`` value."""
    where = f"twin: tensor {tensor!r}" if tensor else "twin"
    _check_rank_value(value, where)
    full = min(rows, cols)
    if value <= 1:
        return max(1, min(full, int(math.floor(value * full + 0.5))))
    rank = int(value)
    if rank > full:
        raise RecipeError(f"{where}: rank {rank} exceeds the tensor's full rank {full} "
                          f"(shape {rows}x{cols}); use a smaller rank or a fraction <= 1")
    return rank


def validate_twin(recipe: Recipe, n_experts: int) -> None:
    shared_method_of(recipe)
    p = recipe.parameters
    others = p.get("others")
    if others is not None and (not isinstance(others, str) or others not in OTHERS):
        raise RecipeError(f"twin: others must be one of {', '.join(OTHERS)}, got {others!r}")
    scope = p.get("scope")
    if scope is not None:
        if not isinstance(scope, str):
            raise RecipeError("twin: scope must be one regular expression")
        compile_scope(scope, "twin: scope")
    if "rank" in p:
        for value in possible_values(p["rank"]):
            _check_rank_value(value, "twin")


# ----------------------------------------------------------------------------- builder


class TwinBuilder:
    """Per-tensor work of a twin store (see the module docstring)."""

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self.n = len(plan.inputs)
        params = plan.recipe.parameters
        self.inner = shared_method_of(plan.recipe)
        self.inner_names = [p.name for p in self.inner.params if p.name != "lambda"]
        self.others = str(params.get("others", "expert"))
        self.scope_text = str(params.get("scope", DEFAULT_SCOPE))
        self.scope = compile_scope(self.scope_text, "twin: scope")
        self.how: dict[str, int] = {"exact": 0, "randomized": 0, "lora_factors": 0}
        self.tensors: dict[str, dict[str, Any]] = {}
        self._lora = self._lora_inputs()

    def in_scope(self, job: TensorJob) -> bool:
        return len(job.out.shape) == 2 and self.scope.search(job.name) is not None

    def entry(self, job: TensorJob) -> TensorEntry:
        shape, dtype = job.out.shape, job.out.dtype
        if self.in_scope(job):
            rows, cols = shape
            r = resolve_rank(job.shared["rank"], rows, cols, job.name)
            pieces = [TensorInfo(piece_name(job.name, "shared"), shape, dtype)]
            for t in range(self.n):
                pieces.append(TensorInfo(piece_name(job.name, f"u.{t}"), (rows, r), dtype))
                pieces.append(TensorInfo(piece_name(job.name, f"v.{t}"), (r, cols), dtype))
            return TensorEntry(job.name, "twin", shape, dtype, tuple(pieces),
                               extra={"rank": r})
        if self.others == "expert":
            pieces = [TensorInfo(piece_name(job.name, expert_part(t)), shape, dtype)
                      for t in range(self.n)]
            pieces.append(TensorInfo(piece_name(job.name, "shared"), shape, dtype))
            return TensorEntry(job.name, "expert", shape, dtype, tuple(pieces))
        return merged_entry(job)

    def _inner_params(self, job: TensorJob) -> dict[str, Any]:
        p = {k: job.params[k] for k in self.inner_names}
        p["lambda"] = job.shared["shared_lambda"]
        return p

    def compute(self, job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        assert base is not None
        params = self._inner_params(job)
        shared = self.inner.fn(base, inputs, generator=generator, **params)
        if not self.in_scope(job):
            if self.others == "expert":
                out = {piece_name(job.name, expert_part(t)): x for t, x in enumerate(inputs)}
                out[piece_name(job.name, "shared")] = shared
                return out
            return {piece_name(job.name, "merged"): shared}
        rows, cols = job.out.shape
        r = resolve_rank(job.shared["rank"], rows, cols, job.name)
        out = {piece_name(job.name, "shared"): shared}
        lora = self._lora_products(job, base, params)
        num = den = 0.0
        how = "lora_factors" if lora is not None else ""
        for t, expert in enumerate(inputs):
            exclusive = expert - shared
            if lora is not None:
                left, right, right_qr = lora[0][t], lora[1], lora[2]
                u, s, vh = lowrank_svd_of_product(left, right, right_qr=right_qr)
            else:
                u, s, vh, how = truncated_svd(exclusive, r, generator)
            uf, vf = fit_factors(u, s, vh, r)
            num += float(torch.linalg.matrix_norm(exclusive - uf @ vf)) ** 2
            den += float(torch.linalg.matrix_norm(exclusive)) ** 2
            out[piece_name(job.name, f"u.{t}")] = uf
            out[piece_name(job.name, f"v.{t}")] = vf
            del exclusive
        self.how[how] += 1
        self.tensors[job.name] = {"rank": r, "full_rank": min(rows, cols),
                                  "error": math.sqrt(num / den) if den > 0 else 0.0,
                                  "svd": how}
        return out

    # -- LoRA experts
    def _lora_inputs(self) -> list[Any] | None:
        """The inputs, when all are LoRA adapters of the base and the shared method is plain
        task arithmetic (then every exclusive part is a product of stacked factors)."""
        if self.inner.name != "task_arithmetic" or self.plan.base is None:
            return None
        from polymerge.io.lora import LoraCheckpoint

        inputs = list(self.plan.inputs)
        if not inputs or not all(isinstance(c, LoraCheckpoint) and c.base is self.plan.base
                                 for c in inputs):
            return None
        return inputs

    def _lora_products(self, job: TensorJob, base: torch.Tensor, params: dict[str, Any]
                       ) -> tuple[list[torch.Tensor], torch.Tensor,
                                  tuple[torch.Tensor, torch.Tensor]] | None:
        """Per expert the left factor, the shared right factor and its QR, or None when the
        dense path applies (not all LoRA, a replaced tensor, not float32, not cheaper)."""
        if self._lora is None:
            return None
        base_info = self.plan.base.tensors().get(job.name) if self.plan.base else None
        if base_info is None or base_info.dtype != torch.float32:
            return None
        factors: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        for t, ckpt in enumerate(self._lora):
            if job.name in getattr(ckpt, "_full", {}):
                return None  # modules_to_save: the whole tensor is replaced, not low rank
            found = ckpt.lora_factors(job.name)
            if found is not None:
                b, a, scale = found
                factors.append((t, b.to(base.device, torch.float32),
                                a.to(base.device, torch.float32), float(scale)))
        rows, cols = job.out.shape
        k = sum(a.shape[0] for _, _, a, _ in factors)
        if 2 * k > min(rows, cols):
            return None
        weights = [float(w) for w in (params["weight"] if isinstance(params["weight"], list)
                                      else [params["weight"]] * self.n)]
        divisor = 1.0
        if params.get("normalize"):
            total = sum(weights)
            divisor = 1.0 if abs(total) < 1e-8 else total
        lam = float(params["lambda"])
        if k == 0:  # no adapter touches this tensor: every exclusive part is 0
            right = base.new_zeros(1, cols)
            left = [base.new_zeros(rows, 1) for _ in range(self.n)]
            return left, right, torch.linalg.qr(right.T)
        right = torch.cat([a for _, _, a, _ in factors], 0)
        right_qr = torch.linalg.qr(right.T)
        lefts = []
        for t in range(self.n):
            blocks = []
            for j, b, _, scale in factors:
                coeff = (1.0 if j == t else 0.0) - lam * weights[j] / divisor
                blocks.append(b * (coeff * scale))
            lefts.append(torch.cat(blocks, 1))
        return lefts, right, right_qr

    def finalize(self) -> dict[str, Any]:
        errors = [v["error"] for v in self.tensors.values()]
        worst = max(self.tensors, key=lambda k: self.tensors[k]["error"]) if errors else None
        return {"shared_method": self.inner.name, "others": self.others,
                "scope": self.scope_text, "twin_tensors": len(self.tensors),
                "svd": dict(self.how),
                "recon_error": {"mean": sum(errors) / len(errors) if errors else 0.0,
                                "max": max(errors) if errors else 0.0,
                                "max_tensor": worst,
                                "tensors": {k: {"rank": v["rank"],
                                                "error": round(v["error"], 6)}
                                            for k, v in self.tensors.items()}}}


# ----------------------------------------------------------------------------- the store


class TwinStore(Store):
    """A loaded twin store: expert t's ``twin`` tensor is ``shared + u_t @ v_t``."""

    method = "twin"
    serving = "mix"

    def factors(self, tensor: str, expert: str | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``expert``'s exclusive factors ``(u (rows, r), v (r, cols))`` of a tensor."""
        entry = self.entries[tensor]
        if entry.kind != "twin":
            raise PolymergeError(f"{tensor!r} has no low-rank factors (kind {entry.kind})")
        t = self.expert_index(expert)
        return (self.pieces[piece_name(tensor, f"u.{t}")],
                self.pieces[piece_name(tensor, f"v.{t}")])

    def rank_of(self, tensor: str) -> int:
        entry = self.entries[tensor]
        if entry.kind != "twin":
            raise PolymergeError(f"{tensor!r} has no low-rank factors (kind {entry.kind})")
        return int(entry.extra["rank"])

    def check_entry(self, entry: TensorEntry) -> str | None:
        have = {p.name: p.shape for p in entry.pieces}
        if entry.kind != "merged" and have.get(piece_name(entry.name, "shared")) != entry.shape:
            return "the shared model's piece is missing or not of the tensor's shape"
        if entry.kind != "twin":
            return super().check_entry(entry)
        rank = entry.extra.get("rank")
        if len(entry.shape) != 2 or have.get(piece_name(entry.name, "shared")) != entry.shape \
                or not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            return "a twin tensor needs a 2-D shared piece of its shape and an integer rank"
        rows, cols = entry.shape
        for t in range(len(self.experts)):
            if have.get(piece_name(entry.name, f"u.{t}")) != (rows, rank) \
                    or have.get(piece_name(entry.name, f"v.{t}")) != (rank, cols):
                return f"the factors of expert {t} are not ({rows}, {rank}) and ({rank}, {cols})"
        return None

    def _rebuild(self, entry: TensorEntry, expert: int) -> torch.Tensor:
        if entry.kind != "twin":
            return super()._rebuild(entry, expert)
        shared = self.pieces[piece_name(entry.name, "shared")]
        u, v = self.factors(entry.name, expert)
        return (shared.float() + u.float() @ v.float()).to(entry.dtype)

    def shared_tensor(self, name: str) -> torch.Tensor:
        """The shared model's tensor ``name`` (the shared merge; buffers as in the base)."""
        entry = self.entries[name]
        part = "merged" if entry.kind == "merged" else "shared"
        return self.pieces[piece_name(name, part)]

    def recon_error(self) -> dict[str, Any]:
        """The builder's reconstruction errors (``mean``, ``max``, ``max_tensor``, per tensor)."""
        return dict(self.manifest.get("summary", {}).get("recon_error", {}))

    def describe_extra(self) -> str:
        s = self.manifest.get("summary", {})
        p = self.manifest.get("parameters", {})
        ranks = sorted({int(e.extra["rank"]) for e in self.entries.values()
                        if e.kind == "twin"})
        err = s.get("recon_error", {})
        svd = s.get("svd", {})
        lines = [f"shared expert: {s.get('shared_method')} (lambda {p.get('shared_lambda')}), "
                 f"out-of-scope tensors: {s.get('others')}",
                 f"low-rank tensors: {s.get('twin_tensors', 0)}, rank "
                 f"{p.get('rank')} -> " + (f"{ranks[0]}" if len(ranks) == 1 else
                                           f"{ranks[0]}..{ranks[-1]}" if ranks else "none")
                 + " (SVD: " + ", ".join(f"{v} {k}" for k, v in svd.items() if v) + ")",
                 f"exclusive-part reconstruction error (relative Frobenius): mean "
                 f"{err.get('mean', float('nan')):.4f}, max {err.get('max', float('nan')):.4f}"
                 + (f" ({err['max_tensor']})" if err.get("max_tensor") else "")]
        return "\n".join(lines)



TWIN = register(StoreMethod(
    name="twin",
    description="Twin-Merging: a shared expert merged once plus each expert's exclusive "
                "knowledge as low-rank SVD factors, mixed per input by a router.",
    params=twin_params,
    make_builder=TwinBuilder,
    store_cls=TwinStore,
    validate=validate_twin,
    reference="https://arxiv.org/abs/2406.15479",
))
