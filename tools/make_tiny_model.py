"""Write a tiny random SD 1.x/2.x or SDXL model for the quickstart, tests and benchmarks (no downloads).

python tools/make_tiny_model.py --out models/tiny-sd1 [--version sd1|sd2|sdxl] [--format diffusers|single_file|both]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.families.tiny import write_tiny_model  # noqa: E402
from library.families.tiny_flux import write_tiny_flux  # noqa: E402
from library.families.tiny_sdxl import write_tiny_sdxl  # noqa: E402

EPILOG = """where files go (OUT = --out):
  diffusers    OUT/ (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
  single_file  OUT.safetensors (or OUT itself if it ends in .safetensors/.ckpt) and OUT_tokenizer/;
               pass that folder as --tokenizer_path, since single files carry no tokenizer
  both         all of the above, same weights; the tokenizer is OUT/tokenizer/
SDXL adds text_encoder_2/ and tokenizer_2/ (single file: OUT_tokenizer_2/, pass as --tokenizer_2_path); its
single file is in Stability's layout. Train it with sdxl_train_network.py.
FLUX (flux-dev / flux-schnell): single_file writes OUT/flux1-tiny.safetensors (BFL layout), ae, clip_l and
t5xxl_fp16 .safetensors plus OUT/clip_tokenizer and OUT/t5_tokenizer; diffusers writes OUT/diffusers/.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output path without extension (see below)")
    parser.add_argument(
        "--version", default="sd1", choices=["sd1", "sd2", "sdxl", "flux-dev", "flux-schnell"]
    )
    parser.add_argument("--format", default="diffusers", choices=["diffusers", "single_file", "both"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.version.startswith("flux"):
        fmt = {"single_file": "single_files"}.get(args.format, args.format)
        flux = write_tiny_flux(args.out, fmt=fmt, seed=args.seed, schnell=args.version == "flux-schnell")
        for name in (
            "diffusers_dir",
            "transformer",
            "clip_l",
            "t5xxl",
            "ae",
            "clip_tokenizer_dir",
            "t5_tokenizer_dir",
        ):
            if getattr(flux, name) is not None:
                print(f"{name + ':':<19}{getattr(flux, name)}")
        print("train with flux_train_network.py (--clip_l/--t5xxl/--ae, --tokenizer_path/--tokenizer_2_path)")
        return 0
    if args.version == "sdxl":
        files = write_tiny_sdxl(args.out, fmt=args.format, seed=args.seed)
    else:
        files = write_tiny_model(args.out, version=args.version, fmt=args.format, seed=args.seed)
    if files.diffusers_dir is not None:
        print(f"diffusers folder: {files.diffusers_dir}")
    if files.single_file is not None:
        print(f"single file:      {files.single_file.checkpoint}")
        print(f"tokenizer:        {files.single_file.tokenizer_dir}  (pass as --tokenizer_path)")
        if args.version == "sdxl":
            second = files.single_file.tokenizer_dir.with_name(files.single_file.tokenizer_dir.name + "_2")
            print(f"tokenizer 2:      {second}  (pass as --tokenizer_2_path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
