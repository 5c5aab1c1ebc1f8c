"""`--estimate_memory`: the glue from a TrainConfig to library/memory/estimate.py.

The run validates as usual (preflight: datasets, model headers), loads the components on the CPU as training
would (nothing moves to a device), builds the network, and counts the step's activations with a meta-device
copy of the denoiser at the largest bucket and batch size. Top layer: reads the config, passes plain values.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from library.config import TrainConfig
from library.families.base import ModelBundle, ModelFamily
from library.memory import estimate as E
from library.training import run as R

log = logging.getLogger("loratrain")
CAPTION = "a photo"  # tokenizers pad to a fixed length, so the caption's words do not change any shape


def largest_step(dataset: Any) -> tuple[int, int, int]:
    """(width, height, batch) of the batch with the most pixels any dataset of the group can produce."""
    best = (0, 0, 0)
    for ds in dataset.datasets:
        for (width, height), members in ds.buckets:
            batch = min(ds.spec.batch_size, len(members))
            if width * height * batch > best[0] * best[1] * best[2]:
                best = (width, height, batch)
    return best


def _on_device_weights(
    config: TrainConfig, family: ModelFamily, bundle: ModelBundle, network: Any, live: tuple[int, ...]
) -> list[tuple[str, int]]:
    """(name, bytes) of the frozen weights that sit on the device during training (setup.py's placement)."""
    from library.training.te_cache import caching_text

    swapped: list[torch.nn.Module] = []
    resident: list[torch.nn.Module] = []
    if config.blocks_to_swap:
        for blocks, n in family.swap_plan(bundle, config.blocks_to_swap):
            swapped += list(blocks)[len(blocks) - n :] if n else []
        # The swapper keeps the block being computed and the one arriving on the device.
        resident = sorted(swapped, key=E.module_bytes, reverse=True)[:2]
    denoiser = E.module_bytes(bundle.unet, exclude=[network, *swapped]) + sum(map(E.module_bytes, resident))
    weights = [("denoiser weights" + (" (blocks swapped out)" if swapped else ""), denoiser)]
    for index, te in enumerate(bundle.text_encoders):
        if not caching_text(config) or index in live:
            weights.append((f"text encoder {index + 1} weights", E.module_bytes(te, exclude=[network])))
    if not (config.cache_latents or config.cache_latents_to_disk):
        weights.append(("VAE weights", E.module_bytes(bundle.vae)))
    return weights


def _meta_denoiser(config: TrainConfig, bundle: ModelBundle, dtype: torch.dtype) -> torch.nn.Module:
    """The same class built from the loaded denoiser's config on the meta device, in the training dtype."""
    with torch.device("meta"):
        unet = type(bundle.unet).from_config(bundle.unet.config)
    unet = unet.to(dtype).requires_grad_(False)
    if config.fp8_base or config.fp8_base_unet:
        from library.memory.fp8 import store_fp8

        store_fp8(unet)
    if config.quantize_base == "int8":
        from library.memory.int8 import quantize_int8

        quantize_int8(unet)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    return unet


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(tensor, device="meta")


def _text_conditioning(
    config: TrainConfig, family: ModelFamily, bundle: ModelBundle, batch: int, network: Any, train_te: bool
) -> tuple[dict[str, torch.Tensor], E.ActivationProfile | None]:
    """The conditioning for one batch (computed on the CPU, returned as meta tensors) and, when a text
    encoder LoRA trains, what its forward saves for backward (counted on that real CPU forward)."""
    max_tokens = None if config.max_token_length in (None, 75) else config.max_token_length

    def encode() -> dict[str, torch.Tensor]:
        return family.encode_prompts(
            bundle, [CAPTION] * batch, clip_skip=config.clip_skip, max_token_length=max_tokens
        )

    if not train_te:
        with torch.no_grad():
            return {k: _meta(v) for k, v in encode().items()}, None
    holder: dict[str, dict[str, torch.Tensor]] = {}

    def forward() -> torch.Tensor:
        with E.compute_context(config.mixed_precision):
            holder["cond"] = encode()
        return sum(v.float().sum() for v in holder["cond"].values() if v.is_floating_point())

    first, *others = bundle.text_encoders
    frozen = [*network.parameters(), *(t for te in others for t in [*te.parameters(), *te.buffers()])]
    profile = E.profile_activations(first, forward, skip=frozen, units=False)
    return {k: _meta(v) for k, v in holder["cond"].items()}, profile


def _denoiser_profile(
    config: TrainConfig,
    family: ModelFamily,
    bundle: ModelBundle,
    cond: dict[str, torch.Tensor],
    size: tuple[int, int, int],
    dtype: torch.dtype,
) -> E.ActivationProfile:
    """Forward + loss of a meta copy of the denoiser with the LoRA applied as in training."""
    width, height, batch = size
    unet = _meta_denoiser(config, bundle, dtype)
    meta_bundle = dataclasses.replace(bundle, unet=unet, cache={})
    network, _ = R.create_network(config, meta_bundle, train_unet=True, train_te=False)
    network.to("meta")
    if (config.full_fp16 or config.full_bf16) and dtype != torch.float32:
        network.to(dtype)
    down = family.latent_downscale
    latents = torch.zeros(batch, family.latent_channels, height // down, width // down)
    timesteps = family.sample_timesteps(bundle, latents, 0, 1000)
    noisy, target = family.noisy_input_and_target(bundle, latents, torch.randn_like(latents), timesteps)
    sizes = torch.tensor([[height, width]] * batch)
    batch_dict = {"original_sizes_hw": sizes, "crop_top_lefts": sizes * 0, "target_sizes_hw": sizes}
    extra = {
        k: _meta(v) for k, v in family.batch_conditioning(bundle, batch_dict, torch.device("cpu")).items()
    }
    noisy, target, timesteps = _meta(noisy), _meta(target), _meta(timesteps)

    def forward_and_loss() -> torch.Tensor:
        with E.compute_context(config.mixed_precision):
            pred = family.predict(meta_bundle, noisy.to(dtype), timesteps, {**cond, **extra})
            return torch.nn.functional.mse_loss(pred.float(), target.float())

    return E.profile_activations(unet, forward_and_loss, skip=list(network.parameters()))


def memory_estimate(config: TrainConfig, family: ModelFamily) -> E.MemoryEstimate:
    """Preflight, CPU load, network, meta forward: the expected peak of a training step on the device."""
    from library.training.memory_setup import apply_fp8, apply_quantize_base
    from library.training.optimizers import requested_optimizer
    from library.training.preflight import preflight
    from library.training.setup import live_text_encoders

    checked = preflight(config, family)
    dtype = R.weight_dtype_for(config.mixed_precision)
    bundle = R.load_bundle(config, family, checked.info, dtype)
    apply_fp8(config, bundle)
    apply_quantize_base(config, bundle)
    train_unet, train_te = not config.network_train_text_encoder_only, not config.network_train_unet_only
    network, _ = R.create_network(config, bundle, train_unet, train_te)
    if (config.full_fp16 or config.full_bf16) and dtype != torch.float32:
        network.to(dtype)
    te_lr = list(config.text_encoder_lr) or None
    groups, _ = network.prepare_optimizer_params(te_lr, config.unet_lr, config.learning_rate)
    trained = [p for group in groups for p in group["params"]]
    live = live_text_encoders(config, family, network, train_te)
    frozen = _on_device_weights(config, family, bundle, network, live)

    size = largest_step(checked.dataset)
    cond, te_profile = _text_conditioning(config, family, bundle, size[2], network, train_te)
    profile = (
        _denoiser_profile(config, family, bundle, cond, size, dtype) if train_unet else E.ActivationProfile()
    )
    if te_profile is not None:  # the text encoders' saved tensors live alongside the denoiser's
        profile.outside.update(te_profile.saved_bytes_by_storage())
    optimizer_type, _ = requested_optimizer(
        config.optimizer_type, config.use_8bit_adam, config.use_lion_optimizer
    )
    fused = 0 if config.fused_backward_pass else config.fused_optimizer_groups
    result = E.estimate_step(
        frozen=frozen,
        trained=trained,
        optimizer_type=optimizer_type,
        profile=profile,
        checkpointing=config.gradient_checkpointing and train_unet,
        fused_groups=fused,
        inputs_on_host=config.cpu_offload_checkpointing,
    )
    width, height, batch = size
    result.notes.insert(
        0, f"largest step: batch {batch} at {width}x{height}, {config.mixed_precision} compute"
    )
    result.notes.append(
        "not included: what the CUDA caching allocator reserves beyond live tensors (fragmentation)"
    )
    return result


def print_estimate(config: TrainConfig, family: ModelFamily) -> None:
    """`--estimate_memory`: the table on stdout; nothing is trained or written."""
    result = memory_estimate(config, family)
    print(result.table(), flush=True)
    print("estimate_memory: nothing was trained and nothing was written", flush=True)
