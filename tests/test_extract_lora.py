"""tools/extract_lora.py: a model tuned by known low-rank ΔW on a few modules gives those ΔW back (SD1 single
file incl. LoCon, SDXL's OpenCLIP in_proj slices, FLUX fused modules in BFL files and diffusers folders) and
no module for the untouched ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from networks.lora_file import load_lora_file
from networks.lora_module import lora_delta
from networks.ops.merge import factors_from_state
from tools.extract_lora import main

# (kohya module name, [(file, key, rows of the tensor)]) -> the test's own spelling of where each ΔW goes
Edits = dict[str, tuple[tuple[int, ...], list[tuple[str, str, tuple[int, int] | None]]]]


def _low_rank(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if len(shape) == 4:
        down, up = (
            torch.randn(2, shape[1], *shape[2:], generator=gen),
            torch.randn(shape[0], 2, 1, 1, generator=gen),
        )
    else:
        down, up = torch.randn(2, shape[1], generator=gen), torch.randn(shape[0], 2, generator=gen)
    return lora_delta(down, up, 0.05)


def _tune(model: Path, out: Path, edits: Edits) -> dict[str, torch.Tensor]:
    """Copy `model` to `out` with each module's known ΔW added at the given keys/rows; returns the ΔWs."""
    if model.is_dir():
        shutil.copytree(model, out)
    else:
        shutil.copy(model, out)
    deltas, files = {}, {}
    for i, (name, (shape, places)) in enumerate(edits.items()):
        delta = deltas[name] = _low_rank(shape, seed=i)
        row = 0
        for file, key, rows in places:
            path = out / file if file else out
            state = files.setdefault(path, load_file(str(path)))
            target = state[key] if rows is None else state[key][rows[0] : rows[1]]
            part = delta[row : row + target.shape[0]] if len(places) > 1 else delta
            row += target.shape[0]
            target += part.reshape(target.shape).to(target.dtype)
    for path, state in files.items():
        save_file(state, str(path))
    return deltas


def _extract(org: Path, tuned: Path, out: Path, *extra: str) -> int:
    argv = ["--model_org", str(org), "--model_tuned", str(tuned), "--save_to", str(out), "--dim", "4"]
    return main([*argv, "--clamp_quantile", "1", "--min_diff", "1e-3", *extra])


def _check(out: Path, deltas: dict[str, torch.Tensor], conv_rank: int = 0) -> dict[str, str]:
    state, meta = load_lora_file(out)
    factors = factors_from_state(state, str(out))
    assert set(factors) == set(deltas)  # untouched modules are skipped
    for name, delta in deltas.items():
        conv3x3 = delta.dim() == 4 and delta.shape[2:] != (1, 1)
        assert (
            factors[name].alpha == factors[name].rank == (conv_rank if conv3x3 else min(4, *delta.shape[:2]))
        )
        assert float((factors[name].delta() - delta).abs().max()) < 1e-4, name
    return meta


def test_sd1_single_file_with_locon(tiny_sd1_single_file, tmp_path: Path):
    model = tiny_sd1_single_file.checkpoint
    u, te = "model.diffusion_model.", "cond_stage_model.transformer.text_model.encoder.layers."
    edits: Edits = {
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj": (
            (64, 64),
            [("", f"{te}1.self_attn.q_proj.weight", None)],
        ),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k": (
            (32, 32),
            [("", f"{u}input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight", None)],
        ),
        "lora_unet_up_blocks_1_resnets_0_conv1": (
            (32, 96, 3, 3),
            [("", f"{u}output_blocks.2.0.in_layers.2.weight", None)],
        ),
        "lora_unet_down_blocks_0_attentions_0_proj_in": (
            (32, 32, 1, 1),
            [("", f"{u}input_blocks.1.1.proj_in.weight", None)],
        ),
    }
    tuned = tmp_path / "tuned.safetensors"
    deltas = _tune(model, tuned, edits)
    out = tmp_path / "x.safetensors"
    assert _extract(model, tuned, out, "--conv_dim", "3") == 0
    meta = _check(out, deltas, conv_rank=3)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "4"
    assert meta["ss_training_comment"].startswith("extracted with tools/extract_lora.py")
    assert meta["ss_network_args"] == '{"conv_dim": "3", "conv_alpha": "3.0"}'
    # without --conv_dim the 3x3 conv has no module
    assert _extract(model, tuned, tmp_path / "y.safetensors") == 0
    no_conv = {k: v for k, v in deltas.items() if not k.endswith("conv1")}
    _check(tmp_path / "y.safetensors", no_conv)


def test_sdxl_single_file_te2_slices(tiny_sdxl_single_file, tiny_sdxl_dir, tmp_path: Path, capsys):
    model = tiny_sdxl_single_file.checkpoint
    block = "conditioner.embedders.1.model.transformer.resblocks.0."
    h = load_file(str(model))[f"{block}attn.in_proj_weight"].shape[1]
    edits: Edits = {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (
            (h, h),
            [("", f"{block}attn.in_proj_weight", (0, h))],
        ),
        "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": (
            (h, h),
            [("", f"{block}attn.in_proj_weight", (2 * h, 3 * h))],
        ),
        "lora_te2_text_model_encoder_layers_0_mlp_fc2": (
            (h, 4 * h),
            [("", f"{block}mlp.c_proj.weight", None)],
        ),
    }
    tuned = tmp_path / "tuned.safetensors"
    deltas = _tune(model, tuned, edits)
    assert _extract(model, tuned, tmp_path / "x.safetensors") == 0
    assert _check(tmp_path / "x.safetensors", deltas)["ss_base_model_version"] == "sdxl_base_v1-0"
    # mixing layouts / families is refused before any work
    assert _extract(model, tiny_sdxl_dir, tmp_path / "z.safetensors") == 2
    assert "same family and layout" in capsys.readouterr().err
    assert _extract(model, tuned, tmp_path / "z.safetensors", "--min_diff", "10") == 2
    assert "nothing to extract" in capsys.readouterr().err
    assert not (tmp_path / "z.safetensors").exists()


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_flux_fused_modules(tiny_flux, tmp_path: Path, layout: str):
    if layout == "bfl":
        model, f = tiny_flux.transformer, ""
        qkv = [(f, "double_blocks.0.img_attn.qkv.weight", None)]
        linear1 = [(f, "single_blocks.1.linear1.weight", None)]
    else:
        model, f = tiny_flux.diffusers_dir, "transformer/diffusion_pytorch_model.safetensors"
        qkv = [(f, f"transformer_blocks.0.attn.to_{n}.weight", None) for n in "qkv"]
        linear1 = [(f, f"single_transformer_blocks.1.attn.to_{n}.weight", None) for n in "qkv"]
        linear1 += [(f, "single_transformer_blocks.1.proj_mlp.weight", None)]
    width = 64
    edits: Edits = {
        "lora_unet_double_blocks_0_img_attn_qkv": ((3 * width, width), qkv),
        "lora_unet_single_blocks_1_linear1": ((7 * width, width), linear1),
    }
    tuned = tmp_path / ("tuned" if layout == "diffusers" else "tuned.safetensors")
    deltas = _tune(model, tuned, edits)
    assert _extract(model, tuned, tmp_path / "x.safetensors") == 0
    meta = _check(tmp_path / "x.safetensors", deltas)
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
