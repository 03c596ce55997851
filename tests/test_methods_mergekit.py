"""The merge methods ported from mergekit 0.1.5 (nuslerp, multislerp, karcher, sce, ram,
ramplus_tl, arcee_fusion, nearswap, passthrough) and whole-tensor slerp.

Each method is checked against a reference written here from its definition, in plain Python
floats (lists, ``math``), sharing no code with the implementation; then edge cases (one model,
identical models, t = 0 and 1, weights summing to zero, zero vectors, 1-d and 2-d tensors);
then a few recipes through the real pipeline (``polymerge.merge`` on tiny Llama checkpoints),
each output tensor compared with the same references.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from conftest import load_state
from torch.testing import assert_close

import polymerge
from polymerge.errors import RecipeError
from polymerge.methods.schema import REQUIRED, BasePolicy
from polymerge.registry import get_tensor_method

NEW = ["nuslerp", "multislerp", "karcher", "sce", "ram", "ramplus_tl", "arcee_fusion",
       "nearswap", "passthrough"]
OPTIONAL_BASE = "optional" in get_args(BasePolicy)
needs_optional_base = pytest.mark.skipif(
    not OPTIONAL_BASE, reason="the plan does not pass an optional base yet (BasePolicy)")


# --------------------------------------------------------------------------- helpers


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape: Sequence[int], seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(tuple(shape), generator=gen(seed), dtype=torch.float32)


def merge(name: str, base: torch.Tensor | None, experts: list[torch.Tensor], seed: int = 0,
          **params: Any) -> torch.Tensor:
    return get_tensor_method(name).fn(base, experts, generator=gen(seed), **params)


def vec(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.reshape(-1).tolist()]


def tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(like.shape)


def dot(u: Sequence[float], v: Sequence[float]) -> float:
    return math.fsum(a * b for a, b in zip(u, v, strict=True))


def norm(u: Sequence[float]) -> float:
    return math.sqrt(dot(u, u))


def clamp(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))


def combo(ca: float, u: Sequence[float], cb: float, v: Sequence[float]) -> list[float]:
    return [ca * a + cb * b for a, b in zip(u, v, strict=True)]


def sub(u: Sequence[float], v: Sequence[float]) -> list[float]:
    return [a - b for a, b in zip(u, v, strict=True)]


def add(u: Sequence[float], v: Sequence[float]) -> list[float]:
    return [a + b for a, b in zip(u, v, strict=True)]


def rows(x: torch.Tensor) -> list[list[float]]:
    return [vec(r) for r in x]


def experts_around(base: torch.Tensor, n: int, seed: int, scale: float = 0.3) -> list[torch.Tensor]:
    return [base + randn(base.shape, seed + 10 + i, scale) for i in range(n)]


SHAPES = [(4, 6), (7,)]


# --------------------------------------------------------------------------- metadata


MERGEKIT_PARAMS: dict[str, dict[str, Any]] = {
    "nuslerp": {"weight": REQUIRED, "nuslerp_row_wise": False, "nuslerp_flatten": True},
    "multislerp": {"weight": REQUIRED, "normalize_weights": True, "eps": 1e-8},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "sce": {"select_topk": 1.0},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    "arcee_fusion": {},
    "nearswap": {"t": REQUIRED},
    "passthrough": {"scale": None},
    "slerp": {"t": REQUIRED},
}
PER_MODEL = {("nuslerp", "weight"), ("multislerp", "weight"), ("passthrough", "scale")}
EXPERTS = {"nuslerp": (2, 2), "multislerp": (1, None), "karcher": (1, None), "sce": (1, None),
           "ram": (1, None), "ramplus_tl": (1, None), "arcee_fusion": (1, 1),
           "nearswap": (1, 1), "passthrough": (1, 1), "slerp": (1, 1)}
BASE = {"nuslerp": "optional", "multislerp": "optional", "karcher": "input", "sce": "required",
        "ram": "required", "ramplus_tl": "required", "arcee_fusion": "required",
        "nearswap": "required", "passthrough": "input", "slerp": "required"}


@pytest.mark.parametrize("name", sorted(MERGEKIT_PARAMS))
def test_parameters_and_defaults_are_mergekits(name: str) -> None:
    m = get_tensor_method(name)
    assert {p.name: p.default for p in m.params} == MERGEKIT_PARAMS[name]
    for p in m.params:
        assert p.scope == ("per_model" if (name, p.name) in PER_MODEL else "shared")
    assert (m.min_experts, m.max_experts) == EXPERTS[name]
    assert m.base_policy == BASE[name]
    assert m.random == (name == "arcee_fusion")
    assert m.description and "\n" not in m.description
    assert m.reference.startswith("https://")


@pytest.mark.parametrize("name", NEW)
def test_registered(name: str) -> None:
    assert get_tensor_method(name).name == name


# --------------------------------------------------------------------------- slerp


def ref_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SLERP of the two tensors as single vectors (norms <= 1e-8 count as 1)."""
    x, y = vec(a), vec(b)
    nx = norm(x) if norm(x) > 1e-8 else 1.0
    ny = norm(y) if norm(y) > 1e-8 else 1.0
    c = clamp(dot(x, y) / (nx * ny), -1.0, 1.0)
    if abs(c) > 0.9995:
        ca, cb = 1 - t, t
    else:
        th = math.acos(c)
        ca, cb = math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)
    return tensor(combo(ca, x, cb, y), a)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(4, 6), (10,), (), (2, 3, 4)])
def test_slerp_is_over_the_whole_tensor(t: float, shape: tuple[int, ...]) -> None:
    a, b = randn(shape, 1), randn(shape, 2)
    assert_close(merge("slerp", a, [b], t=t), ref_slerp(t, a, b))


def test_slerp_is_not_row_by_row() -> None:
    # Rows at different angles: a row-by-row SLERP gives each row its own coefficients.
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.1]])
    out = merge("slerp", a, [b], t=0.5)
    assert_close(out, ref_slerp(0.5, a, b))
    th = math.acos(0.5 * (1.0 + 1.0) / (math.sqrt(2) * math.sqrt(2.01)))
    c = math.sin(0.5 * th) / math.sin(th)
    assert out[0, 0] == pytest.approx(c, rel=1e-6)  # one coefficient for every row
    assert out[0, 0] != pytest.approx(math.sqrt(0.5), rel=1e-3)  # row 0's own SLERP


def test_slerp_endpoints_and_degenerate_pairs() -> None:
    a, b = randn((5, 3), 1), randn((5, 3), 2)
    assert torch.equal(merge("slerp", a, [b], t=0.0), a)
    assert torch.equal(merge("slerp", a, [b], t=1.0), b)
    assert_close(merge("slerp", a, [a.clone()], t=0.4), a)  # identical models
    assert_close(merge("slerp", a, [2 * a], t=0.25), 1.25 * a)  # collinear: linear
    assert_close(merge("slerp", a, [-a], t=0.25), 0.5 * a)  # antipodal: linear
    zero = torch.zeros(5, 3)
    assert_close(merge("slerp", zero, [b], t=0.3), ref_slerp(0.3, zero, b))


# --------------------------------------------------------------------------- nuslerp


def ref_nuslerp_vec(t: float, x: list[float], y: list[float]) -> list[float]:
    nx, ny = max(norm(x), 1e-7), max(norm(y), 1e-7)
    c = clamp(dot(x, y) / (nx * ny), -1.0, 1.0)
    if 1 - c * c <= 1e-16:
        return combo(1 - t, x, t, y)
    th = math.acos(c)
    return combo(math.sin((1 - t) * th) / math.sin(th), x, math.sin(t * th) / math.sin(th), y)


def ref_nuslerp(weights: Sequence[float], a: torch.Tensor, b: torch.Tensor,
                base: torch.Tensor | None = None, *, row_wise: bool = False,
                flatten: bool = True) -> torch.Tensor:
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is not None:
        out = ref_nuslerp(weights, a - base, b - base, row_wise=row_wise, flatten=flatten)
        return tensor(add(vec(out), vec(base)), a)
    if flatten or a.dim() < 2:
        return tensor(ref_nuslerp_vec(t, vec(a), vec(b)), a)
    if row_wise:  # columns
        cols = [ref_nuslerp_vec(t, vec(a[:, j]), vec(b[:, j])) for j in range(a.shape[1])]
        return torch.tensor(cols, dtype=torch.float32).T.contiguous()
    return torch.tensor([ref_nuslerp_vec(t, vec(a[i]), vec(b[i])) for i in range(a.shape[0])],
                        dtype=torch.float32)


@pytest.mark.parametrize("shape,flatten,row_wise", [
    ((4, 6), True, False), ((4, 6), False, False), ((4, 6), False, True),
    ((7,), True, False), ((7,), False, False), ((7,), False, True), ((2, 3, 4), True, False)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_reference(shape: tuple[int, ...], flatten: bool, row_wise: bool,
                           with_base: bool) -> None:
    base = randn(shape, 0)
    a, b = experts_around(base, 2, 1)
    w = [0.7, 1.6]
    out = merge("nuslerp", base if with_base else None, [a, b], weight=w,
                nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    want = ref_nuslerp(w, a, b, base if with_base else None, row_wise=row_wise, flatten=flatten)
    assert_close(out, want)


def test_nuslerp_rows_and_columns_differ_from_whole() -> None:
    a, b = randn((4, 6), 1), randn((4, 6), 2)
    whole = merge("nuslerp", None, [a, b], weight=[1.0, 1.0])
    rows_ = merge("nuslerp", None, [a, b], weight=[1.0, 1.0], nuslerp_flatten=False)
    cols = merge("nuslerp", None, [a, b], weight=[1.0, 1.0], nuslerp_flatten=False,
                 nuslerp_row_wise=True)
    assert (whole - rows_).abs().max() > 1e-3
    assert (rows_ - cols).abs().max() > 1e-3
    # row_wise without flatten=false does nothing: flatten wins, as in mergekit.
    assert_close(merge("nuslerp", None, [a, b], weight=[1.0, 1.0], nuslerp_row_wise=True), whole)


@pytest.mark.parametrize("weights", [[1.0, -1.0], [-2.5, 2.5], [0.5, -0.5 + 1e-7]])
def test_nuslerp_weights_summing_to_zero_give_the_midpoint(weights: list[float]) -> None:
    base = randn((3, 5), 0)
    a, b = experts_around(base, 2, 3)
    out = merge("nuslerp", base, [a, b], weight=weights)
    assert_close(out, ref_nuslerp([1.0, 1.0], a, b, base))
    assert_close(out, merge("nuslerp", base, [a, b], weight=[3.0, 3.0]))


def test_nuslerp_edges() -> None:
    a, b = randn((3, 4), 1), randn((3, 4), 2)
    assert_close(merge("nuslerp", None, [a, b], weight=[1.0, 0.0]), a)  # t = 0
    assert_close(merge("nuslerp", None, [a, b], weight=[0.0, 2.0]), b)  # t = 1
    assert_close(merge("nuslerp", None, [a, a.clone()], weight=[1.0, 3.0]), a)  # identical
    assert_close(merge("nuslerp", None, [a, 3 * a], weight=[1.0, 1.0]), 2 * a)  # collinear
    # A zero vector has cos theta = 0 with anything: the result follows the sine weights.
    zero = torch.zeros(3, 4)
    assert_close(merge("nuslerp", None, [zero, b], weight=[1.0, 1.0]),
                 math.sin(math.pi / 4) * b)
    with pytest.raises(RecipeError):
        merge("nuslerp", None, [a], weight=[1.0])
    with pytest.raises(RecipeError):
        merge("nuslerp", None, [a, b, a], weight=[1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- multislerp


def ref_multislerp(weights: Sequence[float], xs: list[torch.Tensor],
                   base: torch.Tensor | None = None, normalize: bool = True,
                   eps: float = 1e-8) -> torch.Tensor:
    like = xs[0]
    if len(xs) == 1:
        return xs[0].clone()
    vs = [vec(x) if base is None else sub(vec(x), vec(base)) for x in xs]
    w = list(weights)
    if normalize:
        s = sum(w)
        w = [v / s for v in w]
    norms = [norm(v) for v in vs]
    units = [[c / (r + eps) for c in v] for v, r in zip(vs, norms, strict=True)]
    dim = len(vs[0])
    mean = [math.fsum(w[i] * units[i][j] for i in range(len(vs))) for j in range(dim)]
    mn = norm(mean)
    if mn < eps:
        assert len(vs) == 2
        out = combo(w[0], vs[0], w[1], vs[1])
    else:
        mean = [c / mn for c in mean]
        tangent = [0.0] * dim
        for wi, u in zip(w, units, strict=True):
            d = dot(u, mean)
            tangent = add(tangent, [wi * (uj - d * mj) for uj, mj in zip(u, mean, strict=True)])
        tn = norm(tangent) + eps
        out = combo(math.cos(tn), mean, math.sin(tn) / tn, tangent)
        scale = math.fsum(wi * r for wi, r in zip(w, norms, strict=True))
        out = [scale * c for c in out]
    if base is not None:
        out = add(out, vec(base))
    return tensor(out, like)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_reference(shape: tuple[int, ...], with_base: bool, normalize: bool,
                              chunking: str) -> None:
    base = randn(shape, 0)
    xs = experts_around(base, 3, 4)
    w = [0.2, 0.5, 0.3] if normalize else [0.4, 1.0, 0.6]
    out = merge("multislerp", base if with_base else None, xs, weight=w,
                normalize_weights=normalize)
    assert_close(out, ref_multislerp(w, xs, base if with_base else None, normalize))


def test_multislerp_edges(chunking: str) -> None:
    base = randn((3, 4), 0)
    x, y = experts_around(base, 2, 5)
    assert torch.equal(merge("multislerp", base, [x], weight=[2.0]), x)  # one model
    assert_close(merge("multislerp", None, [x, x.clone(), x.clone()], weight=[1.0, 2.0, 3.0]),
                 x)  # identical models
    # Two opposite models, equal weights: the directions' mean vanishes -> linear mix (zero).
    assert torch.equal(merge("multislerp", None, [y, -y], weight=[1.0, 1.0]), torch.zeros(3, 4))
    assert_close(merge("multislerp", None, [y, -y], weight=[1.0, 1.0], normalize_weights=False),
                 torch.zeros(3, 4))
    # Three directions that cancel out have no barycentre.
    e = [torch.tensor([1.0, 0.0]), torch.tensor([-0.5, math.sqrt(3) / 2]),
         torch.tensor([-0.5, -math.sqrt(3) / 2])]
    with pytest.raises(RecipeError, match="zero"):
        merge("multislerp", None, e, weight=[1.0, 1.0, 1.0])
    # Weights summing to zero cannot be normalized: refused before any tensor.
    check = get_tensor_method("multislerp").check_params
    assert check is not None
    with pytest.raises(RecipeError, match="sum to 0"):
        check({"weight": [1.0, -1.0], "normalize_weights": True, "eps": 1e-8})
    check({"weight": [1.0, -1.0], "normalize_weights": False, "eps": 1e-8})


# --------------------------------------------------------------------------- karcher


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x)


@pytest.mark.parametrize("shape", SHAPES)
def test_karcher_of_two_is_the_geodesic_midpoint(shape: tuple[int, ...], chunking: str) -> None:
    a, b = randn(shape, 1), 3 * randn(shape, 2)
    out = merge("karcher", None, [a, b])
    ua, ub = vec(unit(a)), vec(unit(b))
    mid = add(ua, ub)
    mid = [c / norm(mid) for c in mid]
    scale = (norm(vec(a)) + norm(vec(b))) / 2
    assert_close(out, tensor([scale * c for c in mid], a), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_karcher_mean_is_a_critical_point(shape: tuple[int, ...], chunking: str) -> None:
    """The defining property: the mean of the log maps at the result vanishes."""
    xs = [randn(shape, s) + 0.8 for s in range(4)]
    out = merge("karcher", None, xs, max_iter=100, tol=1e-7)
    m = vec(unit(out))
    grad = [0.0] * len(m)
    for x in xs:
        u = vec(unit(x))
        c = clamp(dot(u, m), -1.0, 1.0)
        th = math.acos(c)
        grad = add(grad, [th / math.sin(th) * (ui - c * mi) / len(xs)
                          for ui, mi in zip(u, m, strict=True)])
    assert norm(grad) < 1e-4
    assert float(torch.linalg.vector_norm(out)) == pytest.approx(
        sum(norm(vec(x)) for x in xs) / len(xs), rel=1e-5)


def test_karcher_start_and_edges(chunking: str) -> None:
    xs = [randn((3, 4), s) + 0.5 for s in range(3)]
    # No step: the normalized mean of the directions, times the mean norm.
    mean = [math.fsum(c) for c in zip(*(vec(unit(x)) for x in xs), strict=True)]
    scale = sum(norm(vec(x)) for x in xs) / 3
    want = tensor([scale * c / norm(mean) for c in mean], xs[0])
    assert_close(merge("karcher", None, xs, max_iter=0), want)
    x = xs[0]
    assert torch.equal(merge("karcher", None, [x]), x)  # one model
    assert_close(merge("karcher", None, [x, x.clone(), x.clone()]), x)  # identical
    zero = torch.zeros(3, 4)
    assert torch.equal(merge("karcher", None, [zero, zero.clone()]), zero)
    # A zero model takes no part in the direction but its norm (0) counts in the scale.
    assert_close(merge("karcher", None, [x, zero]), x / 2)
    # The base is not an input: passing one changes nothing.
    assert torch.equal(merge("karcher", xs[1], xs), merge("karcher", None, xs))


# --------------------------------------------------------------------------- sce


def ref_sce(base: torch.Tensor, experts: list[torch.Tensor], topk: float = 1.0) -> torch.Tensor:
    b = vec(base)
    ds = [sub(vec(e), b) for e in experts]
    n, size = len(ds), len(b)
    if topk < 1:
        var = []
        for j in range(size):
            col = [d[j] for d in ds]
            mu = sum(col) / n
            var.append(sum((c - mu) ** 2 for c in col) / n)
        k = int(sum(v != 0 for v in var) * topk) if topk > 0 else 0
        keep = set(sorted(range(size), key=lambda j: -var[j])[:k])
        ds = [[d[j] if j in keep else 0.0 for j in range(size)] for d in ds]
    energy = [sum(c * c for c in d) / size for d in ds]
    total = sum(energy)
    w = [1.0 / n] * n if abs(total) < 1e-6 else [e / total for e in energy]
    out = []
    for j in range(size):
        positive = sum(d[j] for d in ds) >= 0
        agree = [(d[j] > 0) if positive else (d[j] < 0) for d in ds]
        num = sum(w[i] * ds[i][j] for i in range(n) if agree[i])
        den = max(sum(w[i] for i in range(n) if agree[i]), 1e-6)
        out.append(b[j] + num / den)
    return tensor(out, base)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.2])
def test_sce_reference(shape: tuple[int, ...], topk: float, chunking: str) -> None:
    base = randn(shape, 0)
    experts = experts_around(base, 3, 6, scale=0.5)
    assert_close(merge("sce", base, experts, select_topk=topk), ref_sce(base, experts, topk))


def test_sce_edges(chunking: str) -> None:
    base = randn((4, 5), 0)
    experts = experts_around(base, 3, 7)
    assert_close(merge("sce", base, experts, select_topk=0.0), base)  # nothing selected
    assert_close(merge("sce", base, experts[:1]), experts[0])  # one model
    assert_close(merge("sce", base, [experts[0], experts[0].clone()]), experts[0])
    # Energies summing below 1e-6 weigh the experts equally: the plain mean of agreeing deltas.
    d = randn((4, 5), 8).abs() * 1e-4
    small = [base + d, base + 3 * d]
    assert_close(merge("sce", base, small), base + 2 * d)
    assert_close(merge("sce", base, small), ref_sce(base, small))
    big = [base + d * 1e2, base + 3 * d * 1e2]  # energy weights 1:9 -> 2.8 d
    assert_close(merge("sce", base, big), base + 2.8 * d * 1e2)
    # A sign sum of exactly 0 elects +: the positive expert's change is kept.
    zero = torch.zeros(3)
    pm = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([-1.0, 1.0, 1.0])]
    assert_close(merge("sce", zero, pm), torch.tensor([1.0, 5 / 3, 1.0]))
    assert_close(merge("sce", zero, pm), ref_sce(zero, pm))
    # Deterministic: the generator plays no part.
    assert torch.equal(merge("sce", base, experts, seed=1, select_topk=0.5),
                       merge("sce", base, experts, seed=2, select_topk=0.5))


# --------------------------------------------------------------------------- ram, ramplus_tl


def ref_ram(base: torch.Tensor, experts: list[torch.Tensor], eps: float = 1e-5,
            r: float | None = None, alpha: float = 0.2) -> torch.Tensor:
    b = vec(base)
    ds = [sub(vec(e), b) for e in experts]
    n, size = len(ds), len(b)
    changed = [[abs(d[j]) > eps for j in range(size)] for d in ds]
    counts = [sum(changed[i][j] for i in range(n)) for j in range(size)]
    lam = [1.0] * n
    if r is not None:
        for i in range(n):
            shared = sum(changed[i][j] and counts[j] > 1 for j in range(size))
            unique = sum(changed[i][j] and counts[j] == 1 for j in range(size))
            rho = shared / max(unique, eps)
            lam[i] = 1 + r * clamp(rho, 0.0, alpha)
    out = []
    for j in range(size):
        if counts[j] == 0:
            out.append(b[j])
        elif counts[j] == 1:
            i = next(i for i in range(n) if changed[i][j])
            out.append(b[j] + lam[i] * ds[i][j])
        else:
            out.append(b[j] + sum(ds[i][j] for i in range(n) if changed[i][j]) / counts[j])
    return tensor(out, base)


def sparse_experts(base: torch.Tensor, n: int, seed: int, keep: float = 0.5
                   ) -> list[torch.Tensor]:
    out = []
    for i in range(n):
        g = gen(seed + i)
        mask = torch.rand(base.shape, generator=g) < keep
        out.append(base + mask * torch.randn(base.shape, generator=g) * 0.1)
    return out


@pytest.mark.parametrize("shape", [(6, 8), (20,)])
def test_ram_reference(shape: tuple[int, ...], chunking: str) -> None:
    base = randn(shape, 0)
    experts = sparse_experts(base, 3, 20)
    assert_close(merge("ram", base, experts), ref_ram(base, experts))
    assert_close(merge("ram", base, experts, epsilon=0.05), ref_ram(base, experts, 0.05))


@pytest.mark.parametrize("shape", [(6, 8), (20,)])
@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 0.8), (2.0, 5.0)])
def test_ramplus_tl_reference(shape: tuple[int, ...], r: float, alpha: float,
                              chunking: str) -> None:
    base = randn(shape, 0)
    experts = sparse_experts(base, 3, 30, keep=0.4)
    out = merge("ramplus_tl", base, experts, r=r, alpha=alpha)
    assert_close(out, ref_ram(base, experts, r=r, alpha=alpha))
    assert (out - merge("ram", base, experts)).abs().max() > 1e-4  # the boost shows


def test_ram_edges(chunking: str) -> None:
    base = randn((5, 4), 0)
    e = sparse_experts(base, 2, 40)
    assert_close(merge("ram", base, e[:1]), e[0])  # one model: its changes
    assert_close(merge("ram", base, [e[0], e[0].clone()]), e[0])  # identical: their mean
    # Changes of at most epsilon are dropped.
    tiny = base + 1e-6
    assert torch.equal(merge("ram", base, [tiny]), base)
    assert_close(merge("ramplus_tl", base, e, r=0.0), merge("ram", base, e))
    # An expert with no unique change: rho = shared / epsilon, capped at alpha (no inf/nan).
    out = merge("ramplus_tl", base, [e[0], e[0].clone()])
    assert torch.isfinite(out).all()
    assert_close(out, e[0])


# --------------------------------------------------------------------------- arcee_fusion


def ref_arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    def softmax(v: list[float]) -> list[float]:
        top = max(v)
        ex = [math.exp(c - top) for c in v]
        s = sum(ex)
        return [c / s + 1e-8 for c in ex]

    b_rows = [vec(base)] if base.dim() < 2 else rows(base)
    x_rows = [vec(other)] if base.dim() < 2 else rows(other)
    scores: list[float] = []
    for bx, xx in zip(b_rows, x_rows, strict=True):
        p, q = softmax(xx), softmax(bx)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        scores += [abs(xi - bi) * kl for xi, bi in zip(xx, bx, strict=True)]
    ordered = sorted(scores)
    q1, med, q3 = (ordered[int(q * (len(ordered) - 1))] for q in (0.25, 0.5, 0.75))
    threshold = med + 1.5 * (q3 - q1)
    out = [x if s >= threshold else bv
           for x, bv, s in zip(vec(other), vec(base), scores, strict=True)]
    return tensor(out, base)


@pytest.mark.parametrize("shape,dense", [((6, 9), False), ((40,), False), ((3, 50), False),
                                         ((32, 64), True)])
def test_arcee_fusion_reference(shape: tuple[int, ...], dense: bool, chunking: str) -> None:
    base = randn(shape, 0)
    other = base + randn(shape, 1, 0.3) * (True if dense else randn(shape, 2) > 0.5)
    out = merge("arcee_fusion", base, [other])
    want = ref_arcee_fusion(base, other)
    assert_close(out, want)
    taken = (out != base).float().mean()
    assert 0 < taken < 0.5  # an outlier rule: some entries, not most


def test_arcee_fusion_edges() -> None:
    base = randn((4, 6), 0)
    assert torch.equal(merge("arcee_fusion", base, [base.clone()]), base)  # identical
    with pytest.raises(RecipeError):
        merge("arcee_fusion", base, [base, base])


def test_arcee_fusion_large_tensor_threshold_is_sampled() -> None:
    """Over a million entries the quartiles come from a million draws with replacement:
    random, reproducible per generator, and close to the exact rule."""
    shape = (1100, 1000)
    base = randn(shape, 0, 0.02)
    other = base + randn(shape, 1, 0.01)
    a = merge("arcee_fusion", base, [other], seed=1)
    assert torch.equal(a, merge("arcee_fusion", base, [other], seed=1))
    b = merge("arcee_fusion", base, [other], seed=2)
    # Exact threshold, computed here over all entries.
    p = torch.softmax(other.double(), -1) + 1e-8
    q = torch.softmax(base.double(), -1) + 1e-8
    scores = (other - base).double().abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    ordered = scores.reshape(-1).sort().values
    n = ordered.numel()
    q1, med, q3 = (ordered[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    exact = float((scores >= med + 1.5 * (q3 - q1)).double().mean())
    fa = float((a != base).double().mean())
    fb = float((b != base).double().mean())
    assert exact > 0.001
    assert abs(fa - exact) < 0.1 * exact and abs(fb - exact) < 0.1 * exact
    assert fa != fb  # different draws, different thresholds


# --------------------------------------------------------------------------- nearswap


def ref_nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    out = []
    for a, b in zip(vec(base), vec(other), strict=True):
        w = clamp(t / max(abs(a - b), 1e-6), 0.0, 1.0)
        out.append(w * b + (1 - w) * a)
    return tensor(out, base)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t,spread", [(0.0, 0.4), (0.05, 0.4), (0.3, 0.4), (1.0, 0.4),
                                      (2e-5, 1e-4)])
def test_nearswap_reference(shape: tuple[int, ...], t: float, spread: float) -> None:
    base = randn(shape, 0)
    other = base + randn(shape, 1, spread)
    assert_close(merge("nearswap", base, [other], t=t), ref_nearswap(base, other, t),
                 atol=1e-7, rtol=1e-6)


def test_nearswap_edges() -> None:
    base = randn((4, 6), 0)
    other = base + randn((4, 6), 1, 0.2)
    assert torch.equal(merge("nearswap", base, [other], t=0.0), base)  # t = 0: the base
    far = float((other - base).abs().max())
    assert far < 1
    assert torch.equal(merge("nearswap", base, [other], t=2 * far), other)  # all within t
    assert torch.equal(merge("nearswap", base, [other], t=1.0), other)  # all |diff| < 1
    assert torch.equal(merge("nearswap", base, [base.clone()], t=0.1), base)  # identical


# --------------------------------------------------------------------------- passthrough


def test_passthrough() -> None:
    x = randn((3, 4), 0)
    assert torch.equal(merge("passthrough", None, [x]), x)
    assert torch.equal(merge("passthrough", None, [x], scale=[None]), x)
    assert_close(merge("passthrough", None, [x], scale=[0.5]), x * 0.5)
    assert torch.equal(merge("passthrough", None, [x], scale=[0.0]), torch.zeros(3, 4))
    with pytest.raises(RecipeError):
        merge("passthrough", None, [x, x])


# --------------------------------------------------------------------------- validation


def test_parameter_ranges() -> None:
    with pytest.raises(RecipeError):
        get_tensor_method("sce").param("select_topk").check(1.5, "x")
    with pytest.raises(RecipeError):
        get_tensor_method("nearswap").param("t").check(-0.1, "x")
    with pytest.raises(RecipeError):
        get_tensor_method("karcher").param("max_iter").check(2.5, "x")
    assert get_tensor_method("nearswap").param("t").check(3.0, "x") == 3.0


# --------------------------------------------------------------------------- through the pipeline


def merged_states(ms: Any, recipe: dict[str, Any], out: Path
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                             list[dict[str, torch.Tensor]]]:
    folder = polymerge.merge(recipe, out, progress=False)
    return load_state(folder), ms.base_state(), ms.expert_states()


def check_each(merged: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(merged) == sorted(expected)
    for name, want in expected.items():
        assert_close(merged[name], want, msg=name)


def test_pipeline_nuslerp_without_base(make_models, outs):
    ms = make_models("llama", 2)
    recipe = {"merge_method": "nuslerp",
              "models": [{"model": str(ms.experts[0]), "parameters": {"weight": 0.3}},
                         {"model": str(ms.experts[1]), "parameters": {"weight": 0.7}}]}
    merged, _, (a, b) = merged_states(ms, recipe, outs / "nuslerp")
    check_each(merged, {k: ref_nuslerp([0.3, 0.7], a[k], b[k]) for k in a})


@needs_optional_base
def test_pipeline_nuslerp_rows_around_base(make_models, outs):
    ms = make_models("llama", 2)
    recipe = {"merge_method": "nuslerp", "base_model": str(ms.base),
              "models": [{"model": str(e), "parameters": {"weight": w}}
                         for e, w in zip(ms.experts, [1.0, -1.0], strict=True)],
              "parameters": {"nuslerp_flatten": False}}
    merged, base, (a, b) = merged_states(ms, recipe, outs / "nuslerp")
    check_each(merged, {k: ref_nuslerp([1.0, -1.0], a[k], b[k], base[k], flatten=False)
                        for k in a})


@needs_optional_base
def test_pipeline_multislerp_around_base(make_models, outs):
    ms = make_models("llama", 3)
    w = [0.2, 0.5, 0.3]
    recipe = {"merge_method": "multislerp", "base_model": str(ms.base),
              "models": [{"model": str(e), "parameters": {"weight": wi}}
                         for e, wi in zip(ms.experts, w, strict=True)]}
    merged, base, experts = merged_states(ms, recipe, outs / "multislerp")
    check_each(merged, {k: ref_multislerp(w, [e[k] for e in experts], base[k]) for k in base})


def test_pipeline_slerp_sce_nearswap(make_models, outs):
    ms = make_models("llama", 2, scale=0.05)
    base_models = {"base_model": str(ms.base)}
    recipe = {"merge_method": "slerp", **base_models,
              "models": [{"model": str(ms.base)}, {"model": str(ms.experts[0])}],
              "parameters": {"t": 0.3}}
    merged, base, experts = merged_states(ms, recipe, outs / "slerp")
    check_each(merged, {k: ref_slerp(0.3, base[k], experts[0][k]) for k in base})

    recipe = {"merge_method": "sce", **base_models,
              "models": [{"model": str(e)} for e in ms.experts],
              "parameters": {"select_topk": 0.5}}
    merged, _, _ = merged_states(ms, recipe, outs / "sce")
    check_each(merged, {k: ref_sce(base[k], [e[k] for e in experts], 0.5) for k in base})

    recipe = {"merge_method": "nearswap", **base_models,
              "models": [{"model": str(ms.experts[1])}], "parameters": {"t": 0.02}}
    merged, _, _ = merged_states(ms, recipe, outs / "nearswap")
    check_each(merged, {k: ref_nearswap(base[k], experts[1][k], 0.02) for k in base})


def test_pipeline_passthrough_scale_filter(make_models, outs):
    ms = make_models("llama", 1)
    recipe = {"merge_method": "passthrough",
              "models": [{"model": str(ms.experts[0]), "parameters": {"scale": [
                  {"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.5}]}}]}
    merged, _, (x,) = merged_states(ms, recipe, outs / "passthrough")
    assert any("o_proj" in k for k in x) and any("down_proj" in k for k in x)
    check_each(merged, {k: v * (0.0 if "o_proj" in k else 0.5 if "down_proj" in k else 1.0)
                        for k, v in x.items()})


def test_pipeline_refuses_bad_combinations_before_merging(make_models, outs):
    ms = make_models("llama", 3)
    with pytest.raises(RecipeError, match="at most 2"):
        polymerge.merge({"merge_method": "nuslerp",
                         "models": [{"model": str(e), "parameters": {"weight": 1.0}}
                                    for e in ms.experts]}, outs / "x", progress=False)
    with pytest.raises(RecipeError, match="sum to 0"):
        polymerge.merge({"merge_method": "multislerp",
                         "models": [{"model": str(e), "parameters": {"weight": w}}
                                    for e, w in zip(ms.experts, [1.0, -2.0, 1.0],
                                                    strict=True)]},
                        outs / "x", progress=False)
    with pytest.raises(RecipeError, match="'t'"):
        polymerge.merge({"merge_method": "nearswap", "base_model": str(ms.base),
                         "models": [{"model": str(ms.experts[0])}]}, outs / "x", progress=False)
    assert not (outs / "x").exists()
