"""kohya train_network options that this version does not implement yet.

A kohya config that sets one of these to kohya's own default is accepted (the option would change nothing);
any other value is an error, because silently ignoring it would train something the user did not ask for.
"""

from __future__ import annotations

from typing import Any

# option -> the value kohya uses when the option is absent
PENDING: dict[str, Any] = {
    # precision and memory
    "mem_eff_attn": False,
    "disable_mmap_load_safetensors": False,  # sdxl_train_network.py
    # optimizer and schedule
    # network
    # dataset and captions
    "dataset_class": None,
    # saving, resuming, logging
    "save_n_epoch_ratio": None,
    "initial_epoch": None,
    "initial_step": None,
    "skip_until_initial_step": False,
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
