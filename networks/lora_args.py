"""`--network_args key=value` for `networks.lora`: the accepted names, their types and their validation.

Kept free of torch and model imports so the trainer can validate the command line before loading weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from library.errors import UserError, did_you_mean
from networks.flux_args import FLUX_NETWORK_ARGS, FLUX_RULES, family_arg_problems
from networks.lora_blocks import (
    BLOCK_NETWORK_ARGS,
    block_arg_problems,
    parse_float_list,
    parse_int_list,
    parse_lr_weight,
)

NETWORK_ARGS: dict[str, str] = {
    "conv_dim": "int: LoCon rank for 3x3 convs in ResnetBlock2D/Downsample2D/Upsample2D (unset = no conv LoRA)",
    "conv_alpha": "float: alpha of the 3x3 conv modules (default 1.0)",
    "dropout": "float: dropout on the rank activation; alias of --network_dropout (LyCORIS spelling)",
    "rank_dropout": "float: per-sample probability of dropping each rank channel (train mode)",
    "module_dropout": "float: probability of skipping a whole LoRA module for a step (train mode)",
    "loraplus_lr_ratio": "float: LoRA+ ratio, lora_up lr = lr x ratio (UNet and text encoders)",
    "loraplus_unet_lr_ratio": "float: LoRA+ ratio for the UNet only (overrides loraplus_lr_ratio)",
    "loraplus_text_encoder_lr_ratio": "float: LoRA+ ratio for the text encoders only (overrides loraplus_lr_ratio)",
    **BLOCK_NETWORK_ARGS,
    **FLUX_NETWORK_ARGS,
}

# kohya lora.py options this suite does not implement yet: say so instead of suggesting a near name.
UNSUPPORTED_KOHYA_ARGS: frozenset[str] = frozenset(
    {
        "network_reg_dims",
        "network_reg_lrs",
        "ggpo_sigma",
        "ggpo_beta",
    }
)


@dataclass(frozen=True)
class LoRAOptions:
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    # SD/SDXL block-wise (networks.lora_blocks); lr weights are a list or a preset name
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    down_lr_weight: tuple[float, ...] | str | None = None
    mid_lr_weight: tuple[float, ...] | None = None
    up_lr_weight: tuple[float, ...] | str | None = None
    block_lr_zero_threshold: float | None = None
    # FLUX.1 (networks.flux_args); None = not given
    train_blocks: str | None = None
    img_attn_dim: int | None = None
    txt_attn_dim: int | None = None
    img_mlp_dim: int | None = None
    txt_mlp_dim: int | None = None
    img_mod_dim: int | None = None
    txt_mod_dim: int | None = None
    single_dim: int | None = None
    single_mod_dim: int | None = None
    in_dims: tuple[int, ...] | None = None
    train_double_block_indices: frozenset[int] | None = None
    train_single_block_indices: frozenset[int] | None = None
    train_t5xxl: bool | None = None
    split_qkv: bool | None = None
    verbose: bool | None = None

    def given(self) -> dict[str, object]:
        """The options that were set (not None)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _to_int(value: object) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(str(value).strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]


def _to_float(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(str(value).strip()) if isinstance(value, str) else float(value)  # type: ignore[arg-type]


_LR_WEIGHT_DEMAND = (
    "comma-separated numbers, or a preset cosine, sine, linear, reverse_linear, zeros (optionally +BASE)"
)

# name -> (converter, check on the converted value, what the check demands)
_RULES: dict[str, tuple[Callable[[object], object], Callable[[Any], bool], str]] = {
    "conv_dim": (_to_int, lambda v: v >= 0, "an integer >= 0"),
    "conv_alpha": (_to_float, lambda v: v >= 0, "a number >= 0"),
    "dropout": (_to_float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "rank_dropout": (_to_float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "module_dropout": (_to_float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "loraplus_lr_ratio": (_to_float, lambda v: v > 0, "a number > 0"),
    "loraplus_unet_lr_ratio": (_to_float, lambda v: v > 0, "a number > 0"),
    "loraplus_text_encoder_lr_ratio": (_to_float, lambda v: v > 0, "a number > 0"),
    "block_dims": (parse_int_list, lambda v: min(v) >= 0, "comma-separated integers >= 0"),
    "block_alphas": (parse_float_list, lambda v: True, "comma-separated numbers"),
    "conv_block_dims": (parse_int_list, lambda v: min(v) >= 0, "comma-separated integers >= 0"),
    "conv_block_alphas": (parse_float_list, lambda v: True, "comma-separated numbers"),
    "down_lr_weight": (parse_lr_weight, lambda v: True, _LR_WEIGHT_DEMAND),
    "mid_lr_weight": (parse_float_list, lambda v: True, "comma-separated numbers"),
    "up_lr_weight": (parse_lr_weight, lambda v: True, _LR_WEIGHT_DEMAND),
    "block_lr_zero_threshold": (_to_float, lambda v: True, "a number"),
    **FLUX_RULES,
}


def _accepted() -> str:
    common = [n for n in NETWORK_ARGS if n not in FLUX_NETWORK_ARGS]
    return f"{', '.join(common)}; FLUX.1 also: {', '.join(FLUX_NETWORK_ARGS)}"


def _name_problem(name: str, module: str, accepted: Mapping[str, str] | None) -> str:
    if accepted is not None:  # a variant module (networks.dylora) accepts a subset
        return (
            f"--network_args {name}: unknown for {module}{did_you_mean(name, set(accepted))}; "
            f"accepted: {', '.join(accepted)}"
        )
    if name in UNSUPPORTED_KOHYA_ARGS:
        return (
            f"--network_args {name}: a kohya lora.py option this suite does not support yet; remove it "
            f"(accepted: {_accepted()})"
        )
    return (
        f"--network_args {name}: unknown for {module}{did_you_mean(name, set(NETWORK_ARGS))}; "
        f"accepted: {_accepted()}"
    )


def options_with_problems(
    kwargs: Mapping[str, object], *, module: str = "networks.lora", accepted: Mapping[str, str] | None = None
) -> tuple[LoRAOptions, list[str]]:
    """Convert network_args (strings, or values a trainer injected) to options; never raises.

    `accepted` restricts the names (a variant module's own list, shown in the error); default all of ours."""
    values: dict[str, object] = {}
    problems: list[str] = []
    for name, raw in kwargs.items():
        if name not in _RULES or (accepted is not None and name not in accepted):
            problems.append(_name_problem(name, module, accepted))
            continue
        if raw is None:  # a trainer may inject dropout=None when --network_dropout is unset
            continue
        convert, check, demand = _RULES[name]
        try:
            value = convert(raw)
        except (TypeError, ValueError):
            problems.append(f"--network_args {name}={raw}: must be {demand}")
            continue
        if not check(value):
            problems.append(f"--network_args {name}={raw}: must be {demand}")
            continue
        values[name] = value
    return LoRAOptions(**values), problems  # type: ignore[arg-type]


def lora_options(kwargs: Mapping[str, object]) -> LoRAOptions:
    options, problems = options_with_problems(kwargs)
    if problems:
        raise UserError(*problems)
    return options


def parse_network_args(
    args: Iterable[str] | None, *, module: str = "networks.lora", accepted: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Validate `--network_args` ("key=value" strings) without touching any model; UserError lists all problems."""
    parsed: dict[str, str] = {}
    problems: list[str] = []
    for item in args or []:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            problems.append(f"--network_args {item!r}: expected key=value, e.g. conv_dim=4")
            continue
        if key in parsed:
            problems.append(f"--network_args {key}: given twice ({parsed[key]!r} and {value!r}); keep one")
            continue
        parsed[key] = value
        # report in command-line order
        problems += options_with_problems({key: value}, module=module, accepted=accepted)[1]
    if problems:
        raise UserError(*problems)
    return parsed


def family_problems(args: Iterable[str] | None, family: str) -> list[str]:
    """--network_args that do not apply to the model family ("sd", "sdxl", "flux"); checked before loading.

    Malformed args are left to `parse_network_args` (already reported by then)."""
    names = [item.partition("=")[0].strip() for item in args or [] if "=" in item]
    raw = {k.strip(): v.strip() for k, sep, v in (item.partition("=") for item in args or []) if sep}
    values = options_with_problems(raw)[0].given()
    return family_arg_problems(dict.fromkeys(names), family) + block_arg_problems(values, family)
