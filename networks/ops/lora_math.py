"""LoRA state-dict math without a base model: ΔW per module, resize by SVD, SVD merge of several LoRAs.

A module is `<name>.lora_down.weight` / `<name>.lora_up.weight` / optional `<name>.alpha` (kohya) or
`<name>.lora_A.weight` / `<name>.lora_B.weight` (PEFT, scale 1); ΔW = up @ down × alpha / rank. Convs
(LoCon 3x3: down [r, in, k, k], up [out, r, 1, 1]) are flattened to [out, in·k·k] as kohya does, so SD,
SDXL and FLUX files (whose fused qkv / linear1 are just taller matrices) go through the same code.

The SVD of ΔW = up @ down is taken from its factors (QR of each, SVD of the small r×r core, in float64),
which is exact and costs O((out + in)·r²) instead of a full SVD of an out×in matrix (kohya: full SVD, or
randomized `svd_lowrank` above 2048). Singular values past the old rank are exactly zero here.

Dynamic rank rules are kohya's (networks/resize_lora.py), on the spectrum padded with zeros to min(out, in):
- sv_ratio p: keep the singular values greater than S[0] / p;
- sv_cumulative p: the first index where cumsum(S) / sum(S) >= p, plus one;
- sv_fro p: the same on S² against p²;
each clamped to [1, min(out, in)] and then to `--new_rank`; a zero matrix (S[0] <= 1e-6) gets rank 1.
The new alpha keeps the old scale: alpha' = rank' × alpha / rank (1 when the file has no alpha).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from library.errors import UserError

MIN_SV = 1e-6  # kohya's threshold for "this module is zero"
DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
_PAIRS = (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight"))


@dataclass
class LoRAPair:
    """One LoRA module's tensors as found in a file; `down_key`/`up_key` keep the file's spelling."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    down_key: str
    up_key: str

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def is_conv3x3(self) -> bool:
        return self.is_conv and tuple(self.down.shape[2:]) != (1, 1)


def split_modules(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, LoRAPair], dict[str, torch.Tensor]]:
    """(modules by name, every other key). A down without its up (or the reverse) is a UserError."""
    modules: dict[str, LoRAPair] = {}
    used: set[str] = set()
    problems = []
    for key, down in state.items():
        for down_suffix, up_suffix in _PAIRS:
            if not key.endswith("." + down_suffix):
                continue
            name = key[: -len(down_suffix) - 1]
            up_key = f"{name}.{up_suffix}"
            if up_key not in state:
                problems.append(f"{key}: no matching {up_key}; the file is incomplete")
                break
            alpha = state.get(f"{name}.alpha")
            modules[name] = LoRAPair(
                name, down, state[up_key], None if alpha is None else float(alpha), key, up_key
            )
            used.update((key, up_key, f"{name}.alpha"))
            break
    for key in state:
        if key not in used and key.endswith((".lora_up.weight", ".lora_B.weight")):
            problems.append(f"{key}: no matching down weight; the file is incomplete")
    if problems:
        raise UserError(*problems)
    return modules, {k: v for k, v in state.items() if k not in used}


def _matrix(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.reshape(rows, -1).to(torch.float64)


def delta(pair: LoRAPair) -> torch.Tensor:
    """ΔW = up @ down × scale in float32, shaped like the module's weight ([out, in] or [out, in, k, k])."""
    out = pair.up.shape[0]
    flat = _matrix(pair.up, out) @ _matrix(pair.down, pair.rank) * pair.scale
    shape = (out, *pair.down.shape[1:])
    return flat.reshape(shape).to(torch.float32)


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of up @ down (up [out, r], down [r, n], float64) without forming the product."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u, s, vh @ q_down.T


def padded_spectrum(s: torch.Tensor, full: int) -> torch.Tensor:
    """`s` with zeros up to `full` = min(out, in): the spectrum kohya's full SVD sees."""
    return torch.cat([s, s.new_zeros(max(0, full - s.numel()))])


def dynamic_rank(s: torch.Tensor, method: str, param: float) -> int:
    """kohya's rank for one module's (descending, padded) spectrum, before the --new_rank cap."""
    n = s.numel()
    if method == "sv_ratio":
        index = int((s > s[0] / param).sum()) - 1
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(param, dtype=s.dtype)))
    elif method == "sv_fro":
        sq = s.pow(2)
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), torch.tensor(param**2, dtype=s.dtype)))
    else:
        raise ValueError(method)
    return max(0, min(index, n - 1)) + 1


@dataclass
class ResizedModule:
    name: str
    old_rank: int
    new_rank: int
    new_alpha: float
    fro_retained: float  # ‖ΔW'‖ / ‖ΔW‖ (Frobenius)
    sum_retained: float  # Σ kept S / Σ S
    max_ratio: float  # S[0] / S[rank' - 1]


def _low_rank(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, rank], down [rank, n]) = U·S, Vh truncated; zero columns/rows past the available rank."""
    kept = min(rank, s.numel())
    up = u.new_zeros(u.shape[0], rank)
    down = vh.new_zeros(rank, vh.shape[1])
    up[:, :kept] = u[:, :kept] * s[:kept]
    down[:kept] = vh[:kept]
    return up, down


def _spectrum_stats(s: torch.Tensor, rank: int) -> tuple[float, float, float]:
    total_sq = float(s.pow(2).sum())
    total = float(s.abs().sum())
    fro = (float(s[:rank].pow(2).sum()) / total_sq) ** 0.5 if total_sq > 0 else float("nan")
    summed = float(s[:rank].abs().sum()) / total if total > 0 else float("nan")
    last = float(s[rank - 1]) if rank <= s.numel() else 0.0
    ratio = float(s[0]) / last if last > 0 else float("inf")
    return fro, summed, ratio


def resize_pair(
    pair: LoRAPair, max_rank: int, method: str | None = None, param: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, ResizedModule]:
    """(down, up, info) of `pair` at its new rank (float32, the module's weight layout)."""
    out = pair.up.shape[0]
    up2, down2 = _matrix(pair.up, out), _matrix(pair.down, pair.rank)
    u, s, vh = factored_svd(up2, down2)
    full = padded_spectrum(s, min(out, down2.shape[1]))
    if full[0] <= MIN_SV:
        rank = 1
    else:
        rank = dynamic_rank(full, method, float(param)) if method else max_rank
        rank = min(rank, max_rank, full.numel())
    new_up, new_down = _low_rank(u, s, vh, rank)
    fro, summed, ratio = _spectrum_stats(full, rank)
    info = ResizedModule(pair.name, pair.rank, rank, pair.scale * rank, fro, summed, ratio)
    down = new_down.reshape(rank, *pair.down.shape[1:]).to(torch.float32)
    up = new_up.reshape(out, rank, *([1, 1] if pair.is_conv else [])).to(torch.float32)
    return down, up, info


def resize_state(
    state: Mapping[str, torch.Tensor],
    new_rank: int,
    new_conv_rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
    device: str | torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], list[ResizedModule]]:
    """Every module of `state` re-ranked (3x3 convs to `new_conv_rank`, default `new_rank`); other keys kept."""
    modules, others = split_modules(state)
    out: dict[str, torch.Tensor] = dict(others)
    infos = []
    for name, pair in modules.items():
        if device is not None:
            pair.down, pair.up = pair.down.to(device), pair.up.to(device)
        limit = new_conv_rank if (pair.is_conv3x3 and new_conv_rank is not None) else new_rank
        down, up, info = resize_pair(pair, limit, method, param)
        out[pair.down_key], out[pair.up_key] = down.cpu(), up.cpu()
        if pair.alpha is not None or pair.down_key.endswith(".lora_down.weight"):
            # a PEFT file without alpha stays without (scale 1 = alpha rank'), so diffusers still loads it
            out[f"{name}.alpha"] = torch.tensor(info.new_alpha, dtype=torch.float32)
        infos.append(info)
    return out, infos


def merge_deltas(
    states: Sequence[Mapping[str, torch.Tensor]], ratios: Sequence[float]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
    """Per module name: (U_cat, D_cat, weight shape) with Σ ratio·scale·up @ down = U_cat @ D_cat (float64)."""
    stacked: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], tuple[int, ...]]] = {}
    problems = []
    for index, (state, ratio) in enumerate(zip(states, ratios, strict=True)):
        for name, pair in split_modules(state)[0].items():
            out = pair.up.shape[0]
            shape = (out, *pair.down.shape[1:])
            ups, downs, known = stacked.setdefault(name, ([], [], shape))
            if known != shape:
                problems.append(
                    f"--models #{index + 1}: {name} has shape {list(shape)}, earlier files {list(known)}"
                )
                continue
            ups.append(_matrix(pair.up, out) * (ratio * pair.scale))
            downs.append(_matrix(pair.down, pair.rank))
    if problems:
        raise UserError(*problems)
    return {name: (torch.cat(u, 1), torch.cat(d, 0), shape) for name, (u, d, shape) in stacked.items()}


def svd_merge(
    states: Sequence[Mapping[str, torch.Tensor]],
    ratios: Sequence[float],
    new_rank: int,
    new_conv_rank: int | None = None,
    clamp_quantile: float = 0.99,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """kohya's svd_merge_lora: Σ ratio × ΔW per module, SVD to min(rank, out, in), alpha = rank.

    As kohya, U·S and Vh are clamped to ± the `clamp_quantile` quantile of their entries (1 = no clamp).
    """
    out: dict[str, torch.Tensor] = {}
    for name, (ups, downs, shape) in merge_deltas(states, ratios).items():
        if device is not None:
            ups, downs = ups.to(device), downs.to(device)
        conv3x3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        limit = new_conv_rank if (conv3x3 and new_conv_rank is not None) else new_rank
        rank = min(limit, shape[0], shape[1])
        u, s, vh = factored_svd(ups, downs)
        up, down = _low_rank(u, s, vh, rank)
        if clamp_quantile < 1:
            hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
            up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
        out[f"{name}.lora_up.weight"] = (
            up.reshape(shape[0], rank, *([1, 1] if len(shape) == 4 else [])).float().cpu()
        )
        out[f"{name}.lora_down.weight"] = down.reshape(rank, *shape[1:]).float().cpu()
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def cast_floats(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every floating tensor (alphas included, as kohya) in `dtype`, contiguous."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
