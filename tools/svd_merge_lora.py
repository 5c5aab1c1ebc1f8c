"""Merge several LoRAs into one by SVD (kohya's networks/svd_merge_lora.py flags); no base model needed.

    python tools/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 0.7 0.5 \
        --new_rank 16 --save_to merged.safetensors

Per module Σ ratio × ΔW over the files (a module missing from a file adds nothing) is factored by SVD and
cut to min(--new_rank, out, in) (3x3 LoCon convs: --new_conv_rank); alpha = rank. As kohya, the factors are
clamped to the 0.99 quantile of their entries (--clamp_quantile 1 keeps them exact). Metadata as kohya:
ss_network_module/dim/alpha/args, ss_v2 and ss_base_model_version from the inputs, modelspec with
merged_from (unless --no_metadata). Unlike kohya, an existing --save_to is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.errors import UserError  # noqa: E402
from networks.lora_file import load_lora_file, save_lora_file  # noqa: E402
from networks.ops.lora_io import PRECISIONS, check_output, run_tool  # noqa: E402
from networks.ops.lora_math import cast_floats, svd_merge  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svd_merge_lora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="+", required=True, help="one ratio per model")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the merged LoRA")
    parser.add_argument("--new_conv_rank", type=int, help="rank of 3x3 conv modules (default --new_rank)")
    parser.add_argument("--save_to", type=Path, required=True, help="output (.safetensors, .ckpt, .pt, .pth)")
    parser.add_argument(
        "--save_precision", choices=tuple(PRECISIONS), help="dtype saved (default --precision)"
    )
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="float", help="accepted for kohya")
    parser.add_argument("--device", help="device for the SVD, e.g. cuda (default cpu)")
    parser.add_argument("--clamp_quantile", type=float, default=0.99, help="kohya's clamp; 1 = none")
    parser.add_argument("--no_metadata", action="store_true", help="no modelspec keys (ss_* minimum only)")
    parser.add_argument("--lbws", nargs="*", help="kohya's per-block weights: not implemented (an error)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save_to")
    return parser


def _problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if len(args.models) != len(args.ratios):
        problems.append(
            f"--ratios: {len(args.ratios)} values for {len(args.models)} --models; give one per model"
        )
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        problems.append("--new_rank / --new_conv_rank: must be at least 1")
    if args.lbws:
        problems.append("--lbws: per-block merge weights are not implemented yet; merge without them")
    if not 0 < args.clamp_quantile <= 1:
        problems.append(f"--clamp_quantile {args.clamp_quantile}: must be in (0, 1]")
    return problems


def merge_metadata(metas: list[dict[str, str]], args: argparse.Namespace, conv_rank: int) -> dict[str, str]:
    def first(key: str) -> str | None:
        return next((m[key] for m in metas if key in m), None)

    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(args.new_rank),
        "ss_network_alpha": str(args.new_rank),
        "ss_network_args": json.dumps({"conv_dim": conv_rank, "conv_alpha": conv_rank}),
        "ss_training_comment": "svd merge of "
        + ", ".join(f"{p.name} x {r}" for p, r in zip(args.models, args.ratios, strict=True))
        + f" to rank {args.new_rank}",
    }
    for key in ("ss_v2", "ss_base_model_version"):
        if (value := first(key)) is not None:
            meta[key] = value
    if not args.no_metadata:
        titles = [m.get("modelspec.title", p.stem) for m, p in zip(metas, args.models, strict=True)]
        meta.update(
            {
                "modelspec.sai_model_spec": "1.0.1",
                "modelspec.title": args.save_to.stem,
                "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
                "modelspec.merged_from": ", ".join(titles),
            }
        )
        for key in ("modelspec.architecture", "modelspec.implementation", "modelspec.prediction_type"):
            if (value := first(key)) is not None:
                meta[key] = value
    return meta


def merge(args: argparse.Namespace) -> None:
    problems = _problems(args)
    if problems:
        raise UserError(*problems)
    model_format = check_output(args.save_to, "--save_to", args.overwrite, tuple(args.models))
    loaded = [load_lora_file(p, flag="--models") for p in args.models]
    states = [s for s, _ in loaded]
    merged = svd_merge(
        states, args.ratios, args.new_rank, args.new_conv_rank, args.clamp_quantile, args.device
    )
    if not merged:
        raise UserError("--models: no LoRA modules (lora_down/lora_up or lora_A/lora_B) in any file")
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    meta = merge_metadata([m for _, m in loaded], args, conv_rank)
    dtype = PRECISIONS[args.save_precision or args.precision]
    save_lora_file(args.save_to, cast_floats(merged, dtype), meta, model_format=model_format)  # type: ignore[arg-type]
    print(f"merged {len(args.models)} LoRAs ({len(merged) // 3} modules) into {args.save_to}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: merge(args))


if __name__ == "__main__":
    sys.exit(main())
