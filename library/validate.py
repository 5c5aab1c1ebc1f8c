"""Checks on a TrainConfig that need no weights: run before anything heavy is loaded, all problems at once."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from typing import Any

from library.config import TrainConfig
from library.errors import UserError

BUILTIN_OPTIMIZERS = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit"}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MODEL_EXTENSIONS = {"safetensors": ".safetensors", "ckpt": ".ckpt", "pt": ".pt"}
# Files a --resume state folder must hold (library.training.state writes them; scaler.pt is optional).
STATE_FILES = ("network.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")


def parse_resolution(text: str | None, flag: str = "--resolution") -> tuple[int, int] | None:
    """'512' -> (512, 512); '512,768' -> (512, 768) as kohya (width, height)."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f'{flag} must be "512" or "512,768" (width,height), got {text!r}') from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise UserError(f'{flag} must be "512" or "512,768" (width,height), got {text!r}')
    return values[0], values[1]


def parse_key_values(items: list[str], flag: str) -> tuple[dict[str, Any], list[str]]:
    """key=value list (kohya --optimizer_args style; values via literal_eval, else kept as strings)."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for item in items:
        if "=" not in item:
            problems.append(f"{flag}: {item!r} is not key=value (e.g. {flag} weight_decay=0.01)")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            values[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            values[key] = raw.strip()
    return values, problems


def optimizer_class_path(optimizer_type: str) -> str:
    return BUILTIN_OPTIMIZERS.get(optimizer_type.lower(), optimizer_type)


# kohya's base names when --output_name is unset: epoch saves, step saves, the final save (and their states).
DEFAULT_OUTPUT_NAMES = {"epoch": "epoch", "step": "at", "last": "last"}


def output_name(config: TrainConfig, kind: str = "last") -> str:
    """Base name of a saved file or state; `kind` is "epoch", "step" or "last"."""
    return config.output_name or DEFAULT_OUTPUT_NAMES[kind]


def final_output_path(config: TrainConfig) -> Path:
    return Path(config.output_dir or ".") / f"{output_name(config)}{MODEL_EXTENSIONS[config.save_model_as]}"


def _exists(
    path: str | None, flag: str, problems: list[str], *, kind: str = "path", fix: str = "check the path"
) -> None:
    if path is not None and not Path(path).exists():
        problems.append(f"{flag}: {kind} {path} does not exist; {fix}")


def _positive(config: TrainConfig, names: list[str], problems: list[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            problems.append(f"--{name} must be positive, got {value}")


def _check_network(config: TrainConfig, problems: list[str]) -> None:
    module = config.network_module
    try:
        spec = importlib.util.find_spec(module)
    except (ModuleNotFoundError, ValueError):
        spec = None
    if spec is None:
        problems.append(
            f"--network_module: cannot import {module!r}; use networks.lora or an installed module"
        )
        return
    if module.startswith("networks."):
        # Our own modules validate their args without loading any model.
        mod = importlib.import_module(module)
        parse = getattr(mod, "parse_network_args", None)
        if parse is not None:
            try:
                parse(config.network_args)
            except UserError as exc:
                problems.extend(exc.problems)
            return
    problems.extend(parse_key_values(config.network_args, "--network_args")[1])


def _check_existing_outputs(config: TrainConfig, problems: list[str]) -> None:
    if config.overwrite or config.resume or not config.output_dir:
        return
    out = Path(config.output_dir)
    if not out.is_dir():
        return
    prefixes = tuple(f"{output_name(config, kind)}{sep}" for kind in DEFAULT_OUTPUT_NAMES for sep in ".-")
    clashes = sorted(
        p.name
        for p in out.iterdir()
        if p.is_file() and p.suffix in MODEL_EXTENSIONS.values() and p.name.startswith(prefixes)
    )
    if clashes:
        shown = ", ".join(clashes[:3]) + (" ..." if len(clashes) > 3 else "")
        problems.append(
            f"--output_dir: {out} already has {shown} from an earlier run; pass --overwrite to replace them "
            f"or choose another --output_name"
        )


def _check_dataset_source(config: TrainConfig, problems: list[str]) -> None:
    if not (config.dataset_config or config.train_data_dir or config.in_json):
        problems.append(
            "no dataset: pass --dataset_config FILE.toml, --train_data_dir FOLDER or --in_json METADATA.json"
        )
    _exists(config.dataset_config, "--dataset_config", problems, kind="file")
    if not config.dataset_config:
        _exists(config.train_data_dir, "--train_data_dir", problems, kind="folder")
        _exists(config.reg_data_dir, "--reg_data_dir", problems, kind="folder")
        _exists(config.in_json, "--in_json", problems, kind="file")
        if config.in_json and config.reg_data_dir:
            problems.append(
                "--reg_data_dir cannot be used with --in_json (fine-tune datasets have no regularization "
                "images); remove it, or use a --dataset_config with a DreamBooth dataset for them"
            )
        source = "--in_json" if config.in_json else "--train_data_dir"
        if (config.train_data_dir or config.in_json) and config.resolution is None:
            problems.append(f"--resolution is required with {source} (e.g. --resolution 512)")
    if not 0 <= config.validation_split < 1:
        problems.append(
            f"--validation_split must be at least 0 and below 1 (the share held out), "
            f"got {config.validation_split}"
        )
    if config.debug_dataset_epochs < 1:
        problems.append(f"--debug_dataset_epochs must be positive, got {config.debug_dataset_epochs}")


def validate(config: TrainConfig) -> list[str]:
    """Every problem found, one line each. Empty list = fine."""
    problems: list[str] = []
    if not config.pretrained_model_name_or_path:
        problems.append(
            "--pretrained_model_name_or_path is required (a diffusers folder or a .safetensors/.ckpt file)"
        )
    else:
        _exists(
            config.pretrained_model_name_or_path,
            "--pretrained_model_name_or_path",
            problems,
            kind="model",
            fix="pass a local diffusers folder or .safetensors/.ckpt file (hub ids are not downloaded)",
        )
    if not config.output_dir:
        problems.append("--output_dir is required (the folder where LoRA files are written)")
    elif Path(config.output_dir).exists() and not Path(config.output_dir).is_dir():
        problems.append(f"--output_dir: {config.output_dir} is a file, not a folder")
    if config.output_name is not None and any(c in config.output_name for c in "/\\"):
        problems.append(f"--output_name must be a file name without folders, got {config.output_name!r}")
    _check_dataset_source(config, problems)
    try:
        parse_resolution(config.resolution)
    except UserError as exc:
        problems.extend(exc.problems)
    try:
        from library.data.augment import parse_face_crop_range

        parse_face_crop_range(config.face_crop_aug_range)
    except UserError as exc:
        problems.extend(exc.problems)
    for flag_name in ("vae", "tokenizer_path", "network_weights", "config_file"):
        _exists(getattr(config, flag_name), f"--{flag_name}", problems)
    if config.resume:
        state = Path(config.resume)
        if not state.is_dir():
            problems.append(
                f"--resume: {state} is not a folder (pass a *-state folder written by --save_state)"
            )
        elif not (state / "train_state.json").is_file():
            problems.append(
                f"--resume: {state} has no train_state.json; it is not a state saved by --save_state"
            )
        elif missing := [name for name in STATE_FILES if not (state / name).is_file()]:
            problems.append(
                f"--resume: {state} is missing {', '.join(missing)}; the state is incomplete: resume from "
                "another *-state folder"
            )
    _positive(
        config,
        [
            "train_batch_size",
            "max_train_steps",
            "max_train_epochs",
            "gradient_accumulation_steps",
            "vae_batch_size",
            "network_dim",
            "save_every_n_epochs",
            "save_every_n_steps",
            "dataset_repeats",
            "clip_skip",
        ],
        problems,
    )
    for name in (
        "learning_rate",
        "unet_lr",
        "network_alpha",
        "max_grad_norm",
        "prior_loss_weight",
        "lr_warmup_steps",
    ):
        value = getattr(config, name)
        if value is not None and value < 0:
            problems.append(f"--{name} must not be negative, got {value}")
    if any(lr < 0 for lr in config.text_encoder_lr):
        problems.append(f"--text_encoder_lr must not be negative, got {config.text_encoder_lr}")
    if config.network_dropout is not None and not 0 <= config.network_dropout < 1:
        problems.append(f"--network_dropout must be in [0, 1), got {config.network_dropout}")
    if config.network_train_unet_only and config.network_train_text_encoder_only:
        problems.append(
            "--network_train_unet_only and --network_train_text_encoder_only exclude each other; pick one"
        )
    lo = 0 if config.min_timestep is None else config.min_timestep
    hi = 1000 if config.max_timestep is None else config.max_timestep
    if not 0 <= lo < hi <= 1000:
        problems.append(
            f"--min_timestep/--max_timestep must satisfy 0 <= min < max <= 1000, got {lo} and {hi}"
        )
    opt = config.optimizer_type
    if opt.lower() not in BUILTIN_OPTIMIZERS and "." not in opt:
        problems.append(
            f"--optimizer_type: unknown optimizer {opt!r}; use AdamW, AdamW8bit or a class path like torch.optim.SGD"
        )
    if config.lr_scheduler not in LR_SCHEDULERS:
        from library.errors import did_you_mean

        problems.append(
            f"--lr_scheduler: unknown scheduler {config.lr_scheduler!r}{did_you_mean(config.lr_scheduler, set(LR_SCHEDULERS))}; "
            f"use one of {', '.join(LR_SCHEDULERS)}"
        )
    optimizer_args, arg_problems = parse_key_values(config.optimizer_args, "--optimizer_args")
    problems.extend(arg_problems)
    if not any(p.startswith("--optimizer_type") for p in problems):
        from library.training.optim import check_optimizer

        problems.extend(check_optimizer(opt, optimizer_args))
    _check_network(config, problems)
    if config.xformers and importlib.util.find_spec("xformers") is None:
        problems.append(
            "--xformers: the xformers package is not installed; pip install xformers, or use --sdpa"
        )
    _check_existing_outputs(config, problems)
    return problems


def validate_or_raise(config: TrainConfig) -> None:
    problems = validate(config)
    if problems:
        raise UserError(*problems)
