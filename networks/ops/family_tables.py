"""Every LoRA module name a family's loaders accept, from the real (or tiny test) model built on the meta device.

`family_targets("sdxl")` runs `networks.targets.find_targets` (LoCon containers included) on SDXL base 1.0's
UNet and text encoders instantiated without memory, so the LoRA tools share the trainer's key tables instead
of keeping a copy. The "tiny" size is the test models of library/families/tiny*.py. `detect_family` reads the
family from a file's keys, shapes and metadata.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from networks.targets import FLUX_TABLE, SD_TABLE, SDXL_TABLE, Target, TargetTable, find_targets

FAMILIES = ("sd1", "sd2", "sdxl", "flux")
SIZES = ("real", "tiny")
_VOCAB = 49408

_REAL_SD_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
REAL_SD_UNETS = {
    "sd1": {**_REAL_SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8},
    "sd2": {
        **_REAL_SD_UNET,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
    },
}
# (hidden, layers, heads) of CLIP-L (SD1, SDXL/FLUX TE1), OpenCLIP-H (SD2, 23 layers used) and bigG (SDXL TE2)
_CLIP = {"clip_l": (768, 12, 12), "clip_h": (1024, 23, 16), "clip_g": (1280, 32, 20)}
_T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64}


def _clip(kind: str, projection: bool = False) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden, layers, heads = _CLIP[kind]
    config = CLIPTextConfig(
        vocab_size=_VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(config: dict[str, Any]) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    full = {"vocab_size": 32128, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, **config}
    return T5EncoderModel(T5Config(**full))


def _real_models(family: str) -> tuple[nn.Module, list[nn.Module], TargetTable]:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    if family in REAL_SD_UNETS:
        te = _clip("clip_l" if family == "sd1" else "clip_h")
        return UNet2DConditionModel(**REAL_SD_UNETS[family]), [te], SD_TABLE
    if family == "sdxl":
        from library.families.tiny_sdxl import REAL_UNET_CONFIG

        unet = UNet2DConditionModel(**REAL_UNET_CONFIG)
        return unet, [_clip("clip_l"), _clip("clip_g", projection=True)], SDXL_TABLE
    from library.families.tiny_flux import REAL_TRANSFORMER_CONFIG

    return FluxTransformer2DModel(**REAL_TRANSFORMER_CONFIG), [_clip("clip_l"), _t5(_T5_XXL)], FLUX_TABLE


def _tiny_models(family: str) -> tuple[nn.Module, list[nn.Module], TargetTable]:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family in ("sd1", "sd2"):
        from library.families import tiny

        te = CLIPTextModel(CLIPTextConfig(**tiny.text_encoder_config(family, 300)))
        return UNet2DConditionModel(**tiny.unet_config(family)), [te], SD_TABLE
    if family == "sdxl":
        from library.families import tiny_sdxl

        c1, c2 = tiny_sdxl.text_encoder_configs(300)
        tes = [CLIPTextModel(CLIPTextConfig(**c1)), CLIPTextModelWithProjection(CLIPTextConfig(**c2))]
        return UNet2DConditionModel(**tiny_sdxl.unet_config()), tes, SDXL_TABLE
    from library.families import tiny, tiny_flux

    te = CLIPTextModel(CLIPTextConfig(**tiny.text_encoder_config("sd1", 300)))  # tiny_flux's CLIP-L is this
    return (
        FluxTransformer2DModel(**tiny_flux.transformer_config()),
        [te, _t5(tiny_flux.t5_config(300))],
        FLUX_TABLE,
    )


@functools.lru_cache(maxsize=8)
def family_targets(family: str, size: str = "real") -> tuple[Target, ...]:
    """Every candidate LoRA target of `family` (LoCon convs included) on a meta-device model of `size`."""
    from accelerate import init_empty_weights

    if family not in FAMILIES or size not in SIZES:
        raise ValueError(f"unknown family/size {family}/{size}")
    with init_empty_weights():
        unet, tes, table = (_real_models if size == "real" else _tiny_models)(family)
    return tuple(find_targets(table, unet, tes, include_conv_classes=True))


_ARCH = (
    ("stable-diffusion-xl", "sdxl"),
    ("flux", "flux"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-v1", "sd1"),
)


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    arch = metadata.get("modelspec.architecture", "").lower()
    for fragment, family in _ARCH:
        if arch.startswith(fragment):
            return family
    base = metadata.get("ss_base_model_version", "").lower()
    if base.startswith("sdxl"):
        return "sdxl"
    if base.startswith("flux"):
        return "flux"
    if base.startswith(("sd_v2", "sd_2")) or metadata.get("ss_v2") == "True":
        return "sd2"
    if base.startswith(("sd_v1", "sd_1")) or metadata.get("ss_v2") == "False":
        return "sd1"
    return None


# Evidence in module names, strongest first: FLUX's block / embedder / T5 names (diffusers: `transformer.`),
# then SDXL's (Stability block names, a second CLIP, attention in the first up block), then SD 1.x/2.x.
_KEY_EVIDENCE = (
    ("flux", re.compile(r"^transformer\.|(double|single)_blocks_\d|^lora_te3_|encoder[._]block[._]\d")),
    ("flux", re.compile(r"^lora_unet_(img_in|txt_in|time_in|vector_in|guidance_in)")),
    ("sdxl", re.compile(r"(input_blocks|output_blocks|middle_block)_\d|^lora_te2_|^text_encoder_2\.")),
    ("sdxl", re.compile(r"up_blocks[._]0[._]attentions[._]")),
    ("sd", re.compile(r"^lora_te_|down_blocks[._]0[._]attentions[._]|^lora_unet_|^unet\.|^text_encoder\.")),
)
_LORA_TE1 = re.compile(r"^lora_te1_")  # CLIP-L of SDXL or FLUX: only metadata tells a TE1-only file apart


def _sd_version(state: Mapping[str, torch.Tensor]) -> str:
    """SD 2 projects attention blocks with Linears (2-D proj_in down), SD 1 with 1x1 convs; else CLIP width."""
    for key, value in state.items():
        if re.search(r"proj_in[._](lora_down|lora_A)", key):
            return "sd2" if value.dim() == 2 else "sd1"
    for key, value in state.items():
        if re.search(r"q_proj[._](lora_down|lora_A)", key) and value.shape[-1] in (768, 1024):
            return "sd1" if value.shape[-1] == 768 else "sd2"
    return "sd1"


def family_from_keys(state: Mapping[str, torch.Tensor]) -> str | None:
    keys = list(state)
    for family, rx in _KEY_EVIDENCE:
        if any(rx.search(k) for k in keys):
            return _sd_version(state) if family == "sd" else family
    return "sdxl" if any(_LORA_TE1.search(k) for k in keys) else None


# SD 1.x/2.x evidence that no SDXL file has (the last _KEY_EVIDENCE row also matches SDXL's generic names):
# kohya's single text encoder prefix, attention in the first down block.
_SD_ONLY = re.compile(r"^lora_te_|down_blocks[._]0[._]attentions[._]")


def coarse_family_from_names(keys: Iterable[str]) -> str | None:
    """The family ("sd", "sdxl" or "flux") from module names alone (a safetensors header is enough), decided
    only by names no other family has; None when they do not tell (e.g. only lora_te1_ modules, shared by SDXL
    and FLUX, or a few UNet modules both SD and SDXL have)."""
    keys = list(keys)
    for family, rx in (*_KEY_EVIDENCE[:-1], ("sd", _SD_ONLY)):
        if any(rx.search(k) for k in keys):
            return family
    return None


def detect_family(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[str | None, list[str]]:
    """(family, notes): keys and shapes decide; metadata confirms, or decides when the keys cannot."""
    by_keys, by_meta = family_from_keys(state), family_from_metadata(metadata)
    notes = []
    if by_meta == "flux" and by_keys == "sdxl" and all(_LORA_TE1.search(k) for k in state):
        return "flux", notes
    if by_keys and by_meta and by_keys != by_meta:
        notes.append(f"metadata says {by_meta} but the keys are {by_keys}'s; the keys win")
    return by_keys or by_meta, notes


@functools.lru_cache(maxsize=8)
def family_aliases(family: str, size: str = "real") -> dict[str, Any]:
    """Other spellings of the family's module names (diffusers/PEFT paths), as `--network_weights` reads them."""
    from networks.key_aliases import alias_map

    return alias_map(family_targets(family, size))


def in_features(module: nn.Module) -> int:
    return int(getattr(module, "in_features", getattr(module, "in_channels", 0)))


def best_targets(family: str, widths: Mapping[str, int]) -> tuple[str, dict[str, Target]]:
    """(size, {kohya name: target}) of the table (real or tiny) that knows most module names of the file,
    as kohya names or aliases, then whose modules' input widths fit most `widths` (real on ties).

    `widths`: file module name -> the down weight's input width."""
    best: tuple[tuple[int, int], str, dict[str, Target]] | None = None
    for size in SIZES:
        table = {t.name: t for t in family_targets(family, size)}
        aliases = family_aliases(family, size)
        hits = fits = 0
        for name, width in widths.items():
            found = table.get(name) or aliases.get(name)
            if found is None:
                continue
            hits += 1
            target = table[found] if isinstance(found, str) else table.get(getattr(found, "name", ""), found)
            fits += isinstance(target, Target) and in_features(target.module) == width
        if best is None or (hits, fits) > best[0]:
            best = ((hits, fits), size, table)
    assert best is not None
    return best[1], best[2]
