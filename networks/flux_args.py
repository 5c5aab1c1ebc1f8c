"""FLUX.1 `--network_args` (kohya's networks.lora_flux): names, converters and the family check.

Torch-free, like `networks.lora_args`, so the command line is checked before any weights load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

# kohya's NUM_DOUBLE_BLOCKS / NUM_SINGLE_BLOCKS: block indices are checked against FLUX.1's counts.
NUM_DOUBLE_BLOCKS, NUM_SINGLE_BLOCKS = 19, 38

# Per-type ranks, in kohya's order; the first type whose words all occur in a module's name decides.
TYPE_DIM_ARGS: dict[str, tuple[str, ...]] = {
    "img_attn_dim": ("img_attn",),
    "txt_attn_dim": ("txt_attn",),
    "img_mlp_dim": ("img_mlp",),
    "txt_mlp_dim": ("txt_mlp",),
    "img_mod_dim": ("img_mod",),
    "txt_mod_dim": ("txt_mod",),
    "single_dim": ("single_blocks", "linear"),
    "single_mod_dim": ("modulation",),
}
# in_dims=[img,time,vector,guidance,txt]: the input embedders, by kohya name fragment.
IN_DIM_FILTERS = ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in")

FLUX_NETWORK_ARGS: dict[str, str] = {
    "train_blocks": "FLUX: all (default), single or double: which transformer blocks get LoRA modules",
    **{name: f"FLUX: int rank of the {name[:-4]} modules (0 = none)" for name in TYPE_DIM_ARGS},
    "in_dims": "FLUX: [img,time,vector,guidance,txt] ranks of the input embedders (0 = none), e.g. [4,0,0,0,4]",
    "train_double_block_indices": 'FLUX: double blocks to train: "all", "none" or indices/ranges, e.g. "0-5,10"',
    "train_single_block_indices": 'FLUX: single blocks to train: "all", "none" or indices/ranges, e.g. "0-5,10"',
    "train_t5xxl": "FLUX: True also trains T5-XXL (lora_te3_); needs text encoder outputs not cached",
    "split_qkv": "FLUX: True trains q, k, v (and a single block's MLP input) as separate LoRAs, saved fused",
    "verbose": "FLUX: True logs every module with its rank and alpha",
}

FLUX_ONLY_ARGS = frozenset(FLUX_NETWORK_ARGS)
NOT_FOR_FLUX_ARGS = frozenset({"conv_dim", "conv_alpha"})


def to_bool(value: object) -> bool:
    """kohya compares with the string "True"; anything but true/false is refused rather than read as False."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError
    return text == "true"


def to_train_blocks(value: object) -> str:
    text = str(value).strip()
    if text not in ("all", "single", "double"):
        raise ValueError
    return text


def to_in_dims(value: object) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        text = str(value).strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        items = [item.strip() for item in text.split(",")]
    dims = tuple(int(item) for item in items)  # ValueError on anything but integers
    if len(dims) != len(IN_DIM_FILTERS) or min(dims) < 0:
        raise ValueError
    return dims


def block_selection(total: int) -> Callable[[object], frozenset[int]]:
    """kohya's parse_block_selection: "all", "none"/"", or comma-separated indices and inclusive ranges."""

    def parse(value: object) -> frozenset[int]:
        text = str(value).strip()
        if text == "all":
            return frozenset(range(total))
        if text in ("none", ""):
            return frozenset()
        chosen: set[int] = set()
        for part in text.split(","):
            start, sep, end = part.partition("-")
            first, last = int(start), int(end) if sep else int(start)
            if not 0 <= first <= last < total:
                raise ValueError
            chosen.update(range(first, last + 1))
        return frozenset(chosen)

    return parse


def _to_rank(value: object) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(str(value).strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]


def _always(_value: object) -> bool:
    return True


_SELECTION = "all, none, or indices/ranges like 0-5,10 within 0-{}"
# name -> (converter raising ValueError, check on the converted value, what the value must be)
FLUX_RULES: dict[str, tuple[Callable[[object], object], Callable[[object], bool], str]] = {
    "train_blocks": (to_train_blocks, _always, "all, single or double"),
    **{name: (_to_rank, lambda v: v >= 0, "an integer >= 0") for name in TYPE_DIM_ARGS},  # type: ignore[operator]
    "in_dims": (to_in_dims, _always, "5 integers >= 0 as [img,time,vector,guidance,txt], e.g. [4,0,0,0,4]"),
    "train_double_block_indices": (
        block_selection(NUM_DOUBLE_BLOCKS),
        _always,
        _SELECTION.format(NUM_DOUBLE_BLOCKS - 1),
    ),
    "train_single_block_indices": (
        block_selection(NUM_SINGLE_BLOCKS),
        _always,
        _SELECTION.format(NUM_SINGLE_BLOCKS - 1),
    ),
    "train_t5xxl": (to_bool, _always, "True or False"),
    "split_qkv": (to_bool, _always, "True or False"),
    "verbose": (to_bool, _always, "True or False"),
}


def family_arg_problems(args: Mapping[str, object], family: str) -> list[str]:
    """Network args that do not apply to this model family ("flux" or another), one line each."""
    if family == "flux":
        return [
            f"--network_args {name}: FLUX.1 has no convolutions for LoCon to train; remove {name}"
            for name in args
            if name in NOT_FOR_FLUX_ARGS
        ]
    return [
        f"--network_args {name}: a FLUX.1 option (kohya's networks.lora_flux), but this is an {family.upper()} "
        f"model; remove {name}"
        for name in args
        if name in FLUX_ONLY_ARGS
    ]
