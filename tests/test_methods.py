"""Static merge methods against independent reference computations, edge cases and invariants.

The references below are deliberately naive (Python loops over flattened entries / rows with
``math``) so they share no code path with the vectorized implementations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from polymerge.errors import RecipeError
from polymerge.methods import chunks
from polymerge.methods.schema import MergeMethod
from polymerge.registry import get_tensor_method as get_method
from polymerge.registry import method_names
from polymerge.registry import tensor_methods as all_methods

ALL_NAMES = {
    "linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock",
}
RANDOM_NAMES = ["dare_linear", "dare_ties", "della", "della_linear"]
GTA_NAMES = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
             "breadcrumbs_ties", "della", "della_linear"]


# --------------------------------------------------------------------------- helpers


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape: Sequence[int], seed: int) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen(seed), dtype=torch.float32)


def merge(name: str, base: torch.Tensor | None, experts: list[torch.Tensor], seed: int = 0,
          **params: Any) -> torch.Tensor:
    m = get_method(name)
    return m.fn(base, experts, generator=gen(seed), **params)


def flat(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.reshape(-1).tolist()]


def unflat(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(like.shape)


def ref_topk(delta: list[float], density: float, rescale: bool = False) -> list[float]:
    """Keep the k = max(1, int(density*n)) largest |x| (distinct magnitudes assumed)."""
    if density >= 1:
        return list(delta)
    n = len(delta)
    k = max(1, int(density * n))
    keep = set(sorted(range(n), key=lambda i: -abs(delta[i]))[:k])
    out = [v if i in keep else 0.0 for i, v in enumerate(delta)]
    return ref_l1(delta, out) if rescale else out


def ref_band(delta: list[float], density: float, gamma: float) -> list[float]:
    """Breadcrumbs: ascending |x| order, keep positions n_bot .. n_bot+target_n."""
    if density >= 1:
        return list(delta)
    n = len(delta)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = sorted(range(n), key=lambda i: abs(delta[i]))
    keep = set(order[n_bot:n_bot + target])
    return [v if i in keep else 0.0 for i, v in enumerate(delta)]


def ref_l1(before: list[float], after: list[float]) -> list[float]:
    b = sum(abs(v) for v in before)
    a = sum(abs(v) for v in after)
    if b < 1e-7 or a < 1e-7:
        return after
    return [v * b / a for v in after]


def ref_mix(base: list[float], deltas: list[list[float]], weights: list[float], *,
            consensus: bool, normalize: bool, lam: float = 1.0) -> list[float]:
    """The generalized task arithmetic mix, entry by entry."""
    out = []
    for j, b in enumerate(base):
        wd = [w * d[j] for w, d in zip(weights, deltas, strict=True)]
        if consensus:
            elected = 1.0 if sum(wd) >= 0 else -1.0
            agree = [(v > 0 and elected > 0) or (v < 0 and elected < 0) for v in wd]
            mixed = sum(v for v, a in zip(wd, agree, strict=True) if a)
            div = sum(w for w, a in zip(weights, agree, strict=True) if a)
            div = 1.0 if div == 0 else div
        else:
            mixed = sum(wd)
            div = sum(weights)
            div = 1.0 if abs(div) < 1e-8 else div
        if normalize:
            mixed /= div
        out.append(b + lam * mixed)
    return out


def setup(shape: Sequence[int] = (4, 6), n: int = 3, seed: int = 0
          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = randn(shape, seed)
    experts = [base + randn(shape, seed + 100 + i) for i in range(n)]
    return base, experts


def default_params(m: MergeMethod, n_experts: int) -> dict[str, Any]:
    """Parameters that exercise each method's non-trivial path."""
    if m.name == "linear":
        return {"weight": [0.5 + i for i in range(n_experts)]}
    if m.name == "slerp":
        return {"t": 0.3}
    if m.name == "model_stock":
        return {}
    params: dict[str, Any] = {"weight": [1.0 - 0.25 * i for i in range(n_experts)]}
    if "density" in m.param_names:
        params["density"] = [0.5] * n_experts
    return params


def n_experts_for(m: MergeMethod) -> int:
    return 1 if m.max_experts == 1 else max(2, m.min_experts)


def call_method(m: MergeMethod, base: torch.Tensor, experts: list[torch.Tensor],
                seed: int = 0) -> torch.Tensor:
    params = default_params(m, len(experts) + (1 if m.base_policy == "input" else 0))
    if m.base_policy == "input":
        return m.fn(None, [base, *experts], generator=gen(seed), **params)
    return m.fn(base, experts, generator=gen(seed), **params)


# --------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert set(method_names()) >= ALL_NAMES
    assert method_names() == sorted(method_names())
    assert {m.name for m in all_methods()} == set(method_names("tensor"))
    assert {"channel", "twin"} <= set(method_names("store"))
    assert {"supermerge", "adamerging"} <= set(method_names("learned"))


def test_unknown_method_lists_known_names() -> None:
    with pytest.raises(RecipeError) as err:
        get_method("frankenmerge")
    msg = str(err.value)
    assert "frankenmerge" in msg
    for name in ALL_NAMES:
        assert name in msg


@pytest.mark.parametrize("name", sorted(ALL_NAMES))
def test_metadata(name: str) -> None:
    m = get_method(name)
    assert m.description and "\n" not in m.description
    assert m.reference.startswith("https://")
    assert m.random == (name in RANDOM_NAMES)
    assert m.base_policy == ("input" if name == "linear" else "required")


def test_gta_parameter_defaults() -> None:
    expect = {
        "task_arithmetic": (False, None), "ties": (True, False), "dare_ties": (False, True),
        "dare_linear": (False, True), "breadcrumbs": (False, False),
        "breadcrumbs_ties": (False, False), "della": (True, True), "della_linear": (False, True),
    }
    for name, (normalize, rescale) in expect.items():
        m = get_method(name)
        assert m.param("normalize").default is normalize
        assert m.param("lambda").default == 1.0
        assert m.param("weight").default == 1.0 and m.param("weight").scope == "per_model"
        if rescale is None:
            assert "rescale" not in m.param_names and "density" not in m.param_names
        else:
            assert m.param("rescale").default is rescale
            assert m.param("density").default == 1.0
            assert m.param("density").scope == "per_model"
    assert get_method("breadcrumbs").param("gamma").default == 0.01
    assert get_method("della").param("epsilon").default == 0.15
    assert get_method("linear").param("weight").required
    assert get_method("linear").param("normalize").default is True
    assert get_method("slerp").param("t").required
    assert get_method("model_stock").param("filter_wise").default is False
    assert get_method("model_stock").min_experts == 2
    assert (get_method("slerp").min_experts, get_method("slerp").max_experts) == (1, 1)


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1])
def test_density_check_rejects(bad: float) -> None:
    with pytest.raises(RecipeError):
        get_method("ties").param("density").check(bad, "models[0]")


def test_param_checks_accept_and_reject() -> None:
    assert get_method("ties").param("density").check(1, "x") == 1.0
    assert get_method("dare_ties").param("density").check(0.3, "x") == 0.3
    with pytest.raises(RecipeError):
        get_method("breadcrumbs").param("gamma").check(1.0, "x")
    with pytest.raises(RecipeError):
        get_method("slerp").param("t").check(1.2, "x")
    with pytest.raises(RecipeError):
        get_method("ties").param("normalize").check(1, "x")


def test_unknown_parameter_and_bad_lengths() -> None:
    base, experts = setup(n=2)
    with pytest.raises(RecipeError, match="gamma"):
        merge("ties", base, experts, gamma=[0.1, 0.1])
    with pytest.raises(RecipeError, match="weight"):
        merge("task_arithmetic", base, experts, weight=[1.0, 2.0, 3.0])


# --------------------------------------------------------------------------- task arithmetic


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_task_arithmetic_reference(normalize: bool, lam: float) -> None:
    base, experts = setup()
    weights = [0.6, -0.2, 1.3]
    out = merge("task_arithmetic", base, experts, weight=weights, normalize=normalize,
                **{"lambda": lam})
    b = flat(base)
    deltas = [[e - x for e, x in zip(flat(ex), b, strict=True)] for ex in experts]
    ref = ref_mix(b, deltas, weights, consensus=False, normalize=normalize, lam=lam)
    assert_close(out, unflat(ref, base))


def test_task_arithmetic_single_expert_is_expert() -> None:
    base, experts = setup(n=1)
    assert_close(merge("task_arithmetic", base, experts), experts[0])


def test_task_arithmetic_sums_deltas_without_normalize() -> None:
    base, experts = setup(n=2)
    out = merge("task_arithmetic", base, [experts[0], experts[0]])
    assert_close(out, base + 2 * (experts[0] - base))


def test_task_arithmetic_weights_summing_to_zero_do_not_divide_by_zero() -> None:
    base, experts = setup(n=2)
    out = merge("task_arithmetic", base, experts, weight=[1.0, -1.0], normalize=True)
    assert_close(out, base + (experts[0] - base) - (experts[1] - base))


# --------------------------------------------------------------------------- ties


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.01])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
def test_ties_reference(density: float, normalize: bool, rescale: bool) -> None:
    base, experts = setup()
    weights = [1.0, 0.5, 2.0]
    densities = [density, min(1.0, density * 1.5), density]
    out = merge("ties", base, experts, weight=weights, density=densities, normalize=normalize,
                rescale=rescale)
    b = flat(base)
    deltas = [ref_topk([e - x for e, x in zip(flat(ex), b, strict=True)], d, rescale)
              for ex, d in zip(experts, densities, strict=True)]
    ref = ref_mix(b, deltas, weights, consensus=True, normalize=normalize)
    assert_close(out, unflat(ref, base))


@pytest.mark.parametrize("weights", [[1.0, 0.0, 2.0], [1.0, -1.0, 0.5], [-1.0, -0.5, -2.0]])
@pytest.mark.parametrize("chunk", [None, 7])  # whole tensors, or the chunked TIES path
def test_ties_zero_and_negative_weights(weights, chunk, monkeypatch) -> None:
    """Zero weights (nothing agrees: the divisor falls back to 1) and negative ones (agreeing
    weights can sum to 0 with a non-zero sum of entries) follow the definition."""
    if chunk is not None:
        monkeypatch.setattr(chunks, "CHUNK", chunk)
    base = torch.zeros(24)
    gen = torch.Generator().manual_seed(5)
    # integer deltas: many entries agree in sign, some sums of weights cancel exactly
    experts = [torch.randint(-3, 4, (24,), generator=gen).float() for _ in range(3)]
    for density in (1.0, 0.5):
        out = merge("ties", base, experts, weight=weights, density=density, normalize=True)
        deltas = [ref_topk(flat(e), density, False) for e in experts]
        ref = ref_mix(flat(base), deltas, weights, consensus=True, normalize=True)
        assert_close(out, unflat(ref, base))


def test_ties_sign_tie_elects_plus() -> None:
    base = torch.zeros(3)
    up = torch.tensor([1.0, 2.0, -1.0])
    down = torch.tensor([-1.0, -2.0, 3.0])
    out = merge("ties", base, [up, down], weight=[1.0, 1.0])
    # Sums: 0, 0 (ties -> +) and 2 (+): only the positive entries survive.
    assert_close(out, torch.tensor([1.0, 2.0, 3.0]))
    out = merge("ties", base, [up, down], weight=[1.0, 1.0], normalize=False)
    assert_close(out, torch.tensor([1.0, 2.0, 3.0]))


def test_ties_disjoint_mean_uses_agreeing_weights() -> None:
    base = torch.zeros(2)
    e1 = torch.tensor([2.0, 1.0])
    e2 = torch.tensor([4.0, -3.0])
    out = merge("ties", base, [e1, e2], weight=[3.0, 1.0])
    # entry 0: both agree -> (6 + 4) / 4; entry 1: weighted sum 3 - 3 = 0 -> +, only e1 -> 3 / 3.
    assert_close(out, torch.tensor([2.5, 1.0]))


def test_ties_identical_experts_give_expert() -> None:
    base, experts = setup(n=1)
    out = merge("ties", base, [experts[0]] * 3, weight=[1.0, 2.0, 0.5])
    assert_close(out, experts[0])


# --------------------------------------------------------------------------- breadcrumbs


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.9, 0.2), (1.0, 0.01),
                                                 (0.3, 0.0), (0.05, 0.01)])
def test_breadcrumbs_reference(name: str, density: float, gamma: float) -> None:
    base, experts = setup(n=2)
    weights = [1.0, 0.75]
    out = merge(name, base, experts, weight=weights, density=density, gamma=gamma)
    b = flat(base)
    deltas = [ref_band([e - x for e, x in zip(flat(ex), b, strict=True)], density, gamma)
              for ex in experts]
    ref = ref_mix(b, deltas, weights, consensus=name.endswith("ties"), normalize=False)
    assert_close(out, unflat(ref, base))


def test_breadcrumbs_keeps_the_middle_band() -> None:
    mags = torch.randperm(100, generator=gen(3)).float() + 1  # 1..100 shuffled
    signs = torch.where(torch.rand(100, generator=gen(4)) < 0.5, -1.0, 1.0)
    delta = mags * signs
    base = torch.zeros(100)
    out = merge("breadcrumbs", base, [delta], density=0.5, gamma=0.1)
    kept = out != 0
    # n_top = 10 largest and n_bot = 100 - 50 - 10 = 40 smallest removed.
    assert_close(kept, (mags >= 41) & (mags <= 90))
    assert_close(out[kept], delta[kept])
    # When gamma would eat into the density, outlier removal shrinks: keep the 95 smallest.
    out = merge("breadcrumbs", base, [delta], density=0.95, gamma=0.1)
    assert_close(out != 0, mags <= 95)


# --------------------------------------------------------------------------- dare


def test_dare_density_one_equals_undropped() -> None:
    base, experts = setup()
    w = [0.5, 1.0, 1.5]
    assert_close(merge("dare_linear", base, experts, weight=w, density=1.0),
                 merge("task_arithmetic", base, experts, weight=w))
    for normalize in (False, True):
        assert_close(merge("dare_ties", base, experts, weight=w, density=1.0,
                           normalize=normalize),
                     merge("ties", base, experts, weight=w, density=1.0, normalize=normalize))
        assert_close(merge("della", base, experts, weight=w, density=1.0, normalize=normalize),
                     merge("ties", base, experts, weight=w, density=1.0, normalize=normalize))
    assert_close(merge("della_linear", base, experts, weight=w, density=1.0),
                 merge("task_arithmetic", base, experts, weight=w))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_reference_with_same_draws(name: str, rescale: bool) -> None:
    """Rebuild the masks with the same generator (one bernoulli draw per expert, in order)."""
    base, experts = setup()
    w = [1.0, 0.5, -0.7]
    dens = [0.3, 0.6, 0.9]
    out = merge(name, base, experts, seed=11, weight=w, density=dens, rescale=rescale)
    g = gen(11)
    b = flat(base)
    deltas = []
    for ex, d in zip(experts, dens, strict=True):
        keep = flat(torch.bernoulli(torch.full(base.shape, d), generator=g))
        deltas.append([(e - x) * k / (d if rescale else 1.0)
                       for e, x, k in zip(flat(ex), b, keep, strict=True)])
    ref = ref_mix(b, deltas, w, consensus=name == "dare_ties", normalize=False)
    assert_close(out, unflat(ref, base))


def test_dare_drop_fraction_and_unbiased_rescale() -> None:
    n = 200_000
    base = torch.zeros(n)
    delta = torch.rand(n, generator=gen(5)) + 0.5
    out = merge("dare_linear", base, [delta], seed=6, density=0.3)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert_close(out[kept], delta[kept] / 0.3)
    assert abs(out.sum().item() / delta.sum().item() - 1.0) < 0.02


@pytest.mark.parametrize("name", RANDOM_NAMES)
def test_random_methods_seeded(name: str) -> None:
    base, experts = setup(shape=(8, 16))
    params = {"density": 0.5}
    a = merge(name, base, experts, seed=1, **params)
    b = merge(name, base, experts, seed=1, **params)
    c = merge(name, base, experts, seed=2, **params)
    assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------- della


def ref_della_probs(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    probs = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        row = [abs(float(v)) for v in rows[r]]
        order = sorted(range(len(row)), key=lambda i: row[i])
        for rank, i in enumerate(order):
            norm = rank / (len(row) - 1) if len(row) > 1 else 0.5
            probs[r, i] = density - epsilon + 2 * epsilon * norm
    return probs.reshape(delta.shape)


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(4, 6), (10,)])
@pytest.mark.parametrize("rescale", [True, False])
def test_della_reference_with_same_draws(name: str, shape: tuple[int, ...],
                                         rescale: bool) -> None:
    base, experts = setup(shape=shape, n=2)
    w = [1.0, 0.6]
    dens, eps = [0.5, 0.4], [0.2, 0.1]
    out = merge(name, base, experts, seed=9, weight=w, density=dens, epsilon=eps,
                rescale=rescale)
    g = gen(9)
    b = flat(base)
    deltas = []
    for ex, d, e in zip(experts, dens, eps, strict=True):
        delta = ex - base
        probs = ref_della_probs(delta, d, e)
        rows = probs.reshape(1, -1) if delta.dim() < 2 else probs.reshape(delta.shape[0], -1)
        keep = torch.bernoulli(rows, generator=g)
        deltas.append([v * k / (p if rescale else 1.0) for v, k, p in
                       zip(flat(delta), flat(keep), flat(probs), strict=True)])
    ref = ref_mix(b, deltas, w, consensus=name == "della", normalize=name == "della")
    assert_close(out, unflat(ref, base))


def test_della_keeps_large_magnitudes_more_often() -> None:
    rows, width = 400, 200
    base = torch.zeros(rows, width)
    delta = (torch.arange(width, dtype=torch.float32) + 1).repeat(rows, 1)
    out = merge("della_linear", base, [delta], seed=3, density=0.5, epsilon=0.3)
    keep_rate = (out != 0).float().mean(dim=0)
    assert abs(keep_rate[:20].mean().item() - 0.23) < 0.03  # p from 0.2 upwards
    assert abs(keep_rate[-20:].mean().item() - 0.77) < 0.03  # p up to 0.8
    assert abs(keep_rate.mean().item() - 0.5) < 0.01
    # Survivors divided by their own probability: unbiased per column.
    assert_close(out.mean(dim=0) / delta[0], torch.ones(width), atol=0.25, rtol=0)


def test_della_rejects_epsilon_outside_density() -> None:
    base, experts = setup(n=1)
    with pytest.raises(RecipeError, match="epsilon"):
        merge("della", base, experts, density=0.1, epsilon=0.15)
    with pytest.raises(RecipeError, match="epsilon"):
        merge("della_linear", base, experts, density=0.9, epsilon=0.15)


# --------------------------------------------------------------------------- linear


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_reference(normalize: bool) -> None:
    _, models = setup(n=3)
    weights = [1.0, 2.0, -0.5]
    out = merge("linear", None, models, weight=weights, normalize=normalize)
    cols = [flat(m) for m in models]
    ref = []
    for j in range(len(cols[0])):
        s = sum(w * c[j] for w, c in zip(weights, cols, strict=True))
        ref.append(s / sum(weights) if normalize else s)
    assert_close(out, unflat(ref, models[0]))


def test_linear_edge_cases() -> None:
    _, models = setup(n=2)
    assert_close(merge("linear", None, [models[0]], weight=[3.0]), models[0])
    assert_close(merge("linear", None, [models[1]] * 3, weight=[1.0, 2.0, 3.0]), models[1])
    with pytest.raises(RecipeError, match="sum to 0"):
        merge("linear", None, models, weight=[1.0, -1.0])
    assert_close(merge("linear", None, models, weight=[1.0, -1.0], normalize=False),
                 models[0] - models[1])


# --------------------------------------------------------------------------- slerp


def ref_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra = a.reshape(1, -1)
    rb = b.reshape(ra.shape)
    out = torch.empty_like(ra)
    for r in range(ra.shape[0]):
        x, y = [float(v) for v in ra[r]], [float(v) for v in rb[r]]
        nx = math.sqrt(sum(v * v for v in x))
        ny = math.sqrt(sum(v * v for v in y))
        nx = nx if nx > 1e-8 else 1.0
        ny = ny if ny > 1e-8 else 1.0
        dot = max(-1.0, min(1.0, sum(u / nx * v / ny for u, v in zip(x, y, strict=True))))
        if abs(dot) > 0.9995:
            ca, cb = 1 - t, t
        else:
            th = math.acos(dot)
            ca, cb = math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)
        for c in range(len(x)):
            out[r, c] = ca * x[c] + cb * y[c]
    return out.reshape(a.shape)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(4, 6), (10,), (), (2, 3, 4)])
def test_slerp_reference(t: float, shape: tuple[int, ...]) -> None:
    a = randn(shape, 1)
    b = randn(shape, 2)
    if len(shape) == 2:
        b[1] = 2 * a[1]  # collinear row -> linear branch
        b[2] = -a[2]  # antipodal row -> linear branch
        a[3] = 0  # zero row
    out = merge("slerp", a, [b], t=t)
    assert_close(out, ref_slerp(t, a, b))


def test_slerp_endpoints_and_orthogonal_midpoint() -> None:
    a, b = randn((4, 6), 1), randn((4, 6), 2)
    assert_close(merge("slerp", a, [b], t=0.0), a)
    assert_close(merge("slerp", a, [b], t=1.0), b)
    assert_close(merge("slerp", a, [a.clone()], t=0.4), a)
    e1 = torch.zeros(3, 5)
    e2 = torch.zeros(3, 5)
    e1[:, 0] = 1.0
    e2[:, 3] = 1.0
    mid = merge("slerp", e1, [e2], t=0.5)
    assert_close(torch.linalg.vector_norm(mid, dim=1), torch.ones(3))
    assert_close(mid, (e1 + e2) / math.sqrt(2))


def test_slerp_needs_one_expert() -> None:
    a = randn((3,), 1)
    with pytest.raises(RecipeError):
        merge("slerp", a, [a, a], t=0.5)


# --------------------------------------------------------------------------- model stock


def ref_model_stock(base: torch.Tensor, experts: list[torch.Tensor],
                    filter_wise: bool) -> torch.Tensor:
    def one(w0: list[float], ws: list[list[float]]) -> list[float]:
        n = len(ws)
        offs = [[a - b for a, b in zip(w, w0, strict=True)] for w in ws]
        coss = []
        for i in range(n):
            for j in range(i + 1, n):
                dot = sum(a * b for a, b in zip(offs[i], offs[j], strict=True))
                ni = math.sqrt(sum(a * a for a in offs[i]))
                nj = math.sqrt(sum(a * a for a in offs[j]))
                coss.append(max(-1.0, min(1.0, dot / max(ni * nj, 1e-6))))
        c = sum(coss) / len(coss)
        den = 1 + (n - 1) * c
        t = 0.0 if abs(den) < 1e-6 else n * c / den
        return [t * sum(w[k] for w in ws) / n + (1 - t) * w0[k] for k in range(len(w0))]

    if not filter_wise:
        return unflat(one(flat(base), [flat(e) for e in experts]), base)
    rows_b = base.reshape(1, -1) if base.dim() < 2 else base
    rows_e = [e.reshape(rows_b.shape) for e in experts]
    out = [one(flat(rows_b[r]), [flat(e[r]) for e in rows_e]) for r in range(rows_b.shape[0])]
    return unflat([v for row in out for v in row], base)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_model_stock_reference(filter_wise: bool, n: int, chunking: str) -> None:
    base = randn((4, 6), 0)
    shared = randn((4, 6), 50)
    experts = [base + shared + 0.7 * randn((4, 6), 60 + i) for i in range(n)]
    out = merge("model_stock", base, experts, filter_wise=filter_wise)
    assert_close(out, ref_model_stock(base, experts, filter_wise))


def test_model_stock_edge_cases(chunking: str) -> None:
    base, experts = setup(n=2)
    assert_close(merge("model_stock", base, [experts[0]] * 3), experts[0])
    # Opposite offsets: cos = -1, 1 + (2-1)(-1) = 0 is singular -> keep the base.
    d = experts[0] - base
    assert_close(merge("model_stock", base, [base + d, base - d]), base)
    assert_close(merge("model_stock", base, [base.clone(), base.clone()]), base)
    with pytest.raises(RecipeError):
        merge("model_stock", base, [experts[0]])


# --------------------------------------------------------------------------- shared invariants


@pytest.mark.parametrize("name", GTA_NAMES)
def test_gta_zero_deltas_and_lambda_zero(name: str) -> None:
    base, experts = setup(n=2)
    dens = {"density": 0.5} if "density" in get_method(name).param_names else {}
    assert_close(merge(name, base, [base.clone(), base.clone()], **dens), base)
    assert_close(merge(name, base, experts, **dens, **{"lambda": 0.0}), base)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_consensus_single_expert(name: str) -> None:
    """One expert always agrees with itself: its (sparsified) delta is added unchanged."""
    base, experts = setup(n=1)
    out = merge(name, base, experts, weight=[2.0], density=1.0, normalize=True)
    assert_close(out, experts[0])
    out = merge(name, base, experts, weight=[2.0], density=1.0, normalize=False)
    assert_close(out, base + 2 * (experts[0] - base))


@pytest.mark.parametrize("name", sorted(ALL_NAMES))
@pytest.mark.parametrize("shape", [(), (1,), (10,), (4, 6), (3, 1), (2, 3, 4)])
def test_shape_dtype_and_inputs_untouched(name: str, shape: tuple[int, ...]) -> None:
    m = get_method(name)
    base, experts = setup(shape=shape, n=n_experts_for(m))
    saved = [base.clone()] + [e.clone() for e in experts]
    out = call_method(m, base, experts)
    assert out.dtype == torch.float32
    assert out.shape == base.shape
    assert torch.isfinite(out).all()
    for before, after in zip(saved, [base, *experts], strict=True):
        assert torch.equal(before, after)
    assert out.data_ptr() not in {t.data_ptr() for t in [base, *experts]}


@pytest.mark.parametrize("name", sorted(ALL_NAMES))
def test_half_precision_inputs_give_float32(name: str) -> None:
    m = get_method(name)
    base, experts = setup(n=n_experts_for(m))
    out = call_method(m, base.bfloat16(), [e.bfloat16() for e in experts])
    assert out.dtype == torch.float32


# --------------------------------------------------------------------------- cuda


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(ALL_NAMES))
def test_cuda_matches_cpu(name: str) -> None:
    """With a CPU generator the random draws are identical, so every method matches the CPU."""
    m = get_method(name)
    base, experts = setup(shape=(16, 32), n=n_experts_for(m))
    cpu = call_method(m, base, experts, seed=4)
    cuda = call_method(m, base.cuda(), [e.cuda() for e in experts], seed=4)
    assert cuda.device.type == "cuda" and cuda.dtype == torch.float32
    assert_close(cuda.cpu(), cpu)
    if m.random:
        params = default_params(m, len(experts))
        g = torch.Generator(device="cuda").manual_seed(4)
        out = m.fn(base.cuda(), [e.cuda() for e in experts], generator=g, **params)
        assert out.device.type == "cuda" and out.shape == base.shape
