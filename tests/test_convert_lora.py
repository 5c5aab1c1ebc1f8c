"""tools/convert_lora.py: kohya FLUX LoRA <-> diffusers/AI-Toolkit layout keeps every per-Linear delta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flux_lora_helpers import assert_same_deltas, diffusers_deltas, kohya_deltas, random_network
from train_helpers import error_lines, metadata

from library.errors import UserError
from library.families.tiny_flux import build_tiny_flux
from networks.flux_convert import convert, diffusers_to_kohya, kohya_to_diffusers
from networks.lora_file import load_lora_file, save_lora_file
from tools.convert_lora import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_flux(0, tmp_path_factory.mktemp("flux_convert") / "tok")


def _kohya(tiny, **args: str) -> dict[str, torch.Tensor]:
    network = random_network(tiny.transformer, tiny.clip_l, tiny.t5, **args)
    return network.state_dict_for_save(torch.float32)


@pytest.mark.parametrize(
    "args",
    [{"in_dims": "[2,2,2,2,2]", "train_t5xxl": "True"}, {"split_qkv": "True"}],
    ids=["fused", "split_qkv"],
)
def test_kohya_to_diffusers_and_back_keeps_deltas(tiny, args):
    kohya = _kohya(tiny, **args)
    peft = kohya_to_diffusers(kohya)
    assert not [k for k in peft if not k.endswith(("lora_A.weight", "lora_B.weight"))]  # no alpha keys
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in peft
    assert_same_deltas(kohya_deltas(kohya, tiny.transformer), diffusers_deltas(peft))
    back = diffusers_to_kohya(peft)
    assert {k.split(".")[0] for k in back} == {k.split(".")[0] for k in kohya}
    assert_same_deltas(kohya_deltas(back, tiny.transformer), kohya_deltas(kohya, tiny.transformer))
    qkv = "lora_unet_double_blocks_1_img_attn_qkv"
    rank = 12 if args.get("split_qkv") else 4  # a block-diagonal up keeps its blocks; copied downs fuse
    assert back[f"{qkv}.lora_down.weight"].shape[0] == rank
    assert float(back[f"{qkv}.alpha"]) == rank  # alpha/rank baked into the ups: scale 1


def test_diffusers_with_own_downs_round_trips_exactly(tiny):
    peft = kohya_to_diffusers(_kohya(tiny))
    gen = torch.Generator().manual_seed(3)
    for key in [k for k in peft if k.endswith("lora_A.weight")]:
        peft[key] = torch.randn(peft[key].shape, generator=gen)
    kohya = diffusers_to_kohya(peft)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (16, 64)  # 4 parts x rank 4
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (448, 16)
    assert_same_deltas(kohya_deltas(kohya, tiny.transformer), diffusers_deltas(peft))
    again = kohya_to_diffusers(kohya)
    assert set(again) == set(peft)
    for key, value in peft.items():
        assert torch.equal(again[key], value), key


def test_missing_part_fuses_as_zero_rows(tiny):
    peft = {k: v for k, v in kohya_to_diffusers(_kohya(tiny)).items() if ".proj_mlp." not in k}
    kohya = diffusers_to_kohya(peft)
    up = kohya["lora_unet_single_blocks_1_linear1.lora_up.weight"]
    assert up.shape == (3 * 64 + 256, 4)
    assert not up[3 * 64 :].any()
    assert_same_deltas(
        {k: v for k, v in kohya_deltas(kohya, tiny.transformer).items() if ".proj_mlp" not in k},
        diffusers_deltas(peft),
    )


def test_cli_converts_both_ways_and_keeps_metadata(tiny, tmp_path: Path, capsys):
    source = tmp_path / "kohya.safetensors"
    meta = {"ss_network_dim": "4", "ss_base_model_version": "flux1", "modelspec.title": "t"}
    state = _kohya(tiny)
    save_lora_file(source, state, meta)
    assert main([str(source), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert "diffusers layout" in capsys.readouterr().out
    written = metadata(tmp_path / "d.safetensors")
    assert {k: written[k] for k in meta} == meta
    assert written["sshs_model_hash"] != metadata(source)["sshs_model_hash"]
    assert main([str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors")]) == 0
    back, back_meta = load_lora_file(tmp_path / "k.safetensors")
    assert back_meta["ss_network_dim"] == "4"
    assert_same_deltas(kohya_deltas(back, tiny.transformer), kohya_deltas(state, tiny.transformer))

    assert main([str(source), str(tmp_path / "k.safetensors")]) == 2
    assert error_lines(capsys) == [
        f"error: {tmp_path / 'k.safetensors'}: already exists; pass --overwrite to replace it"
    ]
    assert main([str(source), str(tmp_path / "x.safetensors"), "--to", "kohya"]) == 2
    assert error_lines(capsys) == ["error: --to kohya: the file is already in the kohya layout"]


def test_bad_inputs_are_user_errors():
    down, up = torch.zeros(2, 4), torch.zeros(4, 2)
    with pytest.raises(UserError, match="mixes kohya"):
        convert({"a.lora_down.weight": down, "b.lora_A.weight": down})
    with pytest.raises(UserError, match="not FLUX.1 LoRA modules"):
        convert(
            {
                "lora_unet_down_blocks_0_x.lora_down.weight": down,
                "lora_unet_down_blocks_0_x.lora_up.weight": up,
            }
        )
    with pytest.raises(UserError, match="no LoRA weights"):
        convert({"weight": down})
