"""SD 2.x, precision and memory flags, gradient accumulation and seeds, trained end to end on the tiny models."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    NAME,
    db_args,
    lora_names,
    make_images,
    metadata,
    run_main,
    tb_scalars,
    up_weights,
)

from library.config import parse_config
from library.families import get_family
from library.families.tiny import TinySingleFile
from library.training.run import prepare

# --- 3. SD 2.x -------------------------------------------------------------------------------------------


def test_sd2_single_file_v_parameterization(
    tiny_sd2_single_file: TinySingleFile, data2: Path, tmp_path: Path
):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd2_single_file.checkpoint,
        data2,
        out,
        "--tokenizer_path",
        str(tiny_sd2_single_file.tokenizer_dir),
        "--v2",
        "--v_parameterization",
        "--max_train_steps",
        "2",
        "--cache_latents",
    )
    assert run_main(args) == 0
    final = out / f"{NAME}.safetensors"
    md = metadata(final)
    assert md["ss_v2"] == "True"
    assert md["ss_base_model_version"] == "sd_v2_v"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert md["modelspec.prediction_type"] == "v"
    assert md["modelspec.resolution"] == "64x64"
    names = lora_names(load_file(str(final)))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names  # SD2: linear projection


def test_sd2_detected_without_v2_flag(tiny_sd2_dir: Path, data2: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert run_main(db_args(tiny_sd2_dir, data2, out, "--max_train_steps", "1", "--cache_latents")) == 0
    md = metadata(out / f"{NAME}.safetensors")
    assert (md["ss_v2"], md["ss_base_model_version"]) == ("True", "sd_v2")
    assert md["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert md["modelspec.prediction_type"] == "epsilon"


# --- 4. mixed precision and memory -----------------------------------------------------------------------


def test_bf16_gradient_checkpointing_prepared_run_trains(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    from library.training.loop import train_loop

    out = tmp_path / "out"
    argv = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--max_train_steps",
        "2",
    )
    config = parse_config(argv, prog="train_network.py", description="test")
    run = prepare(config, get_family("sd"))
    assert run.bundle.unet.is_gradient_checkpointing
    te_flags = [
        m.gradient_checkpointing
        for m in run.bundle.text_encoders[0].modules()
        if hasattr(m, "gradient_checkpointing")
    ]
    assert te_flags and all(te_flags)
    assert run.bundle.unet.training  # diffusers only checkpoints in train mode
    # a checkpointed transformer block starts twice per step: forward, then the recompute in backward
    # (a pre-hook: torch's checkpoint stops the recompute early, before forward hooks would run)
    calls: list[int] = []
    block = run.bundle.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    assert next(run.bundle.unet.parameters()).dtype == torch.bfloat16
    before = {k: v.clone() for k, v in run.network.state_dict().items()}
    assert all(float(v.abs().sum()) == 0 for v in up_weights(before, "lora_").values())

    final = train_loop(run)

    assert final == out / f"{NAME}.safetensors"
    assert len(calls) == 2 * 2
    saved = load_file(str(final))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert saved.keys() == before.keys()
    # grads reached every LoRA module through the checkpointed blocks: every zero-initialised up moved
    for key, weight in up_weights(saved, "lora_").items():
        assert float(weight.abs().sum()) > 0, key
    md = metadata(final)
    assert (md["ss_mixed_precision"], md["ss_gradient_checkpointing"]) == ("bf16", "True")


def test_bf16_save_precision(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--save_precision",
        "bf16",
        "--max_train_steps",
        "1",
        "--cache_latents",
    )
    assert run_main(args) == 0
    saved = load_file(str(out / f"{NAME}.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}  # alpha included, as kohya


def test_fp16_on_cpu_falls_back_to_fp32(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, data2, out, "--mixed_precision", "fp16", "--max_train_steps", "1")
    with caplog.at_level(logging.WARNING):
        assert run_main(args) == 0
    assert "--mixed_precision fp16 needs a CUDA GPU; training in float32 on CPU" in caplog.text
    final = out / f"{NAME}.safetensors"
    assert {v.dtype for v in load_file(str(final)).values()} == {torch.float32}
    assert metadata(final)["ss_mixed_precision"] == "no"  # what the run actually used


# --- 5. gradient accumulation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("images", "batches", "steps"), [(4, 4, 2), (3, 3, 2)])
def test_gradient_accumulation_step_count(
    tiny_sd1_dir: Path, tmp_path: Path, images: int, batches: int, steps: int
):
    data = make_images(tmp_path / "data", n=images)  # x2 repeats, batch 2 -> `images` batches
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    args = db_args(
        tiny_sd1_dir,
        data,
        out,
        "--gradient_accumulation_steps",
        "2",
        "--max_train_epochs",
        "1",
        "--cache_latents",
        "--logging_dir",
        str(logs),
    )
    assert run_main(args) == 0
    md = metadata(out / f"{NAME}.safetensors")
    assert md["ss_num_batches_per_epoch"] == str(batches)
    assert (md["ss_steps"], md["ss_max_train_steps"], md["ss_epoch"]) == (str(steps), str(steps), "1")
    assert md["ss_gradient_accumulation_steps"] == "2"
    assert [e.step for e in tb_scalars(logs, "loss/current")] == list(range(1, steps + 1))


# --- 13. seed --------------------------------------------------------------------------------------------


def test_unset_seed_is_chosen_logged_and_recorded(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, data2, out, "--max_train_steps", "1", "--cache_latents")
    i = args.index("--seed")
    del args[i : i + 2]
    caplog.set_level(logging.INFO)
    assert run_main(args) == 0
    seeds = [m.removeprefix("seed: ") for m in caplog.messages if m.startswith("seed: ")]
    assert len(seeds) == 1 and seeds[0].isdigit()
    assert 0 <= int(seeds[0]) < 2**31
    assert metadata(out / f"{NAME}.safetensors")["ss_seed"] == seeds[0]
