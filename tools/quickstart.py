"""Quickstart: build a tiny random SD 1.x model locally and train a LoRA on the bundled sample dataset.

Runs on CPU in well under two minutes; nothing is downloaded. Prints where the LoRA was written.

    python tools/quickstart.py [--out quickstart_out] [--epochs 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="quickstart_out", help="folder for the tiny model and the LoRA")
    parser.add_argument("--epochs", type=int, default=4, help="epochs to train (40 steps each)")
    args = parser.parse_args()

    from library.families.tiny import build_tiny_sd, save_diffusers_folder

    out = Path(args.out)
    model_dir = out / "tiny-sd1"
    if not (model_dir / "model_index.json").exists():
        save_diffusers_folder(build_tiny_sd("sd1", seed=0), model_dir)
        print(f"made a tiny random SD 1.x model in {model_dir}")

    from library.entry import main as train_main

    started = time.time()
    argv = [
        "--pretrained_model_name_or_path",
        str(model_dir),
        "--dataset_config",
        str(ROOT / "dataset_configs" / "quickstart.toml"),
        "--output_dir",
        str(out / "lora"),
        "--output_name",
        "quickstart_lora",
        "--overwrite",
        "--network_module",
        "networks.lora",
        "--network_dim",
        "8",
        "--network_alpha",
        "4",
        "--learning_rate",
        "1e-3",
        "--optimizer_type",
        "AdamW",
        "--lr_scheduler",
        "constant",
        "--max_train_epochs",
        str(args.epochs),
        "--save_every_n_epochs",
        "2",
        "--cache_latents",
        "--seed",
        "42",
        "--max_data_loader_n_workers",
        "0",
    ]
    code = train_main(argv, prog="train_network.py", family="sd", description="quickstart")
    if code == 0:
        print(f"quickstart finished in {time.time() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
