"""LoRA-FA (kohya's `networks.lora_fa`): LoRA with a frozen, randomly initialised `lora_down`; only `lora_up` learns.

Everything else is `networks.lora` (same args, block-wise ranks/lrs, keys and file layout): the frozen down
projections are saved with the rest, so the file is an ordinary LoRA. As in kohya, downs start from a normal
distribution with std sqrt(2 / (in_features + rank)) (the paper's init) instead of LoRA's Kaiming-uniform.
Works for every family `networks.lora` serves, FLUX.1's fused modules included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from networks.lora import LoRAModule, LoRANetwork, build_network
from networks.lora import create_network_from_weights as _lora_from_weights
from networks.lora_args import NETWORK_ARGS, lora_options
from networks.lora_args import family_problems as family_problems
from networks.lora_args import parse_network_args as _parse_lora_args

MODULE = "networks.lora_fa"

__all__ = [
    "LoRAFANetwork",
    "create_network",
    "create_network_from_weights",
    "family_problems",
    "parse_network_args",
]


def parse_network_args(args: Iterable[str] | None) -> dict[str, str]:
    return _parse_lora_args(args, module=MODULE, accepted=NETWORK_ARGS)


def _in_features(lora: LoRAModule) -> int:
    down = lora.lora_down
    return int(down.in_channels if isinstance(down, nn.Conv2d) else down.in_features)  # type: ignore[arg-type]


class LoRAFANetwork(LoRANetwork):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if kwargs.get("modules_dim") is None:  # a network for a file gets its downs from the file
            with torch.no_grad():
                for lora in self.all_loras:
                    std = math.sqrt(2.0 / (_in_features(lora) + lora.lora_down.weight.shape[0]))
                    nn.init.normal_(lora.lora_down.weight, std=std)
        self.requires_grad_(True)

    def requires_grad_(self, requires_grad: bool = True) -> LoRAFANetwork:
        super().requires_grad_(requires_grad)
        for lora in self.all_loras:
            lora.lora_down.requires_grad_(False)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def prepare_optimizer_params(
        self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None, default_lr: float
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """As networks.lora, without the frozen downs (a group left empty is dropped with its name)."""
        groups, names = super().prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
        kept: list[tuple[dict[str, Any], str]] = []
        for group, name in zip(groups, names, strict=True):
            params = [p for p in group["params"] if p.requires_grad]
            if params:
                kept.append(({**group, "params": params}, name))
        return [g for g, _ in kept], [n for _, n in kept]


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRAFANetwork:
    """kohya's signature; `kwargs` are networks.lora's --network_args."""
    return build_network(
        LoRAFANetwork, multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout, kwargs
    )


def create_network_from_weights(
    multiplier: float,
    file: Any,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: Any = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A LoRA-FA network shaped like the file."""
    plain, state = _lora_from_weights(
        multiplier, file, vae, text_encoder, unet, weights_sd, for_inference, **kwargs
    )
    dims = {lo.lora_name: lo.lora_dim for lo in plain.all_loras}
    alphas = {lo.lora_name: float(lo.alpha) for lo in plain.all_loras}
    network = LoRAFANetwork(
        text_encoder,
        unet,
        multiplier=multiplier,
        options=lora_options(kwargs),
        modules_dim=dims,
        modules_alpha=alphas,
    )
    return network, state
