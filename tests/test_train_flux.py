"""End to end: flux_train_network.py on the tiny FLUX.1, under accelerate and in process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import (
    ROOT,
    db_args,
    error_lines,
    flux_files_args,
    make_images,
    metadata,
    run_flux,
    run_main,
)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", n=4)


def _names(path: Path) -> set[str]:
    return {k.split(".", 1)[0] for k in load_file(str(path))}


def test_accelerate_launch_trains_a_kohya_flux_lora(tiny_flux, dataset: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = db_args(tiny_flux.transformer, dataset, out, "--max_train_steps", "3", name="fx")
    args += flux_files_args(tiny_flux) + ["--network_module", "networks.lora_flux", "--cache_latents"]
    args += [
        "--t5xxl_max_token_length",
        "32",
        "--timestep_sampling",
        "shift",
        "--model_prediction_type",
        "raw",
    ]
    args += ["--guidance_scale", "1.0", "--discrete_flow_shift", "3.1582", "--gradient_checkpointing"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "flux_train_network.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = out / "fx.safetensors"
    state = load_file(str(final))
    names = {k.split(".", 1)[0] for k in state}
    assert {n.split("_", 2)[0] + "_" + n.split("_", 2)[1] for n in names} == {"lora_unet", "lora_te1"}
    assert "lora_unet_double_blocks_1_txt_attn_qkv" in names and "lora_unet_single_blocks_1_linear1" in names
    assert state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * 64, 4)  # fused qkv
    assert state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 64 + 256, 4)
    md = metadata(final)
    assert md["ss_base_model_version"] == "flux1" and md["modelspec.architecture"] == "flux-1-dev/lora"
    assert md["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert "modelspec.prediction_type" not in md  # kohya writes none for FLUX
    assert (md["ss_timestep_sampling"], md["ss_model_prediction_type"]) == ("shift", "raw")
    assert (md["ss_guidance_scale"], md["ss_discrete_flow_shift"]) == ("1.0", "3.1582")
    assert (md["ss_t5xxl_max_token_length"], md["ss_apply_t5_attn_mask"]) == ("32", "False")
    assert md["ss_network_module"] == "networks.lora_flux" and md["ss_steps"] == "3"


def test_diffusers_folder_and_schnell_train(tiny_flux, tiny_flux_schnell, dataset: Path, tmp_path: Path):
    args = db_args(tiny_flux.diffusers_dir, dataset, tmp_path / "a", "--max_train_steps", "1")
    assert run_flux([*args, "--t5xxl_max_token_length", "16", "--apply_t5_attn_mask"]) == 0
    args = db_args(tiny_flux_schnell.transformer, dataset, tmp_path / "b", "--max_train_steps", "1")
    args += flux_files_args(tiny_flux_schnell) + ["--timestep_sampling", "flux_shift"]
    assert run_flux(args) == 0
    assert metadata(tmp_path / "b" / "feat.safetensors")["modelspec.architecture"] == "flux-1-schnell/lora"


def test_cached_text_encoder_outputs_train_the_same_lora(tiny_flux, dataset: Path, tmp_path: Path):
    common = flux_files_args(tiny_flux) + ["--network_train_unet_only", "--t5xxl_max_token_length", "16"]
    plain = db_args(tiny_flux.transformer, dataset, tmp_path / "plain", "--max_train_steps", "2", *common)
    cached = db_args(tiny_flux.transformer, dataset, tmp_path / "cached", "--max_train_steps", "2", *common)
    assert run_flux(plain) == 0
    assert run_flux([*cached, "--cache_text_encoder_outputs_to_disk"]) == 0
    npz = np.load(next((dataset / "2_sks shape").glob("*_flux_te.npz")))  # kohya's FLUX name and keys
    assert npz["txt_ids"].shape == (16, 3) and float(npz["apply_t5_attn_mask"]) == 0.0
    assert (
        npz["t5_out"].shape == (16, 32)
        and npz["l_pooled"].shape == (64,)
        and npz["t5_attn_mask"].shape == (16,)
    )
    a, b = (
        load_file(str(tmp_path / "plain" / "feat.safetensors")),
        load_file(str(tmp_path / "cached" / "feat.safetensors")),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_sampling_draws_flux_images(tiny_flux, dataset: Path, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks shape --w 64 --h 96 --s 2 --d 5 --g 2.5\n")
    args = db_args(
        tiny_flux.transformer, dataset, tmp_path / "out", "--max_train_steps", "1", "--sample_at_first"
    )
    args += flux_files_args(tiny_flux) + ["--sample_prompts", str(prompts), "--t5xxl_max_token_length", "16"]
    assert run_flux(args) == 0
    (image,) = sorted((tmp_path / "out" / "sample").glob("*.png"))
    assert Image.open(image).size == (64, 96)


def test_flux_options_and_schedule_flags_are_checked_up_front(
    tiny_flux, tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys
):
    out = tmp_path / "out"
    assert run_main(db_args(tiny_sd1_dir, dataset, out, "--guidance_scale", "2", "--clip_l", "x")) == 2
    assert error_lines(capsys) == [
        "error: --clip_l: only flux_train_network.py reads it; remove it or use flux_train_network.py",
        "error: --guidance_scale: only flux_train_network.py reads it; remove it or use flux_train_network.py",
    ]
    args = db_args(tiny_flux.transformer, dataset, out, *flux_files_args(tiny_flux))
    assert run_flux([*args, "--min_snr_gamma", "5", "--weighted_captions"]) == 2
    lines = error_lines(capsys)
    assert (
        lines[0]
        == "error: --weighted_captions: flux_train_network.py has no caption weighting (kohya: SD and SDXL only)"
    )
    assert lines[1].startswith("error: --min_snr_gamma: needs a DDPM noise schedule")
    assert run_flux(db_args(tiny_flux.transformer, dataset, out)) == 2
    assert error_lines(capsys)[0].startswith("error: --clip_l, --t5xxl, --ae required")
    assert not out.exists()


def test_clip_lora_trains_live_with_t5_outputs_cached(tiny_flux, dataset: Path, tmp_path: Path):
    """kohya's partial caching: T5 comes from the cache, CLIP-L runs (and trains) every step; same LoRA."""
    from library.config import parse_config
    from library.families import get_family
    from library.training.loop import train_loop
    from library.training.setup import build_run

    common = flux_files_args(tiny_flux) + ["--t5xxl_max_token_length", "16", "--max_train_steps", "2"]
    plain = db_args(tiny_flux.transformer, dataset, tmp_path / "plain", *common)
    assert run_flux(plain) == 0
    cached = db_args(
        tiny_flux.transformer, dataset, tmp_path / "cached", *common, "--cache_text_encoder_outputs"
    )
    run = build_run(parse_config(cached, prog="t", description="t"), get_family("flux"))
    clip, t5 = run.bundle.text_encoders
    assert run.step_options.live_text_encoders == (0,)
    assert next(t5.parameters()).device.type == "cpu"
    calls = {"clip": 0, "t5": 0}
    clip.register_forward_hook(lambda *_: calls.__setitem__("clip", calls["clip"] + 1))
    t5.register_forward_hook(lambda *_: calls.__setitem__("t5", calls["t5"] + 1))
    train_loop(run)
    assert calls == {"clip": 2, "t5": 0}
    a = load_file(str(tmp_path / "plain" / "feat.safetensors"))
    b = load_file(str(tmp_path / "cached" / "feat.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("lora_te1_") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_validation_loss_is_fixed_for_flux(tiny_flux, tmp_path: Path):
    """kohya's FLUX validation draws random timesteps; ours are the same four noise levels every time."""
    from library.config import parse_config
    from library.families import get_family
    from library.training.extras import build_extras
    from library.training.progress import Logger
    from library.training.setup import build_run

    data = make_images(tmp_path / "data", n=4)
    args = db_args(
        tiny_flux.transformer, data, tmp_path / "out", "--validation_split", "0.5", "--max_train_steps", "1"
    )
    args += flux_files_args(tiny_flux) + ["--t5xxl_max_token_length", "16", "--timestep_sampling", "sigmoid"]
    run = build_run(parse_config(args, prog="t", description="t"), get_family("flux"))

    class _Bar:
        def set_postfix(self, *a, **k) -> None: ...

        def write(self, *a, **k) -> None: ...

    validator = build_extras(run, Logger(None, None, "x"), _Bar()).validator
    modules = [run.network, run.bundle.unet, *run.bundle.text_encoders]
    first = validator.loss(modules, run.optimizer)
    torch.manual_seed(123)  # the training RNG must not matter
    second = validator.loss(modules, run.optimizer)
    assert first == second and np.isfinite(first) and first > 0
