"""Command-line entries for expert stores: ``export``, ``router train`` and ``run``.

(``polymerge inspect STORE`` and ``polymerge merge`` with a store method go through
:mod:`polymerge.cli.merge_cmds`.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any


def _cmd_export(args: argparse.Namespace) -> int:
    from polymerge.errors import PolymergeError
    from polymerge.stores import export_expert, open_store

    if args.format == "peft":
        from polymerge.stores.export_peft import describe, export_peft

        if args.expert is not None:
            raise PolymergeError("export --format peft writes every expert (as adapters); "
                                 "drop --expert")
        print(describe(export_peft(args.store, args.output, mode=args.peft_mode,
                                   force=args.force, dtype=args.dtype)))
        return 0
    if args.expert is None:
        raise PolymergeError("export: give --expert NAME (or 'all'), or --format peft")
    store = open_store(args.store)
    names = store.experts if args.expert == "all" else [args.expert]
    for name in names:
        out = args.output if len(names) == 1 else f"{args.output.rstrip('/')}/{name}"
        path = export_expert(store, name, out, force=args.force, shard_size=args.shard_size,
                             dtype=args.dtype)
        print(f"wrote expert {name} to {path}")
    return 0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.4f}"
    return str(value)


def _cmd_router_train(args: argparse.Namespace) -> int:
    from polymerge.errors import PolymergeError
    from polymerge.routing import read_labelled_jsonl, suite_texts
    from polymerge.runtime import train_store_router

    if (args.data is None) == (args.suite is None):
        raise PolymergeError("router train: give --data FILE.jsonl or --suite NAME (one)")
    test = None
    base = args.base
    if args.data is not None:
        data = read_labelled_jsonl(args.data)
        source = f"data:{args.data}"
    else:
        from polymerge.zoo import get_suite
        from polymerge.zoo.stores import suite_base

        suite = get_suite(args.suite, args.cache, scale=args.scale)
        suite.require_built()
        data = suite_texts(suite, "validation")
        test = suite_texts(suite, "test")
        source = f"suite:{args.suite}:{args.scale}:validation"
        if base is None:
            base = suite_base(args.store, suite)  # the suite's own base model
    if args.test is not None:
        test = read_labelled_jsonl(args.test)
    result = train_store_router(args.store, data, test=test, base=base, device=args.device,
                                max_length=args.max_length, seed=args.seed, hidden=args.hidden,
                                val_fraction=args.val_fraction, max_epochs=args.epochs,
                                patience=args.patience, source=source,
                                allow_pickle=args.allow_pickle)
    m = result.metrics
    if args.json:
        print(json.dumps(m, indent=2, default=float))
        return 0
    print(f"router trained on {m['train_examples']} queries, {m['val_examples']} held out "
          f"(best epoch {m['best_epoch']} of {m['epochs_run']}, {m['seconds']:.1f} s)")
    print(f"train accuracy: {_fmt(m['train_accuracy'])}")
    print(f"held-out accuracy: {_fmt(m['val_accuracy'])}")
    if "test_accuracy" in m:
        print(f"test accuracy: {_fmt(m['test_accuracy'])} on {m['test_examples']} queries")
        for name, acc in m.get("test_per_expert", {}).items():
            print(f"  {name:20s} {_fmt(acc)}")
    print(f"saved in {args.store.rstrip('/')}/router")
    return 0


def _top_weights(weights: dict[str, float], n: int = 4) -> str:
    """The largest mixing weights, e.g. ``expert0 0.71, expert2 0.20``."""
    top = sorted(weights.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k} {v:.2f}" for k, v in top if v >= 0.005 or k == top[0][0])


def _cmd_run(args: argparse.Namespace) -> int:
    from polymerge.errors import PolymergeError
    from polymerge.runtime import load_store

    options: dict[str, Any] = {}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.top_k is not None:
        options["top_k"] = args.top_k
    texts = list(args.text)
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not texts:
            raise PolymergeError("run: no texts on stdin (one per line)")
    rt = load_store(args.store, device=args.device, base=args.base,
                    allow_pickle=args.allow_pickle, **options)
    mixing = rt.serving == "mix"
    if rt.is_causal:
        res = rt.generate(texts, args.expert, max_new_tokens=args.max_new_tokens)
        rows = [{"text": t, "expert": e, "completion": c}
                for t, e, c in zip(texts, res.chosen, res.completions or [], strict=True)]
    elif rt.classifies:  # task heads: the routed expert's label and score
        res = rt.forward(texts, args.expert)
        rows = [{"text": t, **{k: v for k, v in res.answer(i).items() if k != "routing"}}
                for i, t in enumerate(texts)]
    else:
        res = rt.forward(texts, args.expert)
        rows = [{"text": t, "expert": e, "tokens": int(o.shape[0]),
                 "pooled": [round(float(v), 5) for v in o.mean(0)[:8]]}
                for t, e, o in zip(texts, res.chosen, res.outputs or [], strict=True)]
    if mixing:
        for i, row in enumerate(rows):
            row["weights"] = res.routing(i)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            body = row.get("completion")
            if "label" in row:
                body = f"{row['label']} (score {row['score']:.3f})" + "".join(
                    f"; {e}: {a['label']} ({a['score']:.3f})"
                    for e, a in row.get("experts", {}).items() if e != row["expert"])
            elif body is None:
                body = f"{row['tokens']} tokens, mean output starts {row['pooled']}"
            label = _top_weights(row["weights"]) if mixing else row["expert"]
            print(f"[{label}] {row['text']}\n  -> {body}")
    if mixing:
        print(f"{rt.routing_passes} routing pass(es) on the shared model, {rt.mixed_passes} "
              "mixed pass(es)", file=sys.stderr)
    else:
        print(f"{rt.switches} switch(es), {rt.switch_seconds * 1000:.1f} ms switching",
              file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``export``, ``router`` and ``run`` to the main parser."""
    p = sub.add_parser("export", help="write one expert of a store as a standalone checkpoint",
                       description="Rebuild an expert from an expert store by lookup and write "
                                   "it as an ordinary HF model folder (config and tokenizer "
                                   "included).")
    p.add_argument("store", help="expert store folder")
    p.add_argument("--expert", help="expert name (or 'all': one folder each under OUTPUT)")
    p.add_argument("--format", choices=["hf", "peft"], default="hf",
                   help="hf: the expert as a checkpoint (default); peft: a twin store as its "
                        "shared model (OUTPUT/base) plus one LoRA adapter per expert "
                        "(OUTPUT/adapters/NAME), for peft and multi-LoRA engines")
    p.add_argument("--peft-mode", choices=["exact", "lora"], default="exact",
                   help="with --format peft: exact (per-expert norms and biases in the "
                        "adapters: lora_bias, modules_to_save) or lora (lora_A/lora_B only; "
                        "per-expert tensors approximated by the shared ones, with a warning)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--dtype", help="output dtype (default: the store's)")
    p.add_argument("--shard-size", default="5GB", help="maximum shard size (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("router", help="train a store's task router",
                       description="Task routers of expert stores.")
    rsub = p.add_subparsers(dest="router_command", required=True, metavar="COMMAND")
    t = rsub.add_parser("train", help="train the router of a store on labelled queries",
                        description="Features: the base model's mean-pooled last hidden "
                                    "state (for a twin store: its shared model's). A small "
                                    "MLP is trained with cross-entropy and early stopping on "
                                    "held-out queries, then saved in the store (router/).")
    t.add_argument("store", help="expert store folder")
    t.add_argument("--data", help='JSONL records {"text": ..., "expert": ...}')
    t.add_argument("--test", help="optional JSONL of test queries, scored after training")
    t.add_argument("--suite", help="train from a zoo suite's validation splits (cls, gen); "
                                   "its test splits are scored")
    t.add_argument("--cache", help="zoo cache folder (with --suite)")
    t.add_argument("--scale", default="full", help="zoo scale (with --suite; default full)")
    t.add_argument("--base", help="base model folder for features (needed by stores served by "
                                  "switching, such as channel stores: a store refers only to "
                                  "files inside itself; with --suite, the suite's base; not "
                                  "for twin stores)")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--max-length", type=int, default=256, help="tokens per query (default 256)")
    t.add_argument("--hidden", type=int, default=256, help="router hidden size (default 256)")
    t.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of queries held out for early stopping (default 0.2)")
    t.add_argument("--epochs", type=int, default=300, help="maximum epochs (default 300)")
    t.add_argument("--patience", type=int, default=25,
                   help="epochs without held-out improvement before stopping (default 25)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--allow-pickle", action="store_true",
                   help="load a pickled base model (--base) with torch.load(weights_only=True)")
    t.add_argument("--json", action="store_true", help="print the metrics as JSON")
    t.set_defaults(func=_cmd_router_train)

    p = sub.add_parser("run", help="answer texts with a store: route, switch, run",
                       description="Route each text to an expert (the store's router, or "
                                   "--expert), switch the model's weights by lookup, and "
                                   "generate (causal LMs) or run the forward pass. A twin "
                                   "store mixes the experts per text with the router's soft "
                                   "weights (printed) instead.")
    p.add_argument("store", help="expert store folder")
    p.add_argument("text", nargs="+", help="input texts ('-' reads one per line from stdin)")
    p.add_argument("--expert", help="use this expert for every text (no routing)")
    p.add_argument("--base", help="base model folder for router features (needed to route "
                                  "with a switching store's router: a store refers only to "
                                  "files inside itself)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="tokens generated per text by causal LMs (default 32)")
    p.add_argument("--temperature", type=float,
                   help="twin stores: softmax temperature of the router's weights (default 1)")
    p.add_argument("--top-k", type=int,
                   help="twin stores: mix only the k experts with the largest weights")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a pickled base model (--base) with torch.load(weights_only=True)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=_cmd_run)
