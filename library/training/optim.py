"""Optimizers, learning-rate schedules, half-precision LoRA parameters and max-norm regularisation.

The factories live in optimizers.py and schedules.py; this module is the one place the trainer imports.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from library.training.optimizers import (
    OPTIMIZERS,
    averaged_weights,
    build_optimizer,
    check_optimizer,
    create_optimizer,
    effective_scheduler,
    is_schedule_free,
    optimizer_eval,
    optimizer_path_for,
    optimizer_train,
    requested_optimizer,
    uses_adafactor_schedule,
)
from library.training.schedules import (
    LR_SCHEDULERS,
    ScheduleOptions,
    check_schedule,
    check_stable_decay,
    create_scheduler,
    lr_lambda_for,
    parse_steps,
    resolve_warmup,
)

__all__ = [
    "LR_SCHEDULERS",
    "OPTIMIZERS",
    "ScheduleOptions",
    "averaged_weights",
    "build_optimizer",
    "check_full_precision",
    "check_optimizer",
    "check_schedule",
    "check_stable_decay",
    "create_optimizer",
    "create_scheduler",
    "effective_scheduler",
    "is_schedule_free",
    "lr_lambda_for",
    "max_norm_stats",
    "optimizer_eval",
    "optimizer_path_for",
    "optimizer_train",
    "parse_steps",
    "patch_scaler_for_fp16_params",
    "requested_optimizer",
    "resolve_warmup",
    "uses_adafactor_schedule",
]

log = logging.getLogger(__name__)


def check_full_precision(full_fp16: bool, full_bf16: bool, mixed_precision: str) -> list[str]:
    """kohya: the LoRA parameters may be half precision only under the matching autocast precision."""
    if full_fp16 and full_bf16:
        return [
            "--full_fp16 and --full_bf16 exclude each other: the LoRA parameters have one dtype; pick one"
        ]
    for on, name, need in ((full_fp16, "full_fp16", "fp16"), (full_bf16, "full_bf16", "bf16")):
        if on and mixed_precision != need:
            return [
                f"--{name} needs --mixed_precision {need} (got {mixed_precision}): the LoRA parameters are "
                f"stored in {need}, so the forward pass must run in {need} too"
            ]
    return []


def patch_scaler_for_fp16_params(scaler: Any) -> None:
    """--full_fp16: torch's GradScaler refuses to unscale fp16 gradients; kohya lets it (allow_fp16=True).

    Unscaling in fp16 can overflow where fp32 would not; the scaler then skips that step and lowers its
    scale, which is the trade-off kohya's --full_fp16 makes for memory.
    """
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16


def max_norm_stats(network: torch.nn.Module, max_norm: float, device: torch.device) -> torch.Tensor | tuple:
    """Apply --scale_weight_norms; returns [keys scaled, mean norm, max norm] on the device, without a sync.

    Third-party network modules without `max_norm_stats` get kohya's `apply_max_norm_regularization`
    (which returns host values: one sync per step, as in kohya).
    """
    if hasattr(network, "max_norm_stats"):
        return network.max_norm_stats(max_norm)
    try:
        return tuple(network.apply_max_norm_regularization(max_norm, device))
    except TypeError:
        return tuple(network.apply_max_norm_regularization(max_norm))
