"""Build a `Run`: dataset plan, model, caches, network, optimizer and schedule, resume."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from library.config import TrainConfig
from library.errors import UserError
from library.families.base import ModelFamily
from library.training import optim
from library.training import run as R
from library.training.ddp import process_share
from library.training.launch import deepspeed_launch
from library.training.losses import LossOptions
from library.training.memory_setup import (
    apply_fp8,
    apply_quantize_base,
    enable_checkpointing,
    place_denoiser,
)
from library.training.metadata import training_metadata
from library.training.noise import NoiseOptions
from library.training.preflight import preflight
from library.training.state import Progress, load_state
from library.training.step import StepOptions
from library.training.te_cache import cache_text_encoder_outputs_if_needed, caching_text
from library.validate import parse_key_values, parse_resolution

log = logging.getLogger("loratrain")

SAVE_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _configure_model(
    config: TrainConfig,
    family: ModelFamily,
    bundle,
    device: torch.device,
    weight_dtype: torch.dtype,
    train_te: bool,
    live_text_encoders: tuple[int, ...] = (),
) -> None:
    # The family loaded the weights in weight_dtype already; only the device changes here.
    place_denoiser(config, family, bundle, device)
    for index, te in enumerate(bundle.text_encoders):
        # Cached outputs replace the frozen text encoders, which stay on the CPU; a trained one runs live.
        if not caching_text(config) or index in live_text_encoders:
            te.to(device)
    if config.xformers:
        bundle.unet.enable_xformers_memory_efficient_attention()
    if config.gradient_checkpointing:
        enable_checkpointing(config, bundle)
        bundle.unet.train()  # diffusers only checkpoints in train mode; the SD UNet has no dropout
        if train_te:
            for te in bundle.text_encoders:
                # Non-reentrant: with a frozen base, reentrant checkpoints would drop the LoRA gradients.
                if hasattr(te, "activation_checkpointing_enable"):  # transformers >= 5
                    te.activation_checkpointing_enable({"use_reentrant": False})
                else:
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                te.train()
    if config.torch_compile:
        from library.training.compile import compile_blocks

        compile_blocks(family.compile_blocks(bundle), config.dynamo_backend, device)


def live_text_encoders(config: TrainConfig, family: ModelFamily, network, train_te: bool) -> tuple[int, ...]:
    """With --cache_text_encoder_outputs: the text encoders whose LoRA trains, computed every step while the
    others come from the cache (kohya: FLUX's CLIP-L LoRA with T5 cached). Every encoder trained: nothing
    could be cached, an error."""
    if not (caching_text(config) and train_te):
        return ()
    trained = tuple(sorted({lo.te_index or 0 for lo in getattr(network, "text_encoder_loras", [])}))
    if len(trained) >= len(family.text_encoder_outputs):
        raise UserError(
            "--cache_text_encoder_outputs: the network trains every text encoder, so no output can be cached; "
            "add --network_train_unet_only, or keep one encoder frozen (FLUX: no train_t5xxl)"
        )
    return trained


def _half_network(network, accelerator, weight_dtype: torch.dtype, fp16: bool) -> None:
    """--full_fp16/--full_bf16: the LoRA parameters themselves in the autocast dtype (kohya)."""
    if weight_dtype == torch.float32:
        log.warning("--full_fp16 needs a CUDA GPU (fp16 falls back to float32 on CPU); LoRA stays float32")
        return
    network.to(weight_dtype)
    if fp16:
        optim.patch_scaler_for_fp16_params(accelerator.scaler)


def _schedule(config: TrainConfig, optimizer, optimizer_type: str, opt_args: dict, max_steps: int):
    """The lr schedule that runs (Adafactor and schedule-free optimizers pick their own) and its warmup."""
    warmup = optim.resolve_warmup(config.lr_warmup_steps, max_steps)
    scheduler_args, _ = parse_key_values(config.lr_scheduler_args, "--lr_scheduler_args")
    options = optim.ScheduleOptions(
        warmup_steps=warmup,
        total_steps=max_steps,
        num_cycles=config.lr_scheduler_num_cycles,
        power=config.lr_scheduler_power,
        timescale=config.lr_scheduler_timescale,
        min_lr_ratio=config.lr_scheduler_min_lr_ratio,
        decay_steps=optim.resolve_warmup(config.lr_decay_steps, max_steps, "--lr_decay_steps"),
        initial_lr=config.learning_rate,
        args=scheduler_args,
    )
    scheduler_type = config.lr_scheduler_type
    name = config.lr_scheduler
    if optim.is_schedule_free(optimizer_type) or not scheduler_type:
        name = optim.effective_scheduler(optimizer_type, opt_args, name)
        scheduler_type = "" if optim.is_schedule_free(optimizer_type) else scheduler_type
    scheduler = optim.create_scheduler(
        name,
        optimizer,
        warmup_steps=warmup,
        total_steps=max_steps,
        options=options,
        scheduler_type=scheduler_type,
    )
    # kohya records the schedule that runs; Adafactor's own lr shows as "adafactor:<initial lr>".
    desc = f"adafactor:{config.learning_rate}" if name == "adafactor" else (scheduler_type or name)
    return scheduler, warmup, desc


def loss_and_noise_options(config: TrainConfig) -> tuple[LossOptions, NoiseOptions]:
    loss = LossOptions(
        loss_type=config.loss_type,
        huber_schedule=config.huber_schedule,
        huber_c=config.huber_c,
        huber_scale=config.huber_scale,
        min_snr_gamma=config.min_snr_gamma,
        scale_v_pred_loss_like_noise_pred=config.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=config.v_pred_like_loss,
        debiased_estimation_loss=config.debiased_estimation_loss,
    )
    noise = NoiseOptions(
        noise_offset=config.noise_offset,
        noise_offset_random_strength=config.noise_offset_random_strength,
        adaptive_noise_scale=config.adaptive_noise_scale,
        multires_noise_iterations=config.multires_noise_iterations,
        multires_noise_discount=config.multires_noise_discount,
        ip_noise_gamma=config.ip_noise_gamma,
        ip_noise_gamma_random_strength=config.ip_noise_gamma_random_strength,
    )
    return loss, noise


def build_run(config: TrainConfig, family: ModelFamily) -> R.Run:
    started = time.time()
    # Everything that can fail without weights fails here, dataset and model problems in one report.
    checked = preflight(config, family)
    seed, dataset, info = checked.seed, checked.dataset, checked.info
    loss_options, noise_options = loss_and_noise_options(config)
    accelerator = R.make_accelerator(config.mixed_precision)
    device = accelerator.device
    weight_dtype = R.weight_dtype_for(accelerator.mixed_precision)

    bundle = R.load_bundle(config, family, info, weight_dtype)
    if config.base_weights:  # before fp8 and before any cache, which must see the merged model
        from networks.base_weights import merge_base_weights

        merge_base_weights(
            config.base_weights, config.base_weights_multiplier, bundle.text_encoders, bundle.unet
        )
    apply_fp8(config, bundle)
    apply_quantize_base(config, bundle)
    if config.zero_terminal_snr:
        family.enforce_zero_terminal_snr(bundle)
    share = process_share(accelerator)  # caches split their encoding over the launch's processes
    cached = R.cache_latents_if_needed(config, family, bundle, dataset, device, share=share, seed=seed)
    if not cached:
        bundle.vae.to(device)
    max_token_length = None if config.max_token_length in (None, 75) else config.max_token_length
    text_cache = cache_text_encoder_outputs_if_needed(
        config,
        family,
        bundle,
        dataset,
        device,
        dtype=weight_dtype,
        max_token_length=max_token_length,
        autocast=accelerator.autocast,
        share=share,
    )

    train_unet = not config.network_train_text_encoder_only
    train_te = not config.network_train_unet_only
    network, net_kwargs = R.create_network(config, bundle, train_unet, train_te)
    network.to(device)
    if config.full_fp16 or config.full_bf16:
        _half_network(network, accelerator, weight_dtype, config.full_fp16)
    live = live_text_encoders(config, family, network, train_te)
    _configure_model(config, family, bundle, device, weight_dtype, train_te, live)

    te_lr = list(config.text_encoder_lr) or None  # one value, or one per text encoder (SDXL: TE1, TE2)
    groups, lr_names = network.prepare_optimizer_params(te_lr, config.unet_lr, config.learning_rate)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise UserError(
            "no parameters to train: every learning rate is 0 (check --unet_lr/--text_encoder_lr)"
        )
    opt_args, _ = parse_key_values(config.optimizer_args, "--optimizer_args")
    optimizer_type, _ = optim.requested_optimizer(
        config.optimizer_type, config.use_8bit_adam, config.use_lion_optimizer
    )
    # The metadata records what runs: AdamW8bit falls back to AdamW on CPU.
    optimizer, desc = optim.build_optimizer(optimizer_type, groups, config.learning_rate, opt_args, device)
    if config.full_bf16 and weight_dtype == torch.bfloat16:
        from library.memory.stochastic_rounding import enable_stochastic_rounding

        # Before the lr scheduler wraps `step`; bf16 alone would drop updates below half a bf16 step.
        enable_stochastic_rounding(optimizer, seed)

    batches_per_epoch = -(-dataset.num_batches_per_epoch // accelerator.num_processes)
    max_steps, num_epochs = R.train_steps_and_epochs(config, batches_per_epoch)
    # Token warmup counts optimizer steps; DataLoader workers get this with their copy of the group.
    dataset.set_training_steps(
        max_steps,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_processes=accelerator.num_processes,
    )
    scheduler, warmup, scheduler_desc = _schedule(config, optimizer, optimizer_type, opt_args, max_steps)
    if not deepspeed_launch():  # DeepSpeed takes the optimizer with the model (library/training/ddp.py)
        optimizer = accelerator.prepare(optimizer)

    progress = Progress(seed=seed)
    if config.resume:
        progress = load_state(
            Path(config.resume),
            network=network,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=accelerator.scaler,
        )
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            config.resume,
            progress.global_step,
            progress.epoch + 1,
            progress.batch_in_epoch,
        )
    if config.fused_backward_pass or config.fused_optimizer_groups:
        from library.training.fused import fuse_optimizer

        # After resume: the state loads into the plain optimizer, whose layout the fused one keeps.
        optimizer = fuse_optimizer(
            optimizer,
            per_tensor=config.fused_backward_pass,
            groups=config.fused_optimizer_groups,
            max_grad_norm=config.max_grad_norm,
        )
        log.info("optimizer steps inside backward: %d groups of LoRA tensors", optimizer.num_chunks)

    lo = 0 if config.min_timestep is None else config.min_timestep
    hi = 1000 if config.max_timestep is None else config.max_timestep
    options = StepOptions(
        min_timestep=lo,
        max_timestep=hi,
        clip_skip=config.clip_skip,
        max_token_length=max_token_length,
        train_text_encoder=train_te,
        weight_dtype=weight_dtype,
        loss=loss_options,
        noise=noise_options,
        num_train_timesteps=bundle.noise_scheduler.config.num_train_timesteps,
        weighted_captions=config.weighted_captions,
        text_cache=text_cache,
        live_text_encoders=live,
    )
    metadata = training_metadata(
        config,
        info,
        network_dim=config.network_dim or 4,
        network_alpha=config.network_alpha,
        network_args=net_kwargs,
        dataset=dataset,
        resolution=parse_resolution(config.resolution),
        seed=seed,
        optimizer_desc=desc,
        mixed_precision=accelerator.mixed_precision,
        total_batch_size=config.train_batch_size
        * accelerator.num_processes
        * config.gradient_accumulation_steps,
        num_batches_per_epoch=batches_per_epoch,
        num_epochs=num_epochs,
        max_train_steps=max_steps,
        lr_warmup_steps=warmup,
        lr_scheduler_desc=scheduler_desc,
        started=started,
    )
    return R.Run(
        config=config,
        family=family,
        bundle=bundle,
        dataset=dataset,
        accelerator=accelerator,
        network=network,
        optimizer=optimizer,
        scheduler=scheduler,
        lr_names=lr_names,
        params=params,
        step_options=options,
        max_train_steps=max_steps,
        num_epochs=num_epochs,
        batches_per_epoch=batches_per_epoch,
        metadata=metadata,
        save_dtype=SAVE_DTYPES[config.save_precision],
        progress=progress,
    )
