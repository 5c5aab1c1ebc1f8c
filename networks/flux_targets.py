"""FLUX.1 LoRA targets as kohya's networks.lora_flux names and ranks them, on diffusers' FluxTransformer2DModel.

Names come from the BFL <-> diffusers table in `library.families.flux_checkpoint` (one table for the checkpoint
converter and the LoRA keys). Candidates are every double/single block module (kohya: the Linears of
DoubleStreamBlock / SingleStreamBlock) and the input embedders (img_in, time_in, vector_in, guidance_in,
txt_in: only with `in_dims`); the final layer is never a target, as in kohya.
"""

from __future__ import annotations

from torch import nn

from networks.flux_args import IN_DIM_FILTERS, TYPE_DIM_ARGS
from networks.lora_args import LoRAOptions
from networks.targets import Target

_BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")
_IN_LAYERS = ("img_in", "time_in.", "vector_in.", "guidance_in.", "txt_in")


def transformer_groups(root: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """(BFL module path, diffusers module paths) of every candidate: blocks first, then the input embedders.

    Modules the model lacks (schnell has no guidance embedder) are left out."""
    from library.families.flux_checkpoint import module_map

    pairs = module_map(len(root.transformer_blocks), len(root.single_transformer_blocks))  # type: ignore[arg-type]
    blocks = [p for p in pairs if p[0].startswith(_BLOCK_PREFIXES)]
    inputs = [p for p in pairs if p[0].startswith(_IN_LAYERS)]
    present = {name for name, _ in root.named_modules()}
    return [(bfl, tuple(paths)) for bfl, paths in blocks + inputs if all(p in present for p in paths)]


def flux_rank(target: Target, options: LoRAOptions) -> int | None:
    """kohya's rank for a candidate: None = network_dim, 0 = no module."""
    if target.component == "text_encoder":
        return None if target.te_index == 0 or options.train_t5xxl else 0
    name = target.name
    for index, fragment in enumerate(IN_DIM_FILTERS):
        if fragment in name:
            return options.in_dims[index] if options.in_dims else 0
    double = name.startswith("lora_unet_double_blocks_")
    if (options.train_blocks or "all") == ("single" if double else "double"):
        return 0
    block = int(name.split("_")[4])  # lora_unet_{double|single}_blocks_<i>_...
    chosen = options.train_double_block_indices if double else options.train_single_block_indices
    if chosen is not None and block not in chosen:
        return 0
    for arg, words in TYPE_DIM_ARGS.items():
        rank = getattr(options, arg)
        if rank is not None and all(word in name for word in words):
            return rank
    return None
