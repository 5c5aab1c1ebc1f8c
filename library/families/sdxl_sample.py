"""Sample images for SDXL with diffusers' StableDiffusionXLPipeline over the training components.

Prompts are encoded with the family's encoder (as in training, LoRA hooks active); size conditioning is the
plain text-to-image one (original = target = the requested size, crop at 0, 0). Latents are decoded here in
the VAE's own dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from library.families.base import ModelBundle


def sample_sdxl(
    bundle: ModelBundle,
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    prompts: list[Any],
    make_scheduler: Callable[[str], Any],
    device: torch.device,
) -> list[Any]:
    """One PIL image per prompt (fields of `SamplePrompt`); the seeded generator lives on the CPU."""
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    images = []
    vae = bundle.vae
    vae_dtype = next(vae.parameters()).dtype
    te1, te2 = bundle.text_encoders
    for prompt in prompts:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=bundle.tokenizers[0],
            tokenizer_2=bundle.tokenizers[1],
            unet=bundle.unet,
            scheduler=make_scheduler(prompt.sampler),
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        size = (prompt.height, prompt.width)
        with torch.no_grad():
            cond, uncond = encode([prompt.prompt]), encode([prompt.negative_prompt])
            latents = pipe(
                prompt_embeds=torch.cat([cond["hidden_state1"], cond["hidden_state2"]], dim=-1),
                pooled_prompt_embeds=cond["pool2"],
                negative_prompt_embeds=torch.cat([uncond["hidden_state1"], uncond["hidden_state2"]], dim=-1),
                negative_pooled_prompt_embeds=uncond["pool2"],
                height=prompt.height,
                width=prompt.width,
                original_size=size,
                target_size=size,
                crops_coords_top_left=(0, 0),
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
