"""Learning-rate schedules and optimizers: exact multipliers, diffusers parity, fallbacks and errors."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    NAME,
    db_args,
    error_lines,
    metadata,
    run_main,
    up_weights,
)

from library.training.optim import create_optimizer, create_scheduler, lr_lambda_for, resolve_warmup

# --- 1. learning-rate schedules --------------------------------------------------------------------------

# total 10 steps, warmup 2; multiplier of the base lr at 0-based optimizer step s (hand computed)
EXPECTED_MULTIPLIERS = {
    "constant": [1.0] * 11,
    "constant_with_warmup": [0.0, 0.5] + [1.0] * 9,
    "linear": [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0],
    "cosine": [
        0.0,
        0.5,
        1.0,
        0.5 * (1 + math.cos(math.pi / 8)),  # 0.9619397662556434
        0.5 * (1 + math.cos(math.pi / 4)),  # 0.8535533905932737
        0.5 * (1 + math.cos(3 * math.pi / 8)),  # 0.6913417161825449
        0.5,
        0.5 * (1 - math.cos(3 * math.pi / 8)),  # 0.3086582838174551
        0.5 * (1 - math.cos(math.pi / 4)),  # 0.1464466094067262
        0.5 * (1 - math.cos(math.pi / 8)),  # 0.0380602337443566
        0.0,
    ],
}


@pytest.mark.parametrize("name", list(EXPECTED_MULTIPLIERS))
def test_lr_lambda_multipliers(name: str):
    warmup = 0 if name == "constant" else 2
    fn = lr_lambda_for(name, warmup, 10)
    assert [fn(s) for s in range(11)] == pytest.approx(EXPECTED_MULTIPLIERS[name], abs=1e-12)


def _lr_sequence(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer, steps: int) -> list[float]:
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def _sgd(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize(
    ("name", "warmup", "total"),
    [
        ("constant", 0, 10),
        ("constant_with_warmup", 2, 10),
        ("linear", 2, 10),
        ("cosine", 2, 10),
        ("linear", 0, 7),
        ("cosine", 3, 13),
    ],
)
def test_create_scheduler_matches_diffusers(name: str, warmup: int, total: int):
    from diffusers.optimization import get_scheduler

    ours_opt = _sgd()
    ours = _lr_sequence(
        create_scheduler(name, ours_opt, warmup_steps=warmup, total_steps=total), ours_opt, total
    )
    ref_opt = _sgd()
    ref = _lr_sequence(
        get_scheduler(name, ref_opt, num_warmup_steps=warmup, num_training_steps=total), ref_opt, total
    )
    assert ours == pytest.approx(ref, abs=1e-7)
    if (warmup, total) == (2, 10):
        assert ours == pytest.approx([0.1 * m for m in EXPECTED_MULTIPLIERS[name]], abs=1e-12)


def test_constant_scheduler_ignores_warmup_with_warning(caplog: pytest.LogCaptureFixture):
    opt = _sgd()
    with caplog.at_level(logging.WARNING):
        lrs = _lr_sequence(create_scheduler("constant", opt, warmup_steps=3, total_steps=5), opt, 5)
    assert lrs == [0.1] * 6
    assert "--lr_warmup_steps is ignored by the constant scheduler; use constant_with_warmup" in caplog.text


@pytest.mark.parametrize(
    ("value", "total", "expected"),
    [(0.1, 50, 5), (0.25, 10, 2), (0.5, 3, 1), (0, 50, 0), (5, 50, 5), (5.0, 50, 5), (1, 50, 1)],
)
def test_resolve_warmup_ratio_semantics(value: float, total: int, expected: int):
    assert resolve_warmup(value, total) == expected


def test_warmup_ratio_recorded_in_metadata(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--max_train_steps",
        "4",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "0.5",
        "--cache_latents",
    )
    assert run_main(args) == 0
    md = metadata(out / f"{NAME}.safetensors")
    assert (md["ss_lr_scheduler"], md["ss_lr_warmup_steps"], md["ss_max_train_steps"]) == ("cosine", "2", "4")


# --- 2. optimizers ---------------------------------------------------------------------------------------


def test_adamw8bit_falls_back_to_adamw_on_cpu(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir, data2, out, "--max_train_steps", "2", "--optimizer_type", "AdamW8bit", "--cache_latents"
    )
    with caplog.at_level(logging.WARNING):
        assert run_main(args) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings.count("AdamW8bit needs a CUDA GPU; using torch.optim.AdamW on cpu instead") == 1
    # the metadata records the optimizer that actually ran
    assert metadata(out / f"{NAME}.safetensors")["ss_optimizer"] == "torch.optim.AdamW"


def test_create_optimizer_fallback_is_plain_adamw():
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 0.5}]
    opt = create_optimizer("AdamW8bit", params, 1e-3, {"weight_decay": 0.0}, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.0


def test_sgd_class_path_with_args(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--max_train_steps",
        "2",
        "--optimizer_type",
        "torch.optim.SGD",
        "--optimizer_args",
        "momentum=0.9",
        "nesterov=True",
        "--learning_rate",
        "0.5",
        "--cache_latents",
    )
    assert run_main(args) == 0
    final = out / f"{NAME}.safetensors"
    assert metadata(final)["ss_optimizer"] == "torch.optim.SGD(momentum=0.9,nesterov=True)"
    ups = up_weights(load_file(str(final)), "lora_")
    assert ups and all(bool(w.abs().sum() > 0) for w in ups.values())


def test_bad_optimizer_arg_is_one_line_before_weights_load(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
):
    from library.families.sd import StableDiffusionFamily

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", no_weights)
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, data2, out, "--max_train_steps", "1", "--optimizer_args", "foo=1")
    assert run_main(args) == 2
    (line,) = error_lines(capsys)
    # The accepted list comes from the installed torch's signature, so only its stable part is pinned.
    assert line.startswith(
        "error: --optimizer_args: torch.optim.AdamW does not accept foo; it accepts betas, eps, "
    )
    assert "weight_decay" in line
    assert not (out / f"{NAME}.safetensors").exists()


@pytest.mark.parametrize(
    ("optimizer_type", "expected"),
    [
        (
            "nosuchpkg.optim.Fancy",
            "error: --optimizer_type: cannot import nosuchpkg.optim (No module named 'nosuchpkg'); "
            "install it with: pip install nosuchpkg",
        ),
        ("torch.optim.NoSuchOptimizer", "error: --optimizer_type: torch.optim has no class NoSuchOptimizer"),
    ],
)
def test_unimportable_optimizer_names_the_fix(
    tiny_sd1_dir: Path,
    data2: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    optimizer_type: str,
    expected: str,
):
    args = db_args(tiny_sd1_dir, data2, tmp_path / "out", "--optimizer_type", optimizer_type)
    assert run_main(args) == 2
    assert error_lines(capsys) == [expected]
