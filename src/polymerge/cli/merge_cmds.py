"""``merge``, ``inspect`` and ``methods``: the commands every kind of method shares."""

from __future__ import annotations

import argparse

from polymerge import api
from polymerge.methods.schema import REQUIRED
from polymerge.recipe import Recipe
from polymerge.registry import KIND_LABELS, all_methods


def _cmd_merge(args: argparse.Namespace) -> int:
    if args.dry_run:
        from polymerge.engine import resolve_device

        resolve_device(args.device)  # the run it plans would need it
        plan = api.dry_run(args.recipe, args.output, dtype=args.dtype,
                           allow_pickle=args.allow_pickle, force=args.force)
        print(plan.summary())
        return 0
    out = api.merge(args.recipe, args.output, force=args.force, device=args.device,
                    dtype=args.dtype, shard_size=args.shard_size,
                    allow_pickle=args.allow_pickle, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from polymerge.inspect_model import inspect_checkpoint
    from polymerge.stores import is_store, open_store

    if is_store(args.path):
        print(open_store(args.path).describe())
        return 0
    result = inspect_checkpoint(args.path, args.base, allow_pickle=args.allow_pickle)
    print(result.render(max_tensors=args.max_tensors))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    for method in all_methods():
        schema = method.schema(Recipe(merge_method=method.name))
        params = ", ".join(
            f"{p.name}{'*' if p.scope == 'per_model' else ''}"
            f"={'required' if p.default is REQUIRED else p.default}" for p in schema.params)
        label = "" if method.kind == "tensor" else f"[{KIND_LABELS[method.kind]}] "
        print(f"{method.name:18s} {label}{method.description}\n"
              f"{'':18s} parameters: {params}")
    print("\n* per-model parameter")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge checkpoints as a YAML recipe says",
                       description="Validate a recipe, then stream the merge into an HF "
                                   "model folder, an expert store or a learned merge's "
                                   "output (written atomically).")
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

    p = sub.add_parser("inspect", help="show a checkpoint's tensors or a store's contents",
                       description="A checkpoint: architecture, tensors, shapes, dtypes and "
                                   "size; with --base, the per-layer norm of the delta to the "
                                   "base. An expert store: its experts, pieces, stored size "
                                   "against the ensemble, and router.")
    p.add_argument("path", help="HF model folder, safetensors file, LoRA adapter folder or "
                                "expert store")
    p.add_argument("--base", help="base model, to measure the per-layer delta")
    p.add_argument("--max-tensors", type=int, default=40, help="tensors listed (default 40)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled inputs")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("methods", help="list the merge methods and their parameters",
                       description="Every registered merge method (static, expert store, "
                                   "learned; plugins included) with its parameters.")
    p.set_defaults(func=_cmd_methods)
