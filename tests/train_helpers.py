"""Shared helpers for the end-to-end training tests: tiny datasets, argument lists, file readers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from library.entry import main

ROOT = Path(__file__).resolve().parent.parent
COLORS = [(220, 30, 30), (30, 200, 60), (40, 60, 220), (240, 200, 20)]
NAME = "feat"


def make_images(root: Path, n: int, repeats: int = 2) -> Path:
    """`root/img/<repeats>_sks shape/` with n distinct 64x64 images and .caption files; returns root/img."""
    folder = root / "img" / f"{repeats}_sks shape"
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (64, 64), COLORS[i % len(COLORS)])
        for x in range(8 * (i + 1), 8 * (i + 1) + 16):
            for y in range(16, 40):
                img.putpixel((x % 64, y), (255, 255, 255))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.caption").write_text(f"sks shape, {['red', 'green', 'blue', 'yellow'][i % 4]}")
    return root / "img"


def common_args(model: Path, out: Path, *extra: str, name: str = NAME) -> list[str]:
    """Everything but the dataset: tiny LoRA, fixed seed, no workers, batch 2."""
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--output_dir",
        str(out),
        "--output_name",
        name,
        "--network_module",
        "networks.lora",
        "--network_dim",
        "4",
        "--network_alpha",
        "2",
        "--learning_rate",
        "1e-3",
        "--seed",
        "7",
        "--max_data_loader_n_workers",
        "0",
        "--train_batch_size",
        "2",
        *extra,
    ]


def db_args(model: Path, data: Path, out: Path, *extra: str, name: str = NAME) -> list[str]:
    return common_args(model, out, "--train_data_dir", str(data), "--resolution", "64", *extra, name=name)


def run_main(argv: list[str]) -> int:
    return main(argv, prog="train_network.py", family="sd", description="test")


def run_sdxl(argv: list[str]) -> int:
    return main(argv, prog="sdxl_train_network.py", family="sdxl", description="test")


def run_flux(argv: list[str]) -> int:
    return main(argv, prog="flux_train_network.py", family="flux", description="test")


def flux_files_args(files, *, folder: bool = False) -> list[str]:
    """--clip_l/--t5xxl/--ae and both tokenizer folders of a tiny FLUX (none of the files with `folder`)."""
    args = [
        "--tokenizer_path",
        str(files.clip_tokenizer_dir),
        "--tokenizer_2_path",
        str(files.t5_tokenizer_dir),
    ]
    if not folder:
        args += ["--clip_l", str(files.clip_l), "--t5xxl", str(files.t5xxl), "--ae", str(files.ae)]
    return args


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def lora_names(state: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(".", 1)[0] for k in state}


def up_weights(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix) and k.endswith(".lora_up.weight")}


def error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


def tb_accumulator(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = [p for p in logdir.iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def tb_scalars(logdir: Path, tag: str) -> list:
    return tb_accumulator(logdir).Scalars(tag)


def tb_tags(logdir: Path) -> list[str]:
    return sorted(tb_accumulator(logdir).Tags()["scalars"])


def overfit_args(logs: Path, steps: int) -> list[str]:
    """A small run that must visibly learn: one narrow timestep band, a large UNet-only LoRA, a high lr."""
    return [
        "--max_train_steps", str(steps), "--learning_rate", "3e-3", "--cache_latents",
        "--logging_dir", str(logs), "--min_timestep", "400", "--max_timestep", "401",
        "--network_train_unet_only", "--network_dim", "16", "--network_alpha", "16",
    ]  # fmt: skip
