"""The built-in suites by name (what ``--suite`` and a learned merge's ``data:`` accept)."""

from __future__ import annotations

from pathlib import Path

from polymerge.errors import PolymergeError
from polymerge.zoo.cls import ClsSuite
from polymerge.zoo.gen import GenSuite
from polymerge.zoo.suite import Suite

SUITES: dict[str, type[Suite]] = {cls.name: cls for cls in (ClsSuite, GenSuite)}


def suite_names() -> list[str]:
    return list(SUITES)


def get_suite(name: str, cache: Path | str | None = None, *, scale: str = "full") -> Suite:
    """A suite in ``cache`` (default: the zoo cache) at ``scale`` (``full`` or ``mini``)."""
    try:
        cls = SUITES[name]
    except KeyError:
        raise PolymergeError(f"unknown suite {name!r}; known suites: "
                             f"{', '.join(SUITES)}") from None
    return cls(cache, scale=scale)
