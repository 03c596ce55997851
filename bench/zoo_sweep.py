"""What the store sweeps over a zoo suite share: the suite and its reference rows, one table row
per scored model, and the markdown file with date, machine, load and the exact command."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def add_suite_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--suite", default="cls")
    ap.add_argument("--scale", default="full")
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--out", type=Path)


class Sweep:
    """A built suite, its cached reference rows, and the rows scored so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from polymerge.zoo import evaluate as ev
        from polymerge.zoo.suite import get_suite

        self.ev = ev
        self.command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        self.started = time.time()
        self.suite = get_suite(args.suite, args.cache, scale=args.scale)
        self.suite.require_built()
        self.refs = ev.reference_rows(self.suite, progress=False)
        self.rows: list[list[str]] = []

    def add(self, name: str, scores: dict[str, Any], ratio: float, seconds: float,
            note: str = "") -> None:
        """One scored model: per-task primary metric, normalized mean, size, time, note."""
        suite, ev = self.suite, self.ev
        s = ev.summary(suite, scores, self.refs["ensemble"])
        self.rows.append([name] + [ev.fmt(suite, suite.primary, s["primary"].get(t))
                                   for t in suite.tasks]
                         + [f"{s['normalized_mean']:.1f}", f"{ratio:.3f}", f"{seconds:.1f}",
                            note])
        print(self.rows[-1], flush=True)

    def write(self, title: str, description: str, out: Path | None, stem: str,
              suffix: str = "") -> Path:
        """The markdown table, headed by ``title`` and ``description``; returns its path."""
        suite, ev = self.suite, self.ev
        base = ev.summary(suite, self.refs["base"], self.refs["ensemble"])
        header = (["model"] + list(suite.tasks)
                  + ["normalized", "params vs ensemble", "build s", "note"])
        cpu = platform.processor() or platform.machine()
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        text = "\n".join([
            f"## {title}",
            "",
            f"{_dt.date.today().isoformat()}, {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} cores ({cpu}), load {load}; torch {torch.__version__}. "
            f"Command: `{self.command}` ({time.time() - self.started:.0f} s).",
            "",
            f"Scores: test {suite.primary} per task; normalized = mean of score / own expert "
            f"x 100 (the base scores {base['normalized_mean']:.1f}, the ensemble 100 at ratio "
            f"1). {description}",
            "",
            ev.markdown_table(header, self.rows),
            "",
        ])
        scale = "" if suite.scale == "full" else "-" + suite.scale
        path = out or ROOT / "bench" / "results" / f"{stem}_{suite.name}{scale}{suffix}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(text)
        return path
