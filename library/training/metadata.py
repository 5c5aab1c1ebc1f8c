"""kohya `ss_*` and SAI modelspec metadata for saved LoRA files.

This module sits at the top layer with run.py: its whole job is to record the run's options, so it reads
the config directly.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from library.config import TrainConfig
from library.families.base import ModelInfo

PROJECT_VERSION = "loratrain/0.1.0"
MINIMAL_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)


def _s(value: Any) -> str:
    return "None" if value is None else str(value)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def modelspec(
    config: TrainConfig, info: ModelInfo, resolution: tuple[int, int] | None, started: float
) -> dict[str, str]:
    width, height = resolution or (info.default_resolution, info.default_resolution)
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": info.modelspec_architecture,
        "modelspec.implementation": info.modelspec_implementation,
        "modelspec.title": config.metadata_title or config.output_name or f"LoRA@{_iso(started)}",
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": _iso(started),
        "modelspec.implementation_version": PROJECT_VERSION,
    }
    if info.prediction_type != "flow":  # kohya writes none for FLUX
        spec["modelspec.prediction_type"] = info.prediction_type or (
            "v" if info.v_parameterization else "epsilon"
        )
    lo = 0 if config.min_timestep is None else config.min_timestep
    hi = 1000 if config.max_timestep is None else config.max_timestep
    if (lo, hi) != (0, 1000):
        spec["modelspec.timestep_range"] = f"{lo},{hi}"
    if config.clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(config.clip_skip)
    for key in ("author", "description", "license", "tags"):
        value = getattr(config, f"metadata_{key}")
        if value:
            spec[f"modelspec.{key}"] = value
    return spec


def training_metadata(
    config: TrainConfig,
    info: ModelInfo,
    *,
    network_dim: int,
    network_alpha: float,
    network_args: dict[str, str],
    dataset: Any,
    resolution: tuple[int, int] | None,
    seed: int,
    optimizer_desc: str,
    mixed_precision: str,
    total_batch_size: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    max_train_steps: int,
    lr_warmup_steps: int,
    lr_scheduler_desc: str,
    started: float,
) -> dict[str, str]:
    """Everything known at the start of training; `per_save_metadata` adds step/epoch at each save."""
    md: dict[str, Any] = {
        "ss_session_id": uuid.uuid4().int & ((1 << 31) - 1),
        "ss_training_started_at": started,
        "ss_output_name": config.output_name,
        "ss_training_comment": config.training_comment,
        "ss_sd_scripts_commit_hash": PROJECT_VERSION,
        "ss_seed": seed,
        "ss_v2": info.v2,
        "ss_base_model_version": info.base_model_version,
        "ss_clip_skip": config.clip_skip,
        "ss_max_token_length": config.max_token_length,
        "ss_mixed_precision": mixed_precision,  # what ran: fp16 falls back to "no" on CPU
        "ss_full_fp16": bool(config.full_fp16),
        "ss_fp8_base": bool(config.fp8_base),
        "ss_fp8_base_unet": bool(config.fp8_base_unet),
        "ss_lowram": config.lowram,
        "ss_cache_latents": config.cache_latents or config.cache_latents_to_disk,
        "ss_network_module": config.network_module,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_network_dropout": config.network_dropout,
        "ss_scale_weight_norms": config.scale_weight_norms,
        "ss_learning_rate": config.learning_rate,
        # one value as kohya writes it; per-encoder values as the list kohya's str() would give
        "ss_text_encoder_lr": _text_encoder_lr(config.text_encoder_lr),
        "ss_unet_lr": config.unet_lr,
        "ss_optimizer": optimizer_desc,
        "ss_lr_scheduler": lr_scheduler_desc,
        "ss_lr_warmup_steps": lr_warmup_steps,
        "ss_max_train_steps": max_train_steps,
        "ss_num_epochs": num_epochs,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_num_train_images": dataset.num_train_images,
        "ss_num_validation_images": dataset.num_validation_images,
        "ss_num_reg_images": dataset.num_reg_images,
        "ss_caption_dropout_rate": config.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": config.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": config.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": config.face_crop_aug_range,
        "ss_prior_loss_weight": config.prior_loss_weight,
        "ss_resize_interpolation": config.resize_interpolation,
        "ss_noise_offset": config.noise_offset,
        "ss_noise_offset_random_strength": config.noise_offset_random_strength,
        "ss_adaptive_noise_scale": config.adaptive_noise_scale,
        "ss_multires_noise_iterations": config.multires_noise_iterations,
        "ss_multires_noise_discount": config.multires_noise_discount,
        "ss_ip_noise_gamma": config.ip_noise_gamma,
        "ss_ip_noise_gamma_random_strength": config.ip_noise_gamma_random_strength,
        "ss_zero_terminal_snr": config.zero_terminal_snr,
        "ss_masked_loss": config.masked_loss,
        "ss_min_snr_gamma": config.min_snr_gamma,
        "ss_debiased_estimation": config.debiased_estimation_loss,
        "ss_loss_type": config.loss_type,
        "ss_huber_schedule": config.huber_schedule,
        "ss_huber_scale": config.huber_scale,
        "ss_huber_c": config.huber_c,
        "ss_validation_seed": config.validation_seed,
        "ss_validation_split": config.validation_split,
        "ss_max_validation_steps": config.max_validation_steps,
        "ss_validate_every_n_epochs": config.validate_every_n_epochs,
        "ss_validate_every_n_steps": config.validate_every_n_steps,
    }
    if config.metadata_include_paths:  # kohya writes these names always; they are names on the user's disk
        md["ss_sd_model_name"] = Path(config.pretrained_model_name_or_path or "").name
        md["ss_vae_name"] = Path(config.vae).name if config.vae else None
    rename = _folder_renamer(dataset, keep=config.metadata_include_paths)
    md.update(info.training_metadata)
    if config.quantize_base:  # ours (kohya has no such flag): written only when used
        md["ss_quantize_base"] = config.quantize_base
    if network_args:
        md["ss_network_args"] = json.dumps(network_args)
    if config.dataset_config:
        md["ss_datasets"] = json.dumps(_rename_datasets(dataset.dataset_metadata(), rename))
        # kohya writes it for configs too
        md["ss_dataset_dirs"] = json.dumps(_rename_keys(dataset.dataset_dirs(), rename))
    else:
        md.update(
            ss_batch_size_per_device=config.train_batch_size,
            ss_resolution=str(resolution),
            ss_enable_bucket=config.enable_bucket,
            ss_min_bucket_reso=config.min_bucket_reso,
            ss_max_bucket_reso=config.max_bucket_reso,
            ss_bucket_no_upscale=config.bucket_no_upscale,
            ss_keep_tokens=config.keep_tokens,
            ss_shuffle_caption=config.shuffle_caption,
            ss_flip_aug=config.flip_aug,
            ss_color_aug=config.color_aug,
            ss_random_crop=config.random_crop,
            ss_bucket_info=json.dumps(dataset.bucket_info()),
            ss_dataset_dirs=json.dumps(_rename_keys(dataset.dataset_dirs(), rename)),
            ss_reg_dataset_dirs=json.dumps(_rename_keys(dataset.dataset_dirs(reg=True), rename)),
            ss_total_batch_size=total_batch_size,
        )
    md["ss_tag_frequency"] = json.dumps(_rename_keys(dataset.tag_frequency(), rename))
    out = {k: _s(v) for k, v in md.items()}
    out.update(modelspec(config, info, resolution, started))
    if config.no_metadata:
        out = {k: v for k, v in out.items() if k in MINIMAL_KEYS or k.startswith("modelspec.")}
    return out


def per_save_metadata(base: dict[str, str], *, steps: int, epoch: int, no_metadata: bool) -> dict[str, str]:
    md = dict(base)
    if not no_metadata:
        md.update(ss_training_finished_at=str(time.time()), ss_steps=str(steps), ss_epoch=str(epoch))
    return md


def _text_encoder_lr(values: list[float]) -> float | str | None:
    if not values:
        return None
    return values[0] if len(values) == 1 else str(list(values))


# ----------------------------------------------------------------------------------- folder names (privacy)


def _folder_renamer(dataset: Any, *, keep: bool) -> Callable[[str], str]:
    """kohya names dataset folders (and fine-tune metadata files) in ss_dataset_dirs, ss_tag_frequency and
    ss_datasets. Those names are the user's, so unless `keep` each becomes subset_<n>, numbered by first
    appearance over all subsets of all datasets; the JSON shapes and counts stay as kohya writes them."""
    if keep:
        return lambda name: name
    neutral: dict[str, str] = {}
    for built in dataset.datasets:
        for subset in built.spec.subsets:
            real = (subset.metadata_file or subset.image_dir).name
            neutral.setdefault(real, f"subset_{len(neutral)}")

    def rename(name: str) -> str:
        if name in neutral:
            return neutral[name]
        # kohya's suffix for a folder name seen before: "name (2)"
        match = re.fullmatch(r"(.*) \((\d+)\)", name)
        if match and match.group(1) in neutral:
            return f"{neutral[match.group(1)]} ({match.group(2)})"
        return "subset"  # never the real name, even for one this table does not know

    return rename


def _rename_keys(table: dict[str, Any], rename: Callable[[str], str]) -> dict[str, Any]:
    return {rename(name): value for name, value in table.items()}


def _rename_datasets(entries: list[dict[str, Any]], rename: Callable[[str], str]) -> list[dict[str, Any]]:
    out = []
    for entry in entries:
        entry = dict(entry, tag_frequency=_rename_keys(entry.get("tag_frequency") or {}, rename))
        subsets = []
        for subset in entry.get("subsets", []):
            subset = dict(subset)
            for key in ("image_dir", "metadata_file"):
                if isinstance(subset.get(key), str):
                    subset[key] = rename(subset[key])
            subsets.append(subset)
        entry["subsets"] = subsets
        out.append(entry)
    return out
