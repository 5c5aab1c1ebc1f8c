"""A NaN/inf loss: the run stops before the optimizer sees it, after saving the last good state, naming the
step and the batch's images; --skip_nan_steps N skips up to N such steps."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from test_faults_signals import equal_files
from train_helpers import db_args, error_lines, make_images, run_main

import library.training.loop as loop

COMMON = ["--cache_latents", "--lr_scheduler", "constant", "--max_train_steps", "6"]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", n=4)


def nan_at(monkeypatch: pytest.MonkeyPatch, *calls: int) -> list[list[str]]:
    """The loss of these micro-steps (1-based) becomes NaN; returns every micro-step's image paths."""
    original = loop.diffusion_loss
    seen: list[list[str]] = []

    def diffusion_loss(family, bundle, batch, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(list(batch["image_paths"]))
        loss = original(family, bundle, batch, *args, **kwargs)
        return loss * float("nan") if len(seen) in calls else loss

    monkeypatch.setattr(loop, "diffusion_loss", diffusion_loss)
    return seen


def test_nan_loss_stops_after_saving_the_last_good_state(
    tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys, monkeypatch
):
    straight = tmp_path / "straight"
    assert run_main(db_args(tiny_sd1_dir, dataset, straight, *COMMON[:-1], "2", name="e2e")) == 0

    seen = nan_at(monkeypatch, 3)
    out = tmp_path / "out"
    assert run_main(db_args(tiny_sd1_dir, dataset, out, *COMMON, name="e2e")) == 2
    state = out / "e2e-step00000002-state"
    paths = seen[2]
    assert len(paths) == 2 and all(Path(p).parent == dataset / "2_sks shape" for p in paths)
    assert error_lines(capsys) == [
        f"error: step 3: the loss is NaN/inf (images: {', '.join(paths)}); the last good state is saved in "
        f"{state}; lower the learning rate, train in bf16 instead of fp16, or pass --skip_nan_steps N to skip a few"
    ]
    assert len(seen) == 3  # nothing ran after the bad step
    assert json.loads((state / "train_state.json").read_text())["global_step"] == 2
    # The optimizer never stepped with the NaN: the saved LoRA is the 2-step run's, bit for bit.
    equal_files(straight / "e2e.safetensors", out / "e2e-step00000002.safetensors")
    assert torch.load(state / "scheduler.pt", weights_only=True)["last_epoch"] == 2


def test_skip_nan_steps_skips_the_step_without_an_update(
    tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, caplog, monkeypatch
):
    seen = nan_at(monkeypatch, 3)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="loratrain"):
        argv = db_args(
            tiny_sd1_dir, dataset, out, *COMMON, "--skip_nan_steps", "1", "--save_state", name="e2e"
        )
        assert run_main(argv) == 0
    (warning,) = [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()]
    assert (
        warning
        == f"step 3: the loss is NaN/inf; skipped it (1 of --skip_nan_steps 1); images: {', '.join(seen[2])}"
    )
    state = json.loads((out / "e2e-state" / "train_state.json").read_text())
    # Six optimizer and scheduler steps from seven batches: the skipped one consumed its batch only.
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (6, 1, 3)
    assert len(seen) == 7
    assert torch.load(out / "e2e-state" / "scheduler.pt", weights_only=True)["last_epoch"] == 6
    assert all(
        torch.isfinite(t).all() for t in torch.load(out / "e2e-state" / "optimizer.pt")["state"][0].values()
    )


def test_one_nan_more_than_skip_nan_steps_stops(
    tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys, monkeypatch
):
    seen = nan_at(monkeypatch, 2, 4)
    out = tmp_path / "out"
    argv = db_args(tiny_sd1_dir, dataset, out, *COMMON, "--skip_nan_steps", "1", name="e2e")
    assert run_main(argv) == 2
    (error,) = error_lines(capsys)
    assert error.startswith(
        f"error: step 3: the loss is NaN/inf after 1 skipped (images: {', '.join(seen[3])}); the last good "
        f"state is saved in {out / 'e2e-step00000002-state'}; "
    )
    assert re.search(r"--skip_nan_steps N to skip a few$", error)


def test_nan_with_fused_backward_saves_nothing(
    tiny_sd1_dir: Path, dataset: Path, tmp_path: Path, capsys, monkeypatch
):
    """--fused_backward_pass steps inside backward: the NaN is in the weights before the loss is read, so
    nothing is saved as "good" and --skip_nan_steps cannot skip it."""
    seen = nan_at(monkeypatch, 2)
    out = tmp_path / "out"
    argv = db_args(tiny_sd1_dir, dataset, out, *COMMON, "--fused_backward_pass", "--skip_nan_steps", "3")
    assert run_main(argv) == 2
    assert error_lines(capsys) == [
        f"error: step 2: the loss is NaN/inf (images: {', '.join(seen[1])}); with --fused_backward_pass or "
        "--fused_optimizer_groups the optimizer steps inside backward, so the weights took it and nothing was "
        "saved: resume from the last *-state folder with a lower learning rate, or in bf16 instead of fp16"
    ]
    assert not out.exists() or not list(out.glob("*step*"))
