"""--estimate_memory: the meta-device activation count against real forwards, the optimizer table, and the
flag through each real entry point (exit 0, the table, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

import networks.lora as lora
from library.memory import estimate as E
from tests.train_helpers import db_args, flux_files_args, make_images, run_flux, run_main, run_sdxl

TINY_UNET = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    layers_per_block=1,
    attention_head_dim=4,
    norm_num_groups=8,
)


def _profile(device: str, checkpointing: bool, bf16: bool) -> E.ActivationProfile:
    """A tiny SD UNet with a LoRA: forward + MSE loss on `device`, counted."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**TINY_UNET)
    unet.requires_grad_(False)
    net = lora.create_network(1.0, 4, 1.0, None, None, unet)
    net.apply_to(None, unet, False, True)
    net.to(device)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    latents = torch.randn(2, 4, 16, 16, device=device)
    context = torch.randn(2, 7, 32, device=device)
    timesteps = torch.tensor([5, 600], device=device)
    dtype = torch.bfloat16 if bf16 else None
    autocast = (
        E.EmulatedAutocast("cpu", dtype) if device == "meta" else torch.autocast("cpu", dtype, enabled=bf16)
    )

    def forward_and_loss() -> torch.Tensor:
        with autocast:
            pred = unet(latents, timesteps, encoder_hidden_states=context).sample
        return torch.nn.functional.mse_loss(pred.float(), latents)

    return E.profile_activations(unet, forward_and_loss, skip=list(net.parameters()))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_meta_count_equals_a_real_cpu_forward_in_float32(checkpointing: bool):
    real, meta = _profile("cpu", checkpointing, False), _profile("meta", checkpointing, False)
    assert meta.saved_bytes() == real.saved_bytes() == 10_295_552
    assert meta.checkpointed_bytes() == real.checkpointed_bytes()
    assert (
        len(meta.units) == len(real.units) == (11 if checkpointing else 0)
    )  # 5 resnets + 2 blocks, down + up + mid
    assert meta.largest_unit_tensor == real.largest_unit_tensor


def test_meta_count_under_emulated_autocast_matches_cpu_autocast():
    real, meta = _profile("cpu", True, True), _profile("meta", True, True)
    # bf16 activations: about 70% of float32's; the emulation is within 0.05% (cast caching of LoRA weights)
    assert real.saved_bytes() == 7_268_480
    assert abs(meta.saved_bytes() - real.saved_bytes()) <= 0.0005 * real.saved_bytes()
    assert abs(meta.checkpointed_bytes() - real.checkpointed_bytes()) <= 0.005 * real.checkpointed_bytes()
    # checkpointing keeps well under half of what a plain forward saves
    assert meta.checkpointed_bytes() < 0.4 * meta.saved_bytes()


def test_optimizer_state_and_gradients_by_type():
    params = [torch.zeros(10, 4), torch.zeros(4, dtype=torch.bfloat16)]
    assert E.optimizer_state_bytes("AdamW", params) == (2 * (160 + 8), "")
    assert E.optimizer_state_bytes("AdamW8bit", params) == (2 * 44, "")
    assert E.optimizer_state_bytes("Lion", params) == (168, "")
    assert E.optimizer_state_bytes("Adafactor", params) == ((10 + 4) * 4 + 4 * 4, "")
    assert E.optimizer_state_bytes("Prodigy", params) == (4 * 168, "")
    size, note = E.optimizer_state_bytes("my.Optimizer", params)
    assert size == 2 * 168 and note == "optimizer my.Optimizer: state unknown, counted as AdamW"
    assert E.gradient_bytes(params) == 168
    assert E.gradient_bytes(params, fused_groups=0) == 160  # one tensor in flight


def test_estimate_table_lists_components_and_total():
    result = E.MemoryEstimate([("a", E.GIB), ("b", E.GIB // 2)], ["n"])
    assert result.table().splitlines() == [
        "component                         GiB",
        "a                               1.000",
        "b                               0.500",
        "expected peak device memory     1.500",
        "note: n",
    ]


EXPECTED_ROWS = ("LoRA parameters", "LoRA gradients", "optimizer state (AdamW)", "backward transient")


def _table(out: str) -> dict[str, float]:
    """The printed table as {component: GiB}, the total under "expected peak device memory"."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("component") and line.endswith("GiB"))
    end = next(i for i, line in enumerate(lines) if line.startswith("expected peak device memory"))
    return {line[:-8].strip(): float(line.split()[-1]) for line in lines[start + 1 : end + 1]}


def _check_output(out: str, output_dir: Path, weight_rows: list[str]) -> dict[str, float]:
    table = _table(out)
    activations = [name for name in table if name.startswith("activations (")]
    assert list(table) == [
        *weight_rows,
        *EXPECTED_ROWS[:3],
        *activations,
        EXPECTED_ROWS[3],
        "expected peak device memory",
    ]
    assert len(activations) == 1
    assert "estimate_memory: nothing was trained and nothing was written" in out
    assert not output_dir.exists() or not any(output_dir.iterdir())
    return table


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[E.MemoryEstimate]:
    """The MemoryEstimate objects the entry point prints (exact bytes; the table rounds to MiB-ish GiB)."""
    from library.training import estimate_run

    results: list[E.MemoryEstimate] = []
    real = estimate_run.memory_estimate

    def keep(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(estimate_run, "memory_estimate", keep)
    return results


def test_estimate_memory_sd(tiny_sd1_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, captured):
    data = make_images(tmp_path / "data", 2)
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, data, out, "--estimate_memory", "--gradient_checkpointing")
    assert run_main([*args, "--mixed_precision", "bf16", "--max_train_steps", "1"]) == 0
    text = capsys.readouterr().out
    _check_output(text, out, ["denoiser weights", "text encoder 1 weights", "VAE weights"])
    assert "activations (gradient checkpointing)" in text
    assert "note: largest step: batch 2 at 64x64, bf16 compute" in text
    sizes = dict(captured[0].components)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_dir / "unet")
    assert sizes["denoiser weights"] == 2 * sum(p.numel() for p in unet.parameters())  # bf16
    assert sizes["LoRA gradients"] == sizes["LoRA parameters"] > 0  # float32 LoRA, not fused
    assert sizes["optimizer state (AdamW)"] == 2 * sizes["LoRA parameters"]
    assert sizes["activations (gradient checkpointing)"] > 0


def test_estimate_memory_sdxl_cached(
    tiny_sdxl_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, captured
):
    data = make_images(tmp_path / "data", 2)
    out = tmp_path / "out"
    args = db_args(tiny_sdxl_dir, data, out, "--estimate_memory", "--max_train_steps", "1")
    args += ["--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only"]
    args += ["--optimizer_type", "AdamW", "--fused_backward_pass"]
    assert run_sdxl(args) == 0
    text = capsys.readouterr().out
    _check_output(text, out, ["denoiser weights"])  # VAE and text encoders leave the device when cached
    sizes = dict(captured[0].components)
    assert 0 < sizes["LoRA gradients"] < sizes["LoRA parameters"]  # fused: one tensor in flight


def test_estimate_memory_flux(tiny_flux, tmp_path: Path, capsys: pytest.CaptureFixture, captured):
    data = make_images(tmp_path / "data", 2)
    out = tmp_path / "out"
    args = db_args(tiny_flux.transformer, data, out, "--estimate_memory", "--max_train_steps", "1")
    args += flux_files_args(tiny_flux) + [
        "--network_module",
        "networks.lora_flux",
        "--t5xxl_max_token_length",
        "16",
    ]
    args += ["--gradient_checkpointing", "--network_train_unet_only"]
    assert run_flux(args) == 0
    _check_output(
        capsys.readouterr().out,
        out,
        ["denoiser weights", "text encoder 1 weights", "text encoder 2 weights", "VAE weights"],
    )
    plain = dict(captured[0].components)
    # without checkpointing the same step saves more
    assert run_flux([a for a in args if a != "--gradient_checkpointing"]) == 0
    full = dict(captured[1].components)
    assert full["activations (saved for backward)"] > plain["activations (gradient checkpointing)"]


def test_estimate_memory_flux_block_swap(tiny_flux, tmp_path: Path, capsys: pytest.CaptureFixture, captured):
    """--blocks_to_swap 2 swaps 1 double + 2 single blocks; two of them (the largest) count as resident."""
    from diffusers import FluxTransformer2DModel

    from library.families.tiny_flux import transformer_config

    data = make_images(tmp_path / "data", 2)
    args = db_args(
        tiny_flux.transformer, data, tmp_path / "out", "--estimate_memory", "--max_train_steps", "1"
    )
    args += flux_files_args(tiny_flux) + ["--t5xxl_max_token_length", "16", "--network_train_unet_only"]
    assert run_flux(args) == 0
    assert run_flux([*args, "--blocks_to_swap", "2"]) == 0
    assert "denoiser weights (blocks swapped out)" in capsys.readouterr().out
    with torch.device("meta"):
        model = FluxTransformer2DModel(**transformer_config())
    single = sum(p.numel() * 4 for p in model.single_transformer_blocks[0].parameters())  # float32 run
    whole = dict(captured[0].components)["denoiser weights"]
    assert dict(captured[1].components)["denoiser weights (blocks swapped out)"] == whole - single
