"""Training noise and timesteps (kohya's noise offset, adaptive noise scale, pyramid/multi-resolution noise,
input-perturbation noise), all drawn on the latents' device.

kohya draws timesteps and pyramid octaves on the CPU and copies them each step; here every tensor is
created where it is used, and random strengths stay device tensors (no `.item()`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseOptions:
    """kohya's noise flags, defaults included; plain values for the step."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def _strength(
    value: float, random_strength: bool, like: torch.Tensor, generator: torch.Generator | None
) -> float | torch.Tensor:
    """`value`, or U(0, 1) * value as a 1-element device tensor (kohya's *_random_strength)."""
    if not random_strength:
        return value
    return torch.rand((1,), generator=generator, device=like.device, dtype=like.dtype) * value


def apply_noise_offset(
    latents: torch.Tensor,
    noise: torch.Tensor,
    offset: float | torch.Tensor,
    adaptive_noise_scale: float | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """noise + offset' * N(0, 1) per sample and channel, offset' = max(0, offset + scale * |channel mean|)
    with adaptive_noise_scale, else offset."""
    if adaptive_noise_scale is not None:
        channel_mean = latents.mean(dim=tuple(range(2, latents.ndim)), keepdim=True).abs()
        offset = torch.clamp(offset + adaptive_noise_scale * channel_mean, min=0.0)
    shape = tuple(latents.shape[:2]) + (1,) * (latents.ndim - 2)
    return noise + offset * _randn(shape, latents, generator)


def pyramid_noise(
    noise: torch.Tensor,
    iterations: int,
    discount: float,
    rng: random.Random | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multi-resolution noise: octave i = 0, 1, ... adds bilinearly upsampled N(0, 1) of size (h, w) / r^i
    times discount^i (octave 0 is a second full-size draw, as in kohya), r uniform in [2, 4) per octave, until a side reaches 1; then the sum is rescaled to unit
    standard deviation. The octave sizes come from `rng` (host floats, no device sync)."""
    rng = rng or random
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = rng.random() * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        octave = _randn((b, c, hn, wn), noise, generator)
        out += torch.nn.functional.interpolate(octave, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def sample_timesteps(
    low: int, high: int, batch: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform integer timesteps in [low, high), drawn on `device`."""
    return torch.randint(low, high, (batch,), generator=generator, device=device, dtype=torch.long)


def sample_noise(
    latents: torch.Tensor,
    options: NoiseOptions,
    generator: torch.Generator | None = None,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """The regression noise for `latents`: N(0, 1), then noise offset or pyramid noise as configured."""
    noise = _randn(tuple(latents.shape), latents, generator)
    if options.noise_offset:
        offset = _strength(options.noise_offset, options.noise_offset_random_strength, latents, generator)
        noise = apply_noise_offset(latents, noise, offset, options.adaptive_noise_scale, generator)
    if options.multires_noise_iterations:
        noise = pyramid_noise(
            noise, options.multires_noise_iterations, options.multires_noise_discount, rng, generator
        )
    return noise


def input_noise(
    noise: torch.Tensor, options: NoiseOptions, generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """kohya's input perturbation (ip_noise_gamma): the noise that builds the model input, noise + gamma *
    N(0, 1), while the target keeps `noise`. None when off."""
    if not options.ip_noise_gamma:
        return None
    gamma = _strength(options.ip_noise_gamma, options.ip_noise_gamma_random_strength, noise, generator)
    return noise + gamma * _randn(tuple(noise.shape), noise, generator)


def keyed_draws(
    seeds: Sequence[int],
    latents: torch.Tensor,
    options: NoiseOptions,
    draw_timesteps: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(noise, timesteps, input-perturbation noise or None) for a batch, each sample drawn from a generator
    seeded with its own seed (the dataset's `noise_seeds`).

    Why not one draw from the process's RNG: a sample's noise must not depend on which process trains it or
    which samples share its batch, so N processes x batch B train like one process x batch N*B, and a
    resumed run draws what the uninterrupted one drew. Per sample, kohya's per-batch draws (noise-offset and
    ip-noise random strengths, pyramid noise's normalisation) become per-sample ones. Host work only: the
    generators live on the latents' device and nothing is read back.
    """
    noises, times, perturbed = [], [], []
    for i, seed in enumerate(seeds):
        generator = torch.Generator(device=latents.device).manual_seed(seed)
        one = latents[i : i + 1]
        noise = sample_noise(one, options, generator, random.Random(seed))
        noises.append(noise)
        times.append(draw_timesteps(one, generator))
        extra = input_noise(noise, options, generator)
        if extra is not None:
            perturbed.append(extra)
    return torch.cat(noises), torch.cat(times), torch.cat(perturbed) if perturbed else None
