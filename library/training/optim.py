"""Optimizer and learning-rate schedule factories (kohya names; any class path works)."""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from typing import Any

import torch

from library.errors import UserError
from library.validate import optimizer_class_path

log = logging.getLogger(__name__)


def _import_class(path: str, flag: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = module_name.split(".")[0]
        raise UserError(
            f"{flag}: cannot import {module_name} ({exc}); install it with: pip install {package}"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"{flag}: {module_name} has no class {class_name}")
    return cls


def check_optimizer(optimizer_type: str, optimizer_args: dict[str, Any]) -> list[str]:
    """Problems with --optimizer_type/--optimizer_args found without building anything (run before loading)."""
    path = optimizer_class_path(optimizer_type)
    if path.startswith("bitsandbytes."):
        return []  # checked when built: bitsandbytes is slow to import and falls back to AdamW on CPU
    try:
        cls = _import_class(path, "--optimizer_type")
    except UserError as exc:
        return exc.problems
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    accepted = [name for name in params if name not in ("self", "params", "lr")]
    unknown = [key for key in optimizer_args if key not in params]
    if unknown:
        return [
            f"--optimizer_args: {path} does not accept {', '.join(unknown)}; it accepts {', '.join(accepted)}"
        ]
    return []


def optimizer_path_for(optimizer_type: str, device: torch.device) -> str:
    """Dotted class path of the optimizer that will run on `device` (warns when it differs from the request)."""
    path = optimizer_class_path(optimizer_type)
    if path.startswith("bitsandbytes.") and device.type != "cuda":
        # bitsandbytes' 8-bit states need CUDA; on CPU the same math in 32-bit keeps the run going.
        log.warning("%s needs a CUDA GPU; using torch.optim.AdamW on %s instead", optimizer_type, device.type)
        path = "torch.optim.AdamW"
    return path


def create_optimizer(
    optimizer_type: str,
    param_groups: list[dict],
    lr: float,
    optimizer_args: dict[str, Any],
    device: torch.device,
) -> torch.optim.Optimizer:
    path = optimizer_path_for(optimizer_type, device)
    cls = _import_class(path, "--optimizer_type")
    try:
        return cls(param_groups, lr=lr, **optimizer_args)
    except TypeError as exc:
        raise UserError(
            f"--optimizer_args: {path} rejected the options {sorted(optimizer_args)}: {exc}"
        ) from None


def resolve_warmup(lr_warmup_steps: float, total_steps: int) -> int:
    """kohya: a value below 1 is a fraction of the total steps."""
    if 0 < lr_warmup_steps < 1:
        return int(lr_warmup_steps * total_steps)
    return int(lr_warmup_steps)


def lr_lambda_for(name: str, warmup: int, total: int):
    """Multiplier of the base lr at optimizer step `s` (0-based), matching diffusers/transformers schedules."""

    def warm(step: int) -> float | None:
        if step < warmup:
            return step / max(1, warmup)
        return None

    def constant(step: int) -> float:
        return 1.0

    def constant_with_warmup(step: int) -> float:
        w = warm(step)
        return 1.0 if w is None else w

    def linear(step: int) -> float:
        w = warm(step)
        if w is not None:
            return w
        return max(0.0, (total - step) / max(1, total - warmup))

    def cosine(step: int) -> float:
        w = warm(step)
        if w is not None:
            return w
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    table = {
        "constant": constant,
        "constant_with_warmup": constant_with_warmup,
        "linear": linear,
        "cosine": cosine,
    }
    return table[name]


def create_scheduler(
    name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    if name == "constant" and warmup_steps:
        log.warning("--lr_warmup_steps is ignored by the constant scheduler; use constant_with_warmup")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(name, warmup_steps, total_steps))
