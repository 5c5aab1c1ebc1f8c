"""Extracting a LoRA from two checkpoints (kohya's extract_lora_from_models): per module ΔW = tuned − original,
truncated SVD to `dim` (3x3 convs to `conv_dim`, only when given), U·S as lora_up and Vh as lora_down clamped at
the `clamp_quantile` of their values, alpha = rank (scale 1).

Differences from kohya: every family and layout `checkpoint_map` knows (kohya: SD/SDXL single files), and
`min_diff` applies per module (kohya drops the whole text encoder when none of its modules differs by more,
and keeps every UNet module); tensors are read one at a time from both files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from library.errors import UserError
from networks.ops.checkpoint_map import CheckpointMap, ModuleSlot
from networks.ops.st_stream import TensorSource, open_source

logger = logging.getLogger(__name__)

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
_QUANTILE_MAX = 16_000_000  # torch.quantile's input limit


@dataclass
class Extracted:
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # max |ΔW| below min_diff
    max_diff: dict[str, float] = field(default_factory=dict)


class _Reader:
    """Tensors of one checkpoint by (file id, key); the last tensor is kept (OpenCLIP's in_proj is read for
    q, k and v in a row)."""

    def __init__(self, cmap: CheckpointMap, flag: str) -> None:
        self.cmap, self.flag = cmap, flag
        self.sources: dict[str, TensorSource] = {}
        self.last: tuple[tuple[str, str], torch.Tensor] | None = None

    def get(self, file_id: str, key: str) -> torch.Tensor:
        if self.last is not None and self.last[0] == (file_id, key):
            return self.last[1]
        if file_id not in self.sources:
            self.sources[file_id] = open_source(self.cmap.files[file_id], self.flag)
        tensor = self.sources[file_id].get(key)
        self.last = ((file_id, key), tensor)
        return tensor

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


def check_same_model(org: CheckpointMap, tuned: CheckpointMap) -> None:
    if (org.family, org.layout) != (tuned.family, tuned.layout) or set(org.slots) != set(tuned.slots):
        raise UserError(
            f"--model_tuned: {tuned.root} is a {tuned.family} {tuned.layout} but --model_org {org.root} is a "
            f"{org.family} {org.layout} (or another architecture); pass two models of the same family and layout"
        )
    for name, slot in org.slots.items():
        for a, b in zip(slot.placements, tuned.slots[name].placements, strict=True):
            if org.infos[a.file][a.key].shape != tuned.infos[b.file][b.key].shape:
                raise UserError(
                    f"--model_tuned: {b.key} has shape {tuned.infos[b.file][b.key].shape} but "
                    f"{org.infos[a.file][a.key].shape} in --model_org; the models differ in architecture"
                )


def _delta(slot: ModuleSlot, org: _Reader, tuned: _Reader, tuned_slot: ModuleSlot) -> torch.Tensor:
    out = torch.empty(slot.shape, dtype=torch.float32)
    for p, q in zip(slot.placements, tuned_slot.placements, strict=True):
        a, b = org.get(p.file, p.key), tuned.get(q.file, q.key)
        if p.rows is not None:
            a, b = a[p.rows[0] : p.rows[1]], b[p.rows[0] : p.rows[1]]
        region = out if p.src_rows is None else out[p.src_rows[0] : p.src_rows[1]]
        region.copy_((b.float() - a.float()).reshape(region.shape))
    return out


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    if values.numel() <= _QUANTILE_MAX:
        return torch.quantile(values, q)
    k = max(1, min(values.numel(), round(q * (values.numel() - 1)) + 1))
    return values.kthvalue(k).values


def svd_factors(
    delta: torch.Tensor, rank: int, clamp_quantile: float, device: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of rank min(rank, out, in) with up @ down ≈ delta (flattened for convs), clamped as kohya."""
    out_dim, in_dim = delta.shape[:2]
    conv = delta.dim() == 4
    mat = delta.reshape(out_dim, -1)
    if device:
        mat = mat.to(device)
    rank = min(rank, out_dim, mat.shape[1])
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if clamp_quantile < 1:
        hi = _quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    up, down = up.cpu().contiguous(), down.cpu().contiguous()
    if conv:
        up = up.reshape(out_dim, rank, 1, 1)
        down = down.reshape(rank, in_dim, *delta.shape[2:])
    return up, down


def extract_lora(
    org: CheckpointMap,
    tuned: CheckpointMap,
    *,
    dim: int,
    conv_dim: int | None,
    clamp_quantile: float,
    min_diff: float,
    device: str | None = None,
    save_dtype: torch.dtype | None = None,
) -> Extracted:
    check_same_model(org, tuned)
    result = Extracted()
    readers = _Reader(org, "--model_org"), _Reader(tuned, "--model_tuned")
    try:
        for name, slot in org.slots.items():
            if slot.kind == "conv" and not conv_dim:
                continue
            delta = _delta(slot, readers[0], readers[1], tuned.slots[name])
            biggest = float(delta.abs().max()) if delta.numel() else 0.0
            result.max_diff[name] = biggest
            if biggest < min_diff:
                result.skipped.append(name)
                continue
            rank = conv_dim if slot.kind == "conv" else dim
            up, down = svd_factors(delta, int(rank or dim), clamp_quantile, device)
            dtype = save_dtype or torch.float32
            result.state[f"{name}.lora_up.weight"] = up.to(dtype)
            result.state[f"{name}.lora_down.weight"] = down.to(dtype)
            result.state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    finally:
        for reader in readers:
            reader.close()
    return result


def extract_metadata(
    org: CheckpointMap,
    tuned: CheckpointMap,
    dim: int,
    conv_dim: int | None,
    clamp_quantile: float,
    min_diff: float,
) -> dict[str, str]:
    """kohya's minimum metadata for an extracted LoRA, and a comment saying it is one."""
    args = {"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_dim))} if conv_dim else {}
    return {
        "ss_v2": str(org.family == "sd2"),
        "ss_base_model_version": BASE_MODEL_VERSION[org.family],
        "ss_network_module": "networks.lora_flux" if org.family == "flux" else "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(dim)),
        "ss_network_args": json.dumps(args),
        "ss_training_comment": (
            # No model file or folder names: they are names from the user's machine (see --metadata_include_paths).
            f"extracted with tools/extract_lora.py "
            f"(dim {dim}, conv_dim {conv_dim}, clamp_quantile {clamp_quantile}, min_diff {min_diff})"
        ),
    }
