"""Channel Merging (Zhang et al., AAAI 2025): merge only similar channels, look experts up.

For every weight matrix in scope and every output channel (row), the N experts' delta rows are
clustered into K groups by similarity, each group is merged with a static method of the
task-arithmetic family (TIES by default), and the store keeps the K merged rows per channel plus
an index ``expert x channel -> group``. Expert n is rebuilt by a gather of its rows.

Clustering, vectorized over all rows of a tensor at once: per row the N x N Gram matrix of the
delta rows (unit-normalized for ``cosine``, raw for ``euclidean``) gives the k-means objective of
any partition (within-group sum of squares = sum_i G_ii - sum_g (1/|g|) sum_{i,j in g} G_ij), so
when the number of partitions of N experts into K groups is small (N <= 8 or so, the common
case) every partition is scored and the exact k-means optimum is taken; beyond that, batched
kernel k-means from farthest-point seeds. Both are deterministic (ties go to the first
partition in lexicographic order, which labels groups by their lowest expert).

Merging within groups follows :func:`polymerge.methods.gta.gta_merge` step for step: each
expert's delta is sparsified over the whole tensor (TIES trim / DARE drop, drawing from the
engine's per-tensor generator in expert order) and weighted; then per group only members take
part in the sign election, the sum and the divisor. Hence K = 1 equals the plain merge with the
same method exactly, and K = N with density 1 and lambda 1 rebuilds every expert (to float
rounding; exactly once stored in a half-precision dtype).

Defaults (``preset``). The paper's setting (``preset: paper``: K = 2, TIES with 30% of each
delta trimmed, lambda 0.5, only the transformer blocks channel-merged) under-shoots on our
experts, for two reasons measured on the zoo (BENCHMARKS.md). (1) TIES's disjoint mean already
averages a group's deltas, so its lambda 0.5 halves them: a group of one expert gets half its
task vector, a group of agreeing experts half their common direction. Lambda 1 (with the
group method's mean, ``normalize: true``, so DARE-TIES groups average too) gives each group the
size of its members' deltas. (2) Keeping everything outside the blocks per expert costs most of
the saving on small models (MiniLM's embeddings are half of it: 0.77 of the ensemble at N = 4,
K = 2). So ``preset: polymerge`` (the default) channel-merges every 2-D weight (``scope: .``),
uses lambda 1 and a normalized group merge, and K = half the experts (``groups: 0.5``, rounded
up: 2 of 4, 3 of 6), which keeps a store near half the ensemble's size whatever N is; at K = 2
of 6 the within-group merges lose several points more (measured). Every value can still be set
one by one; ``preset`` only changes the defaults.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from polymerge.errors import PolymergeError, RecipeError
from polymerge.io.checkpoint import TensorInfo
from polymerge.methods.gta import mix_weighted, per_model
from polymerge.methods.schema import MergeMethod, Param, with_defaults
from polymerge.methods.sparsify import Sparsification, sparsify
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
    expert_entry,
    expert_part,
    merged_entry,
    piece_name,
)
from polymerge.stores.store import (
    Store,
)

DEFAULT_SCOPE = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+\."
"""The transformer blocks (``model.layers.3.``, ``encoder.layer.3.``, ``h.3.``); only tensors
with two or more dimensions are channel-merged."""
SIMILARITIES = ("cosine", "euclidean")
OTHERS = ("expert", "merged")
GROUP_METHODS = TASK_ARITHMETIC_FAMILY
BLOCKS_SCOPE = DEFAULT_SCOPE
PAPER_DEFAULTS = {"density": 0.7, "lambda": 0.5}
"""The paper's settings: 30% of each delta trimmed (TIES) or dropped (DARE), lambda 0.5."""
PRESETS: dict[str, dict[str, Any]] = {
    "polymerge": {"groups": 0.5, "scope": ".", "inner": {"density": 0.7, "lambda": 1.0,
                                                          "normalize": True}},
    "paper": {"groups": 2, "scope": BLOCKS_SCOPE, "inner": dict(PAPER_DEFAULTS)},
}
"""The defaults each ``preset`` gives (``inner``: the group method's parameters it has)."""
PAPER_SETTING: dict[str, Any] = {"preset": "paper"}
"""A recipe's parameters for the paper's setting (K = 2, TIES 0.7 / 0.5, blocks only)."""
MAX_PARTITIONS = 4096
"""Above this many partitions of N experts into K groups, kernel k-means replaces the exact
search."""
_CHUNK = 1 << 22

CHANNEL_PARAMS = (
    Param("preset", str, default="polymerge",
          help="defaults of the other parameters: polymerge (K = half the experts, every 2-D "
               "weight, lambda 1, group mean) | paper (K = 2, blocks only, density 0.7, "
               "lambda 0.5)"),
    Param("groups", float, default=0.5, low=0.0, low_open=True,
          help="K: merged rows kept per channel; < 1: a fraction of the experts, rounded up "
               "(0.5: half); >= 1: K itself (K = number of experts keeps every expert)"),
    Param("group_method", str, default="ties",
          help="static method merging each group: " + ", ".join(GROUP_METHODS)),
    Param("similarity", str, default="cosine", help="cosine | euclidean, between delta rows"),
    Param("scope", str, default=DEFAULT_SCOPE,
          help="regex of tensor names to channel-merge (2-D and larger tensors only)"),
    Param("others", str, default="expert",
          help="tensors out of scope: expert (one copy each) | merged (group_method over all)"),
)


# ----------------------------------------------------------------------------- clustering


def index_dtype(groups: int) -> torch.dtype:
    """The smallest integer dtype that holds group numbers 0..groups-1."""
    if groups <= 256:
        return torch.uint8
    if groups <= 2**15:
        return torch.int16
    return torch.int32


@functools.lru_cache(maxsize=64)
def stirling2(n: int, k: int) -> int:
    """Number of partitions of n items into k non-empty groups."""
    if n == k:
        return 1
    if k == 0 or k > n:
        return 0
    return k * stirling2(n - 1, k) + stirling2(n - 1, k - 1)


@functools.lru_cache(maxsize=64)
def partitions(n: int, k: int) -> torch.Tensor:
    """Every partition of n items into exactly k groups, as labels (P, n), lexicographic.

    Labels are restricted growth strings: item 0 is in group 0 and a new group gets the next
    number, so each partition appears once and groups are numbered by their lowest member.
    """
    out: list[list[int]] = []
    labels: list[int] = []

    def rec(i: int, used: int) -> None:
        if n - i < k - used:
            return
        if i == n:
            out.append(list(labels))
            return
        for g in range(min(used + 1, k)):
            labels.append(g)
            rec(i + 1, max(used, g + 1))
            labels.pop()

    rec(0, 0)
    return torch.tensor(out, dtype=torch.long).reshape(-1, n)


def row_gram(deltas: torch.Tensor, similarity: str) -> torch.Tensor:
    """Per-row Gram matrices (rows, N, N) of the experts' delta rows; deltas is (N, rows, ...)."""
    n, rows = deltas.shape[0], deltas.shape[1]
    x = deltas.reshape(n, rows, -1).transpose(0, 1)  # (rows, N, cols)
    if similarity == "cosine":
        x = x / x.norm(dim=2, keepdim=True).clamp_min(1e-12)
    elif similarity != "euclidean":
        raise RecipeError(f"channel: similarity must be one of {', '.join(SIMILARITIES)}, "
                          f"got {similarity!r}")
    return torch.bmm(x, x.transpose(1, 2))


def cluster_rows(deltas: torch.Tensor, groups: int, similarity: str = "cosine") -> torch.Tensor:
    """Group assignment (N, rows) of every expert's delta row, k-means by ``similarity``."""
    n, rows = deltas.shape[0], deltas.shape[1]
    if groups < 1:
        raise RecipeError("channel: groups must be at least 1")
    if groups > n:
        raise RecipeError(f"channel: groups={groups} exceeds the number of experts ({n})")
    device = deltas.device
    if groups == n:
        return torch.arange(n, device=device).unsqueeze(1).expand(n, rows).contiguous()
    if groups == 1:
        return torch.zeros((n, rows), dtype=torch.long, device=device)
    gram = row_gram(deltas, similarity)
    if stirling2(n, groups) <= MAX_PARTITIONS:
        return _exact_kmeans(gram, groups)
    return _kernel_kmeans(gram, groups)


def _exact_kmeans(gram: torch.Tensor, k: int) -> torch.Tensor:
    """The partition maximizing sum_g (1/|g|) sum_{i,j in g} G_ij, per row (k-means optimum)."""
    rows, n, _ = gram.shape
    device = gram.device
    parts = partitions(n, k).to(device)  # (P, n)
    bits = 1 << torch.arange(n, device=device)
    # subset id of every (partition, group): the bitmask of its members
    onehot = torch.nn.functional.one_hot(parts, k)  # (P, n, k)
    table = (onehot * bits[None, :, None]).sum(1)  # (P, k)
    subsets = torch.arange(1 << n, device=device)
    member = ((subsets[:, None] & bits[None, :]) > 0).to(gram.dtype)  # (S, n)
    size = member.sum(1).clamp_min(1)
    pair = (member[:, :, None] * member[:, None, :]).reshape(1 << n, n * n) / size[:, None]
    values = gram.reshape(rows, n * n) @ pair.T  # (rows, S)
    best = torch.empty(rows, dtype=torch.long, device=device)
    step = max(1, _CHUNK // (table.numel()))
    for start in range(0, rows, step):
        chunk = values[start:start + step]
        best[start:start + step] = chunk[:, table].sum(-1).argmax(dim=1)
    return parts[best].T.contiguous()


def _kernel_kmeans(gram: torch.Tensor, k: int, iterations: int = 50) -> torch.Tensor:
    """Batched kernel k-means on per-row Gram matrices, farthest-point seeded."""
    rows, n, _ = gram.shape
    device = gram.device
    diag = gram.diagonal(dim1=1, dim2=2)  # (rows, n)
    dist = (diag[:, :, None] + diag[:, None, :] - 2 * gram).clamp_min(0)  # (rows, n, n)
    arange_rows = torch.arange(rows, device=device)
    centers = [dist.sum(-1).argmin(-1)]
    nearest = dist[arange_rows, centers[0]]
    for _ in range(1, k):
        c = nearest.argmax(-1)
        centers.append(c)
        nearest = torch.minimum(nearest, dist[arange_rows, c])
    c_idx = torch.stack(centers, 1)  # (rows, k)
    to_centers = dist.gather(1, c_idx[:, :, None].expand(rows, k, n)).transpose(1, 2)
    assign = to_centers.argmin(-1)
    assign.scatter_(1, c_idx, torch.arange(k, device=device).expand(rows, k).contiguous())
    for _ in range(iterations):
        a = torch.nn.functional.one_hot(assign, k).to(gram.dtype)  # (rows, n, k)
        count = a.sum(1)  # (rows, k)
        ga = torch.bmm(gram, a)  # (rows, n, k)
        aga = (a * ga).sum(1)  # (rows, k)
        safe = count.clamp_min(1)
        d = diag[:, :, None] - 2 * ga / safe[:, None, :] + (aga / safe**2)[:, None, :]
        d = torch.where(count[:, None, :] > 0, d, torch.full_like(d, math.inf))
        new = d.argmin(-1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign.T.contiguous()


# ----------------------------------------------------------------------------- group merge


MAX_PATTERNS = 256
"""Up to this many distinct row labelings, rows are merged pattern by pattern (gathered
sub-stacks); beyond it (kernel k-means on many experts), with per-group masks."""


def group_merge(base: torch.Tensor, experts: Sequence[torch.Tensor], assignment: torch.Tensor,
                groups: int, *, generator: torch.Generator | None = None,
                sparsification: Sparsification | None = None, consensus: bool = False,
                weight: Any = 1.0, density: Any = 1.0, normalize: bool = False,
                rescale: bool = False, lam: float = 1.0, gamma: Any = 0.01,
                epsilon: Any = 0.15, deltas: torch.Tensor | None = None) -> torch.Tensor:
    """The K merged versions (K, *shape) of one tensor: group g of row r merges the experts n
    with ``assignment[n, r] == g``, exactly as ``gta_merge`` would merge them alone.

    ``deltas``: the experts' raw deltas ``expert - base`` (N, *shape), when already computed.
    Rows sharing one labeling of the experts (a handful of patterns when N is small) are
    merged together: per pattern and group, the members' rows are gathered and mixed by the
    same operations as ``gta_merge``, so the work is one pass over the experts, not K.
    """
    base = base.float()
    n = len(experts)
    weights = per_model(weight, n, "weight")
    densities = per_model(density, n, "density")
    gammas = per_model(gamma, n, "gamma")
    epsilons = per_model(epsilon, n, "epsilon")
    weighted = []
    for i in range(n):  # as gta_merge: thinned over the whole tensor, in expert order
        if deltas is not None:
            delta = deltas[i] if sparsification is not None else deltas[i].clone()
        else:
            delta = experts[i].float() - base
        if sparsification is not None:
            delta = sparsify(delta, sparsification, density=densities[i], rescale=rescale,
                             generator=generator, gamma=gammas[i], epsilon=epsilons[i])
        weighted.append(delta.mul_(weights[i]))
    out = torch.empty((groups, *base.shape), dtype=torch.float32, device=base.device)
    patterns, inverse = torch.unique(assignment.T, dim=0, return_inverse=True)
    if len(patterns) > MAX_PATTERNS:
        _merge_by_masks(out, base, weighted, weights, assignment, consensus, normalize, lam)
        return out
    whole = len(patterns) == 1
    for p, pattern in enumerate(patterns.tolist()):
        rows = None if whole else (inverse == p).nonzero().squeeze(1)
        sub_base = base if rows is None else base.index_select(0, rows)
        for g in range(groups):
            members = [i for i in range(n) if pattern[i] == g]
            if not members:  # an empty group (kernel k-means only): never looked up
                merged = sub_base
            else:
                ds = [weighted[i] if rows is None else weighted[i].index_select(0, rows)
                      for i in members]
                # The plain merge's own mix step, so K = 1 is bit for bit the plain merge.
                merged = mix_weighted(sub_base, ds, [weights[i] for i in members],
                                      consensus=consensus, normalize=normalize, lam=lam)
            if rows is None:
                out[g] = merged
            else:
                out[g].index_copy_(0, rows, merged)
    return out


def _merge_by_masks(out: torch.Tensor, base: torch.Tensor, weighted: Sequence[torch.Tensor],
                    weights: Sequence[float], assignment: torch.Tensor, consensus: bool,
                    normalize: bool, lam: float) -> None:
    """The same mix with non-members masked to zero: a zero agrees with neither sign and adds
    nothing; without consensus the divisor is the members' weight, row by row."""
    rows = assignment.shape[1]
    tail = [1] * (base.dim() - 1)
    for g in range(out.shape[0]):
        member = (assignment == g).reshape(len(weighted), rows, *tail)
        masked = [d * member[i] for i, d in enumerate(weighted)]
        if consensus:
            out[g] = mix_weighted(base, masked, weights, consensus=True, normalize=normalize,
                                  lam=lam)
            continue
        mixed = masked[0].clone()
        for delta in masked[1:]:
            mixed.add_(delta)
        divisor = sum(w * member[i].to(base.dtype) for i, w in enumerate(weights))
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
        if normalize:
            mixed = mixed.div_(divisor)
        out[g] = base + mixed.mul_(lam)


def _gta_spec(method: MergeMethod) -> tuple[Sparsification | None, bool]:
    sp = method.extra.get("sparsification")
    return (Sparsification(sp) if sp else None), method.extra.get("consensus") == "sum"


def group_method_of(recipe: Recipe) -> MergeMethod:
    return inner_method(recipe, "group_method", "ties", "channel")


def preset_of(recipe: Recipe) -> dict[str, Any]:
    """The defaults of the recipe's ``preset`` (checked)."""
    name = recipe.parameters.get("preset", "polymerge")
    if not isinstance(name, str) or name not in PRESETS:
        raise RecipeError(f"channel: preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def channel_params(recipe: Recipe) -> tuple[Param, ...]:
    inner = group_method_of(recipe)
    preset = preset_of(recipe)
    own = with_defaults(CHANNEL_PARAMS, groups=preset["groups"], scope=preset["scope"])
    names = {q.name for q in inner.params}
    return own + with_defaults(inner.params, **{k: v for k, v in preset["inner"].items()
                                                if k in names})


def resolve_groups(value: Any, n_experts: int, tensor: str = "") -> int:
    """K for a recipe's ``groups`` value: a fraction < 1 of the experts (rounded up, at least
    1) or an integer >= 1."""
    where = f"channel: tensor {tensor!r}" if tensor else "channel"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value <= 0:
        raise RecipeError(f"{where}: groups must be a fraction in (0, 1) or an integer >= 1, "
                          f"got {value!r}")
    if value < 1:
        return max(1, math.ceil(value * n_experts - 1e-9))
    if int(value) != value:
        raise RecipeError(f"{where}: groups={value!r} is neither a fraction < 1 nor an integer")
    return int(value)


def validate_channel(recipe: Recipe, n_experts: int) -> None:
    group_method_of(recipe)
    preset_of(recipe)
    p = recipe.parameters
    for key, choices in (("similarity", SIMILARITIES), ("others", OTHERS)):
        value = p.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or value not in choices:
            raise RecipeError(f"channel: {key} must be one of {', '.join(choices)}, got "
                              f"{value!r}")
    scope = p.get("scope")
    if scope is not None:
        if not isinstance(scope, str):
            raise RecipeError("channel: scope must be one regular expression")
        compile_scope(scope, "channel: scope")
    for value in possible_values(p.get("groups", preset_of(recipe)["groups"])):
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and n_experts and value > n_experts:
            raise RecipeError(f"channel: groups={value:g} exceeds the number of experts "
                              f"({n_experts}); K = {n_experts} already keeps every expert")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            resolve_groups(value, max(1, n_experts))


# ----------------------------------------------------------------------------- builder


class ChannelBuilder:
    """Per-tensor work of a channel store (see the module docstring)."""

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self.n = len(plan.inputs)
        params = plan.recipe.parameters
        self.inner = group_method_of(plan.recipe)
        self.sparsification, self.consensus = _gta_spec(self.inner)
        self.similarity = str(params.get("similarity", "cosine"))
        self.others = str(params.get("others", "expert"))
        self.preset = str(params.get("preset", "polymerge"))
        self.scope = compile_scope(str(params.get("scope", PRESETS[self.preset]["scope"])),
                                   "channel: scope")
        self.inner_names = [p.name for p in self.inner.params]
        self._co = torch.zeros((self.n, self.n), dtype=torch.float64)
        self._rows = 0
        self._group_rows: dict[int, int] = {}

    def in_scope(self, job: TensorJob) -> bool:
        return len(job.out.shape) >= 2 and self.scope.search(job.name) is not None

    def entry(self, job: TensorJob) -> TensorEntry:
        if self.in_scope(job):
            k = resolve_groups(job.shared["groups"], self.n, job.name)
            if k > self.n:
                raise RecipeError(f"channel: groups={k} for {job.name!r} exceeds the number "
                                  f"of experts ({self.n})")
            rows = job.out.shape[0]
            pieces = (TensorInfo(piece_name(job.name, "groups"), (k, *job.out.shape),
                                 job.out.dtype),
                      TensorInfo(piece_name(job.name, "index"), (self.n, rows),
                                 index_dtype(k)))
            return TensorEntry(job.name, "channel", job.out.shape, job.out.dtype, pieces,
                               index=(pieces[1].name,), extra={"groups": k})
        if self.others == "expert":
            return expert_entry(job, self.n)
        return merged_entry(job)

    def _inner_params(self, job: TensorJob) -> dict[str, Any]:
        return {k: job.params[k] for k in self.inner_names}

    def compute(self, job: TensorJob, base: torch.Tensor | None, inputs: list[torch.Tensor],
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        assert base is not None
        entry_kind = "channel" if self.in_scope(job) else self.others
        if entry_kind == "expert":
            return {piece_name(job.name, expert_part(i)): t for i, t in enumerate(inputs)}
        params = self._inner_params(job)
        if entry_kind == "merged":
            return {piece_name(job.name, "merged"):
                    self.inner.fn(base, inputs, generator=generator, **params)}
        k = resolve_groups(job.shared["groups"], self.n, job.name)
        deltas = torch.stack([t - base for t in inputs])
        assignment = cluster_rows(deltas, k, self.similarity)
        p = {**{q.name: q.default for q in self.inner.params}, **params}
        merged = group_merge(base, inputs, assignment, k, generator=generator,
                             sparsification=self.sparsification, consensus=self.consensus,
                             weight=p["weight"], density=p.get("density", 1.0),
                             normalize=p["normalize"], rescale=p.get("rescale", False),
                             lam=p["lambda"], gamma=p.get("gamma", 0.01),
                             epsilon=p.get("epsilon", 0.15), deltas=deltas)
        del deltas
        same = (assignment[:, None, :] == assignment[None, :, :]).sum(-1)
        self._co += same.to("cpu", torch.float64)
        self._rows += assignment.shape[1]
        self._group_rows[k] = self._group_rows.get(k, 0) + assignment.shape[1]
        return {piece_name(job.name, "groups"): merged,
                piece_name(job.name, "index"): assignment.to(index_dtype(k))}

    def finalize(self) -> dict[str, Any]:
        names = self.plan.input_names
        co = (self._co / max(1, self._rows)).tolist()
        return {"preset": self.preset, "group_method": self.inner.name,
                "similarity": self.similarity,
                "others": self.others, "channel_rows": self._rows,
                "rows_by_groups": {str(k): v for k, v in sorted(self._group_rows.items())},
                "co_membership": {"experts": names,
                                  "fraction": [[round(v, 4) for v in r] for r in co]}}


# ----------------------------------------------------------------------------- the store


class ChannelStore(Store):
    """A loaded channel store: expert n's channel tensor is ``groups[index[n, r], r]``."""

    method = "channel"

    def _flat_index(self, entry: TensorEntry, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        groups = self.pieces[piece_name(entry.name, "groups")]
        index = self.pieces[piece_name(entry.name, "index")]
        rows = entry.shape[0]
        flat = groups.reshape(groups.shape[0] * rows, -1)
        pick = index[expert].long() * rows + torch.arange(rows, device=index.device)
        return flat, pick

    def check_entry(self, entry: TensorEntry) -> str | None:
        if entry.kind != "channel":
            return super().check_entry(entry)
        have = {p.name: p for p in entry.pieces}
        groups = have.get(piece_name(entry.name, "groups"))
        index = have.get(piece_name(entry.name, "index"))
        if groups is None or index is None:
            return "a channel tensor needs its groups and index pieces"
        if not entry.shape or len(groups.shape) != len(entry.shape) + 1 \
                or groups.shape[1:] != entry.shape or groups.shape[0] < 1:
            return f"groups {list(groups.shape)} do not fit the shape {list(entry.shape)}"
        if index.shape != (len(self.experts), entry.shape[0]) \
                or index.dtype.is_floating_point or index.dtype == torch.bool:
            return f"index {list(index.shape)} {index.dtype} is not (experts, rows) integers"
        values = self.pieces[index.name]
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= groups.shape[0]):
            return "the index names a group that is not stored"
        return None

    def _rebuild(self, entry: TensorEntry, expert: int) -> torch.Tensor:
        if entry.kind != "channel":
            return super()._rebuild(entry, expert)
        flat, pick = self._flat_index(entry, expert)
        return flat.index_select(0, pick).reshape(entry.shape)

    def _write_into(self, target: torch.Tensor, entry: TensorEntry, expert: int,
                    previous: int | None = None) -> None:
        if entry.kind != "channel":
            super()._write_into(target, entry, expert, previous)
            return
        flat, pick = self._flat_index(entry, expert)
        direct = (target.dtype == flat.dtype and target.device == flat.device
                  and target.is_contiguous())
        if previous is not None and direct:
            # Rows where both experts look up the same group already hold the right values.
            index = self.pieces[piece_name(entry.name, "index")]
            changed = (index[expert] != index[previous]).nonzero().squeeze(1)
            if changed.numel() == 0:
                return
            if changed.numel() * 2 < entry.shape[0]:
                rows = target.view(entry.shape[0], -1)
                rows.index_copy_(0, changed, flat.index_select(0, pick.index_select(0,
                                                                                  changed)))
                return
        if direct:
            torch.index_select(flat, 0, pick, out=target.view(entry.shape[0], -1))
        else:
            target.copy_(flat.index_select(0, pick).reshape(entry.shape))

    def groups_of(self, tensor: str) -> torch.Tensor:
        """The (N, rows) group index of a channel-merged tensor."""
        entry = self.entries[tensor]
        if entry.kind != "channel":
            raise PolymergeError(f"{tensor!r} is not channel-merged (kind {entry.kind})")
        return self.pieces[piece_name(tensor, "index")]

    def describe_extra(self) -> str:
        s = self.manifest.get("summary", {})
        co = s.get("co_membership")
        lines = [f"group method: {s.get('group_method')}, similarity: {s.get('similarity')}, "
                 f"out-of-scope tensors: {s.get('others')}",
                 f"channel-merged rows: {s.get('channel_rows', 0):,}"]
        if co:
            names = co["experts"]
            width = max(8, *(len(x) for x in names))
            lines.append("fraction of channels where two experts share a group:")
            lines.append(" " * (width + 2) + " ".join(f"{x[:width]:>{width}}" for x in names))
            for name, row in zip(names, co["fraction"], strict=True):
                lines.append(f"  {name[:width]:<{width}}" + " ".join(f"{v:>{width}.2f}"
                                                                     for v in row))
        return "\n".join(lines)


CHANNEL = register(StoreMethod(
    name="channel",
    description="Channel Merging: per output channel, cluster the experts' delta rows into K "
                "groups and merge within each group; experts are rebuilt by lookup.",
    params=channel_params,
    make_builder=ChannelBuilder,
    store_cls=ChannelStore,
    validate=validate_channel,
    reference="https://arxiv.org/abs/2412.15283",
))
