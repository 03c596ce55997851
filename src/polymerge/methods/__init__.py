"""Static merge methods, one module each; a module lists its methods in ``METHODS``.

:func:`builtin_methods` collects them; the one registry (:mod:`polymerge.registry`) registers
them. Adding a static method is adding one module here.
"""

from __future__ import annotations

from polymerge.discovery import import_submodules
from polymerge.methods.schema import REQUIRED, MergeMethod, Param, Schema


def builtin_methods() -> list[MergeMethod]:
    """Every ``METHODS`` entry of this package's modules, sorted by name."""
    found = [m for module in import_submodules(__name__, __path__)
             for m in getattr(module, "METHODS", ())]
    return sorted(found, key=lambda m: m.name)


__all__ = ["REQUIRED", "MergeMethod", "Param", "Schema", "builtin_methods"]
