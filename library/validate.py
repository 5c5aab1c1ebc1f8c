"""Checks on a TrainConfig that need no weights: run before anything heavy is loaded, all problems at once."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from library.config import TrainConfig
from library.config.flow import MODE_SCALE_MAX, MODEL_PREDICTION_TYPES, TIMESTEP_SAMPLINGS, WEIGHTING_SCHEMES
from library.errors import UserError

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


def _writable_folder(path: str, flag: str, problems: list[str]) -> None:
    """A folder the run may create files in: not a file, and its nearest existing folder writable (checked
    here, as the first write happens only after caching and training)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        problems.append(
            f"{flag}: {folder} is a file, not a folder; pass a folder path (it is created if missing)"
        )
        return
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        problems.append(f"{flag}: {existing} is a file, so {folder} cannot be created; pass another folder")
    elif existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        problems.append(
            f"{flag}: cannot write to {existing} (permission denied); pass a folder you can write to or fix its "
            "permissions"
        )


def _positive(config: TrainConfig, names: list[str], problems: list[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            problems.append(f"--{name} must be positive, got {value}")


def _check_loss_noise(config: TrainConfig, problems: list[str]) -> None:
    """kohya's loss/noise flag rules (train_util.verify_training_args) plus ranges kohya leaves to crash."""
    if config.adaptive_noise_scale is not None and config.noise_offset is None:
        problems.append(
            "--adaptive_noise_scale needs --noise_offset (it adds to the offset); set --noise_offset (e.g. 0.05)"
        )
    if config.noise_offset is not None and config.multires_noise_iterations is not None:
        problems.append(
            "--noise_offset and --multires_noise_iterations exclude each other (kohya: both reshape the noise); "
            "pick one"
        )
    if config.huber_c <= 0:  # the exponential schedule takes its log
        problems.append(f"--huber_c must be positive, got {config.huber_c}")
    for name in ("min_snr_gamma", "multires_noise_iterations"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            problems.append(f"--{name} must be positive, got {value}")
    for name in (
        "noise_offset",
        "ip_noise_gamma",
        "v_pred_like_loss",
        "huber_scale",
        "multires_noise_discount",
    ):
        value = getattr(config, name)
        if value is not None and value < 0:
            problems.append(f"--{name} must not be negative, got {value}")


def _check_flow(config: TrainConfig, problems: list[str]) -> None:
    """FLUX flow-matching options: kohya's choices, plus ranges where its formulas break down."""
    for name, allowed in (
        ("timestep_sampling", TIMESTEP_SAMPLINGS),
        ("weighting_scheme", WEIGHTING_SCHEMES),
        ("model_prediction_type", MODEL_PREDICTION_TYPES),
    ):
        if getattr(config, name) not in allowed:
            problems.append(f"--{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    for name in ("sigmoid_scale", "discrete_flow_shift", "logit_std"):
        if getattr(config, name) <= 0:
            problems.append(f"--{name} must be positive, got {getattr(config, name)}")
    if config.guidance_scale < 0:
        problems.append(f"--guidance_scale must not be negative, got {config.guidance_scale}")
    # Outside [-1, 2/(pi-2)] the mode density is no longer monotone and leaves [0, 1] (SD3 paper, section 3.1).
    if not -1 <= config.mode_scale <= MODE_SCALE_MAX:
        problems.append(
            f"--mode_scale must be in [-1, {MODE_SCALE_MAX:.4f}] (1.29 is usual), got {config.mode_scale}"
        )


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
            # Checks across flags (e.g. DyLoRA's unit must divide --network_dim).
            more = getattr(mod, "network_problems", None)
            if more is not None:
                problems.extend(more(config.network_dim, config.network_dropout, config.network_args))
            return
    problems.extend(parse_key_values(config.network_args, "--network_args")[1])


def _check_weight_files(config: TrainConfig, problems: list[str]) -> None:
    """--dim_from_weights and --base_weights / --base_weights_multiplier."""
    if config.dim_from_weights and not config.network_weights:
        problems.append(
            "--dim_from_weights: needs --network_weights FILE (the ranks and alphas come from it)"
        )
    for path in config.base_weights or []:
        _exists(path, "--base_weights", problems, kind="file", fix="pass existing LoRA files")
    multipliers = config.base_weights_multiplier
    if multipliers is not None and len(multipliers) != len(config.base_weights or []):
        problems.append(
            f"--base_weights_multiplier: {len(multipliers)} value(s) for {len(config.base_weights or [])} "
            "--base_weights file(s); give one per file, or none for 1.0 each"
        )


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


def _check_sampling(config: TrainConfig, problems: list[str]) -> None:
    from library.training.sample_prompts import check_sampler, load_sample_prompts

    if problem := check_sampler(config.sample_sampler, "--sample_sampler"):
        problems.append(problem)
    if config.sample_prompts:
        try:
            load_sample_prompts(Path(config.sample_prompts))
        except UserError as exc:
            problems.extend(exc.problems)
    else:
        for name in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first"):
            if getattr(config, name):
                problems.append(
                    f"--{name} needs --sample_prompts (the prompts to sample); add it or remove this"
                )


def _check_logging(config: TrainConfig, problems: list[str]) -> None:
    if config.log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        problems.append(
            f"--log_with {config.log_with}: the wandb package is not installed; pip install wandb"
        )
    if config.log_with in ("tensorboard", "all") and not config.logging_dir:
        problems.append(f"--log_with {config.log_with} needs --logging_dir (where TensorBoard logs go)")
    if config.log_tracker_config:
        try:
            tracker_init_options(config.log_tracker_config)
        except UserError as exc:
            problems.extend(exc.problems)
    uses_wandb = config.log_with in ("wandb", "all")
    for name in ("wandb_run_name", "wandb_api_key"):
        if getattr(config, name) and not uses_wandb:
            problems.append(f"--{name} needs --log_with wandb (or all); add it or remove --{name}")


def tracker_init_options(path: str) -> dict[str, Any]:
    """kohya's --log_tracker_config: a TOML file whose [wandb] table holds extra wandb.init() options."""
    import toml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--log_tracker_config: {file} does not exist; check the path")
    try:
        data = toml.loads(file.read_text(encoding="utf-8"))
    except Exception as exc:  # toml raises several types; all mean "fix the syntax"
        raise UserError(
            f"--log_tracker_config: {file} is not valid TOML: {str(exc).splitlines()[0]}"
        ) from None
    table = data.get("wandb", {})
    if not isinstance(table, dict):
        raise UserError(f"--log_tracker_config: {file}: [wandb] must be a table of wandb.init options")
    return table


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
    else:
        _writable_folder(config.output_dir, "--output_dir", problems)
    if config.logging_dir:
        _writable_folder(config.logging_dir, "--logging_dir", problems)
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
            "sample_every_n_steps",
            "sample_every_n_epochs",
            "validate_every_n_steps",
            "validate_every_n_epochs",
            "max_validation_steps",
            "save_last_n_epochs",
            "save_last_n_steps",
            "save_last_n_epochs_state",
            "save_last_n_steps_state",
        ],
        problems,
    )
    _check_sampling(config, problems)
    _check_logging(config, problems)
    for name in (
        "learning_rate",
        "unet_lr",
        "network_alpha",
        "max_grad_norm",
        "prior_loss_weight",
        "scale_weight_norms",
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
    _check_optim(config, problems)
    _check_network(config, problems)
    _check_weight_files(config, problems)
    if config.xformers and importlib.util.find_spec("xformers") is None:
        problems.append(
            "--xformers: the xformers package is not installed; pip install xformers, or use --sdpa"
        )
    _check_loss_noise(config, problems)
    _check_flow(config, problems)
    _check_memory(config, problems)
    _check_compile_and_profile(config, problems)
    _check_existing_outputs(config, problems)
    return problems


def _check_optim(config: TrainConfig, problems: list[str]) -> None:
    """Optimizer, learning-rate schedule and --full_fp16/--full_bf16 (the rules live in training/optim.py)."""
    from library.training import optim

    optimizer_args, arg_problems = parse_key_values(config.optimizer_args, "--optimizer_args")
    problems.extend(arg_problems)
    optimizer_type, legacy_problems = optim.requested_optimizer(
        config.optimizer_type, config.use_8bit_adam, config.use_lion_optimizer
    )
    problems.extend(legacy_problems)
    problems.extend(optim.check_optimizer(optimizer_type, optimizer_args))
    scheduler_args, arg_problems = parse_key_values(config.lr_scheduler_args, "--lr_scheduler_args")
    problems.extend(arg_problems)
    problems.extend(
        optim.check_schedule(
            config.lr_scheduler, config.lr_scheduler_type, scheduler_args, config.lr_scheduler_min_lr_ratio
        )
    )
    if (
        config.lr_scheduler == "adafactor"
        and not config.lr_scheduler_type
        and not optim.uses_adafactor_schedule(optimizer_type, optimizer_args)
    ):
        problems.append(
            "--lr_scheduler adafactor reports Adafactor's own learning rate: it needs --optimizer_type Adafactor "
            "(with relative_step=True, its default)"
        )
    for name in ("lr_warmup_steps", "lr_decay_steps"):
        try:
            optim.parse_steps(getattr(config, name), f"--{name}")
        except UserError as exc:
            problems.extend(exc.problems)
    if config.lr_scheduler == "warmup_stable_decay" and not config.lr_scheduler_type:
        total = None if config.max_train_epochs else config.max_train_steps
        problems.extend(optim.check_stable_decay(config.lr_warmup_steps, config.lr_decay_steps, total))
    for name in ("lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_timescale"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            problems.append(f"--{name} must be positive, got {value}")
    problems.extend(optim.check_full_precision(config.full_fp16, config.full_bf16, config.mixed_precision))
    from library.training.fused import fused_problems

    problems.extend(
        fused_problems(
            config.fused_backward_pass,
            config.fused_optimizer_groups,
            optimizer_type,
            config.gradient_accumulation_steps,
            config.mixed_precision,
        )
    )


def _check_memory(config: TrainConfig, problems: list[str]) -> None:
    """--fp8_base(_unet), --blocks_to_swap, --cpu_offload_checkpointing (which families take them: preflight)."""
    from library.memory.fp8 import fp8_problems

    problems.extend(fp8_problems(config.fp8_base, config.fp8_base_unet, config.mixed_precision))
    if config.text_encoder_batch_size is not None and config.text_encoder_batch_size < 1:
        problems.append(f"--text_encoder_batch_size must be positive, got {config.text_encoder_batch_size}")
    if config.blocks_to_swap is not None and config.blocks_to_swap < 0:
        problems.append(f"--blocks_to_swap must be 0 or more, got {config.blocks_to_swap}")
    if config.cpu_offload_checkpointing and not config.gradient_checkpointing:
        problems.append(
            "--cpu_offload_checkpointing needs --gradient_checkpointing (it changes where checkpoints live)"
        )
    if config.cpu_offload_checkpointing and config.blocks_to_swap:
        problems.append(
            "--cpu_offload_checkpointing and --blocks_to_swap exclude each other (as in kohya); pick one"
        )


def _check_compile_and_profile(config: TrainConfig, problems: list[str]) -> None:
    from library.training.compile import backend_problems
    from library.training.profiling import profile_steps_problems

    problems.extend(backend_problems(config.torch_compile, config.dynamo_backend, config.blocks_to_swap))
    # With epochs the step count depends on the dataset: preflight checks the range then.
    known_steps = config.max_train_steps if config.max_train_epochs is None else None
    problems.extend(profile_steps_problems(config.profile_steps, known_steps))


def validate_or_raise(config: TrainConfig) -> None:
    problems = validate(config)
    if problems:
        raise UserError(*problems)
