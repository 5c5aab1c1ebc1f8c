"""The flow-matching options of `TrainConfig` (FLUX.1): kohya's flag names, defaults and meanings.

A base class of `TrainConfig`, kept apart so that options.py stays readable; it imports no torch and nothing
else of the config package. `library.training.flow` takes the same values as a `FlowOptions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# kohya's choices (flux_train_utils / train_util); library.training.flow implements exactly these.
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
# "uniform" (kohya's current default) and "none" (its earlier default) do the same.
WEIGHTING_SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
MODE_SCALE_MAX = 2 / (math.pi - 2)  # the mode density stays monotone in [0, 1] for -1 <= scale <= this
FLOW_OPTION_NAMES = (
    "timestep_sampling",
    "sigmoid_scale",
    "discrete_flow_shift",
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "model_prediction_type",
    "guidance_scale",
)


def _flag(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    return field(default=default, metadata={"group": "flux", "help": help, **argparse_kwargs})


@dataclass
class FlowMatchingOptions:
    timestep_sampling: str = _flag(
        "sigma",
        "how the noise level sigma is drawn: sigma (from --weighting_scheme's density, on the 1000-step "
        "schedule shifted by --discrete_flow_shift), uniform, sigmoid (sigmoid(scale*N(0,1))), shift "
        "(sigmoid, then shifted by --discrete_flow_shift) or flux_shift (sigmoid, then shifted by the "
        "resolution: mu 0.5 at 256 to 1.15 at 4096 image tokens)",
        choices=list(TIMESTEP_SAMPLINGS),
    )
    sigmoid_scale: float = _flag(
        1.0,
        "scale of N(0,1) before the sigmoid (sigmoid, shift, flux_shift): 1 favours middle sigmas, about 1.6 "
        "is close to uniform, more favours both ends",
    )
    discrete_flow_shift: float = _flag(
        3.0, "shift s of the schedule, sigma' = s*sigma/(1+(s-1)*sigma) (sigma and shift sampling)"
    )
    weighting_scheme: str = _flag(
        "uniform",
        "density of the sigma sampling (logit_normal, mode) or loss weight (sigma_sqrt: 1/sigma^2, cosmap: "
        "2/(pi(1-2sigma+2sigma^2)); with --model_prediction_type sigma_scaled only); uniform and none: "
        "neither",
        choices=list(WEIGHTING_SCHEMES),
    )
    logit_mean: float = _flag(0.0, "mean of the logit_normal density")
    logit_std: float = _flag(1.0, "standard deviation of the logit_normal density")
    mode_scale: float = _flag(1.29, "scale of the mode density")
    model_prediction_type: str = _flag(
        "sigma_scaled",
        "how the prediction enters the loss against noise - latents: raw (as is), additive (+ noisy input) "
        "or sigma_scaled (noisy input - sigma * prediction, kohya's default)",
        choices=list(MODEL_PREDICTION_TYPES),
    )
    guidance_scale: float = _flag(
        3.5, "guidance value fed to FLUX.1 dev's guidance embedding while training (schnell ignores it)"
    )
