"""Router features: the mean-pooled last hidden state of a feature model, once per query.

The feature model is given by the caller: a model folder, whose backbone is loaded
(``AutoModel``: ``BertModel`` for an encoder, ``LlamaModel`` for a causal LM, whose weights load
from a ``...ForCausalLM`` folder), or a module already built (a runtime's own model). A folder is
loaded under polymerge's rules (:mod:`polymerge.io.pretrained`): files inside it only, and
pickled weights only with ``allow_pickle``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polymerge.engine import resolve_device
from polymerge.errors import CheckpointError, PolymergeError
from polymerge.io.checkpoint import first_line
from polymerge.io.pretrained import check_folder_files, load_pretrained

DEFAULT_MAX_LENGTH = 256


def check_max_length(value: object) -> int:
    """A token limit per text: an integer of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PolymergeError(f"max length must be a whole number of tokens >= 1, got {value!r}")
    return value


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where ``mask`` is 1 (padding ignored)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def load_tokenizer(path: str | Path, *, padding_side: str = "right") -> Any:
    """The tokenizer saved in a model or store folder, with a pad token guaranteed.

    Its files must be regular files inside the folder (a link out of it is refused)."""
    folder = check_folder_files(path, "tokenizer folder")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # the tokenizers library raises a bare Exception on bad files
        raise CheckpointError(f"{path}: no usable tokenizer ({first_line(exc)})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise CheckpointError(f"{path}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


class FeatureModel:
    """A backbone and tokenizer turning texts into pooled feature vectors.

    ``model_path``: a model folder whose backbone is loaded (pickled weights only with
    ``allow_pickle``), or, with ``model`` (a module the caller built), only the label recorded
    with a router (and the default tokenizer folder). Calls from several threads are safe
    (tokenizing is serialized).
    """

    def __init__(self, model_path: str | Path, *, tokenizer_path: str | Path | None = None,
                 device: str | torch.device = "cpu", max_length: int = DEFAULT_MAX_LENGTH,
                 model: torch.nn.Module | None = None, allow_pickle: bool = False) -> None:
        self.path = Path(model_path).expanduser()
        self.device = resolve_device(device)
        self.max_length = check_max_length(max_length)
        if model is None:
            if not (self.path / "config.json").is_file():
                raise PolymergeError(f"router feature model {self.path} is not a model folder; "
                                     "pass the base model's path (--base)")
            from transformers import AutoModel

            model = load_pretrained(AutoModel, self.path, allow_pickle=allow_pickle,
                                    what="router feature model", dtype=torch.float32)
        self.model = model.to(self.device).eval()
        self.tokenizer = load_tokenizer(tokenizer_path or self.path)
        self._lock = threading.Lock()
        self.hidden_size = int(getattr(self.model.config, "hidden_size", 0)) or None

    @torch.inference_mode()
    def from_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled features of an already tokenized batch."""
        out = self.model(input_ids=input_ids.to(self.device),
                         attention_mask=attention_mask.to(self.device))
        hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        return mean_pool(hidden.float(), attention_mask.to(self.device))

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
        """(len(texts), hidden) features; batches are formed by length to limit padding."""
        if not texts:
            return torch.zeros((0, self.hidden_size or 0))
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[torch.Tensor | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            with self._lock:
                enc = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
            feats = self.from_ids(enc["input_ids"], enc["attention_mask"]).cpu()
            for row, i in enumerate(chunk):
                out[i] = feats[row]
        return torch.stack([t for t in out if t is not None])
