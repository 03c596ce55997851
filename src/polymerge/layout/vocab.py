"""The output vocabulary of a recipe with a ``tokenizer:`` section (or ``tokenizer_source``),
and the alignment of every model's embedding and LM-head rows to it, as mergekit 0.1.5 does.

The output tokenizer is the base's (``source: base``; tokens whose id is not below the base's
``vocab_size`` are dropped, as mergekit does), a model's (``source: <path>``), or the ``union``:
the base's tokenizer plus every other model's tokens it lacks, appended in recipe order (a
model's ordinary tokens by id first, then every model's added tokens). The ``tokens`` listed in
the section are added when missing. Its size is padded to ``pad_to_multiple_of``.

Each model's vocabulary tensors (embeddings, LM head: rows indexed by token id) are rebuilt with
the output's rows before the merge method sees them: a token the model has keeps its row; a
token it lacks, or one the recipe ``force``s, gets a default row: the token's ``source`` when
given (a model's row, ``{kind: model_token, model, token_id | token}``, or ``{kind: zero}``),
else the one model that has it, else the base's row when the base has it, else the mean of the
rows of the models that have it (zero when none has). Padding rows are the mean of the real
rows. The method then merges these aligned tensors as usual, so a token only one expert added
keeps that expert's row.

One difference from mergekit: mergekit walks the models in the order of a Python set and a
tokenizer's vocabulary in hash order, so with several new ordinary tokens from several models
its token ids change from run to run; polymerge's are fixed (recipe order, then id order).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymerge.errors import CheckpointError, PolymergeError, RecipeError
from polymerge.io.checkpoint import is_lora_adapter, split_model_ref
from polymerge.io.hf_files import TOKENIZER_FILES
from polymerge.io.pretrained import check_folder_files
from polymerge.recipe import TokenSetting, TokenSource, warn_recipe


def canonical(path: str) -> str:
    """One spelling per model (``model+adapter`` part by part), to match recipe references."""
    model, adapter = split_model_ref(path)
    parts = [model] if adapter is None else [model, adapter]
    return "+".join(str(Path(p).expanduser().resolve()) for p in parts)


def tokenizer_folder(path: str) -> Path | None:
    """Where a model's tokenizer lives: the model's folder (the model's, for
    ``model+adapter``); a plain adapter folder only if it saved one; None otherwise."""
    model, _ = split_model_ref(path)
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    if is_lora_adapter(folder) and not any(
            os.path.lexists(folder / n) for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    if not any(os.path.lexists(folder / n) for n in TOKENIZER_FILES):
        return None
    return folder


def _auto_tokenizer() -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise PolymergeError("merging vocabularies (a tokenizer section, tokenizer_source) "
                             "needs transformers: pip install 'polymerge[hf]'") from None
    return AutoTokenizer


def load_tokenizer(folder: Path, what: str) -> Any:
    """A fast tokenizer from a local folder; a one-line error when it cannot be loaded. Its
    files must be regular files inside the folder (no link out of it is read)."""
    check_folder_files(folder, f"{what}: tokenizer folder")
    try:
        return _auto_tokenizer().from_pretrained(str(folder), use_fast=True)
    except PolymergeError:
        raise
    except Exception as exc:  # transformers raises many kinds here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what}: cannot load the tokenizer in {folder} ({reason})") \
            from None


def _copy(tokenizer: Any, edit: Any = None) -> Any:
    """A fresh copy of a tokenizer (saved and reloaded), its tokenizer.json edited by ``edit``
    on the way; the original is never changed."""
    with tempfile.TemporaryDirectory(prefix="polymerge-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        if edit is not None:
            path = Path(tmp) / "tokenizer.json"
            path.write_text(json.dumps(edit(json.loads(path.read_text(encoding="utf-8")))),
                            encoding="utf-8")
        return _auto_tokenizer().from_pretrained(tmp, use_fast=True)


def _strip(tokenizer: Any, size: int, what: str) -> Any:
    """The tokenizer without the tokens whose id is not below ``size`` (rows the model's
    embedding does not have), as mergekit strips the base's tokenizer."""
    unused = {t for t, i in tokenizer.get_vocab().items() if i >= size}
    if not unused:
        return tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"{what}: its tokenizer has {len(unused)} tokens beyond the "
                              f"model's {size} rows and is not a fast tokenizer")

    def edit(data: dict[str, Any]) -> dict[str, Any]:
        model = data.get("model") or {}
        vocab = model.get("vocab")
        if not isinstance(vocab, dict):
            raise CheckpointError(f"{what}: its tokenizer ({model.get('type')}) has tokens "
                                  f"beyond the model's {size} rows; only BPE, WordPiece and "
                                  "WordLevel tokenizers can be cut to the model")
        for token in unused:
            vocab.pop(token, None)
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < size]
        if isinstance(model.get("merges"), list):
            def keep(merge: Any) -> bool:
                pair = merge.split(" ") if isinstance(merge, str) else merge
                return not any(p in unused for p in pair)

            model["merges"] = [m for m in model["merges"] if keep(m)]
        return data

    return _copy(tokenizer, edit)


@dataclass
class Vocabulary:
    """The output tokenizer and, per model, the row of each output token in that model."""

    tokenizer: Any
    vocab: dict[str, int]
    size: int  # rows of the output's vocabulary tensors (padded)
    rows: dict[str, torch.Tensor]  # model key -> (len(vocab),) row in the model, or -1
    original: dict[str, dict[str, int]]  # model key -> its own token -> row
    settings: dict[str, TokenSetting] = field(default_factory=dict)
    base_key: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.vocab)

    def check(self, keys: list[str], where: str) -> None:
        """Every token source the recipe names must be among ``keys`` (the models of one
        vocabulary tensor) and have the row it names: checked before any tensor is read."""
        for token, setting in self.settings.items():
            src = setting.source
            model = src.model if isinstance(src, TokenSource) else src
            if model is None:
                continue
            key = canonical(model)
            if key not in keys:
                raise RecipeError(f"tokenizer: token {token!r} takes its embedding from "
                                  f"{model}, which is not among the models of {where}")
            if isinstance(src, TokenSource):
                if src.token is not None and src.token not in self.original.get(key, {}):
                    raise RecipeError(f"tokenizer: token {token!r}: {model} has no token "
                                      f"{src.token!r}")
            elif int(self.rows[key][self.vocab[token]]) < 0:
                raise RecipeError(f"tokenizer: token {token!r} takes its embedding from "
                                  f"{model}, whose vocabulary lacks it")

    def align(self, keys: list[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each model's vocabulary tensor (rows = its own token ids) rebuilt with the output's
        rows (see the module docstring); float32, ``size`` rows."""
        n = self.tokens
        tensors = [t.float() for t in tensors]
        rows = torch.stack([self.rows[k] for k in keys])
        present = rows >= 0
        forced = torch.zeros(n, dtype=torch.bool)
        for token, setting in self.settings.items():
            if setting.force and token in self.vocab:
                forced[self.vocab[token]] = True
        needs = (~present.all(0)) | forced
        defaults: dict[int, torch.Tensor] = {}
        for t in needs.nonzero().flatten().tolist():
            defaults[t] = self._default(t, keys, tensors, rows, present)
        out = []
        for m, x in enumerate(tensors):
            new = x.new_zeros((self.size, *x.shape[1:]))
            keep = present[m] & ~forced
            idx = keep.nonzero().flatten()
            new[idx] = x[rows[m, idx]]
            for t, row in defaults.items():
                if not keep[t]:
                    new[t] = row
            if self.size > n:
                new[n:] = new[:n].mean(0)
            out.append(new)
        return out

    def _default(self, t: int, keys: list[str], tensors: list[torch.Tensor],
                 rows: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        token = self._token_of(t)
        setting = self.settings.get(token)
        src = setting.source if setting is not None else None
        shape = tensors[0].shape[1:]
        if isinstance(src, TokenSource):
            if src.kind == "zero":
                return tensors[0].new_zeros(shape)
            assert src.model is not None
            m = keys.index(canonical(src.model))
            row = src.token_id if src.token_id is not None else \
                self.original[keys[m]][str(src.token)]
            if row >= tensors[m].shape[0]:
                raise RecipeError(f"tokenizer: token {token!r}: row {row} is beyond "
                                  f"{src.model}'s {tensors[m].shape[0]} rows")
            return tensors[m][row]
        if isinstance(src, str):
            m = keys.index(canonical(src))
            return tensors[m][int(rows[m, t])]
        have = present[:, t].nonzero().flatten().tolist()
        if not have:
            warn_recipe(f"tokenizer: token {token!r} is in no model's vocabulary; its "
                        "embedding is zero")
            return tensors[0].new_zeros(shape)
        if len(have) == 1:
            return tensors[have[0]][int(rows[have[0], t])]
        if self.base_key is not None and self.base_key in keys:
            b = keys.index(self.base_key)
            if bool(present[b, t]):
                return tensors[b][int(rows[b, t])]
        return torch.stack([tensors[m][int(rows[m, t])] for m in have]).mean(0)

    def _token_of(self, t: int) -> str:
        inverse = getattr(self, "_inverse", None)
        if inverse is None:
            inverse = {i: tok for tok, i in self.vocab.items()}
            self._inverse = inverse
        return inverse[t]


def build_vocabulary(models: list[tuple[str, int]], base: str | None, source: str,
                     settings: dict[str, TokenSetting] | None,
                     pad_to_multiple_of: int | None) -> Vocabulary:
    """The output vocabulary of ``models`` (each ``(path, rows of its embedding)``, in recipe
    order; ``base`` the base's path, else the first model is the base for the tokenizer)."""
    if not models:
        raise RecipeError("tokenizer: the recipe names no model")
    sizes = {canonical(p): n for p, n in models}
    paths = {canonical(p): p for p, _ in models}
    base_key = canonical(base) if base is not None else canonical(models[0][0])
    if base_key not in sizes:
        raise RecipeError("tokenizer: the base model is not among the merged models")
    base_folder = tokenizer_folder(paths[base_key])
    if base_folder is None:
        raise CheckpointError(f"tokenizer: {paths[base_key]} has no tokenizer files to start "
                              "the output's vocabulary from")
    base_tok = _strip(load_tokenizer(base_folder, "base model"), sizes[base_key],
                      paths[base_key])
    tokenizers = {base_key: base_tok}
    for key in sizes:
        if key == base_key:
            continue
        folder = tokenizer_folder(paths[key])
        if folder is None:
            warn_recipe(f"tokenizer: {paths[key]} has no tokenizer; assuming the base's "
                        "vocabulary for it")
            continue
        tokenizers[key] = load_tokenizer(folder, paths[key])
    if source == "union":
        out = _union(base_tok, tokenizers, sizes)
    elif source == "base":
        out = base_tok
    else:
        folder = tokenizer_folder(source)
        if folder is None:
            raise CheckpointError(f"tokenizer source {source} has no tokenizer files")
        out = load_tokenizer(folder, f"tokenizer source {source}")
    settings = dict(settings or {})
    existing = set(out.get_vocab())
    for token in settings:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    vocab = out.get_vocab()
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    rows: dict[str, torch.Tensor] = {}
    original: dict[str, dict[str, int]] = {}
    for key, n_rows in sizes.items():
        own = tokenizers.get(key, base_tok).get_vocab()
        original[key] = {t: i for t, i in own.items() if i < n_rows}
        index = torch.full((len(vocab),), -1, dtype=torch.long)
        for token, i in vocab.items():
            j = own.get(token)
            if j is not None and j < n_rows:
                index[i] = j
        rows[key] = index
    return Vocabulary(out, vocab, size, rows, original, settings, base_key)


def _union(base_tok: Any, tokenizers: dict[str, Any], sizes: dict[str, int]) -> Any:
    """The base's tokenizer plus every model's tokens it lacks (see the module docstring)."""
    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for key, tok in tokenizers.items():
        n_rows = sizes[key]
        special = {info.content: info for i, info in sorted(tok.added_tokens_decoder.items())
                   if i < n_rows}
        for token, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < n_rows and token not in special:
                ordinary.setdefault(token)
        for content, info in special.items():
            if content in added and str(added[content]) != str(info):
                warn_recipe(f"tokenizer: token {content!r} is added with different settings "
                            "by different models; the first model's are used")
            added.setdefault(content, info)
    out = _copy(base_tok)
    base_vocab = base_tok.get_vocab()
    for token in ordinary:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def save_tokenizer(vocabulary: Vocabulary, folder: Path, chat_template: str | None) -> None:
    """Write the output tokenizer into ``folder``, replacing any tokenizer file there."""
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    tokenizer = vocabulary.tokenizer
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(folder))
