"""`--network_module networks.lora_flux`: kohya's FLUX.1 LoRA module name, served by `networks.lora`.

`networks.lora` picks the FLUX target table from the model itself (FluxTransformer2DModel + CLIP-L + T5), so
both module names train the same network with kohya's lora_flux keys; this one also refuses other families
before any weights load, as kohya's lora_flux cannot train them.
"""

from __future__ import annotations

from collections.abc import Iterable

from networks.flux_args import FLUX_ONLY_ARGS
from networks.lora import (
    NETWORK_ARGS,
    LoRAModule,
    LoRANetwork,
    create_network,
    create_network_from_weights,
    parse_network_args,
)
from networks.lora_args import family_problems as lora_family_problems

__all__ = [
    "NETWORK_ARGS",
    "LoRAModule",
    "LoRANetwork",
    "create_network",
    "create_network_from_weights",
    "family_problems",
    "parse_network_args",
]


def family_problems(args: Iterable[str] | None, family: str) -> list[str]:
    """Problems using this module for `family` with these --network_args (checked before loading weights)."""
    if family == "flux":
        return lora_family_problems(args, family)
    flux_args = sorted(set(parse_network_args(args)) & FLUX_ONLY_ARGS)
    extra = f" and remove {', '.join(flux_args)}" if flux_args else ""
    return [
        f"--network_module networks.lora_flux: trains FLUX.1 only; use --network_module networks.lora for this "
        f"{family.upper()} model{extra}"
    ]
