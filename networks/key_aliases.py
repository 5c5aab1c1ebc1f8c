"""Other spellings of our LoRA keys, so `--network_weights` also takes LoRAs saved by other tools.

Two layouts are recognised besides kohya's own:
- kohya prefixes over diffusers module paths, e.g. `lora_unet_down_blocks_1_attentions_0_..._to_q` for an SDXL
  UNet whose kohya name is `lora_unet_input_blocks_4_1_..._to_q` (what kohya itself converts on load);
- diffusers/PEFT files: `unet.<path>.lora_A.weight` / `lora_B.weight` (down / up), `text_encoder.<path>`,
  `text_encoder_2.<path>`, optional `<path>.alpha`; without alpha, alpha = rank (PEFT's scale 1).
Keys already in kohya form pass through unchanged; anything unrecognised is left for the strict check.

Where one kohya module stands for several model Linears (FLUX's fused qkv / linear1), files that name the
parts (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, AI-Toolkit and diffusers) are fused: the
same lora_A for every part gives down = A, up = the parts' lora_B stacked (exact, rank r); different ones a
block-diagonal up over the stacked downs (rank = the sum). A part missing from the file adds zero rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from library.errors import UserError
from networks.targets import Target, kohya_name

_PEFT_SUFFIXES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",
    "lora_B.default.weight": "lora_up.weight",
    "alpha": "alpha",
}
_TE_PREFIXES = ("text_encoder", "text_encoder_2", "text_encoder_3")
_TE_DOTTED = tuple(p + "." for p in _TE_PREFIXES)


@dataclass(frozen=True)
class PartAlias:
    """One part of a fused kohya module: its index and the output sizes of all parts."""

    name: str
    index: int
    sizes: tuple[int, ...]


def _part_aliases(target: Target, aliases: dict[str, str | PartAlias]) -> None:
    sizes = tuple(int(m.out_features) for m in target.parts)  # type: ignore[union-attr]
    for index, path in enumerate(target.part_paths):
        part = PartAlias(target.name, index, sizes)
        for alias in (kohya_name(target.prefix, path), f"unet.{path}", f"transformer.{path}"):
            aliases[alias] = part


def alias_map(targets: Iterable[Target]) -> dict[str, str | PartAlias]:
    """Alternative module names -> kohya names (or the part of a fused kohya module)."""
    aliases: dict[str, str | PartAlias] = {}
    for target in targets:
        if len(target.parts) > 1:
            _part_aliases(target, aliases)
            continue
        diffusers_style = kohya_name(target.prefix, target.path)
        if diffusers_style != target.name:
            aliases[diffusers_style] = target.name
        if target.component == "unet":
            aliases[f"unet.{target.path}"] = target.name
            aliases[f"transformer.{target.path}"] = target.name
        else:
            component = _TE_PREFIXES[target.te_index]
            bare = target.path.removeprefix("text_model.")
            aliases[f"{component}.{bare}"] = target.name
            aliases[f"{component}.text_model.{bare}"] = target.name
    return aliases


def _split(key: str) -> tuple[str, str] | None:
    """(module name, kohya suffix) for a kohya or PEFT key."""
    for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
        if key.endswith("." + suffix) and not key.startswith(("unet.", "transformer.", *_TE_DOTTED)):
            return key[: -len(suffix) - 1], suffix
    for peft, ours in _PEFT_SUFFIXES.items():
        if key.endswith("." + peft):
            return key[: -len(peft) - 1], ours
    return None


def fuse_parts(
    alias: PartAlias, parts: Mapping[int, Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor] | None:
    """kohya down/up/alpha for a fused module from its parts' tensors; None when they do not fit together."""
    downs, ups, scales = {}, {}, {}
    for i, tensors in sorted(parts.items()):
        down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
        if down is None or up is None or down.dim() != 2 or up.shape != (alias.sizes[i], down.shape[0]):
            return None
        rank = down.shape[0]
        alpha = tensors.get("alpha")
        downs[i], ups[i] = down, up
        scales[i] = float(alpha) / rank if alpha is not None else 1.0
    first = next(iter(downs.values()))
    if any(d.shape[1] != first.shape[1] for d in downs.values()):
        return None
    shared = all(torch.equal(d, first) for d in downs.values())
    one_scale = len(set(scales.values())) == 1
    scale = next(iter(scales.values())) if one_scale else 1.0
    down = first if shared else torch.cat(list(downs.values()))
    rank = down.shape[0]
    up = torch.zeros(sum(alias.sizes), rank, dtype=first.dtype, device=first.device)
    col = 0
    for i, size in enumerate(alias.sizes):
        if i not in ups:
            continue
        row = sum(alias.sizes[:i])
        width = ups[i].shape[1]
        cols = slice(None) if shared else slice(col, col + width)
        # different per-part scales cannot share one alpha: bake each into its rows (alpha = rank, scale 1)
        up[row : row + size, cols] = ups[i] if one_scale else ups[i] * scales[i]
        col += 0 if shared else width
    return {
        f"{alias.name}.lora_down.weight": down,
        f"{alias.name}.lora_up.weight": up,
        f"{alias.name}.alpha": torch.tensor(scale * rank),
    }


def to_kohya_keys(
    state: Mapping[str, torch.Tensor], aliases: Mapping[str, str | PartAlias]
) -> dict[str, torch.Tensor]:
    """`state` with every recognised alias renamed to its kohya key; PEFT files get alpha = rank when absent."""
    out: dict[str, torch.Tensor] = {}
    peft_ranks: dict[str, int] = {}
    groups: dict[PartAlias, dict[int, dict[str, torch.Tensor]]] = {}
    originals: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        split = _split(key)
        if split is None or split[0] not in aliases:
            out[key] = value
            continue
        target = aliases[split[0]]
        if isinstance(target, PartAlias):
            whole = PartAlias(target.name, -1, target.sizes)
            groups.setdefault(whole, {}).setdefault(target.index, {})[split[1]] = value
            originals.setdefault(target.name, {})[key] = value
            continue
        name, suffix = target, split[1]
        out[f"{name}.{suffix}"] = value
        if suffix == "lora_down.weight" and not key.endswith(".lora_down.weight"):
            peft_ranks[name] = int(value.shape[0])
    for name, rank in peft_ranks.items():
        out.setdefault(f"{name}.alpha", torch.tensor(float(rank)))
    for whole, parts in groups.items():
        fused = fuse_parts(whole, parts)
        out.update(fused if fused is not None else originals[whole.name])  # unfusable: left for the check
    return out


def group_by_module(
    state: Mapping[str, torch.Tensor], suffixes: tuple[str, ...]
) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {suffix: tensor}} for keys ending in one of `suffixes` (e.g. lora_down.weight); any other
    key is a UserError naming the first few."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        modules.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
    if unknown:
        raise UserError(f"{len(unknown)} keys are not LoRA weights of this layout: {', '.join(unknown[:5])}")
    return modules
