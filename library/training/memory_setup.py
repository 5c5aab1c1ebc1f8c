"""Where the memory tricks of library/memory go for a run: fp8 or int8 base weights, block swapping,
offloaded checkpointing. Top layer (reads the config); the family says which blocks can be swapped."""

from __future__ import annotations

import logging

import torch

from library.config import TrainConfig
from library.families.base import ModelBundle, ModelFamily
from library.memory.host import release_freed_host_memory

log = logging.getLogger("loratrain")


def apply_fp8(config: TrainConfig, bundle: ModelBundle) -> None:
    """--fp8_base / --fp8_base_unet: frozen Linear weights stored as float8_e4m3fn (before any LoRA exists)."""
    if not (config.fp8_base or config.fp8_base_unet):
        return
    from library.memory.fp8 import store_fp8

    count = len(store_fp8(bundle.unet).modules)
    if config.fp8_base:
        for te in bundle.text_encoders:
            # transformers' T5 casts its activations to the dtype of the feed-forward `wo` weight, so that one
            # stays in the compute dtype (kohya patches T5 for the same reason).
            count += len(store_fp8(te, include=lambda name, _: not name.endswith(".wo")).modules)
    log.info("fp8 base weights: %d Linear layers stored as float8_e4m3fn", count)
    release_freed_host_memory()  # the wider copies just freed, or RSS keeps their size


def apply_quantize_base(config: TrainConfig, bundle: ModelBundle) -> None:
    """--quantize_base int8: the denoiser's frozen Linear layers as int8 (before any LoRA exists). Text
    encoders stay as loaded: they run once per caption (or are cached), and transformers code casts
    activations to weight dtypes (T5's `wo`)."""
    if not config.quantize_base:
        return
    from library.memory.int8 import quantize_int8

    handle = quantize_int8(bundle.unet)
    log.info(
        "int8 base weights: %d Linear layers of the denoiser, %.1f MB -> %.1f MB%s",
        len(handle.modules),
        handle.bytes_before / 2**20,
        handle.bytes_after / 2**20,
        f"; {len(handle.skipped)} left as loaded (shape)" if handle.skipped else "",
    )
    release_freed_host_memory()


def place_denoiser(
    config: TrainConfig, family: ModelFamily, bundle: ModelBundle, device: torch.device
) -> None:
    """Move the denoiser to the device; with --blocks_to_swap, its swapped blocks stay in (pinned) CPU memory
    and visit the device one at a time."""
    if not config.blocks_to_swap:
        bundle.unet.to(device)
        return
    from library.memory.block_swap import BlockSwapper, move_all_except_swapped

    pairs = [
        (BlockSwapper(blocks, n, device), blocks)
        for blocks, n in family.swap_plan(bundle, config.blocks_to_swap)
    ]
    move_all_except_swapped(bundle.unet, pairs, device)
    if any(swapper.active for swapper, _ in pairs):
        log.info(
            "block swap: %s blocks kept in CPU memory",
            " + ".join(str(n) for _, n in family.swap_plan(bundle, config.blocks_to_swap)),
        )


def enable_checkpointing(config: TrainConfig, bundle: ModelBundle) -> None:
    """Gradient checkpointing of the denoiser; --cpu_offload_checkpointing keeps the saved block inputs on
    the CPU (diffusers models take the checkpoint function as an argument)."""
    if config.cpu_offload_checkpointing:
        from library.memory.offload_checkpoint import offloaded_checkpoint

        bundle.unet.enable_gradient_checkpointing(gradient_checkpointing_func=offloaded_checkpoint)
    else:
        bundle.unet.enable_gradient_checkpointing()
