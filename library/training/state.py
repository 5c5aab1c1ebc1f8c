"""Resumable training state: network weights, optimizer, scheduler, RNG and the exact data position."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.errors import UserError
from library.training.atomic import atomic_folder, disk_full_is_user_error

STATE_FILE = "train_state.json"


@dataclass
class Progress:
    """Where training stands. `batch_in_epoch` counts micro-batches already consumed in `epoch` (0-based)."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seed: int = 0


def _rng_state() -> dict[str, Any]:
    # Plain lists and tensors only, so the file loads with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def save_state(
    folder: Path,
    *,
    network_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    progress: Progress,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the state so that a crash at any point leaves the previous `folder` intact (library.training.
    atomic: temp folder, fsync'ed files, one swap). `extra` goes into train_state.json (the run's
    max_train_steps, and the `family` / `network_module` that `check_state_fits` compares on --resume)."""
    from safetensors.torch import save_file

    optimizer_state = optimizer.state_dict()
    needed = _tensor_bytes(network_state) + _tensor_bytes(optimizer_state) + 2**20
    with disk_full_is_user_error(folder, needed), atomic_folder(folder) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in network_state.items()},
            str(tmp / "network.safetensors"),
        )
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**asdict(progress), **(extra or {})}, indent=2))
    return folder


def check_state_fits(folder: Path, *, family: str, script: str, network_module: str) -> None:
    """--resume from a state another script or network module saved: one line, before any weights load.
    States from before these keys were recorded pass (their tensor names are checked when loading)."""
    if folder.name.endswith((".tmp", ".old")):
        raise UserError(
            f"--resume: {folder} is the leftover of an interrupted save, not a finished state; resume from "
            f"{folder.with_suffix('')} instead"
        )
    try:
        data = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return  # validation reports a missing or unreadable train_state.json
    saved_family, saved_script = data.get("family"), data.get("script")
    if saved_family is not None and saved_family != family:
        raise UserError(
            f"--resume: {folder} is a state of {saved_script} (model family {saved_family}), which {script} "
            f"cannot continue; resume it with {saved_script}"
        )
    saved_module = data.get("network_module")
    if saved_module is not None and saved_module != network_module:
        raise UserError(
            f"--resume: {folder} was saved with --network_module {saved_module}, not {network_module}; pass "
            f"--network_module {saved_module} to resume it"
        )


def read_progress(folder: Path) -> tuple[Progress, dict[str, Any]]:
    data = json.loads((folder / STATE_FILE).read_text())
    fields = {k: data.pop(k) for k in ("global_step", "epoch", "batch_in_epoch", "seed")}
    return Progress(**fields), data


def load_state(
    folder: Path, *, network: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any
) -> Progress:
    from safetensors.torch import load_file

    weights = load_file(str(folder / "network.safetensors"))
    own = network.state_dict()
    differ = sorted(own.keys() ^ weights.keys()) + sorted(
        k for k in own.keys() & weights.keys() if own[k].shape != weights[k].shape
    )
    if differ:
        raise UserError(
            f"--resume: {folder} was saved for a different network ({len(differ)} tensors differ, e.g. "
            f"{differ[0]}); use the same --network_dim, --network_args and --network_train_* flags as the run "
            "that saved it"
        )
    network.load_state_dict(weights, strict=True)
    try:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    except ValueError as e:  # torch: "loaded state dict contains a parameter group that doesn't match ..."
        raise UserError(
            f"--resume: {folder / 'optimizer.pt'} does not fit this run ({e}); use the same --optimizer_type, "
            "learning rates and --network_args as the run that saved it"
        ) from None
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if scaler is not None and (folder / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    _restore_rng(torch.load(folder / "rng.pt", weights_only=True))
    return read_progress(folder)[0]
