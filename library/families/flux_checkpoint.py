"""FLUX.1 files: Black Forest Labs' transformer layout <-> diffusers' FluxTransformer2DModel, configs from shapes.

The BFL layout (flux1-dev.safetensors, optionally under `model.diffusion_model.`) fuses what diffusers
splits: a double block's `img_attn.qkv` is diffusers' to_q/to_k/to_v, a single block's `linear1` is
to_q/to_k/to_v/proj_mlp. One table (`_block_map`) drives both directions, sized from the tensors themselves,
so pruned or narrow models convert too (diffusers' own converter assumes the 3072-wide model).
Also here: the 16-channel autoencoder (`ae.safetensors`, LDM names without quant convs) and configs for
separate CLIP-L / T5-XXL files (transformers layout, as ComfyUI and kohya distribute them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError

BFL_PREFIX = "model.diffusion_model."
AE_SCALE, AE_SHIFT = 0.3611, 0.1159

Shapes = Mapping[str, tuple[int, ...]]
StateDict = dict[str, torch.Tensor]

# (BFL module, [diffusers modules]) per double block; several diffusers modules = a fused BFL tensor.
_DOUBLE = [
    ("img_mod.lin", ["norm1.linear"]),
    ("txt_mod.lin", ["norm1_context.linear"]),
    ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    ("img_attn.proj", ["attn.to_out.0"]),
    ("txt_attn.proj", ["attn.to_add_out"]),
    ("img_mlp.0", ["ff.net.0.proj"]),
    ("img_mlp.2", ["ff.net.2"]),
    ("txt_mlp.0", ["ff_context.net.0.proj"]),
    ("txt_mlp.2", ["ff_context.net.2"]),
]
_DOUBLE_NORMS = [
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
]
_SINGLE = [
    ("modulation.lin", ["norm.linear"]),
    ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
    ("linear2", ["proj_out"]),
]
_SINGLE_NORMS = [
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
]
_TOP = [
    ("img_in", ["x_embedder"]),
    ("txt_in", ["context_embedder"]),
    ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"]),
    ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"]),
    ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"]),
    ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"]),
    ("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"]),
    ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"]),
    ("final_layer.linear", ["proj_out"]),
]


def module_map(num_double: int, num_single: int) -> list[tuple[str, list[str]]]:
    """Every (BFL module, [diffusers modules]) pair of a transformer with these block counts."""
    pairs = list(_TOP)
    for i in range(num_double):
        pairs += [
            (f"double_blocks.{i}.{b}", [f"transformer_blocks.{i}.{d}" for d in ds]) for b, ds in _DOUBLE
        ]
    for i in range(num_single):
        pairs += [
            (f"single_blocks.{i}.{b}", [f"single_transformer_blocks.{i}.{d}" for d in ds])
            for b, ds in _SINGLE
        ]
    return pairs


def _norm_pairs(num_double: int, num_single: int) -> list[tuple[str, str]]:
    pairs = [
        (f"double_blocks.{i}.{b}", f"transformer_blocks.{i}.{d}")
        for i in range(num_double)
        for b, d in _DOUBLE_NORMS
    ]
    pairs += [
        (f"single_blocks.{i}.{b}", f"single_transformer_blocks.{i}.{d}")
        for i in range(num_single)
        for b, d in _SINGLE_NORMS
    ]
    return pairs


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """BFL's final adaLN emits (shift, scale), diffusers' (scale, shift)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _counts(keys: Any, double: str, single: str) -> tuple[int, int]:
    def count(prefix: str) -> int:
        rx = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
        return max(found) + 1 if found else 0

    return count(double), count(single)


def strip_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    return {k.removeprefix(BFL_PREFIX): v for k, v in sd.items()}


def bfl_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """BFL transformer state dict (prefix optional) -> FluxTransformer2DModel keys. Fused tensors are split by
    the sizes of the model they come from (attention width from the qkv tensor, MLP width from the rest)."""
    sd = strip_prefix(sd)
    num_double, num_single = _counts(sd, "double_blocks", "single_blocks")
    inner = sd["img_in.weight"].shape[0]
    out: StateDict = {}
    for bfl, parts in module_map(num_double, num_single):
        for kind in ("weight", "bias"):
            key = f"{bfl}.{kind}"
            if key not in sd:
                continue
            tensor = sd[key]
            if len(parts) == 1:
                out[f"{parts[0]}.{kind}"] = tensor
                continue
            sizes = [inner] * 3 + ([tensor.shape[0] - 3 * inner] if len(parts) == 4 else [])
            for name, piece in zip(parts, torch.split(tensor, sizes, dim=0), strict=True):
                out[f"{name}.{kind}"] = piece
    for bfl, ours in _norm_pairs(num_double, num_single):
        out[ours] = sd[bfl]
    out["norm_out.linear.weight"] = _swap_halves(sd["final_layer.adaLN_modulation.1.weight"])
    out["norm_out.linear.bias"] = _swap_halves(sd["final_layer.adaLN_modulation.1.bias"])
    return out


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """FluxTransformer2DModel state dict -> BFL keys (no prefix), fused tensors concatenated."""
    num_double, num_single = _counts(sd, "transformer_blocks", "single_transformer_blocks")
    out: StateDict = {}
    for bfl, parts in module_map(num_double, num_single):
        for kind in ("weight", "bias"):
            if f"{parts[0]}.{kind}" in sd:
                out[f"{bfl}.{kind}"] = torch.cat([sd[f"{p}.{kind}"] for p in parts], dim=0)
    for bfl, ours in _norm_pairs(num_double, num_single):
        out[bfl] = sd[ours]
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(sd["norm_out.linear.weight"])
    out["final_layer.adaLN_modulation.1.bias"] = _swap_halves(sd["norm_out.linear.bias"])
    return out


def is_bfl_transformer(shapes: Shapes) -> bool:
    keys = strip_prefix(shapes)
    return "img_in.weight" in keys and any(k.startswith("double_blocks.") for k in keys)


def transformer_config_from_shapes(shapes: Shapes) -> dict[str, Any]:
    """FluxTransformer2DModel config of a BFL checkpoint: block counts (pruned models), widths, head size,
    dev (guidance embedder present) or schnell."""
    s = strip_prefix(shapes)
    num_double, num_single = _counts(s, "double_blocks", "single_blocks")
    inner, in_channels = s["img_in.weight"]
    head_dim = (
        s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        if num_double
        else s["single_blocks.0.norm.query_norm.scale"][0]
    )
    # FLUX.1 splits each 128-wide head's rotary dims 16/56/56; narrow test models keep the proportions.
    axes = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": s["final_layer.linear.weight"][0],
        "num_layers": num_double,
        "num_single_layers": num_single,
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": s["txt_in.weight"][1],
        "pooled_projection_dim": s["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in s,
        "axes_dims_rope": list(axes),
    }


def build_transformer(
    sd: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype | None
) -> torch.nn.Module:
    """A FluxTransformer2DModel from a BFL state dict, built on the meta device and given the tensors
    (no second copy of the weights beyond a dtype cast)."""
    from diffusers import FluxTransformer2DModel

    from library.families.sd_checkpoint import build_module

    config = transformer_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()})
    converted = bfl_to_diffusers(sd)
    return build_module(lambda: FluxTransformer2DModel(**config), converted, "FLUX transformer", path, dtype)


# ------------------------------------------------------------------------------------------ autoencoder


def ae_config_from_shapes(shapes: Shapes) -> dict[str, Any]:
    """diffusers AutoencoderKL config of FLUX's autoencoder (LDM names, no quant convs, 16 channels)."""
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "block_out_channels": [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "layers_per_block": len(
            {m.group(1) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        ),
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": AE_SCALE,
        "shift_factor": AE_SHIFT,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
    }


def load_ae(path: Path, flag: str = "--ae") -> torch.nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from library.families import sd_checkpoint as ckpt

    sd = ckpt.read_state_dict(path, flag)
    sd = {k.removeprefix("vae.").removeprefix("first_stage_model."): v for k, v in sd.items()}
    if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
        raise UserError(
            f"{flag}: {path} has no autoencoder weights (expected encoder.*/decoder.* keys); pass FLUX's ae.safetensors"
        )
    config = ae_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()})
    if config["latent_channels"] != 16:
        raise UserError(
            f"{flag}: {path} is a {config['latent_channels']}-channel autoencoder; FLUX.1 needs its 16-channel "
            "ae.safetensors"
        )
    converted = convert_ldm_vae_checkpoint(sd, config)
    return ckpt.build_module(lambda: AutoencoderKL(**config), converted, "autoencoder", path, torch.float32)


def ae_to_ldm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    from library.families.sd_checkpoint import vae_to_ldm

    return vae_to_ldm(sd)


# ------------------------------------------------------------------------------------------ text encoders


def t5_config_from_shapes(shapes: Shapes, path: Path, flag: str = "--t5xxl") -> dict[str, Any]:
    """transformers T5Config kwargs for a T5 encoder file (transformers layout: shared, encoder.block.*)."""
    if "shared.weight" not in shapes and "encoder.embed_tokens.weight" not in shapes:
        raise UserError(
            f"{flag}: {path} is not a T5 encoder (no shared.weight / encoder.block.* keys); pass the "
            "t5xxl_fp16.safetensors (or fp8) file FLUX uses"
        )
    vocab, d_model = shapes.get("shared.weight") or shapes["encoder.embed_tokens.weight"]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    wi = "wi_0" if gated else "wi"
    return {
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        "d_ff": shapes[f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight"][0],
        "num_layers": len(blocks),
        "num_heads": heads,
        "relative_attention_num_buckets": shapes[
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        ][0],
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_encoder_decoder": False,
        "use_cache": False,
    }
