"""Sample images for SD 1.x / 2.x with diffusers' StableDiffusionPipeline over the training components.

The LoRA is already active through hooks on the UNet and text encoder, so the pipeline needs nothing extra.
Prompts are encoded with the family's own encoder (clip skip and long prompts exactly as in training); the
pipeline runs the denoising loop and returns latents, which are decoded here in the VAE's own dtype (with
--no_half_vae the VAE is float32 while the UNet is half).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from library.families.base import ModelBundle


def sample_sd(
    bundle: ModelBundle,
    encode: Callable[[list[str]], torch.Tensor],
    prompts: list[Any],
    make_scheduler: Callable[[str], Any],
    device: torch.device,
) -> list[Any]:
    """One PIL image per prompt (fields of `SamplePrompt`); the seeded generator lives on the CPU, so an
    image does not depend on the device it was made on."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    images = []
    vae = bundle.vae
    vae_dtype = next(vae.parameters()).dtype
    for prompt in prompts:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=bundle.text_encoders[0],
            tokenizer=bundle.tokenizers[0],
            unet=bundle.unet,
            scheduler=make_scheduler(prompt.sampler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            cond = encode([prompt.prompt])
            uncond = encode([prompt.negative_prompt])
            latents = pipe(
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                height=prompt.height,
                width=prompt.width,
                num_inference_steps=prompt.steps,
                guidance_scale=prompt.scale,
                generator=torch.Generator("cpu").manual_seed(prompt.seed),
                output_type="latent",
            ).images
            pixels = vae.decode(latents.to(device, vae_dtype) / bundle.vae_scale + bundle.vae_shift).sample
        del pipe  # holds references to every component; nothing may outlive the call
        array = ((pixels[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        images.append(Image.fromarray(array.permute(1, 2, 0).cpu().numpy()))
    return images
