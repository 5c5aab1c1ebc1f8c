"""Orchestration of a LoRA training run: validate, plan data, load, cache, build network, train, save.

This is the top of the library: it reads the TrainConfig and hands plain values to everything below.
Order matters for the user: every check that needs no weights runs before any weights load.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from library.config import TrainConfig, write_output_config
from library.errors import UserError
from library.families.base import ModelBundle, ModelFamily
from library.training.state import Progress
from library.validate import parse_key_values, parse_resolution, validate_or_raise

log = logging.getLogger("loratrain")


@dataclass
class Run:
    """Everything the loop needs, built once by `prepare`."""

    config: TrainConfig
    family: ModelFamily
    bundle: ModelBundle
    dataset: Any
    accelerator: Any
    network: Any
    optimizer: Any
    scheduler: Any
    lr_names: list[str]
    params: list[torch.nn.Parameter]
    step_options: Any
    max_train_steps: int
    num_epochs: int
    batches_per_epoch: int  # per process
    metadata: dict[str, str]
    save_dtype: torch.dtype | None
    progress: Progress = field(default_factory=Progress)


def dataset_defaults(config: TrainConfig) -> Any:
    from library.data.augment import parse_face_crop_range
    from library.data.dataset_config import DatasetDefaults

    return DatasetDefaults(
        resolution=parse_resolution(config.resolution),
        train_batch_size=config.train_batch_size,
        enable_bucket=config.enable_bucket,
        min_bucket_reso=config.min_bucket_reso,
        max_bucket_reso=config.max_bucket_reso,
        bucket_reso_steps=config.bucket_reso_steps,
        bucket_no_upscale=config.bucket_no_upscale,
        caption_extension=config.caption_extention or config.caption_extension,
        shuffle_caption=config.shuffle_caption,
        caption_separator=config.caption_separator,
        keep_tokens=config.keep_tokens,
        keep_tokens_separator=config.keep_tokens_separator,
        secondary_separator=config.secondary_separator,
        enable_wildcard=config.enable_wildcard,
        caption_prefix=config.caption_prefix,
        caption_suffix=config.caption_suffix,
        caption_dropout_rate=config.caption_dropout_rate,
        caption_dropout_every_n_epochs=config.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate=config.caption_tag_dropout_rate,
        token_warmup_min=config.token_warmup_min,
        token_warmup_step=config.token_warmup_step,
        flip_aug=config.flip_aug,
        random_crop=config.random_crop,
        color_aug=config.color_aug,
        face_crop_aug_range=parse_face_crop_range(config.face_crop_aug_range),
        resize_interpolation=config.resize_interpolation,
        alpha_mask=config.alpha_mask,
        masked_loss=config.masked_loss,
        dataset_repeats=config.dataset_repeats,
        prior_loss_weight=config.prior_loss_weight,
        validation_split=config.validation_split,
        validation_seed=config.validation_seed,
    )


def build_dataset(config: TrainConfig, family: ModelFamily, seed: int) -> Any:
    """Read the dataset definition and scan images (headers only); raises UserError with every problem."""
    from library.data.dataset import build_dataset_group
    from library.data.dataset_config import blueprint_from_dirs, load_dataset_blueprint

    defaults = dataset_defaults(config)
    if config.dataset_config:
        if config.train_data_dir or config.reg_data_dir or config.in_json:
            log.warning("--dataset_config is set, so --train_data_dir/--reg_data_dir/--in_json are ignored")
        specs = load_dataset_blueprint(Path(config.dataset_config), defaults)
    elif config.in_json:
        from library.data.finetune import blueprint_from_metadata

        if config.masked_loss and not config.alpha_mask:
            raise UserError(
                "--masked_loss needs masks: with --in_json pass --alpha_mask (the images' alpha channel), or use "
                "a --dataset_config with alpha_mask = true per subset"
            )
        image_dir = Path(config.train_data_dir) if config.train_data_dir else None
        specs = blueprint_from_metadata(Path(config.in_json), image_dir, defaults)
    else:
        specs = blueprint_from_dirs(
            Path(config.train_data_dir),
            Path(config.reg_data_dir) if config.reg_data_dir else None,
            defaults,
        )
    step = family.bucket_reso_steps_multiple
    bad = [i for i, spec in enumerate(specs) if spec.enable_bucket and spec.bucket_reso_steps % step]
    if bad:
        raise UserError(
            *(
                f"bucket_reso_steps of dataset {i} is {specs[i].bucket_reso_steps}; this model family needs a "
                f"multiple of {step} (set bucket_reso_steps = {step})"
                for i in bad
            )
        )
    problems = []
    if config.cache_latents or config.cache_latents_to_disk:
        from library.data.latent_cache import cache_problems

        flag = "--cache_latents_to_disk" if config.cache_latents_to_disk else "--cache_latents"
        problems = cache_problems((subset for spec in specs for subset in spec.subsets), flag)
    if config.cache_text_encoder_outputs or config.cache_text_encoder_outputs_to_disk:
        from library.data.text_cache import text_cache_problems
        from library.training.te_cache import cache_flag

        problems += text_cache_problems(specs, cache_flag(config))
    try:
        group = build_dataset_group(
            specs,
            seed=seed,
            prior_loss_weight=config.prior_loss_weight,
            latent_downscale=family.latent_downscale,
            strict_dataset=config.strict_dataset,
        )
    except UserError as exc:
        raise UserError(*problems, *exc.problems) from None
    if problems:
        raise UserError(*problems)
    return group


def scan_dataset_and_model(config: TrainConfig, family: ModelFamily, seed: int) -> tuple[Any, Any]:
    """The dataset scan and the model inspection (no weights), their problems reported together."""
    problems: list[str] = []
    dataset = info = None
    try:
        dataset = build_dataset(config, family, seed)
    except UserError as exc:
        problems += exc.problems
    try:
        info = family.inspect(
            Path(config.pretrained_model_name_or_path),
            v2=config.v2,
            v_parameterization=config.v_parameterization,
            options={name: getattr(config, name) for name in family.option_names},
        )
    except UserError as exc:
        problems += exc.problems
    if problems:
        raise UserError(*problems)
    return dataset, info


def load_bundle(config: TrainConfig, family: ModelFamily, info: Any, dtype: torch.dtype) -> ModelBundle:
    """Load the model's weights in `dtype`; the VAE follows kohya: halved unless --no_half_vae."""
    bundle = family.load(
        info,
        vae_path=Path(config.vae) if config.vae else None,
        tokenizer_path=Path(config.tokenizer_path) if config.tokenizer_path else None,
        dtype=dtype,
        tokenizer_cache_dir=Path(config.tokenizer_cache_dir) if config.tokenizer_cache_dir else None,
        tokenizer_2_path=Path(config.tokenizer_2_path) if config.tokenizer_2_path else None,
    )
    if not config.no_half_vae and dtype != torch.float32:
        bundle.vae.to(dtype=dtype)
    return bundle


def make_accelerator(mixed_precision: str) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if mixed_precision == "fp16" and not torch.cuda.is_available():
        log.warning("--mixed_precision fp16 needs a CUDA GPU; training in float32 on CPU")
        mixed_precision = "no"
    # accelerate keeps the first Accelerator's precision in a process-wide singleton and refuses another
    # one; a later run in the same process (tests, a GUI) starts clean. The process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    from library.training.launch import accelerator_options, check_world

    accelerator = Accelerator(mixed_precision=mixed_precision, **accelerator_options())
    check_world(accelerator.num_processes)
    return accelerator


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def latent_cache_id(config: TrainConfig, family: ModelFamily) -> str:
    """Names the encoder of the latent cache; the dry run checks disk caches with the same id."""
    from library.data.latent_cache import encoder_cache_id

    # FLUX's autoencoder is its own file (--ae): a replaced ae must invalidate the cache, the transformer not.
    ae = config.ae if "ae" in family.option_names else None
    return encoder_cache_id(family.name, Path(config.vae or ae or config.pretrained_model_name_or_path))


def cache_latents_if_needed(
    config: TrainConfig,
    run_family: ModelFamily,
    bundle: ModelBundle,
    dataset: Any,
    device: torch.device,
    *,
    share: Any = None,
    seed: int | None = None,
) -> Any:
    """The CacheReport, or None when latents are not cached. `share` (library.data.sharing.Share): this
    process's part of a multi-process launch; `seed`: the run's seed, so sampled latents do not depend on
    how the encoding was split."""
    from library.data.sharing import ALONE

    if not (config.cache_latents or config.cache_latents_to_disk):
        return None
    from library.data.latent_cache import cache_latents

    vae = bundle.vae.to(device)
    vae_dtype = next(vae.parameters()).dtype

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return run_family.encode_images(bundle, pixels.to(device, vae_dtype)).float().cpu()

    report = cache_latents(
        dataset,
        encode,
        cache_id=latent_cache_id(config, run_family),
        to_disk=config.cache_latents_to_disk,
        batch_size=config.vae_batch_size,
        file_suffix=run_family.latent_file_suffix,
        multi_resolution=run_family.latent_multi_resolution,
        skip_check=config.skip_cache_check,
        share=share or ALONE,
        seed=seed,
    )
    log.info("latents: %s", report)
    bundle.vae.to("cpu")  # the VAE is not needed again; free device memory for training
    if device.type == "cuda" and not config.highvram:
        torch.cuda.empty_cache()
    return report


def create_network(
    config: TrainConfig, bundle: ModelBundle, train_unet: bool, train_te: bool
) -> tuple[Any, dict]:
    module = importlib.import_module(config.network_module)
    parse = getattr(module, "parse_network_args", None)
    if parse is not None:
        net_kwargs = parse(config.network_args)
    else:
        raw, _ = parse_key_values(config.network_args, "--network_args")
        net_kwargs = {k: str(v) for k, v in raw.items()}
    text_encoder = bundle.text_encoders[0] if len(bundle.text_encoders) == 1 else bundle.text_encoders
    if config.dim_from_weights:  # ranks/alphas per module from the file, which load_weights then fills in
        extra = {"dropout": config.network_dropout} if config.network_dropout is not None else {}
        network, _ = module.create_network_from_weights(
            1.0, config.network_weights, bundle.vae, text_encoder, bundle.unet, **{**extra, **net_kwargs}
        )
    else:
        network = module.create_network(
            1.0,
            config.network_dim,
            config.network_alpha,
            bundle.vae,
            text_encoder,
            bundle.unet,
            neuron_dropout=config.network_dropout,
            **net_kwargs,
        )
    network.apply_to(text_encoder, bundle.unet, train_te, train_unet)
    if config.network_weights:
        network.load_weights(config.network_weights)
        log.info("loaded network weights from %s", config.network_weights)
    return network, net_kwargs


def train_steps_and_epochs(config: TrainConfig, batches_per_epoch: int) -> tuple[int, int]:
    updates_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    if config.max_train_epochs is not None:
        max_steps = config.max_train_epochs * updates_per_epoch
    else:
        max_steps = config.max_train_steps
    return max_steps, math.ceil(max_steps / updates_per_epoch)


def pick_seed(config: TrainConfig) -> int:
    seed = config.seed if config.seed is not None else random.SystemRandom().randint(0, 2**31 - 1)
    random.seed(seed)
    torch.manual_seed(seed)
    import numpy as np

    np.random.seed(seed % (2**32))
    return seed


def prepare(config: TrainConfig, family: ModelFamily) -> Run:
    from library.training.setup import build_run

    return build_run(config, family)


def train(config: TrainConfig, family_name: str = "sd") -> Path | None:
    """Run training; returns the final LoRA path (None after --output_config, --estimate_memory, --dry_run,
    --debug_dataset)."""
    if config.output_config:
        # kohya semantics: record the options and stop; nothing runs, so nothing else needs checking.
        if is_main_process():  # one writer in a multi-process launch
            write_output_config(config, Path(config.output_config))
            print(f"wrote resolved options to {config.output_config}")
        return None
    validate_or_raise(config)
    from library.families import get_family

    family = get_family(family_name)
    if config.estimate_memory:
        from library.training.estimate_run import print_estimate

        print_estimate(config, family)
        return None
    if config.dry_run or config.debug_dataset:
        from library.training.preflight import dry_run

        dry_run(config, family)
        return None
    run = prepare(config, family)
    from library.training.loop import train_loop

    return train_loop(run)


def is_main_process() -> bool:
    """Rank 0 of a launch (accelerate/torchrun set RANK); usable before the Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


def configure_logging() -> None:
    # Other ranks repeat rank 0's messages; they speak up only for warnings.
    level = os.environ.get("LORATRAIN_LOG_LEVEL", "INFO" if is_main_process() else "WARNING").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns at import about optional CPU kernels nobody here uses.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # Component loading is a second or two; its per-file progress bars only add noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def timestamp() -> str:
    return time.strftime("%Y%m%d%H%M%S")
