"""Learning-rate schedules with kohya's names and options (the diffusers/transformers formulas)."""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from library.errors import UserError

log = logging.getLogger(__name__)

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
)
POLYNOMIAL_LR_END = 1e-7  # diffusers' default lr_end, which kohya keeps


@dataclass
class ScheduleOptions:
    """The --lr_scheduler_* values, steps already resolved to integers."""

    warmup_steps: int = 0
    total_steps: int = 1
    num_cycles: float = 1
    power: float = 1.0
    timescale: int | None = None
    min_lr_ratio: float | None = None
    decay_steps: int = 0
    initial_lr: float = 0.0  # what the adafactor schedule reports before Adafactor's first step
    args: dict[str, Any] = field(default_factory=dict)


def parse_steps(value: Any, flag: str) -> float | int:
    """kohya's int_or_float: "10%" and values below 1 are ratios of the training steps, others are steps."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            number = float(text[:-1]) / 100
        else:
            number = float(text)
    except ValueError:
        raise UserError(
            f'{flag} must be a step count, a ratio below 1 or a percentage like "10%", got {value!r}'
        ) from None
    if number < 0:
        raise UserError(f"{flag} must not be negative, got {value!r}")
    if number == 0:
        return 0
    if text.endswith("%") or number < 1:
        if number >= 1 and text.endswith("%"):
            raise UserError(f"{flag}: a percentage must be below 100%, got {value!r}")
        return number
    if not number.is_integer():
        raise UserError(f"{flag}: a step count of 1 or more must be a whole number, got {value!r}")
    return int(number)


def resolve_warmup(value: Any, total_steps: int, flag: str = "--lr_warmup_steps") -> int:
    """Steps for a warmup/decay option: a ratio (float < 1 or "N%") is a fraction of the total steps."""
    steps = parse_steps(value, flag)
    if isinstance(steps, float):
        return int(steps * total_steps)
    return steps


def _warm(step: int, warmup: int) -> float | None:
    return step / max(1, warmup) if step < warmup else None


def _piecewise(step_rules: str) -> Callable[[int], float]:
    """diffusers' step_rules "1:10,0.1:20,0.01": multiplier 1 before step 10, 0.1 before 20, then 0.01."""
    *rules, last = str(step_rules).split(",")
    table = []
    for rule in rules:
        value, steps = rule.split(":")
        table.append((int(steps), float(value)))
    table.sort()
    final = float(last)

    def fn(step: int) -> float:
        for until, value in table:
            if step < until:
                return value
        return final

    return fn


def lr_lambda_for(
    name: str, warmup: int, total: int, options: ScheduleOptions | None = None, base_lr: float = 1.0
):
    """Multiplier of the base lr at optimizer step `s` (0-based), matching diffusers/transformers schedules."""
    o = options or ScheduleOptions(warmup_steps=warmup, total_steps=total)
    span = max(1, total - warmup)

    def constant(step: int) -> float:
        return 1.0

    def constant_with_warmup(step: int) -> float:
        w = _warm(step, warmup)
        return 1.0 if w is None else w

    def linear(step: int) -> float:
        w = _warm(step, warmup)
        return w if w is not None else max(0.0, (total - step) / span)

    def cosine(step: int) -> float:
        w = _warm(step, warmup)
        if w is not None:
            return w
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span)))

    def cosine_with_restarts(step: int) -> float:
        w = _warm(step, warmup)
        if w is not None:
            return w
        progress = (step - warmup) / span
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((o.num_cycles * progress) % 1.0))))

    def polynomial(step: int) -> float:
        w = _warm(step, warmup)
        if w is not None:
            return w
        if step > total:
            return POLYNOMIAL_LR_END / base_lr
        remaining = 1 - (step - warmup) / span
        return ((base_lr - POLYNOMIAL_LR_END) * remaining**o.power + POLYNOMIAL_LR_END) / base_lr

    timescale = o.timescale or warmup or 10_000

    def inverse_sqrt(step: int) -> float:
        w = _warm(step, warmup)
        return w if w is not None else 1.0 / math.sqrt((step + timescale - warmup) / timescale)

    min_ratio = o.min_lr_ratio or 0.0

    def cosine_with_min_lr(step: int) -> float:
        w = _warm(step, warmup)
        if w is not None:
            return w
        # kohya passes num_cycles / 2 (transformers counts half-waves), so 1 cycle = one descent
        factor = 0.5 * (1.0 + math.cos(math.pi * o.num_cycles * (step - warmup) / span))
        return max(0.0, factor * (1 - min_ratio) + min_ratio)

    def warmup_stable_decay(step: int) -> float:
        if step < warmup:
            return max(0.0, step / max(1, warmup) * (1 - min_ratio) + min_ratio)
        stable = total - warmup - o.decay_steps
        if step < warmup + stable:
            return 1.0
        if step < total:
            progress = (step - warmup - stable) / max(1, o.decay_steps)
            factor = 0.5 * (1.0 + math.cos(math.pi * o.num_cycles * progress))
            return max(0.0, factor * (1 - min_ratio) + min_ratio)
        return min_ratio

    table = {
        "constant": constant,
        "constant_with_warmup": constant_with_warmup,
        "linear": linear,
        "cosine": cosine,
        "cosine_with_restarts": cosine_with_restarts,
        "polynomial": polynomial,
        "inverse_sqrt": inverse_sqrt,
        "cosine_with_min_lr": cosine_with_min_lr,
        "warmup_stable_decay": warmup_stable_decay,
    }
    if name == "piecewise_constant":
        return _piecewise(o.args.get("step_rules", "1"))
    return table[name]


def check_schedule(
    name: str, scheduler_type: str, scheduler_args: dict[str, Any], min_lr_ratio: float | None
) -> list[str]:
    """Problems with the scheduler options found without building anything (run before loading)."""
    from library.errors import did_you_mean

    problems: list[str] = []
    if scheduler_type:
        module, _, cls = scheduler_type.rpartition(".")
        try:
            found = getattr(importlib.import_module(module or "torch.optim.lr_scheduler"), cls, None)
        except ImportError as exc:
            return [f"--lr_scheduler_type: cannot import {module} ({exc})"]
        if found is None:
            problems.append(f"--lr_scheduler_type: {module or 'torch.optim.lr_scheduler'} has no class {cls}")
        return problems
    if name not in LR_SCHEDULERS:
        problems.append(
            f"--lr_scheduler: unknown scheduler {name!r}{did_you_mean(name, set(LR_SCHEDULERS))}; "
            f"use one of {', '.join(LR_SCHEDULERS)}, or a class with --lr_scheduler_type"
        )
    if name == "piecewise_constant":
        rules = scheduler_args.get("step_rules")
        try:
            _piecewise(rules)(0)
            ok = rules is not None
        except ValueError:
            ok = False
        if not ok:
            problems.append(
                '--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules="1:10,0.1:20,0.01" '
                f"(multiplier:until_step pairs, then the final multiplier), got {rules!r}"
            )
    elif scheduler_args:
        problems.append(
            f"--lr_scheduler_args {', '.join(scheduler_args)}: only piecewise_constant (step_rules) and "
            "--lr_scheduler_type classes take arguments"
        )
    if name == "cosine_with_min_lr" and min_lr_ratio is None:
        problems.append(
            "--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1: the lr ends at a "
            "tenth of the base lr)"
        )
    if min_lr_ratio is not None and not 0 <= min_lr_ratio <= 1:
        problems.append(f"--lr_scheduler_min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return problems


def check_stable_decay(warmup: Any, decay: Any, total_steps: int | None) -> list[str]:
    """warmup_stable_decay needs warmup + decay <= the training steps; checkable before the dataset when both
    are ratios, or when the step count is fixed (`total_steps`; None when it comes from epochs)."""
    try:
        w, d = parse_steps(warmup, "--lr_warmup_steps"), parse_steps(decay, "--lr_decay_steps")
    except UserError:
        return []  # reported by the per-flag check
    if isinstance(w, float) and isinstance(d, float):
        too_long = w + d > 1
    elif total_steps is None:
        return []
    else:
        too_long = resolve_warmup(w, total_steps) + resolve_warmup(d, total_steps) > total_steps
    if not too_long:
        return []
    return [
        f"--lr_scheduler warmup_stable_decay: --lr_warmup_steps {warmup} plus --lr_decay_steps {decay} exceed "
        f"the training steps{'' if total_steps is None else f' ({total_steps})'}; lower one of them"
    ]


def create_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    options: ScheduleOptions | None = None,
    scheduler_type: str = "",
) -> torch.optim.lr_scheduler.LRScheduler:
    o = options or ScheduleOptions(warmup_steps=warmup_steps, total_steps=total_steps)
    if scheduler_type:
        module, _, cls = scheduler_type.rpartition(".")
        scheduler_cls = getattr(importlib.import_module(module or "torch.optim.lr_scheduler"), cls)
        try:
            return scheduler_cls(optimizer, **o.args)
        except TypeError as exc:
            raise UserError(
                f"--lr_scheduler_args: {scheduler_type} rejected {sorted(o.args)}: {exc}"
            ) from None
    if name == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise UserError("--lr_scheduler adafactor works only with --optimizer_type Adafactor")
        return AdafactorSchedule(optimizer, o.initial_lr)
    if name == "constant" and warmup_steps:
        log.warning("--lr_warmup_steps is ignored by the constant scheduler; use constant_with_warmup")
    if name == "warmup_stable_decay" and total_steps - warmup_steps - o.decay_steps < 0:
        raise UserError(
            f"--lr_scheduler warmup_stable_decay: warmup ({warmup_steps}) + decay ({o.decay_steps}) steps "
            f"exceed the {total_steps} training steps; lower --lr_warmup_steps or --lr_decay_steps"
        )
    base_lr = optimizer.defaults.get("lr") or 1.0
    fn = lr_lambda_for(name, warmup_steps, total_steps, o, base_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
