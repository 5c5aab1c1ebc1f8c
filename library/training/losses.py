"""Loss forms and per-timestep loss weights (kohya's `conditional_loss`, Huber schedules and the SNR-based
weights of custom_train_functions), as pure tensor functions.

Everything stays on the tensors' device: the SNR of each sample comes from the family (`ModelFamily.snr`,
indexed on device), so no weight needs a host round trip or a Python loop over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from library.config.loss import HUBER_SCHEDULES, LOSS_TYPES

# kohya caps the SNR at 1000 where it divides by it (t = 0 has a huge SNR).
SNR_CAP = 1000.0


@dataclass(frozen=True)
class LossOptions:
    """kohya's loss flags, defaults included; plain values for the step."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    @property
    def needs_snr(self) -> bool:
        """Whether the step must look up the SNR of its timesteps at all."""
        snr_huber = self.loss_type in ("huber", "smooth_l1") and self.huber_schedule == "snr"
        return bool(
            snr_huber
            or self.min_snr_gamma
            or self.scale_v_pred_loss_like_noise_pred
            or self.v_pred_like_loss
            or self.debiased_estimation_loss
        )


def huber_c_for_timesteps(
    schedule: str,
    timesteps: torch.Tensor,
    *,
    huber_c: float,
    huber_scale: float,
    num_train_timesteps: int,
    snr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample Huber threshold [B] (kohya's schedules).

    constant: c * scale; exponential: exp(ln(c) * t / T) * scale, i.e. 1 at t = 0 falling to c at t = T;
    snr: (1 - c) / (1 + sigma)^2 + c with sigma = sqrt((1 - a) / a) = 1 / sqrt(snr) (kohya applies no scale
    here). `snr` [B] is required for the snr schedule.
    """
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, device=timesteps.device)
    if schedule == "exponential":
        rate = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-rate * timesteps.float()) * huber_scale
    if schedule == "snr":
        if snr is None:
            raise ValueError("the snr Huber schedule needs the SNR of the timesteps")
        sigma = snr.float().rsqrt()
        return (1 - huber_c) / (1 + sigma) ** 2 + huber_c
    raise ValueError(f"unknown Huber schedule {schedule!r}; use one of {', '.join(HUBER_SCHEDULES)}")


def per_element_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Unreduced loss. huber: 2c(sqrt(d^2 + c^2) - c); smooth_l1: 2(sqrt(d^2 + c^2) - c) (kohya's pseudo-Huber
    forms, `huber_c` [B] per sample)."""
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs a per-sample huber_c")
        c = huber_c.to(pred.dtype).view(-1, *([1] * (pred.ndim - 1)))
        soft = torch.sqrt((pred - target) ** 2 + c * c) - c
        return 2 * c * soft if loss_type == "huber" else 2 * soft
    raise ValueError(f"unknown loss type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """min(snr, gamma) / snr (epsilon) or min(snr, gamma) / (snr + 1) (v-prediction).

    At SNR 0 (the last step under zero-terminal SNR) the epsilon weight takes its limit 1, where kohya's
    division gives NaN."""
    clipped = torch.clamp(snr, max=gamma)
    if v_prediction:
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))


def v_pred_noise_scale(snr: torch.Tensor) -> torch.Tensor:
    """snr / (snr + 1) with the SNR capped at 1000: scales a v-prediction loss like an epsilon one."""
    capped = torch.clamp(snr, max=SNR_CAP)
    return capped / (capped + 1)


def debiased_weight(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """1 / sqrt(snr) (epsilon) or 1 / (snr + 1) (v-prediction), SNR capped at 1000 (debiased estimation)."""
    capped = torch.clamp(snr, max=SNR_CAP)
    return 1 / (capped + 1) if v_prediction else capped.rsqrt()


def weight_per_sample_loss(
    loss: torch.Tensor, snr: torch.Tensor | None, options: LossOptions, v_prediction: bool
) -> torch.Tensor:
    """kohya's post-processing of the per-sample loss [B], in kohya's order: min-SNR, v-pred scaling,
    v-pred-like loss, debiased estimation."""
    if not options.needs_snr or snr is None:
        return loss
    snr = snr.to(loss.dtype)
    if options.min_snr_gamma:
        loss = loss * min_snr_weight(snr, options.min_snr_gamma, v_prediction)
    if options.scale_v_pred_loss_like_noise_pred:
        loss = loss * v_pred_noise_scale(snr)
    if options.v_pred_like_loss:
        loss = loss + loss / v_pred_noise_scale(snr) * options.v_pred_like_loss
    if options.debiased_estimation_loss:
        loss = loss * debiased_weight(snr, v_prediction)
    return loss


def prediction_problems(options: LossOptions, v_prediction: bool) -> list[str]:
    """Loss flags that contradict the model's prediction type (known from its headers, before any weights)."""
    problems = []
    if options.scale_v_pred_loss_like_noise_pred and not v_prediction:
        problems.append(
            "--scale_v_pred_loss_like_noise_pred scales a v-prediction loss, but this model trains "
            "epsilon-prediction; add --v_parameterization or remove the flag"
        )
    if options.v_pred_like_loss and v_prediction:
        problems.append(
            "--v_pred_like_loss adds a v-like term to an epsilon loss, but this model trains v-prediction "
            "(--v_parameterization); remove --v_pred_like_loss"
        )
    return problems
