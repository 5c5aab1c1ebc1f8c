"""Other spellings of our LoRA keys, so `--network_weights` also takes LoRAs saved by other tools.

Two layouts are recognised besides kohya's own:
- kohya prefixes over diffusers module paths, e.g. `lora_unet_down_blocks_1_attentions_0_..._to_q` for an SDXL
  UNet whose kohya name is `lora_unet_input_blocks_4_1_..._to_q` (what kohya itself converts on load);
- diffusers/PEFT files: `unet.<path>.lora_A.weight` / `lora_B.weight` (down / up), `text_encoder.<path>`,
  `text_encoder_2.<path>`, optional `<path>.alpha`; without alpha, alpha = rank (PEFT's scale 1).
Keys already in kohya form pass through unchanged; anything unrecognised is left for the strict check.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from networks.targets import Target, kohya_name

_PEFT_SUFFIXES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",
    "lora_B.default.weight": "lora_up.weight",
    "alpha": "alpha",
}
_TE_PREFIXES = ("text_encoder", "text_encoder_2", "text_encoder_3")


def alias_map(targets: Iterable[Target]) -> dict[str, str]:
    """Alternative module names -> kohya names."""
    aliases: dict[str, str] = {}
    for target in targets:
        diffusers_style = kohya_name(target.prefix, target.path)
        if diffusers_style != target.name:
            aliases[diffusers_style] = target.name
        if target.component == "unet":
            aliases[f"unet.{target.path}"] = target.name
        else:
            component = _TE_PREFIXES[target.te_index]
            bare = target.path.removeprefix("text_model.")
            aliases[f"{component}.{bare}"] = target.name
            aliases[f"{component}.text_model.{bare}"] = target.name
    return aliases


def _split(key: str) -> tuple[str, str] | None:
    """(module name, kohya suffix) for a kohya or PEFT key."""
    for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
        if key.endswith("." + suffix) and not key.startswith(("unet.", *(p + "." for p in _TE_PREFIXES))):
            return key[: -len(suffix) - 1], suffix
    for peft, ours in _PEFT_SUFFIXES.items():
        if key.endswith("." + peft):
            return key[: -len(peft) - 1], ours
    return None


def to_kohya_keys(state: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """`state` with every recognised alias renamed to its kohya key; PEFT files get alpha = rank when absent."""
    out: dict[str, torch.Tensor] = {}
    peft_ranks: dict[str, int] = {}
    for key, value in state.items():
        split = _split(key)
        if split is None or split[0] not in aliases:
            out[key] = value
            continue
        name, suffix = aliases[split[0]], split[1]
        out[f"{name}.{suffix}"] = value
        if suffix == "lora_down.weight" and not key.endswith(".lora_down.weight"):
            peft_ranks[name] = int(value.shape[0])
    for name, rank in peft_ranks.items():
        out.setdefault(f"{name}.alpha", torch.tensor(float(rank)))
    return out
