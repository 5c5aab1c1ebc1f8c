"""One micro-step of diffusion training: latents, conditioning, noise, prediction, loss. Family-agnostic."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from library.families.base import ModelBundle, ModelFamily
from library.training.losses import (
    LossOptions,
    huber_c_for_timesteps,
    per_element_loss,
    weight_per_sample_loss,
)
from library.training.noise import NoiseOptions, input_noise, keyed_draws, sample_noise


@dataclass(frozen=True)
class StepOptions:
    min_timestep: int
    max_timestep: int
    clip_skip: int | None
    max_token_length: int | None
    train_text_encoder: bool
    weight_dtype: torch.dtype
    loss: LossOptions = field(default_factory=LossOptions)
    noise: NoiseOptions = field(default_factory=NoiseOptions)
    num_train_timesteps: int = 1000
    weighted_captions: bool = False
    # library.data.text_cache.TextEncoderCache (--cache_text_encoder_outputs): conditioning is looked up
    # there instead of running the text encoders.
    text_cache: Any = None
    # With a text cache: the text encoders whose LoRA trains (their outputs are computed every step).
    live_text_encoders: tuple[int, ...] = ()


def batch_latents(
    family: ModelFamily, bundle: ModelBundle, batch: dict[str, Any], device: torch.device
) -> torch.Tensor:
    """Scaled latents for the batch: cached ones, or encoded now by the (frozen) VAE."""
    latents = batch.get("latents")
    if latents is None:
        pixels = batch["images"].to(device, non_blocking=True)
        vae_dtype = next(bundle.vae.parameters()).dtype
        with torch.no_grad():
            latents = family.encode_images(bundle, pixels.to(vae_dtype))
    else:
        latents = latents.to(device, non_blocking=True)
    return (latents.float() - bundle.vae_shift) * bundle.vae_scale


def text_conditioning(
    family: ModelFamily,
    bundle: ModelBundle,
    captions: list[str],
    options: StepOptions,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """The family's conditioning for the captions; from the text-encoder output cache when there is one
    (sent to `device`, without a host sync)."""
    cached: dict[str, torch.Tensor] = {}
    # Only passed when on, so families without weighted captions keep their plain signature.
    extra: dict[str, Any] = {"weighted": True} if options.weighted_captions else {}
    if options.text_cache is not None:
        cached = options.text_cache.lookup(captions, device)
        if not options.live_text_encoders:
            return cached
        extra["encoders"] = options.live_text_encoders
    grad = torch.enable_grad() if options.train_text_encoder else torch.no_grad()
    with grad:
        live = family.encode_prompts(
            bundle, captions, clip_skip=options.clip_skip, max_token_length=options.max_token_length, **extra
        )
    return {**cached, **live}


def apply_loss_mask(per_element: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """kohya's masked loss: the per-element loss [B, C, h, w] times the pixel mask [B, 1, H, W] averaged down
    to the latent size (area interpolation). The caller's mean then includes the masked-out zeros, as kohya's
    does, so a mask also scales the loss by its coverage."""
    masks = torch.nn.functional.interpolate(
        masks.to(per_element.dtype), size=per_element.shape[2:], mode="area"
    )
    return per_element * masks


def diffusion_loss(
    family: ModelFamily,
    bundle: ModelBundle,
    batch: dict[str, Any],
    options: StepOptions,
    device: torch.device,
    autocast: AbstractContextManager | None = None,
    *,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss of one micro-batch (a 0-dim tensor on `device`; never synchronises the host).

    Validation passes fixed `timesteps` ([B] long) and `noise` (like the latents) instead of sampling them.
    A dataset batch carries `noise_seeds`: each sample's noise and timestep come from its own seed
    (`keyed_draws`); a batch without them draws from the global RNG."""
    latents = batch_latents(family, bundle, batch, device).to(device)
    with autocast or nullcontext():
        cond = {
            **text_conditioning(family, bundle, batch["captions"], options, device),
            **family.batch_conditioning(bundle, batch, device),
        }
        seeds = batch.get("noise_seeds")
        if noise is None and timesteps is None and seeds is not None:
            noise, timesteps, perturbed = keyed_draws(
                seeds,
                latents,
                options.noise,
                lambda one, generator: family.sample_timesteps(
                    bundle, one, options.min_timestep, options.max_timestep, generator=generator
                ),
            )
        else:
            if noise is None:
                noise = sample_noise(latents, options.noise)
            if timesteps is None:
                timesteps = family.sample_timesteps(
                    bundle, latents, options.min_timestep, options.max_timestep
                )
            perturbed = input_noise(noise, options.noise)
        extra = {} if perturbed is None else {"input_noise": perturbed}
        noisy, target = family.noisy_input_and_target(bundle, latents, noise, timesteps, **extra)
        pred = family.predict(bundle, noisy.to(options.weight_dtype), timesteps, cond)
    return weighted_loss(family, bundle, pred, target, timesteps, batch, options, device)


def weighted_loss(
    family: ModelFamily,
    bundle: ModelBundle,
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    batch: dict[str, Any],
    options: StepOptions,
    device: torch.device,
) -> torch.Tensor:
    """kohya's loss: per-element loss (Huber threshold per timestep) x mask -> mean per sample -> x the
    sample's loss weight -> SNR-based weights -> batch mean. The SNR is looked up on device, only if used."""
    lo = options.loss
    snr = family.snr(bundle, timesteps) if lo.needs_snr else None
    huber_c = None
    if lo.loss_type in ("huber", "smooth_l1"):
        huber_c = huber_c_for_timesteps(
            lo.huber_schedule,
            timesteps,
            huber_c=lo.huber_c,
            huber_scale=lo.huber_scale,
            num_train_timesteps=options.num_train_timesteps,
            snr=snr,
        )
    per_element = per_element_loss(pred.float(), target.float(), lo.loss_type, huber_c)
    masks = batch.get("masks")
    if masks is not None:
        per_element = apply_loss_mask(per_element, masks.to(device, non_blocking=True))
    per_sample = per_element.mean(dim=tuple(range(1, per_element.ndim)))
    per_sample = per_sample * batch["loss_weights"].to(device, non_blocking=True)
    scheme = family.timestep_loss_weights(bundle, timesteps)
    if scheme is not None:
        per_sample = per_sample * scheme
    return weight_per_sample_loss(per_sample, snr, lo, bundle.info.v_parameterization).mean()
