"""SD 1.x / 2.x / SDXL LoRA files: kohya layout <-> diffusers/PEFT layout (`tools/convert_lora.py`).

kohya: `lora_unet_<module>` (SDXL: Stability's block names), `lora_te_` / `lora_te1_` / `lora_te2_`, with
`.lora_down.weight` / `.lora_up.weight` / `.alpha`. diffusers/PEFT (what `save_lora_weights` writes and
`load_lora_weights` reads without conversion): `unet.<diffusers module path>.lora_A.weight` / `lora_B.weight`,
`text_encoder.text_model.<path>`, `text_encoder_2.text_model.<path>`, no alpha: alpha / rank is baked into
lora_B, so every loader computes the same ΔW. Both directions are driven by the trainer's key tables
(`networks.targets` on the family's model, see networks/ops/family_tables.py); back to kohya goes through
`networks.key_aliases` (the `--network_weights` reader), which sets alpha = rank. kohya -> diffusers -> kohya
therefore returns the same tensors when alpha = rank, and the same ΔW otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from library.errors import UserError
from networks.key_aliases import group_by_module, to_kohya_keys
from networks.ops.family_tables import best_targets, family_aliases
from networks.targets import Target

StateDict = dict[str, torch.Tensor]
_DOWN, _UP, _ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
_A, _B = "lora_A.weight", "lora_B.weight"
_TE_COMPONENTS = ("text_encoder", "text_encoder_2")


def diffusers_path(target: Target) -> str:
    """`unet.down_blocks.0...` / `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`."""
    if target.component == "unet":
        return f"unet.{target.path}"
    bare = target.path.removeprefix("text_model.")
    return f"{_TE_COMPONENTS[target.te_index]}.text_model.{bare}"


def _widths(modules: Mapping[str, Mapping[str, torch.Tensor]], down: str) -> dict[str, int]:
    return {name: int(t[down].shape[1]) for name, t in modules.items() if down in t}


def kohya_to_diffusers(state: Mapping[str, torch.Tensor], family: str) -> StateDict:
    """kohya SD/SDXL LoRA -> diffusers/PEFT keys, alpha / rank baked into lora_B."""
    modules = group_by_module(state, (_DOWN, _UP, _ALPHA))
    size, table = best_targets(family, _widths(modules, _DOWN))
    aliases = family_aliases(family, size)  # diffusers-style kohya names (lora_unet_down_blocks_... for SDXL)
    out: StateDict = {}
    unknown = []
    for name, tensors in modules.items():
        resolved = name if name in table else aliases.get(name)
        down, up = tensors.get(_DOWN), tensors.get(_UP)
        if not isinstance(resolved, str) or down is None or up is None:
            unknown.append(name)
            continue
        rank = down.shape[0]
        scale = float(tensors[_ALPHA]) / rank if _ALPHA in tensors else 1.0
        path = diffusers_path(table[resolved])
        out[f"{path}.{_A}"] = down.contiguous()
        out[f"{path}.{_B}"] = (up if scale == 1.0 else up * scale).contiguous()
    if unknown:
        raise UserError(
            f"{len(unknown)} modules are not {family} LoRA modules (or lack down/up): {', '.join(sorted(unknown)[:5])}"
        )
    return out


def diffusers_to_kohya(state: Mapping[str, torch.Tensor], family: str) -> StateDict:
    """diffusers/PEFT SD/SDXL LoRA -> kohya names (alpha = rank when the file has none)."""
    modules = group_by_module(state, (_A, _B, _ALPHA, "lora_A.default.weight", "lora_B.default.weight"))
    size, table = best_targets(family, _widths(modules, _A))
    aliases = family_aliases(family, size)
    out = to_kohya_keys(state, aliases)
    unknown = sorted({k.rsplit(".", 2)[0] for k in out if k.split(".")[0] not in table})
    if unknown:
        raise UserError(f"{len(unknown)} modules are not {family} LoRA modules: {', '.join(unknown[:5])}")
    return out


def convert(state: Mapping[str, torch.Tensor], family: str, to: str | None = None) -> tuple[StateDict, str]:
    """(converted state, its layout "diffusers" or "kohya"); `to` None = the other layout."""
    kohya = any(k.endswith("." + _DOWN) for k in state)
    peft = any(k.endswith((".lora_A.weight", ".lora_A.default.weight")) for k in state)
    if kohya == peft:
        raise UserError(
            "the file mixes kohya (lora_down/lora_up) and diffusers (lora_A/lora_B) keys"
            if kohya
            else "no LoRA weights found (neither .lora_down.weight nor .lora_A.weight keys)"
        )
    source = "kohya" if kohya else "diffusers"
    target = to or ("diffusers" if kohya else "kohya")
    if target == source:
        raise UserError(f"--to {target}: the file is already in the {source} layout")
    return (kohya_to_diffusers(state, family) if kohya else diffusers_to_kohya(state, family)), target
