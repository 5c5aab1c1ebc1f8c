"""FLUX.1 LoRA files: kohya/ComfyUI layout <-> diffusers/AI-Toolkit layout (`tools/convert_lora.py`).

kohya: `lora_unet_<BFL module>` with `.lora_down.weight` / `.lora_up.weight` / `.alpha`, qkv and linear1
fused; `lora_te1_` CLIP-L, `lora_te3_` T5-XXL. diffusers / AI-Toolkit: `transformer.<diffusers module>`,
`text_encoder.<module>`, `text_encoder_2.<module>` with `.lora_A.weight` / `.lora_B.weight` and no alpha, so
alpha/rank is baked into lora_B. A fused module becomes one LoRA per diffusers Linear (down copied, up
sliced; a block-diagonal up, as split_qkv saves, gives each part its own block). Back, parts with equal
downs fuse exactly (rank r, alpha r); otherwise their downs are stacked under a block-diagonal up (rank =
the sum, alpha = rank). Both directions keep every per-Linear delta (up @ down * alpha / rank).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from library.errors import UserError
from networks.key_aliases import PartAlias, fuse_parts, group_by_module

StateDict = dict[str, torch.Tensor]
_DOWN, _UP, _ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
_A, _B = "lora_A.weight", "lora_B.weight"
# FLUX.1's MLP is 4x the hidden width, so a fused linear1 of n rows is 3 x n/7 (q, k, v) + 4n/7 (MLP).
_MLP_RATIO = 4
_TE = {"lora_te1": "text_encoder", "lora_te3": "text_encoder_2"}
_CLIP_RX = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)$")
_T5_RX = re.compile(r"encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(\w+)$")


def _block_counts(keys: list[str], double: str, single: str) -> tuple[int, int]:
    def count(rx: str) -> int:
        found = [int(m.group(1)) for k in keys if (m := re.search(rx, k))]
        return max(found) + 1 if found else 0

    return count(double), count(single)


def _unet_table(num_double: int, num_single: int) -> dict[str, tuple[str, ...]]:
    """kohya module name -> diffusers module paths, from the checkpoint converter's table."""
    from library.families.flux_checkpoint import module_map

    return {
        "lora_unet_" + bfl.replace(".", "_"): tuple(paths)
        for bfl, paths in module_map(num_double, num_single)
    }


def _part_sizes(rows: int, parts: int) -> list[int]:
    if parts == 3:  # qkv
        return [rows // 3] * 3
    inner = rows // (3 + _MLP_RATIO)  # linear1
    return [inner] * 3 + [rows - 3 * inner]


def _te_path(name: str) -> str | None:
    """diffusers path of a kohya text-encoder module (`text_encoder.text_model.encoder.layers.0.mlp.fc1`)."""
    prefix = next((p for p in _TE if name.startswith(p + "_")), None)
    if prefix is None:
        return None
    rest = name[len(prefix) + 1 :]
    if m := _CLIP_RX.fullmatch(rest):
        return f"{_TE[prefix]}.text_model.encoder.layers.{m[1]}.{m[2]}.{m[3]}"
    if m := _T5_RX.fullmatch(rest):
        return f"{_TE[prefix]}.encoder.block.{m[1]}.layer.{m[2]}.{m[3]}.{m[4]}"
    return None


def _split_fused(
    down: torch.Tensor, up: torch.Tensor, sizes: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) per part; a block-diagonal up (split_qkv) gives each part only its own rank block."""
    rank, parts = down.shape[0], len(sizes)
    ups = list(torch.split(up, sizes))
    if rank % parts == 0:
        width = rank // parts
        blocks = [(i * width, (i + 1) * width) for i in range(parts)]
        off = [u[:, :a].any() or u[:, b:].any() for u, (a, b) in zip(ups, blocks, strict=True)]
        if not any(bool(o) for o in off):
            return [(down[a:b], u[:, a:b]) for u, (a, b) in zip(ups, blocks, strict=True)]
    return [(down, u) for u in ups]


def kohya_to_diffusers(state: Mapping[str, torch.Tensor]) -> StateDict:
    """kohya FLUX LoRA -> `transformer.<path>.lora_A/lora_B.weight` (alpha / rank baked into lora_B)."""
    modules = group_by_module(state, (_DOWN, _UP, _ALPHA))
    table = _unet_table(*_block_counts(list(modules), r"double_blocks_(\d+)_", r"single_blocks_(\d+)_"))
    out: StateDict = {}
    unknown = []
    for name, tensors in modules.items():
        down, up = tensors.get(_DOWN), tensors.get(_UP)
        paths = table.get(name)
        te_path = _te_path(name)
        if down is None or up is None or (paths is None and te_path is None):
            unknown.append(name)
            continue
        rank = down.shape[0]
        alpha = float(tensors[_ALPHA]) if _ALPHA in tensors else float(rank)
        up = up * (alpha / rank)
        if paths is None:
            out[f"{te_path}.{_A}"], out[f"{te_path}.{_B}"] = down, up
            continue
        pairs = (
            _split_fused(down, up, _part_sizes(up.shape[0], len(paths))) if len(paths) > 1 else [(down, up)]
        )
        for path, (part_down, part_up) in zip(paths, pairs, strict=True):
            out[f"transformer.{path}.{_A}"] = part_down.clone()  # safetensors refuses shared storage
            out[f"transformer.{path}.{_B}"] = part_up.contiguous()
    if unknown:
        raise UserError(f"not FLUX.1 LoRA modules (or lacking down/up): {', '.join(sorted(unknown)[:5])}")
    return out


def _kohya_te_name(path: str) -> str | None:
    for prefix, component in _TE.items():
        if path.startswith(component + "."):
            rest = path[len(component) + 1 :]
            if prefix == "lora_te1" and not rest.startswith("text_model."):
                rest = "text_model." + rest  # transformers 5 dropped that level; kohya's names keep it
            return f"{prefix}_{rest.replace('.', '_')}"
    return None


def _inverse_table(paths: list[str]) -> dict[str, tuple[str, int, int]]:
    """diffusers path -> (kohya name, part index, number of parts)."""
    table = _unet_table(
        *_block_counts(paths, r"^transformer_blocks\.(\d+)\.", r"^single_transformer_blocks\.(\d+)\.")
    )
    return {path: (name, i, len(group)) for name, group in table.items() for i, path in enumerate(group)}


def diffusers_to_kohya(state: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers / AI-Toolkit FLUX LoRA -> kohya names, fusing the parts of qkv / linear1."""
    modules = group_by_module(state, (_A, _B, _ALPHA))
    inverse = _inverse_table([p.removeprefix("transformer.") for p in modules])
    out: StateDict = {}
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    unknown = []
    for path, tensors in modules.items():
        down, up = tensors.get(_A), tensors.get(_B)
        where = inverse.get(path.removeprefix("transformer.")) if path.startswith("transformer.") else None
        te_name = _kohya_te_name(path)
        if down is None or up is None or (where is None and te_name is None):
            unknown.append(path)
            continue
        part = {_DOWN: down, _UP: up} | ({_ALPHA: tensors[_ALPHA]} if _ALPHA in tensors else {})
        if where is not None and where[2] > 1:
            groups.setdefault(where[0], {})[where[1]] = part
            continue
        name = te_name if where is None else where[0]
        out |= {f"{name}.{_DOWN}": down, f"{name}.{_UP}": up}
        out[f"{name}.{_ALPHA}"] = part.get(_ALPHA, torch.tensor(float(down.shape[0])))
    for name, parts in groups.items():
        sizes = _group_sizes(name, parts)
        fused = fuse_parts(PartAlias(name, -1, tuple(sizes)), parts)
        if fused is None:
            unknown.append(name)
            continue
        out |= fused
    if unknown:
        raise UserError(f"not FLUX.1 LoRA modules (or lacking A/B): {', '.join(sorted(unknown)[:5])}")
    return out


def _group_sizes(name: str, parts: Mapping[int, Mapping[str, torch.Tensor]]) -> list[int]:
    """Output size of every part of a fused module; parts missing from the file are inferred from the rest."""
    rows = {i: int(p[_UP].shape[0]) for i, p in parts.items()}
    count = 3 if name.endswith("_qkv") else 4
    inner = next((rows[i] for i in (0, 1, 2) if i in rows), None)
    if inner is None:
        inner = rows[3] // _MLP_RATIO
    sizes = [inner] * 3 + ([rows.get(3, inner * _MLP_RATIO)] if count == 4 else [])
    return sizes


def convert(state: Mapping[str, torch.Tensor], to: str | None = None) -> tuple[StateDict, str]:
    """(converted state, the layout it is in: "diffusers" or "kohya"); `to` None = the other layout."""
    kohya = any(k.endswith("." + _DOWN) for k in state)
    peft = any(k.endswith("." + _A) for k in state)
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
    return (kohya_to_diffusers(state) if kohya else diffusers_to_kohya(state)), target
