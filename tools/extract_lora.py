"""Extract a LoRA from a fine-tuned checkpoint and its original (kohya's extract_lora_from_models.py flags).

    python tools/extract_lora.py --model_org BASE --model_tuned TUNED --save_to OUT.safetensors --dim 32

Both models: the same family (SD 1.x/2.x, SDXL or FLUX, read from the weights) and layout (single files or
diffusers folders). Per LoRA module (the trainer's key tables), ΔW = tuned - original is cut to --dim by SVD
(3x3 convs to --conv_dim, only when given), lora_up = U·S and lora_down = Vh clamped at their
--clamp_quantile, alpha = rank. Modules whose max |ΔW| is below --min_diff are skipped (kohya applies
min_diff to the text encoder as a whole). Tensors are read one at a time from both models.
Metadata: kohya's ss_network_* keys and ss_training_comment naming the extraction. Unlike kohya, an existing
--save_to is refused unless --overwrite. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.errors import UserError  # noqa: E402
from networks.ops.lora_io import PRECISIONS, check_output, run_tool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extract_lora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model_org", type=Path, required=True, help="original model (file or diffusers folder)"
    )
    parser.add_argument("--model_tuned", type=Path, required=True, help="fine-tuned model, same layout")
    parser.add_argument("--save_to", type=Path, required=True, help="output LoRA (.safetensors, .ckpt, .pt)")
    parser.add_argument("--dim", type=int, default=4, help="rank of Linear / 1x1 modules (default 4)")
    parser.add_argument("--conv_dim", type=int, help="rank of 3x3 convs (default: no conv modules)")
    parser.add_argument("--clamp_quantile", type=float, default=0.99, help="clamp factors at this quantile")
    parser.add_argument("--min_diff", type=float, default=0.01, help="skip modules with max |ΔW| below this")
    parser.add_argument("--device", help="device for the SVD, e.g. cuda (default cpu)")
    parser.add_argument("--save_precision", choices=tuple(PRECISIONS), help="dtype saved (default float)")
    parser.add_argument("--no_metadata", action="store_true", help="accepted for kohya; ss_* keys are kept")
    for flag in ("--v2", "--sdxl", "--v_parameterization"):
        parser.add_argument(
            flag, action="store_true", help="accepted for kohya; the family is read from the weights"
        )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save_to")
    return parser


def _problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.dim < 1:
        problems.append(f"--dim {args.dim}: must be at least 1")
    if args.conv_dim is not None and args.conv_dim < 1:
        problems.append(f"--conv_dim {args.conv_dim}: must be at least 1 (omit it for no conv modules)")
    if not 0 < args.clamp_quantile <= 1:
        problems.append(f"--clamp_quantile {args.clamp_quantile}: must be in (0, 1]")
    if args.min_diff < 0:
        problems.append(f"--min_diff {args.min_diff}: must be 0 or more")
    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(f"--device {args.device}: CUDA is not available here; omit --device")
    return problems


def extract(args: argparse.Namespace) -> None:
    from networks.lora_file import save_lora_file
    from networks.ops.checkpoint_map import map_checkpoint
    from networks.ops.extract import extract_lora, extract_metadata

    problems = _problems(args)
    if problems:
        raise UserError(*problems)
    fmt = check_output(args.save_to, "--save_to", args.overwrite, (args.model_org, args.model_tuned))
    org = map_checkpoint(args.model_org, "--model_org")
    tuned = map_checkpoint(args.model_tuned, "--model_tuned")
    result = extract_lora(
        org,
        tuned,
        dim=args.dim,
        conv_dim=args.conv_dim,
        clamp_quantile=args.clamp_quantile,
        min_diff=args.min_diff,
        device=args.device,
        save_dtype=PRECISIONS[args.save_precision] if args.save_precision else None,
    )
    if not result.state:
        raise UserError(
            f"--min_diff {args.min_diff}: no module of {args.model_tuned} differs from {args.model_org} by that "
            "much; nothing to extract (lower --min_diff, or check the two models differ)"
        )
    meta = extract_metadata(org, tuned, args.dim, args.conv_dim, args.clamp_quantile, args.min_diff)
    save_lora_file(args.save_to, result.state, meta, model_format=fmt)  # type: ignore[arg-type]
    kept = len(result.state) // 3
    print(
        f"wrote {args.save_to}: {kept} modules ({org.family}), {len(result.skipped)} below --min_diff skipped"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: extract(args))


if __name__ == "__main__":
    sys.exit(main())
