"""Import every module of a package, so built-in entries need no hand-kept list."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def import_submodules(package: str, path: list[str]) -> list[ModuleType]:
    """Import each direct submodule of ``package`` (``path`` is its ``__path__``), in name order.

    A new method or store is one module dropped into its package: nothing else to edit.
    """
    return [importlib.import_module(f"{package}.{info.name}")
            for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name)
            if not info.name.startswith("_")]
