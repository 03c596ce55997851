"""Experts as users have them: ``XForSequenceClassification`` checkpoints with their own heads
and label sets (2, 5 and 3 labels) of one base, for BERT, RoBERTa, GPT-2 and Llama.

Every method writes a routed store (a static merge: its body once, shared; channel and twin: as
always) plus each expert's head; exports are ordinary checkpoints that transformers' pipeline
runs; a classification store answers with the routed expert's label; ``polymerge eval --data``
scores JSONL records. References are computed here with plain torch and transformers.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_state, ref_task_arithmetic, tiny_config, write_tokenizer
from safetensors.torch import save_file

import polymerge
from polymerge.errors import CheckpointError, PolymergeError
from polymerge.runtime import load_runtime
from polymerge.stores import open_store

LABELS = (2, 5, 3)
TEXTS = ["tok1 tok2 tok3", "tok7", "tok9 tok4 tok11 tok20 tok5", "tok30 tok31"]
# arch -> (base class, head class, config overrides, the expert's backbone prefix)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "bert": ("BertModel", "BertForSequenceClassification", {}, "bert."),
    "roberta": ("RobertaModel", "RobertaForSequenceClassification",
                {"pad_token_id": 0, "max_position_embeddings": 40}, "roberta."),
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification", {"pad_token_id": 0},
             "transformer."),
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification", {"pad_token_id": 0},
              "model."),
    "bert-mlm": ("BertForMaskedLM", "BertForSequenceClassification", {}, "bert."),
}
HEADS = {"bert": {"classifier.weight", "classifier.bias"},
         "roberta": {"classifier.dense.weight", "classifier.dense.bias",
                     "classifier.out_proj.weight", "classifier.out_proj.bias"},
         "gpt2": {"score.weight"}, "llama": {"score.weight"},
         "bert-mlm": {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                      "bert.pooler.dense.bias"}}


def _config(arch: str, **kw: Any) -> Any:
    import transformers

    family = "bert" if arch in ("bert", "bert-mlm") else arch
    if family == "roberta":
        cfg = transformers.RobertaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         type_vocab_size=1)
    else:
        cfg = tiny_config(family)
    for k, v in {**FAMILIES[arch][2], **kw}.items():
        setattr(cfg, k, v)
    return cfg


@dataclass
class Family:
    arch: str
    root: Path
    base: Path
    experts: list[Path]
    names: list[str]

    @property
    def prefix(self) -> str:
        return FAMILIES[self.arch][3]

    def recipe(self, method: str, **params: Any) -> dict[str, Any]:
        return {"merge_method": method, "base_model": str(self.base),
                "models": [{"model": str(e), "name": n}
                           for e, n in zip(self.experts, self.names, strict=True)],
                "parameters": params}

    def model(self, i: int) -> Any:
        from transformers import AutoModelForSequenceClassification

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForSequenceClassification.from_pretrained(self.experts[i]).eval()


def make_family(root: Path, arch: str, labels: tuple[int, ...] = LABELS, *,
                base_labels: int | None = None) -> Family:
    """A base of ``arch``'s base class and experts of its head class: the base's backbone
    plus small seeded deltas, each with a seeded head of its own label count."""
    import transformers

    base_cls, head_cls, _, _ = FAMILIES[arch]
    root.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        if base_labels is None:
            base = getattr(transformers, base_cls)(_config(arch)).eval()
        else:  # a base of the experts' own class
            base = getattr(transformers, head_cls)(_config(arch, num_labels=base_labels))
        base.save_pretrained(root / "base")
        write_tokenizer(root / "base", "base")
        backbone = base.base_model.state_dict()
        experts, names = [], []
        for i, n in enumerate(labels):
            names.append(f"task{i}")
            cfg = _config(arch, id2label={j: f"t{i}-label{j}" for j in range(n)},
                          label2id={f"t{i}-label{j}": j for j in range(n)})
            torch.manual_seed(100 + i)
            model = getattr(transformers, head_cls)(cfg).eval()
            model.base_model.load_state_dict(backbone, strict=False)
            gen = torch.Generator().manual_seed(1000 + i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            model.save_pretrained(root / names[-1])
            write_tokenizer(root / names[-1], names[-1])
            experts.append(root / names[-1])
    return Family(arch, root, root / "base", experts, names)


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("heads")
    return {arch: make_family(root / arch, arch) for arch in FAMILIES}


def encode(folder: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return dict(tok(texts, padding=True, return_tensors="pt"))


def expert_logits(fam: Family, i: int, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return fam.model(i)(**encode(fam.base, texts)).logits


def body_of(state: dict[str, torch.Tensor], prefix: str, heads: set[str]) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()
            if k not in heads}


# --------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_plan_splits_body_and_heads_before_reading(families: dict[str, Family], arch: str
                                                   ) -> None:
    fam = families[arch]
    plan = polymerge.dry_run(fam.recipe("ties"))
    assert [h.expert for h in plan.heads] == fam.names
    for h, n in zip(plan.heads, LABELS, strict=True):
        assert set(h.tensors) == HEADS[arch]
        assert h.labels == [f"t{h.index}-label{j}" for j in range(n)]
    base = set(load_state(fam.base))
    expert = load_state(fam.experts[0])
    body = {j.name for j in plan.jobs}
    assert body <= base
    # every body tensor is an expert tensor under the mapped name; nothing else was merged
    assert {plan.heads[0].expert_name(n) for n in body} == set(expert) - HEADS[arch]
    dropped = {"roberta": {"pooler.dense.weight", "pooler.dense.bias"},
               "llama": {"lm_head.weight"}}.get(arch, set())
    if arch == "bert-mlm":
        dropped = {n for n in base if n.startswith("cls.")}
    assert set(plan.dropped) == dropped
    text = plan.summary()
    assert f"body: {len(body)} tensors" in text and "heads: " in text
    assert "t1-label4" in text and "output: an expert store" in text


# --------------------------------------------------------------------------- merges and export


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_static_merge_is_a_store_whose_exports_are_ordinary_checkpoints(
        families: dict[str, Family], arch: str, tmp_path: Path) -> None:
    from transformers import pipeline

    fam = families[arch]
    out = polymerge.merge(fam.recipe("task_arithmetic", **{"lambda": 0.5}), tmp_path / "ta",
                          progress=False)
    store = open_store(out)
    assert store.method == "merged" and store.has_heads
    assert store.manifest["format_version"] == 2
    counts = store.parameter_counts()
    assert counts["heads"] == sum(t.numel() for e in fam.experts
                                  for k, t in load_state(e).items() if k in HEADS[arch])
    base = load_state(fam.base)
    experts = [load_state(e) for e in fam.experts]
    bases = {k: v for k, v in base.items() if k in store.entries}
    bodies = [{k: s[store.heads[n].expert_name(k)] for k in bases}
              for s, n in zip(experts, fam.names, strict=True)]
    ref = ref_task_arithmetic(bases, bodies, [1.0] * 3, lam=0.5)
    for i, name in enumerate(fam.names):
        folder = polymerge.export_expert(store, name, tmp_path / name)
        got = load_state(folder)
        assert set(got) == set(experts[i])  # its own class's names, its head included
        for k in HEADS[arch]:
            assert torch.equal(got[k], experts[i][k]), k
        for k, v in ref.items():
            torch.testing.assert_close(got[store.heads[name].expert_name(k)].double(), v,
                                       atol=1e-6, rtol=1e-5)
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architectures"] == [FAMILIES[arch][1]]
        assert len(cfg["id2label"]) == LABELS[i]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = pipeline("text-classification", model=str(folder))
            answers = pipe(TEXTS)
        rt = load_runtime(out)
        mine = rt.classify(TEXTS, name)
        assert [a["label"] for a in answers] == [m["label"] for m in mine]
        assert all(a["label"].startswith(f"t{i}-") for a in answers)
        for a, m in zip(answers, mine, strict=True):
            assert a["score"] == pytest.approx(m["score"], abs=1e-5)


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "llama", "bert-mlm"])
def test_channel_k_n_and_twin_full_rank_give_back_each_expert(
        families: dict[str, Family], arch: str, tmp_path: Path) -> None:
    fam = families[arch]
    channel = polymerge.merge(fam.recipe("channel", groups=3, density=1.0, **{"lambda": 1.0}),
                              tmp_path / "channel", progress=False)
    twin = polymerge.merge(fam.recipe("twin", rank=1.0), tmp_path / "twin", progress=False)
    for i, name in enumerate(fam.names):
        ref = expert_logits(fam, i, TEXTS)
        own = load_state(fam.experts[i])
        exported = load_state(polymerge.export_expert(channel, name, tmp_path / f"c-{name}"))
        assert set(exported) == set(own)
        for k, v in own.items():  # K = N keeps every expert: tensor for tensor
            torch.testing.assert_close(exported[k], v, atol=1e-6, rtol=1e-6, msg=k)
        store = open_store(twin)  # twin: each body tensor is shared + u_t v_t, as promised
        mine = load_state(polymerge.export_expert(store, name, tmp_path / f"t-{name}"))
        assert set(mine) == set(own)
        for k, e in store.entries.items():
            pieces = store.pieces
            if e.kind == "twin":
                want = pieces[f"{k}@shared"] + pieces[f"{k}@u.{i}"] @ pieces[f"{k}@v.{i}"]
            else:
                want = pieces[f"{k}@expert.{i}" if e.kind == "expert" else f"{k}@shared"]
            torch.testing.assert_close(mine[store.heads[name].expert_name(k)], want)
        for k in HEADS[arch]:
            assert torch.equal(mine[k], own[k])
        for out in (channel, twin):
            res = load_runtime(out).forward(TEXTS, name)
            got = torch.stack(res.outputs)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
            assert res.labels == [fam.model(i).config.id2label[int(j)]
                                  for j in ref.argmax(-1)]


def test_routing_picks_the_head_and_soft_weights_answer_per_expert(
        families: dict[str, Family], tmp_path: Path) -> None:
    fam = families["bert"]
    out = polymerge.merge(fam.recipe("twin", rank=1.0), tmp_path / "twin", progress=False)
    rt = load_runtime(out)
    assert rt.classifies and not rt.is_causal
    per_row = ["task2", "task0", "task1", "task0"]
    res = rt.forward(TEXTS, per_row)
    for row, name in enumerate(per_row):
        i = fam.names.index(name)
        assert res.outputs[row].shape == (LABELS[i],)
        ref = expert_logits(fam, i, [TEXTS[row]])[0]
        torch.testing.assert_close(res.outputs[row], ref, atol=1e-4, rtol=1e-4)
        assert res.answer(row)["expert"] == name
        assert res.labels[row].startswith(f"t{i}-")
    answers = rt.classify(TEXTS[:2], {"task0": 0.2, "task1": 0.5, "task2": 0.3})
    for a in answers:
        assert a["expert"] == "task1" and a["label"].startswith("t1-")
        assert set(a["experts"]) == set(fam.names)
        assert a["experts"]["task2"]["label"].startswith("t2-")
        assert a["experts"]["task1"]["label"] == a["label"]
        assert a["routing"] == {"task0": 0.2, "task1": 0.5, "task2": 0.3}
    with pytest.raises(PolymergeError, match="does not generate"):
        rt.generate(TEXTS[:1], "task0")


def test_cli_run_prints_label_and_score(families: dict[str, Family], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from polymerge.cli import main

    fam = families["gpt2"]
    out = polymerge.merge(fam.recipe("ties"), tmp_path / "ties", progress=False)
    assert main(["run", str(out), TEXTS[0], "--expert", "task1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["expert"] == "task1" and rows[0]["label"].startswith("t1-")
    assert 0 < rows[0]["score"] <= 1
    assert main(["run", str(out), TEXTS[0], "--expert", "task2"]) == 0
    text = capsys.readouterr().out
    assert "-> t2-label" in text and "(score 0." in text


def test_learned_merge_with_heads_writes_a_store(families: dict[str, Family],
                                                 tmp_path: Path) -> None:
    fam = families["bert"]
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"text": t, "expert": n, "label": 0}) + "\n"
                            for n in fam.names for t in TEXTS))
    out = polymerge.merge(fam.recipe("supermerge", data=str(data), steps=2, eval_every=1,
                                     batch_size=2, granularity="expert"),
                          tmp_path / "sm", progress=False)
    store = open_store(out)
    assert store.method == "merged" and store.summary["method"] == "supermerge"
    assert (out / "coefficients.json").is_file() and not (out / ".body").exists()
    coefs = json.loads((out / "coefficients.json").read_text())["coefficients"]
    base = load_state(fam.base)
    experts = [load_state(e) for e in fam.experts]
    name = "encoder.layer.0.attention.self.query.weight"
    ref = base[name] + sum(coefs[n]["all"] * (s["bert." + name] - base[name])
                           for n, s in zip(fam.names, experts, strict=True))
    torch.testing.assert_close(store.tensor(name, 0), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(store.head_tensors("task1")["classifier.weight"],
                       experts[1]["classifier.weight"])


# --------------------------------------------------------------------------- evaluation on data


def test_eval_data_gives_the_accuracy_computed_by_hand(families: dict[str, Family],
                                                       tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    from polymerge.cli import main
    from polymerge.zoo.data_eval import evaluate_data

    fam = families["roberta"]
    out = polymerge.merge(fam.recipe("channel", groups=3, density=1.0, **{"lambda": 1.0}),
                          tmp_path / "channel", progress=False)
    records = []
    expected: dict[str, list[bool]] = {}
    for i, name in enumerate(fam.names):
        pred = expert_logits(fam, i, TEXTS).argmax(-1).tolist()
        for k, text in enumerate(TEXTS):  # gold: right for even k, wrong for odd k
            label = pred[k] if k % 2 == 0 else (pred[k] + 1) % LABELS[i]
            value: Any = label if k == 0 else f"t{i}-label{label}"  # by index or by name
            records.append({"text": text, ("task" if i == 1 else "expert"): name,
                            "label": value})
            expected.setdefault(name, []).append(label == pred[k])
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    res = evaluate_data(out, data)
    assert list(res.routings) == ["oracle"]  # no router
    by_hand = {n: sum(v) / len(v) for n, v in expected.items()}
    assert res.routings["oracle"] == pytest.approx(by_hand)
    assert res.routings["oracle"]["task0"] == 0.5
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    experts = [f"{n}={e}" for n, e in zip(fam.names, fam.experts, strict=True)]
    assert main(["eval", str(out), "--data", str(data), "--experts", *experts, "--json",
                 str(js), "--plot", str(png), "-q"]) == 0
    text = capsys.readouterr().out
    assert "oracle accuracy" in text and "normalized" in text
    got = json.loads(js.read_text())
    assert got["routings"]["oracle"]["per_expert"] == pytest.approx(by_hand)
    assert got["experts_alone"] == pytest.approx(by_hand)  # K = N: each expert exactly
    assert got["routings"]["oracle"]["normalized_mean"] == pytest.approx(100.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one plain checkpoint is one expert: its records are scored by its own head
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("expert") == "task0"))
    assert evaluate_data(fam.experts[0], one).routings["oracle"] == {"task0": 0.5}


def test_eval_data_causal_lm_scores_perplexity(make_models, tmp_path: Path) -> None:
    from polymerge.zoo.data_eval import evaluate_data

    ms = make_models("llama", 2)
    out = polymerge.merge({"merge_method": "channel", "base_model": str(ms.base),
                           "models": [{"model": str(e), "name": f"e{i}"}
                                      for i, e in enumerate(ms.experts)],
                           "parameters": {"groups": 2, "density": 1.0, "lambda": 1.0}},
                          tmp_path / "store", progress=False)
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": t, "expert": e}) + "\n"
                            for e in ("e0", "e1") for t in TEXTS[:2]))
    res = evaluate_data(out, data)
    model = ms.load(ms.experts[1])
    nll = tokens = 0.0
    for text in TEXTS[:2]:
        ids = encode(ms.base, [text])["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:],
                                                       reduction="sum"))
        tokens += ids.shape[1] - 1
    assert res.metric == "perplexity"
    assert res.routings["oracle"]["e1"] == pytest.approx(float(torch.tensor(nll / tokens).exp()),
                                                         rel=1e-4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "tok1", "expert": "e0", "label": "x"}) + "\n")
    with pytest.raises(PolymergeError, match="bad.jsonl:1: a causal LM's records take no label"):
        evaluate_data(out, bad)


# --------------------------------------------------------------------------- bad input


def test_bad_input_fails_before_anything_is_written(families: dict[str, Family],
                                                    tmp_path: Path) -> None:
    fam = families["bert"]
    # an expert whose body differs in shape from the base
    wide = tmp_path / "wide"
    wide.mkdir()
    state = load_state(fam.experts[1])
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    state[name] = torch.zeros(40, 16)
    save_file(state, wide / "model.safetensors")
    (wide / "config.json").write_text((fam.experts[1] / "config.json").read_text())
    recipe = fam.recipe("ties")
    recipe["models"][1]["model"] = str(wide)
    with pytest.raises(CheckpointError, match=rf"model task1: tensor '{name}' has shape "
                                              r"\[40, 16\], base_model has \[32, 16\]"):
        polymerge.merge(recipe, tmp_path / "out", progress=False)
    # a head name present in the base with another shape (the experts all agree)
    same = make_family(tmp_path / "same", "bert", (3, 3), base_labels=2)
    with pytest.raises(CheckpointError, match="head tensor 'classifier.(weight|bias)' has "
                                              "shape .* in every expert.*head name present "
                                              "in the base with another shape"):
        polymerge.merge(same.recipe("ties"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # the same class as the base, label counts differing across experts: heads, it works
    mixed = make_family(tmp_path / "mixed", "bert", (2, 5, 3), base_labels=2)
    plan = polymerge.dry_run(mixed.recipe("ties"))
    assert all(set(h.tensors) == HEADS["bert"] for h in plan.heads)
    assert plan.heads[0].prefix == plan.heads[0].base_prefix == ""


def test_bad_data_lines_name_the_line(families: dict[str, Family], tmp_path: Path) -> None:
    from polymerge.zoo.data_eval import evaluate_data

    fam = families["bert"]
    out = polymerge.merge(fam.recipe("ties"), tmp_path / "ties", progress=False)
    cases = [({"text": "tok1", "expert": "task1", "label": "t1-label9"},
              r"bad.jsonl:2: unknown label 't1-label9' for expert 'task1'; its labels are "
              r"t1-label0, t1-label1"),
             ({"text": "tok1", "expert": "nobody", "label": 0},
              r"bad.jsonl:2: unknown expert 'nobody'; the target's experts are task0"),
             ({"text": "tok1", "expert": "task2", "label": 3},
              r"bad.jsonl:2: label index 3 is out of range for expert 'task2'"),
             ({"text": "tok1", "label": 0}, r"bad.jsonl:2: 'expert' is required")]
    for record, message in cases:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"text": "tok2", "expert": "task0", "label": 1}) + "\n"
                       + json.dumps(record) + "\n")
        with pytest.raises(PolymergeError, match=message) as info:
            evaluate_data(out, bad)
        assert "\n" not in str(info.value)


def test_store_manifest_heads_are_checked(families: dict[str, Family], tmp_path: Path
                                          ) -> None:
    import shutil

    fam = families["bert"]
    out = polymerge.merge(fam.recipe("ties"), tmp_path / "ties", progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    man = json.loads((bad / "polymerge_store.json").read_text())
    man["heads"]["task0"]["tensors"]["classifier.weight"]["shape"] = [7, 16]
    (bad / "polymerge_store.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="the store was altered"):
        open_store(bad)
    man["heads"]["stranger"] = man["heads"].pop("task0")
    (bad / "polymerge_store.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="a head for 'stranger', which is not an expert"):
        open_store(bad)
    # a store without heads is still written as version 1
    shutil.copytree(fam.base, tmp_path / "same")
    base_only = polymerge.merge(
        {"merge_method": "channel", "base_model": str(fam.base),
         "models": [{"model": str(tmp_path / "same"), "name": "same"}]}, tmp_path / "v1",
        progress=False)
    assert json.loads((base_only / "polymerge_store.json").read_text())["format_version"] == 1
