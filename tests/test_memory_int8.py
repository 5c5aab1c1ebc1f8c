"""int8 base weights (library/memory/int8.py, --quantize_base int8): the quantizers' exactness, the layer's
numbers against the float layer, tiny SD1 UNet / FLUX transformer forwards, and a real training run.

Tolerances: symmetric absmax int8 rounds each weight and each activation by at most half a step, a uniform
error of RMS step/sqrt(12). For Gaussian weights and activations (absmax ~3 sigma over a few hundred
elements) that is ~0.7% of the RMS per operand, ~1% on the output (measured 0.98% at K=256, 1.2% at
K=3072 on CPU); the input gradient sees only the weight's rounding (measured 0.7%). So 2% relative RMS
bounds the layer with room for seeds and shapes without hiding a wrong scale (one channel off by a step or
a transposed scale is far above it).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from train_helpers import db_args, error_lines, flux_files_args, make_images, metadata, run_flux, run_main

from library.memory import int8
from library.memory.int8 import (
    SCALE_BUFFER,
    dequantize_weight,
    quantize_int8,
    quantize_rows,
    quantize_weight,
)
from networks.lora import LoRAModule

TOLERANCE = 0.02  # relative RMS, see the module doc


def _rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).square().mean().sqrt() / want.square().mean().sqrt()).item()


def _gaussian_linear(k: int, n: int, seed: int = 0) -> tuple[nn.Linear, nn.Linear]:
    """(to be quantized, float reference) with the same N(0, 1) weights and bias."""
    torch.manual_seed(seed)
    layer = nn.Linear(k, n)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    layer.requires_grad_(False)
    return layer, copy.deepcopy(layer)


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_weight_quantizer_keeps_every_weight_within_half_a_step():
    w = _randn(24, 40) * torch.logspace(-4, 1, 24)[:, None]  # channels of very different magnitudes
    w[5] = 0.0  # an all-zero channel must not divide by zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (24,)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    absmax_step = w.abs().amax(dim=1) / 127
    # absmax / 127 rounded up to a bfloat16 number: at most one bf16 step (2**-7 relative) more
    assert bool((scale >= absmax_step).all()) and bool((scale <= absmax_step * (1 + 2**-7)).all())
    assert torch.equal(scale.to(torch.bfloat16).float(), scale)
    assert set(q.abs().amax(dim=1)[scale > 0].tolist()) <= {126, 127}
    assert torch.equal(q[5], torch.zeros(40, dtype=torch.int8)) and scale[5] == 0
    error = (dequantize_weight(q, scale, torch.float32) - w).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-6)).all())
    # bf16 dequantization multiplies in bf16 and still equals the float32 product rounded once
    exact = q.double() * scale.double()[:, None]
    assert torch.equal(dequantize_weight(q, scale, torch.bfloat16), exact.to(torch.bfloat16))
    assert torch.equal(dequantize_weight(q, scale, torch.float16), exact.float().to(torch.float16))


def test_row_quantizer_scales_each_token():
    x = _randn(6, 32) * torch.tensor([1e-3, 1.0, 50.0, 0.0, 2.0, 7.0])[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (6, 1)
    assert torch.equal(q[3], torch.zeros(32, dtype=torch.int8))
    assert bool(((q.float() * scale - x).abs() <= scale / 2 * (1 + 1e-6)).all())


def test_int8_linear_computes_int8_products_and_stays_close_to_float():
    layer, ref = _gaussian_linear(256, 96)
    handle = quantize_int8(layer)
    assert handle.modules == [layer] and layer.weight.dtype == torch.int8
    assert handle.bytes_before == 256 * 96 * 4 and handle.bytes_after == 256 * 96 + 96 * 4
    x = _randn(3, 50, 256)
    got = layer(x)
    # What the int path computes: int8 x int8 summed exactly, rescaled by both scales in float32.
    xq, xs = quantize_rows(x.reshape(-1, 256))
    exact = (xq.long() @ layer.weight.long().t()).float() * xs * getattr(layer, SCALE_BUFFER) + layer.bias
    assert got.dtype == torch.float32 and torch.equal(got, exact.reshape(3, 50, 96))
    assert _rel_rms(got, ref(x)) < TOLERANCE  # measured 0.98%


def test_fallback_multiplies_by_the_dequantized_weight(monkeypatch):
    layer, ref = _gaussian_linear(256, 96)
    quantize_int8(layer)
    monkeypatch.setattr(int8, "int_mm_fits", lambda *_: False)  # e.g. CUDA with 16 rows or fewer
    x = _randn(4, 256)
    w = dequantize_weight(layer.weight, getattr(layer, SCALE_BUFFER), torch.float32)
    assert torch.equal(layer(x), F.linear(x, w, layer.bias))
    assert _rel_rms(layer(x), ref(x)) < 0.01  # weight rounding only (measured 0.75%)


def test_autocast_output_is_in_the_autocast_dtype():
    layer, ref = _gaussian_linear(256, 96)
    quantize_int8(layer)
    x = _randn(40, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    assert _rel_rms(got, ref(x)) < TOLERANCE  # measured 1.0%: bf16 output rounding adds ~0.2%


def test_input_gradient_and_what_backward_keeps():
    layer, ref = _gaussian_linear(256, 96)
    quantize_int8(layer)
    x = _randn(2, 30, 256).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved: list[tuple[torch.dtype, tuple[int, ...]]] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t
    ):
        y = layer(x)
    assert saved == [(torch.int8, (96, 256)), (torch.float32, (96,))]  # no dequantized copy, no input
    grad_out = _randn(2, 30, 96, seed=2)
    y.backward(grad_out)
    ref(x_ref).backward(grad_out)
    w = dequantize_weight(layer.weight, getattr(layer, SCALE_BUFFER), torch.float32)
    assert torch.equal(x.grad, grad_out @ w)
    assert _rel_rms(x.grad, x_ref.grad) < TOLERANCE  # measured 0.7%
    assert layer.weight.grad is None and layer.bias.grad is None


def test_lora_trains_on_an_int8_linear():
    layer, _ = _gaussian_linear(64, 32)
    quantize_int8(layer)
    torch.manual_seed(3)
    lora = LoRAModule("l", layer, lora_dim=4, alpha=4.0)
    nn.init.normal_(lora.lora_up.weight, std=0.1)  # non-zero so both LoRA matrices get gradients
    lora.apply_to()
    x = _randn(8, 64)
    target = _randn(8, 32, seed=5)
    loss = F.mse_loss(layer(x), target)
    loss.backward()
    assert all(
        p.grad is not None and bool(p.grad.abs().sum() > 0) for p in lora.parameters() if p.requires_grad
    )
    torch.optim.SGD(lora.parameters(), lr=0.01).step()
    assert F.mse_loss(layer(x), target) < loss
    assert layer.weight.dtype == torch.int8


def test_which_layers_are_quantized_and_remove():
    model = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 12), nn.Linear(32, 64), nn.Linear(64, 64))
    model.requires_grad_(False)
    original = model[3].weight.clone()
    handle = quantize_int8(model, include=lambda name, _: name != "2")
    assert handle.modules == [model[3]]
    assert handle.skipped == [("0", "fewer than 16 in-features"), ("1", "features not a multiple of 8")]
    assert [model[i].weight.dtype for i in range(4)] == [torch.float32] * 3 + [torch.int8]
    scale = getattr(model[3], SCALE_BUFFER)
    handle.remove()
    assert model[3].weight.dtype == torch.float32 and "forward" not in model[3].__dict__
    assert not hasattr(model[3], SCALE_BUFFER)
    assert bool(((model[3].weight - original).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all())


def test_trainable_or_quantized_weights_are_refused():
    with pytest.raises(ValueError, match="frozen"):
        quantize_int8(nn.Linear(16, 16))
    fp8 = nn.Linear(16, 16).requires_grad_(False)
    fp8.weight.data = fp8.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="quantized already"):
        quantize_int8(fp8)
    layer = nn.Linear(16, 16).requires_grad_(False)
    quantize_int8(layer)
    with pytest.raises(RuntimeError, match="input has 32 features, the layer takes 16"):
        layer(torch.zeros(2, 32))


def test_tiny_sd1_unet_and_flux_transformer_forward():
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from library.families.tiny import TEXT_HIDDEN, unet_config
    from library.families.tiny_flux import transformer_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config("sd1")).eval().requires_grad_(False)
    unet_ref = copy.deepcopy(unet)
    handle = quantize_int8(unet)
    assert len(handle.modules) == 50 and handle.skipped == []  # every Linear of the tiny UNet
    args = (_randn(2, 4, 8, 8), torch.tensor([10, 500]), _randn(2, 77, TEXT_HIDDEN["sd1"], seed=2))
    assert _rel_rms(unet(*args).sample, unet_ref(*args).sample) < TOLERANCE  # measured 0.32%

    flux = FluxTransformer2DModel(**transformer_config()).eval().requires_grad_(False)
    flux_ref = copy.deepcopy(flux)
    assert len(quantize_int8(flux).modules) == 50
    inputs = {
        "hidden_states": _randn(2, 16, 64),
        "encoder_hidden_states": _randn(2, 8, flux.config.joint_attention_dim, seed=2),
        "pooled_projections": _randn(2, flux.config.pooled_projection_dim, seed=3),
        "timestep": torch.tensor([0.3, 0.7]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5, 3.5]),
    }
    assert _rel_rms(flux(**inputs).sample, flux_ref(**inputs).sample) < TOLERANCE  # measured 0.98%


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", n=4)


def test_train_network_with_int8_base(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path):
    from library.config import parse_config
    from library.families import get_family
    from library.training.loop import train_loop
    from library.training.setup import build_run

    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, dataset, out, "--max_train_steps", "2", "--quantize_base", "int8")
    run = build_run(parse_config(args, prog="t", description="t"), get_family("sd"))
    linears = [m for m in run.bundle.unet.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 50 and all(m.weight.dtype == torch.int8 for m in linears)
    assert all(
        te_linear.weight.dtype == torch.float32
        for te_linear in run.bundle.text_encoders[0].modules()
        if isinstance(te_linear, nn.Linear)
    )  # the text encoder stays as loaded
    train_loop(run)
    assert all(m.weight.dtype == torch.int8 for m in linears)
    state = load_file(str(out / "feat.safetensors"))
    ups = [v for k, v in state.items() if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert len(ups) > 0 and all(bool(torch.isfinite(v).all()) for v in ups)
    assert any(bool(v.abs().sum() > 0) for v in ups)  # it trained
    assert metadata(out / "feat.safetensors")["ss_quantize_base"] == "int8"


def test_int8_with_fp8_is_refused_before_loading(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    extra = ("--quantize_base", "int8", "--fp8_base", "--fp8_base_unet", "--mixed_precision", "bf16")
    assert run_main(db_args(tiny_sd1_dir, dataset, out, *extra)) == 2
    assert error_lines(capsys) == [
        "error: --quantize_base int8 and --fp8_base: both choose how the base weights are stored; remove one "
        "of them",
        "error: --quantize_base int8 and --fp8_base_unet: both choose how the base weights are stored; "
        "remove one of them",
    ]
    assert not out.exists()


def test_flux_trains_with_int8_base(tiny_flux, dataset: Path, tmp_path: Path):
    # The transformer's first parameter is an int8 weight now: its inputs must still come in bf16.
    out = tmp_path / "out"
    extra = ["--max_train_steps", "2", "--t5xxl_max_token_length", "16", "--mixed_precision", "bf16"]
    args = [*extra, "--gradient_checkpointing", "--quantize_base", "int8", *flux_files_args(tiny_flux)]
    assert run_flux(db_args(tiny_flux.transformer, dataset, out, *args)) == 0
    ups = [v for k, v in load_file(str(out / "feat.safetensors")).items() if k.endswith("lora_up.weight")]
    assert len(ups) > 0 and all(bool(torch.isfinite(v).all()) for v in ups)
    assert any(bool(v.abs().sum() > 0) for v in ups)  # it trained
