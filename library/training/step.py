"""One micro-step of diffusion training: latents, conditioning, noise, prediction, loss. Family-agnostic."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from library.families.base import ModelBundle, ModelFamily


@dataclass(frozen=True)
class StepOptions:
    min_timestep: int
    max_timestep: int
    clip_skip: int | None
    max_token_length: int | None
    train_text_encoder: bool
    weight_dtype: torch.dtype


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
    family: ModelFamily, bundle: ModelBundle, captions: list[str], options: StepOptions
) -> dict[str, torch.Tensor]:
    grad = torch.enable_grad() if options.train_text_encoder else torch.no_grad()
    with grad:
        return family.encode_prompts(
            bundle, captions, clip_skip=options.clip_skip, max_token_length=options.max_token_length
        )


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
) -> torch.Tensor:
    """Mean loss of one micro-batch (a 0-dim tensor on `device`; never synchronises the host)."""
    latents = batch_latents(family, bundle, batch, device)
    with autocast or nullcontext():
        cond = text_conditioning(family, bundle, batch["captions"], options)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            options.min_timestep, options.max_timestep, (latents.shape[0],), device=device, dtype=torch.long
        )
        noisy, target = family.noisy_input_and_target(bundle, latents, noise, timesteps)
        pred = family.predict(bundle, noisy.to(options.weight_dtype), timesteps, cond)
    per_element = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    masks = batch.get("masks")
    if masks is not None:
        per_element = apply_loss_mask(per_element, masks.to(device, non_blocking=True))
    per_sample = per_element.mean(dim=tuple(range(1, per_element.ndim)))
    weights = batch["loss_weights"].to(device, non_blocking=True)
    return (per_sample * weights).mean()
