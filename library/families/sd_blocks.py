"""The SD 1.x / 2.x / SDXL UNet as a block list for --blocks_to_swap: its sub-blocks in execution order.

A diffusers UNet2DConditionModel has no flat list of equal blocks like a transformer. Its units here are
the modules that hold all the weights of its down, mid and up blocks and that run one after the other:

- each down block: its resnets, each followed by its attention (Transformer2DModel) when it has them, then
  its downsamplers;
- the mid block: resnets[0], then each attention followed by the next resnet;
- each up block: like a down block, with upsamplers.

Each unit's weights are used only while it runs (skip connections carry activations, never weights) and
these are the modules diffusers checkpoints under gradient checkpointing (resnets directly, attentions
through their inner transformer blocks), so a unit's recompute also happens while it is fetched. The order is
checked against forward hooks of real tiny SD1 and SDXL UNets in tests/test_memory_block_swap_unet.py.
"""

from __future__ import annotations

from torch import nn

from library.errors import UserError

# diffusers block classes whose forward runs (resnet, attention) pairs, then the resamplers.
_PAIRED = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
_MID = {"UNetMidBlock2DCrossAttn", "UNetMidBlock2D"}


def _paired(block: nn.Module) -> list[nn.Module]:
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    units: list[nn.Module] = []
    for resnet, attention in zip(block.resnets, attentions, strict=True):
        units += [resnet] + ([attention] if attention is not None else [])
    for name in ("downsamplers", "upsamplers"):
        units += list(getattr(block, name, None) or [])
    return units


def _mid(block: nn.Module) -> list[nn.Module]:
    units: list[nn.Module] = [block.resnets[0]]
    for attention, resnet in zip(block.attentions, block.resnets[1:], strict=True):
        units += ([attention] if attention is not None else []) + [resnet]
    return units


def _units_of(block: nn.Module, known: set[str], split) -> list[nn.Module]:
    kind = type(block).__name__
    if kind not in known:
        raise UserError(
            f"--blocks_to_swap: this UNet has a {kind}, whose execution order is not known here; "
            "remove --blocks_to_swap"
        )
    return split(block)


def unet_swap_units(unet: nn.Module) -> list[nn.Module]:
    """The UNet's swappable units in the order its forward runs them (see the module doc)."""
    units: list[nn.Module] = []
    for block in unet.down_blocks:
        units += _units_of(block, _PAIRED, _paired)
    if unet.mid_block is not None:  # configs may have none
        units += _units_of(unet.mid_block, _MID, _mid)
    for block in unet.up_blocks:
        units += _units_of(block, _PAIRED, _paired)
    return units
