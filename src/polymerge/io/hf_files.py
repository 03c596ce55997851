"""The non-weight files of an output HF folder: config, tokenizer, generation config, card."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import torch

from polymerge.errors import CheckpointError
from polymerge.io.checkpoint import contained_file
from polymerge.io.dtypes import dtype_name

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
)


def write_config(folder: Path, config: dict[str, Any] | None, dtype: torch.dtype) -> None:
    """Copy the reference config with its dtype fields set to the output dtype."""
    if config is None:
        return
    config = dict(config)
    for key in ("torch_dtype", "dtype"):
        config[key] = dtype_name(dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_support_files(folder: Path, source: Path) -> list[str]:
    """Copy tokenizer files and generation_config.json from ``source`` (a model folder).

    Only regular files inside ``source`` are copied: a side file that is a link leaving the
    folder (``vocab.txt -> /etc/passwd``), a FIFO or a device is refused with a
    :class:`CheckpointError` rather than copied as what it points to.
    """
    if not source.is_dir():
        return []
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if not os.path.lexists(source / name):
            continue
        _copy_regular(contained_file(source, name, "side file"), folder / name)
        copied.append(name)
    return copied


def _copy_regular(source: Path, dest: Path) -> None:
    """Copy a file's bytes, mode and times, reading it as a regular file (never blocking on a
    FIFO swapped in after the check)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(source, flags)
        with os.fdopen(fd, "rb") as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                raise CheckpointError(f"{source}: side file is not a regular file")
            with dest.open("wb") as out:
                shutil.copyfileobj(src, out)
        shutil.copystat(source, dest)
    except OSError as exc:
        raise CheckpointError(f"cannot copy {source} into the output "
                              f"({exc.strerror or exc})") from None


def tokenizer_source_dir(choice: str | None, reference: Path) -> Path:
    """``base`` (default) means the reference model's folder (also for ``union``, whose merged
    tokenizer replaces the copied files); anything else is a model path."""
    if choice in (None, "base", "union"):
        return reference if reference.is_dir() else reference.parent
    path = Path(choice).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"tokenizer_source {choice!r} is not a model folder")
    return path


def write_model_card(folder: Path, *, method: str, description: str, base: str | None,
                     inputs: list[tuple[str, str]], recipe_yaml: str, extra: str = "") -> None:
    """A short README.md stating the method, inputs and parameters, with HF front matter."""
    front = ["---", "library_name: transformers", "tags:", "- merge", "- polymerge"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    rows = "\n".join(f"| {name} | `{path}` |" for name, path in inputs)
    body = f"""
# Merged model ({method})

Made with [polymerge](https://pypi.org/project/polymerge/) using **{method}**: {description}

Base model: `{base or "none"}`

| input | path |
|---|---|
{rows}

## Recipe

```yaml
{recipe_yaml.rstrip()}
```
{extra}"""
    (folder / "README.md").write_text("\n".join(front) + "\n" + body)


RECIPE_NAME = "polymerge_recipe.yaml"


def write_output_extras(folder: Path, *, config: dict[str, Any] | None, dtype: torch.dtype,
                        support_dir: Path | None, method: str, description: str,
                        base: str | None, inputs: list[tuple[str, str]], recipe_yaml: str,
                        card_extra: str = "", write_recipe: bool = True) -> None:
    """Everything beside the weights, for every kind of output (merged checkpoint, store,
    learned merge, exported expert): config.json with the output dtype, the tokenizer and
    generation config of ``support_dir``, the recipe, and the model card."""
    write_config(folder, config, dtype)
    if support_dir is not None:
        copy_support_files(folder, support_dir)
    if write_recipe:
        (folder / RECIPE_NAME).write_text(recipe_yaml)
    write_model_card(folder, method=method, description=description, base=base, inputs=inputs,
                     recipe_yaml=recipe_yaml, extra=card_extra)
