"""`--base_weights`: LoRA files merged into the frozen base model before training (kohya train_network.py).

Each file's ΔW = up @ down * alpha/rank * multiplier is added to the weight it targets, in float32 and cast back
to the weight's dtype. A fused FLUX module adds its row slice to each Linear it stands for. The files are read
through `networks.lora` (whatever --network_module trains), so any kohya-format LoRA/LoCon merges.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from networks.lora import LoRANetwork, create_network_from_weights

logger = logging.getLogger(__name__)


@torch.no_grad()
def add_deltas(network: LoRANetwork) -> int:
    """Add every module's ΔW (times its multiplier) to the base weights; returns the number of weights changed."""
    changed = 0
    for lora in network.all_loras:
        delta = lora.delta_weight().float() * lora.multiplier
        orgs = getattr(lora, "org_modules", (lora.org_module,))
        rows = getattr(lora, "_rows", [slice(None)])  # a fused module's row slice per Linear
        for org, part_rows in zip(orgs, rows, strict=True):
            weight = org.weight
            part = delta[part_rows].reshape(weight.shape).to(weight.device)
            weight.copy_((weight.float() + part).to(weight.dtype))
            changed += 1
    return changed


def merge_base_weights(
    paths: Sequence[str],
    multipliers: Sequence[float] | None,
    text_encoders: Sequence[nn.Module],
    unet: nn.Module,
) -> None:
    """Merge each LoRA file into the models (multiplier 1.0 where none is given)."""
    encoders = list(text_encoders)
    te_arg: nn.Module | list[nn.Module] = encoders[0] if len(encoders) == 1 else encoders
    for i, path in enumerate(paths):
        multiplier = multipliers[i] if multipliers is not None and i < len(multipliers) else 1.0
        network, state = create_network_from_weights(multiplier, path, None, te_arg, unet)
        network.load_weights(state)
        count = add_deltas(network)
        logger.info("--base_weights: merged %s x %g into %d weights", path, multiplier, count)
