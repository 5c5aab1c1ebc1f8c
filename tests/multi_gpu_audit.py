"""Runs train_network.py and records which files this process wrote (Python audit hooks), for
tests/test_multi_gpu.py: `accelerate launch ... tests/multi_gpu_audit.py <train args>`.

Every open for writing, rename and mkdir whose path lies under one of AUDIT_DIRS (os.pathsep-separated) is
written at exit to AUDIT_OUT/rank-<RANK>.json. Native writers that bypass Python's `open` are not seen; our
saves go through Python files (atomic temp file + rename).

DEEPSPEED_ON_CPU=1: accelerate supports DeepSpeed only on GPUs (on a CPU it counts one process); this forms
the gloo group first and corrects accelerate's process count, so the DeepSpeed path can be tested on CPU.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WATCHED = [str(Path(d).resolve()) for d in os.environ["AUDIT_DIRS"].split(os.pathsep)]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
written: list[str] = []


def _note(path: object) -> None:
    if isinstance(path, (str, bytes, os.PathLike)):
        full = os.path.abspath(os.fsdecode(path))
        if any(full == d or full.startswith(d + os.sep) for d in WATCHED):
            written.append(full)


def _hook(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS:
            _note(path)
    elif event in ("os.rename", "os.mkdir"):
        _note(args[1] if event == "os.rename" else args[0])


def _dump() -> None:
    out = Path(os.environ["AUDIT_OUT"]) / f"rank-{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps(sorted(set(written))))


def _deepspeed_on_cpu() -> None:
    import torch
    from accelerate.state import PartialState

    torch.distributed.init_process_group("gloo")
    PartialState()
    rank = torch.distributed.get_rank()
    PartialState._shared_state.update(
        num_processes=torch.distributed.get_world_size(), process_index=rank, local_process_index=rank
    )


if os.environ.get("DEEPSPEED_ON_CPU") == "1":
    _deepspeed_on_cpu()
atexit.register(_dump)
sys.addaudithook(_hook)
sys.argv = [str(ROOT / "train_network.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "train_network.py"), run_name="__main__")
