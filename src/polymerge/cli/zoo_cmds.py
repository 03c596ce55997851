"""Subcommands of the zoo: ``zoo build|path|list``, ``eval``, ``report`` and ``demo``.

``add_commands(subparsers)`` plugs them into the main ``polymerge`` parser.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from polymerge.errors import PolymergeError

SUITES = ("cls", "gen")


def _suite(args: argparse.Namespace, name: str | None = None):  # -> Suite
    from polymerge.zoo.suites import get_suite

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)

    return get_suite(name or args.suite, args.cache, scale=args.scale)


def _common(p: argparse.ArgumentParser, *, quiet: bool = True) -> None:
    p.add_argument("--cache", type=Path, default=None,
                   help="zoo cache folder (default: $POLYMERGE_ZOO_CACHE or "
                        "~/.cache/polymerge/zoo)")
    p.add_argument("--scale", choices=("full", "mini"), default="full",
                   help="full (default) or mini: a miniature suite (a few steps on a few dozen "
                        "examples) for smoke tests")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (default: torch's choice; 1 can be faster "
                            "on a machine busy with other work)")


# ----------------------------------------------------------------------------- commands


def cmd_build(args: argparse.Namespace) -> int:
    suite = _suite(args)
    print(f"building the {suite.name} zoo in {suite.root}", flush=True)
    report = suite.build(progress=not args.quiet)
    if report.reused:
        print(f"reused: {', '.join(report.reused)}")
    for name, info in report.info.items():
        extra = ", ".join(f"{k} {v:.3g}" for k, v in info.items()
                          if isinstance(v, (int, float)))
        print(f"built {name}: {extra}")
    print(f"done in {report.seconds:.0f} s; experts in {suite.experts_dir}")
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    suite = _suite(args)
    if args.base:
        print(suite.base_dir)
    elif args.expert:
        if args.expert not in suite.tasks:
            raise PolymergeError(f"no expert {args.expert!r} in the {suite.name} suite; "
                                 f"experts: {', '.join(suite.tasks)}")
        print(suite.expert_dir(args.expert))
    else:
        print(suite.experts_dir)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    suite = _suite(args)
    if args.expert not in suite.tasks:
        raise PolymergeError(f"no expert {args.expert!r} in the {suite.name} suite; "
                             f"experts: {', '.join(suite.tasks)}")
    if args.out.exists() and any(args.out.iterdir()):
        raise PolymergeError(f"{args.out} exists and is not empty")
    print(f"wrote {suite.export(args.expert, args.out)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from polymerge.zoo.suites import suite_names

    for name in suite_names():
        suite = _suite(args, name)
        status = suite.status()
        done = sum(v["built"] for v in status.values())
        print(f"{name} ({suite.scale}): {done}/{len(status)} built in {suite.root}")
        for entry, v in status.items():
            mark = "built  " if v["built"] else "missing"
            extra = ""
            info = v["info"]
            for k in ("validation_accuracy", "validation_loss"):
                if k in info:
                    extra += f"  {k.replace('_', ' ')} {info[k]:.3f}"
            if v["build_seconds"] is not None:
                extra += f"  ({v['build_seconds']:.0f} s)"
            print(f"  {mark} {entry}{extra}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from polymerge.zoo import evaluate as ev

    suite = _suite(args)
    weights = ev.resolve_target(args.target, suite)
    refs = ev.reference_rows(suite, progress=not args.quiet)
    scores = suite.evaluate(weights, progress=not args.quiet)
    row = ev.Row(str(args.target), scores)
    base, ensemble = _refs_rows(suite, refs)
    header, cells = ev.comparison_rows(suite, [base, row, ensemble], refs["ensemble"])
    print(ev.text_table([h for h in header if h != "build s"], [c[:-1] for c in cells]))
    _print_extra_metrics(suite, scores)
    if args.json:
        ev.write_json(args.json, ev.result_json(suite, str(args.target), scores, refs))
        print(f"scores written to {args.json}")
    if args.plot:
        from polymerge.zoo.plot import bar_chart

        bar_chart(suite, [base, row, ensemble], refs["ensemble"], args.plot,
                  f"{suite.name}: {Path(args.target).name}")
        print(f"plot written to {args.plot}")
    return 0


def _refs_rows(suite, refs):  # -> tuple[Row, Row]
    from polymerge.zoo.report import reference_table_rows

    return reference_table_rows(suite, refs)


def _print_extra_metrics(suite, scores) -> None:
    """Metrics other than the primary one (gen: loss, exact match), one line per task."""
    for task, ms in scores.items():
        extra = {k: v for k, v in ms.items() if k != suite.primary}
        if extra:
            print(f"  {task}: " + ", ".join(f"{k} {v:.4g}" for k, v in extra.items()))


def cmd_report(args: argparse.Namespace) -> int:
    from polymerge.zoo.report import run_report, update_marked_section

    suite = _suite(args)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    command = "polymerge " + " ".join(shlex.quote(a) for a in (args.argv or sys.argv[1:]))
    res = run_report(suite, methods=methods, md_path=args.md, png_path=args.plot,
                     progress=not args.quiet, keep=not args.no_keep, command=command,
                     stores=args.stores, paper=args.paper, learned=args.learned)
    print(res["text"])
    print(f"report written to {res['markdown']}")
    print(f"plot written to {res['plot']}")
    if args.update:
        update_marked_section(args.update, suite.name, res["text"].replace(
            f"]({res['plot'].name})", f"]({_relpath(res['plot'], args.update)})"))
        print(f"updated the {suite.name} section of {args.update}")
    return 0


def _relpath(target: Path, doc: Path) -> str:
    import os

    return os.path.relpath(Path(target).resolve(), Path(doc).resolve().parent)


def cmd_demo(args: argparse.Namespace) -> int:
    from polymerge.zoo.demo import run_demo

    suite = _suite(args, "cls")
    run_demo(suite, out=args.plot, progress=not args.quiet)
    return 0


# ----------------------------------------------------------------------------- parser


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``zoo``, ``eval``, ``report`` and ``demo`` to the main ``polymerge`` parser."""
    zoo = subparsers.add_parser(
        "zoo", help="build and locate the expert zoo (real experts, built offline)",
        description="The expert zoo: suites of real experts fine-tuned here from packaged "
                    "weights and data. cls: all-MiniLM-L6-v2 text-classification experts; "
                    "gen: SmolLM2-135M-Instruct LoRA domain experts.")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")

    p = zsub.add_parser("build", help="build a suite's experts (resumable)",
                        description="Fine-tune the suite's experts into the cache. Deterministic "
                                    "for the seed; an expert already built is reused, a "
                                    "half-built or corrupted one is rebuilt.")
    p.add_argument("suite", choices=SUITES, help="which suite")
    _common(p)
    p.set_defaults(func=cmd_build)

    p = zsub.add_parser("path", help="print where a suite's experts are",
                        description="Print the folder holding the suite's experts (one "
                                    "subfolder per task), or one expert's or the base's folder.")
    p.add_argument("suite", choices=SUITES, help="which suite")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--expert", help="print this expert's folder")
    g.add_argument("--base", action="store_true", help="print the base model's folder")
    _common(p, quiet=False)
    p.set_defaults(func=cmd_path)

    p = zsub.add_parser("export", help="write one expert as a full HF checkpoint",
                        description="Write an expert as a standalone HF model folder (gen: the "
                                    "base with the LoRA adapter merged in).")
    p.add_argument("suite", choices=SUITES, help="which suite")
    p.add_argument("expert", help="expert (task) name")
    p.add_argument("out", type=Path, help="output folder")
    _common(p, quiet=False)
    p.set_defaults(func=cmd_export)

    p = zsub.add_parser("list", help="show what is built",
                        description="Every suite's base and experts: built or missing, with "
                                    "validation scores and build times.")
    _common(p, quiet=False)
    p.set_defaults(func=cmd_list)

    p = subparsers.add_parser(
        "eval", help="score a checkpoint on a zoo suite",
        description="Evaluate TARGET (a merged checkpoint folder) on a suite's test data: cls "
                    "gives test accuracy per task with each task's own head; gen gives "
                    "per-domain held-out loss and perplexity and math exact match. Prints the "
                    "normalized score (score / own expert's score x 100) next to the base and "
                    "the ensemble.")
    p.add_argument("target", type=Path,
                   help="checkpoint folder (HF model folder); gen also takes a LoRA adapter "
                        "folder; expert stores are accepted when that part is installed")
    p.add_argument("--suite", choices=SUITES, required=True, help="which suite")
    p.add_argument("--json", type=Path, help="also write the scores as JSON here")
    p.add_argument("--plot", type=Path, help="also write a bar chart PNG here")
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "report", help="run every registered merge method over a suite and tabulate",
        description="Merge the suite's experts with every registered method (default "
                    "parameters), evaluate each, and write a markdown table (tasks, mean, "
                    "normalized mean, stored parameters vs the ensemble, build time) and a bar "
                    "chart PNG.")
    p.add_argument("--suite", choices=SUITES, required=True, help="which suite")
    p.add_argument("--methods", help="comma-separated method names (default: all registered)")
    p.add_argument("--md", type=Path, help="markdown output (default: <cache>/<suite>/report/)")
    p.add_argument("--plot", type=Path, help="PNG output (default: next to the markdown)")
    p.add_argument("--update", type=Path, metavar="FILE",
                   help="also replace this suite's marked section in FILE (e.g. BENCHMARKS.md)")
    p.add_argument("--no-keep", action="store_true",
                   help="delete each merged checkpoint after scoring it")
    p.add_argument("--stores", action="store_true",
                   help="also build and score the expert stores (TIES-CM, DARE-CM, Twin; "
                        "oracle and trained-router routing), when that part is installed")
    p.add_argument("--paper", action="store_true",
                   help="also run task arithmetic, TIES and DARE at the papers' settings "
                        "(lambda 0.3; top 20%%; 30%% trimmed or dropped, lambda 0.5)")
    p.add_argument("--learned", action="store_true",
                   help="also run the learned merges (SuperMerge flat and hierarchical, "
                        "AdaMerging task- and layer-wise on cls; SuperMerge on gen); slow")
    _common(p)
    p.set_defaults(func=cmd_report, argv=None)

    p = subparsers.add_parser(
        "demo", help="build the cls zoo, merge it three ways, compare",
        description="Build (or reuse) the cls zoo, merge it with task arithmetic, TIES and "
                    "DARE, evaluate, and print the comparison next to the experts and the base.")
    p.add_argument("--plot", type=Path, help="where to write the bar chart PNG")
    _common(p)
    p.set_defaults(func=cmd_demo)
