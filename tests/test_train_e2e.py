"""End to end: train_network.py on the tiny SD 1.x model, under accelerate, through the real loaders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import ROOT, db_args, make_images, overfit_args, run_main, tb_scalars


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", n=4)


def test_accelerate_launch_writes_kohya_lora(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        dataset,
        out,
        "--max_train_steps",
        "3",
        "--save_every_n_steps",
        "2",
        "--cache_latents",
        "--sdpa",
        "--save_precision",
        "fp16",
        name="e2e",
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "train_network.py"),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = out / "e2e.safetensors"
    assert f"LoRA written to {final}" in proc.stdout
    assert (out / "e2e-step00000002.safetensors").is_file()
    sd = load_file(str(final))
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert all(n.startswith(("lora_unet_", "lora_te_")) for n in names)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    for n in names:
        assert sd[f"{n}.alpha"].ndim == 0 and float(sd[f"{n}.alpha"]) == 2.0
        assert sd[f"{n}.lora_down.weight"].shape[0] == 4
        assert sd[f"{n}.lora_up.weight"].dtype == torch.float16
    with safe_open(str(final), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["ss_steps"] == "3" and md["ss_seed"] == "7"
    assert md["ss_num_train_images"] == "8"  # 4 images x 2 repeats
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert len(md["sshs_model_hash"]) == 64
    assert json.loads(md["ss_tag_frequency"])


def test_loss_falls_on_overfit_run(tiny_sd1_dir: Path, tmp_path: Path):
    data = make_images(tmp_path / "data", n=2)
    logs = tmp_path / "logs"
    args = db_args(
        tiny_sd1_dir,
        data,
        tmp_path / "out",
        *overfit_args(logs, 60),
        name="e2e",
    )
    assert run_main(args) == 0
    losses = [e.value for e in tb_scalars(logs, "loss/current")]
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_resume_continues_exactly(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path):
    common = ["--cache_latents", "--lr_scheduler", "constant", "--save_state"]
    straight = tmp_path / "straight"
    assert (
        run_main(db_args(tiny_sd1_dir, dataset, straight, "--max_train_steps", "6", *common, name="e2e")) == 0
    )

    split = tmp_path / "split"
    assert run_main(db_args(tiny_sd1_dir, dataset, split, "--max_train_steps", "3", *common, name="e2e")) == 0
    state = split / "e2e-state"
    progress = json.loads((state / "train_state.json").read_text())
    assert (progress["global_step"], progress["epoch"], progress["batch_in_epoch"]) == (3, 0, 3)
    assert (
        run_main(
            db_args(
                tiny_sd1_dir,
                dataset,
                split,
                "--max_train_steps",
                "6",
                "--resume",
                str(state),
                *common,
                name="e2e",
            )
        )
        == 0
    )
    a, b = load_file(str(straight / "e2e.safetensors")), load_file(str(split / "e2e.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit: same weights, moments, noise and batches
    with safe_open(str(split / "e2e.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "6"


def test_resume_mid_schedule_continues_exactly(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path):
    """A schedule that changes every step (warmup, then cosine): the state saved at step 3 of a 6-step run
    resumes, with the same --max_train_steps, to that run's final LoRA bit for bit."""
    common = [
        "--cache_latents", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--max_train_steps", "6",
    ]  # fmt: skip
    straight = tmp_path / "straight"
    saves = ["--save_every_n_steps", "3", "--save_state"]
    args = db_args(tiny_sd1_dir, dataset, straight, *common, *saves, name="e2e")
    assert run_main(args) == 0
    state = straight / "e2e-step00000003-state"
    resumed = tmp_path / "resumed"
    assert run_main(db_args(tiny_sd1_dir, dataset, resumed, *common, "--resume", str(state), name="e2e")) == 0
    a, b = load_file(str(straight / "e2e.safetensors")), load_file(str(resumed / "e2e.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
