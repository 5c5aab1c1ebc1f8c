"""FLUX runs with kohya's memory flags: fp8 base weights, block swap (a no-op on CPU), offloaded checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import db_args, error_lines, flux_files_args, make_images, metadata, run_flux, run_main


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", n=4)


def _args(files, data: Path, out: Path, *extra: str) -> list[str]:
    common = ["--max_train_steps", "2", "--t5xxl_max_token_length", "16", "--learning_rate", "1e-3"]
    return db_args(files.transformer, data, out, *common, *flux_files_args(files), *extra)


def _same(a: Path, b: Path, atol: float = 0.0) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    worst = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    assert worst <= atol, worst


def test_offloaded_checkpointing_trains_the_same_lora(tiny_flux, dataset: Path, tmp_path: Path):
    # Plain SGD: Adam's normalisation would blow a 1e-9 gradient difference on a near-zero gradient up to lr.
    sgd = ["--gradient_checkpointing", "--optimizer_type", "torch.optim.SGD", "--learning_rate", "0.1"]
    assert run_flux(_args(tiny_flux, dataset, tmp_path / "plain", *sgd)) == 0
    assert run_flux(_args(tiny_flux, dataset, tmp_path / "offload", *sgd, "--cpu_offload_checkpointing")) == 0
    # the same math; gradient sums may associate differently
    _same(tmp_path / "plain" / "feat.safetensors", tmp_path / "offload" / "feat.safetensors", atol=1e-6)


def test_block_swap_on_cpu_is_a_noop_with_a_message(tiny_flux, dataset: Path, tmp_path: Path, caplog):
    assert run_flux(_args(tiny_flux, dataset, tmp_path / "plain")) == 0
    with caplog.at_level("INFO"):
        assert run_flux(_args(tiny_flux, dataset, tmp_path / "swap", "--blocks_to_swap", "2")) == 0
    assert "block swapping needs a CUDA device" in caplog.text
    _same(tmp_path / "plain" / "feat.safetensors", tmp_path / "swap" / "feat.safetensors")


def test_fp8_base_stores_float8_and_trains(tiny_flux, dataset: Path, tmp_path: Path):
    from library.config import parse_config
    from library.families import get_family
    from library.training.loop import train_loop
    from library.training.setup import build_run

    args = _args(tiny_flux, dataset, tmp_path / "out", "--fp8_base", "--mixed_precision", "bf16")
    run = build_run(parse_config(args, prog="t", description="t"), get_family("flux"))
    transformer, (clip, t5) = run.bundle.unet, run.bundle.text_encoders
    assert transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert (
        clip.text_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float8_e4m3fn
        if hasattr(clip, "text_model")
        else clip.encoder.layers[0].mlp.fc1.weight.dtype == torch.float8_e4m3fn
    )
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype != torch.float8_e4m3fn  # T5's wo kept
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    train_loop(run)
    state = load_file(str(tmp_path / "out" / "feat.safetensors"))
    ups = [v for k, v in state.items() if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert all(torch.isfinite(v).all() for v in ups) and any(v.abs().sum() > 0 for v in ups)
    md = metadata(tmp_path / "out" / "feat.safetensors")
    assert (md["ss_fp8_base"], md["ss_fp8_base_unet"]) == ("True", "False")


def test_memory_flags_are_checked_up_front(
    tiny_flux, tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys
):
    out = tmp_path / "out"
    assert run_flux(_args(tiny_flux, dataset, out, "--fp8_base", "--cpu_offload_checkpointing")) == 2
    assert error_lines(capsys) == [
        "error: --fp8_base needs --mixed_precision bf16 or fp16 (fp8 weights are computed in the mixed precision dtype)",
        "error: --cpu_offload_checkpointing needs --gradient_checkpointing (it changes where checkpoints live)",
    ]
    assert run_main(db_args(tiny_sd1_dir, dataset, out, "--blocks_to_swap", "15")) == 2
    assert error_lines(capsys) == [
        "error: --blocks_to_swap 15: this UNet has 14 swappable blocks (resnets, attentions, "
        "down/upsamplers): use 14 or fewer"
    ]
    assert run_flux(_args(tiny_flux, dataset, out, "--blocks_to_swap", "3")) == 2
    assert error_lines(capsys)[0].startswith(
        "error: --blocks_to_swap 3: this model has 2 double and 2 single blocks"
    )
    assert (
        run_flux(
            _args(tiny_flux, dataset, out, "--cache_text_encoder_outputs", "--text_encoder_batch_size", "0")
        )
        == 2
    )
    assert error_lines(capsys) == ["error: --text_encoder_batch_size must be positive, got 0"]
    assert not out.exists()
