"""Which checkpoint tensor (and which rows of it) each kohya LoRA module changes, for every family and layout.

The module names come from the training key tables (`networks.targets.find_targets` on meta-device models
built from the checkpoint's own shapes or configs), so merge/extract agree with training by construction.
Each target then gets its `Placement`s in the files:
- SD/SDXL single files: the UNet's diffusers path -> LDM/SGM key (`unet_key_to_ldm`); CLIP-L text encoders
  under their prefix; OpenCLIP (SD2, SDXL text encoder 2) fuses q/k/v into `attn.in_proj_weight`, so q_proj is
  its rows [0:h], k_proj [h:2h], v_proj [2h:3h] (SD2's file has one block more than the model kohya trains;
  that block gets no LoRA);
- FLUX BFL transformer files: kohya's names are BFL module names; a fused LoRA's rows are the fused rows;
- diffusers folders: the component's weight file and module path; FLUX's fused LoRA is split over
  to_q/to_k/to_v(/proj_mlp) by slicing its ΔW rows (`src_rows`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.errors import UserError
from networks.ops.st_stream import TensorInfo, open_source
from networks.targets import FLUX_TABLE, SD_TABLE, SDXL_TABLE, Target, TargetKind, find_targets

Rows = tuple[int, int]


@dataclass(frozen=True)
class Placement:
    file: str  # file id: "model" for a single file, else the weight file's path inside the folder / an extra role
    key: str
    rows: Rows | None = None  # rows of the checkpoint tensor (OpenCLIP's fused in_proj), None = all
    src_rows: Rows | None = None  # rows of the module's ΔW (a fused LoRA over split Linears), None = all


@dataclass(frozen=True)
class ModuleSlot:
    name: str
    kind: TargetKind
    shape: tuple[int, ...]  # the module's ΔW shape (fused modules: all parts' rows)
    placements: tuple[Placement, ...]


@dataclass
class CheckpointMap:
    family: str  # sd1, sd2, sdxl, flux
    layout: str  # single_file, diffusers
    root: Path
    files: dict[str, Path]  # file id -> path
    infos: dict[str, dict[str, TensorInfo]]  # file id -> tensor name -> dtype/shape/offsets
    metadata: dict[str, dict[str, str]]
    slots: dict[str, ModuleSlot] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)


Placer = Callable[[Target], list[Placement]]
_TABLES = {"sd1": SD_TABLE, "sd2": SD_TABLE, "sdxl": SDXL_TABLE, "flux": FLUX_TABLE}


def _meta(factory: Callable[[], nn.Module]) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _bare(path: str) -> str:
    return path.removeprefix("text_model.")


def _parts(target: Target) -> tuple[tuple[str, nn.Module], ...]:
    if target.parts:
        return tuple(zip(target.part_paths, target.parts, strict=True))
    return ((target.path, target.module),)


def _delta_shape(target: Target) -> tuple[int, ...]:
    shapes = [tuple(m.weight.shape) for _, m in _parts(target)]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _ldm_unet_placer(unet: nn.Module, file: str, prefix: str) -> Placer:
    from library.families.sd_checkpoint import unet_key_to_ldm

    up_attn = {i for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None) is not None}
    lpb = unet.config["layers_per_block"]
    return lambda t: [Placement(file, prefix + unet_key_to_ldm(f"{t.path}.weight", lpb, up_attn))]


def _clip_placer(file: str, prefix: str) -> Placer:
    return lambda t: [Placement(file, f"{prefix}text_model.{_bare(t.path)}.weight")]


_OPENCLIP_LAYER = re.compile(
    r"encoder\.layers\.(\d+)\.(self_attn\.([qkv])_proj|self_attn\.out_proj|mlp\.fc[12])$"
)
_OPENCLIP_NAMES = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _open_clip_placer(file: str, prefix: str) -> Placer:
    def place(t: Target) -> list[Placement]:
        m = _OPENCLIP_LAYER.match(_bare(t.path))
        if m is None:
            raise ValueError(f"no OpenCLIP tensor for {t.path}")
        block, module, qkv = m.groups()
        base = f"{prefix}transformer.resblocks.{block}."
        if qkv is None:
            return [Placement(file, f"{base}{_OPENCLIP_NAMES[module]}.weight")]
        h = int(t.module.weight.shape[0])
        i = "qkv".index(qkv)
        return [Placement(file, f"{base}attn.in_proj_weight", rows=(i * h, (i + 1) * h))]

    return place


def _bfl_placer(transformer: nn.Module, file: str, prefix: str) -> Placer:
    from library.families.flux_checkpoint import module_map

    pairs = module_map(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))
    bfl = {tuple(parts): name for name, parts in pairs}
    return lambda t: [Placement(file, f"{prefix}{bfl[t.part_paths or (t.path,)]}.weight")]


def _folder_placer(keys: dict[str, str]) -> Placer:
    """`keys`: tensor name -> weight file id of one diffusers component; fused modules are split by rows."""

    def place(t: Target) -> list[Placement]:
        out, row = [], 0
        parts = _parts(t)
        for path, module in parts:
            n = int(module.weight.shape[0])
            candidates = (f"{path}.weight", f"text_model.{_bare(path)}.weight", f"{_bare(path)}.weight")
            key = next((c for c in candidates if c in keys), None)
            if key is None:
                raise ValueError(f"no tensor for {path} in the component's weight files")
            out.append(Placement(keys[key], key, src_rows=(row, row + n) if len(parts) > 1 else None))
            row += n
        return out

    return place


# ------------------------------------------------------------------------------------------ single files


def _single_file(cmap: CheckpointMap, flag: str) -> tuple[nn.Module, list[nn.Module], list[Placer]]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.families import flux_checkpoint as fc
    from library.families import sd_checkpoint as ckpt
    from library.families import sdxl_checkpoint as xl

    path = cmap.files["model"]
    shapes = {k: v.shape for k, v in cmap.infos["model"].items()}
    if fc.is_bfl_transformer(shapes):
        from diffusers import FluxTransformer2DModel

        cmap.family = "flux"
        config = fc.transformer_config_from_shapes(shapes)
        transformer = _meta(lambda: FluxTransformer2DModel(**config))
        prefix = fc.BFL_PREFIX if any(k.startswith(fc.BFL_PREFIX) for k in shapes) else ""
        return transformer, [], [_bfl_placer(transformer, "model", prefix)]
    if xl.is_sdxl(shapes):
        from diffusers import UNet2DConditionModel

        xl.check_layout(shapes, path, flag)
        cmap.family = "sdxl"
        unet_config = xl.unet_config_from_shapes(shapes)
        te1_config, te2_config = (CLIPTextConfig(**c) for c in xl.text_encoder_configs(shapes))
        unet = _meta(lambda: UNet2DConditionModel(**unet_config))
        tes = [
            _meta(lambda: CLIPTextModel(te1_config)),
            _meta(lambda: CLIPTextModelWithProjection(te2_config)),
        ]
        placers = [
            _ldm_unet_placer(unet, "model", xl.UNET_PREFIX),
            _clip_placer("model", xl.TE1_PREFIX),
            _open_clip_placer("model", xl.TE2_PREFIX),
        ]
        return unet, tes, placers
    from diffusers import UNet2DConditionModel

    version = ckpt.detect_version(shapes, path, flag)
    cmap.family = version
    unet_config = ckpt.unet_config_from_shapes(shapes, version)
    te_config = CLIPTextConfig(**ckpt.text_encoder_config_from_shapes(shapes, version))
    unet = _meta(lambda: UNet2DConditionModel(**unet_config))
    te = _meta(lambda: CLIPTextModel(te_config))
    te_placer = (
        _clip_placer("model", ckpt.CLIP_PREFIX)
        if version == "sd1"
        else _open_clip_placer("model", ckpt.OPENCLIP_PREFIX)
    )
    return unet, [te], [_ldm_unet_placer(unet, "model", ckpt.UNET_PREFIX), te_placer]


def _flux_text_files(
    cmap: CheckpointMap, extras: dict[str, Path | None], tes: list[nn.Module], placers: list[Placer]
) -> None:
    """kohya's --clip_l / --t5xxl files (transformers layout) next to a BFL transformer."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from library.families import sd_checkpoint as ckpt
    from library.families.flux_checkpoint import t5_config_from_shapes

    for role, flag in (("clip_l", "--clip_l"), ("t5xxl", "--t5xxl")):
        path = extras.get(role)
        if path is None:
            return  # T5 without CLIP-L cannot be indexed as text encoder 2
        _add_file(cmap, role, path, flag)
        shapes = {k: v.shape for k, v in cmap.infos[role].items()}
        if role == "clip_l":
            # Files from transformers 5 may lack the `text_model.` level.
            level = "" if any(k.startswith("text_model.") for k in shapes) else "text_model."
            prefixed = {ckpt.CLIP_PREFIX + level + k: v for k, v in shapes.items()}
            config = CLIPTextConfig(**ckpt.text_encoder_config_from_shapes(prefixed, "sd1"))
            tes.append(_meta(lambda c=config: CLIPTextModel(c)))
            placers.append(
                _clip_placer(role, "")
                if not level
                else lambda t, r=role: [Placement(r, f"{_bare(t.path)}.weight")]
            )
        else:
            t5_config = T5Config(**t5_config_from_shapes(shapes, path, flag))
            tes.append(_meta(lambda c=t5_config: T5EncoderModel(c)))
            placers.append(lambda t, r=role: [Placement(r, f"{t.path}.weight")])


# ------------------------------------------------------------------------------------------ diffusers folders


def _component_keys(cmap: CheckpointMap, folder: Path, component: str, flag: str) -> dict[str, str]:
    """tensor name -> file id for one component folder (single or sharded .safetensors)."""
    directory = folder / component
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {found[0]}: convert it to .safetensors)" if found else ""
        raise UserError(f"{flag}: {directory} has no .safetensors weights{hint}")
    keys: dict[str, str] = {}
    for file in files:
        file_id = f"{component}/{file.name}"
        _add_file(cmap, file_id, file, flag)
        keys.update(dict.fromkeys(cmap.infos[file_id], file_id))
    return keys


def _read_config(path: Path, flag: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{flag}: cannot read {path} ({e}); is this a complete diffusers folder?") from None


def _folder(cmap: CheckpointMap, flag: str) -> tuple[nn.Module, list[nn.Module], list[Placer]]:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    folder = cmap.root
    if (folder / "transformer" / "config.json").is_file():
        cmap.family = "flux"
        config = _read_config(folder / "transformer" / "config.json", flag)
        unet = _meta(lambda: FluxTransformer2DModel.from_config(config))
        unet_keys = _component_keys(cmap, folder, "transformer", flag)
        te_classes = [
            ("text_encoder", CLIPTextConfig, CLIPTextModel),
            ("text_encoder_2", T5Config, T5EncoderModel),
        ]
    elif (folder / "unet" / "config.json").is_file():
        config = _read_config(folder / "unet" / "config.json", flag)
        unet = _meta(lambda: UNet2DConditionModel.from_config(config))
        unet_keys = _component_keys(cmap, folder, "unet", flag)
        te_classes = [("text_encoder", CLIPTextConfig, CLIPTextModel)]
        if config.get("addition_embed_type") == "text_time":
            cmap.family = "sdxl"
            te_classes.append(("text_encoder_2", CLIPTextConfig, CLIPTextModelWithProjection))
        else:
            te_config = _read_config(folder / "text_encoder" / "config.json", flag)
            cmap.family = "sd1" if te_config.get("hidden_act") == "quick_gelu" else "sd2"
    else:
        raise UserError(
            f"{flag}: {folder} is neither a diffusers SD/SDXL folder (unet/config.json) nor a FLUX folder "
            "(transformer/config.json)"
        )
    tes: list[nn.Module] = []
    placers = [_folder_placer(unet_keys)]
    for component, config_cls, model_cls in te_classes:
        if not (folder / component / "config.json").is_file():
            break
        te_config = config_cls.from_pretrained(folder / component)
        tes.append(_meta(lambda m=model_cls, c=te_config: m(c)))
        placers.append(_folder_placer(_component_keys(cmap, folder, component, flag)))
    return unet, tes, placers


def _add_file(cmap: CheckpointMap, file_id: str, path: Path, flag: str) -> None:
    with open_source(path, flag) as source:
        cmap.files[file_id] = path
        cmap.infos[file_id] = dict(source.infos)
        cmap.metadata[file_id] = dict(source.metadata)


def map_checkpoint(
    path: Path,
    flag: str,
    *,
    clip_l: Path | None = None,
    t5xxl: Path | None = None,
) -> CheckpointMap:
    """Family, files and every LoRA module's placements of a single-file checkpoint or diffusers folder.

    `clip_l` / `t5xxl`: FLUX's separate text-encoder files (kohya's flags) next to a BFL transformer."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag}: {path} does not exist; check the path")
    cmap = CheckpointMap("", "diffusers" if path.is_dir() else "single_file", path, {}, {}, {})
    if path.is_dir():
        unet, tes, placers = _folder(cmap, flag)
    else:
        _add_file(cmap, "model", path, flag)
        unet, tes, placers = _single_file(cmap, flag)
    if (clip_l or t5xxl) and (cmap.family != "flux" or cmap.layout != "single_file"):
        raise UserError(f"--clip_l/--t5xxl: only for a FLUX BFL transformer file; {path} is {cmap.family}")
    if t5xxl and not clip_l:
        raise UserError("--t5xxl: needs --clip_l too (a FLUX LoRA's lora_te3_ keys follow lora_te1_ ones)")
    if cmap.family == "flux" and cmap.layout == "single_file":
        _flux_text_files(cmap, {"clip_l": clip_l, "t5xxl": t5xxl}, tes, placers)
    _fill_slots(cmap, unet, tes, placers)
    return cmap


def _fill_slots(
    cmap: CheckpointMap, unet: nn.Module, tes: Sequence[nn.Module], placers: list[Placer]
) -> None:
    targets = find_targets(_TABLES[cmap.family], unet, tes, include_conv_classes=True)
    for target in targets:
        placer = placers[0] if target.component == "unet" else placers[1 + target.te_index]
        placements = tuple(placer(target))
        for p in placements:
            if p.key not in cmap.infos[p.file]:
                raise UserError(
                    f"{cmap.root}: tensor {p.key} (for LoRA module {target.name}) is missing from "
                    f"{cmap.files[p.file]}; is this a complete {cmap.family} checkpoint?"
                )
        cmap.slots[target.name] = ModuleSlot(target.name, target.kind, _delta_shape(target), placements)
    cmap.targets = targets


def delta_shape(down: torch.Tensor, up: torch.Tensor) -> tuple[int, ...]:
    """ΔW shape of a LoRA's factors (Linear: [out, in]; Conv: [out, in, kh, kw])."""
    return (int(up.shape[0]), *(int(s) for s in down.shape[1:]))
