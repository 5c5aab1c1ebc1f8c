"""Sample images for SDXL with diffusers' StableDiffusionXLPipeline over the training components.

Prompts are encoded with the family's encoder (as in training, LoRA hooks active); size conditioning is the
plain text-to-image one (original = target = the requested size, crop at 0, 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from library.families.base import ModelBundle
from library.families.sd_sample import sample_with_pipeline


def sample_sdxl(
    bundle: ModelBundle,
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    prompts: list[Any],
    make_scheduler: Callable[[str], Any],
    device: torch.device,
) -> list[Any]:
    from diffusers import StableDiffusionXLPipeline

    def make_pipe(prompt: Any) -> Any:
        return StableDiffusionXLPipeline(
            vae=bundle.vae,
            text_encoder=bundle.text_encoders[0],
            text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0],
            tokenizer_2=bundle.tokenizers[1],
            unet=bundle.unet,
            scheduler=make_scheduler(prompt.sampler),
            add_watermarker=False,
        )

    def conditioning(prompt: Any) -> dict[str, Any]:
        cond, uncond = encode([prompt.prompt]), encode([prompt.negative_prompt])
        size = (prompt.height, prompt.width)
        return {
            "prompt_embeds": torch.cat([cond["hidden_state1"], cond["hidden_state2"]], dim=-1),
            "pooled_prompt_embeds": cond["pool2"],
            "negative_prompt_embeds": torch.cat([uncond["hidden_state1"], uncond["hidden_state2"]], dim=-1),
            "negative_pooled_prompt_embeds": uncond["pool2"],
            "original_size": size,
            "target_size": size,
            "crops_coords_top_left": (0, 0),
        }

    return sample_with_pipeline(bundle, prompts, device, make_pipe, conditioning)
