"""Tiny models, tokenizers and experts for the store, router and runtime tests.

Experts come in two families (0, 1) and (2, 3): each family shares one random direction per
output row, so a similarity clustering with K = 2 has a right answer on most rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WORDS_A = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum"]
WORDS_B = ["car", "bus", "train", "plane", "boat", "truck", "bike", "tram", "ship", "taxi"]
WORDS_C = ["red", "blue", "green", "black", "white", "pink", "brown", "gray", "gold", "teal"]
WORDS_D = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
FAMILIES = (WORDS_A, WORDS_B, WORDS_C, WORDS_D)


def make_tokenizer(folder: Path) -> None:
    """A word-level fast tokenizer over the test words, saved in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for family in FAMILIES for w in family] + ["the", "a", "is", "and"]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3, "[CLS]": 4, "[SEP]": 5}
    for w in words:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    fast.save_pretrained(folder)


def llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
                       eos_token_id=3)


def bert_config() -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)


def make_family(root: Path, kind: str = "llama", n: int = 4, scale: float = 0.05,
                noise: float = 0.01, seed: int = 0, dtype: torch.dtype = torch.float32
                ) -> tuple[Path, list[Path]]:
    """A base model and ``n`` experts under ``root``; returns (base, experts)."""
    from transformers import BertModel, LlamaForCausalLM

    cls, cfg = (LlamaForCausalLM, llama_config()) if kind == "llama" else \
        (BertModel, bert_config())
    torch.manual_seed(seed)
    base = cls(cfg).to(dtype)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    make_tokenizer(base_dir)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    directions: dict[str, list[torch.Tensor]] = {}
    for name, t in state.items():
        if t.is_floating_point():
            directions[name] = [torch.randn(t.shape, generator=g) for _ in range(2)]
    experts = []
    for i in range(n):
        family = 0 if i < n // 2 else 1
        new = {}
        for name, t in state.items():
            if not t.is_floating_point():
                new[name] = t
                continue
            delta = scale * directions[name][family] + noise * torch.randn(t.shape, generator=g)
            new[name] = (t.float() + delta).to(dtype)
        model = cls(cfg).to(dtype)
        model.load_state_dict(new)
        out = root / f"expert{i}"
        model.save_pretrained(out)
        make_tokenizer(out)
        experts.append(out)
    return base_dir, experts


def recipe(base: Path, experts: list[Path], **params: Any) -> dict[str, Any]:
    return {"merge_method": "channel", "base_model": str(base),
            "models": [{"model": str(e), "name": e.name} for e in experts],
            "parameters": params}
