"""--cpu_offload_checkpointing on the UNet families (kohya's crashes there): the same LoRA as plain checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import db_args, make_images, run_main, run_sdxl

# Plain SGD: Adam's normalisation would blow a 1e-9 gradient difference on a near-zero gradient up to lr.
SGD = ["--gradient_checkpointing", "--optimizer_type", "torch.optim.SGD", "--learning_rate", "0.5"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_offloaded_checkpointing_trains_the_same_lora(family, tiny_sd1_dir, tiny_sdxl_dir, tmp_path: Path):
    model, run = (tiny_sd1_dir, run_main) if family == "sd1" else (tiny_sdxl_dir, run_sdxl)
    data = make_images(tmp_path / "data", n=4)
    # The text encoders train too, so gradients cross the checkpointed blocks into encoder_hidden_states.
    common = ["--max_train_steps", "3", *SGD]
    assert run(db_args(model, data, tmp_path / "plain", *common)) == 0
    assert run(db_args(model, data, tmp_path / "offload", *common, "--cpu_offload_checkpointing")) == 0
    plain = load_file(str(tmp_path / "plain" / "feat.safetensors"))
    offload = load_file(str(tmp_path / "offload" / "feat.safetensors"))
    assert plain.keys() == offload.keys()
    ups = [k for k in plain if k.endswith("lora_up.weight")]
    # trained: the up weights start at zero
    assert sum(plain[k].abs().sum().item() > 0 for k in ups) > len(ups) // 2
    worst = max((plain[k].float() - offload[k].float()).abs().max().item() for k in plain)
    assert worst <= 1e-6, worst
