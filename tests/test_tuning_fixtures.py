"""Tiny real models for the learned-merge tests: BERT experts of one encoder, each an ordinary
``BertForSequenceClassification`` checkpoint with its own head and labels (mean-pooled, as the
zoo's cls experts), and a Llama with a LoRA expert, fine-tuned for a few seconds on synthetic
tasks whose answer is one keyword in the text. Built once per test module."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from polymerge.io.heads import head_config

NOISE = [f"w{i}" for i in range(24)]
TASKS: dict[str, dict[str, str]] = {
    # task -> keyword -> label
    "polarity": {"good": "pos", "great": "pos", "bad": "neg", "awful": "neg"},
    "color": {"red": "red", "blue": "blue", "green": "green"},
    "size": {"big": "large", "huge": "large", "small": "little", "tiny": "little"},
}
DOMAINS: dict[str, list[str]] = {
    # causal LM domains: a deterministic next-word pattern per domain
    "count": ["one", "two", "three", "four", "five", "six"],
    "greek": ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"],
}


def labels_of(task: str) -> list[str]:
    return sorted(set(TASKS[task].values()))


def vocabulary() -> list[str]:
    words = ["[PAD]", "[UNK]", "[EOS]", *NOISE]
    for kw in TASKS.values():
        words += list(kw)
    for seq in DOMAINS.values():
        words += seq
    return list(dict.fromkeys(words))


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")
    fast.save_pretrained(folder)


def cls_examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """Texts of 5 noise words with one keyword at a random place; the keyword decides."""
    rng = random.Random(f"{task}:{seed}")
    keys = sorted(TASKS[task])
    out = []
    for i in range(n):
        kw = keys[i % len(keys)]
        words = rng.choices(NOISE, k=5)
        words.insert(rng.randrange(6), kw)
        out.append((" ".join(words), TASKS[task][kw]))
    return out


def lm_texts(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{domain}:{seed}")
    seq = DOMAINS[domain]
    out = []
    for _ in range(n):
        start = rng.randrange(len(seq))
        out.append(" ".join(seq[(start + k) % len(seq)] for k in range(8)))
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class ClsZoo:
    root: Path
    base: Path
    experts: dict[str, Path]
    val: Path


def _encode(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def make_cls_zoo(root: Path, tasks: tuple[str, ...] = ("polarity", "color", "size")) -> ClsZoo:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    base = root / "base"
    cfg = BertConfig(vocab_size=len(vocabulary()), hidden_size=24, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(cfg, add_pooling_layer=False)
    model.save_pretrained(base)
    save_tokenizer(base)
    tok = AutoTokenizer.from_pretrained(base)
    experts = {}
    for k, task in enumerate(tasks):
        torch.manual_seed(100 + k)
        enc = BertModel.from_pretrained(base, add_pooling_layer=False)
        labels = labels_of(task)
        head = torch.nn.Linear(cfg.hidden_size, len(labels))
        data = cls_examples(task, 96, seed=1)
        ids, mask = _encode(tok, [t for t, _ in data])
        y = torch.tensor([labels.index(lab) for _, lab in data])
        opt = torch.optim.Adam(list(enc.parameters()) + list(head.parameters()), lr=5e-3)
        for _ in range(40):
            loss = torch.nn.functional.cross_entropy(
                head(_pool(enc(input_ids=ids, attention_mask=mask).last_hidden_state, mask)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out = root / "experts" / task
        out.mkdir(parents=True)
        state = {f"bert.{k2}": v.detach().contiguous() for k2, v in enc.state_dict().items()}
        state.update({f"classifier.{k2}": v.detach().contiguous()
                      for k2, v in head.state_dict().items()})
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        config = head_config(cfg.to_dict(), labels, classifier_pooling="mean",
                             finetuning_task=task, architectures=[
                                 "BertForSequenceClassification"])
        (out / "config.json").write_text(json.dumps(config))
        save_tokenizer(out)
        experts[task] = out
    records = [{"text": t, "label": lab, "task": task}
               for task in tasks for t, lab in cls_examples(task, 30, seed=7)]
    val = write_jsonl(root / "val.jsonl", records)
    return ClsZoo(root, base, experts, val)


@dataclass
class LmZoo:
    root: Path
    base: Path
    experts: dict[str, Path]
    val: Path


def make_lm_zoo(root: Path) -> LmZoo:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = root / "base"
    cfg = LlamaConfig(vocab_size=len(vocabulary()), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(base)
    save_tokenizer(base)
    tok = AutoTokenizer.from_pretrained(base)
    experts = {}
    for k, domain in enumerate(DOMAINS):
        torch.manual_seed(200 + k)
        model = LlamaForCausalLM.from_pretrained(base)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8,
                                                 target_modules=["q_proj", "v_proj", "up_proj"]))
        ids, mask = _encode(tok, lm_texts(domain, 32, seed=1))
        labels = ids.masked_fill(mask == 0, -100)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        for _ in range(30):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        out = root / "experts" / domain
        model.save_pretrained(out, safe_serialization=True)
        experts[domain] = out
    records = [{"text": t, "task": d} for d in DOMAINS for t in lm_texts(d, 16, seed=7)]
    val = write_jsonl(root / "val.jsonl", records)
    return LmZoo(root, base, experts, val)
