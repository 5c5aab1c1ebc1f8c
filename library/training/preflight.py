"""Everything before any weights load: seed, datasets, model inspection and the printed plan.

A real run starts here; `--dry_run` stops after the plan and `--debug_dataset` after writing its previews.
This module is at the top layer with run.py and setup.py: it reads the config and passes plain values down.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from library.config import TrainConfig
from library.data.plan import TrainingNumbers
from library.errors import UserError
from library.families.base import ModelFamily, ModelInfo
from library.training import run as R

log = logging.getLogger("loratrain")


@dataclass
class Preflight:
    seed: int
    dataset: Any  # DatasetGroup
    info: ModelInfo
    numbers: TrainingNumbers


def world_size() -> int:
    """Processes of the launch (accelerate and torchrun set WORLD_SIZE), known before the Accelerator is."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def training_numbers(config: TrainConfig, num_batches: int, num_processes: int) -> TrainingNumbers:
    batches = -(-num_batches // num_processes)
    max_steps, num_epochs = R.train_steps_and_epochs(config, batches)
    return TrainingNumbers(
        max_train_steps=max_steps,
        num_epochs=num_epochs,
        batches_per_epoch=batches,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_processes=num_processes,
        from_epochs=config.max_train_epochs is not None,
    )


def cache_summary(config: TrainConfig, family: ModelFamily, dataset: Any) -> str | None:
    """The plan's latent-cache line: disk cache hits and misses (headers only), or what RAM caching does."""
    if not (config.cache_latents or config.cache_latents_to_disk):
        return None
    images = sum(1 for _ in dataset.iter_items())
    if not config.cache_latents_to_disk:
        return f"Latent cache (RAM): {images} images will be encoded once the VAE is loaded"
    from library.data.latent_cache import check_latent_cache

    hits, misses = check_latent_cache(
        dataset,
        R.latent_cache_id(config, family),
        file_suffix=family.latent_file_suffix,
        skip_check=config.skip_cache_check,
        multi_resolution=family.latent_multi_resolution,
    )
    return f"Latent cache (disk): {hits} valid cache files reused, {misses} images to encode"


def run_seed(config: TrainConfig) -> int:
    """Seed every RNG; a resumed run without --seed keeps the seed of the run it continues, because the
    batch order and the validation split depend on it (a new seed would train on held-out images)."""
    if config.seed is None and config.resume:
        from library.training.state import read_progress

        # An unreadable state keeps the new seed: validation reports it, or loading it fails before training.
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            config = replace(config, seed=read_progress(Path(config.resume))[0].seed)
    return R.pick_seed(config)


def check_prediction_flags(config: TrainConfig, info: ModelInfo) -> None:
    """Loss flags tied to the prediction type; it may come from the model's scheduler config, so this waits
    for the model's inspection (headers only)."""
    from library.errors import UserError
    from library.training.losses import LossOptions, prediction_problems

    options = LossOptions(
        scale_v_pred_loss_like_noise_pred=config.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=config.v_pred_like_loss,
    )
    if problems := prediction_problems(options, info.v_parameterization):
        raise UserError(*problems)
    if config.zero_terminal_snr and not info.v_parameterization:
        log.warning(
            "--zero_terminal_snr without v-prediction: the last step's input is pure noise (kohya warns)"
        )


def foreign_options(config: TrainConfig, family: ModelFamily) -> None:
    """Options of another family's script (e.g. FLUX's --guidance_scale with train_network.py) set away from
    their defaults: an error naming the script that reads them, since ignoring them would surprise."""
    from dataclasses import fields

    from library.config.options import default_of
    from library.families import family_names, get_family

    owners: dict[str, str] = {}
    for name in family_names():
        other = get_family(name)
        for option in other.option_names:
            owners.setdefault(option, other.script)
    defaults = {f.name: default_of(f) for f in fields(config)}
    stray = [
        f"--{option}: only {script} reads it; remove it or use {script}"
        for option, script in owners.items()
        if option not in family.option_names and getattr(config, option) != defaults[option]
    ]
    if stray:
        raise UserError(*stray)


def check_network_family(config: TrainConfig, family: ModelFamily) -> None:
    """--network_module / --network_args that do not fit this family (e.g. FLUX-only args on SD); our own
    network modules say which through `family_problems`."""
    if not config.network_module.startswith("networks."):
        return
    import importlib

    check = getattr(importlib.import_module(config.network_module), "family_problems", None)
    problems = check(config.network_args, family.name) if check is not None else []
    if problems:
        raise UserError(*problems)


def check_family_flags(config: TrainConfig, family: ModelFamily) -> None:
    """Options that only some families read: an error where ignoring one would surprise, else a warning."""
    given = {"--tokenizer_path": config.tokenizer_path, "--tokenizer_2_path": config.tokenizer_2_path}
    unused = [flag for flag, value in given.items() if value and flag not in family.tokenizer_flags]
    if unused:
        raise UserError(
            *(f"{flag}: this model family has no such tokenizer; remove {flag}" for flag in unused)
        )
    foreign_options(config, family)
    check_network_family(config, family)
    from library.training.lora_inputs import check_lora_inputs

    if config.resume:  # the family and network module a state recorded; then what its tensor names say
        from library.training.state import check_state_fits

        module = config.network_module
        check_state_fits(Path(config.resume), family=family.name, script=family.script, network_module=module)
    check_lora_inputs(config, family)
    encoders = len(family.tokenizer_flags)  # one tokenizer per text encoder
    if len(config.text_encoder_lr) > encoders:
        raise UserError(
            f"--text_encoder_lr: {len(config.text_encoder_lr)} values given, but this model has {encoders} text "
            f"encoder(s); pass one value for all of them"
            + (f" or {encoders}, one each" if encoders > 1 else "")
        )
    problems = []
    caching = config.cache_text_encoder_outputs or config.cache_text_encoder_outputs_to_disk
    if caching and not config.network_train_unet_only and len(family.text_encoder_outputs) == 1:
        flag = "--cache_text_encoder_outputs" + (
            "_to_disk" if config.cache_text_encoder_outputs_to_disk else ""
        )
        problems.append(
            f"{flag} needs --network_train_unet_only: a text-encoder LoRA changes the text encoder's outputs "
            "at every step, so they cannot be cached; add --network_train_unet_only or remove " + flag
        )
    from library.memory.int8 import quantize_base_problems

    problems += quantize_base_problems(config.quantize_base, config.fp8_base, config.fp8_base_unet)
    if not family.block_swap_supported and config.blocks_to_swap:
        problems.append(
            f"--blocks_to_swap: {family.script} has no block list to swap; remove --blocks_to_swap"
        )
    if config.weighted_captions and not family.weighted_captions_supported:
        problems.append(
            f"--weighted_captions: {family.script} has no caption weighting (kohya: SD and SDXL only)"
        )
    if not family.snr_weighting_supported:
        needs_schedule = {
            "--min_snr_gamma": config.min_snr_gamma,
            "--debiased_estimation_loss": config.debiased_estimation_loss,
            "--scale_v_pred_loss_like_noise_pred": config.scale_v_pred_loss_like_noise_pred,
            "--v_pred_like_loss": config.v_pred_like_loss,
            "--zero_terminal_snr": config.zero_terminal_snr,
        }
        problems += [
            f"{flag}: needs a DDPM noise schedule, which {family.script}'s flow-matching model does not have "
            "(kohya ignores it silently); remove it"
            for flag, value in needs_schedule.items()
            if value
        ]
        if config.loss_type in ("huber", "smooth_l1") and config.huber_schedule == "snr":
            problems.append(
                f"--huber_schedule snr: needs a DDPM noise schedule; use constant or exponential with {family.script}"
            )
    if problems:
        raise UserError(*problems)
    if config.clip_skip is not None and not family.clip_skip_supported:
        log.warning(
            "--clip_skip %s is ignored: this model family always uses the layers it was trained on "
            "(SDXL: the penultimate ones)",
            config.clip_skip,
        )


def check_launch_flags(config: TrainConfig) -> None:
    """DeepSpeed and FSDP launches (known from accelerate's environment) against the options."""
    from library.training.launch import launch_problems
    from library.training.optim import is_schedule_free, requested_optimizer

    optimizer_type, _ = requested_optimizer(
        config.optimizer_type, config.use_8bit_adam, config.use_lion_optimizer
    )
    problems = launch_problems(
        save_state=config.save_state or config.save_state_on_train_end,
        resume=bool(config.resume),
        fused=config.fused_backward_pass or bool(config.fused_optimizer_groups),
        schedule_free=is_schedule_free(optimizer_type),
        stochastic_rounding=config.full_bf16,
    )
    if problems:
        raise UserError(*problems)


def preflight(config: TrainConfig, family: ModelFamily) -> Preflight:
    """Seed, dataset scan and model inspection, all problems in one UserError; prints the plan (rank 0)."""
    check_family_flags(config, family)
    check_launch_flags(config)
    seed = run_seed(config)
    log.info("seed: %d", seed)
    dataset, info = R.scan_dataset_and_model(config, family, seed)
    check_prediction_flags(config, info)
    numbers = training_numbers(config, dataset.num_batches_per_epoch, world_size())
    if config.profile_steps and config.max_train_epochs is not None:
        from library.training.profiling import profile_steps_problems

        problems = profile_steps_problems(config.profile_steps, numbers.max_train_steps)
        if problems:
            raise UserError(*problems)
    epochs_decide_steps = config.max_train_epochs is not None and not config.lr_scheduler_type
    if config.lr_scheduler == "warmup_stable_decay" and epochs_decide_steps:
        # validate() could not know the step count: it comes from the dataset size.
        from library.training.optim import check_stable_decay

        problems = check_stable_decay(config.lr_warmup_steps, config.lr_decay_steps, numbers.max_train_steps)
        if problems:
            raise UserError(*problems)
    # Token warmup counts optimizer steps; setup repeats this once the Accelerator knows the process count.
    dataset.set_training_steps(
        numbers.max_train_steps,
        gradient_accumulation_steps=numbers.gradient_accumulation_steps,
        num_processes=numbers.num_processes,
    )
    if R.is_main_process():
        from library.training.te_cache import plan_line

        caches = [cache_summary(config, family, dataset), plan_line(config, family, dataset)]
        summary = "\n".join(line for line in caches if line) or None
        print(dataset.plan_text(numbers, summary), flush=True)
    return Preflight(seed, dataset, info, numbers)


def dry_run(config: TrainConfig, family: ModelFamily) -> None:
    """`--dry_run` / `--debug_dataset`: the plan (and previews), then stop; no weights are loaded."""
    checked = preflight(config, family)
    if not config.debug_dataset:
        print("dry run: nothing was trained and no weights were loaded", flush=True)
        return
    if not R.is_main_process():
        return  # rank 0 writes the previews
    from library.data.debug_preview import write_debug_previews

    folder = Path(config.debug_dataset_dir or Path(config.output_dir or ".") / "debug_dataset")
    written = write_debug_previews(checked.dataset, folder, epochs=config.debug_dataset_epochs)
    print(f"debug_dataset: {written} preview images in {folder}; nothing was trained", flush=True)
