"""Merge LoRAs into a checkpoint, or several LoRAs into one (kohya's merge_lora / sdxl_merge_lora /
flux_merge_lora flags).

    python tools/merge_lora.py --sd_model MODEL --save_to OUT --models A.safetensors B.safetensors --ratios 1 0.5
    python tools/merge_lora.py --save_to MERGED.safetensors --models A.safetensors B.safetensors [--concat]

With --sd_model (alias --ckpt, --flux_model): SD 1.x/2.x, SDXL and FLUX are told apart from the weights. A
single file (.safetensors/.ckpt; FLUX: the BFL transformer, plus --clip_l/--t5xxl with their --*_save_to)
is written as a .safetensors in the same layout, one tensor at a time (memory about one tensor, not the
model); a diffusers folder becomes a new folder (changed weight files rewritten, the rest copied). Header
metadata is kept. LoRA keys may be kohya's or diffusers/PEFT spellings; LoCon 3x3 convs are merged too.
Without --sd_model: kohya's LoRA merge (same-rank up and down summed with sqrt(alpha ratio) weights), or
--concat, which stacks the ranks exactly (the result's ΔW is the weighted sum of the inputs' ΔW).
Unlike kohya, existing outputs are refused unless --overwrite and files are written atomically.
Exit codes: 0 done, 2 bad input.
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
    parser = argparse.ArgumentParser(prog="merge_lora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sd_model", "--ckpt", "--flux_model", dest="sd_model", type=Path,
        help="checkpoint to merge into: single file or diffusers folder; omit to merge LoRAs into one LoRA",
    )  # fmt: skip
    parser.add_argument("--save_to", type=Path, required=True, help="output file (or folder for a folder)")
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", help="one ratio per model (default 1.0 each)")
    parser.add_argument("--clip_l", type=Path, help="FLUX: CLIP-L file to merge lora_te1_ modules into")
    parser.add_argument("--clip_l_save_to", type=Path, help="FLUX: output for --clip_l")
    parser.add_argument("--t5xxl", type=Path, help="FLUX: T5-XXL file to merge lora_te3_ modules into")
    parser.add_argument("--t5xxl_save_to", type=Path, help="FLUX: output for --t5xxl")
    parser.add_argument(
        "--save_precision", choices=tuple(PRECISIONS), help="dtype of saved floats (default: kept)"
    )
    parser.add_argument(
        "--precision", choices=tuple(PRECISIONS), default="float",
        help="LoRA+LoRA merge dtype (kohya's; checkpoint merges always add in float32)",
    )  # fmt: skip
    parser.add_argument(
        "--concat", action="store_true", help="LoRA+LoRA: stack ranks (exact) instead of summing"
    )
    parser.add_argument(
        "--shuffle", action="store_true", help="LoRA+LoRA: permute each module's ranks (kohya)"
    )
    parser.add_argument(
        "--no_metadata", action="store_true", help="accepted for kohya; minimal metadata is kept"
    )
    parser.add_argument(
        "--v2", action="store_true", help="accepted for kohya; SD 2.x is read from the weights"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def _ratios(args: argparse.Namespace) -> list[float]:
    if args.ratios is None or len(args.ratios) == 0:
        return [1.0] * len(args.models)
    if len(args.ratios) != len(args.models):
        raise UserError(
            f"--ratios: {len(args.ratios)} values for {len(args.models)} --models; give one per model"
        )
    return list(args.ratios)


def _problems(args: argparse.Namespace) -> list[str]:
    problems = [f"--models {p}: file not found" for p in args.models if not p.is_file()]
    if args.sd_model is None:
        for flag in ("clip_l", "clip_l_save_to", "t5xxl", "t5xxl_save_to"):
            if getattr(args, flag) is not None:
                problems.append(f"--{flag}: only with --sd_model (a FLUX transformer)")
    elif args.concat or args.shuffle:
        problems.append("--concat/--shuffle: only when merging LoRAs into one LoRA (without --sd_model)")
    for src, dst in (("clip_l", "clip_l_save_to"), ("t5xxl", "t5xxl_save_to")):
        if (getattr(args, src) is None) != (getattr(args, dst) is None):
            problems.append(f"--{src} and --{dst}: give both or neither")
    return problems


def merge_into_model(args: argparse.Namespace, ratios: list[float]) -> list[Path]:
    from networks.ops.checkpoint_map import map_checkpoint
    from networks.ops.merge import merge_into_files, merge_into_folder, read_lora

    cmap = map_checkpoint(args.sd_model, "--sd_model", clip_l=args.clip_l, t5xxl=args.t5xxl)
    save_dtype = PRECISIONS[args.save_precision] if args.save_precision else None
    loras = [(p, read_lora(p, "--models", cmap)[0], r) for p, r in zip(args.models, ratios, strict=True)]
    if cmap.layout == "diffusers":
        if args.save_to.resolve() == args.sd_model.resolve():
            raise UserError(f"--save_to {args.save_to}: the output must differ from --sd_model")
        if args.save_to.exists() and not args.overwrite:
            raise UserError(f"--save_to {args.save_to}: already exists; pass --overwrite to replace it")
        return [merge_into_folder(cmap, loras, args.save_to, save_dtype)]
    outputs = {"model": args.save_to, "clip_l": args.clip_l_save_to, "t5xxl": args.t5xxl_save_to}
    outputs = {k: v for k, v in outputs.items() if v is not None}
    inputs = tuple(cmap.files.values())
    for file_id, out in outputs.items():
        flag = "--save_to" if file_id == "model" else f"--{file_id}_save_to"
        if check_output(out, flag, args.overwrite, inputs) != "safetensors":
            raise UserError(
                f"{flag} {out}: merged checkpoints are written as .safetensors; use that extension"
            )
    return merge_into_files(cmap, loras, outputs, save_dtype)


def merge_loras(args: argparse.Namespace, ratios: list[float]) -> Path:
    import torch

    from networks.lora_file import save_lora_file
    from networks.ops.merge import merge_lora_factors, merged_lora_metadata, read_lora

    fmt = check_output(args.save_to, "--save_to", args.overwrite, tuple(args.models))
    read = [(p, *read_lora(p, "--models")) for p in args.models]
    state = merge_lora_factors(
        [(str(p), f, r) for (p, f, _), r in zip(read, ratios, strict=True)],
        concat=args.concat,
        dtype=PRECISIONS[args.precision],
    )
    if args.shuffle:
        for key in [k for k in state if k.endswith(".lora_down.weight")]:
            up_key = key.replace(".lora_down.", ".lora_up.")
            perm = torch.randperm(state[key].shape[0])
            state[key], state[up_key] = state[key][perm], state[up_key][:, perm]
    if args.save_precision:
        state = {k: v.to(PRECISIONS[args.save_precision]) for k, v in state.items()}
    meta = merged_lora_metadata(
        state, [(str(p), m, r) for (p, _, m), r in zip(read, ratios, strict=True)], args.concat
    )
    save_lora_file(args.save_to, state, meta, model_format=fmt)  # type: ignore[arg-type]
    return args.save_to


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        problems = _problems(args)
        if problems:
            raise UserError(*problems)
        ratios = _ratios(args)
        if args.sd_model is None:
            print(f"wrote {merge_loras(args, ratios)} ({len(args.models)} LoRAs merged)")
            return
        for path in merge_into_model(args, ratios):
            print(f"wrote {path}")

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
