"""The engine's fast paths give exactly what the plain per-tensor loop gives.

Elementwise methods run on cache-sized chunks of the flattened tensors, several tensors are
computed at once, inputs are lent by their files' mappings, writes happen on their own thread,
and TIES's top-k threshold comes from a radix select. Each is checked here against an independent
computation: the method's function called once on whole float32 tensors (or a sort, for the
threshold), with bf16 inputs and a chunk size small enough that every tensor spans chunks.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import load_state

import polymerge
from polymerge import engine
from polymerge.errors import CheckpointError, PolymergeError
from polymerge.methods import chunks
from polymerge.methods.sparsify import kth_largest_magnitude, order_statistics, top_k_in_chunks
from polymerge.registry import get_tensor_method

CHUNK = 97  # prime, and smaller than every weight: chunk boundaries land mid-row


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", CHUNK)


def _recipe(method: str, ms, **params) -> dict:
    models = [{"model": str(e), "parameters": {"weight": w}}
              for e, w in zip(ms.experts, (0.7, -0.2, 0.5), strict=False)]
    recipe = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method in ("task_arithmetic", "ties", "ram", "nearswap"):
        recipe["base_model"] = str(ms.base)
    if method in ("ram", "nearswap"):
        recipe["models"] = [{"model": m["model"]} for m in models]
    if method == "nearswap":
        recipe["models"] = recipe["models"][:1]
    if method == "passthrough":
        recipe["models"] = [{"model": str(ms.experts[0]), "parameters": {"scale": 0.5}}]
    recipe["parameters"] = params
    return recipe


def _expected(method: str, ms, recipe: dict) -> dict[str, torch.Tensor]:
    """The method's own function on whole float32 tensors, cast to bf16 like the output."""
    fn = get_tensor_method(method).fn
    base = load_state(ms.base)
    experts = [load_state(m["model"]) for m in recipe["models"]]
    per_model = {k: [m.get("parameters", {}).get(k) for m in recipe["models"]]
                 for k in ("weight", "scale") if any(k in m.get("parameters", {})
                                                     for m in recipe["models"])}
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        xs = [e[name].float() for e in experts]
        out[name] = fn(b.float(), xs, **per_model, **recipe["parameters"]).to(torch.bfloat16)
    return out


@pytest.mark.parametrize(("method", "params"), [
    ("linear", {}), ("task_arithmetic", {"lambda": 0.8}),
    ("ties", {"normalize": True}),  # density 1: the sign election alone, elementwise
    ("ram", {}), ("nearswap", {"t": 0.01}), ("passthrough", {}),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_chunked_merge_equals_the_function_on_whole_tensors(make_models, outs, small_chunks,
                                                           method, params, threads):
    """With 2 threads every tensor of 8 chunks or more is split in two pieces computed side
    by side into one output."""
    ms = make_models("llama", 3, dtype=torch.bfloat16)
    recipe = _recipe(method, ms, **params)
    method_entry = get_tensor_method(method)
    assert method_entry.is_elementwise({**params, "density": [1.0] * 3})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = load_state(polymerge.merge(recipe, outs / method, progress=False))
    finally:
        torch.set_num_threads(before)
    expected = _expected(method, ms, recipe)
    assert set(expected) <= set(got)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("numel,workers,expected", [
    (CHUNK * 8, 2, [(0, CHUNK * 4), (CHUNK * 4, CHUNK * 8)]),
    (CHUNK * 8 + 1, 2, [(0, CHUNK * 5), (CHUNK * 5, CHUNK * 8 + 1)]),
    (CHUNK * 7, 2, [(0, CHUNK * 7)]),  # too small for two pieces of 4 chunks
    (5, 2, [(0, 5)]), (CHUNK * 40, 3, [(0, CHUNK * 14), (CHUNK * 14, CHUNK * 28),
                                       (CHUNK * 28, CHUNK * 40)]),
    (CHUNK * 40, 1, [(0, CHUNK * 40)])])
def test_pieces_cover_the_tensor_on_chunk_boundaries(small_chunks, numel, workers, expected):
    assert engine._pieces(numel, workers) == expected


def test_sparsified_and_random_methods_are_not_chunked():
    assert not get_tensor_method("ties").is_elementwise({"density": [1.0, 0.5]})
    assert get_tensor_method("ties").is_elementwise({"density": [1.0, 1.0]})
    assert not get_tensor_method("dare_linear").is_elementwise({"density": [1.0]})  # random
    assert not get_tensor_method("slerp").is_elementwise({"t": 0.5})


def test_parallel_tensors_give_the_sequential_result(make_models, outs):
    """A non-elementwise method (TIES with density) run with 2 workers and with 1."""
    ms = make_models("llama", 3, dtype=torch.bfloat16)
    recipe = {"merge_method": "ties", "base_model": str(ms.base),
              "models": [{"model": str(e), "parameters": {"density": 0.4, "weight": 1.0}}
                         for e in ms.experts], "dtype": "bfloat16"}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = load_state(polymerge.merge(recipe, outs / "two", progress=False))
        torch.set_num_threads(1)
        one = load_state(polymerge.merge(recipe, outs / "one", progress=False))
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    assert two.keys() == one.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name


@pytest.mark.parametrize("method,value", [("task_arithmetic", float("nan")),
                                          ("linear", float("-inf")), ("ram", float("nan"))])
def test_nan_in_a_chunk_names_the_model(make_models, outs, small_chunks, method, value):
    """Linear and task arithmetic check each chunk's result and then the inputs to name the
    culprit; the other elementwise methods check the inputs' chunks."""
    from test_validation import variant

    ms = make_models("llama", 2)

    def poison(state: dict[str, torch.Tensor]) -> None:
        w = state["model.layers.0.mlp.up_proj.weight"]
        w.view(-1)[CHUNK * 2 + 5] = value  # inside the third chunk

    bad = variant(ms, "poisoned", poison)
    recipe = {"merge_method": method, "base_model": str(ms.base),
              "models": [{"model": str(ms.experts[0]), "parameters": {"weight": 1.0}},
                         {"model": str(bad), "parameters": {"weight": 1.0}}]}
    if method == "linear":
        recipe["models"].insert(0, {"model": str(ms.base), "parameters": {"weight": 1.0}})
    assert get_tensor_method(method).is_elementwise({})
    with pytest.raises(CheckpointError, match="poisoned.*up_proj.*NaN or Inf"):
        polymerge.merge(recipe, outs / "nan", progress=False)
    assert not (outs / "nan").exists()


@pytest.mark.parametrize("method,value", [("model_stock", float("nan")),
                                          ("multislerp", float("inf")),
                                          ("karcher", float("-inf"))])
@pytest.mark.parametrize("who", ["expert", "base"])
def test_nan_in_a_whole_tensor_method_names_the_model(make_models, outs, method, value, who):
    """Methods that propagate NaN/Inf through whole-tensor statistics check their result and
    then the inputs: the model at fault is still the one named, base or expert."""
    from test_validation import variant

    if who == "base" and get_tensor_method(method).base_policy == "input":
        pytest.skip("the method never reads base_model (like linear)")
    ms = make_models("llama", 3)

    def poison(state: dict[str, torch.Tensor]) -> None:
        state["model.layers.0.mlp.up_proj.weight"].view(-1)[7] = value

    bad = variant(ms, "poisoned", poison)
    experts = [str(e) for e in ms.experts]
    base = str(bad) if who == "base" else str(ms.base)
    if who == "expert":
        experts[1] = str(bad)
    params = {"weight": 1.0} if method == "multislerp" else {}
    recipe = {"merge_method": method, "base_model": base,
              "models": [{"model": e, "parameters": params} for e in experts]}
    assert get_tensor_method(method).propagates_nonfinite
    culprit = "base_model" if who == "base" else "poisoned"  # the base's label
    with pytest.raises(CheckpointError, match=f"model {culprit}.*up_proj.*NaN or Inf"):
        polymerge.merge(recipe, outs / "nan", progress=False)
    assert not (outs / "nan").exists()


@pytest.mark.parametrize("dtype,weight", [("float16", 1e6), ("float32", 3e38)])
def test_overflow_of_finite_inputs_is_an_output_error(make_models, outs, small_chunks, dtype,
                                                      weight):
    """With finite inputs a result can still overflow (in the float32 math, or in the cast to
    a float16 output): the output check stops it, and no input is blamed."""
    ms = make_models("llama", 2)
    recipe = {"merge_method": "linear", "dtype": dtype,
              "models": [{"model": str(e), "parameters": {"weight": weight}}
                         for e in ms.experts],
              "parameters": {"normalize": False}}
    with pytest.raises(CheckpointError, match="merged output.*NaN or Inf"):
        polymerge.merge(recipe, outs / "overflow", progress=False)
    assert not (outs / "overflow").exists()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_methods_that_say_they_propagate_nonfinite_inputs_do(method):
    """What ``propagates_nonfinite`` promises, checked on the function: NaN, +Inf or -Inf in
    any one input (base or expert, weights of either sign or zero) makes the result NaN or
    Inf at that position and nowhere else."""
    entry = get_tensor_method(method)
    assert entry.propagates_nonfinite
    g = torch.Generator().manual_seed(0)
    for trial in range(24):
        n = 1 + trial % 3
        base = torch.randn(50, generator=g)
        experts = [torch.randn(50, generator=g) for _ in range(n)]
        weights = [[1.0, -0.5, 0.0, 2.0][(trial + i) % 4] for i in range(n)]
        if method == "linear" and sum(weights) == 0:
            weights[0] = 1.0
        which = trial % (n + 1)
        spot = (trial * 7) % 50
        target = base if which == n else experts[which]
        target[spot] = [float("nan"), float("inf"), float("-inf")][trial % 3]
        out = entry.fn(base, experts, weight=weights,
                       **({"normalize": True} if method == "linear" else {}))
        bad = ~torch.isfinite(out)
        if method == "linear" and which == n:
            assert bool(bad.sum() == 0)  # linear does not read the base
        else:
            assert bad.nonzero().flatten().tolist() == [spot], (trial, weights)


@pytest.mark.parametrize("method,params", [
    ("model_stock", {}), ("model_stock", {"filter_wise": True}),
    ("multislerp", {"weight": [1.0, 0.0, 2.0]}),
    ("multislerp", {"weight": [0.5, -1.0, 2.0], "normalize_weights": False}),
    ("karcher", {}), ("karcher", {"max_iter": 1})])
@pytest.mark.parametrize("base_too", [False, True])
def test_whole_tensor_methods_that_say_they_propagate_nonfinite_inputs_do(method, params,
                                                                          base_too):
    """The weaker promise for methods that are not elementwise: NaN, +Inf or -Inf at any
    one position of any one input (the base included, where the method reads one) shows as
    NaN or Inf somewhere in the result, or stops the function with an error, so the engine
    may check the result and the inputs only to name the model at fault."""
    entry = get_tensor_method(method)
    assert entry.propagates_nonfinite and not entry.is_elementwise(params)
    uses_base = entry.base_policy == "required" or base_too
    if base_too and entry.base_policy != "optional":
        pytest.skip("the base is always read")
    g = torch.Generator().manual_seed(1)
    stopped = 0
    for trial in range(18):
        base = torch.randn(6, 9, generator=g)
        experts = [base + torch.randn(6, 9, generator=g) * 0.1 for _ in range(3)]
        which = trial % (4 if uses_base else 3)
        target = base if which == 3 else experts[which]
        target[trial % 6, (trial * 5) % 9] = [float("nan"), float("inf"),
                                              float("-inf")][trial % 3]
        try:
            out = entry.fn(base if uses_base else None, experts, **params)
        except PolymergeError:
            stopped += 1
            continue
        assert not bool(torch.isfinite(out).all()), (trial, which)
    assert stopped < 6  # mostly results, so the property is exercised


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "task_arithmetic"])
def test_inputs_handed_over_as_stored_give_the_float32_result(make_models, outs, method):
    """The task-arithmetic family converts its bf16 inputs itself, one at a time; the result is
    the function's on whole float32 tensors (not elementwise here: density 0.4)."""
    ms = make_models("llama", 3, dtype=torch.bfloat16)
    assert get_tensor_method(method).converts_inputs
    params = {"density": 0.4} if method != "task_arithmetic" else {}
    recipe = {"merge_method": method, "base_model": str(ms.base), "dtype": "float32",
              "models": [{"model": str(e), "parameters": {"weight": 1.0, **params}}
                         for e in ms.experts]}
    got = load_state(polymerge.merge(recipe, outs / method, progress=False))
    fn = get_tensor_method(method).fn
    base = load_state(ms.base)
    experts = [load_state(e) for e in ms.experts]
    per_model = {"weight": [1.0] * 3, **{k: [v] * 3 for k, v in params.items()}}
    for name, b in base.items():
        expected = fn(b.float(), [e[name].float() for e in experts], **per_model)
        assert torch.equal(got[name], expected), name


@pytest.mark.parametrize("method,params", [
    ("model_stock", {}), ("multislerp", {"weight": 1.0}), ("karcher", {}), ("sce", {}),
    ("ramplus_tl", {}), ("arcee_fusion", {})])
def test_methods_given_inputs_as_stored_equal_their_float32_result(make_models, outs, method,
                                                                   params):
    """Methods that convert bf16 inputs themselves (chunk by chunk where it pays) give what
    they give on whole float32 copies."""
    n = 1 if method == "arcee_fusion" else 3
    ms = make_models("llama", n, dtype=torch.bfloat16)
    assert get_tensor_method(method).converts_inputs
    recipe = {"merge_method": method, "base_model": str(ms.base), "dtype": "float32",
              "models": [{"model": str(e), "parameters": params} for e in ms.experts]}
    got = load_state(polymerge.merge(recipe, outs / method, progress=False))
    fn = get_tensor_method(method).fn
    base = load_state(ms.base)
    experts = [load_state(e) for e in ms.experts]
    per_model = {k: [v] * n for k, v in params.items()}
    for name, b in base.items():
        expected = fn(b.float(), [e[name].float() for e in experts], **per_model)
        assert torch.equal(got[name], expected), name


@pytest.mark.parametrize("chunk", [64, 1 << 18])
@pytest.mark.parametrize("kind", ["uniform", "bf16 deltas", "few values", "huge range", "zeros"])
def test_radix_select_equals_a_sort(kind, chunk, monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK", chunk)  # histograms summed over chunks
    gen = torch.Generator().manual_seed(7)
    n = 5003
    a = {
        "uniform": torch.rand(n, generator=gen),
        "bf16 deltas": ((torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16).float()
                        - torch.randn(n, generator=gen).to(torch.bfloat16).float() * 0.02
                        ).abs(),
        "few values": torch.randint(0, 4, (n,), generator=gen).float() * 0.25,
        "huge range": torch.rand(n, generator=gen)
        * torch.tensor(10.0) ** torch.randint(-38, 38, (n,), generator=gen),
        "zeros": torch.zeros(n),
    }[kind]
    ranked = sorted(a.tolist(), reverse=True)
    for k in (1, 2, n // 3, n // 2, n - 1, n):
        assert kth_largest_magnitude(a, k).item() == ranked[k - 1], (kind, k)
        top = top_k_in_chunks(lambda: a.split(chunk), k)
        assert top.threshold == ranked[k - 1]
        # the ties kept are the lowest positions holding the k-th value, as many as
        # the k largest need after the larger values
        larger = sum(v > ranked[k - 1] for v in ranked)
        at_threshold = torch.nonzero(a == ranked[k - 1]).flatten()
        assert top.ties.tolist() == at_threshold[:k - larger].tolist(), (kind, k)
        # and the mask keeps exactly the k entries a stable descending sort takes first
        expected = torch.zeros(n, dtype=torch.bool)
        expected[torch.argsort(-a, stable=True)[:k]] = True
        got = torch.cat([top.mask(c, b) for b, c in
                         zip(range(0, n, chunk), a.split(chunk), strict=True)])
        assert torch.equal(got, expected), (kind, k)


def _ties_by_definition(base, experts, weights, densities, lam):
    """TIES written out from the paper and mergekit's conventions on whole tensors: keep the
    top-k magnitudes (k = max(1, int(density * numel)), ties to the lowest position), weight,
    elect the sign of the sum (0 -> +), average the agreeing entries by their weights."""
    b = base.float().reshape(-1)
    kept = []
    for e, w, d in zip(experts, weights, densities, strict=True):
        delta = e.float().reshape(-1) - b
        k = max(1, int(d * b.numel()))
        order = torch.argsort(-delta.abs(), stable=True)
        keep = torch.zeros_like(delta)
        keep[order[:k]] = 1.0
        kept.append(delta * keep * w)
    total = torch.stack(kept).sum(0)
    sign = torch.where(total >= 0, 1.0, -1.0)
    agree = [(torch.sign(t) == sign).float() for t in kept]
    mixed = sum(t * a for t, a in zip(kept, agree, strict=True))
    divisor = sum(a * w for a, w in zip(agree, weights, strict=True))
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (b + mixed / divisor * lam).reshape(base.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ties_in_chunks_keeps_the_same_entries_as_whole_tensors(dtype, monkeypatch):
    """Two passes over small chunks (thresholds, then mask and mix) give the whole-tensor
    result bit for bit, and the definition's to float tolerance, with many tied magnitudes."""
    gen = torch.Generator().manual_seed(3)
    shape = (61, 83)
    base = torch.randn(shape, generator=gen).to(dtype)
    # few distinct delta values: the top-k threshold falls on a long run of ties
    experts = [(base.float() + torch.randint(-3, 4, shape, generator=gen) * 0.125).to(dtype)
               for _ in range(3)]
    weights, densities = [1.0, 0.5, 0.7], [0.3, 0.55, 1.0]
    fn = get_tensor_method("ties").fn
    params = {"weight": weights, "density": densities, "lambda": 0.9}
    whole = fn(base, experts, **params)  # 5063 entries: one chunk, the whole-tensor path
    monkeypatch.setattr(chunks, "CHUNK", 97)
    chunked = fn(base, experts, **params)
    assert torch.equal(chunked, whole)
    expected = _ties_by_definition(base, experts, weights, densities, 0.9)
    torch.testing.assert_close(chunked, expected, rtol=1e-6, atol=1e-6)


def test_results_made_of_lent_inputs_outlive_their_release(make_models):
    """A static method's inputs are lent by the files' mappings and released after each
    tensor. A compute that changes an input in place and returns it (or a view of it) must
    still hand over its values, and the input files stay as they were."""
    from conftest import tree_hashes

    from polymerge.registry import plan as plan_recipe

    ms = make_models("llama", 2)  # float32: the inputs reach the compute as lent
    before = {p: tree_hashes(p) for p in (ms.base, *ms.experts)}
    recipe = {"merge_method": "task_arithmetic", "base_model": str(ms.base),
              "models": [{"model": str(e)} for e in ms.experts]}
    plan = plan_recipe(recipe)
    kept: dict[str, torch.Tensor] = {}

    def compute(job, base, inputs, generator):
        return inputs[0].mul_(2).view(inputs[0].shape)

    def consume(job, result):
        kept[job.name] = result

    try:
        engine.stream(plan, compute, consume, progress=False, pure=True, native_inputs=True)
    finally:
        plan.close()
    first = load_state(ms.experts[0])
    merged = [job.name for job in plan.jobs if job.merge]
    assert merged
    for name in merged:
        assert torch.equal(kept[name], first[name] * 2), name
    assert {p: tree_hashes(p) for p in (ms.base, *ms.experts)} == before


@pytest.mark.parametrize("kind", ["normal", "integers", "tiny", "signed zeros", "negative"])
def test_order_statistics_equal_kthvalue(kind):
    """The radix select over order-preserving keys gives ``kthvalue``'s answers for values of
    any sign (Arcee Fusion's quartiles of scores that rounding can make slightly negative)."""
    gen = torch.Generator().manual_seed(11)
    n = 10007
    values = {
        "normal": torch.randn(n, generator=gen),
        "integers": torch.randint(-3, 4, (n,), generator=gen).float(),
        "tiny": torch.randn(n, generator=gen) * 1e-30,
        "signed zeros": torch.cat([torch.zeros(50), -torch.zeros(50),
                                   torch.randn(n - 100, generator=gen)]),
        "negative": -torch.rand(n, generator=gen),
    }[kind]
    ranks = [1, 2, n // 4, n // 2, 3 * n // 4, n - 1, n]
    assert order_statistics(values, ranks) == [torch.kthvalue(values, r).values.item()
                                               for r in ranks]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_temporaries_are_reused_not_faulted_in_again():
    """After the engine's allocator setting, temporaries freed and made again (a method's
    per-chunk scratch) reuse the same memory instead of faulting in fresh pages each time;
    glibc's default hands them back to the kernel and faults fresh pages in every round
    (this test fails with the setting removed)."""
    script = """
import resource, torch
from polymerge.engine import _reuse_freed_memory
_reuse_freed_memory()
x = torch.randn(1 << 21)  # 8 MiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    a, b, c = x.abs(), x.sign(), x.neg()
    del a, b, c
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    pages_per_round = 3 * (8 << 20) // 4096
    assert int(done.stdout) < 2 * pages_per_round  # the first round, not all fifty
