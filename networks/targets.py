"""Which modules a LoRA wraps and what kohya calls them: per-family target tables as data.

A kohya module name is `<prefix>.<module path inside the component>` with every "." replaced by "_"
(e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`). A family is a `TargetTable`: one `TargetRow` per
component (UNet, each text encoder). Adding a family means adding rows and, where the training model's
module paths differ from the names the file format uses (SDXL: diffusers -> SGM block names), a
`rename` function on the row. Nothing here branches on a family name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from library.errors import UserError

Component = Literal["unet", "text_encoder"]
# "linear" and "conv1x1" always get the base rank; "conv" (kernel > 1x1) only exists with LoCon.
TargetKind = Literal["linear", "conv1x1", "conv"]
# (component root, dotted module path inside it) -> dotted path as the LoRA file format spells it.
Rename = Callable[[nn.Module, str], str]
# component root -> [(module path as the file spells it, (model module paths it stands for, in row order))];
# several model paths = one fused module in the file (FLUX's qkv), trained as one LoRA.
Groups = Callable[[nn.Module], list[tuple[str, tuple[str, ...]]]]


def keep_path(root: nn.Module, path: str) -> str:
    return path


def clip_text_path(root: nn.Module, path: str) -> str:
    """kohya names CLIP text-encoder modules `text_model.encoder...` (transformers 4 layout).

    transformers 5 flattened `CLIPTextModel` (no `text_model` child), so its paths start at `encoder.`;
    prepend the old level so keys stay identical to files trained with kohya. `CLIPTextModelWithProjection`
    still has the `text_model` child and passes through unchanged.
    """
    return path if hasattr(root, "text_model") else f"text_model.{path}"


def sgm_unet_path(root: nn.Module, path: str) -> str:
    """kohya names SDXL UNet modules as Stability's SGM code does: diffusers' `down_blocks.1.attentions.0`
    is `input_blocks.4.1`, `up_blocks.0.upsamplers.0.conv` is `output_blocks.2.2.conv`, a resnet's `conv1` is
    `in_layers.2`, and so on (the checkpoint converter's mapping, applied to module paths)."""
    from library.families.sd_checkpoint import unet_key_to_ldm

    up_attn = {i for i, block in enumerate(root.up_blocks) if getattr(block, "attentions", None) is not None}
    name = unet_key_to_ldm(f"{path}.weight", root.config["layers_per_block"], up_attn)
    return name.removesuffix(".weight")


def _is_sdxl_unet(unet: nn.Module) -> bool:
    return (
        getattr(getattr(unet, "config", None), "get", lambda *_: None)("addition_embed_type") == "text_time"
    )


@dataclass(frozen=True)
class TargetRow:
    prefix: str  # e.g. "lora_unet", "lora_te", later "lora_te1"/"lora_te2"
    component: Component
    te_index: int  # which text encoder (ignored for the UNet)
    classes: tuple[str, ...]  # their Linear / 1x1 Conv2d descendants are targets
    conv_classes: tuple[str, ...] = ()  # added with LoCon (conv_dim): 3x3 convs + their Linear/1x1 children
    rename: Rename = keep_path
    groups: Groups | None = None  # when set, the targets are these groups instead of `classes`' children


@dataclass(frozen=True)
class TargetTable:
    name: str
    unet_classes: tuple[str, ...]  # class names of the denoiser this table applies to
    num_text_encoders: int
    rows: tuple[TargetRow, ...]
    accepts: Callable[[nn.Module], bool] = lambda unet: True  # tells apart families sharing a denoiser class
    # (target, LoRAOptions) -> rank: None = the base rank, 0 = no module; None here = base rank for all
    rank_rule: Callable[[Target, Any], int | None] | None = None


@dataclass(frozen=True)
class Target:
    name: str  # kohya module name, e.g. "lora_te_text_model_encoder_layers_0_mlp_fc1"
    module: nn.Module  # the frozen Linear / Conv2d
    component: Component
    te_index: int
    kind: TargetKind
    path: str = ""  # dotted module path inside its component, before any rename (diffusers' name)
    prefix: str = ""  # the row's prefix, e.g. "lora_unet"
    parts: tuple[nn.Module, ...] = ()  # a group's Linears (one fused module in the file), else empty
    part_paths: tuple[str, ...] = ()  # their paths inside the component


_CLIP_TE_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")

_UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")

SD_TABLE = TargetTable(
    name="sd",
    unet_classes=("UNet2DConditionModel",),
    num_text_encoders=1,
    accepts=lambda unet: not _is_sdxl_unet(unet),
    rows=(
        TargetRow(
            prefix="lora_unet",
            component="unet",
            te_index=0,
            classes=("Transformer2DModel",),
            conv_classes=_UNET_CONV_CLASSES,
        ),
        TargetRow(
            prefix="lora_te",
            component="text_encoder",
            te_index=0,
            classes=_CLIP_TE_CLASSES,
            rename=clip_text_path,
        ),
    ),
)

# kohya's SDXL names: SGM block names for the UNet, lora_te1_ (CLIP-L) and lora_te2_ (OpenCLIP bigG).
SDXL_TABLE = TargetTable(
    name="sdxl",
    unet_classes=("UNet2DConditionModel",),
    num_text_encoders=2,
    accepts=_is_sdxl_unet,
    rows=(
        TargetRow(
            prefix="lora_unet",
            component="unet",
            te_index=0,
            classes=("Transformer2DModel",),
            conv_classes=_UNET_CONV_CLASSES,
            rename=sgm_unet_path,
        ),
        TargetRow(
            prefix="lora_te1",
            component="text_encoder",
            te_index=0,
            classes=_CLIP_TE_CLASSES,
            rename=clip_text_path,
        ),
        TargetRow(
            prefix="lora_te2",
            component="text_encoder",
            te_index=1,
            classes=_CLIP_TE_CLASSES,
            rename=clip_text_path,
        ),
    ),
)


def _flux_groups(root: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    from networks.flux_targets import transformer_groups

    return transformer_groups(root)


def _flux_rank(target: Target, options: Any) -> int | None:
    from networks.flux_targets import flux_rank

    return flux_rank(target, options)


# kohya's networks.lora_flux: BFL names for the transformer (qkv / linear1 fused), lora_te1_ (CLIP-L),
# lora_te3_ (T5-XXL, only with train_t5xxl); which modules get which rank is `flux_targets.flux_rank`.
FLUX_TABLE = TargetTable(
    name="flux",
    unet_classes=("FluxTransformer2DModel",),
    num_text_encoders=2,
    rank_rule=_flux_rank,
    rows=(
        TargetRow(prefix="lora_unet", component="unet", te_index=0, classes=(), groups=_flux_groups),
        TargetRow(
            prefix="lora_te1",
            component="text_encoder",
            te_index=0,
            classes=_CLIP_TE_CLASSES,
            rename=clip_text_path,
        ),
        TargetRow(
            prefix="lora_te3",
            component="text_encoder",
            te_index=1,
            classes=("T5Attention", "T5DenseGatedActDense"),
        ),
    ),
)

# A table applies when it accepts the denoiser (class and config) and the text-encoder count fits.
TABLES: tuple[TargetTable, ...] = (SD_TABLE, SDXL_TABLE, FLUX_TABLE)


def select_table(unet: nn.Module | None, text_encoders: Sequence[nn.Module]) -> TargetTable:
    """The table for these models: by denoiser class, then by number of text encoders (0 = TE not given)."""
    unet_class = type(unet).__name__ if unet is not None else None
    for table in TABLES:
        class_ok = unet_class is None or (unet_class in table.unet_classes and table.accepts(unet))
        count_ok = len(text_encoders) in (0, table.num_text_encoders)
        if class_ok and count_ok:
            return table
    known = ", ".join(
        f"{t.name} ({'/'.join(t.unet_classes)} + {t.num_text_encoders} text encoder(s))" for t in TABLES
    )
    raise UserError(
        f"--network_module networks.lora: no LoRA target table for a {unet_class} with "
        f"{len(text_encoders)} text encoder(s); supported: {known}"
    )


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def _kind(module: nn.Module) -> TargetKind | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"
    return None


def find_targets(
    table: TargetTable,
    unet: nn.Module | None,
    text_encoders: Sequence[nn.Module],
    *,
    include_conv_classes: bool,
) -> list[Target]:
    """Every candidate module of the table, in model order (text encoders first, as kohya lists them).

    `include_conv_classes` adds the LoCon container classes; their 3x3 convs come back with kind "conv" and
    the caller decides whether they get a module (conv_dim set, or named in a weights file).
    """
    targets: list[Target] = []
    seen: dict[str, Target] = {}
    te_rows = [r for r in table.rows if r.component == "text_encoder"]
    unet_rows = [r for r in table.rows if r.component == "unet"]
    for row in te_rows + unet_rows:
        if row.component == "unet":
            root = unet
        else:
            root = text_encoders[row.te_index] if row.te_index < len(text_encoders) else None
        if root is None:
            continue
        if row.groups is not None:
            for file_path, paths in row.groups(root):
                parts = tuple(root.get_submodule(p) for p in paths)
                name = kohya_name(row.prefix, file_path)
                targets.append(
                    Target(
                        name,
                        parts[0],
                        row.component,
                        row.te_index,
                        "linear",
                        paths[0],
                        row.prefix,
                        parts,
                        paths,
                    )
                )
            continue
        classes = set(row.classes) | (set(row.conv_classes) if include_conv_classes else set())
        for parent_path, parent in root.named_modules():
            if type(parent).__name__ not in classes:
                continue
            for child_path, child in parent.named_modules():
                kind = _kind(child)
                if kind is None:
                    continue
                path = ".".join(p for p in (parent_path, child_path) if p)
                name = kohya_name(row.prefix, row.rename(root, path))
                if name in seen:
                    # Nested target classes reach the same child twice; one module is enough.
                    if seen[name].module is not child:
                        raise ValueError(f"two different modules map to the LoRA name {name}")
                    continue
                target = Target(name, child, row.component, row.te_index, kind, path, row.prefix)
                seen[name] = target
                targets.append(target)
    return targets
