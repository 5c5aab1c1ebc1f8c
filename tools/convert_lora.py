"""Convert a LoRA (SD 1.x/2.x, SDXL, FLUX.1) between kohya's layout and the diffusers/PEFT (AI-Toolkit) layout.

    python tools/convert_lora.py IN.safetensors OUT.safetensors [--to diffusers|kohya] [--overwrite]

SD/SDXL: kohya (`lora_unet_…`, `lora_te_…`/`lora_te1_…`/`lora_te2_…`, alpha) <-> diffusers/PEFT
(`unet.<path>.lora_A.weight`, `text_encoder.text_model.…`, `text_encoder_2.…`, alpha/rank baked into lora_B;
what diffusers' `load_lora_weights` reads as is); see networks/sd_convert.py. The family is read from the
keys (and the metadata). FLUX.1:

kohya (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.alpha`; what this suite, kohya's
sd-scripts, ComfyUI and Forge use) <-> diffusers (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`,
no alpha; what AI-Toolkit and diffusers' `save_lora_weights` write). The direction is read from the keys;
`--to` only confirms it. Every per-Linear delta is kept (see networks/flux_convert.py); the header metadata
(ss_* training metadata, modelspec) is copied. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def convert_file(source: Path, dest: Path, to: str | None = None, overwrite: bool = False) -> str:
    """Convert `source` into `dest`; returns the layout written ("diffusers" or "kohya")."""
    from library.errors import UserError
    from networks import flux_convert, sd_convert
    from networks.lora_file import load_lora_file, save_lora_file
    from networks.ops.family_tables import detect_family

    if dest.exists() and not overwrite:
        raise UserError(f"{dest}: already exists; pass --overwrite to replace it")
    if dest.resolve() == source.resolve():
        raise UserError(f"{dest}: the output must differ from the input")
    state, metadata = load_lora_file(source)
    family, _ = detect_family(state, metadata)
    if family is None:
        raise UserError(f"{source}: cannot tell which model family this LoRA is for (no known module names)")
    if family == "flux":
        converted, layout = flux_convert.convert(state, to)
    else:
        converted, layout = sd_convert.convert(state, family, to)
    kept = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}  # hashes are rewritten on save
    save_lora_file(dest, converted, kept)
    return layout


def main(argv: list[str] | None = None) -> int:
    from library.errors import UserError

    parser = argparse.ArgumentParser(prog="convert_lora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="input LoRA (.safetensors, .ckpt or .pt)")
    parser.add_argument("dest", type=Path, help="output .safetensors")
    parser.add_argument("--to", choices=("diffusers", "kohya"), help="expected output layout")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        layout = convert_file(args.source, args.dest, args.to, args.overwrite)
    except UserError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    print(f"wrote {args.dest} ({layout} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
