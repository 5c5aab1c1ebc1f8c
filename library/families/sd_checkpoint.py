"""Single-file SD 1.x/2.x checkpoints in the original LDM/CompVis layout: read, infer, convert, write.

Reading: tensor names and shapes come from the safetensors header (or a weights-only, memory-mapped
`torch.load` for .ckpt). Architecture is inferred from shapes alone: the text encoder tells SD1 (CLIP-L,
`cond_stage_model.transformer.`) from SD2 (OpenCLIP, `cond_stage_model.model.`); v-prediction leaves no
trace in the weights, so it stays a flag.

SD2 text encoder: OpenCLIP ViT-H has 24 blocks but SD2 conditions on the penultimate one, so (like kohya
and the diffusers SD2 folders) we build a CLIP text model with one block fewer and drop the last block's
weights. Its `last_hidden_state` (after final_layer_norm) is then exactly SD2's conditioning, and a diffusers
SD2 folder and the equivalent single file load to the same modules. Writing adds the last block back as a
copy of the penultimate one plus an identity `text_projection`, so OpenCLIP-layout loaders find every key.

Conversion into diffusers/transformers modules uses diffusers' own `single_file_utils` converters with config
dicts built here (they need no hub access); the reverse mapping (for `save_single_file`) is our own.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError, load_error_detail, refused_pickle

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SUFFIXES = (".safetensors", ".ckpt")
VAE_SCALE = 0.18215
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

Shapes = dict[str, tuple[int, ...]]
StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------- reading


def _check_suffix(path: Path, flag: str) -> None:
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(
            f"{flag}: {path} has extension '{path.suffix}'; expected a .safetensors or .ckpt single file "
            "or a diffusers folder"
        )


def _torch_load(path: Path, flag: str) -> StateDict:
    try:
        try:  # zip-format checkpoints can be memory-mapped, so reading shapes stays cheap
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be mmapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        if refused := refused_pickle(e):
            raise UserError(
                f"{flag}: {path} is not a plain weights pickle ({refused}; refused, as it could run code): "
                "convert it to .safetensors with a tool you trust, or get the .safetensors version"
            ) from None
        raise UserError(
            f"{flag}: {path} cannot be read as a weights-only .ckpt ({load_error_detail(e)}); "
            "convert it to .safetensors with a trusted tool"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{flag}: {path} does not contain a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_shapes(path: Path, flag: str = "--pretrained_model_name_or_path") -> Shapes:
    """Tensor names and shapes without reading the weights (safetensors header / mmapped .ckpt)."""
    _check_suffix(path, flag)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise UserError(
                f"{flag}: {path} is not a readable .safetensors file ({e}); it is truncated or corrupt: "
                "download or save it again"
            ) from None
    return {k: tuple(v.shape) for k, v in _torch_load(path, flag).items()}


def read_state_dict(path: Path, flag: str = "--pretrained_model_name_or_path") -> StateDict:
    _check_suffix(path, flag)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt or truncated files
            raise UserError(
                f"{flag}: {path} is not a readable .safetensors file ({e}); it is truncated or corrupt: "
                "download or save it again"
            ) from None
    return _torch_load(path, flag)


# -------------------------------------------------------------------------------------------- inference


def detect_version(
    shapes: Mapping[str, Any], path: Path, flag: str = "--pretrained_model_name_or_path"
) -> str:
    """ "sd1" or "sd2" from key names; UserError for SDXL, FLUX or anything that is not an SD checkpoint."""
    keys = list(shapes)
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        raise UserError(f"{flag}: {path} is an SDXL checkpoint; use sdxl_train_network.py")
    if any(k.startswith(("double_blocks.", UNET_PREFIX + "double_blocks.")) for k in keys):
        raise UserError(f"{flag}: {path} is a FLUX checkpoint; use flux_train_network.py")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise UserError(
            f"{flag}: {path} has no '{UNET_PREFIX}*' weights, so it is not a full SD 1.x/2.x checkpoint "
            "(a VAE or LoRA file?); pass a full model file or a diffusers folder"
        )
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return "sd1"
    raise UserError(
        f"{flag}: {path} has no text encoder weights ('{CLIP_PREFIX}*' or '{OPENCLIP_PREFIX}*'); "
        "pass a full SD 1.x/2.x checkpoint"
    )


def _indices(shapes: Mapping[str, Any], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def unet_config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]], version: str, *, upcast_attention: bool = False
) -> dict[str, Any]:
    """diffusers UNet2DConditionModel config for LDM UNet keys (prefix `model.diffusion_model.`)."""
    s = {k[len(UNET_PREFIX) :]: v for k, v in shapes.items() if k.startswith(UNET_PREFIX)}
    n_inputs = len(_indices(s, r"input_blocks\.(\d+)\."))
    downsamplers = _indices(s, r"input_blocks\.(\d+)\.0\.op\.weight")
    # Level b's layers sit at input_blocks 1 + b*(L+1) ... ; each level but the last ends in a downsampler.
    per_level = downsamplers[0] if downsamplers else n_inputs
    layers_per_block = per_level - 1
    channels, attention = [], []
    for level in range(len(downsamplers) + 1):
        first = 1 + level * per_level
        channels.append(s[f"input_blocks.{first}.0.in_layers.2.weight"][0])
        attention.append(f"input_blocks.{first}.1.proj_in.weight" in s)
    proj_in = next(v for k, v in s.items() if k.endswith("proj_in.weight"))
    cross_dim = next(v for k, v in s.items() if k.endswith("attn2.to_k.weight"))[1]
    # SD1 uses 8 heads everywhere; SD2 uses 64-dim heads (diffusers calls the head count attention_head_dim).
    heads: int | list[int] = 8 if version == "sd1" else [max(1, c // 64) for c in channels]
    return {
        "sample_size": 64,
        "in_channels": s["input_blocks.0.0.weight"][1],
        "out_channels": s["out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": cross_dim,
        "attention_head_dim": heads,
        "use_linear_projection": len(proj_in) == 2,
        "upcast_attention": upcast_attention,
        "norm_num_groups": 32,
    }


def vae_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str = VAE_PREFIX) -> dict[str, Any]:
    """diffusers AutoencoderKL config for LDM VAE keys under `prefix` ("" for a bare VAE file)."""
    s = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    levels = _indices(s, r"encoder\.down\.(\d+)\.")
    return {
        "in_channels": s["encoder.conv_in.weight"][1],
        "out_channels": s["decoder.conv_out.weight"][0],
        "latent_channels": s["post_quant_conv.weight"][0],
        "block_out_channels": [s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "layers_per_block": len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\.")),
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": VAE_SCALE,
    }


def text_encoder_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], version: str) -> dict[str, Any]:
    """transformers CLIPTextConfig kwargs; SD2 drops OpenCLIP's last block (see module docstring)."""
    if version == "sd1":
        p = CLIP_PREFIX + "text_model."
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        positions = shapes[p + "embeddings.position_embedding.weight"][0]
        layers = len(_indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\."))
        intermediate = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
        act = "quick_gelu"
    else:
        p = OPENCLIP_PREFIX
        vocab, hidden = shapes[p + "token_embedding.weight"]
        positions = shapes[p + "positional_embedding"][0]
        layers = len(_indices(shapes, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")) - 1
        intermediate = shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        act = "gelu"
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "projection_dim": hidden,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": vocab - 1,
    }


# ------------------------------------------------------------------------------------ LDM -> modules


def build_module(
    cls_factory: Any, state_dict: StateDict, what: str, path: Path, dtype: torch.dtype | None
) -> torch.nn.Module:
    """Instantiate without allocating random weights, then adopt the converted tensors (strictly).

    Tensors are cast before adoption (`dtype` None keeps the file's), so no full-model `.to()` copy follows.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = cls_factory()
    expected = module.state_dict()
    # transformers 5 dropped CLIPTextModel's `text_model.` level; converters still emit it.
    if not any(k.startswith("text_model.") for k in expected):
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{path}: the {what} weights do not match the layout expected for this model family "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); is this a standard SD checkpoint?"
        )
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module


def ldm_to_unet(
    sd: StateDict, config: dict[str, Any], path: Path, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    converted = convert_ldm_unet_checkpoint(sd, config)
    return build_module(lambda: UNet2DConditionModel(**config), converted, "UNet", path, dtype)


def ldm_to_vae(
    sd: StateDict,
    config: dict[str, Any],
    path: Path,
    prefix: str = VAE_PREFIX,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    # Strip the prefix ourselves and keep only VAE keys (files may carry loss/EMA extras).
    bare = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    bare = {k: v for k, v in bare.items() if k.startswith(_VAE_ROOTS)}
    converted = convert_ldm_vae_checkpoint(bare, config)
    return build_module(lambda: AutoencoderKL(**config), converted, "VAE", path, dtype)


def ldm_to_text_encoder(
    sd: StateDict, config: dict[str, Any], version: str, path: Path, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    te_config = CLIPTextConfig(**config)
    if version == "sd1":
        converted = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(CLIP_PREFIX)})
        return build_module(lambda: CLIPTextModel(te_config), converted, "text encoder", path, dtype)
    n = config["num_hidden_layers"]
    block = re.compile(re.escape(OPENCLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    # Drop OpenCLIP's last block (kept blocks: 0..n-1) and anything outside the text tower.
    kept = {
        k: v
        for k, v in sd.items()
        if k.startswith(OPENCLIP_PREFIX) and not ((m := block.match(k)) and int(m.group(1)) >= n)
    }
    holder = type("ConfigHolder", (), {"config": te_config})()  # the converter only reads .config
    converted = convert_open_clip_checkpoint(holder, kept, prefix=OPENCLIP_PREFIX)
    converted.pop("text_projection.weight", None)  # CLIPTextModel has no projection head
    return build_module(lambda: CLIPTextModel(te_config), converted, "text encoder", path, dtype)


# ------------------------------------------------------------------------------------ modules -> LDM

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's size/pooled-text embedding (absent from SD 1.x/2.x UNets)
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_TO_LDM[head]}.{tail}"


def _unet_block_key(kind: str, b: int, part: str, j: int, rest: str, per: int, up_attn: set[int]) -> str:
    """One down/up block entry -> LDM name. Level b's layers are input_blocks 1+b*per+j / output_blocks b*per+j."""
    if kind == "down_blocks":
        if part == "downsamplers":
            return f"input_blocks.{(b + 1) * per}.0.op.{rest.removeprefix('conv.')}"
        slot = "0." + _resnet(rest) if part == "resnets" else "1." + rest
        return f"input_blocks.{1 + b * per + j}.{slot}"
    if part == "upsamplers":  # the upsampler follows the block's attention when there is one
        return f"output_blocks.{b * per + per - 1}.{2 if b in up_attn else 1}.{rest}"
    slot = "0." + _resnet(rest) if part == "resnets" else "1." + rest
    return f"output_blocks.{b * per + j}.{slot}"


_UNET_BLOCK = re.compile(
    r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)"
)


def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """One diffusers UNet parameter (or module) path -> its LDM/SGM name, e.g.
    `down_blocks.1.attentions.0.proj_in.weight` -> `input_blocks.4.1.proj_in.weight` (layers_per_block 2)."""
    per = layers_per_block + 1
    head, _, param = key.rpartition(".")
    if head in _UNET_TOP:
        return f"{_UNET_TOP[head]}.{param}"
    if m := _UNET_BLOCK.match(key):
        kind, b, part, j, rest = m.groups()
        return _unet_block_key(kind, int(b), part, int(j), rest, per, up_blocks_with_attention)
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        is_resnet, k, rest = m.group(1) == "resnets", int(m.group(2)), m.group(3)
        return f"middle_block.{2 * k}.{_resnet(rest)}" if is_resnet else f"middle_block.1.{rest}"
    raise ValueError(f"unexpected UNet key {key}")


def unet_to_ldm(sd: Mapping[str, torch.Tensor], layers_per_block: int) -> StateDict:
    """diffusers UNet state dict -> LDM keys (without the `model.diffusion_model.` prefix)."""
    up_attn = set(_indices(sd, r"up_blocks\.(\d+)\.attentions\."))
    return {unet_key_to_ldm(key, layers_per_block, up_attn): value for key, value in sd.items()}


# diffusers VAE attention names (current and pre-0.14 ones) -> LDM's.
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTN.update({"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"})
_VAE_BLOCK = re.compile(
    r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)"
)
_VAE_MID_RESNET = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)")
_VAE_MID_ATTN = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)")


def vae_to_ldm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers AutoencoderKL state dict -> LDM keys (without the `first_stage_model.` prefix)."""
    n_up = len(_indices(sd, r"decoder\.up_blocks\.(\d+)\."))
    out: StateDict = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := _VAE_BLOCK.match(key):
            side, direction, i, part, j, rest = m.groups()
            # LDM numbers decoder levels bottom-up, diffusers top-down.
            level = int(i) if direction == "down" else n_up - 1 - int(i)
            if part == "resnets":
                new = f"{side}.{direction}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{side}.{direction}.{level}.{direction}sample.{rest}"
        elif m := _VAE_MID_RESNET.match(key):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        elif (m := _VAE_MID_ATTN.match(key)) and m.group(2) in _VAE_ATTN:
            new = f"{m.group(1)}.mid.attn_1.{_VAE_ATTN[m.group(2)]}.{m.group(3)}"
            if value.ndim == 2:  # LDM's VAE attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out[new] = value
    return out


def clip_to_ldm(sd: Mapping[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> StateDict:
    """CLIP-L CLIPTextModel -> `<prefix>text_model.*` (transformers 4 and 5 layouts)."""
    return {
        prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v
        for k, v in sd.items()
        if not k.endswith("position_ids")
    }


_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_to_ldm(
    sd: Mapping[str, torch.Tensor], prefix: str = OPENCLIP_PREFIX, *, sd2_extra_block: bool = True
) -> StateDict:
    """CLIP text model -> OpenCLIP layout under `prefix`.

    SD2 (`sd2_extra_block`): n layers are written as n+1 blocks plus an identity projection (see the module
    docstring). SDXL's bigG keeps every block and has a real projection (`text_projection.weight`, stored
    transposed as OpenCLIP multiplies `x @ text_projection`)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    p = prefix
    hidden = sd["final_layer_norm.weight"].shape[0]
    projection = sd.get("text_projection.weight")
    out: StateDict = {
        p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["final_layer_norm.weight"],
        p + "ln_final.bias": sd["final_layer_norm.bias"],
        p + "text_projection": (
            projection.T
            if projection is not None
            else torch.eye(hidden, dtype=sd["final_layer_norm.weight"].dtype)
        ),
        p + "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    layers = _indices(sd, r"encoder\.layers\.(\d+)\.")
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):  # OpenCLIP fuses q, k, v into one in_proj
            qkv = [sd[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
        for ours, theirs in _OPENCLIP_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{theirs}.{kind}"] = sd[f"{src}{ours}.{kind}"]
    if not sd2_extra_block:
        return out
    last, extra = f"{p}transformer.resblocks.{layers[-1]}.", f"{p}transformer.resblocks.{layers[-1] + 1}."
    out.update({k.replace(last, extra): v.clone() for k, v in list(out.items()) if k.startswith(last)})
    return out


def save_single_file(components: Mapping[str, torch.nn.Module], path: Path, version: str) -> Path:
    """Write {"unet", "vae", "text_encoder"} as one LDM-layout checkpoint (.safetensors, or .ckpt via torch.save)."""
    if version not in ("sd1", "sd2"):
        raise ValueError(f"version must be 'sd1' or 'sd2', got {version!r}")
    _check_suffix(path, "save_single_file")
    unet = components["unet"]
    state: StateDict = {}
    for k, v in unet_to_ldm(unet.state_dict(), unet.config["layers_per_block"]).items():
        state[UNET_PREFIX + k] = v
    for k, v in vae_to_ldm(components["vae"].state_dict()).items():
        state[VAE_PREFIX + k] = v
    te = components["text_encoder"].state_dict()
    state.update(clip_to_ldm(te) if version == "sd1" else open_clip_to_ldm(te))
    return write_state_dict(state, path)


def write_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Save a checkpoint state dict as .safetensors, or as a .ckpt ({"state_dict": ...}) via torch.save."""
    _check_suffix(path, "save_single_file")
    # safetensors refuses shared or non-contiguous storage; a private contiguous copy is cheap for our sizes.
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state}, path)
    return path
