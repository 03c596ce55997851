"""The ``polymerge`` command line: parse, call the Python API, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from polymerge.errors import PolymergeError


def _cmd_merge(args: argparse.Namespace) -> int:
    from polymerge.merge import dry_run, merge

    if args.dry_run:
        plan = dry_run(args.recipe, args.output, dtype=args.dtype, allow_pickle=args.allow_pickle,
                       force=args.force)
        print(plan.summary())
        return 0
    out = merge(args.recipe, args.output, force=args.force, device=args.device, dtype=args.dtype,
                shard_size=args.shard_size, allow_pickle=args.allow_pickle,
                progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from polymerge.inspect_model import inspect_checkpoint
    from polymerge.stores.base import is_store

    if is_store(args.path):
        from polymerge.stores import open_store

        print(open_store(args.path).describe())
        return 0
    result = inspect_checkpoint(args.path, args.base, allow_pickle=args.allow_pickle)
    print(result.render(max_tensors=args.max_tensors))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from polymerge.methods import all_methods
    from polymerge.methods.registry import REQUIRED

    for method in all_methods():
        params = ", ".join(
            f"{p.name}{'*' if p.scope == 'per_model' else ''}"
            f"={'required' if p.default is REQUIRED else p.default}" for p in method.params)
        print(f"{method.name:18s} {method.description}\n{'':18s} parameters: {params}")
    from polymerge.recipe import Recipe
    from polymerge.stores import get_store_method, store_method_names

    for name in store_method_names():
        spec = get_store_method(name)
        params = ", ".join(
            f"{p.name}{'*' if p.scope == 'per_model' else ''}"
            f"={'required' if p.default is REQUIRED else p.default}"
            for p in spec.params(Recipe(merge_method=name)))
        print(f"{name:18s} [expert store] {spec.description}\n{'':18s} parameters: {params}")
    print("\n* per-model parameter")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polymerge",
        description="Merge fine-tuned experts of one base model into one artifact.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("merge", help="merge checkpoints as a YAML recipe says",
                       description="Validate a recipe, then stream the merge into an HF "
                                   "model folder (written atomically).")
    p.add_argument("recipe", help="YAML recipe (mergekit's core format)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="where the per-tensor math runs: cpu or cuda")
    p.add_argument("--dtype", help="output dtype (default: the recipe's, else the base's)")
    p.add_argument("--shard-size", default="5GB", help="maximum shard size (default 5GB)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the plan (tensors, bytes, peak memory); write nothing")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickled .bin/.pt inputs with torch.load(weights_only=True)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("inspect", help="show a checkpoint's tensors, or its delta to a base",
                       description="Architecture, tensors, shapes, dtypes and size; with "
                                   "--base, the per-layer norm of the delta to the base.")
    p.add_argument("path", help="HF model folder, safetensors file or LoRA adapter folder")
    p.add_argument("--base", help="base model, to measure the per-layer delta")
    p.add_argument("--max-tensors", type=int, default=40, help="tensors listed (default 40)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled inputs")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("methods", help="list the merge methods and their parameters",
                       description="Every registered merge method with its parameters.")
    p.set_defaults(func=_cmd_methods)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: argparse._SubParsersAction) -> None:
    """Subsystems contribute their own subcommands through ``add_commands(subparsers)``."""
    for module_name in ("polymerge.stores.cli", "polymerge.zoo.cli"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # that subsystem is not part of this install
            raise
        module.add_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PolymergeError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"polymerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("polymerge: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
