"""Optimizers by kohya's names (case-insensitive) or any dotted class path, with kohya's defaults."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from library.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

# kohya's --optimizer_type names (lower case) -> class path
OPTIMIZERS = {
    "adamw": "torch.optim.AdamW",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "pagedadamw": "bitsandbytes.optim.PagedAdamW",
    "pagedadamw8bit": "bitsandbytes.optim.PagedAdamW8bit",
    "pagedadamw32bit": "bitsandbytes.optim.PagedAdamW32bit",
    "lion": "lion_pytorch.Lion",
    "lion8bit": "bitsandbytes.optim.Lion8bit",
    "pagedlion8bit": "bitsandbytes.optim.PagedLion8bit",
    "sgdnesterov": "torch.optim.SGD",
    "sgdnesterov8bit": "bitsandbytes.optim.SGD8bit",
    "adafactor": "transformers.optimization.Adafactor",
    "prodigy": "prodigyopt.Prodigy",
    "dadaptation": "dadaptation.experimental.DAdaptAdamPreprint",
    "dadaptadampreprint": "dadaptation.experimental.DAdaptAdamPreprint",
    "dadaptadagrad": "dadaptation.DAdaptAdaGrad",
    "dadaptadam": "dadaptation.DAdaptAdam",
    "dadaptadan": "dadaptation.DAdaptAdan",
    "dadaptadanip": "dadaptation.experimental.DAdaptAdanIP",
    "dadaptlion": "dadaptation.DAdaptLion",
    "dadaptsgd": "dadaptation.DAdaptSGD",
    "adamwschedulefree": "schedulefree.AdamWScheduleFree",
    "radamschedulefree": "schedulefree.RAdamScheduleFree",
    "sgdschedulefree": "schedulefree.SGDScheduleFree",
}
DISPLAY_NAMES = (
    "AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion, Lion8bit, PagedLion8bit, "
    "SGDNesterov, SGDNesterov8bit, Adafactor, Prodigy, DAdaptation, DAdaptAdamPreprint, DAdaptAdaGrad, "
    "DAdaptAdam, DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, AdamWScheduleFree, RAdamScheduleFree, "
    "SGDScheduleFree"
)
# import name -> pip name, for the install hint
PIP_NAMES = {"lion_pytorch": "lion-pytorch"}
OPTIONAL = ("prodigyopt", "dadaptation", "schedulefree", "lion_pytorch")
# bitsandbytes' 8-bit/paged states need CUDA; on CPU the same update in 32-bit keeps the run going.
CPU_FALLBACKS = {
    "bitsandbytes.optim.AdamW8bit": "torch.optim.AdamW",
    "bitsandbytes.optim.PagedAdamW": "torch.optim.AdamW",
    "bitsandbytes.optim.PagedAdamW8bit": "torch.optim.AdamW",
    "bitsandbytes.optim.PagedAdamW32bit": "torch.optim.AdamW",
    "bitsandbytes.optim.Lion8bit": "lion_pytorch.Lion",
    "bitsandbytes.optim.PagedLion8bit": "lion_pytorch.Lion",
    "bitsandbytes.optim.SGD8bit": "torch.optim.SGD",
}


def optimizer_class_path(optimizer_type: str) -> str:
    return OPTIMIZERS.get(optimizer_type.lower(), optimizer_type)


def _pip_hint(module_name: str) -> str:
    package = module_name.split(".")[0]
    hint = f"pip install {PIP_NAMES.get(package, package)}"
    if package in OPTIONAL:
        hint += ' (or pip install "loratrain[optimizers]")'
    return hint


def _import_class(path: str, flag: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"{flag}: cannot import {module_name} ({exc}); install it with: {_pip_hint(module_name)}"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"{flag}: {module_name} has no class {class_name}")
    return cls


def requested_optimizer(
    optimizer_type: str, use_8bit_adam: bool, use_lion_optimizer: bool
) -> tuple[str, list[str]]:
    """kohya's legacy --use_8bit_adam / --use_lion_optimizer: AdamW8bit / Lion, when no other type is named."""
    legacy = [
        name
        for name, on in (("use_8bit_adam", use_8bit_adam), ("use_lion_optimizer", use_lion_optimizer))
        if on
    ]
    if not legacy:
        return optimizer_type, []
    if len(legacy) > 1:
        return optimizer_type, [
            "--use_8bit_adam and --use_lion_optimizer exclude each other; use --optimizer_type"
        ]
    if optimizer_type.lower() != "adamw":  # AdamW is the default, so it counts as unset
        return optimizer_type, [
            f"--{legacy[0]} and --optimizer_type {optimizer_type} name two optimizers; keep --optimizer_type"
        ]
    return ("AdamW8bit" if use_8bit_adam else "Lion"), []


def optimizer_kwargs(optimizer_type: str, optimizer_args: dict[str, Any]) -> dict[str, Any]:
    """The options kohya passes for an alias: the user's, plus kohya's defaults (recorded in ss_optimizer)."""
    kind = optimizer_type.lower()
    kwargs = dict(optimizer_args)
    if kind in ("sgdnesterov", "sgdnesterov8bit"):
        kwargs.setdefault("momentum", 0.9)  # Nesterov needs momentum; kohya's default
    elif kind == "adafactor":
        kwargs.setdefault("relative_step", True)
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            log.info("Adafactor: warmup_init=True needs relative_step; setting relative_step=True")
            kwargs["relative_step"] = True
    return kwargs


def is_schedule_free(optimizer_type: str) -> bool:
    return optimizer_type.lower().endswith("schedulefree")


def uses_adafactor_schedule(optimizer_type: str, optimizer_args: dict[str, Any]) -> bool:
    """kohya: Adafactor with relative_step computes its own lr, shown through the `adafactor` schedule."""
    return optimizer_type.lower() == "adafactor" and bool(
        optimizer_kwargs(optimizer_type, optimizer_args)["relative_step"]
    )


def effective_scheduler(optimizer_type: str, optimizer_args: dict[str, Any], lr_scheduler: str) -> str:
    """The schedule that runs: Adafactor (relative_step) forces `adafactor`, schedule-free ones `constant`."""
    if uses_adafactor_schedule(optimizer_type, optimizer_args):
        if lr_scheduler != "adafactor":
            log.warning(
                "Adafactor with relative_step computes its own learning rate: using the adafactor schedule "
                "instead of %s (set --optimizer_args relative_step=False to use it)",
                lr_scheduler,
            )
        return "adafactor"
    if is_schedule_free(optimizer_type) and lr_scheduler != "constant":
        log.warning(
            "%s is schedule-free: --lr_scheduler %s is ignored (use --optimizer_args warmup_steps=N for a warmup)",
            optimizer_type,
            lr_scheduler,
        )
        return "constant"
    return lr_scheduler


def check_optimizer(optimizer_type: str, optimizer_args: dict[str, Any]) -> list[str]:
    """Problems with --optimizer_type/--optimizer_args found without building anything (run before loading)."""
    if optimizer_type.lower() not in OPTIMIZERS and "." not in optimizer_type:
        hint = did_you_mean(optimizer_type, set(DISPLAY_NAMES.split(", ")))
        return [
            f"--optimizer_type: unknown optimizer {optimizer_type!r}{hint}; use one of {DISPLAY_NAMES}, "
            "or a class path like torch.optim.SGD"
        ]
    path = optimizer_class_path(optimizer_type)
    requested = path
    if path.startswith("bitsandbytes."):
        # bitsandbytes is slow to import and only runs on CUDA; check the CPU fallback's package instead.
        if torch.cuda.is_available():
            return []
        path = CPU_FALLBACKS.get(path, path)
        if path.startswith("bitsandbytes."):
            return []
    try:
        cls = _import_class(path, "--optimizer_type")
    except UserError as exc:
        if path != requested:
            return [f"--optimizer_type {optimizer_type}: without CUDA it runs as {path}; {exc.problems[0]}"]
        return exc.problems
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    accepted = [name for name in params if name not in ("self", "params", "lr")]
    unknown = [key for key in optimizer_kwargs(optimizer_type, optimizer_args) if key not in params]
    if unknown:
        return [
            f"--optimizer_args: {path} does not accept {', '.join(unknown)}; it accepts {', '.join(accepted)}"
        ]
    return []


def optimizer_path_for(optimizer_type: str, device: torch.device) -> str:
    """Dotted class path of the optimizer that will run on `device` (warns when it differs from the request)."""
    path = optimizer_class_path(optimizer_type)
    if path.startswith("bitsandbytes.") and device.type != "cuda" and path in CPU_FALLBACKS:
        fallback = CPU_FALLBACKS[path]
        log.warning("%s needs a CUDA GPU; using %s on %s instead", optimizer_type, fallback, device.type)
        path = fallback
    return path


def build_optimizer(
    optimizer_type: str,
    param_groups: list[dict],
    lr: float,
    optimizer_args: dict[str, Any],
    device: torch.device,
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and kohya's ss_optimizer text for it: `path(k=v,...)` of what actually runs."""
    path = optimizer_path_for(optimizer_type, device)
    cls = _import_class(path, "--optimizer_type")
    kwargs = optimizer_kwargs(optimizer_type, optimizer_args)
    extra: dict[str, Any] = {}
    if path.endswith(".SGD") and optimizer_type.lower().startswith("sgdnesterov"):
        extra["nesterov"] = True
    run_lr: float | None = lr
    if uses_adafactor_schedule(optimizer_type, optimizer_args):
        # Adafactor derives the lr from the step count; per-group lrs would make it refuse.
        if any(g.pop("lr", None) is not None for g in param_groups) and len(param_groups) > 1:
            log.warning("Adafactor with relative_step ignores --unet_lr and --text_encoder_lr")
        run_lr = None
    kind = optimizer_type.lower()
    if (kind == "prodigy" or kind.startswith("dadapt")) and lr <= 0.1:
        log.warning(
            "%s adapts the step size; kohya recommends --learning_rate around 1.0, got %s", optimizer_type, lr
        )
    try:
        optimizer = cls(param_groups, lr=run_lr, **extra, **kwargs)
    except TypeError as exc:
        raise UserError(f"--optimizer_args: {path} rejected the options {sorted(kwargs)}: {exc}") from None
    optimizer_train(optimizer)
    desc = path + ("(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")" if kwargs else "")
    return optimizer, desc


def create_optimizer(
    optimizer_type: str,
    param_groups: list[dict],
    lr: float,
    optimizer_args: dict[str, Any],
    device: torch.device,
) -> torch.optim.Optimizer:
    return build_optimizer(optimizer_type, param_groups, lr, optimizer_args, device)[0]


def _schedule_free(optimizer: Any) -> Any:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None)):
        return inner
    return None


@contextmanager
def averaged_weights(optimizer: Any) -> Iterator[None]:
    """Schedule-free optimizers: the averaged (eval) weights inside the block, the exact training point after.

    eval()/train() interpolate the weights, which does not round-trip bit for bit; restoring a copy keeps a
    run that saves (or samples) along the way identical to one that does not. No-op for other optimizers.
    """
    inner = _schedule_free(optimizer)
    if inner is None:
        yield
        return
    params = [p for group in inner.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    inner.eval()
    try:
        yield
    finally:
        inner.train()
        with torch.no_grad():
            for p, copy in zip(params, saved, strict=True):
                p.copy_(copy)


def optimizer_train(optimizer: Any) -> None:
    """Schedule-free optimizers: back to the training point (after saving, sampling or validation)."""
    inner = _schedule_free(optimizer)
    if inner is not None:
        inner.train()


def optimizer_eval(optimizer: Any) -> None:
    """Schedule-free optimizers: switch the weights to the averaged point (before saving, sampling, validation)."""
    inner = _schedule_free(optimizer)
    if inner is not None:
        inner.eval()
