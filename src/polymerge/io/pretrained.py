"""Model folders loaded by transformers (``from_pretrained``) under polymerge's own rules.

transformers reads what a folder names: config, tokenizer files, shards an index lists, pickled
weights. Before it does, the folder is checked the way polymerge checks its own inputs: the
files it may read are regular files inside the folder (:func:`contained_file`), the weights
open with polymerge's reader (headers validated, shards inside the folder), and pickled weights
are refused unless the caller allows them; the load itself then asks for safetensors only. A
failure of the library on a malformed file is one :class:`CheckpointError` line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from polymerge.errors import CheckpointError
from polymerge.io.checkpoint import (
    PICKLE_SUFFIXES,
    contained_file,
    first_line,
    open_checkpoint,
    read_model_config,
)

READ_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".safetensors",
                 *PICKLE_SUFFIXES)
"""Files of a model folder that transformers may open (config, tokenizer, weights)."""
TEMPLATES_DIR = "additional_chat_templates"


def check_folder_files(folder: str | Path, what: str = "model folder") -> Path:
    """``folder``, checked: every file transformers may read from it (by suffix, at its top
    level and in ``additional_chat_templates/``) is a regular file inside it."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{what} {root} is not a folder")
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise CheckpointError(f"{what} {root}: cannot list it ({exc.strerror or exc})") from None
    for name in names:
        if name == TEMPLATES_DIR:
            sub = contained_dir(root, name, what)
            for inner in sorted(os.listdir(sub)):
                contained_file(root, Path(name) / inner, "tokenizer file")
        elif name.endswith(READ_SUFFIXES):
            contained_file(root, name, "file")
    return root


def contained_dir(folder: Path, name: str, what: str) -> Path:
    """``folder / name``, a directory that stays inside ``folder``."""
    real = Path(os.path.realpath(folder / name))
    if not real.is_relative_to(Path(os.path.realpath(folder))) or not real.is_dir():
        raise CheckpointError(f"{what} {folder}: {name!r} is not a folder inside it")
    return folder / name


def load_config(folder: str | Path, what: str = "model folder") -> Any:
    """The folder's transformers config (``AutoConfig``), from a checked ``config.json``."""
    root = Path(folder).expanduser()
    if read_model_config(root) is None:
        raise CheckpointError(f"{what} {root} has no config.json")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(root))
    except Exception as exc:  # transformers raises many types on a bad config
        raise CheckpointError(f"{root / 'config.json'}: not a config transformers can load "
                              f"({first_line(exc)})") from None


def check_weights(folder: str | Path, *, allow_pickle: bool, what: str = "model") -> None:
    """The folder's weights open with polymerge's reader: headers valid, shards inside the
    folder, pickles only when allowed (the error then names ``--allow-pickle``)."""
    open_checkpoint(folder, allow_pickle=allow_pickle, label=what).close()


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No load reports (``UNEXPECTED`` keys of a backbone loaded from a model with a head) or
    progress bars from transformers while a model loads."""
    import transformers.utils.logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(cls: Any, folder: str | Path, *, allow_pickle: bool = False,
                    what: str = "model", **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder, **kwargs)`` after the folder's config, files and weights
    are checked; pickled weights load only with ``allow_pickle`` (then by transformers'
    ``torch.load(weights_only=True)``)."""
    root = check_folder_files(folder, what)
    load_config(root, what)
    check_weights(root, allow_pickle=allow_pickle, what=what)
    try:
        with quiet_loading():
            return cls.from_pretrained(str(root), use_safetensors=None if allow_pickle else True,
                                       **kwargs)
    except Exception as exc:  # a malformed folder fails in many ways
        raise CheckpointError(f"{what} {root}: cannot load it ({first_line(exc)})") from None
