"""End to end: sdxl_train_network.py on the tiny SDXL, under accelerate and in process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file
from train_helpers import ROOT, common_args, db_args, error_lines, make_images, metadata, run_main, run_sdxl


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", n=4)


def _names(path: Path) -> set[str]:
    return {
        k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in load_file(str(path))
    }


def _aspect_dataset(root: Path) -> Path:
    """Wide, tall and square images with a TOML in steps of 32: buckets SD would refuse."""
    images = root / "img"
    images.mkdir(parents=True)
    for i, size in enumerate([(128, 64), (64, 128), (96, 96), (128, 64)]):
        Image.new("RGB", size, (40 * i, 200 - 40 * i, 90)).save(images / f"im{i}.png")
        (images / f"im{i}.txt").write_text(f"sks shape, item {i}")
    toml = root / "sdxl.toml"
    toml.write_text(
        "[general]\nresolution = 96\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 192\n"
        'bucket_reso_steps = 32\ncaption_extension = ".txt"\n\n[[datasets]]\nbatch_size = 1\n\n'
        f"  [[datasets.subsets]]\n  image_dir = '{images}'\n  num_repeats = 1\n"
    )
    return toml


def test_accelerate_launch_trains_a_kohya_sdxl_lora(tiny_sdxl_dir: Path, tmp_path: Path):
    toml = _aspect_dataset(tmp_path / "data")
    out = tmp_path / "out"
    args = common_args(tiny_sdxl_dir, out, "--dataset_config", str(toml), "--max_train_steps", "4", name="xl")
    args += ["--cache_latents", "--gradient_checkpointing", "--text_encoder_lr", "1e-4", "5e-5"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "sdxl_train_network.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "96x96" in proc.stdout and "128x64" in proc.stdout and "64x128" in proc.stdout  # the bucket plan
    final = out / "xl.safetensors"
    names = _names(final)
    prefixes = {n.split("_", 2)[0] + "_" + n.split("_", 2)[1] for n in names}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k" in names
    assert "lora_unet_output_blocks_2_1_proj_out" in names
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc1" in names
    assert not [n for n in names if "down_blocks" in n or "mid_block" in n]
    md = metadata(final)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    # kohya takes the resolution from --resolution only; unset, SDXL's default is recorded
    assert md["modelspec.prediction_type"] == "epsilon" and md["modelspec.resolution"] == "1024x1024"
    assert md["ss_text_encoder_lr"] == "[0.0001, 5e-05]" and md["ss_steps"] == "4"


def test_single_file_with_tokenizer_paths_and_locon(tiny_sdxl_single_file, dataset: Path, tmp_path: Path):
    tok = tiny_sdxl_single_file.tokenizer_dir
    args = db_args(tiny_sdxl_single_file.checkpoint, dataset, tmp_path / "out", "--max_train_steps", "2")
    args += ["--tokenizer_path", str(tok), "--tokenizer_2_path", str(tok.with_name(tok.name + "_2"))]
    args += ["--network_args", "conv_dim=2", "conv_alpha=1", "--network_train_unet_only"]
    assert run_sdxl(args) == 0
    names = _names(tmp_path / "out" / "feat.safetensors")
    assert all(n.startswith("lora_unet_") for n in names)
    assert {"lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv"} <= names
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names


def test_per_encoder_learning_rates_reach_the_optimizer(tiny_sdxl_dir: Path, dataset: Path, tmp_path: Path):
    from train_helpers import tb_scalars

    logs = tmp_path / "logs"
    args = db_args(
        tiny_sdxl_dir, dataset, tmp_path / "out", "--max_train_steps", "1", "--logging_dir", str(logs)
    )
    args += ["--text_encoder_lr", "1e-4", "5e-5", "--unet_lr", "2e-4", "--learning_rate", "1e-3"]
    assert run_sdxl(args) == 0
    lrs = {tag: tb_scalars(logs, tag)[0].value for tag in ("lr/textencoder1", "lr/textencoder2", "lr/unet")}
    assert lrs == pytest.approx({"lr/textencoder1": 1e-4, "lr/textencoder2": 5e-5, "lr/unet": 2e-4})


def test_sdxl_only_flags_and_wrong_scripts_fail_before_weights(
    tiny_sdxl_dir: Path, tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys
):
    out = tmp_path / "out"
    assert run_main(db_args(tiny_sd1_dir, dataset, out, "--tokenizer_2_path", str(tmp_path))) == 2
    assert error_lines(capsys) == [
        "error: --tokenizer_2_path: this model family has no such tokenizer; remove --tokenizer_2_path"
    ]
    assert run_main(db_args(tiny_sdxl_dir, dataset, out)) == 2
    assert error_lines(capsys) == [
        f"error: --pretrained_model_name_or_path: {tiny_sdxl_dir} is an SDXL checkpoint; use sdxl_train_network.py"
    ]
    assert run_sdxl(db_args(tiny_sd1_dir, dataset, out)) == 2
    assert error_lines(capsys) == [
        f"error: --pretrained_model_name_or_path: {tiny_sd1_dir} is an SD 1.x/2.x model folder; use train_network.py"
    ]
    assert run_sdxl(db_args(tiny_sdxl_dir, dataset, out, "--text_encoder_lr", "1", "2", "3")) == 2
    assert error_lines(capsys) == [
        "error: --text_encoder_lr: 3 values given, but this model has 2 text encoder(s); pass one value for all "
        "of them or 2, one each"
    ]
    assert not out.exists()


def test_bucket_steps_of_32_are_sdxl_only(tiny_sd1_dir: Path, tmp_path: Path, capsys):
    toml = _aspect_dataset(tmp_path / "data")
    args = common_args(tiny_sd1_dir, tmp_path / "out", "--dataset_config", str(toml), "--dry_run")
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        "error: bucket_reso_steps of dataset 0 is 32; this model family needs a multiple of 64 "
        "(set bucket_reso_steps = 64)"
    ]


def test_example_sdxl_dataset_config_plans(tiny_sdxl_dir: Path, tmp_path: Path, capsys, caplog):
    args = common_args(
        tiny_sdxl_dir, tmp_path / "out", "--dataset_config", "dataset_configs/sdxl_example.toml"
    )
    assert run_sdxl([*args, "--dry_run", "--clip_skip", "2"]) == 0
    captured = capsys.readouterr()
    assert "resolution 1024x1024" in captured.out and "no weights were loaded" in captured.out
    assert "--clip_skip 2 is ignored" in caplog.text


def test_sampling_writes_sdxl_images(tiny_sdxl_dir: Path, dataset: Path, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks shape --w 64 --h 96 --s 2 --d 5 --n blurry\n")
    args = db_args(tiny_sdxl_dir, dataset, tmp_path / "out", "--max_train_steps", "1", "--sample_at_first")
    args += ["--sample_prompts", str(prompts), "--sample_sampler", "euler_a", "--weighted_captions"]
    assert run_sdxl(args) == 0
    (image,) = sorted((tmp_path / "out" / "sample").glob("*.png"))
    assert Image.open(image).size == (64, 96)


def test_bf16_checkpointing_long_weighted_captions_train_every_part(
    tiny_sdxl_dir: Path, dataset: Path, tmp_path
):
    import torch

    args = db_args(
        tiny_sdxl_dir, dataset, tmp_path / "out", "--max_train_steps", "2", "--learning_rate", "1e-2"
    )
    args += [
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--no_half_vae",
        "--save_precision",
        "bf16",
    ]
    args += ["--max_token_length", "225", "--weighted_captions", "--optimizer_type", "AdamW8bit"]
    assert run_sdxl(args) == 0
    state = load_file(str(tmp_path / "out" / "feat.safetensors"))
    ups = {k: v for k, v in state.items() if k.endswith("lora_up.weight")}
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in ups.values())
    # lora_up starts at zero: non-zero after two steps means gradients reached UNet and both text encoders
    # text encoder 1's last layer feeds nothing SDXL reads (penultimate states, no pool), so its LoRA stays zero,
    # as in kohya's files; text encoder 2's last layer feeds the pooled embedding.
    unused = {k for k in ups if k.startswith("lora_te1_text_model_encoder_layers_2_")}
    assert len(unused) == 6 and all(ups[k].abs().sum() == 0 for k in unused)
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert all(v.abs().sum() > 0 for k, v in ups.items() if k.startswith(prefix) and k not in unused), (
            prefix
        )
