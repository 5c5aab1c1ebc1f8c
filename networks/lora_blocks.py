"""Block-wise ranks and learning rates for SD 1.x/2.x and SDXL UNets (kohya networks/lora.py semantics).

A UNet LoRA module belongs to one block, numbered as kohya does:
- SD 1.x/2.x (diffusers names), 25 blocks: 0 (conv_in, no LoRA), 1-11 the down blocks (`down_blocks_i_*_j` is
  1 + 3i + j, a downsampler 1 + 3i + 2), 12 the mid block, 13-24 the up blocks (13 + 3i + j, upsampler 13 + 3i + 2).
- SDXL (Stability names), 23 blocks: 0 (time/label embedding, no LoRA), 1-9 `input_blocks_0..8`,
  10-12 `middle_block_0..2`, 13-21 `output_blocks_0..8`, 22 (`out`, no LoRA).
`down_lr_weight` / `up_lr_weight` hold 12 (SD) or 9 (SDXL) values, `mid_lr_weight` 1 or 3; together they give
one weight per block (SDXL adds 1.0 for blocks 0 and 22). Torch-free: the trainer checks lengths before loading.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# family -> (down/up entries, mid entries, total blocks)
BLOCK_LAYOUT: dict[str, tuple[int, int, int]] = {"sd": (12, 1, 25), "sdxl": (9, 3, 23)}
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
BLOCK_DIM_ARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHT_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
BLOCK_ARGS = (*BLOCK_DIM_ARGS, *LR_WEIGHT_ARGS, "block_lr_zero_threshold")

BLOCK_NETWORK_ARGS: dict[str, str] = {
    "block_dims": "SD/SDXL: comma list of ranks per UNet block (25 for SD 1.x/2.x, 23 for SDXL; 0 = no module)",
    "block_alphas": "SD/SDXL: comma list of alphas per UNet block (25 or 23 entries)",
    "conv_block_dims": "SD/SDXL: comma list of 3x3 conv (LoCon) ranks per UNet block (25 or 23 entries)",
    "conv_block_alphas": "SD/SDXL: comma list of 3x3 conv alphas per UNet block (25 or 23 entries)",
    "down_lr_weight": "SD/SDXL: lr weights of the down blocks (12 or 9 values) or a preset: "
    "cosine, sine, linear, reverse_linear, zeros, optionally +BASE (e.g. sine+.5)",
    "mid_lr_weight": "SD/SDXL: lr weight(s) of the mid block (1 value for SD, 3 for SDXL)",
    "up_lr_weight": "SD/SDXL: lr weights of the up blocks (12 or 9 values) or a preset, as down_lr_weight",
    "block_lr_zero_threshold": "SD/SDXL: blocks whose lr weight is <= this get no LoRA module (default 0)",
}

_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_PRESET = re.compile(r"^(cosine|sine|linear|reverse_linear|zeros)(?:\+(.+))?$")


def parse_int_list(value: object) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    items = tuple(int(s.strip()) for s in str(value).split(","))
    if any(v < 0 for v in items):
        raise ValueError
    return items


def parse_float_list(value: object) -> tuple[float, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    return tuple(float(s.strip()) for s in str(value).split(","))


def parse_lr_weight(value: object) -> tuple[float, ...] | str:
    """A preset name (optionally `+base`) stays a string; otherwise a list where an empty entry means 0 (kohya)."""
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value)
    text = str(value).strip()
    match = _PRESET.match(text)
    if match:
        if match.group(2) is not None:
            float(match.group(2))  # a bad base is a ValueError like any other bad value
        return text
    return tuple(float(s) if s.strip() else 0.0 for s in text.split(","))


def preset_weights(spec: str, count: int) -> list[float]:
    """kohya's lr-weight presets over `count` blocks (shallow to deep), each plus the `+base` offset."""
    match = _PRESET.match(spec)
    if match is None:
        raise ValueError(f"unknown lr weight preset {spec!r}; use one of {', '.join(PRESETS)}")
    name, base = match.group(1), float(match.group(2) or 0.0)
    steps = [i / (count - 1) for i in range(count)]
    if name == "cosine":
        values = [math.sin(math.pi * s / 2) for s in reversed(steps)]
    elif name == "sine":
        values = [math.sin(math.pi * s / 2) for s in steps]
    elif name == "linear":
        values = list(steps)
    elif name == "reverse_linear":
        values = list(reversed(steps))
    else:
        values = [0.0] * count
    return [v + base for v in values]


def block_arg_problems(args: Mapping[str, object], family: str) -> list[str]:
    """Block-wise args that do not fit `family` (values already parsed by the arg rules): wrong lengths, or any
    block arg on a family without UNet blocks."""
    given = [name for name in BLOCK_ARGS if args.get(name) is not None]
    if family not in BLOCK_LAYOUT:
        return [
            f"--network_args {name}: block-wise ranks/learning rates are for SD 1.x/2.x and SDXL UNets; "
            f"{family.upper()} has its own per-type ranks (see --help of the network args); remove {name}"
            for name in given
        ]
    side, mid, total = BLOCK_LAYOUT[family]
    label = "SD 1.x/2.x" if family == "sd" else family.upper()
    expected = {**dict.fromkeys(BLOCK_DIM_ARGS, total), "down_lr_weight": side, "up_lr_weight": side}
    expected["mid_lr_weight"] = mid
    problems = []
    for name, count in expected.items():
        value = args.get(name)
        if value is None or isinstance(value, str):
            continue
        if len(value) != count:  # type: ignore[arg-type]
            problems.append(
                f"--network_args {name}: {len(value)} values given, {label} needs {count}"  # type: ignore[arg-type]
                f" ({_layout_hint(family, name)})"
            )
    return problems


def _layout_hint(family: str, name: str) -> str:
    side, mid, total = BLOCK_LAYOUT[family]
    if name in BLOCK_DIM_ARGS:
        if family == "sd":
            return "index 0 unused, 1-11 down blocks, 12 mid, 13-24 up blocks"
        return "index 0 and 22 unused, 1-9 input blocks, 10-12 middle, 13-21 output blocks"
    if name == "mid_lr_weight":
        return f"{mid} mid block value(s)"
    return f"one per {'down' if name.startswith('down') else 'up'} block, shallow to deep"


def block_lr_weights(
    family: str,
    down: Sequence[float] | str | None,
    mid: Sequence[float] | None,
    up: Sequence[float] | str | None,
    zero_threshold: float,
) -> list[float] | None:
    """One lr weight per block (None when no weight was given). Given values <= threshold become 0."""
    if down is None and mid is None and up is None:
        return None
    side, mid_count, _ = BLOCK_LAYOUT[family]

    def resolve(value: Sequence[float] | str | None, count: int) -> list[float]:
        if value is None:
            return [1.0] * count
        values = preset_weights(value, count) if isinstance(value, str) else list(value)
        return [w if w > zero_threshold else 0.0 for w in values]

    weights = resolve(down, side) + resolve(mid, mid_count) + resolve(up, side)
    return [1.0, *weights, 1.0] if family == "sdxl" else weights


@dataclass(frozen=True)
class BlockPlan:
    """Per-block ranks/alphas (conv ones None without LoCon) and lr weights (None without block lrs)."""

    dims: tuple[int, ...]
    alphas: tuple[float, ...]
    conv_dims: tuple[int, ...] | None
    conv_alphas: tuple[float, ...] | None
    lr_weights: tuple[float, ...] | None
    sdxl: bool

    def rank_for(self, lora_name: str, conv: bool) -> tuple[int, float] | None:
        index = block_index(lora_name, self.sdxl)
        if conv:
            if self.conv_dims is None or self.conv_alphas is None:
                return None
            return (self.conv_dims[index], self.conv_alphas[index]) if self.conv_dims[index] else None
        return (self.dims[index], self.alphas[index]) if self.dims[index] else None


def block_plan(
    family: str,
    options: object,
    lora_dim: int,
    alpha: float | None,
    conv_dim: int | None,
    conv_alpha: float | None,
) -> BlockPlan | None:
    """The block plan for these options, or None when no block arg was given (every module gets the base rank).

    Unlike kohya, block_alphas / conv_block_dims alone also turn block-wise ranks on instead of being ignored."""
    if family not in BLOCK_LAYOUT:
        return None

    def get(name: str) -> Any:
        return getattr(options, name)

    lr_weights = block_lr_weights(
        family,
        get("down_lr_weight"),
        get("mid_lr_weight"),
        get("up_lr_weight"),
        get("block_lr_zero_threshold") or 0.0,
    )
    if lr_weights is None and all(get(name) is None for name in BLOCK_DIM_ARGS):
        return None
    total = BLOCK_LAYOUT[family][2]
    dims = list(get("block_dims") or [lora_dim] * total)
    alphas = tuple(get("block_alphas") or [alpha if alpha is not None else 1.0] * total)
    conv_dims: list[int] | None = None
    conv_alphas: tuple[float, ...] | None = None
    if get("conv_block_dims") is not None:
        conv_dims = list(get("conv_block_dims"))
        conv_alphas = tuple(
            get("conv_block_alphas") or [conv_alpha if conv_alpha is not None else 1.0] * total
        )
    elif conv_dim:
        conv_dims = [conv_dim] * total
        conv_alphas = (conv_alpha if conv_alpha is not None else 1.0,) * total
    if lr_weights is not None:  # a block that does not learn gets no module at all
        for i, weight in enumerate(lr_weights):
            if weight == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return BlockPlan(
        tuple(dims),
        alphas,
        tuple(conv_dims) if conv_dims is not None else None,
        conv_alphas,
        tuple(lr_weights) if lr_weights is not None else None,
        family == "sdxl",
    )


def block_index(lora_name: str, sdxl: bool) -> int:
    """kohya's block number of a UNet LoRA module name; ValueError for a name outside every block."""
    if sdxl:
        name = lora_name.removeprefix("lora_unet_")
        for start, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
            if name.startswith(start):
                return first + int(name[len(start) :].split("_")[0])
        if name.startswith(("time_embed_", "label_emb_")):
            return 0
        if name.startswith("out_"):
            return 22
    else:
        match = _RE_UPDOWN.search(lora_name)
        if match:
            side, block, kind, inner = match.groups()
            within = 3 * int(block) + (2 if kind in ("upsamplers", "downsamplers") else int(inner))
            return 1 + within if side == "down" else 13 + within
        if "mid_block_" in lora_name:
            return 12
    raise ValueError(f"{lora_name}: not inside a UNet block")
