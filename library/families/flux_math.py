"""FLUX.1's token layout: 2x2 latent packing, position ids, guidance, the transformer call."""

from __future__ import annotations

from typing import Any

import torch

from library.families.base import ModelBundle


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch one token (diffusers' and BFL's order)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack` for a latent of `height` x `width`."""
    b, _, features = tokens.shape
    c = features // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3] ids (0, row, col) of the packed latent tokens."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.view(-1, 3)


def _ids(
    bundle: ModelBundle, height: int, width: int, text_len: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Image and text ids for this latent size, built once per size and device (no per-step allocation)."""
    key = ("flux_ids", height, width, text_len, str(device))
    hit = bundle.cache.get(key)
    if hit is None:
        hit = (image_ids(height, width, device, torch.float32), torch.zeros(text_len, 3, device=device))
        bundle.cache[key] = hit
    return hit


def attention_mask(t5_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """[B, 1, 1, L_txt + L_img] boolean key mask: T5 padding hidden from every query, image tokens visible."""
    text = t5_mask.to(torch.bool)
    image = torch.ones(text.shape[0], image_tokens, dtype=torch.bool, device=text.device)
    return torch.cat([text, image], dim=1)[:, None, None, :]


def packed_forward(
    bundle: ModelBundle,
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict[str, torch.Tensor],
    *,
    guidance_scale: float,
    masked: bool,
) -> torch.Tensor:
    """Transformer velocity prediction [B, C, H, W] for noisy latents at `sigmas` [B]."""
    transformer = bundle.unet
    b, _, h, w = noisy.shape
    # The first wide float parameter: fp8 / int8 base weights (library/memory) are storage, not an input dtype.
    dtype = next(p.dtype for p in transformer.parameters() if p.is_floating_point() and p.dtype.itemsize > 1)
    context = cond["t5_out"]
    img_ids, txt_ids = _ids(bundle, h, w, context.shape[1], noisy.device)
    extra: dict[str, Any] = {}
    if transformer.config.guidance_embeds:
        extra["guidance"] = torch.full((b,), guidance_scale, device=noisy.device, dtype=torch.float32)
    if masked:
        extra["joint_attention_kwargs"] = {
            "attention_mask": attention_mask(cond["t5_attn_mask"], (h // 2) * (w // 2))
        }
    out = transformer(
        hidden_states=pack(noisy).to(dtype),
        encoder_hidden_states=context.to(dtype),
        pooled_projections=cond["l_pooled"].to(dtype),
        timestep=sigmas.to(dtype),
        img_ids=img_ids,
        txt_ids=txt_ids,
        return_dict=False,
        **extra,
    )[0]
    return unpack(out, h, w)
