"""Single-file SDXL checkpoints in Stability's layout (the `.safetensors` users download): infer, convert, write.

Layout: `model.diffusion_model.*` (UNet, SGM block names), `first_stage_model.*` (VAE),
`conditioner.embedders.0.transformer.text_model.*` (CLIP-L, transformers layout) and
`conditioner.embedders.1.model.*` (OpenCLIP bigG: fused qkv, `text_projection` stored as [hidden, proj]).
Every config is inferred from tensor shapes; diffusers' own converters do the renaming (no hub access).
Derivatives (Pony, Illustrious, NoobAI, ...) are SDXL checkpoints with other weights, so nothing changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.families import sd_checkpoint as ckpt

UNET_PREFIX = ckpt.UNET_PREFIX
VAE_PREFIX = ckpt.VAE_PREFIX
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_SCALE = 0.13025

Shapes = Mapping[str, tuple[int, ...]]


def is_sdxl(shapes: Shapes) -> bool:
    return any(k.startswith(TE2_PREFIX) for k in shapes)


def check_layout(shapes: Shapes, path: Path, flag: str) -> None:
    """UserError unless `shapes` hold a full SDXL base checkpoint (UNet, VAE, both text encoders)."""
    keys = list(shapes)
    if any(k.startswith(("double_blocks.", UNET_PREFIX + "double_blocks.")) for k in keys):
        raise UserError(f"{flag}: {path} is a FLUX checkpoint; use flux_train_network.py")
    if not is_sdxl(shapes):
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            raise UserError(
                f"{flag}: {path} is an SDXL refiner (one OpenCLIP text encoder); only SDXL base models and "
                "their derivatives can be trained"
            )
        if any(k.startswith(UNET_PREFIX) for k in keys):
            raise UserError(f"{flag}: {path} is an SD 1.x/2.x checkpoint; use train_network.py")
        raise UserError(
            f"{flag}: {path} has no '{UNET_PREFIX}*' or '{TE2_PREFIX}*' weights, so it is not a full SDXL "
            "checkpoint (a VAE or LoRA file?); pass a full model file or a diffusers folder"
        )
    missing = [
        what
        for prefix, what in (
            (UNET_PREFIX, "UNet"),
            (VAE_PREFIX, "VAE"),
            (TE1_PREFIX, "text encoder 1 (CLIP-L)"),
        )
        if not any(k.startswith(prefix) for k in keys)
    ]
    if missing:
        raise UserError(
            f"{flag}: {path} has no {', '.join(missing)} weights; pass a full SDXL checkpoint (or a VAE-less "
            "file together with --vae)"
        )


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def text_encoder_configs(shapes: Shapes) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers CLIPTextConfig kwargs for CLIP-L and for bigG (with projection, every block kept)."""
    te1 = ckpt.text_encoder_config_from_shapes(
        {
            k.replace(TE1_PREFIX, ckpt.CLIP_PREFIX, 1): v
            for k, v in shapes.items()
            if k.startswith(TE1_PREFIX)
        },
        "sd1",
    )
    p = TE2_PREFIX
    vocab, hidden = shapes[p + "token_embedding.weight"]
    te2 = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0],
        "num_hidden_layers": len(_indices(shapes, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")),
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": shapes[p + "positional_embedding"][0],
        "hidden_act": "gelu",
        "projection_dim": shapes[p + "text_projection"][1],
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": 0,
    }
    return te1, te2


def unet_config_from_shapes(shapes: Shapes, *, upcast_attention: bool = False) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config of an SGM SDXL UNet (64-dim heads, text_time embedding)."""
    config = ckpt.unet_config_from_shapes(shapes, "sd2", upcast_attention=upcast_attention)
    s = {k[len(UNET_PREFIX) :]: v for k, v in shapes.items() if k.startswith(UNET_PREFIX)}
    per = config["layers_per_block"] + 1
    layers = []
    for level in range(len(config["block_out_channels"])):
        blocks = _indices(s, rf"input_blocks\.{1 + level * per}\.1\.transformer_blocks\.(\d+)\.")
        layers.append(len(blocks) or 1)
    pooled = shapes[TE2_PREFIX + "text_projection"][1] if TE2_PREFIX + "text_projection" in shapes else 1280
    label_in = s["label_emb.0.0.weight"][1]
    return {
        **config,
        "sample_size": 128,
        "transformer_layers_per_block": layers,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": (label_in - pooled) // 6,
        "projection_class_embeddings_input_dim": label_in,
    }


def vae_config_from_shapes(shapes: Shapes, prefix: str = VAE_PREFIX) -> dict[str, Any]:
    return {**ckpt.vae_config_from_shapes(shapes, prefix), "sample_size": 1024, "scaling_factor": VAE_SCALE}


def load_components(
    path: Path, dtype: torch.dtype, flag: str = "--pretrained_model_name_or_path"
) -> tuple[torch.nn.Module, ...]:
    """(unet, vae or None, text_encoder_1, text_encoder_2) built from one Stability-layout file."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = ckpt.read_state_dict(path, flag)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    check_layout(shapes, path, flag)
    unet = ckpt.ldm_to_unet(sd, unet_config_from_shapes(shapes), path, dtype=dtype)
    vae = None
    if any(k.startswith(VAE_PREFIX) for k in sd):
        vae = ckpt.ldm_to_vae(sd, vae_config_from_shapes(shapes), path, dtype=torch.float32)
    te1_config, te2_config = (CLIPTextConfig(**c) for c in text_encoder_configs(shapes))
    te1_sd = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(TE1_PREFIX)})
    te1 = ckpt.build_module(lambda: CLIPTextModel(te1_config), te1_sd, "text encoder 1", path, dtype)
    holder = type("ConfigHolder", (), {"config": te2_config})()  # the converter only reads .config
    te2_sd = convert_open_clip_checkpoint(
        holder, {k: v for k, v in sd.items() if k.startswith(TE2_PREFIX)}, prefix=TE2_PREFIX
    )
    te2 = ckpt.build_module(
        lambda: CLIPTextModelWithProjection(te2_config), te2_sd, "text encoder 2", path, dtype
    )
    return unet, vae, te1, te2


def save_single_file(components: Mapping[str, torch.nn.Module], path: Path) -> Path:
    """Write {"unet", "vae", "text_encoder", "text_encoder_2"} as one Stability-layout SDXL checkpoint."""
    unet = components["unet"]
    state: dict[str, torch.Tensor] = {}
    for k, v in ckpt.unet_to_ldm(unet.state_dict(), unet.config["layers_per_block"]).items():
        state[UNET_PREFIX + k] = v
    for k, v in ckpt.vae_to_ldm(components["vae"].state_dict()).items():
        state[VAE_PREFIX + k] = v
    state.update(ckpt.clip_to_ldm(components["text_encoder"].state_dict(), TE1_PREFIX))
    state.update(
        ckpt.open_clip_to_ldm(components["text_encoder_2"].state_dict(), TE2_PREFIX, sd2_extra_block=False)
    )
    return ckpt.write_state_dict(state, path)
