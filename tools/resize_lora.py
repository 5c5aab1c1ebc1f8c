"""Re-rank a LoRA by SVD (kohya's networks/resize_lora.py flags and rules); no base model needed.

    python tools/resize_lora.py --model IN.safetensors --save_to OUT.safetensors --new_rank 8
    python tools/resize_lora.py --model IN --save_to OUT --new_rank 32 --dynamic_method sv_fro --dynamic_param 0.9

Per module ΔW = up @ down × alpha / rank is factored by SVD and cut to the new rank (3x3 LoCon convs to
--new_conv_rank); alpha' = rank' × alpha / rank keeps the scale. --dynamic_method picks each module's rank
(kohya's sv_ratio / sv_cumulative / sv_fro, capped by --new_rank). Works for SD 1.x/2.x, SDXL and FLUX files.
Metadata: ss_network_dim/alpha (or "Dynamic"), a note in front of ss_training_comment, new sshs_* hashes.
Unlike kohya, an existing --save_to is refused unless --overwrite; the file is written atomically.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.errors import UserError  # noqa: E402
from networks.lora_file import load_lora_file, save_lora_file  # noqa: E402
from networks.ops.lora_io import PRECISIONS, check_output, run_tool  # noqa: E402
from networks.ops.lora_math import DYNAMIC_METHODS, ResizedModule, cast_floats, resize_state  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resize_lora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="LoRA to resize (.safetensors, .ckpt, .pt)")
    parser.add_argument("--save_to", type=Path, required=True, help="output (.safetensors, .ckpt, .pt, .pth)")
    parser.add_argument("--new_rank", type=int, default=4, help="new rank (the cap with --dynamic_method)")
    parser.add_argument("--new_conv_rank", type=int, help="rank of 3x3 conv modules (default --new_rank)")
    parser.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, help="pick each module's rank by SVD")
    parser.add_argument("--dynamic_param", type=float, help="target of --dynamic_method (ratio, fraction)")
    parser.add_argument("--save_precision", choices=tuple(PRECISIONS), help="dtype saved (default float)")
    parser.add_argument("--device", help="device for the SVD, e.g. cuda (default cpu)")
    parser.add_argument("--verbose", action="store_true", help="one line per module: retained energy, rank")
    parser.add_argument(
        "--svd_lowrank_niter", type=int, default=2, help="accepted for kohya; the SVD is exact"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save_to")
    return parser


def _problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.new_rank < 1:
        problems.append(f"--new_rank {args.new_rank}: must be at least 1")
    if args.new_conv_rank is not None and args.new_conv_rank < 1:
        problems.append(f"--new_conv_rank {args.new_conv_rank}: must be at least 1")
    if args.dynamic_method and args.dynamic_param is None:
        problems.append(f"--dynamic_method {args.dynamic_method}: needs --dynamic_param")
    if args.dynamic_param is not None and not args.dynamic_method:
        problems.append("--dynamic_param: only used with --dynamic_method sv_ratio|sv_cumulative|sv_fro")
    if args.dynamic_param is not None and args.dynamic_param <= 0:
        problems.append(f"--dynamic_param {args.dynamic_param}: must be positive")
    return problems


def resize_metadata(
    metadata: dict[str, str], infos: list[ResizedModule], args: argparse.Namespace
) -> dict[str, str]:
    """kohya's metadata update: dims/alpha (or "Dynamic") and a note before the old training comment."""
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    old_dim = max((i.old_rank for i in infos), default=0)
    comment = meta.get("ss_training_comment", "")
    if args.dynamic_method:
        note = f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} from {old_dim}"
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
    else:
        conv = args.new_conv_rank
        conv_desc = "" if conv is None or conv == args.new_rank else f" (conv: {conv})"
        note = f"dimension is resized from {old_dim} to {args.new_rank}{conv_desc}"
        meta["ss_network_dim"] = str(args.new_rank)
        # kohya writes the last module's alpha (they agree when the source had one scale)
        meta["ss_network_alpha"] = str(infos[-1].new_alpha if infos else float(args.new_rank))
    meta["ss_training_comment"] = f"{note}; {comment}"
    return meta


def report(infos: list[ResizedModule], verbose: bool, dynamic: bool) -> None:
    for i in infos if verbose else []:
        line = (
            f"{i.name:75} | sum(S) retained: {i.sum_retained:.1%}, fro retained: {i.fro_retained:.1%}, "
            f"max(S) ratio: {i.max_ratio:0.1f}"
        )
        print(line + (f", dynamic | dim: {i.new_rank}, alpha: {i.new_alpha}" if dynamic else ""))
    fro = [i.fro_retained for i in infos if i.fro_retained == i.fro_retained]  # NaN = zero module
    if fro:
        std = statistics.pstdev(fro)
        print(f"Average Frobenius norm retention: {statistics.fmean(fro):.2%} | std: {std:0.3f}")
        worst = min(infos, key=lambda i: i.fro_retained if i.fro_retained == i.fro_retained else 2.0)
        print(
            f"lowest retention: {worst.name} {worst.fro_retained:.2%} (rank {worst.old_rank} -> {worst.new_rank})"
        )
    ranks = sorted({i.new_rank for i in infos})
    print(f"{len(infos)} modules resized; new ranks: {ranks[0] if len(ranks) == 1 else ranks}")


def resize(args: argparse.Namespace) -> None:
    problems = _problems(args)
    if problems:
        raise UserError(*problems)
    model_format = check_output(args.save_to, "--save_to", args.overwrite, (args.model,))
    state, metadata = load_lora_file(args.model, flag="--model")
    resized, infos = resize_state(
        state, args.new_rank, args.new_conv_rank, args.dynamic_method, args.dynamic_param, args.device
    )
    if not infos:
        raise UserError(f"--model {args.model}: no LoRA modules (lora_down/lora_up or lora_A/lora_B) found")
    report(infos, args.verbose, bool(args.dynamic_method))
    dtype = PRECISIONS[args.save_precision or "float"]
    save_lora_file(
        args.save_to,
        cast_floats(resized, dtype),
        resize_metadata(metadata, infos, args),
        model_format=model_format,
    )  # type: ignore[arg-type]
    print(f"saved {args.save_to}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: resize(args))


if __name__ == "__main__":
    sys.exit(main())
