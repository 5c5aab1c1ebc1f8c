"""The loss, noise and timestep options of `TrainConfig` (kohya's names, defaults and meanings).

A base class of `TrainConfig`, kept apart so that config.py stays readable; it must not import the rest of the config package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Also the names library.training.losses accepts; here so that parsing the command line needs no torch.
LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def _flag(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    return field(default=default, metadata={"group": "loss", "help": help, **argparse_kwargs})


@dataclass
class LossNoiseOptions:
    loss_type: str = _flag(
        "l2",
        "per-element loss: l2, l1, huber (pseudo-Huber 2c(sqrt(d^2+c^2)-c)) or smooth_l1 (2(sqrt(d^2+c^2)-c))",
        choices=list(LOSS_TYPES),
    )
    huber_schedule: str = _flag(
        "snr",
        "Huber threshold per timestep: constant (c*scale), exponential (from scale at t=0 to c*scale at "
        "t=T) or snr ((1-c)/(1+sigma)^2+c)",
        choices=list(HUBER_SCHEDULES),
    )
    huber_c: float = _flag(0.1, "Huber threshold c (> 0)")
    huber_scale: float = _flag(1.0, "scale of the constant and exponential Huber schedules")
    min_snr_gamma: float | None = _flag(
        None, "min-SNR weighting: loss * min(SNR, gamma) / SNR (/(SNR+1) for v-prediction); 5 is typical"
    )
    scale_v_pred_loss_like_noise_pred: bool = _flag(
        False, "scale a v-prediction loss by SNR/(SNR+1), like an epsilon loss (needs --v_parameterization)"
    )
    v_pred_like_loss: float | None = _flag(
        None, "add this share of a v-prediction-like loss to an epsilon loss (not with --v_parameterization)"
    )
    debiased_estimation_loss: bool = _flag(
        False, "debiased estimation: loss / sqrt(SNR) (/(SNR+1) for v-prediction), SNR capped at 1000"
    )
    noise_offset: float | None = _flag(
        None, "add offset * N(0,1) per sample and channel to the noise (0.05-0.1 typical)"
    )
    noise_offset_random_strength: bool = _flag(
        False, "draw the noise offset uniformly from [0, --noise_offset) each step"
    )
    adaptive_noise_scale: float | None = _flag(
        None, "add this times |latent channel mean| to the noise offset (needs --noise_offset)"
    )
    multires_noise_iterations: int | None = _flag(
        None, "multi-resolution (pyramid) noise octaves (6-10 typical; not with --noise_offset)"
    )
    multires_noise_discount: float = _flag(0.3, "weight decay per pyramid noise octave")
    ip_noise_gamma: float | None = _flag(
        None, "input perturbation: the model input gets noise + gamma * N(0,1), the target not (0.1 typical)"
    )
    ip_noise_gamma_random_strength: bool = _flag(
        False, "draw the input perturbation uniformly from [0, --ip_noise_gamma) each step"
    )
    zero_terminal_snr: bool = _flag(
        False, "rescale the noise schedule so the last timestep has zero SNR (meant for --v_parameterization)"
    )
