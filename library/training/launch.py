"""What the launcher (`accelerate launch`, torchrun) asked for, read from the environment it sets, and the
Accelerator options that honour it."""

from __future__ import annotations

import os

import torch

from library.errors import UserError


def launched_world_size() -> int:
    """Processes of the launch (accelerate and torchrun set WORLD_SIZE); 1 when started directly."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def deepspeed_launch() -> bool:
    """`accelerate launch --use_deepspeed ...` (or a config file with DeepSpeed)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launch_problems(
    *, save_state: bool, resume: bool, fused: bool, schedule_free: bool, stochastic_rounding: bool
) -> list[str]:
    """An FSDP launch, and options that do not work when DeepSpeed owns the optimizer (one line each)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return [
            "FSDP launches are not supported: it shards parameters, and the LoRA's are small while the frozen "
            "base is not trained; launch with --multi_gpu (DDP) or --use_deepspeed --zero_stage 2"
        ]
    if not deepspeed_launch():
        return []
    why = "DeepSpeed ZeRO keeps the optimizer state partitioned over the processes"
    problems = []
    if save_state or resume:
        problems.append(
            f"--save_state/--resume with DeepSpeed: {why}, which our resumable states cannot hold; launch "
            "with --multi_gpu (DDP) for resumable runs"
        )
    if fused:
        problems.append("--fused_backward_pass/--fused_optimizer_groups with DeepSpeed: drop the flag")
    if schedule_free or stochastic_rounding:
        problems.append(
            "schedule-free optimizers and --full_bf16's stochastic rounding wrap the optimizer, which DeepSpeed "
            "replaces; launch with --multi_gpu (DDP) or use another optimizer / --mixed_precision bf16"
        )
    return problems


def accelerator_options() -> dict[str, bool]:
    """`cpu=True` for a multi-process launch on a machine without a GPU.

    accelerate picks its multi-process backend from the hardware: `accelerate launch --multi_gpu` (which
    rejects `--cpu` alongside) on a CPU-only machine would start every process as an independent
    single-process run, each training and writing the same files. With `cpu=True` the processes form one
    CPU process group (gloo), which also makes the CPU test of data parallel training possible.
    """
    if launched_world_size() > 1 and not _has_accelerator_device() and not deepspeed_launch():
        return {"cpu": True}  # (cpu=True would turn a DeepSpeed launch into plain DDP)
    return {}


def _has_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def check_world(num_processes: int) -> None:
    """The Accelerator must see the launch's processes; otherwise each would train alone on every batch."""
    launched = launched_world_size()
    if num_processes != launched:
        raise UserError(
            f"the launcher started {launched} processes (WORLD_SIZE) but accelerate formed a group of "
            f"{num_processes}; launch with `accelerate launch --multi_gpu --num_processes {launched}` on "
            "GPUs (or set ACCELERATE_USE_CPU=1 on CPUs)"
        )
