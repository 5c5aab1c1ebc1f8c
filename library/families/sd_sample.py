"""Sample images for SD 1.x / 2.x (and, through `sample_with_pipeline`, SDXL) with diffusers pipelines over
the training components.

The LoRA is already active through hooks on the UNet and text encoders, so a pipeline needs nothing extra.
Prompts are encoded with the family's own encoder (clip skip and long prompts exactly as in training); the
pipeline runs the denoising loop and returns latents, which are decoded here in the VAE's own dtype (with
--no_half_vae the VAE is float32 while the UNet is half).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from library.families.base import ModelBundle


def sample_with_pipeline(
    bundle: ModelBundle,
    prompts: list[Any],
    device: torch.device,
    make_pipe: Callable[[Any], Any],
    conditioning: Callable[[Any], dict[str, Any]],
    unpack: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
) -> list[Any]:
    """One PIL image per prompt (fields of `SamplePrompt`). `make_pipe(prompt)` builds a pipeline over the
    bundle's components; `conditioning(prompt)` gives its embedding keyword arguments (overriding the
    defaults); `unpack(latents, prompt)` turns what the pipeline returns into [B, C, h, w] latents. The
    seeded generator lives on the CPU, so an image does not depend on the device it was made on."""
    from PIL import Image

    images = []
    vae = bundle.vae
    vae_dtype = next(vae.parameters()).dtype
    for prompt in prompts:
        pipe = make_pipe(prompt)
        pipe.set_progress_bar_config(disable=True)
        kwargs = {
            "height": prompt.height,
            "width": prompt.width,
            "num_inference_steps": prompt.steps,
            "guidance_scale": prompt.scale,
            "generator": torch.Generator("cpu").manual_seed(prompt.seed),
            "output_type": "latent",
        }
        with torch.no_grad():
            latents = pipe(**{**kwargs, **conditioning(prompt)}).images
            if unpack is not None:
                latents = unpack(latents, prompt)
            pixels = vae.decode(latents.to(device, vae_dtype) / bundle.vae_scale + bundle.vae_shift).sample
        del pipe  # holds references to every component; nothing may outlive the call
        array = ((pixels[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        images.append(Image.fromarray(array.permute(1, 2, 0).cpu().numpy()))
    return images


def sample_sd(
    bundle: ModelBundle,
    encode: Callable[[list[str]], torch.Tensor],
    prompts: list[Any],
    make_scheduler: Callable[[str], Any],
    device: torch.device,
) -> list[Any]:
    from diffusers import StableDiffusionPipeline

    def make_pipe(prompt: Any) -> Any:
        return StableDiffusionPipeline(
            vae=bundle.vae,
            text_encoder=bundle.text_encoders[0],
            tokenizer=bundle.tokenizers[0],
            unet=bundle.unet,
            scheduler=make_scheduler(prompt.sampler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def conditioning(prompt: Any) -> dict[str, Any]:
        return {
            "prompt_embeds": encode([prompt.prompt]),
            "negative_prompt_embeds": encode([prompt.negative_prompt]),
        }

    return sample_with_pipeline(bundle, prompts, device, make_pipe, conditioning)
