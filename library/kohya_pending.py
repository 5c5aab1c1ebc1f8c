"""kohya train_network options that this version does not implement yet.

A kohya config that sets one of these to kohya's own default is accepted (the option would change nothing);
any other value is an error, because silently ignoring it would train something the user did not ask for.
"""

from __future__ import annotations

from typing import Any

# option -> the value kohya uses when the option is absent
PENDING: dict[str, Any] = {
    # loss and noise
    "noise_offset": None,
    "noise_offset_random_strength": False,
    "adaptive_noise_scale": None,
    "multires_noise_iterations": None,
    "multires_noise_discount": 0.3,
    "ip_noise_gamma": None,
    "ip_noise_gamma_random_strength": False,
    "min_snr_gamma": None,
    "scale_v_pred_loss_like_noise_pred": False,
    "v_pred_like_loss": None,
    "debiased_estimation_loss": False,
    "zero_terminal_snr": False,
    "loss_type": "l2",
    "huber_schedule": "snr",
    "huber_c": 0.1,
    "huber_scale": 1.0,
    "weighted_captions": False,
    # sampling and validation
    "sample_prompts": None,
    "sample_every_n_steps": None,
    "sample_every_n_epochs": None,
    "sample_at_first": False,
    "sample_sampler": "ddim",
    "validate_every_n_steps": None,
    "validate_every_n_epochs": None,
    "max_validation_steps": None,
    # precision and memory
    "full_fp16": False,
    "full_bf16": False,
    "fp8_base": False,
    "fp8_base_unet": False,
    "mem_eff_attn": False,
    "torch_compile": False,
    "dynamo_backend": "inductor",
    "cpu_offload_checkpointing": False,
    "fused_backward_pass": False,
    "blocks_to_swap": None,
    # optimizer and schedule
    "lr_scheduler_num_cycles": 1,
    "lr_scheduler_power": 1.0,
    "lr_scheduler_type": "",
    "lr_scheduler_args": None,
    "lr_decay_steps": 0,
    "lr_scheduler_timescale": None,
    "lr_scheduler_min_lr_ratio": None,
    "scale_weight_norms": None,
    "use_8bit_adam": False,
    "use_lion_optimizer": False,
    # network
    "dim_from_weights": False,
    "base_weights": None,
    "base_weights_multiplier": None,
    # dataset and captions
    "dataset_class": None,
    # saving, resuming, logging
    "save_n_epoch_ratio": None,
    "save_last_n_epochs": None,
    "save_last_n_steps": None,
    "save_last_n_epochs_state": None,
    "save_last_n_steps_state": None,
    "initial_epoch": None,
    "initial_step": None,
    "skip_until_initial_step": False,
    "log_tracker_name": None,
    "log_tracker_config": None,
    "wandb_run_name": None,
    "wandb_api_key": None,
    "log_config": False,
    "huggingface_repo_id": None,
    "metadata_usage_hint": None,
    "metadata_thumbnail": None,
    "metadata_merged_from": None,
    "metadata_trigger_phrase": None,
    "metadata_preprocessor": None,
    "metadata_is_negative_embedding": None,
    # multi-GPU
    "ddp_timeout": None,
    "ddp_gradient_as_bucket_view": False,
    "ddp_static_graph": False,
    "deepspeed": False,
}


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, str):
        text = value.strip()
        if default is None:
            return text.lower() in ("none", "null", "")
        if isinstance(default, bool):
            return text.lower() == str(default).lower()
        if isinstance(default, (int, float)):
            try:
                return float(text) == float(default)
            except ValueError:
                return False
        return text == default
    if isinstance(default, bool) or default is None:
        return value is default or (value in (False, None) and default in (False, None))
    return value == default


def pending_problem(name: str, value: Any, where: str) -> str | None:
    """None when `value` is kohya's default for `name` (harmless), else a one-line error."""
    if _same(value, PENDING[name]):
        return None
    return (
        f"{where}: {name} is a kohya option this version does not implement yet; remove it "
        f"(ignoring it would train something other than what you asked for)"
    )
