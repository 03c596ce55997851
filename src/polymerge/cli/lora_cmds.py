"""``extract-lora``: a PEFT LoRA adapter from a fine-tune and its base."""

from __future__ import annotations

import argparse

from polymerge.stores.extract_lora import extract_lora


def _cmd_extract(args: argparse.Namespace) -> int:
    report = extract_lora(args.finetuned, args.base, args.output, rank=args.rank,
                          include=args.include, exclude=args.exclude, dtype=args.dtype,
                          device=args.device, force=args.force, allow_pickle=args.allow_pickle,
                          progress=not args.quiet)
    for line in report.lines():
        print(line)
    print(f"wrote {report.path} ({report.seconds:.1f} s)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract-lora", help="extract a PEFT LoRA adapter from a fine-tune and its base",
        description="Truncated SVD of the delta (fine-tune - base) of every selected 2-D "
                    "weight (linear layers, embeddings): a PEFT adapter folder with base + B A "
                    "~ the fine-tune; changed norms are saved whole (modules_to_save). The "
                    "relative reconstruction error of each module is printed and written in "
                    "the adapter's README.md.")
    p.add_argument("finetuned", help="the fine-tuned model (HF folder, or model+adapter)")
    p.add_argument("--base", required=True, help="the base model it was fine-tuned from")
    p.add_argument("-o", "--output", required=True, help="the adapter folder to write")
    p.add_argument("--rank", required=True,
                   help="an integer rank for every module (capped at its full rank), or an "
                        "energy fraction in (0, 1] such as 0.9 (per module, the smallest rank "
                        "keeping that share of the delta's squared norm; one more read pass)")
    p.add_argument("--include", help="regex: only tensors whose name matches")
    p.add_argument("--exclude", help="regex: leave out tensors whose name matches")
    p.add_argument("--dtype", help="dtype of the factors (default: the base's)")
    p.add_argument("--device", default="cpu", help="where the SVDs run: cpu or cuda")
    p.add_argument("--force", action="store_true", help="replace an earlier polymerge output")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickled .bin/.pt inputs with torch.load(weights_only=True)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_extract)
