"""Validation loss: kohya's fixed timesteps by hand, cadence, a truly fixed value, and logging."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import db_args, make_images, run_main, tb_scalars, tb_tags

from library.config import parse_config
from library.families import get_family
from library.training.extras import build_extras
from library.training.progress import Logger
from library.training.setup import build_run
from library.training.validation import is_due, validation_timesteps


def test_fixed_timesteps_by_hand() -> None:
    assert validation_timesteps(0, 1000) == [0, 333, 666, 999]
    # last = 900: 100 + 800 * k / 3 = 100, 366.67, 633.33, 900
    assert validation_timesteps(100, 901) == [100, 367, 633, 900]
    assert validation_timesteps(5, 6) == [5, 5, 5, 5]


def test_cadence() -> None:
    assert [s for s in range(1, 7) if is_due(s, None, every_steps=2, every_epochs=None)] == [2, 4, 6]
    assert not is_due(2, None, every_steps=None, every_epochs=None)
    assert [e for e in range(1, 5) if is_due(9, e, every_steps=2, every_epochs=None)] == [1, 2, 3, 4]
    assert [e for e in range(1, 5) if is_due(9, e, every_steps=None, every_epochs=2)] == [2, 4]


class _Bar:
    start_t = last_print_t = 0.0

    def set_postfix(self, **_: object) -> None:
        pass


def test_loss_is_fixed_and_leaves_rng_alone(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    data = make_images(tmp_path / "data", n=4)
    args = db_args(
        tiny_sd1_dir, data, tmp_path / "out", "--validation_split", "0.5", "--max_train_steps", "1"
    )
    config = parse_config(args, prog="t", description="t")
    run = build_run(config, get_family("sd"))
    extras = build_extras(run, Logger(None, None, "x"), _Bar())
    validator = extras.validator
    assert validator is not None and validator.group.num_batches_per_epoch == 1
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    modules = [run.network, run.bundle.unet, *run.bundle.text_encoders]
    run.network.train()
    first = validator.loss(modules, run.optimizer)
    second = validator.loss(modules, run.optimizer)
    assert first == second and np.isfinite(first) and first > 0
    assert run.network.training  # mode restored
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_validation_logged_per_step_and_epoch(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    data = make_images(tmp_path / "data", n=4)
    logs = tmp_path / "logs"
    args = db_args(
        tiny_sd1_dir, data, tmp_path / "out", "--validation_split", "0.5", "--max_train_epochs", "2"
    )
    args += ["--validate_every_n_steps", "3", "--max_validation_steps", "1", "--logging_dir", str(logs)]
    assert run_main(args) == 0
    # 2 training images x 2 repeats / batch 2 = 2 steps per epoch; epochs end at steps 2 and 4.
    assert [e.step for e in tb_scalars(logs, "loss/validation/step_average")] == [3]
    assert [e.step for e in tb_scalars(logs, "loss/validation/epoch_average")] == [2, 4]
    assert [e.step for e in tb_scalars(logs, "loss/validation")] == [2, 3, 4]
    assert "loss/validation" in tb_tags(logs)


def test_epoch_end_on_a_validation_step_reuses_the_value(
    tiny_sd1_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_images(tmp_path / "data", n=4)
    logs = tmp_path / "logs"
    args = db_args(
        tiny_sd1_dir, data, tmp_path / "out", "--validation_split", "0.5", "--max_train_epochs", "2"
    )
    args += ["--validate_every_n_steps", "2", "--logging_dir", str(logs)]
    with caplog.at_level(logging.INFO, logger="loratrain"):
        assert run_main(args) == 0
    assert len([r for r in caplog.records if r.getMessage().startswith("validation loss at step")]) == 2
    steps = tb_scalars(logs, "loss/validation/step_average")
    epochs = tb_scalars(logs, "loss/validation/epoch_average")
    assert [e.step for e in steps] == [e.step for e in epochs] == [2, 4]
    assert [e.value for e in steps] == [e.value for e in epochs]
