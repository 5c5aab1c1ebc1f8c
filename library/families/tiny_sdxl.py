"""Tiny randomly initialised SDXL components (tests, quickstart-style runs, benchmarks) and the real config.

The tiny model keeps SDXL's topology: 3 levels (no attention in the first), 2 resnets per down level,
64-dim heads, linear proj_in, `text_time` size conditioning, CLIP-L-style text encoder 1 and an
OpenCLIP-bigG-style text encoder 2 with a projection head whose width differs from its hidden size (so a
transposed projection cannot go unnoticed). SGM key names and kohya LoRA names therefore come out as on
the real model (`input_blocks_4_1_...`, `output_blocks_2_2_conv`, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.families.tiny import (
    TinyModelFiles,
    TinySingleFile,
    load_tokenizer,
    scheduler_config,
    vae_config,
    write_tiny_clip_tokenizer,
)

TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION = 64, 128, 96
TIME_EMBED_DIM = 8

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the weights).
REAL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}


def unet_config(
    channels: tuple[int, int, int] = (32, 64, 64), layers: tuple[int, int, int] = (1, 1, 2)
) -> dict:
    """SDXL topology at reduced width (`channels`) and depth (`layers` transformer blocks per level)."""
    return {
        **REAL_UNET_CONFIG,
        "sample_size": 16,
        "block_out_channels": list(channels),
        "transformer_layers_per_block": list(layers),
        "attention_head_dim": [max(1, c // 64) for c in channels],
        "cross_attention_dim": TE1_HIDDEN + TE2_HIDDEN,
        "addition_time_embed_dim": TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": TE2_PROJECTION + 6 * TIME_EMBED_DIM,
    }


def text_encoder_configs(vocab_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    common = {
        "vocab_size": vocab_size,
        "num_hidden_layers": 3,
        "max_position_embeddings": 77,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
    }
    te1 = {
        **common,
        "hidden_size": TE1_HIDDEN,
        "intermediate_size": TE1_HIDDEN * 4,
        "num_attention_heads": TE1_HIDDEN // 64,
        "hidden_act": "quick_gelu",
        "projection_dim": TE1_HIDDEN,
        "pad_token_id": vocab_size - 1,
    }
    te2 = {
        **common,
        "hidden_size": TE2_HIDDEN,
        "intermediate_size": TE2_HIDDEN * 4,
        "num_attention_heads": TE2_HIDDEN // 64,
        "hidden_act": "gelu",
        "projection_dim": TE2_PROJECTION,
        "pad_token_id": 0,
    }
    return te1, te2


@dataclass
class TinySDXL:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any


def build_tiny_sdxl(seed: int = 0, tokenizer_dir: Path | None = None) -> TinySDXL:
    """Random tiny SDXL; tokenizers are written to `tokenizer_dir` and `<tokenizer_dir>_2` (temp when None)."""
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok_dir = tokenizer_dir or Path(tempfile.mkdtemp(prefix="tiny_sdxl_tokenizer_"))
    tok2_dir = tok_dir.with_name(tok_dir.name + "_2")
    write_tiny_clip_tokenizer(tok_dir)
    write_tiny_clip_tokenizer(tok2_dir, pad_token="!")  # as laion's bigG tokenizer in SDXL repositories
    tokenizer, tokenizer_2 = load_tokenizer(tok_dir), load_tokenizer(tok2_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config())
    vae = AutoencoderKL(**{**vae_config(), "scaling_factor": 0.13025})
    te1_config, te2_config = text_encoder_configs(len(tokenizer))
    te1 = CLIPTextModel(CLIPTextConfig(**te1_config))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_config))
    config = {k: v for k, v in scheduler_config("sd1").items() if k != "clip_sample"}
    scheduler = EulerDiscreteScheduler(**config, timestep_spacing="leading")
    return TinySDXL(unet.eval(), vae.eval(), te1.eval(), te2.eval(), tokenizer, tokenizer_2, scheduler)


def save_diffusers_folder(model: TinySDXL, folder: Path) -> Path:
    """Save in the layout of stabilityai/stable-diffusion-xl-base-1.0."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        getattr(model, name).save_pretrained(folder / name)
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_tiny_sdxl(out: Path, fmt: str = "diffusers", seed: int = 0) -> TinyModelFiles:
    """Like `tiny.write_tiny_model` for SDXL: a diffusers folder and/or a Stability-layout single file.

    Tokenizers: `<out>/tokenizer` and `<out>/tokenizer_2` with the folder, else `<stem>_tokenizer/` and
    `<stem>_tokenizer_2/` next to the file (pass them as --tokenizer_path / --tokenizer_2_path)."""
    from library.families.sdxl_checkpoint import save_single_file

    if fmt not in ("diffusers", "single_file", "both"):
        raise ValueError(f"fmt must be diffusers, single_file or both, got {fmt!r}")
    out = Path(out)
    is_file = out.suffix.lower() in (".safetensors", ".ckpt")
    base = out.with_suffix("") if is_file else out
    file_path = out if is_file else out.with_name(out.name + ".safetensors")
    want_folder = fmt in ("diffusers", "both")
    tok_dir = base / "tokenizer" if want_folder else base.with_name(base.name + "_tokenizer")
    model = build_tiny_sdxl(seed=seed, tokenizer_dir=tok_dir)
    # Inside the folder, build_tiny_sdxl's "<tokenizer dir>_2" is already the folder's tokenizer_2/.
    folder = save_diffusers_folder(model, base) if want_folder else None
    single = None
    if fmt in ("single_file", "both"):
        components = {
            "unet": model.unet,
            "vae": model.vae,
            "text_encoder": model.text_encoder,
            "text_encoder_2": model.text_encoder_2,
        }
        single = TinySingleFile(save_single_file(components, file_path), tok_dir)
    return TinyModelFiles(folder, single)
