"""Flow-matching training math (FLUX.1, rectified flow): kohya's sigma sampling, noising and loss weighting.

Model-independent, plain values in and out. A sigma in (0, 1] is the noise level: the model input is
(1 - sigma) * latents + sigma * noise and the regression target is noise - latents (kohya). kohya calls
sigma * 1000 the "timestep" (`timesteps_from_sigmas`); its FLUX trainer feeds the transformer that value
divided by 1000 again (the BFL model scales it by 1000 inside its timestep embedding).

Unlike kohya's `get_sigmas`, which looks each sample's sigma up with a `.item()` per sample, everything here
is drawn and indexed on the target device: no host synchronisation, no Python loop over the batch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from library.config.flow import MODEL_PREDICTION_TYPES, TIMESTEP_SAMPLINGS, WEIGHTING_SCHEMES

NUM_TRAIN_TIMESTEPS = 1000  # kohya's FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
# flux_shift: mu grows linearly from 0.5 at 256 image tokens to 1.15 at 4096 (BFL's and kohya's constants).
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
BASE_TOKENS, MAX_TOKENS = 256, 4096


@dataclass(frozen=True)
class FlowOptions:
    """kohya's flow-matching options (names and defaults of flux_train_network.py)."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    weighting_scheme: str = "uniform"  # "none" is the same (kohya's earlier default)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    model_prediction_type: str = "sigma_scaled"
    guidance_scale: float = 3.5

    def __post_init__(self) -> None:
        # User input is checked (with one-line messages) in library.validate; this guards programming errors.
        for name, allowed in (
            ("timestep_sampling", TIMESTEP_SAMPLINGS),
            ("weighting_scheme", WEIGHTING_SCHEMES),
            ("model_prediction_type", MODEL_PREDICTION_TYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The discrete flow shift s: s * sigma / (1 + (s - 1) * sigma) (kohya's and diffusers' formula)."""
    return (sigmas * shift) / (1 + (shift - 1) * sigmas)


def image_tokens(latent_hw: tuple[int, int]) -> int:
    """Image tokens of a latent of this height and width once packed into 2x2 patches."""
    return (latent_hw[0] // 2) * (latent_hw[1] // 2)


def flux_shift_mu(tokens: int) -> float:
    """kohya's get_lin_function(y1=0.5, y2=1.15): mu linear in the image token count."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return slope * tokens + (BASE_SHIFT - slope * BASE_TOKENS)


def time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """kohya's time_shift(mu, 1.0, t) = e^mu / (e^mu + (1/t - 1)), i.e. the flow shift with s = e^mu."""
    e = math.exp(mu)
    return e / (e + (1 / sigmas - 1))


@functools.lru_cache(maxsize=16)
def sigma_table(device: str, shift: float) -> torch.Tensor:
    """The 1000 training sigmas of FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
    highest first, float32 on `device`; built once per (device, shift) and reused every step."""
    steps = torch.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=torch.float32).flip(0)
    # Built on the CPU as diffusers builds it, so the table is bit-identical, then moved once.
    return shift_sigmas(steps / NUM_TRAIN_TIMESTEPS, shift).to(device)


def _density(
    options: FlowOptions, batch_size: int, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """u in [0, 1] from the weighting scheme's density (diffusers' compute_density_for_timestep_sampling)."""
    if options.weighting_scheme == "logit_normal":
        z = torch.normal(
            options.logit_mean, options.logit_std, (batch_size,), device=device, generator=generator
        )
        return torch.sigmoid(z)
    u = torch.rand((batch_size,), device=device, generator=generator)
    if options.weighting_scheme == "mode":
        return 1 - u - options.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def _sigmoid_draw(
    options: FlowOptions, batch_size: int, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    z = torch.randn((batch_size,), device=device, generator=generator)
    return torch.sigmoid(z * options.sigmoid_scale)


def sample_sigmas(
    options: FlowOptions,
    batch_size: int,
    latent_hw: tuple[int, int],
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training sigmas [B], float32 in (0, 1], drawn on `device` (a generator must live there too).

    sigma: u from the weighting scheme's density picks one of the 1000 shifted schedule sigmas (index
    floor(u * 1000); kohya would crash on the rare u = 1, here it takes the last entry); uniform: U(0, 1];
    sigmoid: sigmoid(scale * N(0, 1)); shift: that, shifted by discrete_flow_shift; flux_shift: that,
    time-shifted with mu from the packed image token count of `latent_hw` (the latent's height, width).
    """
    device = torch.device(device)
    mode = options.timestep_sampling
    if mode == "uniform":
        # 1 - U[0, 1): kohya's U[0, 1) can give sigma 0, where sigma_sqrt weighting (1 / sigma^2) is infinite.
        return 1 - torch.rand((batch_size,), device=device, generator=generator)
    if mode == "sigmoid":
        return _sigmoid_draw(options, batch_size, device, generator)
    if mode == "shift":
        return shift_sigmas(
            _sigmoid_draw(options, batch_size, device, generator), options.discrete_flow_shift
        )
    if mode == "flux_shift":
        mu = flux_shift_mu(image_tokens(latent_hw))
        return time_shift(mu, _sigmoid_draw(options, batch_size, device, generator))
    u = _density(options, batch_size, device, generator)
    indices = (u * NUM_TRAIN_TIMESTEPS).long().clamp_(0, NUM_TRAIN_TIMESTEPS - 1)
    return sigma_table(str(device), float(options.discrete_flow_shift))[indices]


def timesteps_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """kohya's `timesteps` (sigma * 1000, float): what the loss and logs see; the FLUX transformer gets
    this divided by 1000 again."""
    return sigmas * NUM_TRAIN_TIMESTEPS


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.view(-1, *([1] * (like.dim() - 1)))


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """(1 - sigma) * latents + sigma * noise per sample, in the latents' dtype."""
    s = _per_sample(sigmas, latents)
    return ((1.0 - s) * latents + s * noise).to(latents.dtype)


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target kohya uses for every model_prediction_type: the velocity noise - latents."""
    return noise - latents


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """diffusers' compute_loss_weighting_for_sd3: sigma_sqrt 1/sigma^2, cosmap 2/(pi(1 - 2 sigma + 2 sigma^2)),
    float32, same shape as `sigmas`. Every other scheme weighs 1 everywhere; None says so without the
    multiply (loss * 1 is loss bit for bit)."""
    if weighting_scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if weighting_scheme == "cosmap":
        return (2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))).float()
    return None


def apply_model_prediction_type(
    pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor, options: FlowOptions
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kohya's apply_model_prediction_type -> (prediction compared with noise - latents, loss weighting
    broadcastable to the prediction, or None for no weighting).

    raw: the prediction as is (a velocity: the right thing for FLUX). additive: pred + noisy.
    sigma_scaled (kohya's default): noisy - sigma * pred, weighted by `loss_weighting` (only here do
    sigma_sqrt / cosmap act, as in kohya). What that really computes: with noisy = (1 - s) x + s n, a
    velocity prediction v turns into noisy - s v, which for the true velocity n - x is the clean latent x
    (SD3's "preconditioning", meant for an x target). kohya compares it with noise - latents instead, so
    the loss is s^2 * |v - v*|^2 with v* = n - x + (2x - n) / s: even a perfect velocity model has error
    2x - n, and the optimum the LoRA is pulled to drifts away from the flow velocity as sigma falls. We
    reproduce it because it is kohya's default; --model_prediction_type raw trains the plain velocity loss.
    """
    kind = options.model_prediction_type
    if kind == "raw":
        return pred, None
    if kind == "additive":
        return pred + noisy, None
    s = _per_sample(sigmas, pred)
    return pred * (-s) + noisy, loss_weighting(options.weighting_scheme, s)


def fixed_validation_sigmas(
    count: int, options: FlowOptions, latent_hw: tuple[int, int], device: torch.device | str
) -> torch.Tensor:
    """`count` fixed sigmas [count] for the validation loss, float32 on `device`, highest first.

    kohya's FLUX validation draws random timesteps; here the same noise levels come back every time: the
    midpoints (k + 0.5) / count of equal bins of (0, 1), passed through the training mode's shift (the
    discrete flow shift for sigma/shift, the resolution's time shift for flux_shift, none for uniform and
    sigmoid), so they sit where training puts its noise levels.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    mids = (torch.arange(count, 0, -1, dtype=torch.float32) - 0.5) / count
    mode = options.timestep_sampling
    if mode in ("sigma", "shift"):
        mids = shift_sigmas(mids, options.discrete_flow_shift)
    elif mode == "flux_shift":
        mids = time_shift(flux_shift_mu(image_tokens(latent_hw)), mids)
    return mids.to(device)
