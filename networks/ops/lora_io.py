"""What the LoRA tools share: output checks, save precision, the exit-code convention of tools/*.py."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from library.errors import UserError

SAVE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_output(path: Path, flag: str, overwrite: bool, inputs: tuple[Path, ...] = ()) -> str:
    """The save format for `path` ("safetensors" or "ckpt"); refuses an existing file unless `overwrite`."""
    if path.suffix.lower() not in SAVE_SUFFIXES:
        raise UserError(f"{flag} {path}: the file name must end in {', '.join(SAVE_SUFFIXES)}")
    if any(path.resolve() == p.resolve() for p in inputs):
        raise UserError(f"{flag} {path}: the output must differ from the input files")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path}: already exists; pass --overwrite to replace it")
    return "safetensors" if path.suffix.lower() == ".safetensors" else "ckpt"


def run_tool(body: Callable[[], None]) -> int:
    """Run a tool's body: 0 when done, 2 with one `error: ...` line per problem for bad input."""
    try:
        body()
    except UserError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    return 0
