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
    from polymerge.zoo.threads import use_threads

    use_threads(getattr(args, "threads", None))
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
                       help="CPU threads for torch (default: the CPUs this process may use "
                            "less the load other processes put on them, at least 1)")


# ----------------------------------------------------------------------------- commands


def cmd_build(args: argparse.Namespace) -> int:
    suite = _suite(args)
    print(f"building the {suite.name} zoo in {suite.root}", flush=True)
    report = suite.build(progress=not args.quiet)
    if report.converted:
        print(f"converted from the old layout: {', '.join(report.converted)}")
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
    from polymerge.io.writer import AtomicOutputDir

    target, cache = args.out.expanduser().resolve(), Path(suite.root).resolve()
    if target == cache or cache in target.parents or target in cache.parents:
        raise PolymergeError(f"output {args.out} overlaps the zoo cache {cache}; choose another "
                             "output folder")
    with AtomicOutputDir(args.out, force=args.force, kind="model") as tmp:
        suite.export(args.expert, tmp)
    print(f"wrote {args.out}")
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

    if (args.data is None) == (args.suite is None):
        raise PolymergeError("eval: give --suite NAME or --data FILE.jsonl (one)")
    if args.data is not None:
        return _eval_data(args)
    if args.experts or args.routing or args.max_length or args.base:
        raise PolymergeError("eval: --experts, --routing, --max-length and --base go with "
                             "--data")
    suite = _suite(args)
    weights = ev.resolve_target(args.target, suite, allow_pickle=args.allow_pickle)
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


def _eval_data(args: argparse.Namespace) -> int:
    from polymerge.zoo import data_eval as de
    from polymerge.zoo.threads import use_threads

    use_threads(getattr(args, "threads", None))
    routings = None if args.routing is None else \
        de.ROUTINGS if args.routing == "both" else (args.routing,)
    result = de.evaluate_data(
        args.target, args.data, routings=routings, max_length=args.max_length,
        experts=de.parse_experts(args.experts or []), batch_size=args.batch_size,
        device=args.device, base=args.base, allow_pickle=args.allow_pickle,
        progress=None if args.quiet else lambda what: print(f"scoring: {what}",
                                                            file=sys.stderr, flush=True))
    print(de.table(result))
    if args.json:
        from polymerge.zoo.evaluate import write_json

        write_json(args.json, result.to_json())
        print(f"scores written to {args.json}")
    if args.plot:
        de.bar_chart(result, args.plot, f"{Path(args.target).name} on {Path(args.data).name}")
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

    if (args.ray or args.ray_address) and not args.sweep:
        raise PolymergeError("--ray and --ray-address run the cells of a sweep: add --sweep")
    suite = _suite(args)
    command = "polymerge " + " ".join(shlex.quote(a) for a in (args.argv or sys.argv[1:]))
    if args.sweep:
        return _sweep(args, suite, command)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
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


def _sweep(args: argparse.Namespace, suite, command: str) -> int:  # type: ignore[no-untyped-def]
    from polymerge.zoo.report import update_marked_section
    from polymerge.zoo.sweep import grid, run_sweep

    if args.methods or args.stores or args.paper or args.learned:
        raise PolymergeError("--sweep runs its own grid (static merges, SuperMerge, every "
                             "store); --methods, --stores, --paper and --learned do not apply")
    families = [f.strip() for f in args.families.split(",")] if args.families else None
    cells = grid(suite, routers=not args.no_routers, families=families)
    res = run_sweep(suite, cells=cells, ray=bool(args.ray or args.ray_address),
                    ray_address=args.ray_address, md_path=args.md, png_path=args.plot,
                    progress=not args.quiet, keep=args.keep_artifacts, fresh=args.fresh,
                    threads=args.threads, command=command)
    print(res.text)
    print(f"report written to {res.markdown}")
    print(f"plot written to {res.plot}")
    failed = [r.name for r in res.rows if r.extra.get("failed")]
    if failed:
        print(f"{len(failed)} row(s) failed: {', '.join(failed)}")
    if args.update:
        assert res.plot is not None
        update_marked_section(args.update, f"{suite.name}-sweep", res.text.replace(
            f"]({res.plot.name})", f"]({_relpath(res.plot, args.update)})"))
        print(f"updated the {suite.name}-sweep section of {args.update}")
    return 0


def _relpath(target: Path, doc: Path) -> str:
    import os

    return os.path.relpath(Path(target).resolve(), Path(doc).resolve().parent)


def cmd_demo(args: argparse.Namespace) -> int:
    from polymerge.zoo.demo import run_demo

    suite = _suite(args, "cls")
    run_demo(suite, out=args.plot, progress=not args.quiet, fresh=args.fresh)
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
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty output folder that polymerge wrote")
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
    p.add_argument("--suite", choices=SUITES, help="which suite (or --data)")
    p.add_argument("--data", type=Path, metavar="FILE.jsonl",
                   help='your own test data instead of a suite: {"text", "expert", "label"} '
                        'per line for classifiers (label by name or index), {"text", "expert"} '
                        "for causal LMs (perplexity); accuracy per expert, oracle and router "
                        "routing")
    p.add_argument("--experts", nargs="+", metavar="NAME=PATH",
                   help="with --data: each expert alone (NAME=PATH, or PATH named after its "
                        "folder), to normalize every score by the expert's own")
    p.add_argument("--routing", choices=("oracle", "router", "both"),
                   help="with --data: oracle (each record's expert), router, or both (default: "
                        "both when the target has a router)")
    p.add_argument("--max-length", type=int, help="with --data: tokens per text (default 256)")
    p.add_argument("--batch-size", type=int, default=32, help="with --data: rows per batch")
    p.add_argument("--device", default="cpu", help="with --data: cpu or cuda")
    p.add_argument("--base", type=Path,
                   help="with --data: the base model, for a switching store's router features")
    p.add_argument("--json", type=Path, help="also write the scores as JSON here")
    p.add_argument("--plot", type=Path, help="also write a bar chart PNG here")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickled weights (TARGET; with --data also --experts, --base) "
                        "with torch.load(weights_only=True)")
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
    g = p.add_argument_group(
        "sweep", "one map of score against stored size: static merges, SuperMerge, channel "
                 "stores K = 1..N, twin stores at several ranks, EMR and 1bit-Merging "
                 "stores, oracle and router routing; a table and one PNG")
    g.add_argument("--sweep", action="store_true", help="run the sweep instead of the report")
    g.add_argument("--ray", action="store_true",
                   help="run the sweep's cells as Ray tasks on a local Ray (pip install "
                        "'polymerge[sweep]')")
    g.add_argument("--ray-address", metavar="ADDRESS",
                   help="run the cells on this Ray cluster (e.g. ray://head:10001 or auto)")
    g.add_argument("--families", metavar="LIST",
                   help="only these families: static, supermerge, channel, twin, emr, onebit")
    g.add_argument("--no-routers", action="store_true",
                   help="score stores with oracle routing only (no router training)")
    g.add_argument("--fresh", action="store_true",
                   help="recompute every cell (default: reuse the rows of cells already run)")
    g.add_argument("--keep-artifacts", action="store_true",
                   help="keep each cell's checkpoint or store (default: deleted once scored)")
    _common(p)
    p.set_defaults(func=cmd_report, argv=None)

    p = subparsers.add_parser(
        "demo", help="build the cls zoo; static merges against expert stores, by size",
        description="Build (or reuse) the cls zoo; merge it with task arithmetic, TIES and "
                    "DARE; build a channel, a twin and an EMR store and train their routers; "
                    "evaluate everything and print the table and the score-against-size "
                    "picture next to the base and the ensemble. A second run reuses every "
                    "result.")
    p.add_argument("--plot", type=Path, help="where to write the score-against-size PNG")
    p.add_argument("--fresh", action="store_true",
                   help="recompute every result (default: reuse earlier results)")
    _common(p)
    p.set_defaults(func=cmd_demo)
