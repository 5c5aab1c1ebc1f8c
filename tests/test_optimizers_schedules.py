"""Every --lr_scheduler against hand-computed multipliers and against diffusers/transformers; step ratios."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_helpers import NAME, db_args, error_lines, metadata, run_main, tb_scalars

from library.errors import UserError
from library.training.optim import (
    ScheduleOptions,
    check_schedule,
    create_scheduler,
    parse_steps,
    resolve_warmup,
)

C = math.cos
PI = math.pi


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _ours(name: str, steps: int = 10, warmup: int = 2, **options) -> list[float]:
    opt = _opt()
    o = ScheduleOptions(warmup_steps=warmup, total_steps=steps, **options)
    return _lrs(create_scheduler(name, opt, warmup_steps=warmup, total_steps=steps, options=o), opt, steps)


# total 10 steps, warmup 2 (unless noted), base lr 0.1: multipliers at 0-based steps 0..10, hand computed
HAND = {
    # num_cycles 2: two cosine descents over the 8 steps after warmup
    ("cosine_with_restarts", (("num_cycles", 2),)): [
        0.0,
        0.5,
        1.0,
        0.5 * (1 + C(PI / 4)),
        0.5,
        0.5 * (1 + C(3 * PI / 4)),
        1.0,
        0.5 * (1 + C(PI / 4)),
        0.5,
        0.5 * (1 + C(3 * PI / 4)),
        0.0,
    ],
    # power 2, lr_end 1e-7: ((0.1 - 1e-7) * (1 - (s-2)/8)^2 + 1e-7) / 0.1
    ("polynomial", (("power", 2.0),)): [0.0, 0.5]
    + [((0.1 - 1e-7) * (1 - (s - 2) / 8) ** 2 + 1e-7) / 0.1 for s in range(2, 11)],
    # timescale defaults to the warmup (2): 1 / sqrt(s / 2)
    ("inverse_sqrt", ()): [0.0, 0.5] + [1 / math.sqrt(s / 2) for s in range(2, 11)],
    # timescale 4: 1 / sqrt((s + 2) / 4)
    ("inverse_sqrt", (("timescale", 4),)): [0.0, 0.5] + [1 / math.sqrt((s + 2) / 4) for s in range(2, 11)],
    # one cosine descent to 0.1: 0.9 * 0.5 * (1 + cos(pi (s-2)/8)) + 0.1
    ("cosine_with_min_lr", (("min_lr_ratio", 0.1),)): [0.0, 0.5]
    + [0.9 * 0.5 * (1 + C(PI * (s - 2) / 8)) + 0.1 for s in range(2, 11)],
    # warmup from 0.1, stable at 1 for steps 2..5, cosine decay over 4 steps to 0.1
    ("warmup_stable_decay", (("min_lr_ratio", 0.1), ("decay_steps", 4))): [
        0.1,
        0.55,
        1.0,
        1.0,
        1.0,
        1.0,
        1.0,
        0.9 * 0.5 * (1 + C(PI / 4)) + 0.1,
        0.55,
        0.9 * 0.5 * (1 + C(3 * PI / 4)) + 0.1,
        0.1,
    ],
    # step_rules: 1 before step 3, 0.5 before step 6, then 0.1 (warmup does not apply)
    ("piecewise_constant", (("args", (("step_rules", "1:3,0.5:6,0.1"),)),)): [1.0] * 3
    + [0.5] * 3
    + [0.1] * 5,
}


def _options(items: tuple) -> dict:
    return {k: dict(v) if k == "args" else v for k, v in items}


@pytest.mark.parametrize(("name", "items"), list(HAND), ids=[f"{n}-{i}" for n, i in HAND])
def test_schedule_against_hand_computed_values(name: str, items: tuple):
    assert _ours(name, **_options(items)) == pytest.approx([0.1 * m for m in HAND[name, items]], abs=1e-12)


def test_restarts_polynomial_piecewise_match_diffusers():
    from diffusers.optimization import get_scheduler

    cases = [
        ("cosine_with_restarts", {"num_cycles": 3}, {"num_cycles": 3}),
        ("polynomial", {"power": 0.5}, {"power": 0.5}),
        ("piecewise_constant", {"args": {"step_rules": "1:4,0.3:9,0.01"}}, {"step_rules": "1:4,0.3:9,0.01"}),
    ]
    for name, ours_options, ref_kwargs in cases:
        ref_opt = _opt()
        warm = {} if name == "piecewise_constant" else {"num_warmup_steps": 3, "num_training_steps": 13}
        ref = _lrs(get_scheduler(name, ref_opt, **warm, **ref_kwargs), ref_opt, 13)
        assert _ours(name, 13, 3, **ours_options) == pytest.approx(ref, abs=1e-12), name


def test_inverse_sqrt_min_lr_wsd_match_transformers():
    from transformers import optimization as t

    ref_opt = _opt()
    ref = _lrs(t.get_inverse_sqrt_schedule(ref_opt, num_warmup_steps=3, timescale=5), ref_opt, 13)
    assert _ours("inverse_sqrt", 13, 3, timescale=5) == pytest.approx(ref, abs=1e-12)
    ref_opt = _opt()
    # kohya passes num_cycles / 2: transformers counts half-waves
    ref = _lrs(
        t.get_cosine_with_min_lr_schedule_with_warmup(ref_opt, 3, 13, num_cycles=0.5, min_lr_rate=0.2),
        ref_opt,
        13,
    )
    assert _ours("cosine_with_min_lr", 13, 3, min_lr_ratio=0.2) == pytest.approx(ref, abs=1e-12)
    ref_opt = _opt()
    ref = _lrs(
        t.get_wsd_schedule(ref_opt, 3, 5, num_stable_steps=5, min_lr_ratio=0.2, num_cycles=0.5), ref_opt, 13
    )
    assert _ours("warmup_stable_decay", 13, 3, min_lr_ratio=0.2, decay_steps=5) == pytest.approx(
        ref, abs=1e-12
    )


def test_scheduler_class_path_with_args():
    opt = _opt()
    o = ScheduleOptions(args={"step_size": 2, "gamma": 0.5})
    sched = create_scheduler(
        "constant", opt, warmup_steps=0, total_steps=6, options=o, scheduler_type="StepLR"
    )
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)
    assert _lrs(sched, opt, 6) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])


@pytest.mark.parametrize(
    ("value", "parsed", "steps_of_40"),
    [("10%", 0.1, 4), ("0.25", 0.25, 10), (0.5, 0.5, 20), ("5", 5, 5), (5.0, 5, 5), ("0", 0, 0), (1, 1, 1)],
)
def test_steps_int_ratio_or_percent(value, parsed, steps_of_40: int):
    assert parse_steps(value, "--lr_warmup_steps") == parsed
    assert type(parse_steps(value, "--lr_warmup_steps")) is type(parsed)
    assert resolve_warmup(value, 40) == steps_of_40


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (
            "abc",
            "--lr_decay_steps must be a step count, a ratio below 1 or a percentage like \"10%\", got 'abc'",
        ),
        ("1.5", "--lr_decay_steps: a step count of 1 or more must be a whole number, got '1.5'"),
        ("-2", "--lr_decay_steps must not be negative, got '-2'"),
        ("150%", "--lr_decay_steps: a percentage must be below 100%, got '150%'"),
    ],
)
def test_bad_step_values(value: str, problem: str):
    with pytest.raises(UserError) as err:
        parse_steps(value, "--lr_decay_steps")
    assert err.value.problems == [problem]


def test_schedule_checks():
    assert check_schedule("cosine", "", {}, None) == []
    assert check_schedule("cosine_with_min_lr", "", {}, None) == [
        "--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1: the lr ends at a "
        "tenth of the base lr)"
    ]
    assert check_schedule("piecewise_constant", "", {}, None) == [
        '--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules="1:10,0.1:20,0.01" '
        "(multiplier:until_step pairs, then the final multiplier), got None"
    ]
    assert check_schedule("linear", "", {"gamma": 0.5}, None) == [
        "--lr_scheduler_args gamma: only piecewise_constant (step_rules) and --lr_scheduler_type classes take "
        "arguments"
    ]
    assert check_schedule("constant", "NoSuchLR", {}, None) == [
        "--lr_scheduler_type: torch.optim.lr_scheduler has no class NoSuchLR"
    ]
    assert check_schedule("warmup_stable_decay", "", {}, 1.5) == [
        "--lr_scheduler_min_lr_ratio must be in [0, 1], got 1.5"
    ]


def test_schedule_problems_all_at_once_before_weights_load(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys, monkeypatch
):
    from library.families.sd import StableDiffusionFamily

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", no_weights)
    args = db_args(
        tiny_sd1_dir,
        data2,
        tmp_path / "out",
        "--lr_scheduler",
        "adafactor",
        "--lr_warmup_steps",
        "ten",
        "--lr_scheduler_num_cycles",
        "0",
    )
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        "error: --lr_scheduler adafactor reports Adafactor's own learning rate: it needs --optimizer_type "
        "Adafactor (with relative_step=True, its default)",
        "error: --lr_warmup_steps must be a step count, a ratio below 1 or a percentage like \"10%\", got 'ten'",
        "error: --lr_scheduler_num_cycles must be positive, got 0",
    ]


def test_stable_decay_too_long_for_epochs_is_caught_before_weights_load(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys, monkeypatch
):
    from library.families.sd import StableDiffusionFamily

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", no_weights)
    # 2 batches per epoch: one epoch is 2 steps, shorter than 2 warmup + 2 decay steps.
    args = db_args(tiny_sd1_dir, data2, tmp_path / "out", "--max_train_epochs", "1", "--lr_scheduler",
                   "warmup_stable_decay", "--lr_warmup_steps", "2", "--lr_decay_steps", "2")  # fmt: skip
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        "error: --lr_scheduler warmup_stable_decay: --lr_warmup_steps 2 plus --lr_decay_steps 2 exceed the "
        "training steps (2); lower one of them"
    ]


def test_percent_warmup_and_restarts_end_to_end(tiny_sd1_dir: Path, data2: Path, tmp_path: Path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = db_args(
        tiny_sd1_dir,
        data2,
        out,
        "--max_train_steps",
        "6",
        "--lr_scheduler",
        "cosine_with_restarts",
        "--lr_warmup_steps",
        "34%",
        "--lr_scheduler_num_cycles",
        "2",
        "--learning_rate",
        "0.01",
        "--network_train_unet_only",
        "--cache_latents",
        "--logging_dir",
        str(logs),
    )
    assert run_main(args) == 0
    md = metadata(out / f"{NAME}.safetensors")
    assert (md["ss_lr_scheduler"], md["ss_lr_warmup_steps"]) == ("cosine_with_restarts", "2")
    # logged lr after steps 1..6 (kohya: the scheduler's value after the step): warmup 2, two cycles of 2 steps
    logged = [e.value for e in tb_scalars(logs, "lr/unet")]
    expected = [0.005, 0.01, 0.005 * (1 + C(PI / 2)), 0.01, 0.005 * (1 + C(PI / 2)), 0.0]
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_stable_decay_longer_than_training_is_caught_early():
    from library.training.optim import check_stable_decay

    assert check_stable_decay("0.5", "50%", None) == []
    assert check_stable_decay("0.6", "50%", None) == [
        "--lr_scheduler warmup_stable_decay: --lr_warmup_steps 0.6 plus --lr_decay_steps 50% exceed the "
        "training steps; lower one of them"
    ]
    assert check_stable_decay("6", "0.5", 10) == [
        "--lr_scheduler warmup_stable_decay: --lr_warmup_steps 6 plus --lr_decay_steps 0.5 exceed the "
        "training steps (10); lower one of them"
    ]
    assert check_stable_decay("5", "5", 10) == []
    assert check_stable_decay("6", "5", None) == []  # steps from epochs: checked once the dataset is known
