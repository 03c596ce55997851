"""The ``tokenizer:`` section on tiny WordLevel tokenizers made here: experts that added tokens
(an ordinary word, special tokens), the union's token ids, the embedding and LM-head rows of
new tokens (the one model that has a token gives its row), forced and sourced tokens, padding,
``source: base``; the merged model loads and runs with the merged tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_state
from safetensors.torch import save_file

import polymerge
from polymerge.errors import CheckpointError

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]  # 64 = the tiny Llama's vocab
HEADS = ("model.embed_tokens.weight", "lm_head.weight")


def save_tokenizer(folder: Path, extra_words: list[str], added: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + extra_words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    if added:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added],
                       special_tokens=True)
    tok.save_pretrained(folder)


def grow(folder: Path, rows: int, seed: int) -> None:
    """Give the model ``rows`` vocabulary rows (new rows random), as a fine-tune that added
    tokens does."""
    state = load_state(folder)
    gen = torch.Generator().manual_seed(seed)
    for name in HEADS:
        old = state[name]
        new = torch.randn(rows - old.shape[0], old.shape[1], generator=gen)
        state[name] = torch.cat([old, new]).contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = rows
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def family(make_models):
    """base (64 tokens); expert0 added the special token <tool> (id 64); expert1 the word
    ``neu`` (64) and the specials <|im_end|> (65) and <|im_start|> (66)."""
    ms = make_models("llama", 2, tokenizer=False)
    save_tokenizer(ms.base, [], [])
    save_tokenizer(ms.experts[0], [], ["<tool>"])
    grow(ms.experts[0], 65, seed=1)
    save_tokenizer(ms.experts[1], ["neu"], ["<|im_end|>", "<|im_start|>"])
    grow(ms.experts[1], 67, seed=2)
    return ms


def recipe(ms: Any, tokenizer: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    out = {"merge_method": "task_arithmetic", "base_model": str(ms.base),
           "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in ms.experts],
           **extra}
    if tokenizer is not None:
        out["tokenizer"] = tokenizer
    return out


def task_arithmetic(rows: list[torch.Tensor]) -> torch.Tensor:
    base = rows[0].double()
    return base + sum(0.5 * (r.double() - base) for r in rows[1:])


def test_union_ids_rows_padding_and_a_model_that_runs(family, outs):
    ms = family
    out = polymerge.merge(recipe(ms, {"source": "union", "pad_to_multiple_of": 8}),
                          outs / "m", progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    assert {w: vocab[w] for w in WORDS} == {w: i for i, w in enumerate(WORDS)}
    assert [vocab[t] for t in ("neu", "<tool>", "<|im_end|>", "<|im_start|>")] == \
        [64, 65, 66, 67]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 72
    merged, base, (e0, e1) = load_state(out), ms.base_state(), ms.expert_states()
    for name in HEADS:
        m = merged[name].double()
        assert m.shape == (72, 16)
        want = task_arithmetic([base[name], e0[name][:64], e1[name][:64]])
        torch.testing.assert_close(m[:64], want, atol=1e-6, rtol=1e-5)
        # a token only one model has: that model's row, whatever the method
        torch.testing.assert_close(m[64], e1[name][64].double(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m[65], e0[name][64].double(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m[66], e1[name][65].double(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m[67], e1[name][66].double(), atol=1e-6, rtol=1e-5)
        # padding rows: each model's mean row, merged
        aligned = [torch.cat([x[:64], *(r[None] for r in new)]) for x, new in (
            (base[name], [e1[name][64], e0[name][64], e1[name][65], e1[name][66]]),
            (e0[name], [e1[name][64], e0[name][64], e1[name][65], e1[name][66]]),
            (e1[name], [e1[name][64], e0[name][64], e1[name][65], e1[name][66]]))]
        pad = task_arithmetic([a.mean(0) for a in aligned])
        torch.testing.assert_close(m[68:], pad.expand(4, -1), atol=1e-6, rtol=1e-5)
    ids = tok("w1 neu <tool> <|im_start|>", add_special_tokens=False)["input_ids"]
    assert ids == [4, 64, 65, 67]
    model = ms.load(out)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, 4, 72) and torch.isfinite(logits).all()


def test_forced_and_sourced_tokens(family, outs):
    ms = family
    tokens = {"w5": {"source": {"kind": "zero"}, "force": True},
              "<tool>": {"source": {"kind": "model_token", "model": str(ms.experts[1]),
                                    "token": "neu"}},
              "brandnew": {"source": {"kind": "model_token", "model": str(ms.base),
                                      "token_id": 3}}}
    out = polymerge.merge(recipe(ms, {"source": "union", "tokens": tokens}), outs / "m",
                          progress=False)
    merged, base, (e0, e1) = load_state(out), ms.base_state(), ms.expert_states()
    for name in HEADS:
        m = merged[name].double()
        assert m.shape == (69, 16)
        assert torch.equal(merged[name][8], torch.zeros(16))  # w5, forced to zero
        neu = e1[name][64].double()  # <tool>: expert0 keeps its row, the others get neu's
        torch.testing.assert_close(m[65], neu + 0.5 * (e0[name][64].double() - neu))
        torch.testing.assert_close(m[68], base[name][3].double())  # brandnew: base's row 3


def test_source_base_keeps_the_base_vocabulary(family, outs):
    ms = family
    out = polymerge.merge(recipe(ms, {"source": "base"}), outs / "m", progress=False)
    merged, base, (e0, e1) = load_state(out), ms.base_state(), ms.expert_states()
    for name in HEADS:
        want = task_arithmetic([base[name], e0[name][:64], e1[name][:64]])
        torch.testing.assert_close(merged[name].double(), want, atol=1e-6, rtol=1e-5)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64


def test_tokenizer_source_union_and_plain_vocabulary_error(family, outs):
    ms = family
    out = polymerge.merge(recipe(ms, tokenizer_source="union"), outs / "u", progress=False)
    assert load_state(out)["lm_head.weight"].shape == (68, 16)
    with pytest.raises(CheckpointError, match="tokenizer") as info:
        polymerge.merge(recipe(ms), outs / "plain", progress=False)
    assert "vocabular" in str(info.value)
