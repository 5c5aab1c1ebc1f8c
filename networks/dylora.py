"""DyLoRA (kohya's `networks.dylora`): one LoRA whose every rank prefix works on its own.

The rank is cut into chunks of `unit`. Each training forward draws a chunk c at random; the module then runs at
rank (c + 1) * unit, only chunk c learns (the chunks before it are used detached, the ones after it not at all),
and the output is scaled by alpha/rank * sqrt(rank / ((c + 1) * unit)) as kohya does. Unlike kohya's forward,
which always multiplies with every rank (so the "frozen" higher ranks still shape the step), the truncation here
is the nested training the DyLoRA paper describes. Outside training the full rank runs at scale alpha/rank.
Saved files are plain LoRA files with kohya's keys (`lora_down.weight` [rank, in], `lora_up.weight` [out, rank]),
so any loader reads them and `--network_weights` continues one. SD 1.x/2.x and SDXL; FLUX's fused modules are
not supported (kohya's DyLoRA has no FLUX version either).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from networks.lora import LoRANetwork
from networks.lora import create_network_from_weights as _lora_from_weights
from networks.lora_args import NETWORK_ARGS, lora_options
from networks.lora_args import parse_network_args as _parse_lora_args
from networks.lora_module import LoRAModule
from networks.targets import Target

MODULE = "networks.dylora"
DYLORA_ARGS: dict[str, str] = {
    "unit": "int: rank chunk trained per step (default 1); network_dim must be a multiple of it",
    **{name: NETWORK_ARGS[name] for name in ("conv_dim", "conv_alpha")},
    **{name: NETWORK_ARGS[name] for name in NETWORK_ARGS if name.startswith("loraplus_")},
}

__all__ = [
    "DyLoRAModule",
    "DyLoRANetwork",
    "create_network",
    "create_network_from_weights",
    "parse_network_args",
]


def _unit(value: object) -> int | None:
    try:
        unit = int(str(value).strip())
    except ValueError:
        return None
    return unit if unit >= 1 else None


def parse_network_args(args: Iterable[str] | None) -> dict[str, str]:
    """Validate DyLoRA's `--network_args` without any model (unknown names list the accepted ones)."""
    items = list(args or [])
    units = [item for item in items if item.partition("=")[0].strip() == "unit"]
    problems = []
    for item in units:
        if _unit(item.partition("=")[2]) is None:
            problems.append(f"--network_args {item.strip()}: unit must be an integer >= 1")
    if len(units) > 1:
        problems.append("--network_args unit: given twice; keep one")
    rest = [item for item in items if item not in units]
    try:
        parsed = _parse_lora_args(rest, module=MODULE, accepted=DYLORA_ARGS)
    except UserError as exc:
        problems.extend(exc.problems)
        parsed = {}
    if problems:
        raise UserError(*problems)
    if units:
        parsed["unit"] = units[0].partition("=")[2].strip()
    return parsed


def family_problems(args: Iterable[str] | None, family: str) -> list[str]:
    if family == "flux":
        return [
            f"--network_module {MODULE}: DyLoRA trains SD 1.x/2.x and SDXL only (FLUX's fused qkv modules are not "
            "supported); use --network_module networks.lora_flux"
        ]
    return []


def network_problems(
    network_dim: int | None, network_dropout: float | None, args: Iterable[str] | None
) -> list[str]:
    """Checks that need the other flags too (before any weights load)."""
    parsed = dict(item.partition("=")[::2] for item in args or [])
    parsed = {k.strip(): v.strip() for k, v in parsed.items()}
    dim = network_dim or 4
    problems = []
    unit = _unit(parsed.get("unit", "1")) or 1
    if dim % unit:
        problems.append(f"--network_args unit={unit}: --network_dim {dim} must be a multiple of unit")
    conv = parsed.get("conv_dim")
    if conv is not None and conv.isdigit() and int(conv) not in (0, dim):
        problems.append(
            f"--network_args conv_dim={conv}: DyLoRA needs conv_dim equal to --network_dim ({dim})"
        )
    if network_dropout is not None:
        problems.append(f"--network_dropout: {MODULE} has no dropout; remove --network_dropout")
    return problems


class _Chunks(nn.Module):
    """A weight kept as rank chunks (so the optimizer skips the chunks a step does not train); `.weight` is
    the whole tensor, concatenated along the rank axis."""

    def __init__(self, weight: torch.Tensor, unit: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.chunks = nn.ParameterList([nn.Parameter(c.clone()) for c in weight.detach().split(unit, dim)])

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat(list(self.chunks), self.dim)

    def first(self, count: int, live: int | None) -> torch.Tensor:
        """The first `count` chunks; only chunk `live` keeps its gradient (None: all of them)."""
        chunks = list(self.chunks)[:count]
        parts = [c if live is None or i == live else c.detach() for i, c in enumerate(chunks)]
        return torch.cat(parts, self.dim)


def _to_plain_keys(module: nn.Module, state: dict, prefix: str, _meta: object) -> None:
    for part in ("lora_down", "lora_up"):
        chunks = [k for k in list(state) if k.startswith(f"{prefix}{part}.chunks.")]
        chunks.sort(key=lambda k: int(k.rsplit(".", 1)[1]))
        tensors = [state.pop(k) for k in chunks]
        state[f"{prefix}{part}.weight"] = torch.cat(tensors, getattr(module, part).dim)


def _from_plain_keys(module: nn.Module, state: dict, prefix: str, *_args: object) -> None:
    for part in ("lora_down", "lora_up"):
        key = f"{prefix}{part}.weight"
        if key in state:
            holder = getattr(module, part)
            for i, chunk in enumerate(state.pop(key).split(module.unit, holder.dim)):  # type: ignore[attr-defined]
                state[f"{prefix}{part}.chunks.{i}"] = chunk


class DyLoRAModule(LoRAModule):
    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float,
        lora_dim: int,
        alpha: float | None,
        unit: int = 1,
        te_index: int | None = None,
    ) -> None:
        if lora_dim % unit:
            raise UserError(f"{lora_name}: rank {lora_dim} is not a multiple of DyLoRA's unit {unit}")
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, te_index=te_index)
        self.unit = unit
        self.lora_down = _Chunks(self.lora_down.weight, unit, 0)
        self.lora_up = _Chunks(self.lora_up.weight, unit, 1)
        conv = org_module if isinstance(org_module, nn.Conv2d) else None
        self._conv = (conv.stride, conv.padding, conv.dilation) if conv is not None else None
        self._register_state_dict_hook(_to_plain_keys)
        self._register_load_state_dict_pre_hook(_from_plain_keys, with_module=True)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        chunks = self.lora_dim // self.unit
        scale = self.scale
        if self.training:
            # kohya's draw (a rank, rounded down to a unit) from torch's CPU generator, which gradient
            # checkpointing restores before recomputing, so the recompute trains the same chunk.
            live = int(torch.randint(self.lora_dim, ())) // self.unit
            count = live + 1
            scale = scale * math.sqrt(self.lora_dim / (count * self.unit))
        else:
            live, count = None, chunks
        down = self.lora_down.first(count, live)
        up = self.lora_up.first(count, live)
        x = x.to(down.dtype)
        if self._conv is not None:
            stride, padding, dilation = self._conv
            lx = F.conv2d(x, down, stride=stride, padding=padding, dilation=dilation)
            out = F.conv2d(lx, up)
        else:
            out = F.linear(F.linear(x, down), up)
        return out * (self.multiplier * scale)


class DyLoRANetwork(LoRANetwork):
    def __init__(self, *args: Any, unit: int = 1, **kwargs: Any) -> None:
        object.__setattr__(self, "unit", unit)  # read by _new_module during the base constructor
        super().__init__(*args, **kwargs)

    def _new_module(self, target: Target, rank: int, alpha: float | None, from_weights: bool) -> LoRAModule:
        if target.parts and len(target.parts) > 1:
            raise UserError(
                f"--network_module {MODULE}: {target.name} is a fused module; DyLoRA has no support"
            )
        te_index = target.te_index if target.component == "text_encoder" else None
        return DyLoRAModule(target.name, target.module, self.multiplier, rank, alpha, self.unit, te_index)


def _split_unit(kwargs: Mapping[str, object]) -> tuple[int, dict[str, object]]:
    rest = dict(kwargs)
    raw = rest.pop("unit", None)
    unit = _unit(raw) if raw is not None else 1
    if unit is None:
        raise UserError(f"--network_args unit={raw}: unit must be an integer >= 1")
    return unit, rest


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> DyLoRANetwork:
    """kohya's signature; `kwargs` are the --network_args (unit, conv_dim, conv_alpha, loraplus_*)."""
    unit, rest = _split_unit(kwargs)
    rest.pop("dropout", None)  # a trainer may inject dropout=None
    dim = network_dim if network_dim is not None else 4
    problems = network_problems(dim, neuron_dropout, [f"{k}={v}" for k, v in kwargs.items() if v is not None])
    if problems:
        raise UserError(*problems)
    return DyLoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        lora_dim=dim,
        alpha=network_alpha if network_alpha is not None else 1.0,
        options=lora_options(rest),
        unit=unit,
    )


def create_network_from_weights(
    multiplier: float,
    file: Any,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A DyLoRA network shaped like the file (every module's rank must be a multiple of `unit`)."""
    unit, rest = _split_unit(kwargs)
    plain, state = _lora_from_weights(
        multiplier, file, vae, text_encoder, unet, weights_sd, for_inference, **rest
    )
    dims = {lo.lora_name: lo.lora_dim for lo in plain.all_loras}
    alphas = {lo.lora_name: float(lo.alpha) for lo in plain.all_loras}
    plain.remove()
    network = DyLoRANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        options=lora_options(rest),
        modules_dim=dims,
        modules_alpha=alphas,
        unit=unit,
    )
    return network, state
