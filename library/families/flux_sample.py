"""Sample images for FLUX.1 with diffusers' FluxPipeline over the training components.

The FLUX Euler flow schedule with the resolution-dependent shift (dev) or none (schnell), dev's guidance
from the prompt's `--g` (default --guidance_scale 3.5); as in kohya, no classifier-free guidance, so `--l` and
negative prompts have no effect. The pipeline returns packed latents, unpacked and decoded here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from library.families.base import ModelBundle
from library.families.flux_math import unpack
from library.families.sd_sample import sample_with_pipeline


def sample_flux(
    bundle: ModelBundle,
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    prompts: list[Any],
    device: torch.device,
) -> list[Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    dev = bool(bundle.unet.config.guidance_embeds)
    default_guidance = float(bundle.info.details["options"].get("guidance_scale") or 3.5)

    def make_pipe(prompt: Any) -> Any:
        # FLUX.1-dev's scheduler config: the shift follows the image size; schnell runs unshifted.
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=1.0 if not dev else 3.0,
            use_dynamic_shifting=dev,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return FluxPipeline(
            scheduler=scheduler,
            vae=bundle.vae,
            text_encoder=bundle.text_encoders[0],
            tokenizer=bundle.tokenizers[0],
            text_encoder_2=bundle.text_encoders[1],
            tokenizer_2=bundle.tokenizers[1],
            transformer=bundle.unet,
        )

    def conditioning(prompt: Any) -> dict[str, Any]:
        cond = encode([prompt.prompt])
        guidance = prompt.guidance if prompt.guidance is not None else default_guidance
        return {
            "prompt_embeds": cond["t5_out"],
            "pooled_prompt_embeds": cond["l_pooled"],
            "guidance_scale": guidance if dev else 0.0,
        }

    def to_latents(latents: torch.Tensor, prompt: Any) -> torch.Tensor:
        return unpack(latents, prompt.height // 8, prompt.width // 8)

    return sample_with_pipeline(bundle, prompts, device, make_pipe, conditioning, to_latents)
