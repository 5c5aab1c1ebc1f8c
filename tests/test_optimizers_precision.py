"""--full_fp16 / --full_bf16 and --scale_weight_norms: checks, the GradScaler patch, logging and limits."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import NAME, db_args, error_lines, metadata, run_main, tb_scalars, tb_tags

from library.training.optim import check_full_precision, patch_scaler_for_fp16_params


@pytest.mark.parametrize(
    ("fp16", "bf16", "mixed", "expected"),
    [
        (False, False, "no", []),
        (True, False, "fp16", []),
        (False, True, "bf16", []),
        (
            True,
            True,
            "fp16",
            ["--full_fp16 and --full_bf16 exclude each other: the LoRA parameters have one dtype; pick one"],
        ),
        (
            True,
            False,
            "bf16",
            [
                "--full_fp16 needs --mixed_precision fp16 (got bf16): the LoRA parameters are stored in fp16, so "
                "the forward pass must run in fp16 too"
            ],
        ),
        (
            False,
            True,
            "no",
            [
                "--full_bf16 needs --mixed_precision bf16 (got no): the LoRA parameters are stored in bf16, so "
                "the forward pass must run in bf16 too"
            ],
        ),
    ],
)
def test_full_precision_combinations(fp16: bool, bf16: bool, mixed: str, expected: list[str]):
    assert check_full_precision(fp16, bf16, mixed) == expected


def test_scaler_patch_allows_fp16_gradients():
    def step(patch: bool) -> torch.Tensor:
        p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float16))
        opt = torch.optim.SGD([p], lr=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        if patch:
            patch_scaler_for_fp16_params(scaler)
        scaler.scale((p * p).sum()).backward()
        scaler.step(opt)
        return p.detach()

    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        step(False)
    # grad 2p unscaled exactly: p - 0.5 * 2p = 0
    assert step(True).tolist() == [0.0, 0.0]


def test_full_bf16_trains_bf16_lora_on_cpu(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--max_train_steps",
        "2",
        "--mixed_precision",
        "bf16",
        "--full_bf16",
        "--cache_latents",
    )
    assert run_main(args) == 0
    state = load_file(str(out / f"{NAME}.safetensors"))
    ups = [v for k, v in state.items() if k.endswith("lora_up.weight")]
    assert {v.dtype for v in state.values()} == {torch.bfloat16}  # no --save_precision: the trained dtype
    assert any(bool(v.abs().sum() > 0) for v in ups)
    assert metadata(out / f"{NAME}.safetensors")["ss_full_fp16"] == "False"


def test_full_fp16_on_cpu_falls_back_with_a_warning(tiny_sd1_dir: Path, data2: Path, tmp_path: Path, caplog):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--max_train_steps",
        "1",
        "--mixed_precision",
        "fp16",
        "--full_fp16",
        "--cache_latents",
    )
    with caplog.at_level(logging.WARNING):
        assert run_main(args) == 0
    assert (
        "--full_fp16 needs a CUDA GPU (fp16 falls back to float32 on CPU); LoRA stays float32" in caplog.text
    )
    assert {v.dtype for v in load_file(str(out / f"{NAME}.safetensors")).values()} == {torch.float32}
    assert metadata(out / f"{NAME}.safetensors")["ss_full_fp16"] == "True"


def test_precision_flags_rejected_before_weights_load(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys, monkeypatch
):
    from library.families.sd import StableDiffusionFamily

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", no_weights)
    args = db_args(tiny_sd1_dir, data2, tmp_path / "out", "--full_fp16", "--scale_weight_norms", "-1")
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        "error: --scale_weight_norms must not be negative, got -1.0",
        "error: --full_fp16 needs --mixed_precision fp16 (got no): the LoRA parameters are stored in fp16, so "
        "the forward pass must run in fp16 too",
    ]


def test_scale_weight_norms_limits_every_module_and_logs(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    limit = 0.002
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--max_train_steps",
        "3",
        "--learning_rate",
        "0.05",
        "--scale_weight_norms",
        str(limit),
        "--cache_latents",
        "--logging_dir",
        str(logs),
    )
    assert run_main(args) == 0
    state = load_file(str(out / f"{NAME}.safetensors"))
    norms = []
    for key in [k for k in state if k.endswith(".lora_down.weight")]:
        base = key[: -len(".lora_down.weight")]
        down, up = state[key].flatten(1), state[f"{base}.lora_up.weight"].flatten(1)
        norms.append(float((up @ down).norm() * state[f"{base}.alpha"] / down.shape[0]))
    assert max(norms) <= limit * (1 + 1e-5)
    assert {"max_norm/keys_scaled", "max_norm/average_key_norm", "max_norm/max_key_norm"} <= set(
        tb_tags(logs)
    )
    scaled = [e.value for e in tb_scalars(logs, "max_norm/keys_scaled")]
    top = [e.value for e in tb_scalars(logs, "max_norm/max_key_norm")]
    assert len(scaled) == 3 and scaled[-1] > 0
    assert all(t <= limit * (1 + 1e-5) for t in top)
    assert top[-1] == pytest.approx(max(norms), rel=1e-4)
    assert metadata(out / f"{NAME}.safetensors")["ss_scale_weight_norms"] == str(limit)
