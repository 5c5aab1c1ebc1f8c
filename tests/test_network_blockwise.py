"""Block-wise ranks and learning rates (kohya's block_dims / down|mid|up_lr_weight) on SD 1.x and SDXL."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.errors import UserError
from library.families.tiny_sdxl import REAL_UNET_CONFIG
from networks.lora import create_network
from networks.lora_args import family_problems, parse_network_args
from networks.lora_blocks import block_lr_weights, preset_weights
from tests.train_helpers import db_args, error_lines, make_images, run_main, run_sdxl, tb_scalars, tb_tags

SD_ATTENTION_BLOCKS = (1, 2, 4, 5, 7, 8, 12, 16, 17, 18, 19, 20, 21, 22, 23, 24)
# SDXL: modules per block = 10 per transformer layer + proj_in/proj_out (depth 2 at 640, 10 at 1280 channels)
SDXL_BLOCK_MODULES = {
    5: 22,
    6: 22,
    8: 102,
    9: 102,
    11: 102,
    13: 102,
    14: 102,
    15: 102,
    16: 22,
    17: 22,
    18: 22,
}


def _sd_block(name: str) -> int:
    """kohya's SD block of a module, spelled out from the UNet layout (3 slots per level, sampler last)."""
    if "_mid_block_" in name:
        return 12
    m = re.match(r"lora_unet_(down|up)_blocks_(\d)_(attentions|resnets|downsamplers|upsamplers)_(\d)_", name)
    assert m, name
    slot = 2 if m.group(3).endswith("samplers") else int(m.group(4))
    return (1 if m.group(1) == "down" else 13) + 3 * int(m.group(2)) + slot


def _sdxl_block(name: str) -> int:
    m = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d)_", name)
    assert m, name
    return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m.group(1)] + int(m.group(2))


@pytest.fixture(scope="module")
def real_unets():
    """SD 1.5 and SDXL UNets at their real sizes on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(cross_attention_dim=768), UNet2DConditionModel(**REAL_UNET_CONFIG)


def _ranks(network) -> dict[str, int]:
    return {lo.lora_name: lo.lora_dim for lo in network.unet_loras}


def test_sd15_block_dims_give_each_block_its_rank(real_unets):
    sd, _ = real_unets
    network = create_network(1.0, 4, 1.0, None, None, sd, block_dims=",".join(str(i) for i in range(25)))
    ranks = _ranks(network)
    assert len(ranks) == 192  # kohya's SD 1.5 UNet module count: nothing is lost or added
    assert all(rank == _sd_block(name) for name, rank in ranks.items())
    assert Counter(ranks.values()) == dict.fromkeys(SD_ATTENTION_BLOCKS, 12)


def test_sd15_conv_block_dims_and_alphas(real_unets):
    sd, _ = real_unets
    dims = ",".join(str(i) for i in range(25))
    alphas = ",".join(str(i / 2) for i in range(25))
    network = create_network(
        1.0,
        4,
        1.0,
        None,
        None,
        sd,
        block_dims="8," * 24 + "8",
        conv_block_dims=dims,
        conv_block_alphas=alphas,
    )
    convs = {lo.lora_name: lo for lo in network.unet_loras if lo.lora_down.weight.shape[2:] == (3, 3)}
    assert all(lo.lora_dim == _sd_block(n) and float(lo.alpha) == _sd_block(n) / 2 for n, lo in convs.items())
    assert convs["lora_unet_down_blocks_0_downsamplers_0_conv"].lora_dim == 3
    assert convs["lora_unet_down_blocks_3_resnets_1_conv2"].lora_dim == 11
    assert convs["lora_unet_mid_block_resnets_1_conv1"].lora_dim == 12
    assert convs["lora_unet_up_blocks_0_upsamplers_0_conv"].lora_dim == 15
    assert len(convs) == 2 * (8 + 2 + 12) + 3 + 3  # 2 per resnet (down, mid, up), 1 per down/upsampler
    linears = [lo for lo in network.unet_loras if lo.lora_name not in convs]
    assert {lo.lora_dim for lo in linears} == {8}  # time_emb_proj and 1x1 shortcuts take block_dims


def test_sdxl_block_dims_use_stability_block_numbers(real_unets):
    _, xl = real_unets
    network = create_network(1.0, 4, 1.0, None, None, xl, block_dims=",".join(str(i) for i in range(23)))
    ranks = _ranks(network)
    assert len(ranks) == 722
    assert all(rank == _sdxl_block(name) for name, rank in ranks.items())
    assert Counter(ranks.values()) == SDXL_BLOCK_MODULES
    conv = create_network(
        1.0,
        4,
        1.0,
        None,
        None,
        xl,
        block_dims="4," * 22 + "4",
        conv_block_dims=",".join(str(i) for i in range(23)),
    )
    by_name = _ranks(conv)
    assert by_name["lora_unet_input_blocks_3_0_op"] == 4
    assert by_name["lora_unet_middle_block_2_in_layers_2"] == 12
    assert by_name["lora_unet_output_blocks_8_0_out_layers_3"] == 21
    assert by_name["lora_unet_output_blocks_2_2_conv"] == 15


def test_presets_match_kohya_formulas():
    assert preset_weights("linear", 12) == pytest.approx([i / 11 for i in range(12)])
    assert preset_weights("reverse_linear", 9) == pytest.approx([1 - i / 8 for i in range(9)])
    assert preset_weights("sine", 9) == pytest.approx([math.sin(math.pi * i / 16) for i in range(9)])
    assert preset_weights("cosine+.5", 12) == pytest.approx(
        [math.sin(math.pi * (11 - i) / 22) + 0.5 for i in range(12)]
    )
    assert preset_weights("zeros+0.25", 12) == [0.25] * 12
    # SDXL: 1.0 around the 9 + 3 + 9 given weights (blocks 0 and 22 hold no LoRA); threshold zeroes small ones
    weights = block_lr_weights("sdxl", "linear", (0.5, 0.05, 2.0), None, 0.1)
    assert len(weights) == 23 and weights[0] == weights[22] == 1.0
    assert weights[1:10] == pytest.approx([0.0] + [i / 8 for i in range(1, 9)])
    assert weights[10:13] == [0.5, 0.0, 2.0] and weights[13:22] == [1.0] * 9


def test_block_lr_groups_and_zero_blocks(real_unets):
    sd, _ = real_unets
    network = create_network(
        1.0,
        4,
        1.0,
        None,
        None,
        sd,
        down_lr_weight="reverse_linear",  # block 11's weight is 0: no modules there (it has none anyway)
        mid_lr_weight="0.5",
        up_lr_weight="0,0,0,0,0,0,0,0,0,0,0,0.2",  # only block 24 learns among the up blocks
        block_lr_zero_threshold="0.1",  # drops block 10 (1/11 < 0.1); no attention there either
    )
    blocks = Counter(_sd_block(lo.lora_name) for lo in network.unet_loras)
    assert blocks == {1: 12, 2: 12, 4: 12, 5: 12, 7: 12, 8: 12, 12: 12, 24: 12}
    groups, names = network.prepare_optimizer_params(None, 1e-3, 1.0)
    # model order, as kohya groups them: diffusers registers up_blocks before mid_block
    order = [1, 2, 4, 5, 7, 8, 24, 12]
    assert names == [f"unet_block{i}" for i in order]
    weight = {**{i: 1 - i / 11 for i in (1, 2, 4, 5, 7, 8)}, 12: 0.5, 24: 0.2}
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * weight[i] for i in order])
    assert [len(g["params"]) for g in groups] == [24] * 8  # 12 modules x (down, up)


def test_block_dims_alone_keep_one_unet_group(real_unets):
    sd, _ = real_unets
    network = create_network(1.0, 4, 1.0, None, None, sd, block_dims="2," * 24 + "2", loraplus_lr_ratio="4")
    _, names = network.prepare_optimizer_params(None, None, 1e-4)
    assert names == ["unet", "unet plus"]


def test_wrong_lengths_name_the_family_length():
    args = ["block_dims=" + "4," * 23 + "4", "mid_lr_weight=1,1", "up_lr_weight=1,1,1"]
    parse_network_args(args)  # well-formed; the length depends on the family
    sd = family_problems(args, "sd")
    assert sd == [
        "--network_args block_dims: 24 values given, SD 1.x/2.x needs 25 "
        "(index 0 unused, 1-11 down blocks, 12 mid, 13-24 up blocks)",
        "--network_args up_lr_weight: 3 values given, SD 1.x/2.x needs 12 (one per up block, shallow to deep)",
        "--network_args mid_lr_weight: 2 values given, SD 1.x/2.x needs 1 (1 mid block value(s))",
    ]
    xl = family_problems(args, "sdxl")
    assert [line.split(":")[0] for line in xl] == [
        "--network_args block_dims",
        "--network_args up_lr_weight",
        "--network_args mid_lr_weight",
    ]
    assert "SDXL needs 23" in xl[0] and "SDXL needs 9" in xl[1] and "SDXL needs 3" in xl[2]
    flux = family_problems(["down_lr_weight=sine"], "flux")
    assert len(flux) == 1 and "for SD 1.x/2.x and SDXL UNets" in flux[0]
    with pytest.raises(UserError) as err:
        parse_network_args(["down_lr_weight=sin", "block_dims=4,x"])
    assert [p.split(":")[0] for p in err.value.problems] == [
        "--network_args down_lr_weight=sin",
        "--network_args block_dims=4,x",
    ]
    assert "preset cosine, sine" in err.value.problems[0]


def test_block_args_are_errors_before_loading(tiny_sdxl_dir: Path, tmp_path: Path, capsys):
    data = make_images(tmp_path, 2)
    argv = db_args(tiny_sdxl_dir, data, tmp_path / "out", "--network_args", "block_dims=" + "4," * 24 + "4")
    assert run_sdxl(argv) != 0
    lines = error_lines(capsys)
    assert any("block_dims: 25 values given, SDXL needs 23" in line for line in lines), lines


def test_tiny_sd1_trains_block_wise(tiny_sd1_dir: Path, tmp_path: Path):
    """down block 0 switched off by its lr weight, up block 1's attentions at ranks 2 and 3."""
    data = make_images(tmp_path, 2)
    dims = ["4"] * 25
    dims[16], dims[17] = "2", "3"
    argv = db_args(
        tiny_sd1_dir,
        data,
        tmp_path / "out",
        "--max_train_steps",
        "1",
        "--network_train_unet_only",
        "--network_args",
        "block_dims=" + ",".join(dims),
        "down_lr_weight=1,0,1,1,1,1,1,1,1,1,1,1",
        "mid_lr_weight=0.5",
        "--logging_dir",
        str(tmp_path / "logs"),
    )
    assert run_main(argv) == 0
    lr_tags = [t for t in tb_tags(tmp_path / "logs") if t.startswith("lr/")]
    assert lr_tags == ["lr/unet_block12", "lr/unet_block16", "lr/unet_block17"]
    assert tb_scalars(tmp_path / "logs", "lr/unet_block12")[0].value == pytest.approx(0.5e-3)
    state = load_file(str(tmp_path / "out" / "feat.safetensors"))
    downs = {k.split(".")[0]: v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")}
    assert not any("down_blocks" in name for name in downs)
    assert {r for n, r in downs.items() if "up_blocks_1_attentions_0" in n} == {2}
    assert {r for n, r in downs.items() if "up_blocks_1_attentions_1" in n} == {3}
    assert {r for n, r in downs.items() if "mid_block" in n} == {4}
    mid_up = [v for k, v in state.items() if "mid_block" in k and k.endswith("lora_up.weight")]
    assert all(torch.count_nonzero(v) > 0 for v in mid_up)  # lr 0.5 x 1e-3 still trains
