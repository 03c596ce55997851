"""The ``polymerge`` command line: parse, call the Python API, print. Nothing else lives here.

Each group of commands is one module with ``add_commands(subparsers)``: merging and inspecting
(:mod:`.merge_cmds`), expert stores (:mod:`.store_cmds`), the zoo (:mod:`.zoo_cmds`).
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from collections.abc import Sequence

from polymerge.cli import lora_cmds, merge_cmds, serve_cmds, store_cmds, zoo_cmds
from polymerge.errors import PolymergeError
from polymerge.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polymerge",
        description="Merge fine-tuned experts of one base model into one artifact.")
    parser.add_argument("--version", action="version", version=f"polymerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (merge_cmds, store_cmds, zoo_cmds, serve_cmds, lora_cmds):
        module.add_commands(sub)
    _debug_everywhere(sub)
    return parser


def _debug_everywhere(sub: argparse._SubParsersAction) -> None:
    """``--debug`` works after the subcommand too (``polymerge merge r.yaml --debug``)."""
    for p in sub.choices.values():
        if not any("--debug" in a.option_strings for a in p._actions):
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show tracebacks on errors")
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                _debug_everywhere(action)


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``, ``\\n``...): an error quoting a
    name from a hostile file stays one line and cannot drive the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "argv", 0) is None:
        args.argv = argv  # commands that record how they were run (report)
    try:
        return int(args.func(args) or 0)
    except PolymergeError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"polymerge: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("polymerge: interrupted; no output was written", file=sys.stderr)
        return 130


def run() -> None:
    """The ``polymerge`` command: :func:`main`, then exit without a last garbage collection
    over every object the imports made (0.2 s of every command: BENCHMARKS.md, "Start-up
    and exit"). Files are closed and outputs in place by then; exit handlers still run."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
