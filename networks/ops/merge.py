"""Merging LoRAs: into a checkpoint (streamed tensor by tensor), or into one LoRA (kohya's sum, or exact concat).

Into a checkpoint: W' = W + Σ ratio · up @ down · alpha/rank for every placement `checkpoint_map` gives the
module (a slice of OpenCLIP's fused in_proj, a row range of FLUX's fused LoRA for diffusers' split Linears).
Each output file is written with a header computed up front; a tensor is read, merged in float32, cast and
appended, so the process holds one tensor at a time (peak memory about the largest tensor, not the model).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import UserError
from networks.key_aliases import alias_map, to_kohya_keys
from networks.lora_file import load_lora_file
from networks.lora_module import lora_delta
from networks.ops.checkpoint_map import CheckpointMap, Rows, delta_shape
from networks.ops.st_stream import TensorSource, open_source, write_streaming

_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


@dataclass(frozen=True)
class Factors:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, src_rows: Rows | None = None) -> torch.Tensor:
        """ΔW in float32, or only its rows `src_rows` (cheaper: only those rows of up are multiplied)."""
        up = self.up if src_rows is None else self.up[src_rows[0] : src_rows[1]]
        return lora_delta(self.down.float(), up.float(), self.scale)


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def factors_from_state(state: Mapping[str, torch.Tensor], where: str) -> dict[str, Factors]:
    """kohya LoRA/LoCon keys -> Factors per module; alpha = rank when absent (kohya's default)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in state.items():
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            other.append(key)
            continue
        parts.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
    if other:
        raise UserError(
            f"{where}: {len(other)} keys are not LoRA/LoCon weights (lora_down/lora_up/alpha): {_preview(other)}; "
            "LoHa/LoKr/DoRA files cannot be merged with this tool"
        )
    out: dict[str, Factors] = {}
    for name, tensors in parts.items():
        down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
        if down is None or up is None:
            missing = "lora_up" if down is not None else "lora_down"
            raise UserError(f"{where}: module {name} has no {missing}.weight; the file is incomplete")
        if up.shape[1] != down.shape[0]:
            raise UserError(
                f"{where}: module {name}: lora_up {tuple(up.shape)} does not fit lora_down {tuple(down.shape)}"
            )
        alpha = tensors.get("alpha")
        out[name] = Factors(down, up, float(alpha) if alpha is not None else float(down.shape[0]))
    if not out:
        raise UserError(f"{where}: no `<name>.lora_down.weight` keys; not a kohya-format LoRA file")
    return out


def read_lora(
    path: Path, flag: str, cmap: CheckpointMap | None = None
) -> tuple[dict[str, Factors], dict[str, str]]:
    """(factors per module, metadata); with `cmap`, diffusers/PEFT spellings are renamed to kohya's first."""
    state, metadata = load_lora_file(path, flag=flag)
    if cmap is not None:
        state = to_kohya_keys(state, alias_map(cmap.targets))
    return factors_from_state(state, f"{flag} {path}"), metadata


# ------------------------------------------------------------------------------------ into a checkpoint

Update = tuple[Rows | None, Factors, Rows | None, float]


def plan_updates(
    cmap: CheckpointMap, loras: Sequence[tuple[Path, Mapping[str, Factors], float]]
) -> dict[str, dict[str, list[Update]]]:
    """file id -> tensor name -> updates; every name and shape is checked before anything is written."""
    updates: dict[str, dict[str, list[Update]]] = {}
    for path, factors, ratio in loras:
        unknown = sorted(set(factors) - set(cmap.slots))
        if unknown:
            hint = "was it trained for another model family?"
            if cmap.family == "flux" and any(n.startswith("lora_te") for n in unknown):
                hint = "pass --clip_l/--clip_l_save_to (and --t5xxl/--t5xxl_save_to) to merge its text encoder part"
            raise UserError(
                f"--models {path}: {len(unknown)} LoRA modules match nothing in this {cmap.family} model: "
                f"{_preview(unknown)}; {hint}"
            )
        for name, f in factors.items():
            slot = cmap.slots[name]
            shape = delta_shape(f.down, f.up)
            if shape[0] != slot.shape[0] or math.prod(shape) != math.prod(slot.shape):
                raise UserError(
                    f"--models {path}: module {name} has ΔW shape {shape} but the model's is {slot.shape}; "
                    "was it trained for another model (SD1 vs SD2, base vs pruned)?"
                )
            for p in slot.placements:
                updates.setdefault(p.file, {}).setdefault(p.key, []).append((p.rows, f, p.src_rows, ratio))
    return updates


def _out_dtype(dtype: torch.dtype, save_dtype: torch.dtype | None) -> torch.dtype:
    return save_dtype if save_dtype is not None and dtype.is_floating_point else dtype


def write_merged_file(
    source: TensorSource, out: Path, updates: Mapping[str, list[Update]], save_dtype: torch.dtype | None
) -> None:
    """`source` with `updates` added, tensor by tensor, to `out` (.safetensors); header metadata kept."""
    plan = [(k, _out_dtype(i.dtype, save_dtype), i.shape) for k, i in source.infos.items()]
    dtypes = {k: d for k, d, _ in plan}

    def produce(key: str) -> torch.Tensor | bytes | bytearray | memoryview:
        dtype = dtypes[key]
        todo = updates.get(key)
        if not todo:
            same = dtype == source.infos[key].dtype
            return source.raw(key) if same else source.get(key).to(dtype)
        w = source.get(key).to(torch.float32, copy=True)
        for rows, factors, src_rows, ratio in todo:
            region = w if rows is None else w[rows[0] : rows[1]]
            region += factors.delta(src_rows).reshape(region.shape) * ratio
        return w.to(dtype)

    metadata = source.metadata or {"format": "pt"}
    write_streaming(out, plan, produce, metadata)


def merge_into_files(
    cmap: CheckpointMap,
    loras: Sequence[tuple[Path, Mapping[str, Factors], float]],
    outputs: Mapping[str, Path],
    save_dtype: torch.dtype | None,
) -> list[Path]:
    """Single-file layouts: each file id with updates (or all given ones) is written to `outputs[file id]`."""
    updates = plan_updates(cmap, loras)
    missing = sorted(set(updates) - set(outputs))
    if missing:
        raise UserError(
            f"--save_to: the LoRAs change {', '.join(missing)} but no output path was given for it"
        )
    written = []
    for file_id, out in outputs.items():
        with open_source(cmap.files[file_id], "--sd_model") as source:
            write_merged_file(source, out, updates.get(file_id, {}), save_dtype)
        written.append(out)
    return written


def merge_into_folder(
    cmap: CheckpointMap,
    loras: Sequence[tuple[Path, Mapping[str, Factors], float]],
    save_to: Path,
    save_dtype: torch.dtype | None,
) -> Path:
    """A diffusers folder -> a new folder: changed (or, with `save_dtype`, all) weight files rewritten, the
    rest copied; built next to `save_to` and moved into place at the end."""
    updates = plan_updates(cmap, loras)
    save_to.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_to.name}.", suffix=".tmp", dir=save_to.parent))
    try:
        for src in sorted(cmap.root.rglob("*")):
            rel = src.relative_to(cmap.root)
            dst = tmp / rel
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            file_updates = updates.get(rel.as_posix(), {})
            if file_updates or (save_dtype is not None and src.suffix == ".safetensors"):
                with open_source(src, "--sd_model") as source:
                    write_merged_file(source, dst, file_updates, save_dtype)
            else:
                shutil.copy2(src, dst)
        _replace_dir(tmp, save_to)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_to


def _replace_dir(new: Path, target: Path) -> None:
    os.chmod(new, 0o755)
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    os.replace(new, target)
    with contextlib.suppress(OSError):
        shutil.rmtree(old)


# ------------------------------------------------------------------------------------ LoRAs into one LoRA


def merge_lora_factors(
    loras: Sequence[tuple[str, Mapping[str, Factors], float]], *, concat: bool, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """kohya's merge_lora_models. Plain: up and down are summed separately, each weighted by
    sqrt(alpha / first alpha) · ratio (|·| for up), alpha of the first file that has the module; needs equal
    ranks and is not the sum of the deltas (use svd_merge for that). `concat`: exact: downs stacked, ups side
    by side, alpha = first scale × total rank, each part's scale·ratio folded into its factors (kohya keeps the
    first alpha, which shrinks every part)."""
    names = list(dict.fromkeys(n for _, factors, _ in loras for n in factors))
    out: dict[str, torch.Tensor] = {}
    for name in names:
        present = [(where, f[name], ratio) for where, f, ratio in loras if name in f]
        first = present[0][1]
        downs, ups = [], []
        for where, f, ratio in present:
            if concat:
                factor = ratio * f.scale / first.scale
                root = math.sqrt(abs(factor))
                downs.append(f.down.to(dtype) * math.copysign(root, factor))
                ups.append(f.up.to(dtype) * root)
                continue
            if f.down.shape != first.down.shape or f.up.shape != first.up.shape:
                raise UserError(
                    f"--models {where}: module {name} has rank {f.rank} but an earlier file has {first.rank} "
                    "(or another shape); use --concat to stack ranks exactly, or svd_merge_lora"
                )
            weight = math.sqrt(f.alpha / first.alpha) * ratio
            downs.append(f.down.to(dtype) * weight)
            ups.append(f.up.to(dtype) * abs(weight))
        if concat:
            rank = sum(d.shape[0] for d in downs)
            out[f"{name}.lora_down.weight"] = torch.cat(downs, dim=0)
            out[f"{name}.lora_up.weight"] = torch.cat(ups, dim=1)
            out[f"{name}.alpha"] = torch.tensor(first.scale * rank, dtype=dtype)
        else:
            out[f"{name}.lora_down.weight"] = torch.stack(downs).sum(0)
            out[f"{name}.lora_up.weight"] = torch.stack(ups).sum(0)
            out[f"{name}.alpha"] = torch.tensor(first.alpha, dtype=dtype)
    return out


def merged_lora_metadata(
    state: Mapping[str, torch.Tensor], sources: Sequence[tuple[str, Mapping[str, str], float]], concat: bool
) -> dict[str, str]:
    """kohya's minimum network metadata (dim/alpha or "Dynamic") plus where the merge came from."""
    downs = {k: v for k, v in state.items() if k.endswith(".lora_down.weight")}
    dims = {int(v.shape[0]) for v in downs.values()}
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    first = next((m for _, m, _ in sources if m), {})
    meta = {
        "ss_network_module": first.get("ss_network_module", "networks.lora"),
        "ss_network_dim": str(dims.pop()) if len(dims) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_training_comment": "merged with tools/merge_lora.py"
        + (" --concat" if concat else "")
        + ": "
        + ", ".join(f"{Path(p).name} x {r:g}" for p, _, r in sources),
    }
    for key in ("ss_base_model_version", "ss_v2"):
        value = next((m[key] for _, m, _ in sources if key in m), None)
        if value is not None:
            meta[key] = value
    return meta
